"""One timer and one percentile for every harness measurement (sweep points, collective
microbenchmarks, dispatch overhead).

`time_calls(call, iters, device)`: seconds of each of `iters` back-to-back calls of `call`.
On CUDA each call is bracketed by its own pair of events on the current stream and the host
synchronises once after the batch (so a call's launch overlaps the previous one's execution,
as in nccl-tests); elsewhere time.perf_counter around each call, which is the elapsed time of
the (synchronous) CPU work. `iters=1` times one call alone (the sweep times each repeat so,
with its setup and barrier in between).

`percentile(values, q)`: the nearest-rank percentile, the smallest value with at least a
fraction q of the values at or below it: sorted(values)[ceil(q * n) - 1] (q in (0, 1]).
"""
from __future__ import annotations

import math
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


def percentile(values, q: float) -> float:
    """Nearest-rank percentile of `values` (any order, non-empty), q in (0, 1]."""
    require(len(values) > 0, "values", values, "must not be empty")
    require(0 < q <= 1, "q", q, "must be in (0, 1]")
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


__all__ = ["percentile", "time_calls"]
