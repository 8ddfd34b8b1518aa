"""Collective microbenchmarks on a rank world, nccl-tests style, and a linear cost model.

`bench_collectives(world, sizes)` times all-reduce / all-gather / reduce-scatter on every
rank of `world` (a MultiGPUOrchestrator or TorchrunWorld) and returns one row per
(op, message size):

    op, algorithm, captured, bytes, requested_bytes, world_size, dtype, iters, latency_us,
    latency_p90_us, algbw_GBps, busbw_GBps, backend, device, note

`algorithm` is nccl for every op by default; all-reduces may also be timed by impl.low_latency's
one_shot and two_shot (symmetric memory), where the world can run them.

`bytes` is nccl-tests' "size" column, i.e. the size of the *full* buffer:
    all_reduce      the tensor each rank reduces (input = output size)
    all_gather      the gathered *output* (each rank contributes bytes / world_size)
    reduce_scatter  the *input* each rank reduces (each rank keeps bytes / world_size)
Requested sizes are rounded up to a multiple of elsize (all_reduce) or elsize*world_size
(the others); `requested_bytes` keeps what was asked.

    algbw = bytes / latency        busbw = algbw * factor(op, n)
    factor: all_reduce 2(n-1)/n, all_gather and reduce_scatter (n-1)/n (nccl-tests' PERFORMANCE.md)

Timing per rank: buffers are allocated once per (op, size); `warmup` untimed calls; a
barrier; then `iters` calls, each timed alone (harness.timing.time_calls). Each rank
reports the median and p90 (harness.timing.percentile, nearest rank) of its own calls; the driver keeps the max over
ranks, the slowest rank being what a TP layer waits for. GB/s are 1e9 bytes per second.

A world of one rank still times the (local) calls, but has no bus: busbw_GBps is 0 and
`note` says so. Gloo worlds, and worlds whose ranks share a GPU, measure host staging,
not the interconnect: use their figures for plumbing, never for projections.

harness.perf_model.fit_cost_model fits the rows' alpha-beta cost model (the factor above is
harness.perf_model.busbw_factor).
"""
from __future__ import annotations

import math
import statistics

import torch
import torch.distributed as dist

from impl.architecture import DTYPES, TPConfigError, parse_dtype, require

from impl.low_latency import ALGORITHMS, LowLatencyCommunicator

from .perf_model import OPS, busbw_factor
from .timing import graph_call_seconds, percentile, time_calls

# torch >= 2.12 renamed the tensor variants; 2.5-2.11 only have the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor

KIB, MIB = 1 << 10, 1 << 20


def message_bytes(op: str, requested: int, world_size: int, elsize: int) -> int:
    """The nccl-tests size actually benchmarked for `requested` bytes (rounded up to whole elements per rank)."""
    unit = elsize if op == "all_reduce" else elsize * world_size
    return max(1, math.ceil(requested / unit)) * unit


def _check_args(sizes_bytes, dtype, ops, warmup, iters) -> tuple[torch.dtype, tuple[str, ...]]:
    require(isinstance(sizes_bytes, (list, tuple)) and len(sizes_bytes) > 0, "sizes_bytes", sizes_bytes, "must be a non-empty list of byte counts")
    for i, s in enumerate(sizes_bytes):
        require(isinstance(s, int) and not isinstance(s, bool) and s > 0, f"sizes_bytes[{i}]", s, "must be a positive integer")
    torch_dtype = parse_dtype(dtype, "dtype")
    require(isinstance(ops, (list, tuple)) and len(ops) > 0, "ops", ops, f"must be a non-empty sequence drawn from {OPS}")
    for op in ops:
        require(op in OPS, "ops", op, f"unknown op; must be one of {OPS}")
    require(isinstance(warmup, int) and not isinstance(warmup, bool) and warmup >= 0, "warmup", warmup, "must be an integer >= 0")
    require(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1, "iters", iters, "must be an integer >= 1")
    return torch_dtype, tuple(dict.fromkeys(ops))


# --------------------------------------------------------------------------- rank side


def _collective_call(op: str, algorithm: str, n: int, group, dtype, device, nbytes: int, elsize: int, low_latency):
    """A zero-argument closure doing one `op` of nccl-tests size `nbytes` on preallocated buffers
    (an all_reduce by `algorithm`: nccl, or one_shot / two_shot through `low_latency`)."""
    count = nbytes // elsize
    if op == "all_reduce":
        buf = torch.zeros(count, dtype=dtype, device=device)  # zeros stay zeros: no overflow over many calls
        if algorithm != "nccl":
            return lambda: low_latency.symmetric_all_reduce(buf, algorithm)
        return lambda: dist.all_reduce(buf, group=group)
    full = torch.zeros(count, dtype=dtype, device=device)
    shard = torch.zeros(count // n, dtype=dtype, device=device)
    if op == "all_gather":
        return lambda: _all_gather_tensor(full, shard, group=group)
    return lambda: _reduce_scatter_tensor(shard, full, group=group)


def _bench_rank(ctx, plan: list[tuple[str, str, int, int]], dtype_name: str, warmup: int, iters: int, captured: bool) -> dict:
    """Run on every rank: time each (op, algorithm, bytes) of `plan`; return this rank's median/p90
    (captured: the median per call of CUDA-graph replays of `iters` calls; no p90)."""
    dtype = parse_dtype(dtype_name)
    elsize = torch.empty((), dtype=dtype).element_size()
    group, n = ctx.comm.group, ctx.comm.world_size
    cuda = ctx.device.type == "cuda"
    low_latency = LowLatencyCommunicator(group, ctx.device) if any(a != "nccl" for _, a, _, _ in plan) else None
    timings = []
    for op, algorithm, nbytes, _requested in plan:
        if algorithm != "nccl" and (low_latency.buffer is None or nbytes > low_latency.max_bytes):
            timings.append(None)  # this world has no symmetric path (or not this large): no row
            continue
        call = _collective_call(op, algorithm, n, group, dtype, ctx.device, nbytes, elsize, low_latency)
        for _ in range(warmup):
            call()
        if cuda:
            torch.cuda.synchronize()
        dist.barrier(group=group)
        if captured:
            median_s, p90_s = graph_call_seconds([call] * iters), math.nan
        else:
            times = time_calls(call, iters, ctx.device)
            median_s, p90_s = statistics.median(times), percentile(times, 0.90)
        timings.append({"op": op, "algorithm": algorithm, "bytes": nbytes, "median_s": median_s, "p90_s": p90_s})
        del call
    return {"rank": ctx.rank, "world_size": n, "backend": ctx.backend, "device": str(ctx.device), "timings": timings,
            "fallback_reason": low_latency.fallback_reason if low_latency else None}


# --------------------------------------------------------------------------- driver side


def bench_collectives(world, sizes_bytes: list[int], dtype="bfloat16", ops=("all_reduce", "all_gather", "reduce_scatter"), warmup: int = 5,
                      iters: int = 20, all_reduce_algorithms=("nccl",), captured: bool = False) -> list[dict]:
    """Time `ops` at each of `sizes_bytes` on every rank of `world`; one row per (op, algorithm, size). See the module doc.

    `all_reduce_algorithms`: nccl and/or impl.low_latency's one_shot / two_shot (symmetric memory;
    sizes or worlds it cannot serve give no row). `captured`: time each call inside a CUDA graph
    of `iters` calls, as a captured decode step runs it (CUDA only; no p90). Arguments are
    validated (TPConfigError naming the argument) before any rank is asked to do anything.
    Collectives run over each rank's TP group (ctx.comm), so `world_size` in the rows is the TP
    size. Under torchrun only rank 0 gets rows; the others get [].
    """
    torch_dtype, ops = _check_args(sizes_bytes, dtype, ops, warmup, iters)
    require(isinstance(all_reduce_algorithms, (list, tuple)) and len(all_reduce_algorithms) > 0
            and all(a in ALGORITHMS for a in all_reduce_algorithms), "all_reduce_algorithms", all_reduce_algorithms, f"must be drawn from {ALGORITHMS}")
    require(not captured or str(getattr(world, "device", "cpu")).startswith("cuda"), "captured", captured, "needs a CUDA world (CUDA graphs)")
    n = _tp_size(world)
    elsize = torch.empty((), dtype=torch_dtype).element_size()
    plan, seen = [], set()
    for op in ops:
        for algorithm in (dict.fromkeys(all_reduce_algorithms) if op == "all_reduce" else ("nccl",)):
            for requested in sizes_bytes:
                nbytes = message_bytes(op, requested, n, elsize)
                if (op, algorithm, nbytes) not in seen:
                    seen.add((op, algorithm, nbytes))
                    plan.append((op, algorithm, nbytes, requested))
    dtype_name = next(k for k, v in DTYPES.items() if v == torch_dtype)
    results = world.run(_bench_rank, plan, dtype_name, warmup, iters, captured)
    if results is None or results[0] is None:  # torchrun, rank != 0
        return []
    rows = []
    for i, (op, algorithm, nbytes, requested) in enumerate(plan):
        if any(r["timings"][i] is None for r in results):
            continue
        median_s = max(r["timings"][i]["median_s"] for r in results)
        p90_s = max(r["timings"][i]["p90_s"] for r in results)
        algbw = nbytes / median_s / 1e9 if median_s > 0 else float("inf")
        rows.append({
            "op": op, "algorithm": algorithm, "captured": captured, "bytes": nbytes, "requested_bytes": requested, "world_size": n, "dtype": dtype_name, "iters": iters,
            "latency_us": median_s * 1e6, "latency_p90_us": p90_s * 1e6, "algbw_GBps": algbw,
            "busbw_GBps": algbw * busbw_factor(op, n) if n > 1 else 0.0,
            "backend": results[0]["backend"], "device": results[0]["device"],
            "note": "world_size 1: no communication, busbw undefined (0)" if n == 1 else None,
        })
    return rows


def _tp_size(world) -> int:
    """Ranks in one TP group (collectives run over ctx.comm, the TP group): tp_size if set, else the world."""
    manager = getattr(world, "manager", None)  # TorchrunWorld
    tp = getattr(manager, "tp_size", None) if manager is not None else getattr(world, "tp_size", None)
    return tp or world.world_size


def decode_and_prefill_sizes(hidden: int, batch_decode=(1, 16), prefill_tokens: int = 8 * 2048, elsize: int = 2) -> list[int]:
    """Ascending, de-duplicated message sizes (bytes) a Llama layer's all-reduce sees.

    batch*hidden*elsize per decode batch, prefill_tokens*hidden*elsize for prefill, plus the
    powers of four from 1 KiB to 64 MiB as a curve for the cost-model fit.
    """
    require(isinstance(hidden, int) and hidden >= 1, "hidden", hidden, "must be a positive integer")
    require(isinstance(batch_decode, (list, tuple)) and all(isinstance(b, int) and b >= 1 for b in batch_decode), "batch_decode", batch_decode,
            "must be a sequence of positive integers")
    require(isinstance(prefill_tokens, int) and prefill_tokens >= 1, "prefill_tokens", prefill_tokens, "must be a positive integer")
    require(isinstance(elsize, int) and elsize >= 1, "elsize", elsize, "must be a positive integer")
    sizes = {b * hidden * elsize for b in batch_decode}
    sizes.add(prefill_tokens * hidden * elsize)
    p = KIB
    while p <= 64 * MIB:
        sizes.add(p)
        p *= 4
    return sorted(sizes)


__all__ = ["OPS", "TPConfigError", "bench_collectives", "decode_and_prefill_sizes", "message_bytes"]
