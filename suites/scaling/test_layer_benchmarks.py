"""Per-rank layer microbenchmarks (pytest-benchmark): TP layers at world sizes 1 and 2.

Skipped unless asked for (see conftest.py): a plain `pytest` run does not time anything.

Run, and keep the JSON (one file per run under reports/benchmarks/<machine>/):
    pytest suites/scaling --benchmark-only --benchmark-autosave --benchmark-storage=reports/benchmarks
Compare against the latest saved run, failing on a >25% median regression:
    pytest suites/scaling --benchmark-only --benchmark-storage=reports/benchmarks \
        --benchmark-compare --benchmark-compare-fail=median:25%
Quick look without saving: pytest suites/scaling --tpgate-bench  (or --benchmark-enable).
On GPUs: --tpgate-device cuda (bfloat16; worlds of more ranks than GPUs fall back to gloo and
are not for timing).

What is timed: one benchmark round is one orchestrator `run` that makes every rank do
CALLS forward passes of its shard (inputs and, for attention, a prefilled KV cache set up
beforehand). pytest-benchmark's statistics are the driver-observed time of that round,
dispatch included; each round returns the slowest rank's own time for its CALLS forwards,
and `extra_info` records per-rank and slowest-rank seconds and microseconds per forward.
Nothing here asserts a speed: the tests only check each rank's output shape and finiteness.
The regression gate is pytest-benchmark's --benchmark-compare-fail, never an assert.
"""
from __future__ import annotations

import time

import pytest
import torch

from impl.architecture import Communicator
from impl.tensor_parallel import ColumnParallelLinear, ParallelAttention, ParallelMLP, RowParallelLinear

HIDDEN, INTER, HEADS, KV_HEADS = 256, 512, 8, 4
BATCH, SEQ, PREFILL = 4, 32, 64  # linear/MLP inputs: (BATCH, SEQ, .); attention decodes 1 token after PREFILL
CALLS, ROUNDS = 10, 3
LAYERS = ("ColumnParallelLinear", "RowParallelLinear", "ParallelAttention", "ParallelMLP")
WORLD_SIZES = (1, 2)


# --------------------------------------------------------------------------- rank side (module level: spawn imports it)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _init_weights(module: torch.nn.Module, seed: int) -> None:
    """Small normal weights (layers are built with torch.empty); generated on CPU so every device agrees."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.02)


def _build(comm: Communicator, layer: str, dtype: torch.dtype, device: torch.device):
    """(module, input, forward kwargs, expected output shape) for one rank."""
    n = comm.world_size
    g = torch.Generator().manual_seed(0)  # same seed on every rank: replicated inputs are equal
    randn = lambda *shape: torch.randn(*shape, generator=g).to(dtype=dtype, device=device)  # noqa: E731
    kw = dict(dtype=dtype, device=device)
    if layer == "ColumnParallelLinear":
        module = ColumnParallelLinear(HIDDEN, INTER, comm, **kw)
        x, call_kw, shape = randn(BATCH, SEQ, HIDDEN), {}, (BATCH, SEQ, INTER // n)
    elif layer == "RowParallelLinear":
        module = RowParallelLinear(INTER, HIDDEN, comm, input_is_parallel=True, **kw)
        x, call_kw, shape = randn(BATCH, SEQ, INTER // n), {}, (BATCH, SEQ, HIDDEN)
    elif layer == "ParallelAttention":
        module = ParallelAttention(HIDDEN, HEADS, KV_HEADS, comm, **kw)
        x, call_kw, shape = randn(BATCH, 1, HIDDEN), {"start_pos": PREFILL, "use_cache": True}, (BATCH, 1, HIDDEN)
    elif layer == "ParallelMLP":
        module = ParallelMLP(HIDDEN, INTER, comm, **kw)
        x, call_kw, shape = randn(BATCH, SEQ, HIDDEN), {}, (BATCH, SEQ, HIDDEN)
    else:
        raise ValueError(f"unknown layer {layer!r}")
    _init_weights(module, seed=1 + comm.rank)
    module.eval()
    if layer == "ParallelAttention":  # a decode step reads a filled cache: prefill it once
        module.allocate_kv_cache(BATCH, PREFILL + 1)
        with torch.no_grad():
            module(randn(BATCH, PREFILL, HIDDEN), start_pos=0, use_cache=True)
    return module, x, call_kw, shape


def setup_layer(ctx, layer: str) -> tuple:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    module, x, call_kw, shape = _build(ctx.comm, layer, dtype, ctx.device)
    ctx.state[("scaling", layer)] = (module, x, call_kw)
    return shape


def forward_calls(ctx, layer: str, calls: int) -> dict:
    """`calls` forwards of this rank's shard; this rank's own seconds for all of them.

    Every decode step writes the same cache slot (start_pos=PREFILL), so each costs the same.
    """
    module, x, call_kw = ctx.state[("scaling", layer)]
    _sync(ctx.device)
    start = time.perf_counter()
    with torch.no_grad():
        for _ in range(calls):
            y = module(x, **call_kw)
    _sync(ctx.device)
    seconds = time.perf_counter() - start
    return {"rank": ctx.rank, "seconds": seconds, "shape": tuple(y.shape), "finite": bool(torch.isfinite(y).all()),
            "backend": ctx.backend, "device": str(ctx.device)}


def teardown_layer(ctx, layer: str) -> None:
    ctx.state.pop(("scaling", layer), None)


# --------------------------------------------------------------------------- the benchmarks


@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("layer", [pytest.param(name, marks=pytest.mark.benchmark(group=name)) for name in LAYERS])
def test_layer_forward(benchmark, worlds, layer, world_size):
    world = worlds[world_size]
    expected = world.run(setup_layer, layer)[0]
    rounds: list[list[dict]] = []

    def dispatch() -> float:
        results = world.run(forward_calls, layer, CALLS)
        rounds.append(results)
        return max(r["seconds"] for r in results)

    try:
        slowest = benchmark.pedantic(dispatch, rounds=ROUNDS, iterations=1, warmup_rounds=1)
    finally:
        world.run(teardown_layer, layer)

    last = rounds[-1]
    timed = rounds[-ROUNDS:]  # drops the warmup round (with --benchmark-disable there is one call, no warmup)
    per_round_slowest = [max(r["seconds"] for r in rs) for rs in timed]
    benchmark.extra_info.update({
        "layer": layer, "world_size": world_size, "calls_per_round": CALLS, "backend": last[0]["backend"], "device": last[0]["device"],
        "shapes": {"hidden": HIDDEN, "intermediate": INTER, "heads": HEADS, "kv_heads": KV_HEADS, "batch": BATCH,
                   "seq": 1 if layer == "ParallelAttention" else SEQ, "kv_len": PREFILL + 1 if layer == "ParallelAttention" else None},
        "per_rank_seconds": [r["seconds"] for r in last],
        "slowest_rank_seconds_per_round": per_round_slowest,
        "slowest_rank_us_per_forward": min(per_round_slowest) / CALLS * 1e6,
        "env_device": worlds.device,  # the device asked for (--tpgate-device); "device" is where rank 0 computed
    })
    assert slowest == per_round_slowest[-1] and slowest > 0
    assert [r["rank"] for r in last] == list(range(world_size))
    for r in last:
        assert r["shape"] == tuple(expected), f"rank {r['rank']}: output shape {r['shape']}, expected {tuple(expected)}"
        assert r["finite"], f"rank {r['rank']}: non-finite output from {layer}"
