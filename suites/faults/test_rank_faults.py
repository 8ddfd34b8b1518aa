"""Rank faults during a collective-heavy forward: raise, os._exit, SIGKILL, hang outside and
inside a collective. Each ends in the named error within its bound, names the rank and the
cause, leaves no process, keeps written results and lets a new world start.

Bounds are built from the orchestrator's own waits (see MultiGPUOrchestrator):
  WORK_S      build the tiny model + forward up to the fault: ~0.2 s measured, 2 s allowed
  GRACE_S     after one rank fails, the driver waits this long for the others' reports (default 2 s)
  STACKS_S    faulthandler stacks of the ranks that never answered (at most 1 s)
  TEARDOWN_S  terminate the failed world: SIGTERM then join, ~0.1 s measured, 2 s allowed
plus the case's own call timeout. The sums are 2-3x the times measured on a 2-core machine
(see DISTRIBUTED_INFERENCE_GUIDE.md, "Fault cases and time-to-error"): generous for a loaded
CI box, yet a hang would still blow through them by orders of magnitude.
"""
from __future__ import annotations

import pytest

from harness.runtime.orchestrator import CallTimeoutError, RankDiedError, RankError

from . import rank_fns
from .support import world_fault

WORK_S, GRACE_S, STACKS_S, TEARDOWN_S = 2.0, 2.0, 1.0, 2.0
CALL_TIMEOUT_S = 2.0  # hang cases: 10x the tiny forward (~0.2 s), short to keep the suite fast
BAD = 1  # the faulty rank

# case: (bound_s, why)
RAISE_BOUND_S = WORK_S + GRACE_S + STACKS_S + TEARDOWN_S  # peers sit in an all-reduce until the grace ends
EXIT_BOUND_S = WORK_S + TEARDOWN_S  # the driver polls exit codes every 50 ms; no grace: a dead rank is final
SIGKILL_BOUND_S = WORK_S + TEARDOWN_S  # same as exit: the kernel reports the exit code at once
HANG_OUTSIDE_BOUND_S = CALL_TIMEOUT_S + STACKS_S + TEARDOWN_S  # nothing fails: only the call timeout ends it
HANG_INSIDE_BOUND_S = CALL_TIMEOUT_S + STACKS_S + TEARDOWN_S  # same; the stuck rank waits in gloo, killed by teardown


def test_rank_raises_mid_forward(fault_worlds, world_size, tmp_path, time_table):
    f = world_fault(fault_worlds, world_size, tmp_path, rank_fns.forward_with_fault, "raise", BAD, error=RankError, bound_s=RAISE_BOUND_S)
    err = f.error
    assert err.ranks == [BAD] and "InjectedFault: injected failure on rank 1" in err.tracebacks[BAD]
    # the others were not failures but victims: waiting in the all-reduce the failed rank never joined
    assert err.silent == [r for r in range(world_size) if r != BAD]
    assert all("distributed_c10d.py" in s for s in err.stacks.values()) and "waiting in a collective" in str(err)
    time_table.record("rank raises mid-forward → RankError", world_size, RAISE_BOUND_S, f.elapsed_s)


@pytest.mark.parametrize("kind,code,bound_s", [("exit", "7", EXIT_BOUND_S), ("sigkill", "-9", SIGKILL_BOUND_S)])
def test_rank_dies_mid_forward(fault_worlds, world_size, tmp_path, time_table, kind, code, bound_s):
    f = world_fault(fault_worlds, world_size, tmp_path, rank_fns.forward_with_fault, kind, BAD, error=RankDiedError, bound_s=bound_s)
    assert f.error.ranks == [BAD] and f"exit codes {{{BAD}: {code}}}" in str(f.error)
    if kind == "sigkill":
        assert "SIGKILL" in str(f.error)
    label = "rank os._exit(7) mid-forward → RankDiedError" if kind == "exit" else "rank SIGKILLed mid-forward → RankDiedError"
    time_table.record(label, world_size, bound_s, f.elapsed_s)


def test_rank_hangs_outside_a_collective(fault_worlds, world_size, tmp_path, time_table):
    # rank 1 sleeps mid-forward; everyone else blocks in the next all-reduce waiting for it
    f = world_fault(fault_worlds, world_size, tmp_path, rank_fns.forward_with_fault, "sleep", BAD, 60.0,
                    error=CallTimeoutError, bound_s=HANG_OUTSIDE_BOUND_S, timeout_s=CALL_TIMEOUT_S)
    err = f.error
    assert err.ranks == list(range(world_size)), "every rank is late"
    assert err.suspects == [BAD], "the one rank not waiting in a collective is the cause"
    assert "_inject" in err.stacks[BAD] and f"rank {BAD} (not in a collective): _inject" in str(err)
    time_table.record("rank hangs outside a collective (sleep; peers wait in all-reduce) → CallTimeoutError", world_size, HANG_OUTSIDE_BOUND_S, f.elapsed_s)


def test_rank_hangs_inside_a_collective(fault_worlds, world_size, tmp_path, time_table):
    # rank 1 alone enters an all-reduce nobody joins; the others have already answered
    f = world_fault(fault_worlds, world_size, tmp_path, rank_fns.stray_collective, BAD,
                    error=CallTimeoutError, bound_s=HANG_INSIDE_BOUND_S, timeout_s=CALL_TIMEOUT_S)
    err = f.error
    assert err.ranks == [BAD] and err.suspects == [BAD]
    assert "all_reduce" in err.stacks[BAD] and "stray_collective" in err.stacks[BAD]
    time_table.record("rank hangs inside a collective (nobody joins) → CallTimeoutError", world_size, HANG_INSIDE_BOUND_S, f.elapsed_s)
