"""The decode GEMV floor on one GPU: each Llama-3-8B decode matmul shape (batch 1) timed alone.

    OUT=DIR python3 -m harness.sweeps.gemv_floor [--shard-of N]    (one CUDA device with Triton)

Three ways per shape: inductor with coordinate-descent tuning (what the compiled decode step
uses), cuBLAS (F.linear), and a plain Triton GEMV swept over block/warp/stage configs. Each
timing replays a CUDA graph over several distinct weight matrices so L2 (50 MB on H100) cannot
hold them; bytes/s counts the weight bytes read. Writes $OUT/gemv.json. Used to decide whether
better matmul code could close the gap to a decode target (reports/baselines/fastpath-*/README.md).
--shard-of N times one rank's shapes at TP=N instead (column-parallel outputs and row-parallel
inputs divided by N; writes gemv-shard-of-N.json): how far a GEMV reading 1/N of the bytes is
from 1/N of the time.
"""
import argparse
import itertools
import json
import os

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from harness.timing import graph_call_seconds

SHAPES = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336), "lm_head": (128256, 4096)}


@triton.jit
def gemv(x_ptr, u_ptr, w_ptr, y_ptr, N, K, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SILU: tl.constexpr):
    """y[n] = sum_k w[n, k] * x[k] (x = silu(x) * u when SILU); needs N % BLOCK_N == K % BLOCK_K == 0."""
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + cols, eviction_policy="evict_last").to(tl.float32)
        if SILU:
            x = x * tl.sigmoid(x) * tl.load(u_ptr + cols, eviction_policy="evict_last").to(tl.float32)
        # weights are streamed once: keep them from evicting x
        w = tl.load(w_ptr + rows[:, None] * K + cols[None, :], eviction_policy="evict_first").to(tl.float32)
        acc += w * x[None, :]
    tl.store(y_ptr + rows, tl.sum(acc, 1).to(y_ptr.dtype.element_ty))


def triton_gemv(x, w, config, u=None):
    n, k = w.shape
    block_n, block_k, warps, stages = config
    y = torch.empty(n, dtype=x.dtype, device=x.device)
    gemv[(n // block_n,)](x, x if u is None else u, w, y, n, k, BLOCK_N=block_n, BLOCK_K=block_k, SILU=u is not None, num_warps=warps, num_stages=stages)
    return y


def per_call(calls, nbytes: int) -> dict:
    """µs and weight TB/s of one call, from CUDA-graph replays of `calls` (a list of closures)."""
    seconds = graph_call_seconds(calls, replays=15)
    return {"us": seconds * 1e6, "TBps": nbytes / seconds / 1e12}


def measure_shape(n: int, k: int, silu_prologue: bool) -> dict:
    weights = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16) / k**0.5 for _ in range(3 if n > 100_000 else 12)]
    x, gate = (torch.randn(k, device="cuda", dtype=torch.bfloat16) for _ in range(2))
    nbytes = n * k * 2
    row = {"cublas": per_call([lambda w=w: F.linear(x, w) for w in weights], nbytes)}
    with torch._inductor.config.patch(coordinate_descent_tuning=True):
        torch._dynamo.reset()
        linear = torch.compile(lambda x, w: F.linear(x[None], w), fullgraph=True, dynamic=False)
        row["inductor"] = per_call([lambda w=w: linear(x, w) for w in weights], nbytes)
        if silu_prologue:
            torch._dynamo.reset()
            swiglu_linear = torch.compile(lambda g, u, w: F.linear((F.silu(g) * u)[None], w), fullgraph=True, dynamic=False)
            row["inductor_silu_prologue"] = per_call([lambda w=w: swiglu_linear(gate, x, w) for w in weights], nbytes)
    reference = F.linear(x.float(), weights[0].float())
    trials, configs = {}, {}
    for config in itertools.product((4, 8, 16, 32), (256, 512, 1024), (4, 8), (1, 3)):
        if config[0] * config[1] > 16384 or n % config[0] or k % config[1]:
            continue
        configs[str(config)] = config
        error = (triton_gemv(x, weights[0], config).float() - reference).abs().max().item()
        trials[str(config)] = {**per_call([lambda w=w: triton_gemv(x, w, config) for w in weights], nbytes), "max_abs_error": error}
    best = min(trials, key=lambda c: trials[c]["us"])
    row["triton_best"] = {"config": best, **trials[best]}
    if silu_prologue:
        row["triton_silu_prologue"] = per_call([lambda w=w: triton_gemv(gate, w, configs[best], u=x) for w in weights], nbytes)
    row["triton_trials"] = trials
    return row


COLUMN_PARALLEL = ("qkv", "gate_up", "lm_head")  # output rows sharded; the others' input columns


def shard_shapes(tp: int) -> dict:
    return {name: (n // tp, k) if name in COLUMN_PARALLEL else (n, k // tp) for name, (n, k) in SHAPES.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shard-of", type=int, default=1, help="time one rank's shapes at this TP degree (default 1: the whole model)")
    tp = parser.parse_args().shard_of
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    results = {}
    for name, (n, k) in shard_shapes(tp).items():
        results[name] = measure_shape(n, k, silu_prologue=name == "down")
        print(name, {key: value for key, value in results[name].items() if key != "triton_trials"}, flush=True)
        torch.cuda.empty_cache()
    with open(f"{out}/gemv.json" if tp == 1 else f"{out}/gemv-shard-of-{tp}.json", "w") as f:
        json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
