"""`tpgate scaling` / `nox -s scaling`: sweep -> results table -> gate -> report."""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pandas as pd

from impl.architecture import TPConfigError, require

from .environment import collect_environment
from .gate import GateConfig, evaluate_gate
from .sweep import SweepConfig, load_config, run_sweep

REPO = Path(__file__).resolve().parent.parent


def read_tables(config_file: str | None) -> tuple[dict, dict]:
    """([tool.tpgate.scaling], [tool.tpgate.gate]) from `config_file` or the repo's pyproject.toml."""
    path = Path(config_file) if config_file else REPO / "pyproject.toml"
    require(path.is_file(), "--config", str(path), "must be an existing TOML file")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as e:
        raise TPConfigError("--config", str(path), f"is not valid TOML ({e})") from None
    tool = data.get("tool", {}).get("tpgate", data)  # a standalone file may omit [tool.tpgate]
    return tool.get("scaling", {}), tool.get("gate", {})


def read_baseline(path: str | None, cfg: SweepConfig) -> pd.DataFrame | None:
    if not path:
        return None
    p = Path(path)
    require(p.is_file(), "--baseline", path, "must be a results.csv written by tpgate scaling")
    frame = pd.read_csv(p)
    missing = sorted({"implementation", "preset", "phase", "world_size", "device", "latency_s", "status", "projected"} - set(frame.columns))
    require(not missing, "--baseline", path, f"is not a tpgate scaling results.csv (missing columns {missing})")
    require(set(frame["device"]) & {cfg.device}, "--baseline", path, f"holds devices {sorted(set(frame['device']))}, this sweep runs on {cfg.device}")
    return frame


def run_scaling(cfg: SweepConfig, gate_cfg: GateConfig, out_dir: str | Path = "reports/scaling", baseline: pd.DataFrame | None = None) -> dict:
    from tqdm import tqdm

    from impl.orchestrator import MultiGPUOrchestrator

    from .scaling_report import write_index, write_scaling_report

    worlds: dict[int, MultiGPUOrchestrator] = {}

    def world_for(n: int):
        if n not in worlds:
            worlds[n] = MultiGPUOrchestrator(n, device=cfg.device, timeout_s=900)
        return worlds[n]

    bar = tqdm(total=len(cfg.implementations) * len(cfg.presets) * len(cfg.phases) * len(cfg.world_sizes), desc="scaling sweep", unit="point", file=sys.stderr)

    def progress(i, n, label):
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        results = run_sweep(cfg, world_for, progress=progress)
    finally:
        bar.close()
        for w in worlds.values():
            w.shutdown()
    out_dir = Path(out_dir)
    reports = out_dir.parent
    gate = evaluate_gate(results, gate_cfg, reports / "correctness" / "results.json", reports / "coverage" / "coverage.json", baseline)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    summary = write_scaling_report(results, gate, collect_environment(backend, cfg.device), out_dir, baseline)
    write_index(reports)
    return {**summary, "gate": gate, "results": results}
