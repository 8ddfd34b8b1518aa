"""Rank functions for test_low_latency.py (module level, so spawned ranks can import them)."""
from __future__ import annotations

import torch

from impl.communication import ProcessGroupCommunicator
from impl.low_latency import LowLatencyCommunicator


def rank_values(ctx, shape: tuple, dtype: torch.dtype, call: int, rank: int | None = None) -> torch.Tensor:
    """Distinct values per rank and per call, so a stale buffer or a missed peer shows in the sum;
    any rank can rebuild any other's (`rank`), so each computes the exact sum itself."""
    g = torch.Generator().manual_seed(1000 * call + (ctx.tp_rank if rank is None else rank))
    return torch.randn(shape, generator=g, dtype=torch.float32).to(dtype).to(ctx.device)


def sum_error(ctx, got: torch.Tensor, shape: tuple, dtype: torch.dtype, call: int) -> tuple[float, float]:
    """(max |got - exact sum|, bound): the exact sum in float64 of every rank's input, and the
    bound (w-1) u max sum|x_r| of w terms summed in `dtype` in any order (plus u|s| for the final
    rounding into `dtype`)."""
    terms = torch.stack([rank_values(ctx, shape, dtype, call, r).double() for r in range(ctx.comm.world_size)])
    exact, magnitude = terms.sum(0), terms.abs().sum(0)
    u = torch.finfo(dtype).eps / 2
    return float((got.double() - exact).abs().max()), float(ctx.comm.world_size * u * magnitude.max())


def low_latency_vs_process_group(ctx, shapes: list, dtype: torch.dtype) -> dict:
    """Each shape all-reduced by the low-latency communicator and by the plain one, back to back
    (a buffer reused across calls). Returns the fallback reason, the algorithms taken and whether
    every result equals the plain communicator's bit for bit, and each result's (error, bound)
    against the exact sum."""
    fast = LowLatencyCommunicator(ctx.tp_group, device=ctx.device)
    plain = ProcessGroupCommunicator(ctx.tp_group)
    equal, algorithms, errors = [], [], []
    for call, shape in enumerate(shapes):
        x = rank_values(ctx, tuple(shape), dtype, call)
        algorithms.append(fast.algorithm(x))
        got, want = fast.all_reduce(x.clone()), plain.all_reduce(x.clone())
        equal.append(bool(torch.equal(got, want)))
        errors.append(sum_error(ctx, got, tuple(shape), dtype, call))
    # the check's power: this rank's own input (a reduction that skipped its peers) must exceed the bound
    skipped = sum_error(ctx, rank_values(ctx, tuple(shapes[0]), dtype, 0), tuple(shapes[0]), dtype, 0)
    return {"fallback_reason": fast.fallback_reason, "algorithms": algorithms, "equal": equal, "errors": errors, "skipped_peers": skipped}


def symmetric_path_at_world_size_one(ctx, shape: tuple, dtype: torch.dtype) -> dict:
    """On one GPU: the symmetric buffer builds, one-shot and two-shot run (a sum of one), eagerly
    and replayed from a CUDA graph, and return the input unchanged."""
    comm = LowLatencyCommunicator(ctx.tp_group, device=ctx.device)
    if comm.buffer is None:
        return {"fallback_reason": comm.fallback_reason}
    out = {"fallback_reason": None}
    for algorithm in ("one_shot", "two_shot"):
        x = rank_values(ctx, shape, dtype, 0)
        out[f"{algorithm}_eager_equal"] = bool(torch.equal(comm.symmetric_all_reduce(x.clone(), algorithm), x))
        static = x.clone()
        comm.symmetric_all_reduce(static, algorithm)  # warm up outside capture
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            result = comm.symmetric_all_reduce(static, algorithm)
        fresh = rank_values(ctx, shape, dtype, 1)
        static.copy_(fresh)
        graph.replay()
        torch.cuda.synchronize()
        out[f"{algorithm}_graph_equal"] = bool(torch.equal(result, fresh))
    # compiled whole (fullgraph): one-shot traces; two-shot gives way to NCCL inside a compiled graph
    step = torch.compile(lambda t: comm.symmetric_all_reduce(t * 2, "one_shot") + 1, fullgraph=True)
    x = rank_values(ctx, shape, dtype, 2)
    out["one_shot_compiled_equal"] = bool(torch.equal(step(x), x * 2 + 1))
    return out
