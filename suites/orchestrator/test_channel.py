"""The request channel on its own, driver and rank ends in this process (no rank is started):
every rank reads exactly its request, whatever the sizes and however often the one slot is
reused; a request larger than the segment moves the channel; stop reaches every rank; no
segment outlives the channel; an idle rank does not spin. Each check is also run on a
deliberately broken channel, which it must reject."""
from __future__ import annotations

import multiprocessing as mp
from multiprocessing import shared_memory

import pytest

from harness.runtime.channel import _CONTROL, _ENTRY, STOP, RankEndpoint, RequestChannel

from .support import channel_segments, leaked_segments

WORLD = 3
CAPACITY = 512  # small, so that a few hundred bytes already outgrow the segment


def _open(channel: RequestChannel, endpoint_type=RankEndpoint) -> list[RankEndpoint]:
    # spin_s=0: these ranks never spin (the spin policy has its own test)
    return [endpoint_type(r, channel.name, channel._semaphores[r], 0.0).open() for r in range(WORLD)]


def _semaphores(n: int = WORLD) -> list:
    return [mp.get_context("spawn").Semaphore(0) for _ in range(n)]


# calls in order: (what each rank must read) — shared and per-rank requests, a short request
# after a long one in the same slot, and two requests that outgrow the segment in turn
CALLS = [
    [b"shared by every rank"],
    [bytes([r + 1]) * (40 + 60 * r) for r in range(WORLD)],
    [b"s"],
    [b"x" * (3 * CAPACITY)],
    [bytes([65 + r]) * (2 * CAPACITY) for r in range(WORLD)],
    [b"tail"],
]


def check_delivery(channel: RequestChannel, endpoints: list[RankEndpoint]) -> None:
    """Each call reaches every rank with its own bytes, no more and no less, under its call id;
    segments the channel moved away from are gone, and so is the last after close()."""
    first = channel.name
    for call_id, requests in enumerate(CALLS, 1):
        channel.send(call_id, requests)
        got = [e.receive(timeout_s=1.0) for e in endpoints]
        assert got == [(call_id, requests[r % len(requests)]) for r in range(WORLD)], f"call {call_id}"
    assert channel.name != first and channel.capacity >= WORLD * 2 * CAPACITY, "the requests never outgrew the first segment"
    assert not leaked_segments(channel.retired), "a segment the channel moved away from was left in /dev/shm"
    names = channel_segments(channel)
    channel.close()
    assert not leaked_segments(names), "close() left a segment in /dev/shm"


def check_stop(channel: RequestChannel, endpoints: list[RankEndpoint]) -> None:
    assert [e.receive(timeout_s=0.01) for e in endpoints] == [None] * WORLD, "a rank received a call nobody sent"
    channel.stop()
    # the tokens are posted before receive is called, so the timeout only bounds a broken stop
    assert [e.receive(timeout_s=0.1) for e in endpoints] == [STOP] * WORLD


def test_every_rank_reads_exactly_its_request():
    channel = RequestChannel(WORLD, _semaphores(), capacity=CAPACITY)
    check_delivery(channel, _open(channel))


def test_stop_reaches_every_rank():
    channel = RequestChannel(WORLD, _semaphores(), capacity=CAPACITY)
    try:
        check_stop(channel, _open(channel))
    finally:
        channel.close()


class _CountingSemaphore:
    """A semaphore that counts non-blocking tries; a blocking wait on no token returns at once (a timeout)."""

    def __init__(self):
        self.tokens = self.tries = 0

    def release(self):
        self.tokens += 1

    def acquire(self, block=True, timeout=None):
        self.tries += not block
        taken = self.tokens > 0
        self.tokens -= taken
        return taken


def check_spin_policy(endpoint_type) -> None:
    """A rank spins (tries its semaphore without blocking) only after a request that came at once:
    an idle rank blocks straight away, so waiting ranks burn no core between spaced-out calls."""
    semaphore = _CountingSemaphore()
    channel = RequestChannel(1, [semaphore], capacity=CAPACITY)
    try:
        endpoint = endpoint_type(0, channel.name, semaphore, spin_s=1.0).open()  # far above any wait for a posted token
        assert endpoint.receive(timeout_s=0.01) is None and semaphore.tries == 0, "an idle rank spun before its first request"
        assert endpoint.receive(timeout_s=0.01) is None and semaphore.tries == 0, "a rank spun after a wait that timed out"
        channel.send(1, [b"a"])
        assert endpoint.receive(timeout_s=0.01) == (1, b"a") and semaphore.tries == 0, "the first request after idling was spun for"
        channel.send(2, [b"b"])  # came at once (it was there already): the next wait spins
        assert endpoint.receive(timeout_s=0.01) == (2, b"b") and semaphore.tries >= 1, "back-to-back requests were not spun for"
    finally:
        channel.close()


def test_a_rank_spins_only_while_requests_come_back_to_back():
    check_spin_policy(RankEndpoint)


# --------------------------------------------------------------------------- broken channels


class _SharedTable(RequestChannel):
    """Writes every rank's request but points every rank at rank 0's."""

    def _write(self, buf, requests):
        super()._write(buf, requests)
        first = _ENTRY.unpack_from(buf, _CONTROL.size)
        for rank in range(self.world_size):
            _ENTRY.pack_into(buf, _CONTROL.size + _ENTRY.size * rank, *first)


class _SilentMove(RequestChannel):
    """Moves to a larger segment without telling the ranks."""

    def _redirect(self, segment, call_id):
        pass


class _LeakyRetire(RequestChannel):
    """Closes a segment it moves away from (or is done with) but never unlinks it."""

    def _retire(self):
        self._segment.close()
        self.retired.append(self._segment.name)


class _ReadsToTheEnd(RankEndpoint):
    """Reads from its offset to the end of the segment (pickle.loads would not even notice)."""

    def _request(self):
        offset, _ = _ENTRY.unpack_from(self._map, _CONTROL.size + _ENTRY.size * self.rank)
        return self._map[offset:]


class _PostsNothing(RequestChannel):
    """Raises the stop flag but wakes no rank."""

    def stop(self):
        _CONTROL.pack_into(self._segment.buf, 0, True, -1, 0, b"")


class _AlwaysSpins(RankEndpoint):
    def _spins(self):
        return True


def _unlink_leftovers(channel: RequestChannel) -> None:
    names = channel.retired + ([channel.name] if channel._segment is not None else [])
    RequestChannel.close(channel)
    for name in leaked_segments(names):  # what a leaky mutant left behind
        segment = shared_memory.SharedMemory(name=name)
        segment.close()
        segment.unlink()


@pytest.mark.parametrize("channel_type,endpoint_type", [(_SharedTable, RankEndpoint), (_SilentMove, RankEndpoint), (_LeakyRetire, RankEndpoint),
                                                        (RequestChannel, _ReadsToTheEnd)], ids=lambda t: t.__name__)
def test_delivery_check_rejects_a_broken_channel(channel_type, endpoint_type):
    channel = channel_type(WORLD, _semaphores(), capacity=CAPACITY)
    try:
        with pytest.raises(AssertionError):
            check_delivery(channel, _open(channel, endpoint_type))
    finally:
        _unlink_leftovers(channel)


def test_stop_check_rejects_a_stop_that_wakes_nobody():
    channel = _PostsNothing(WORLD, _semaphores(), capacity=CAPACITY)
    try:
        with pytest.raises(AssertionError):
            check_stop(channel, _open(channel))
    finally:
        channel.close()


def test_spin_check_rejects_a_rank_that_always_spins():
    with pytest.raises(AssertionError, match="idle rank spun"):
        check_spin_policy(_AlwaysSpins)
