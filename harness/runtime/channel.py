"""The driver -> rank request channel of MultiGPUOrchestrator (ADR-3).

A call's request is written once into one shared-memory segment that every rank of the world
maps; each rank has its own POSIX semaphore, which the driver posts once per call. The
semaphore is the only signal: posting is a release and a successful wait an acquire, so a rank
that has taken its token sees the request the driver wrote before posting, on any CPU.

Segment layout (native byte order):
  control  64 bytes  stop flag, call id, and the name of the segment that replaces this one
                     (set for one call when a request outgrew this segment, else empty)
  table    16 bytes per rank: (offset, length) of that rank's request bytes
  payload  the request bytes: one copy shared by all ranks, or one per rank (see `send`)

One slot, no ring: `run` is synchronous, so a request is overwritten only after every rank
has replied to it, i.e. has read it. A request larger than the segment moves the channel to a
new, larger segment (capacity only grows); the old one is unlinked at once (the ranks still
have it mapped to read where the channel went).

Waiting: a rank spins on its semaphore (yielding the core between tries) for `spin_s` after
each call, then blocks. It spins only if the previous request came within `spin_s` of the
rank asking, so back-to-back calls (a decode loop) are picked up without a wakeup, while a
rank whose driver pauses between calls (tests, a sweep) blocks at once and burns no core.

Pickling for both directions is here too: `dumps` (ForkingPickler's reductions, faster) and
`dumps_for_ranks` (one payload for all ranks unless it hands out a process resource).
"""
from __future__ import annotations

import collections
import copyreg
import io
import math
import mmap
import os
import pickle
import struct
import time
from multiprocessing import shared_memory
from multiprocessing.reduction import ForkingPickler

# stop flag, call id, length of the next segment's name, that name
_CONTROL = struct.Struct("=?7xqH46s")
_ENTRY = struct.Struct("=QQ")  # one rank's request: offset, length
_SHM_DIR = "/dev/shm"  # where glibc's shm_open keeps POSIX shared memory (Linux)
INITIAL_CAPACITY = 1 << 20

STOP = "stop"  # what RankEndpoint.receive returns when the driver stops the world


# Spin budgets with a core for the driver and each rank: a rank waits for the next decode step
# while the driver handles the last one's tokens (well under REQUEST_SPIN_S); the driver waits
# for a whole step (a few ms on a GPU) and blocks only on longer calls.
REQUEST_SPIN_S = 2e-3
REPLY_SPIN_S = 10e-3
# Fewer cores than processes: the spinners take turns with the workers. With 4 ranks on 2 cores,
# 200 us did best of 0/50/200/500/1000 us: 0 pays every wakeup, 50 us ends just before a
# rank's turn and pays both, longer spins lose to the scheduler when the box is loaded.
OVERSUBSCRIBED_SPIN_S = 2e-4


def spin_budget_s(world_size: int, dedicated_s: float) -> float:
    """How long a waiting process spins before it blocks.

    With a core for the driver and each rank, spinning costs nobody anything and takes the
    wakeup of a blocked process (tens of microseconds) out of every call: the budget is
    `dedicated_s`. With fewer cores the spinners (which yield the core on every try) take
    turns with the processes doing work, so the spin is kept short.
    """
    return dedicated_s if len(os.sched_getaffinity(0)) >= world_size + 1 else OVERSUBSCRIBED_SPIN_S


class _Pickler(pickle.Pickler):
    """ForkingPickler's reductions (tensors into shared memory, fds, connections) without its copy
    of the whole dispatch table for every pickle (~2 us of a ~3 us pickle). The chain reads the
    live tables, so reducers registered later still apply, with ForkingPickler's precedence."""

    dispatch_table = collections.ChainMap(ForkingPickler._extra_reducers, copyreg.dispatch_table)


class _SharingPickler(_Pickler):
    """Notes whether it used a reducer that hands a resource (a tensor's storage, an fd) to
    another process: those bytes can be unpickled by one receiver only."""

    def __init__(self, file):
        super().__init__(file)
        self.shares_resources = False

    def reducer_override(self, obj):
        if type(obj) in ForkingPickler._extra_reducers:  # the dispatch table's own exact-type lookup
            self.shares_resources = True
        return NotImplemented  # then pickled as ForkingPickler would


def dumps(obj) -> bytes:
    """ForkingPickler.dumps(obj), faster."""
    buffer = io.BytesIO()
    _Pickler(buffer).dump(obj)
    return buffer.getvalue()


def dumps_for_ranks(obj, world_size: int) -> list[bytes]:
    """obj pickled once for every rank, or once per rank if the bytes hand out a resource
    (each rank then needs its own handout)."""
    requests = []
    while len(requests) < world_size:
        buffer = io.BytesIO()
        pickler = _SharingPickler(buffer)
        pickler.dump(obj)
        requests.append(buffer.getvalue())
        if not pickler.shares_resources:
            break
    return requests


def _payload_start(world_size: int) -> int:
    return _CONTROL.size + _ENTRY.size * world_size


class RequestChannel:
    """The driver's end: `send` a call's request to every rank, `stop` them, `close` (unlink).

    `semaphores[rank]` (multiprocessing semaphores with value 0, handed to the ranks at
    spawn) is posted once per request.
    """

    def __init__(self, world_size: int, semaphores: list, capacity: int = INITIAL_CAPACITY):
        self.world_size, self._semaphores = world_size, semaphores
        self._segment = self._create(max(capacity, _payload_start(world_size)))
        self.retired: list[str] = []  # names of segments this channel has moved away from (all unlinked)

    @property
    def name(self) -> str:
        """The current segment's name (a file of that name in /dev/shm while the channel is open)."""
        return self._segment.name

    @property
    def capacity(self) -> int:
        return self._segment.size

    def endpoint(self, rank: int, spin_s: float) -> "RankEndpoint":
        """What rank `rank` needs to receive requests (picklable; pass it to the spawned rank)."""
        return RankEndpoint(rank, self._segment.name, self._semaphores[rank], spin_s)

    def send(self, call_id: int, requests: list[bytes]) -> None:
        """Publish one call: `requests` holds one payload every rank reads, or one per rank.

        Only call once every rank has answered the previous request (they have then read it).
        """
        if len(requests) not in (1, self.world_size):
            raise ValueError(f"{len(requests)} requests for {self.world_size} ranks: give one shared request or one per rank")
        needed = _payload_start(self.world_size) + sum(len(r) for r in requests)
        segment = self._segment if needed <= self._segment.size else self._create(1 << (needed - 1).bit_length())
        self._write(segment.buf, requests)
        _CONTROL.pack_into(segment.buf, 0, False, call_id, 0, b"")
        if segment is not self._segment:
            self._redirect(segment, call_id)
            self._retire()
            self._segment = segment
        for semaphore in self._semaphores:
            semaphore.release()

    def _write(self, buf, requests: list[bytes]) -> None:
        """The payloads one after the other, and each rank's (offset, length) in the table."""
        offset, entries = _payload_start(self.world_size), []
        for request in requests:
            buf[offset:offset + len(request)] = request
            entries.append((offset, len(request)))
            offset += len(request)
        for rank in range(self.world_size):
            _ENTRY.pack_into(buf, _CONTROL.size + _ENTRY.size * rank, *entries[rank % len(entries)])

    def _redirect(self, segment: shared_memory.SharedMemory, call_id: int) -> None:
        """Tell the ranks, through the segment they map now, that this call is in `segment`."""
        name = segment.name.encode()
        _CONTROL.pack_into(self._segment.buf, 0, False, call_id, len(name), name)

    def stop(self) -> None:
        """Ask every rank to leave its request loop."""
        if self._segment is not None:
            _CONTROL.pack_into(self._segment.buf, 0, True, -1, 0, b"")
            for semaphore in self._semaphores:
                semaphore.release()

    def close(self) -> None:
        """Unlink the segment (ranks that still map it keep their mapping). Idempotent."""
        if self._segment is not None:
            self._retire()
            self._segment = None

    def _retire(self) -> None:
        segment = self._segment
        segment.close()
        try:
            segment.unlink()
        except FileNotFoundError:  # removed behind our back (e.g. /dev/shm cleaned): nothing left to free
            pass
        self.retired.append(segment.name)

    @staticmethod
    def _create(size: int) -> shared_memory.SharedMemory:
        # registered with multiprocessing's resource tracker, which unlinks it if this process is
        # SIGKILLed; reserved up front so a full /dev/shm is an OSError here, not a SIGBUS on write
        segment = shared_memory.SharedMemory(create=True, size=size)
        try:
            fd = os.open(os.path.join(_SHM_DIR, segment.name), os.O_RDWR)
            try:
                os.posix_fallocate(fd, 0, size)
            finally:
                os.close(fd)
        except OSError as e:
            segment.close()
            segment.unlink()
            raise OSError(e.errno, f"cannot reserve {size} bytes of shared memory for a request ({e.strerror}); "
                                   f"free space in {_SHM_DIR} or send less data per call") from None
        return segment


class RankEndpoint:
    """A rank's end of the channel: `receive` the next request, spinning briefly, then blocking.

    It maps the segment read-only from /dev/shm rather than through SharedMemory, which would
    register it with the resource tracker a second time (from the rank) and race the driver's
    unlink.
    """

    def __init__(self, rank: int, name: str, semaphore, spin_s: float):
        self.rank, self.spin_s = rank, spin_s
        self._name, self._ready = name, semaphore
        self._map: mmap.mmap | None = None
        self._last_wait_s = math.inf  # how long the previous request took to come: spin only if it came quickly

    def __getstate__(self):
        return {**self.__dict__, "_map": None}

    def open(self) -> "RankEndpoint":
        self._attach(self._name)
        return self

    def receive(self, timeout_s: float):
        """(call_id, request bytes), STOP, or None if nothing came within `timeout_s`."""
        asked = time.perf_counter()
        ready = False
        if self._spins():
            deadline = asked + self.spin_s
            while not (ready := self._ready.acquire(False)) and time.perf_counter() < deadline:
                os.sched_yield()
        if not ready and not self._ready.acquire(timeout=timeout_s):
            self._last_wait_s = math.inf
            return None
        self._last_wait_s = time.perf_counter() - asked
        stop, call_id, moved_length, moved = _CONTROL.unpack_from(self._map, 0)
        if moved_length:
            self._attach(moved[:moved_length].decode())
            stop, call_id, _, _ = _CONTROL.unpack_from(self._map, 0)
        return STOP if stop else (call_id, self._request())

    def _request(self) -> bytes:
        offset, length = _ENTRY.unpack_from(self._map, _CONTROL.size + _ENTRY.size * self.rank)
        return self._map[offset:offset + length]

    def _spins(self) -> bool:
        return self._last_wait_s <= self.spin_s

    def close(self) -> None:
        if self._map is not None:
            self._map.close()
            self._map = None

    def _attach(self, name: str) -> None:
        fd = os.open(os.path.join(_SHM_DIR, name), os.O_RDONLY)
        try:
            mapped = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
        finally:
            os.close(fd)
        self.close()
        self._map, self._name = mapped, name
