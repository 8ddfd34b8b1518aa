"""The driver interrupted: Ctrl-C (SIGINT to the process group, as a terminal sends it) in the
middle of `tpgate scaling` ends it promptly with no rank left, leaves the report written
before intact and no half-written one; a later run publishes a complete report undisturbed.
Interrupts inside the atomic writers themselves are checked in-process."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from harness import atomic

from .support import alive, descendants

REPO = Path(__file__).resolve().parents[2]
SWEEP = """
[tool.tpgate.scaling]
presets = ["tiny"]
warmup = 0
repeats = 50
phases = [{ kind = "prefill", batch = 1, prompt = 8 }]
"""
# After SIGINT: the busy world is terminated (SIGTERM, join <= 1 s per rank), idle worlds are
# stopped politely (join <= 5 s; ~0.1 s measured), then the interpreter exits (~0.5 s).
# ~1 s measured; 8 s allowed for a loaded 2-core machine.
SIGINT_BOUND_S = 1.0 + 5.0 + 2.0
START_LIMIT_S = 120.0  # until the sweep's world of n ranks exists (~10 s measured): a hang guard, not a bound
LATER_RUN_LIMIT_S = 300.0  # the complete later run (~8 s measured); a hang guard, not a bound


def _ranks_of(pid: int) -> set[int]:
    found = set()
    for p in descendants(pid):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if b"multiprocessing.spawn" in cmd:
            found.add(p)
    return found


def _tpgate(args: list[str], **kw) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, "-m", "harness.cli", *args], cwd=REPO, env=env, start_new_session=True, text=True, **kw)


def _seed_earlier_report(out: Path) -> dict[str, bytes]:
    out.mkdir(parents=True)
    earlier = {"results.json": json.dumps({"gate": {"verdict": "INCOMPLETE", "criteria": []}, "rows": []}).encode(),
               "results.csv": b"implementation,preset\n", "index.html": b"<html>earlier report</html>"}
    for name, data in earlier.items():
        (out / name).write_bytes(data)
    return earlier


def test_sigint_mid_sweep(world_size, tmp_path, time_table):
    config = tmp_path / "sweep.toml"
    config.write_text(SWEEP)
    reports = tmp_path / "reports"
    out = reports / "scaling"
    earlier = _seed_earlier_report(out)
    args = ["scaling", "--config", str(config), "--world-sizes", f"1,{world_size}", "--out", str(out)]

    proc = _tpgate(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen: set[int] = set()
    deadline = time.monotonic() + START_LIMIT_S
    while len(_ranks_of(proc.pid)) < world_size:  # partway: the world of n ranks is up (the 1-rank point is done)
        assert proc.poll() is None, f"the sweep ended before it could be interrupted: {proc.communicate()[1][-2000:]}"
        assert time.monotonic() < deadline, "the sweep never reached its last world"
        seen |= descendants(proc.pid)
        time.sleep(0.2)  # scanning /proc costs CPU the sweep needs on a 2-core machine
    time.sleep(0.6 * world_size)  # into its init (~0.5 s per rank here) or its measurements
    seen |= descendants(proc.pid)
    start = time.monotonic()
    os.killpg(proc.pid, signal.SIGINT)
    _, stderr = proc.communicate(timeout=SIGINT_BOUND_S + 30)  # +30: report an overrun as a failed bound, not a hang
    while any(alive(p) for p in seen) and time.monotonic() - start < SIGINT_BOUND_S:
        time.sleep(0.05)
    elapsed = time.monotonic() - start
    assert proc.returncode != 0 and ("KeyboardInterrupt" in stderr or "interrupted" in stderr), stderr[-2000:]
    assert elapsed <= SIGINT_BOUND_S, f"driver and ranks gone after {elapsed:.2f}s, bound {SIGINT_BOUND_S}s"
    assert not [p for p in seen if alive(p)], "a rank (or helper) survived the interrupt"
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier, "the report written before was changed"
    assert sorted(p.name for p in reports.iterdir()) == ["scaling"], "staging or backup left beside the report"
    time_table.record("driver SIGINT mid-sweep (`tpgate scaling`) → exits, no process left, old report intact", world_size, SIGINT_BOUND_S, elapsed)

    # the later run (one world size keeps it short) publishes over the same directory
    later = _tpgate([*args[:-4], "--world-sizes", "1", "--repeats", "1", "--out", str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    _, stderr = later.communicate(timeout=LATER_RUN_LIMIT_S)
    assert later.returncode == 0, stderr[-3000:]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [(r["world_size"], r["status"]) for r in rows] == [(1, "ok")]
    assert b"earlier report" not in (out / "index.html").read_bytes()
    assert sorted(p.name for p in reports.iterdir()) == ["index.html", "scaling"]


def test_interrupted_atomic_write_keeps_the_old_file(tmp_path, monkeypatch):
    path = tmp_path / "results.json"
    path.write_text("old")

    def interrupted(fd):
        raise KeyboardInterrupt
    monkeypatch.setattr(atomic.os, "fsync", interrupted)  # mid-write, after the data went to the temp file
    with pytest.raises(KeyboardInterrupt):
        atomic.write_text_atomic(path, "new and longer")
    assert path.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["results.json"]


def test_interrupted_publish_puts_the_old_report_back(tmp_path, monkeypatch):
    final, staging = tmp_path / "scaling", atomic.make_staging_dir(tmp_path / "scaling")
    final.mkdir()
    (final / "index.html").write_text("old")
    (staging / "index.html").write_text("new")
    real = os.rename

    def rename(src, dst):  # Ctrl-C between moving the old report aside and moving the new one in
        if Path(src) == staging:
            raise KeyboardInterrupt
        return real(src, dst)
    monkeypatch.setattr(atomic.os, "rename", rename)
    with pytest.raises(KeyboardInterrupt):
        atomic.publish_dir_atomic(staging, final)
    assert (final / "index.html").read_text() == "old"


def test_leftovers_of_a_killed_publisher_are_removed_by_the_next(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True).stdout.strip()
    final = tmp_path / "scaling"
    for name in (f".scaling.old-{dead}-ab12", f".scaling.staging-{dead}-x1y2", f".scaling.staging-{os.getpid()}-live"):
        (tmp_path / name).mkdir()
    staging = atomic.make_staging_dir(final)
    (staging / "index.html").write_text("new")
    atomic.publish_dir_atomic(staging, final)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".scaling.staging-{os.getpid()}-live", "scaling"], "only a live publisher's staging stays"
