"""Functions run on ranks by the orchestrator suite (module level, so spawn can import them)."""
from __future__ import annotations

import os
import signal
import struct
import sys
import time

import torch
import torch.distributed as dist


def identity(ctx):
    return {"rank": ctx.rank, "world_size": ctx.world_size, "pid": os.getpid(), "backend": ctx.backend,
            "tp_size": ctx.comm.world_size, "initialized": dist.is_initialized()}


def noop(ctx):
    return None


def all_reduce_rank(ctx):
    return ctx.comm.all_reduce(torch.tensor([float(ctx.rank + 1)])).item()


def remember(ctx, value):
    ctx.state["value"] = value


def recall(ctx):
    return ctx.state.get("value")


def raise_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        raise ValueError(f"injected failure on rank {ctx.rank}")
    ctx.comm.barrier()  # the others wait in a collective the failed rank never enters


def exit_on(ctx, bad_rank):
    if ctx.rank == bad_rank:
        os._exit(7)
    ctx.comm.barrier()


def sleep_on(ctx, bad_rank, seconds):
    if ctx.rank == bad_rank:
        time.sleep(seconds)
    ctx.comm.barrier()


def unpicklable(ctx):
    return lambda: None


def sleep_all(ctx, seconds):
    time.sleep(seconds)
    ctx.comm.barrier()


def master_port(ctx):
    return ctx.manager.master_port


def open_fds(ctx):
    return len(os.listdir("/proc/self/fd"))


def tensors(ctx, n):
    return [torch.full((4,), float(ctx.rank * n + i)) for i in range(n)]


def echo(ctx, value):
    return value


def torn_reply(ctx, bad_rank):
    """bad_rank writes the start of a 1 MiB reply on its result channel, then is SIGKILLed
    (what the OOM killer does to a rank part-way through sending a large result)."""
    if ctx.rank == bad_rank:
        frame = sys._getframe()
        while frame.f_code.co_name != "_rank_main":
            frame = frame.f_back
        results = frame.f_locals["results"]
        if hasattr(results, "_writer"):  # a multiprocessing.Queue: Connection's framing
            fd, header = results._writer.fileno(), struct.pack("!i", 1 << 20)
        else:  # the rank's own result pipe
            from impl.orchestrator import _FRAME
            fd, header = results.fileno(), _FRAME.pack(1 << 20)
        os.write(fd, header + b"x" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.rank
