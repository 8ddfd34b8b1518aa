"""The Go/No-Go gate: results table + correctness verdict + coverage + baseline -> verdict.

Each criterion is PASS, FAIL or INCOMPLETE. INCOMPLETE means no real measurement exists for
it: no result file, only projected points, or only CPU points for a GPU criterion. The
verdict is NO-GO if any criterion FAILs, INCOMPLETE if any lacks a measurement, GO only when
every criterion PASSes on real measurements.

The correctness criterion judges what the correctness report is evidence of (its "run" record,
written by harness.runner): it PASSes only for a PASS of the full suites with the configured
number of examples and the model suite's required checkpoints, run on a clean tree at the
commit the scaling run measured (also clean), with the gate workload's implementation as its
candidate (run.implementations[0]; peers beside it are not judged by its verdict). A report
from another commit, from uncommitted changes, about another stack, or with no run record says
nothing about the measured code and stack: INCOMPLETE, whatever its verdict. At the same
commit, a FAIL is a failure (FAIL) even from a subset; a PASS of a -k subset, of fewer examples
or of fewer checkpoints is INCOMPLETE. Each INCOMPLETE says why.

`evaluate_gate` is what `tpgate scaling` calls; `evaluate_reports` re-evaluates a scaling
report's gate from the reports as they are now (`tpgate gate`).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from impl.architecture import TPConfigError, require

from .points import POINT_KEY
from .scaling_analysis import regressions

TABLE = "[tool.tpgate.gate]"
# threshold -> (check, constraint); every threshold is a finite number (bools are not numbers here)
THRESHOLDS = {
    "min_speedup_ws4": (lambda v: v > 0, "must be a number > 0"),
    "max_exposed_comm": (lambda v: 0 < v <= 1, "must be a fraction in (0, 1]"),
    "max_dispatch": (lambda v: 0 < v <= 1, "must be a fraction in (0, 1]"),
    "min_coverage": (lambda v: 0 <= v <= 100, "must be a percentage in [0, 100]"),
    "regression_threshold": (lambda v: v >= 0, "must be a fraction >= 0"),
}
WORKLOAD_REQUIRED = ("preset", "phase")
WORKLOAD_OPTIONAL = ("implementation",)
CORRECTNESS = "correctness suites pass"
REGRESSION = "no regression against the baseline"


class ReportError(ValueError):
    """A report the gate reads is missing or not what tpgate writes; the message names the file."""


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
        """GateConfig from a [tool.tpgate.gate] table, checked before any sweep starts: unknown keys,
        thresholds that are not numbers in range, and a workload that is not a table of a known
        preset, phase (both required) and implementation raise TPConfigError naming the key, the
        value and the constraint."""
        require(isinstance(table, dict), TABLE, table, "must be a table")
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(table) - known)
        require(not unknown, TABLE, unknown, f"unknown keys; allowed: {sorted(known)}")
        for key, value in table.items():
            if key in THRESHOLDS:
                _check_threshold(key, value)
        if "workload" in table:
            _check_workload(table["workload"])
        return cls(**table)


def _check_threshold(key: str, value) -> None:
    check, constraint = THRESHOLDS[key]
    number = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
    require(number and check(value), f"{TABLE}.{key}", value, constraint)


def _check_workload(workload) -> None:
    from .sweep import PHASES, PRESETS  # lazy: the sweep pulls in the models

    require(isinstance(workload, dict), f"{TABLE}.workload", workload, f"must be a table with keys {list(WORKLOAD_REQUIRED)}")
    unknown = sorted(set(workload) - set(WORKLOAD_REQUIRED) - set(WORKLOAD_OPTIONAL))
    require(not unknown, f"{TABLE}.workload", unknown, f"unknown keys; allowed: {[*WORKLOAD_REQUIRED, *WORKLOAD_OPTIONAL]}")
    for key in WORKLOAD_REQUIRED:
        require(key in workload, f"{TABLE}.workload", workload, f"must name a {key}")
    for key, allowed in (("preset", sorted(PRESETS)), ("phase", list(PHASES))):
        if key in workload:
            require(isinstance(workload[key], str) and workload[key] in allowed, f"{TABLE}.workload.{key}", workload[key], f"must be one of {allowed}")
    if "implementation" in workload:  # any implementation spec: the results must then hold its rows (the gate refuses partial evidence)
        require(isinstance(workload["implementation"], str) and workload["implementation"], f"{TABLE}.workload.implementation",
                workload["implementation"], "must name an implementation (reference, dtensor, hf-tp, an entry point or module:object)")


def _criterion(name, measured, threshold, status, evidence, note=""):
    return {"name": name, "measured": measured, "threshold": threshold, "status": status, "evidence": evidence, "note": note}


def _read_json(path: Path):
    """(data, problem): problem says what is wrong with the file ("" when data is a JSON object)."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        return None, f"{path} is unreadable ({type(e).__name__}: {e})"
    return (data, "") if isinstance(data, dict) else (None, f"{path} is not a JSON object")


def checkout_source() -> dict:
    """{"git_commit", "git_dirty", "source_digest"} of this checkout, as harness.environment records them for a run."""
    from .environment import collect_environment

    return _source_of(collect_environment("-", "-"))


def _source_of(env: dict) -> dict:
    return {key: env.get(key) for key in ("git_commit", "git_dirty", "source_digest")}


def _known(value) -> bool:
    return bool(value) and value != "unknown"


def _provenance_gap(run: dict, scaling: dict) -> str:
    """Why the correctness run cannot be tied to the code the scaling run measured ("" when it can).

    The source digest decides when both runs recorded one (same bytes = same code, whatever git
    says); reports without one fall back to git: the same commit, both trees clean."""
    ours, theirs = run.get("source_digest"), scaling.get("source_digest")
    if _known(ours) and _known(theirs):
        return "" if ours == theirs else (f"correctness report ran source {ours[:12]}, the scaling run {theirs[:12]} "
                                          "(digests of impl/, harness/, suites/, pyproject.toml, noxfile.py): rerun tpgate correctness")
    ours, theirs = run.get("git_commit"), scaling.get("git_commit")
    if not ours or ours == "unknown":
        return "the correctness report records no git commit"
    if not theirs or theirs == "unknown":
        return "the scaling run's git commit is unknown"
    if ours != theirs:
        return f"correctness report from commit {ours[:12]}, scaling at {theirs[:12]}: rerun tpgate correctness"
    if run.get("git_dirty") is not False:
        return f"correctness report from a tree with uncommitted changes (at {ours[:12]}): not tied to one version of the code"
    if scaling.get("git_dirty") is not False:
        return f"scaling run from a tree with uncommitted changes (at {theirs[:12]}): the correctness report cannot be tied to it"
    return ""


def _selection_gap(run: dict) -> str:
    """Why a passing correctness run is not the full release check ("" when it is)."""
    if run.get("pytest_args"):
        return f"correctness report is {run.get('selection') or 'a narrowed selection: ' + ' '.join(run['pytest_args'])}"
    examples, required = run.get("examples"), run.get("examples_required")
    if not isinstance(examples, int) or not isinstance(required, int):
        return "the correctness report records no examples count"
    if examples < required:
        return f"correctness report ran {examples} examples per property, the gate needs {required} ([tool.tpgate.correctness].examples)"
    judged, needed = run.get("checkpoints"), run.get("checkpoints_required")
    if not isinstance(judged, list) or not isinstance(needed, list):
        return "the correctness report records no checkpoints judged (tpgate correctness --checkpoints)"
    missing = [c for c in needed if c not in judged]
    if missing:
        return f"correctness report judged its candidate on checkpoints {judged}, without {missing} (tpgate correctness --checkpoints)"
    return ""


def _stack_gap(run: dict, implementation: str) -> str:
    """Why the correctness run is not evidence about `implementation`, the gate workload's ("" when it is)."""
    judged = run.get("implementations")
    if not isinstance(judged, list) or not judged:
        return "the correctness report records no implementations judged: rerun tpgate correctness"
    if judged[0] != implementation:
        return (f"correctness report judged {judged[0]!r} (its candidate; peers {judged[1:]}), the gate workload is {implementation!r}'s: "
                f"rerun tpgate correctness --impl {implementation}")
    return ""


def _correctness(correctness_json: Path | None, scaling: dict, implementation: str) -> dict:
    evidence = "../correctness/index.html"

    def result(verdict, status, note=""):
        return _criterion(CORRECTNESS, verdict, "PASS of the full suites on the scaling run's source", status, evidence, note)

    if not correctness_json or not Path(correctness_json).is_file():
        return result(None, "INCOMPLETE", "no correctness report (run nox -s correctness)")
    report, problem = _read_json(Path(correctness_json))
    if problem:
        return result(None, "INCOMPLETE", problem)
    verdict, run = report.get("verdict"), report.get("run")
    if not isinstance(run, dict) or not run:
        return result(verdict, "INCOMPLETE", "the correctness report records no run (selection, examples, commit): rerun tpgate correctness")
    gap = _provenance_gap(run, scaling) or _stack_gap(run, implementation)
    if gap:  # evidence about other code or another stack: its verdict, FAIL included, says nothing of this one
        return result(verdict, "INCOMPLETE", gap)
    if verdict != "PASS":  # a failure at this commit is a failure, whatever the selection
        return result(verdict, "FAIL", "" if verdict == "FAIL" else f"verdict {verdict!r} is not PASS")
    gap = _selection_gap(run)
    return result(verdict, "INCOMPLETE" if gap else "PASS", gap)


def _coverage(coverage_json: Path | None, cfg: GateConfig) -> dict:
    name, threshold = "line coverage of impl/", f">= {cfg.min_coverage}%"
    if not coverage_json or not Path(coverage_json).is_file():
        return _criterion(name, None, threshold, "INCOMPLETE", "", "no coverage report")
    data, problem = _read_json(Path(coverage_json))
    pct = (data.get("totals") or {}).get("percent_covered") if data else None
    if not isinstance(pct, (int, float)) or isinstance(pct, bool):
        return _criterion(name, None, threshold, "INCOMPLETE", "", problem or f"{coverage_json} holds no totals.percent_covered")
    return _criterion(name, float(pct), threshold, "PASS" if pct >= cfg.min_coverage else "FAIL", "../coverage/index.html")


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


def _verdict(criteria: list[dict]) -> str:
    statuses = {c["status"] for c in criteria}
    return "NO-GO" if "FAIL" in statuses else "INCOMPLETE" if "INCOMPLETE" in statuses else "GO"


def evaluate_gate(results: pd.DataFrame | None, cfg: GateConfig, correctness_json: Path | None, coverage_json: Path | None,
                  baseline: pd.DataFrame | None, scaling_link: str = "results.csv", *, scaling_source: dict | None = None) -> dict:
    """The gate for `results` (a scaling run's rows). `scaling_source` ({"git_commit", "git_dirty"})
    is the code the scaling run measured; None means this checkout as it is now (a fresh run)."""
    criteria = [_correctness(correctness_json, scaling_source if scaling_source is not None else checkout_source(),
                             cfg.workload.get("implementation", "reference"))]
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
    criteria.append(_coverage(coverage_json, cfg))
    criteria.append(_regression(results, baseline, cfg))
    return {"verdict": _verdict(criteria), "criteria": criteria, "config": cfg.__dict__}


def _scaling_report(path: Path) -> dict:
    """The scaling report's results.json, checked to hold what the gate needs (ReportError otherwise)."""
    if not path.is_file():
        raise ReportError(f"{path} missing — run `tpgate scaling` (or nox -s scaling) first")
    data, problem = _read_json(path)
    if problem:
        raise ReportError(problem)
    gate, rows = data.get("gate"), data.get("rows")
    if not isinstance(gate, dict) or not isinstance(gate.get("config"), dict):
        raise ReportError(f"{path} holds no gate with its config: not a results.json of tpgate scaling")
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ReportError(f"{path} holds no list of result rows: not a results.json of tpgate scaling")
    return data


def evaluate_reports(reports: str | Path) -> tuple[dict, dict]:
    """(gate now, gate recorded) for the scaling report under `reports`, re-evaluated from the
    correctness and coverage reports as they are now, with the gate config the scaling run used
    and the commit it recorded. The regression criterion is carried over as recorded (it depends
    only on the scaling rows and the --baseline that run was given). Raises ReportError naming the
    file when the scaling report is missing, unreadable or holds no gate, config or rows."""
    reports = Path(reports)
    path = reports / "scaling" / "results.json"
    data = _scaling_report(path)
    recorded = data["gate"]
    try:
        cfg = GateConfig.from_table(recorded["config"])
    except TPConfigError as e:
        raise ReportError(f"{path}: the recorded gate config is invalid ({e})") from None
    env = data.get("environment") if isinstance(data.get("environment"), dict) else {}
    source = _source_of(env)
    results = pd.DataFrame(data["rows"])
    if not results.empty:
        missing = sorted({"preset", "phase", "implementation", "world_size", "status", "projected", "device"} - set(results.columns))
        if missing:
            raise ReportError(f"{path}: result rows lack columns {missing}: not a results.json of tpgate scaling")
    gate = evaluate_gate(results, cfg, reports / "correctness" / "results.json", reports / "coverage" / "coverage.json", None,
                         scaling_source=source)
    stored = next((c for c in recorded.get("criteria") or [] if isinstance(c, dict) and c.get("name") == REGRESSION), None)
    if stored is not None:
        gate["criteria"] = [stored if c["name"] == REGRESSION else c for c in gate["criteria"]]
        gate["verdict"] = _verdict(gate["criteria"])
    return gate, recorded


def _regression(results, baseline, cfg: GateConfig) -> dict:
    """Measured points of this run against the same points (harness.points.POINT_KEY, dtype and
    device included) measured in `baseline` (harness.scaling_analysis.regressions)."""
    name = REGRESSION
    if baseline is None or results is None or results.empty:
        return _criterion(name, None, f"<= +{cfg.regression_threshold:.0%}", "INCOMPLETE", "", "no baseline given")
    joined = regressions(results, baseline, cfg.regression_threshold)
    if joined.empty:
        unknown = [k for k in POINT_KEY if k not in baseline.columns]
        return _criterion(name, None, f"<= +{cfg.regression_threshold:.0%}", "INCOMPLETE", "",
                          "the baseline holds no measured point of this device, dtype and shape"
                          + (f" (it lacks the key columns {unknown})" if unknown else ""))
    ratio, allowed = joined["ratio"], joined["allowed"]
    worst = int((ratio - 1 - allowed).idxmax())
    value = float(ratio.loc[worst])
    ok = bool(((ratio - 1) <= allowed).all())
    note = f"worst: {joined.loc[worst, 'preset']} {joined.loc[worst, 'phase']} ws={int(joined.loc[worst, 'world_size'])}, allowed +{allowed.loc[worst]:.0%}"
    if math.isnan(value):
        return _criterion(name, None, "", "INCOMPLETE", "", "latencies missing")
    return _criterion(name, value, f"latency ratio <= 1 + max({cfg.regression_threshold:.0%}, 3x spread)", "PASS" if ok else "FAIL", "#baseline", note)
