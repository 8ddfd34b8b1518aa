"""The persistent world: initialisation, process groups, barrier, and every failure mode
ending with the right error within its bound, leaving no process behind."""
from __future__ import annotations

import contextlib
import os
import pickle
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from harness.runtime.orchestrator import CallTimeoutError, MultiGPUOrchestrator, RankDiedError, RankError, WorldStartError, free_port

from . import rank_fns
from .support import channel_segments, leaked_segments

# Bounds: a failure must surface within the call's own timeout plus the grace the driver
# gives the other ranks (2 s) plus shutdown (terminate, 1 s join) and slack for a loaded
# 2-core machine. Restart of a world costs ~3 s on such a machine and is excluded.
SLACK_S = 6.0


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie is dead for our purposes
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split()[2] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture(params=[2, 4], ids=lambda n: f"ws{n}")
def world(request):
    w = MultiGPUOrchestrator(request.param, timeout_s=30.0).start()
    yield w
    pids, segments = w.pids, channel_segments(w._channel) if w._channel else []
    w.shutdown()
    assert not any(_alive(p) for p in pids), "a rank survived shutdown"
    assert not leaked_segments(segments), "shutdown left the request channel's shared memory behind"


def test_ranks_initialise_their_process_group(world):
    info = world.run(rank_fns.identity)
    assert [i["rank"] for i in info] == list(range(world.world_size))
    assert all(i["world_size"] == world.world_size and i["tp_size"] == world.world_size for i in info)
    assert all(i["backend"] == "gloo" and i["initialized"] for i in info)
    assert len({i["pid"] for i in info}) == world.world_size


def test_collective_and_persistent_state(world):
    n = world.world_size
    assert world.run(rank_fns.all_reduce_rank) == [n * (n + 1) / 2] * n
    world.run(rank_fns.remember, "kept")
    pids = world.pids
    assert world.run(rank_fns.recall) == ["kept"] * n
    assert world.pids == pids, "calls must reuse the same processes"


def test_barrier_and_dispatch_overhead_recorded(world):
    before = len(world.dispatch)
    world.barrier()
    for _ in range(5):
        world.run(rank_fns.noop)
    records = world.dispatch[before:]
    assert len(records) == 6
    assert all(r.driver_s >= r.worker_s >= 0 and r.overhead_s >= 0 for r in records)


def _expect(world, error, fn, *args, bound_s, timeout_s=None):
    pids, segments = world.pids, channel_segments(world._channel)
    start = time.monotonic()
    with pytest.raises(error) as info:
        world.run(fn, *args, timeout_s=timeout_s)
    elapsed = time.monotonic() - start
    assert elapsed < bound_s, f"took {elapsed:.1f}s, bound {bound_s}s"
    assert not any(_alive(p) for p in pids), "ranks of the failed world survived"
    assert not leaked_segments(segments), "the failed world's request channel was left in shared memory"
    # the world is usable again: a fresh set of ranks with a fresh process group
    n = world.world_size
    assert world.run(rank_fns.all_reduce_rank) == [n * (n + 1) / 2] * n
    return info.value


def test_exception_on_one_rank_names_it_with_traceback(world):
    bad = world.world_size - 1
    err = _expect(world, RankError, rank_fns.raise_on, bad, bound_s=SLACK_S)
    assert bad in err.ranks and f"injected failure on rank {bad}" in err.tracebacks[bad]
    assert "Traceback" in str(err) and "raise_on" in str(err)


def test_rank_that_exits_is_reported_not_waited_on(world):
    err = _expect(world, RankDiedError, rank_fns.exit_on, 1, bound_s=SLACK_S)
    assert err.ranks == [1] and "exit codes {1: 7}" in str(err)


def test_call_exceeding_its_timeout_ends(world):
    err = _expect(world, CallTimeoutError, rank_fns.sleep_on, 0, 60.0, timeout_s=2.0, bound_s=2.0 + SLACK_S)
    assert 0 in err.ranks


def test_unpicklable_result_is_an_error_not_a_hang(world):
    err = _expect(world, RankError, rank_fns.unpicklable, bound_s=SLACK_S)
    assert set(err.ranks) == set(range(world.world_size))


def test_rank_killed_between_calls_is_reported(world):
    os.kill(world.pids[1], signal.SIGKILL)
    time.sleep(0.5)
    err = _expect(world, RankDiedError, rank_fns.noop, bound_s=SLACK_S)
    assert err.ranks == [1]


def test_rank_killed_during_a_call_is_reported(world):
    victim = world.pids[-1]
    threading.Timer(0.5, os.kill, (victim, signal.SIGKILL)).start()
    err = _expect(world, RankDiedError, rank_fns.sleep_all, 3.0, bound_s=3.0 + SLACK_S)
    assert err.ranks == [world.world_size - 1] and "-9" in str(err)


def test_explicit_free_port_is_used():
    port = free_port()
    with MultiGPUOrchestrator(2, timeout_s=30.0, master_port=port) as w:
        assert w.run(rank_fns.all_reduce_rank) == [3.0, 3.0]
        assert w.run(rank_fns.master_port) == [port, port]


@pytest.mark.parametrize("error", [
    RankError({1: "Traceback ...\nValueError: boom"}, "fn", silent=[2], stacks={2: "in all_reduce"}),
    RankDiedError("rank 3 exited with code -9", [3]),
    CallTimeoutError("ranks [0] did not answer", [0], stacks={0: "time.sleep"}),
    WorldStartError("world of 2 failed to start", [0, 1]),
])
def test_world_errors_survive_pickling(error):
    """A caller may hand the error to another process (a pool, a queue): it must arrive whole."""
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is type(error) and str(copy) == str(error)
    assert copy.__dict__ == error.__dict__


def test_returned_tensors_do_not_leak_descriptors_in_the_ranks(world):
    """Each tensor a rank returns travels as a shared fd; sent once, the driver's fetch closes it.
    (Pickled twice, as a check and again to send, one fd per tensor stayed open in the rank and a
    rank under `ulimit -n 256` failed after ~43 calls of 5 tensors.)"""
    n, calls, per_call = world.world_size, 40, 5
    before = world.run(rank_fns.open_fds)
    for _ in range(calls):
        results = world.run(rank_fns.tensors, per_call)
    assert [[t.tolist() for t in ts] for ts in results] == [[[float(r * per_call + i)] * 4 for i in range(per_call)] for r in range(n)]
    after = world.run(rank_fns.open_fds)
    grown = [a - b for a, b in zip(after, before)]
    assert max(grown) < per_call * 4, f"open fds per rank grew by {grown} over {calls} calls of {per_call} tensors"


@pytest.mark.parametrize("fn,args,named", [
    (lambda ctx: 1, (), "module-level function"),
    (rank_fns.echo, (threading.Lock(),), "arguments of echo"),
])
def test_unpicklable_call_fails_at_once_and_leaves_the_world_alone(world, fn, args, named):
    """Pickled in Queue's feeder thread, this was only printed and the call ran into its timeout."""
    pids = world.pids
    start = time.monotonic()
    with pytest.raises(TypeError, match=named):
        world.run(fn, *args, timeout_s=10.0)
    assert time.monotonic() - start < SLACK_S
    assert world.pids == pids and world.run(rank_fns.echo, "same world") == ["same world"] * world.world_size


def test_rank_dying_part_way_through_its_reply_is_reported_not_waited_on(world):
    """A blocking read of a reply whose sender died mid-message waited forever, whatever the timeout."""
    bad = world.world_size - 1
    pids, outcome = world.pids, {}

    def call():
        try:
            world.run(rank_fns.torn_reply, bad, timeout_s=10.0)
        except Exception as e:  # noqa: BLE001 - the test inspects it
            outcome["error"] = e

    caller = threading.Thread(target=call, daemon=True)
    start = time.monotonic()
    caller.start()
    caller.join(10.0 + SLACK_S)
    if caller.is_alive():  # leave no rank behind the stuck driver thread
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        pytest.fail(f"run() still waiting {time.monotonic() - start:.0f}s after a rank died mid-reply (timeout 10s)")
    error = outcome.get("error")
    assert isinstance(error, RankDiedError) and error.ranks == [bad] and "SIGKILL" in str(error), repr(error)
    assert time.monotonic() - start < SLACK_S
    assert not any(_alive(p) for p in pids), "ranks of the failed world survived"
    assert world.run(rank_fns.echo, 1) == [1] * world.world_size


def test_world_started_from_a_thread_outlives_that_thread():
    """PR_SET_PDEATHSIG fires when the spawning *thread* exits: a world that run() (re)started
    from a short-lived thread was SIGKILLed when that thread ended."""
    with MultiGPUOrchestrator(2, timeout_s=30.0) as w:
        w.shutdown()
        starter = threading.Thread(target=w.start)
        starter.start()
        starter.join()
        pids = w.pids
        time.sleep(1.0)  # PDEATHSIG acts at once; give the watchdog several polls too
        assert w.run(rank_fns.all_reduce_rank) == [3.0, 3.0]
        assert w.pids == pids


DRIVER = """
import sys, threading, time
from harness.runtime.orchestrator import MultiGPUOrchestrator
from suites.orchestrator import rank_fns
w = MultiGPUOrchestrator(2, timeout_s=30.0)
if sys.argv[1] == "thread":
    t = threading.Thread(target=w.start); t.start(); t.join()
else:
    w.start()
print(*w.pids, flush=True)
print(w._channel.name, flush=True)
w.run(rank_fns.sleep_all, 300.0, timeout_s=600.0)  # killed while its ranks are busy (not polling for requests)
"""


@pytest.mark.parametrize("started_from", ["main", "thread"])
def test_ranks_of_a_killed_driver_exit(started_from):
    """No orphans: a driver SIGKILLed (no atexit, no shutdown) mid-call takes its ranks with it,
    whichever thread started them, and multiprocessing's resource tracker (which outlives the
    driver until the ranks are gone too) unlinks the request channel's shared memory."""
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))}
    driver = subprocess.Popen([sys.executable, "-c", DRIVER, started_from], cwd=root, env=env, stdout=subprocess.PIPE, text=True)
    try:
        pids = [int(p) for p in driver.stdout.readline().split()]
        assert len(pids) == 2, "the driver did not start its world"
        segment = driver.stdout.readline().strip()
        assert leaked_segments([segment]) == [segment], "the driver's request channel is not in /dev/shm"
        assert all(_alive(p) for p in pids)
        time.sleep(1.0)  # into the call
        driver.kill()
        driver.wait(SLACK_S)
        deadline = time.monotonic() + SLACK_S
        while any(_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = [p for p in pids if _alive(p)]
        for pid in survivors:
            os.kill(pid, signal.SIGKILL)
        assert not survivors, f"rank(s) {survivors} outlived their driver by {SLACK_S}s"
        while leaked_segments([segment]) and time.monotonic() < deadline + SLACK_S:
            time.sleep(0.05)
        assert not leaked_segments([segment]), f"the killed driver's request channel {segment} outlived its ranks by {SLACK_S}s"
    finally:
        driver.kill()
        driver.wait(SLACK_S)
