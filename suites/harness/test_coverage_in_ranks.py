"""The coverage configuration ([tool.coverage.*] in pyproject.toml) counts lines that only rank
processes execute: a driver starts a 2-rank world (multiprocessing spawn) under `coverage run`,
the ranks all-reduce, and after `coverage combine` ProcessGroupCommunicator.all_reduce's
collective call — which the driver never executes — must be covered."""
from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
DRIVER = textwrap.dedent("""
    from harness.runtime.orchestrator import MultiGPUOrchestrator
    from suites.orchestrator import rank_fns

    if __name__ == "__main__":  # spawned ranks re-import this file
        with MultiGPUOrchestrator(2, timeout_s=60) as world:
            assert world.run(rank_fns.all_reduce_rank) == [3.0, 3.0]
""")


def _line_of(fn, text: str) -> int:
    lines, start = inspect.getsourcelines(fn)
    return start + next(i for i, line in enumerate(lines) if text in line)


def test_lines_run_only_inside_ranks_are_counted(tmp_path):
    pytest.importorskip("coverage")
    from impl.communication import ProcessGroupCommunicator

    target = _line_of(ProcessGroupCommunicator.all_reduce, "dist.all_reduce(")
    (tmp_path / "driver.py").write_text(DRIVER)
    # a clean environment: no coverage of an outer run may leak into this one
    env = {k: v for k, v in os.environ.items() if not k.startswith("COVERAGE_")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    rc = ["--rcfile", str(REPO / "pyproject.toml")]

    def coverage(*args):
        done = subprocess.run([sys.executable, "-m", "coverage", *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=240)
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    coverage("run", *rc, "driver.py")
    data_files = list(tmp_path.glob(".coverage.*"))
    assert len(data_files) >= 3, f"one data file per process (driver + 2 ranks), got {[p.name for p in data_files]}"
    coverage("combine", *rc)
    coverage("json", *rc, "-o", "coverage.json")
    files = json.loads((tmp_path / "coverage.json").read_text())["files"]
    comm = next(v for k, v in files.items() if k.replace(os.sep, "/").endswith("impl/communication.py"))
    assert target in comm["executed_lines"], f"line {target} (ProcessGroupCommunicator.all_reduce) not counted: rank processes were not measured"
