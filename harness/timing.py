"""One timer and one percentile for every harness measurement (sweep points, collective
microbenchmarks, dispatch overhead).

`time_calls(call, iters, device)`: seconds of each of `iters` back-to-back calls of `call`.
On CUDA each call is bracketed by its own pair of events on the current stream and the host
synchronises once after the batch (so a call's launch overlaps the previous one's execution,
as in nccl-tests); elsewhere time.perf_counter around each call, which is the elapsed time of
the (synchronous) CPU work. `iters=1` times one call alone (the sweep times each repeat so,
with its setup and barrier in between).

`graph_call_seconds(calls, replays)`: seconds of one call among `calls` (closures on one CUDA
device), from replays of one CUDA graph of all of them — launch costs as inside a decode step's
graph, each closure free to touch its own memory so L2 cannot hold the whole set; the median replay.

`percentile(values, q)`: the nearest-rank percentile, the smallest value with at least a
fraction q of the values at or below it: sorted(values)[ceil(q * n) - 1] (q in (0, 1]).
"""
from __future__ import annotations

import math
import statistics
import time

import torch

from impl.architecture import require


def time_calls(call, iters: int, device) -> list[float]:
    """Seconds of each of `iters` calls of `call()` on `device` (a torch.device or its name)."""
    require(isinstance(iters, int) and not isinstance(iters, bool) and iters >= 1, "iters", iters, "must be an integer >= 1")
    if torch.device(device).type == "cuda":
        starts = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        ends = [torch.cuda.Event(enable_timing=True) for _ in range(iters)]
        for start, end in zip(starts, ends):
            start.record()
            call()
            end.record()
        torch.cuda.synchronize()
        return [start.elapsed_time(end) / 1e3 for start, end in zip(starts, ends)]
    out = []
    for _ in range(iters):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def graph_call_seconds(calls, replays: int = 30) -> float:
    """Median over `replays` of (one replay of a CUDA graph of every call in `calls`) / len(calls)."""
    require(len(calls) > 0, "calls", calls, "must not be empty")

    def run():
        for call in calls:
            call()
    side = torch.cuda.Stream()  # warm-up off the default stream, as CUDA graph capture requires
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        run(), run()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        run()
    graph.replay()
    seconds = time_calls(graph.replay, replays, "cuda")
    return statistics.median(seconds) / len(calls)


def peak_memory_bytes(device) -> int:
    """The peak memory of this process on `device` since the last reset: CUDA's allocator peak, or
    on the CPU the process's maximum resident set size."""
    if torch.device(device).type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def percentile(values, q: float) -> float:
    """Nearest-rank percentile of `values` (any order, non-empty), q in (0, 1]."""
    require(len(values) > 0, "values", values, "must not be empty")
    require(0 < q <= 1, "q", q, "must be in (0, 1]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


__all__ = ["graph_call_seconds", "peak_memory_bytes", "percentile", "time_calls"]
