"""What every fault case checks, in one place.

`expect_error(call, error, bound_s)` times a failing call (time.monotonic around it) and
asserts the error type and the bound. `world_fault(...)` adds the world-level checks of the
issue: no rank of the failed world survives, no new child of the test process is left, a
results file written before the fault is byte-identical afterwards, and a new
MultiGPUOrchestrator of the same size starts and runs a collective. `TimeTable` collects
(case, world size, bound, measured) rows for DISTRIBUTED_INFERENCE_GUIDE.md.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from harness.atomic import write_text_atomic
from harness.runtime.orchestrator import MultiGPUOrchestrator

from . import rank_fns

# One world's start on this 2-core machine: ~0.9 s (2 ranks), ~2.3 s (4 ranks), measured;
# excluded from every bound (the fault is timed, not the recovery).


@dataclass
class Fault:
    error: BaseException
    elapsed_s: float


def expect_error(call, error: type[BaseException], bound_s: float) -> Fault:
    start = time.monotonic()
    with pytest.raises(error) as info:
        call()
    elapsed = time.monotonic() - start
    assert elapsed <= bound_s, f"{error.__name__} after {elapsed:.2f}s, bound {bound_s}s"
    return Fault(info.value, elapsed)


# --------------------------------------------------------------------------- processes


def _ppid_and_state(pid: int) -> tuple[int, str] | None:
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the command name may hold spaces
    except (FileNotFoundError, ProcessLookupError):
        return None
    return int(fields[1]), fields[0]


def alive(pid: int) -> bool:
    """Running and not a zombie (a zombie holds no resources; it only waits to be reaped)."""
    info = _ppid_and_state(pid)
    return info is not None and info[1] != "Z"


def descendants(root: int | None = None) -> set[int]:
    """Live descendants of `root` (default: this process), via psutil if installed, else /proc."""
    root = os.getpid() if root is None else root
    try:
        import psutil
    except ImportError:
        psutil = None
    if psutil is not None:
        try:
            return {p.pid for p in psutil.Process(root).children(recursive=True) if p.status() != psutil.STATUS_ZOMBIE}
        except psutil.NoSuchProcess:
            return set()
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            info = _ppid_and_state(int(entry))
            if info is not None and info[1] != "Z":
                parent[int(entry)] = info[0]
    found, frontier = set(), {root}
    while frontier:
        frontier = {pid for pid, ppid in parent.items() if ppid in frontier} - found
        found |= frontier
    return found


def _is_resource_tracker(pid: int) -> bool:
    # multiprocessing's one helper per driver process, started with the first spawn context and
    # ending with the driver; it holds no device and is not a rank
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return b"multiprocessing.resource_tracker" in f.read()
    except OSError:
        return False


def assert_no_survivors(pids: list[int], before: set[int]) -> None:
    """The failed world's ranks are gone and no other new descendant lingers."""
    survivors = [p for p in pids if alive(p)]
    assert not survivors, f"rank process(es) {survivors} survived the failure"
    new = {p for p in descendants() - before - set(pids) if not _is_resource_tracker(p)}
    assert not new, f"new child process(es) {sorted(new)} left behind"


# --------------------------------------------------------------------------- worlds


class Worlds:
    """One live world per size, replaced by a freshly started one after each fault.

    The replacement is the "can the process group be recreated" check, and it is also the
    world the next case runs on, so each fault costs one world start, not two.
    """

    def __init__(self, timeout_s: float):
        self.timeout_s = timeout_s
        self._worlds: dict[int, MultiGPUOrchestrator] = {}

    def get(self, n: int) -> MultiGPUOrchestrator:
        if n not in self._worlds:
            self._worlds[n] = MultiGPUOrchestrator(n, timeout_s=self.timeout_s).start()
        return self._worlds[n]

    def recreate(self, n: int) -> MultiGPUOrchestrator:
        self._worlds.pop(n, None)
        world = self.get(n)
        assert world.run(rank_fns.all_reduce_rank) == [n * (n + 1) / 2] * n, "a recreated world's collective is wrong"
        return world

    def close(self) -> None:
        for w in self._worlds.values():
            w.shutdown()


def world_fault(worlds: Worlds, n: int, results_dir: Path, fn, *args, error: type[BaseException], bound_s: float, timeout_s: float | None = None) -> Fault:
    """Run fn on a world of n ranks expecting `error` within `bound_s`, then check the aftermath."""
    world = worlds.get(n)
    results = results_dir / "results.json"  # a result the driver persisted before the fault
    write_text_atomic(results, json.dumps({"all_reduce": world.run(rank_fns.all_reduce_rank)}))
    written = results.read_bytes()
    before, pids = descendants(), world.pids
    fault = expect_error(lambda: world.run(fn, *args, timeout_s=timeout_s), error, bound_s)
    assert_no_survivors(pids, before)
    assert results.read_bytes() == written, "a result written before the fault changed"
    worlds.recreate(n)
    return fault


# --------------------------------------------------------------------------- time-to-error table


def _seconds(t: float) -> str:
    return f"{t:.3f}" if t < 0.1 else f"{t:.2f}"


class TimeTable:
    """(case, world size, bound, measured) rows; written as Markdown to `path` (--tpgate-fault-table) if given."""

    def __init__(self, path: str | None = None):
        self.path = path
        self.rows: dict[tuple[str, int], tuple[float, float]] = {}

    def record(self, case: str, world_size: int, bound_s: float, measured_s: float) -> None:
        self.rows[(case, world_size)] = (bound_s, measured_s)

    GROUPS = ("rank", "NaN", "Inf", "checkpoint", "config", "picked port", "driver")  # table order: the issue's

    def markdown(self) -> str:
        cases = sorted(dict.fromkeys(c for c, _ in self.rows), key=lambda c: next((i for i, g in enumerate(self.GROUPS) if c.startswith(g)), len(self.GROUPS)))
        sizes = sorted({n for _, n in self.rows})
        lines = ["| case | bound (s) | " + " | ".join(f"measured, world size {n} (s)" for n in sizes) + " |",
                 "|---|---|" + "---|" * len(sizes)]
        for case in cases:
            bounds = {self.rows[(case, n)][0] for n in sizes if (case, n) in self.rows}
            cells = [_seconds(self.rows[(case, n)][1]) if (case, n) in self.rows else "–" for n in sizes]
            lines.append(f"| {case} | {' / '.join(f'{b:g}' for b in sorted(bounds))} | " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"

    def write(self) -> None:
        if self.path and self.rows:
            write_text_atomic(self.path, self.markdown())
