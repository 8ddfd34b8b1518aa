"""Process groups and the persistent rank world.

ProcessGroupManager  one rank's view: init from torchrun env or explicit args, backend
                     choice, the TP subgroup, timeouts, teardown.
MultiGPUOrchestrator the driver's view: N rank processes started once and kept; `run(fn)`
                     executes fn(ctx, *args) on every rank and returns per-rank results.
TorchrunWorld        the same `run` API when every process is a rank (SPMD under torchrun).

Nothing here speaks a socket protocol of its own: ranks meet through torch.distributed's
TCP store; the driver writes each call once into a shared-memory segment its ranks map
(harness/runtime/channel.py) and reads each rank's replies from that rank's own pipe, without blocking
(a rank that dies mid-reply is reported from its exit code, never waited on).
"""
from __future__ import annotations

import atexit
import contextlib
import ctypes
import datetime
import faulthandler
import math
import os
import pickle
import re
import select
import shutil
import signal
import socket
import struct
import sys
import tempfile
import threading
import time
import traceback
import weakref
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from impl.architecture import TPConfigError, require
from .channel import REPLY_SPIN_S, REQUEST_SPIN_S, STOP, RequestChannel, dumps, dumps_for_ranks, spin_budget_s
from impl.communication import ProcessGroupCommunicator, gather_objects

BACKENDS = ("auto", "gloo", "nccl")
DEVICES = ("cpu", "cuda")
TP_LAYOUTS = ("contiguous", "strided")


# --------------------------------------------------------------------------- errors


class WorldError(RuntimeError):
    """Base of every failure the orchestrator reports. `ranks` names the ranks involved."""

    def __init__(self, message: str, ranks: list[int]):
        self.ranks = sorted(ranks)
        super().__init__(message)

    def __reduce__(self):
        # Exception's default pickling calls cls(*args), which the subclasses' signatures refuse;
        # rebuild from the message and attributes so the error can cross a process boundary
        return _restore_world_error, (type(self), self.args, self.__dict__)


def _restore_world_error(cls: type, args: tuple, state: dict) -> WorldError:
    # CallTimeoutError is also an OSError, whose memory layout needs OSError's __new__
    error = (OSError if issubclass(cls, OSError) else RuntimeError).__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class RankError(WorldError):
    """fn raised on one or more ranks; `tracebacks[rank]` holds each rank's traceback text.

    `silent` lists ranks that had not answered when the driver stopped waiting (usually
    stuck in a collective with a failed rank); `stacks[rank]` is where each of them was.
    """

    def __init__(self, tracebacks: dict[int, str], call: str, silent: list[int] = (), stacks: dict[int, str] | None = None):
        self.tracebacks, self.silent, self.stacks = tracebacks, sorted(silent), stacks or {}
        first = min(tracebacks)
        silent = f"\nrank(s) {self.silent} had not answered:\n{_describe_stacks(self.stacks) or '  (no stacks)'}" if self.silent else ""
        super().__init__(f"{call} raised on rank(s) {sorted(tracebacks)}; rank {first}'s traceback:\n{tracebacks[first]}{silent}", list(tracebacks))


class RankDiedError(WorldError):
    """A rank process exited while the driver waited for it (or since the last call)."""


class CallTimeoutError(WorldError, TimeoutError):
    """Ranks did not answer within the call's timeout.

    `stacks[rank]` is each late rank's Python stack when the deadline passed; `suspects` are
    the late ranks that were not inside a torch.distributed call (the others are usually
    waiting for them), or every late rank when that does not tell them apart.
    """

    def __init__(self, message: str, ranks: list[int], stacks: dict[int, str] | None = None):
        self.stacks = stacks or {}
        waiting = {r for r, s in self.stacks.items() if _in_collective(s)}
        self.suspects = sorted(set(ranks) - waiting) or sorted(ranks)
        if self.stacks:
            message += f"; likely cause: rank(s) {self.suspects}\n{_describe_stacks(self.stacks)}"
        super().__init__(message, ranks)


class WorldStartError(WorldError):
    """The ranks could not initialise their process group."""


def _in_collective(stack: str) -> bool:
    return "distributed_c10d.py" in stack


def _describe_stacks(stacks: dict[int, str], frames: int = 3) -> str:
    """One line per rank: where it was (innermost frames first), and whether in a collective."""
    lines = []
    for rank, stack in sorted(stacks.items()):
        found = (re.match(r'\s*File "(.*)", line (\d+) in (.*)', line) for line in stack.splitlines())
        where = [f"{m[3]} ({os.path.basename(m[1])}:{m[2]})" for m in found if m][:frames]
        state = "waiting in a collective" if _in_collective(stack) else "not in a collective"
        lines.append(f"  rank {rank} ({state}): {' <- '.join(where) or 'no stack'}")
    return "\n".join(lines)


def _exit_codes(codes: dict[int, int]) -> str:
    killed = {r: signal.Signals(-c).name for r, c in codes.items() if c is not None and c < 0 and -c in signal.valid_signals()}
    return f"exit codes {codes}" + (f"; killed by {killed}" if killed else "")


# --------------------------------------------------------------------------- backend choice


def choose_backend(device: str, local_world_size: int, gpu_count: int, requested: str = "auto") -> str:
    """NCCL when every rank on this node has its own GPU; gloo otherwise.

    Several ranks sharing one GPU use gloo on CUDA tensors (NCCL refuses them with
    "Duplicate GPU detected"); gloo stages through the host, so such worlds are for
    correctness, never for timing.
    """
    require(requested in BACKENDS, "backend", requested, f"must be one of {BACKENDS}")
    require(device in DEVICES, "device", device, f"must be one of {DEVICES}")
    if device == "cpu":
        require(requested != "nccl", "backend", requested, "nccl needs device='cuda'")
        return "gloo"
    require(gpu_count >= 1, "device", device, "no CUDA device is visible")
    if requested == "nccl":
        require(local_world_size <= gpu_count, "backend", requested, f"nccl needs one GPU per rank: {local_world_size} ranks on this node, {gpu_count} GPU(s) visible; use backend='gloo' to share GPUs")
        return "nccl"
    if requested == "gloo":
        return "gloo"
    return "nccl" if local_world_size <= gpu_count else "gloo"


def free_port() -> int:
    """A TCP port the OS reports free now (a race remains: `start` retries on a new port)."""
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def check_port_free(port: int, host: str = "127.0.0.1") -> None:
    """TPConfigError naming `port` unless it is a valid TCP port that can be bound now."""
    require(isinstance(port, int) and 1 <= port <= 65535, "master_port", port, "must be an integer in [1, 65535]")
    with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
        try:
            s.bind((host, port))
        except OSError as e:
            raise TPConfigError("master_port", port, f"cannot be bound on {host} ({e.strerror}); another process holds it: "
                                                     "pass a free port, or master_port=None to pick one") from None


# --------------------------------------------------------------------------- one rank


def check_tp_layout(tp_layout) -> None:
    require(tp_layout in TP_LAYOUTS, "tp_layout", tp_layout, f"must be one of {TP_LAYOUTS}")


def tp_groups(world_size: int, tp_size: int, tp_layout: str = "contiguous") -> list[tuple[int, ...]]:
    """The global ranks of every TP group, group index order; within a group, TP-rank order.

    contiguous: group g = ranks g*tp_size .. g*tp_size + tp_size - 1 (e.g. {0,1},{2,3}): TP
                inside a node when tp_size divides the ranks per node;
    strided:    group g = ranks g, g+G, g+2G, ... with G = world_size // tp_size
                (e.g. {0,2},{1,3}): a group's ranks are G apart, so consecutive ranks belong
                to different TP groups (to one data-parallel group).
    """
    check_tp_layout(tp_layout)
    require(isinstance(tp_size, int) and tp_size >= 1 and world_size % tp_size == 0, "tp_size", tp_size, f"must divide world_size={world_size}")
    count = world_size // tp_size
    if tp_layout == "contiguous":
        return [tuple(range(g * tp_size, (g + 1) * tp_size)) for g in range(count)]
    return [tuple(range(g, world_size, count)) for g in range(count)]


class ProcessGroupManager:
    """Create, hold and destroy one rank's process group and its TP subgroup.

    The world is split into world_size // tp_size TP groups of `tp_size` ranks, laid out as
    `tp_layout` says (see `tp_groups`). This rank's place in it is known from construction:
    `tp_group_index` (which group), `tp_rank` (its rank inside that group, the one every
    sharding decision uses; `rank` stays the global rank) and `tp_ranks` (the group's global
    ranks, in TP-rank order). Every collective inherits `timeout_s`; with NCCL,
    TORCH_NCCL_ASYNC_ERROR_HANDLING=1 (set unless the user set it) makes a collective that
    outlives it abort the process instead of blocking forever.
    """

    def __init__(self, world_size: int, rank: int, *, local_rank: int | None = None, local_world_size: int | None = None, tp_size: int | None = None,
                 tp_layout: str = "contiguous", device: str = "cpu", backend: str = "auto", master_addr: str = "127.0.0.1", master_port: int = 29500,
                 timeout_s: float = 60.0):
        require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
        require(isinstance(rank, int) and 0 <= rank < world_size, "rank", rank, f"must be in [0, {world_size})")
        require(timeout_s > 0, "timeout_s", timeout_s, "must be > 0")
        self.world_size, self.rank = world_size, rank
        self.local_rank = rank if local_rank is None else local_rank
        self.local_world_size = world_size if local_world_size is None else local_world_size
        self.tp_size, self.tp_layout = world_size if tp_size is None else tp_size, tp_layout
        self.all_tp_ranks = tp_groups(world_size, self.tp_size, tp_layout)  # validates both
        self.tp_group_index = next(g for g, ranks in enumerate(self.all_tp_ranks) if rank in ranks)
        self.tp_ranks = self.all_tp_ranks[self.tp_group_index]
        self.tp_rank = self.tp_ranks.index(rank)
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.backend = choose_backend(device, self.local_world_size, gpus, backend)
        self.device = torch.device(f"cuda:{self.local_rank % gpus}") if device == "cuda" else torch.device("cpu")
        self.master_addr, self.master_port, self.timeout_s = master_addr, master_port, timeout_s
        self.init_method = f"tcp://{master_addr}:{master_port}"
        self.tp_group = None

    @classmethod
    def from_env(cls, **kw) -> "ProcessGroupManager":
        """From torchrun's variables: RANK, WORLD_SIZE, LOCAL_RANK, LOCAL_WORLD_SIZE, MASTER_ADDR, MASTER_PORT."""
        env = os.environ
        missing = [k for k in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT") if k not in env]
        require(not missing, "environment", missing, "torchrun sets RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT; launch with torchrun or pass them explicitly")
        manager = cls(int(env["WORLD_SIZE"]), int(env["RANK"]), local_rank=int(env.get("LOCAL_RANK", env["RANK"])),
                      local_world_size=int(env.get("LOCAL_WORLD_SIZE", env["WORLD_SIZE"])), master_addr=env["MASTER_ADDR"], master_port=int(env["MASTER_PORT"]), **kw)
        manager.init_method = "env://"  # torchrun's agent already serves the store at MASTER_PORT
        return manager

    def init(self) -> "ProcessGroupManager":
        if self.backend == "nccl":
            os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        timeout = datetime.timedelta(seconds=self.timeout_s)
        kw = {"device_id": self.device} if self.backend == "nccl" else {}
        dist.init_process_group(self.backend, init_method=self.init_method, rank=self.rank, world_size=self.world_size, timeout=timeout, **kw)
        return self.create_tp_groups()

    def create_tp_groups(self) -> "ProcessGroupManager":
        """Create every TP group and keep this rank's (`tp_group`). init() calls it; call it
        directly only on a world whose default group is already initialised (a collective:
        every rank calls it, and every rank creates every group in the same order, as
        torch.distributed requires, including the groups it is not a member of)."""
        timeout = datetime.timedelta(seconds=self.timeout_s)
        self.tp_group = None
        for ranks in self.all_tp_ranks:
            group = dist.new_group(list(ranks), timeout=timeout) if self.tp_size < self.world_size else dist.group.WORLD
            if self.rank in ranks:
                self.tp_group = group
        return self

    def communicator(self) -> ProcessGroupCommunicator:
        require(self.tp_group is not None, "ProcessGroupManager", "uninitialised", "call init() first")
        return ProcessGroupCommunicator(self.tp_group)

    def destroy(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
        self.tp_group = None

    def __enter__(self):
        return self.init()

    def __exit__(self, *exc):
        self.destroy()


@dataclass
class RankContext:
    """What a function run on a rank receives as its first argument.

    `rank` and `world_size` are global; `comm` is this rank's TP group's communicator, and
    layers shard by its `comm.rank` (== `tp_rank`), never by the global rank."""

    rank: int
    world_size: int
    device: torch.device
    backend: str
    comm: ProcessGroupCommunicator
    manager: ProcessGroupManager
    state: dict = field(default_factory=dict)  # persists across calls on this rank

    @property
    def tp_rank(self) -> int:
        return self.manager.tp_rank

    @property
    def tp_group_index(self) -> int:
        return self.manager.tp_group_index

    @property
    def tp_ranks(self) -> tuple[int, ...]:
        return self.manager.tp_ranks

    @property
    def tp_group(self):
        """The torch.distributed ProcessGroup of this rank's TP group (for stacks written
        against plain torch.distributed; the global world may be larger)."""
        return self.manager.tp_group


# --------------------------------------------------------------------------- rank process


_PARENT_POLL_S = 0.2


def _die_with_parent(parent_pid: int, pdeathsig: bool) -> None:
    """End this rank when the driver process is gone, even if the driver was SIGKILLed.

    PR_SET_PDEATHSIG fires when the *thread* that spawned the child exits, not its process,
    and run() starts (and restarts) worlds from whichever thread calls it: a world started
    from a short-lived thread was SIGKILLed when that thread ended. So it is only set when
    the spawning thread is the driver's main thread (which lives as long as the process);
    the guarantee in every case is a watchdog thread polling getppid(), which changes when
    the driver process exits (the rank is re-parented), whatever thread started the rank,
    and which runs while the rank's main thread is busy in a call or blocked in a collective.
    """
    if pdeathsig:
        with contextlib.suppress(Exception):
            ctypes.CDLL("libc.so.6").prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG

    def watch():
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_POLL_S)
        os._exit(0)

    threading.Thread(target=watch, name="tpgate-parent-watch", daemon=True).start()


def _rank_main(rank, world_size, init_kwargs, requests, results, parent_pid, stack_file=None, pdeathsig=False):
    _die_with_parent(parent_pid, pdeathsig)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the driver's to handle
    if stack_file:  # SIGUSR1 -> Python stacks into stack_file, even while blocked in C (a collective)
        stacks = open(stack_file, "w")  # noqa: SIM115 - must stay open for the process's life
        faulthandler.register(signal.SIGUSR1, file=stacks, all_threads=True, chain=False)
    if init_kwargs.get("device") == "cpu":  # ranks share the cores; oversubscription costs more than it gives
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world_size))
    try:
        requests.open()
        manager = ProcessGroupManager(world_size, rank, **init_kwargs).init()
        ctx = RankContext(rank, world_size, manager.device, manager.backend, manager.communicator(), manager)
    except BaseException:
        _send_frame(results, pickle.dumps(("init", False, traceback.format_exc(), 0.0)))
        return
    _send_frame(results, pickle.dumps(("init", True, None, 0.0)))
    while True:
        item = requests.receive(timeout_s=1.0)
        if item is None:
            if os.getppid() != parent_pid:
                os._exit(0)
            continue
        if item is STOP:
            break
        call_id, request = item
        start = time.perf_counter()
        fn = None
        try:
            fn, args, kwargs = pickle.loads(request)  # a module a rank cannot import fails here, as this call's error
            value, ok = fn(ctx, *args, **kwargs), True
        except BaseException:
            value, ok = traceback.format_exc(), False
        elapsed = time.perf_counter() - start
        # Serialise here, once, and send these bytes: pickling in a background thread (Queue.put)
        # would lose a failure, and pickling a tensor twice shares its storage twice (one fd
        # each, held until the driver fetches it), so a check-then-put leaked one fd per tensor.
        try:
            payload = dumps((call_id, ok, value, elapsed))
        except Exception:
            value = f"result of {getattr(fn, '__qualname__', fn)} cannot be sent to the driver:\n{traceback.format_exc()}"
            payload = dumps((call_id, False, value, elapsed))
        try:
            _send_frame(results, payload)
        except BrokenPipeError:  # the driver closed its end: this world is over
            break
    with contextlib.suppress(Exception):
        manager.destroy()
    _leave()


def _leave() -> None:
    """End a rank whose world is over: flushed output, its atexit handlers (coverage's data file
    among them), then os._exit. Interpreter teardown with torch loaded costs 0.5-1.5 s of CPU
    per rank (module and C++ static destruction), and every shutdown waited for it."""
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(Exception):
            stream.flush()
    atexit._run_exitfuncs()
    os._exit(0)


_FRAME = struct.Struct("!Q")  # a result on a rank's pipe: payload length, then the pickled payload
# a pipe holds 64 KiB (Linux's default): a larger read returns no more, yet os.read allocates
# (and frees) its whole size each time, ~20 us for 1 MiB
_PIPE_CHUNK = 1 << 16


def _send_frame(conn, payload: bytes) -> None:
    """Write one frame to the rank's end of its result pipe (blocking; the driver reads without blocking)."""
    view = memoryview(_FRAME.pack(len(payload)) + payload)
    while view:
        view = view[os.write(conn.fileno(), view):]


# --------------------------------------------------------------------------- the driver


@dataclass
class DispatchRecord:
    call: str
    driver_s: float  # put -> last result received
    worker_s: float  # slowest rank's own execution time

    @property
    def overhead_s(self) -> float:
        return self.driver_s - self.worker_s


_live_worlds: "weakref.WeakSet[MultiGPUOrchestrator]" = weakref.WeakSet()


@atexit.register
def _shutdown_all():
    for world in list(_live_worlds):
        world.shutdown()


class MultiGPUOrchestrator:
    """N rank processes, started once (spawn) and kept until `shutdown`.

    `run(fn, *args, timeout_s=...)` calls `fn(ctx: RankContext, *args)` on every rank and
    returns the list of results in rank order. fn must be importable (module level) and
    its results picklable (return CPU tensors or plain data).

    Failures end the call, never hang it: an exception on a rank raises RankError with that
    rank's traceback; a rank that exits raises RankDiedError; ranks that do not answer in
    time raise CallTimeoutError. After any failure the surviving ranks may be stuck in a
    collective, so the world is torn down; the next `run` starts a fresh one.
    """

    def __init__(self, world_size: int, device: str = "cpu", backend: str = "auto", tp_size: int | None = None, timeout_s: float = 120.0,
                 start_timeout_s: float = 120.0, grace_s: float = 2.0, master_port: int | None = None, tp_layout: str = "contiguous"):
        # every argument is checked here, before any process exists (ranks would only fail later, one by one)
        require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
        require(device in DEVICES, "device", device, f"must be one of {DEVICES}")
        require(tp_size is None or (isinstance(tp_size, int) and tp_size >= 1 and world_size % tp_size == 0), "tp_size", tp_size,
                f"must be an integer >= 1 dividing world_size={world_size}")
        check_tp_layout(tp_layout)
        for name, value in (("timeout_s", timeout_s), ("start_timeout_s", start_timeout_s)):
            require(value > 0, name, value, "must be > 0")
        require(grace_s >= 0, "grace_s", grace_s, "must be >= 0")
        if master_port is not None:
            check_port_free(master_port)  # a port the user chose: fail naming it rather than silently move
        gpus = torch.cuda.device_count() if device == "cuda" else 0
        self.backend = choose_backend(device, world_size, gpus, backend)  # validates before any process starts
        if device == "cuda" and self.backend == "gloo" and gpus < world_size:
            print(f"tpgate: {world_size} ranks share {gpus} GPU(s) over gloo; correctness only, not for timing", file=sys.stderr)
        self.world_size, self.device, self.tp_size, self.tp_layout = world_size, device, tp_size, tp_layout
        self.timeout_s, self.start_timeout_s, self.grace_s, self.master_port = timeout_s, start_timeout_s, grace_s, master_port
        self.dispatch: list[DispatchRecord] = []
        self._procs: list = []
        self._requests: list = []  # per rank: its end of the request channel (handed to it at spawn)
        self._channel: RequestChannel | None = None  # driver -> ranks: each call's request, written once
        self._results: list = []  # per rank: the read end of its result pipe
        self._received: list[bytearray] = []  # per rank: bytes read, not yet a whole message
        self._eof: list[bool] = []
        self._stack_dir: str | None = None
        self._call_id = 0
        self._call_lock = threading.Lock()  # one call at a time: the channel holds one request and replies carry no thread
        self._reply_spin_s = 0.0  # how long _collect polls before it blocks (set per world, see _start_once)

    # -- lifecycle

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def start(self, port_attempts: int = 3) -> "MultiGPUOrchestrator":
        """Spawn the ranks and wait until each has joined the process group.

        The rendezvous port is `master_port` if one was given (a port taken by then fails
        naming it); otherwise it is picked free, and if another process takes it before
        rank 0 binds it, the start is retried on a new port (`port_attempts` in all).
        """
        if self.alive:
            return self
        for attempt in range(port_attempts):
            try:
                return self._start_once()
            except WorldStartError as e:
                if self.master_port is not None or attempt == port_attempts - 1 or "address already in use" not in str(e).lower():
                    raise
        raise AssertionError("unreachable")

    def _start_once(self) -> "MultiGPUOrchestrator":
        self.shutdown()
        ctx = mp.get_context("spawn")
        self._channel = RequestChannel(self.world_size, [ctx.Semaphore(0) for _ in range(self.world_size)])
        self._requests = [self._channel.endpoint(r, spin_budget_s(self.world_size, REQUEST_SPIN_S)) for r in range(self.world_size)]
        self._reply_spin_s = spin_budget_s(self.world_size, REPLY_SPIN_S)
        # one result pipe per rank, read without blocking (see _collect); the driver keeps only
        # the read ends, so a rank's death also shows as end-of-file on its pipe
        pipes = [ctx.Pipe(duplex=False) for _ in range(self.world_size)]
        self._results = [reader for reader, _ in pipes]
        for reader in self._results:
            os.set_blocking(reader.fileno(), False)
        self._received = [bytearray() for _ in range(self.world_size)]
        self._eof = [False] * self.world_size
        self._poller = select.poll()  # the spin phase of _collect: one syscall looks at every pipe
        for reader in self._results:
            self._poller.register(reader.fileno(), select.POLLIN)
        self._rank_of_fd = {reader.fileno(): r for r, reader in enumerate(self._results)}
        self._last_call_s = math.inf
        self._stack_dir = tempfile.mkdtemp(prefix="tpgate-stacks-")
        port = free_port() if self.master_port is None else self.master_port
        pdeathsig = threading.current_thread() is threading.main_thread()  # see _die_with_parent
        init_kwargs = dict(device=self.device, backend=self.backend, tp_size=self.tp_size, tp_layout=self.tp_layout, master_port=port, timeout_s=self.timeout_s)
        self._procs = [ctx.Process(target=_rank_main, args=(r, self.world_size, init_kwargs, self._requests[r], pipes[r][1], os.getpid(), self._stack_file(r), pdeathsig),
                                   daemon=True, name=f"tpgate-rank{r}")
                       for r in range(self.world_size)]
        _live_worlds.add(self)
        try:
            for p, (_, writer) in zip(self._procs, pipes):
                p.start()
                writer.close()  # the child has its copy (spawn passes it at exec)
            replies, _, _ = self._collect("init", self.start_timeout_s)
        except WorldError as e:
            self.shutdown(join_s=0.0)  # ranks still in init never read the polite stop
            raise WorldStartError(f"world of {self.world_size} failed to start (port {port}): {e}", e.ranks) from e
        except BaseException:  # Ctrl-C during start: leave no rank behind
            self.shutdown(join_s=0.0)
            raise
        finally:
            for _, writer in pipes:
                writer.close()
        failed = {r: v for r, (ok, v, _) in replies.items() if not ok}
        if failed:
            self.shutdown(join_s=0.0)
            raise WorldStartError(f"rank(s) {sorted(failed)} failed to initialise on port {port}:\n{failed[min(failed)]}", list(failed))
        return self

    def shutdown(self, join_s: float = 5.0) -> None:
        """Stop every rank: ask politely, then terminate, then kill; unlink the request segment. Idempotent."""
        procs, self._procs = self._procs, []
        if not procs:
            self._close_channel()  # a start interrupted before any rank existed
            return
        procs = [p for p in procs if p.pid is not None]  # interrupted start: some never ran
        if any(p.is_alive() for p in procs):
            self._channel.stop()
        deadline = time.monotonic() + join_s
        for p in procs:
            p.join(max(0.0, deadline - time.monotonic()))
        for p in procs:
            if p.is_alive():
                p.terminate()
        for p in procs:
            p.join(1.0)
            if p.is_alive():
                p.kill()
                p.join(1.0)
        self._close_channel()
        for reader in self._results:
            reader.close()
        if self._stack_dir:
            shutil.rmtree(self._stack_dir, ignore_errors=True)
            self._stack_dir = None
        _live_worlds.discard(self)

    def _close_channel(self) -> None:
        if self._channel is not None:
            self._channel.close()
            self._channel = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.shutdown()

    @property
    def pids(self) -> list[int]:
        return [p.pid for p in self._procs]

    # -- calls

    def run(self, fn, *args, timeout_s: float | None = None, **kwargs) -> list:
        timeout_s = self.timeout_s if timeout_s is None else timeout_s
        require(timeout_s > 0, "timeout_s", timeout_s, "must be > 0")
        pickled = time.perf_counter()
        requests = self._pickle_request(fn, args, kwargs)  # before touching the world: a bad fn changes nothing
        pickle_s = time.perf_counter() - pickled  # part of this call's dispatch cost; a (re)start below is not
        # calls from several threads take turns: each waits at most its own timeout for the one before
        if not self._call_lock.acquire(timeout=timeout_s):
            raise CallTimeoutError(f"{getattr(fn, '__qualname__', fn)} waited {timeout_s:.1f}s for another thread's call on this world to end", [])
        try:
            return self._call(fn, requests, pickle_s, timeout_s)
        finally:
            self._call_lock.release()

    def _call(self, fn, requests: list[bytes], pickle_s: float, timeout_s: float) -> list:
        if not self._procs:  # never started, or torn down after a failure
            self.start()
        # between calls every pipe is quiet unless a rank closed it by exiting: one poll instead of a
        # waitpid per rank (a rank whose pipe another process keeps open is caught in _collect)
        dead = {r: p.exitcode for r, p in enumerate(self._procs) if p.exitcode is not None} if self._poller.poll(0) or any(self._eof) else {}
        if dead:  # died between calls: say so rather than silently restart and lose rank state
            self.shutdown(join_s=0.0)
            raise RankDiedError(f"rank(s) {sorted(dead)} exited since the last call ({_exit_codes(dead)})", list(dead))
        self._call_id += 1
        call = f"{getattr(fn, '__qualname__', fn)}#{self._call_id}"
        start = time.perf_counter() - pickle_s
        try:
            self._channel.send(self._call_id, requests)
        except OSError:  # no shared memory for this request: nothing was sent, the world is as it was
            raise
        except BaseException:  # Ctrl-C part-way through: some ranks may have it
            self.shutdown(join_s=0.0)
            raise
        try:
            replies, silent, stacks = self._collect(self._call_id, timeout_s, call)
        except BaseException:  # timeout, dead rank, Ctrl-C: ranks may be stuck in a collective
            self.shutdown(join_s=0.0)
            raise
        driver_s = self._last_call_s = time.perf_counter() - start
        failed = {r: v for r, (ok, v, _) in replies.items() if not ok}
        if failed:
            self.shutdown(join_s=0.0 if len(failed) < self.world_size else 5.0)
            raise RankError(failed, call, silent, stacks)
        self.dispatch.append(DispatchRecord(call, driver_s, max(t for _, _, t in replies.values())))
        return [replies[r][1] for r in range(self.world_size)]

    def _pickle_request(self, fn, args: tuple, kwargs: dict) -> list[bytes]:
        """(fn, args, kwargs) pickled here, in the caller's thread: one payload for every rank,
        or one per rank if it shares a process resource.

        A failure here is an immediate TypeError (in a background thread it would only be
        printed, and the call would run into its timeout). A tensor argument's storage (or any
        other resource ForkingPickler hands to another process) is shared with one receiver per
        pickle, so such a request is pickled once per rank.
        """
        try:
            return dumps_for_ranks((fn, args, kwargs), self.world_size)
        except Exception as e:
            name = getattr(fn, "__qualname__", repr(fn))
            try:
                dumps(fn)
            except Exception:
                what = f"fn {name}: it must be a module-level function, importable by the rank processes"
            else:
                what = f"the arguments of {name}: they must be picklable (plain data, CPU tensors)"
            raise TypeError(f"cannot send {what} ({type(e).__name__}: {e})") from e

    def barrier(self, timeout_s: float | None = None) -> None:
        self.run(_barrier, timeout_s=timeout_s)

    def _stack_file(self, rank: int) -> str:
        return os.path.join(self._stack_dir, f"rank{rank}.stack")

    def _stacks(self, ranks: list[int], wait_s: float = 1.0) -> dict[int, str]:
        """Each live rank's Python stack (main thread, innermost first), via faulthandler on SIGUSR1.

        Only called once the ranks have initialised (they register the handler before init).
        A rank that does not dump within `wait_s` is left out.
        """
        offsets = {}
        for r in ranks:
            path, proc = Path(self._stack_file(r)), self._procs[r]
            if proc.is_alive() and path.exists():
                offsets[r] = path.stat().st_size
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGUSR1)
        stacks, last = {}, {}
        deadline = time.monotonic() + wait_s
        while offsets and time.monotonic() < deadline:
            time.sleep(0.02)
            for r in list(offsets):
                text = Path(self._stack_file(r)).read_bytes()[offsets[r]:].decode(errors="replace")
                if text and last.get(r) == text:  # unchanged for one poll: the dump is complete
                    stacks[r] = _main_thread(text)
                    del offsets[r]
                last[r] = text
        return stacks

    def _collect(self, call_id, timeout_s: float, call: str | None = None) -> tuple[dict, list, dict]:
        """Wait for every rank's reply to `call_id`, watching for deaths and the deadline.

        Returns (replies, ranks that never answered, their stacks). Once one rank has failed,
        the others get `grace_s` to report too (they are often stuck in a collective with
        the failed rank), so the error names every failure seen and where the rest were.
        """
        call = call or repr(call_id)
        replies: dict[int, tuple] = {}
        deadline = time.monotonic() + timeout_s

        def take(rank: int) -> bool:  # whatever rank has sent; True if its reply to call_id is complete
            for cid, ok, value, elapsed in self._receive(rank):
                if cid == call_id or cid is None:  # None: a reply that could not be read, taken as this call's
                    replies[rank] = (ok, value, elapsed)
            return rank in replies

        if call_id != "init" and self._last_call_s <= self._reply_spin_s:
            # the last call was short: poll for the replies (yielding the core) before blocking
            spin_until = time.perf_counter() + self._reply_spin_s
            while len(replies) < self.world_size and time.perf_counter() < spin_until:
                for fd, _ in self._poller.poll(0):
                    take(self._rank_of_fd[fd])
                if len(replies) < self.world_size:
                    os.sched_yield()
        while len(replies) < self.world_size:
            now = time.monotonic()
            if any(not ok for ok, _, _ in replies.values()):
                deadline = min(deadline, now + self.grace_s)
                if now >= deadline:
                    break
            waiting = [r for r in range(self.world_size) if r not in replies]
            wait_s = min(0.05, max(0.0, deadline - now)) or 0.001
            if all(self._eof[r] for r in waiting):
                time.sleep(wait_s)
                ready = []
            else:  # every pipe still open; one that answered already shows up only if it closes (then read once, see _receive)
                ready = [self._rank_of_fd[fd] for fd, _ in self._poller.poll(wait_s * 1e3)]
            if [r for r in ready if take(r) and r in waiting]:
                continue
            # a rank that exited: first take what it wrote before dying, then report it
            dead = {r: p.exitcode for r, p in enumerate(self._procs) if r not in replies and p.exitcode is not None}
            dead = {r: code for r, code in dead.items() if not take(r)}
            if dead:
                raise RankDiedError(f"rank(s) {sorted(dead)} exited during {call} ({_exit_codes(dead)})", list(dead))
            if time.monotonic() >= deadline:
                if any(not ok for ok, _, _ in replies.values()):
                    break
                waiting = [r for r in range(self.world_size) if r not in replies]
                stacks = self._stacks(waiting) if call_id != "init" else {}
                raise CallTimeoutError(f"rank(s) {waiting} did not answer {call} within {timeout_s:.1f}s", waiting, stacks)
        silent = [r for r in range(self.world_size) if r not in replies]
        return replies, silent, (self._stacks(silent) if silent and call_id != "init" else {})

    def _receive(self, rank: int) -> list[tuple]:
        """Every complete message rank has sent so far, read without ever blocking.

        A rank that dies part-way through a message leaves a partial frame; it stays in the
        buffer (and the death is reported from the exit code), where a blocking read of the
        message would wait forever. End-of-file marks the pipe as done.
        """
        buffer, fd = self._received[rank], self._results[rank].fileno()
        while not self._eof[rank]:
            try:
                chunk = os.read(fd, _PIPE_CHUNK)
            except BlockingIOError:
                break
            self._eof[rank] = not chunk
            if not chunk:  # closed for good: poll would report it on every call from now on
                self._poller.unregister(fd)
            buffer += chunk
            if 0 < len(chunk) < _PIPE_CHUNK:  # drained for now; the caller polls for more
                break
        messages = []
        while len(buffer) >= _FRAME.size and len(buffer) >= _FRAME.size + _FRAME.unpack_from(buffer)[0]:
            end = _FRAME.size + _FRAME.unpack_from(buffer)[0]
            payload = bytes(buffer[_FRAME.size:end])
            del buffer[:end]
            try:  # may fetch shared tensors from the rank; a rank gone by then fails here, not hangs
                messages.append(pickle.loads(payload))
            except Exception:
                messages.append((None, False, f"the driver could not read rank {rank}'s reply:\n{traceback.format_exc()}", 0.0))
        return messages


def _main_thread(dump: str) -> str:
    """The block of a faulthandler dump that runs the rank loop, cut at `_rank_main`."""
    blocks = [b for b in dump.split("\n\n") if b.strip()]
    block = next((b for b in blocks if "in _rank_main" in b), blocks[0] if blocks else "")
    lines = block.splitlines()
    end = next((i for i, line in enumerate(lines) if line.rstrip().endswith("in _rank_main")), len(lines) - 1)
    return "\n".join(lines[: end + 1])


def _barrier(ctx: RankContext) -> None:
    ctx.comm.barrier()


# --------------------------------------------------------------------------- SPMD under torchrun


class TorchrunWorld:
    """The orchestrator's `run` API when this process is one rank of a torchrun job.

    Every process calls `run(fn, ...)`; fn runs locally and rank 0 receives every rank's
    result (others get None), so rank 0 alone collects and writes reports. There is no
    per-call timeout here: the process group's own timeout (`timeout_s`) bounds every
    collective, and torchrun tears the job down when a rank fails.
    """

    def __init__(self, device: str = "cpu", backend: str = "auto", timeout_s: float = 300.0, tp_size: int | None = None, tp_layout: str = "contiguous"):
        # tp_size < world size with the contiguous layout keeps TP inside a node (e.g.
        # tp_size=LOCAL_WORLD_SIZE), so all-reduces stay off the network
        check_tp_layout(tp_layout)  # before from_env: a bad argument is named whatever the environment
        self.manager = ProcessGroupManager.from_env(device=device, backend=backend, timeout_s=timeout_s, tp_size=tp_size, tp_layout=tp_layout).init()
        m = self.manager
        self.world_size, self.rank = m.world_size, m.rank
        self.ctx = RankContext(m.rank, m.world_size, m.device, m.backend, m.communicator(), m)
        self.dispatch: list[DispatchRecord] = []

    def run(self, fn, *args, timeout_s=None, **kwargs):
        return gather_objects(fn(self.ctx, *args, **kwargs), dst=0)

    def shutdown(self):
        # a rank that tears gloo down while a peer still reads from it aborts the peer: wait for
        # the whole world, not only this TP group (run's gather spans every group)
        ProcessGroupCommunicator().barrier()
        self.manager.destroy()


def in_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("RANK" in os.environ and "WORLD_SIZE" in os.environ and "MASTER_ADDR" in os.environ)


__all__ = [
    "CallTimeoutError", "MultiGPUOrchestrator", "ProcessGroupManager", "RankContext", "RankDiedError", "RankError", "TPConfigError",
    "TP_LAYOUTS", "TorchrunWorld", "WorldError", "WorldStartError", "check_port_free", "check_tp_layout", "choose_backend", "free_port", "in_torchrun",
    "tp_groups",
]
