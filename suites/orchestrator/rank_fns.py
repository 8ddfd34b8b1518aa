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
            from harness.runtime.orchestrator import _FRAME
            fd, header = results.fileno(), _FRAME.pack(1 << 20)
        os.write(fd, header + b"x" * 100)
        os.kill(os.getpid(), signal.SIGKILL)
    return ctx.rank


def _group_report(rank: int, tp_rank: int, tp_group_index: int, tp_ranks, comm) -> dict:
    """Where a rank sits, and who took part in an all-reduce over its TP communicator: every
    member adds 2**(its global rank), so the sum is the bitmask of the members."""
    mask = comm.all_reduce(torch.tensor([2 ** rank], dtype=torch.int64))
    return {"rank": rank, "tp_rank": tp_rank, "tp_group_index": tp_group_index, "tp_ranks": list(tp_ranks), "comm_rank": comm.rank,
            "comm_size": comm.world_size, "comm_ranks": list(comm.global_ranks), "members_mask": int(mask.item())}


def tp_group_report(ctx):
    """_group_report of this world's own TP group (ctx.comm, made by the world's manager)."""
    return _group_report(ctx.rank, ctx.tp_rank, ctx.tp_group_index, ctx.tp_ranks, ctx.comm)


def tp_groups_made_by(ctx, manager_cls, tp_size, tp_layout):
    """_group_report of the TP groups a `manager_cls` manager creates on this running world
    (ProcessGroupManager.create_tp_groups: the default group is already initialised)."""
    manager = manager_cls(ctx.world_size, ctx.rank, tp_size=tp_size, tp_layout=tp_layout, device=ctx.device.type, backend=ctx.backend,
                          timeout_s=ctx.manager.timeout_s).create_tp_groups()
    return _group_report(ctx.rank, manager.tp_rank, manager.tp_group_index, manager.tp_ranks, manager.communicator())


def expected_tp_group(rank: int, world_size: int, tp_size: int, layout: str) -> tuple[int, list[int]]:
    """(group index, members in TP-rank order) of `rank`, from the layouts' definitions
    (independently of harness.runtime.orchestrator.tp_groups): contiguous blocks of tp_size ranks, or
    strided ranks g, g+G, g+2G, ... with G = world_size // tp_size."""
    groups = world_size // tp_size
    if layout == "contiguous":
        return rank // tp_size, [r for r in range(world_size) if r // tp_size == rank // tp_size]
    return rank % groups, [r for r in range(world_size) if r % groups == rank % groups]


def tp_group_problems(reports: list[dict], tp_size: int, layout: str) -> list[str]:
    """Driver side: every rank's _group_report (in global rank order) that is not what `layout`
    prescribes: its group, TP rank, communicator (rank, size, members), and who took part in
    its all-reduce. Empty when the world is split as asked."""
    out = []
    for rank, report in enumerate(reports):
        index, members = expected_tp_group(rank, len(reports), tp_size, layout)
        want = {"rank": rank, "tp_group_index": index, "tp_rank": members.index(rank), "tp_ranks": members, "comm_rank": members.index(rank),
                "comm_size": tp_size, "comm_ranks": members, "members_mask": sum(2 ** m for m in members)}
        got = {k: report.get(k) for k in want}
        if got != want:
            out.append(f"rank {rank}: {got}, expected {want}")
    return out
