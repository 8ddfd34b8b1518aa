"""`tpgate scaling` / `nox -s scaling`: collective benchmark -> cost model -> sweep -> results table -> gate -> report.

The collective microbenchmark (harness.collectives) runs whenever at least two ranks can really
be measured here (gloo worlds on CPU; NCCL worlds of one GPU per rank). Its alpha-beta fit prices
projected points only when it was measured on the kind of backend and device the projection is
for (gloo/CPU for a CPU sweep, NCCL/CUDA for a GPU sweep); otherwise the documented defaults
(harness.perf_model.DEFAULTS) are used, and the report says which and why.
"""
from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import pandas as pd
import torch

from impl.architecture import TPConfigError, parse_dtype, require
from impl.low_latency import ALGORITHMS

from .environment import collect_environment
from .gate import GateConfig, evaluate_gate
from .collectives import bench_collectives
from .perf_model import DEFAULTS, CostModel, fit_cost_model, merge_tables
from .scaling_analysis import add_speedups
from .sweep import PRESETS, SweepConfig, load_config, run_sweep, sweep_tasks

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


BASELINE_COLUMNS = ("implementation", "preset", "phase", "world_size", "device", "latency_s", "status", "projected")


def read_baseline(path: str | None, cfg: SweepConfig) -> pd.DataFrame | None:
    """The results.csv of an earlier `tpgate scaling` run, or None when `path` is empty.

    Anything else (an empty file, a file that is not CSV, a CSV without the results' columns or
    with non-numeric latencies, another device's results) is a TPConfigError naming --baseline,
    raised before the sweep starts any world."""
    if not path:
        return None
    p = Path(path)
    not_results = "is not a tpgate scaling results.csv"
    require(p.is_file(), "--baseline", path, "must be a results.csv written by tpgate scaling")
    try:
        frame = pd.read_csv(p)
    except (pd.errors.EmptyDataError, pd.errors.ParserError, UnicodeDecodeError, OSError) as e:
        raise TPConfigError("--baseline", path, f"{not_results} ({type(e).__name__}: {e})") from None
    missing = sorted(set(BASELINE_COLUMNS) - set(frame.columns))
    require(not missing, "--baseline", path, f"{not_results} (missing columns {missing})")
    require(not frame.empty, "--baseline", path, f"{not_results} (it holds no rows)")
    # the gate reads these as numbers and booleans: a string column would compare or cast wrongly
    for column in ("latency_s", "world_size"):
        require(pd.api.types.is_numeric_dtype(frame[column]), "--baseline", path, f"{not_results} (column {column} is not numeric)")
    require(pd.api.types.is_bool_dtype(frame["projected"]), "--baseline", path, f"{not_results} (column projected is not True/False)")
    require(set(frame["device"]) & {cfg.device}, "--baseline", path, f"holds devices {sorted(set(frame['device']))}, this sweep runs on {cfg.device}")
    return frame


def measurable_world_sizes(cfg: SweepConfig, gpus: int) -> list[int]:
    """World sizes >= 2 of the sweep whose ranks each get a real device here (CPU: always)."""
    return [ws for ws in cfg.world_sizes if ws >= 2 and (cfg.device == "cpu" or ws <= gpus)]


def collective_sizes(cfg: SweepConfig) -> list[int]:
    """Message sizes (bytes, nccl-tests convention) the swept points communicate, plus powers of
    4 from 1 KiB up to the largest of them or 4 MiB (the curve the cost model is fitted to).

    Per preset and phase: the hidden-state all-reduce (batch x tokens x hidden) and the LM head's
    gathered logits (batch x vocab for the last position)."""
    elsize = torch.empty((), dtype=parse_dtype(cfg.dtype)).element_size()
    sizes = set()
    for preset in cfg.presets:
        config = PRESETS[preset]
        for phase in cfg.phases:
            tokens = phase.prompt if phase.kind == "prefill" else 1
            sizes.add(phase.batch * tokens * config.hidden_size * elsize)
            sizes.add(phase.batch * config.vocab_size * elsize)
    # up to >= 4 MiB: below that, gloo's and NCCL's latency swamps the bandwidth term and the slope is noise
    p, top = 1 << 10, max(max(sizes), 4 << 20)
    while p <= top:
        sizes.add(p)
        p *= 4
    return sorted(sizes)


def collective_benchmark(cfg: SweepConfig, world_for, gpus: int, iters: int = 20, warmup: int = 5) -> dict:
    """{"rows": bench_collectives rows of every measurable world size, "world_sizes", "reason"}.

    No rows (and the reason) when fewer than two ranks can be measured; a failing benchmark is
    recorded as the reason, and the sweep goes on with the default cost model."""
    sizes = measurable_world_sizes(cfg, gpus)
    if not sizes:
        where = f"{gpus} GPU(s)" if cfg.device == "cuda" else "this sweep's world sizes"
        return {"rows": [], "world_sizes": [], "reason": f"no collective benchmark: {where} give no world of >= 2 ranks to measure"}
    rows = []
    try:
        for ws in sizes:
            rows += bench_collectives(world_for(ws), collective_sizes(cfg), dtype=cfg.dtype, warmup=warmup, iters=iters)
            if cfg.decode_all_reduce == "low-latency" and cfg.device == "cuda":  # the decode step's all-reduces, as captured
                rows += bench_collectives(world_for(ws), collective_sizes(cfg), dtype=cfg.dtype, ops=("all_reduce",), warmup=warmup, iters=iters,
                                          all_reduce_algorithms=ALGORITHMS, captured=True)
    except Exception as e:  # noqa: BLE001 - a failed benchmark leaves the default cost model, recorded
        return {"rows": rows, "world_sizes": sizes, "reason": f"collective benchmark failed: {type(e).__name__}: {e}"[:2000]}
    return {"rows": rows, "world_sizes": sizes, "reason": ""}


def choose_cost_model(cfg: SweepConfig, bench: dict) -> CostModel:
    """The cost model projections use, with its source, the reason it was chosen and the fit.

    The fit of `bench` (pooled over its world sizes, plus each measured world size's own
    parameters, which pricing that world size prefers) is used when its rows were measured with
    the backend and device kind the projection is for (gloo on CPU for a CPU sweep, NCCL on CUDA
    for a GPU sweep); ops it lacks keep their defaults. Otherwise harness.perf_model.DEFAULTS,
    with the reason (the fit, if one was made, is still recorded)."""
    target = ("gloo", "cpu") if cfg.device == "cpu" else ("nccl", "cuda")
    fit, reason = None, bench.get("reason") or ""
    rows = [r for r in bench.get("rows") or [] if r["world_size"] > 1]
    if rows:
        try:
            fit = fit_cost_model(rows, per_world_size=True)
        except TPConfigError as e:
            reason = f"the collective benchmark could not be fitted ({e})"
    if fit:
        measured_on = (rows[0]["backend"], str(rows[0]["device"]).split(":")[0])
        if measured_on == target:
            ws = sorted({r["world_size"] for r in rows})
            source = f"fitted to this run's {measured_on[0]} collective benchmark ({measured_on[1]}, world sizes {', '.join(map(str, ws))})"
            return CostModel({**DEFAULTS.ops, **fit.ops}, fit.by_world_size, source,
                             f"measured on {measured_on[0]}/{measured_on[1]}, the kind of backend and device projected", fit,
                             merge_tables(DEFAULTS.tables, fit.tables))
        reason = (f"the collective benchmark ran on {measured_on[0]}/{measured_on[1]}, projections are for {target[0]}/{target[1]}: "
                  "its figures would misprice them")
    return DEFAULTS.with_source(DEFAULTS.source, reason or "no collective benchmark", fit)


def run_scaling(cfg: SweepConfig, gate_cfg: GateConfig, out_dir: str | Path = "reports/scaling", baseline: pd.DataFrame | None = None) -> dict:
    from tqdm import tqdm

    from harness.runtime.orchestrator import MultiGPUOrchestrator

    from .scaling_report import write_index, write_scaling_report

    worlds: dict[int, MultiGPUOrchestrator] = {}

    def world_for(n: int):
        if n not in worlds:
            worlds[n] = MultiGPUOrchestrator(n, device=cfg.device, timeout_s=900)
        return worlds[n]

    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    bar = tqdm(total=len(sweep_tasks(cfg, gpus)), desc="scaling sweep", unit="point", file=sys.stderr)

    def progress(i, n, label):
        bar.set_postfix_str(label)
        bar.update(1)

    try:
        bar.set_postfix_str("collective benchmark")
        bench = collective_benchmark(cfg, world_for, gpus)
        cost_model = choose_cost_model(cfg, bench)
        results = add_speedups(run_sweep(cfg, world_for, cost_model, progress=progress))
    finally:
        bar.close()
        for w in worlds.values():
            w.shutdown()
    out_dir = Path(out_dir)
    reports = out_dir.parent
    gate = evaluate_gate(results, gate_cfg, reports / "correctness" / "results.json", reports / "coverage" / "coverage.json", baseline)
    backend = "nccl" if cfg.device == "cuda" else "gloo"
    summary = write_scaling_report(results, gate, collect_environment(backend, cfg.device), out_dir, baseline,
                                   collectives={**bench, "cost_model": cost_model.to_dict()})
    write_index(reports)
    return {**summary, "gate": gate, "results": results, "cost_model": cost_model.to_dict()}
