"""The request channel inside a real world (the session's world of 2 ranks, suites/conftest.py):
requests larger than the channel's segment and requests carrying tensors reach every rank, and
calls from two threads take turns instead of mixing. Each check is also run against a broken
orchestrator, which it must reject."""
from __future__ import annotations

import hashlib
import threading
import time

import pytest
import torch

import harness.runtime.channel as channel
from harness.runtime.channel import INITIAL_CAPACITY
from harness.runtime.orchestrator import CallTimeoutError, RankError

from . import channel_rank_fns, rank_fns
from .support import leaked_segments

WORLD = 2
START_LIMIT_S = 60.0  # until a thread's call is under way: a hang guard, not a bound


def check_large_request(world) -> None:
    big = bytes(range(256)) * (3 * INITIAL_CAPACITY // 256)  # three times the first segment
    assert world.run(channel_rank_fns.digest, big) == [hashlib.sha256(big).hexdigest()] * WORLD
    assert world.run(rank_fns.echo, "small again") == ["small again"] * WORLD
    assert world._channel.capacity >= len(big) and not leaked_segments(world._channel.retired)


def check_tensor_arguments(world) -> None:
    """A tensor argument's storage is handed to one process per pickle: each rank needs its own."""
    tensors = [torch.arange(4.0) * (i + 1) for i in range(3)]
    assert world.run(channel_rank_fns.tensor_sums, tensors) == [[6.0, 12.0, 18.0]] * WORLD


def check_calls_take_turns(world, tmp_path) -> None:
    """A call from a second thread waits for the first to end: with too short a timeout it gives
    up without touching the world (the first call still succeeds); with time enough it runs next."""
    pids = world.pids
    for attempt, (first_s, second_timeout_s) in enumerate([(1.0, 0.3), (0.3, 30.0)]):
        started, outcome = tmp_path / f"started{attempt}", {}

        def first():
            try:
                outcome["first"] = world.run(channel_rank_fns.sleep_echo, "first", first_s, str(started), timeout_s=30.0)
            except Exception as e:  # noqa: BLE001 - inspected below
                outcome["first"] = e

        thread = threading.Thread(target=first, daemon=True)
        thread.start()
        try:
            deadline = time.monotonic() + START_LIMIT_S
            while not started.exists() and time.monotonic() < deadline:
                time.sleep(0.01)
            assert started.exists(), "the first call never started"
            if second_timeout_s < first_s:
                with pytest.raises(CallTimeoutError, match="another thread's call"):
                    world.run(rank_fns.echo, "second", timeout_s=second_timeout_s)
            else:
                assert world.run(rank_fns.echo, "second", timeout_s=second_timeout_s) == ["second"] * WORLD
        finally:  # the next call on this world must not meet this one
            thread.join(30.0)
        assert outcome.get("first") == ["first"] * WORLD, f"the first thread's call: {outcome.get('first')!r}"
    assert world.pids == pids, "the world was restarted"


def test_requests_larger_than_the_segment_reach_every_rank(worlds):
    check_large_request(worlds[WORLD])


def test_tensor_arguments_reach_every_rank(worlds):
    check_tensor_arguments(worlds[WORLD])


def test_calls_from_two_threads_take_turns(worlds, tmp_path):
    check_calls_take_turns(worlds[WORLD], tmp_path)


# --------------------------------------------------------------------------- broken orchestrators


def test_tensor_check_rejects_pickling_a_tensor_request_once(worlds, monkeypatch):
    """The first rank to unpickle takes the tensors' storage; the other finds nothing left to take."""
    monkeypatch.setattr(channel._SharingPickler, "reducer_override", lambda self, obj: NotImplemented)
    with pytest.raises(RankError) as info:
        check_tensor_arguments(worlds[WORLD])
    assert len(info.value.ranks) == WORLD - 1 and "rebuild_storage_fd" in str(info.value), "one rank takes the storage, the others fail"


class _NoLock:
    def acquire(self, timeout=None):
        return True

    def release(self):
        pass


def test_turn_check_rejects_calls_that_do_not_wait(worlds, tmp_path, monkeypatch):
    """Without the lock the second call overwrites the request slot while the first call's ranks
    are busy and polls the pipes the first call is polling (select.poll refuses that)."""
    world = worlds[WORLD]
    world.run(rank_fns.noop)  # started before the lock goes
    monkeypatch.setattr(world, "_call_lock", _NoLock())
    with pytest.raises((AssertionError, RuntimeError)):
        check_calls_take_turns(world, tmp_path)
