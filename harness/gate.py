"""The Go/No-Go gate: results table + correctness verdict + coverage + baseline -> verdict.

Each criterion is PASS, FAIL or INCOMPLETE. INCOMPLETE means no real measurement exists for
it: no result file, only projected points, or only CPU points for a GPU criterion. The
verdict is NO-GO if any criterion FAILs, INCOMPLETE if any lacks a measurement, GO only when
every criterion PASSes on real measurements.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from impl.architecture import require


@dataclass
class GateConfig:
    min_speedup_ws4: float = 3.8
    max_exposed_comm: float = 0.10
    max_dispatch: float = 0.10
    min_coverage: float = 90.0
    regression_threshold: float = 0.10  # at least; widened to 3x the measured run-to-run spread
    workload: dict = field(default_factory=lambda: {"preset": "llama3-8b", "phase": "prefill", "implementation": "reference"})

    @classmethod
    def from_table(cls, table: dict) -> "GateConfig":
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        require(not unknown, "[tool.tpgate.gate]", unknown, f"unknown keys; allowed: {sorted(known)}")
        return cls(**table)


def _criterion(name, measured, threshold, status, evidence, note=""):
    return {"name": name, "measured": measured, "threshold": threshold, "status": status, "evidence": evidence, "note": note}


def _gate_point(results: pd.DataFrame, cfg: GateConfig, world_size: int):
    """(row or None, reason) for the gate workload at `world_size`, measured on GPU."""
    if results is None or results.empty:
        return None, "no scaling results"
    w = cfg.workload
    sel = results[(results["preset"] == w["preset"]) & (results["phase"] == w["phase"]) & (results["implementation"] == w.get("implementation", "reference"))
                  & (results["world_size"] == world_size) & (results["status"] == "ok")]
    if sel.empty:
        return None, f"no successful point for {w} at world size {world_size}"
    measured = sel[~sel["projected"].astype(bool)]
    if measured.empty:
        return None, "only a projected point exists (projections never count towards GO)"
    row = measured.iloc[0]
    if row["device"] != "cuda":
        return None, "only CPU points exist (gloo on shared cores is not GPU evidence)"
    return row, ""


def evaluate_gate(results: pd.DataFrame | None, cfg: GateConfig, correctness_json: Path | None, coverage_json: Path | None,
                  baseline: pd.DataFrame | None, scaling_link: str = "results.csv") -> dict:
    criteria = []
    # 1. correctness suites
    if correctness_json and Path(correctness_json).is_file():
        verdict = json.loads(Path(correctness_json).read_text()).get("verdict")
        criteria.append(_criterion("correctness suites pass", verdict, "PASS", "PASS" if verdict == "PASS" else "FAIL", "../correctness/index.html"))
    else:
        criteria.append(_criterion("correctness suites pass", None, "PASS", "INCOMPLETE", "../correctness/index.html", "no correctness report (run nox -s correctness)"))
    # 2-4. the gate workload at world size 4
    row, reason = _gate_point(results, cfg, 4)
    for name, key, threshold, better in (("speedup at world size 4", "speedup", cfg.min_speedup_ws4, "ge"),
                                         ("exposed communication at world size 4", "exposed_comm", cfg.max_exposed_comm, "lt"),
                                         ("dispatch overhead at world size 4", "dispatch_fraction", cfg.max_dispatch, "lt")):
        text = f">= {threshold}" if better == "ge" else f"< {threshold:.0%}"
        if row is None or key not in row or pd.isna(row[key]):
            criteria.append(_criterion(name, None, text, "INCOMPLETE", scaling_link, reason or f"{key} not measured"))
            continue
        value = float(row[key])
        ok = value >= threshold if better == "ge" else value < threshold
        criteria.append(_criterion(name, value, text, "PASS" if ok else "FAIL", scaling_link))
    # 5. coverage of impl/
    if coverage_json and Path(coverage_json).is_file():
        pct = float(json.loads(Path(coverage_json).read_text())["totals"]["percent_covered"])
        criteria.append(_criterion("line coverage of impl/", pct, f">= {cfg.min_coverage}%", "PASS" if pct >= cfg.min_coverage else "FAIL", "../coverage/index.html"))
    else:
        criteria.append(_criterion("line coverage of impl/", None, f">= {cfg.min_coverage}%", "INCOMPLETE", "", "no coverage report"))
    # 6. regression against the stored baseline
    criteria.append(_regression(results, baseline, cfg))
    statuses = {c["status"] for c in criteria}
    verdict = "NO-GO" if "FAIL" in statuses else "INCOMPLETE" if "INCOMPLETE" in statuses else "GO"
    return {"verdict": verdict, "criteria": criteria, "config": cfg.__dict__}


REGRESSION_KEYS = ["implementation", "preset", "phase", "batch", "prompt", "steps", "world_size", "device", "dtype"]


def _regression(results, baseline, cfg: GateConfig) -> dict:
    name = "no regression against the baseline"
    if baseline is None or results is None or results.empty:
        return _criterion(name, None, f"<= +{cfg.regression_threshold:.0%}", "INCOMPLETE", "", "no baseline given")
    now = results[(results["status"] == "ok") & ~results["projected"].astype(bool)]
    base = baseline[(baseline["status"] == "ok") & ~baseline["projected"].astype(bool)]
    joined = now.merge(base, on=REGRESSION_KEYS, suffixes=("", "_base"))
    if joined.empty:
        return _criterion(name, None, f"<= +{cfg.regression_threshold:.0%}", "INCOMPLETE", "", "the baseline holds no measured point of this device and shape")
    ratio = joined["latency_s"] / joined["latency_s_base"]
    # noise: p90/median spread of both runs; a slowdown within 3x that spread is not a regression
    spread = ((joined["latency_p90_s"] / joined["latency_s"] - 1).clip(lower=0) + (joined["latency_p90_s_base"] / joined["latency_s_base"] - 1).clip(lower=0))
    allowed = (3 * spread).clip(lower=cfg.regression_threshold)
    worst = int((ratio - 1 - allowed).idxmax())
    value = float(ratio.loc[worst])
    ok = bool(((ratio - 1) <= allowed).all())
    note = f"worst: {joined.loc[worst, 'preset']} {joined.loc[worst, 'phase']} ws={joined.loc[worst, 'world_size']}, allowed +{allowed.loc[worst]:.0%}"
    if math.isnan(value):
        return _criterion(name, None, "", "INCOMPLETE", "", "latencies missing")
    return _criterion(name, value, f"latency ratio <= 1 + max({cfg.regression_threshold:.0%}, 3x spread)", "PASS" if ok else "FAIL", "#baseline", note)
