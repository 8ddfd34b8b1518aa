"""Micro-benchmarks of the harness itself (figures for notes and reports, never asserted)."""
from __future__ import annotations

import statistics

from impl.orchestrator import MultiGPUOrchestrator


def _noop(ctx):
    return None


def dispatch_overhead(world_size: int = 4, calls: int = 500, device: str = "cpu", warmup: int = 20) -> dict:
    """Driver-observed minus slowest-rank time of a no-op `run`, in microseconds."""
    with MultiGPUOrchestrator(world_size, device=device) as world:
        for _ in range(warmup):
            world.run(_noop)
        first = len(world.dispatch)
        for _ in range(calls):
            world.run(_noop)
        overhead = sorted(r.overhead_s * 1e6 for r in world.dispatch[first:])
    pct = lambda q: overhead[min(len(overhead) - 1, int(q * len(overhead)))]  # noqa: E731
    return {"world_size": world_size, "device": device, "calls": calls, "p50_us": statistics.median(overhead), "p90_us": pct(0.90),
            "p99_us": pct(0.99), "max_us": overhead[-1]}
