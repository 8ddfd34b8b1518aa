"""The correctness runner: suites -> pytest -> metric rows -> pandas -> report.

Runs the correctness suites in-process under pytest, collects each test's outcome and
every metric row the suites emit (JSON lines in a temporary file named by $TPGATE_METRICS),
and hands both tables to the report writer.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path

import pandas as pd

from impl.architecture import TPConfigError

from . import tolerance
from .environment import collect_environment
from .report import write_correctness_report

REPO = Path(__file__).resolve().parent.parent
SUITES = ("suites/correctness", "suites/model", "suites/orchestrator", "suites/faults", "suites/test_bad_input.py")


class _Outcomes:
    """pytest plugin: one row per test (call phase, or the failing setup/teardown)."""

    def __init__(self):
        self.rows: dict[str, dict] = {}

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            row = self.rows.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "duration_s": 0.0, "message": ""})
            row["duration_s"] += report.duration
            if report.outcome != "passed" and row["outcome"] == "passed":
                row["outcome"] = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
                row["message"] = str(report.longrepr)[-4000:] if report.longrepr else ""


def configured_examples(default: int = 10) -> int:
    """`examples` from [tool.tpgate.correctness] in pyproject.toml (hypothesis examples per property)."""
    import tomllib

    try:
        config = tomllib.loads((REPO / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return default
    value = config.get("tool", {}).get("tpgate", {}).get("correctness", {}).get("examples", default)
    if not isinstance(value, int) or value < 1:
        raise TPConfigError("[tool.tpgate.correctness].examples", value, "must be an integer >= 1")
    return value


def run_correctness(out_dir: str | Path = "reports/correctness", examples: int | None = None, device: str = "cpu",
                    pytest_args: list[str] | None = None) -> dict:
    """Run the suites and write the report. Returns the report summary (verdict etc.)."""
    import pytest

    from impl.orchestrator import choose_backend

    backend = choose_backend(device, 1, _gpu_count(device))  # validates device before anything runs
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="tpgate-") as tmp:
        sink = Path(tmp) / "metrics.jsonl"
        env = {"TPGATE_METRICS": str(sink), "TPGATE_DEVICE": device, "TPGATE_EXAMPLES": str(examples or configured_examples())}
        saved = {k: os.environ.get(k) for k in env}
        os.environ.update(env)
        plugin = _Outcomes()
        start = time.monotonic()
        try:
            pytest.main(["-q", "-p", "no:cacheprovider", *[str(REPO / s) for s in SUITES], *(pytest_args or [])], plugins=[plugin])
        finally:
            for k, v in saved.items():
                os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)
        wall_s = time.monotonic() - start
        metrics = pd.DataFrame([json.loads(line) for line in sink.read_text().splitlines()] if sink.exists() else [])
    tests = pd.DataFrame(list(plugin.rows.values()), columns=["nodeid", "outcome", "duration_s", "message"])
    environment = {**collect_environment(backend, device), "wall_time_s": round(wall_s, 1)}
    return write_correctness_report(metrics, tests, environment, out_dir, tolerance.__doc__)


def _gpu_count(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0
