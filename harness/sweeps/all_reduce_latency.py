"""All-reduce latency by algorithm and message size, captured in a CUDA graph, as decode runs it.

    OUT=DIR python3 -m harness.sweeps.all_reduce_latency [--world-size N]     (N CUDA GPUs, one rank each)

For each message size (bf16, bytes per rank; the decode sizes of Llama-3-8B at batch 1 and 16 are
among them) and each algorithm impl.low_latency offers (nccl; one_shot and two_shot over symmetric
memory where the buffer builds), times one all-reduce as the median replay of a CUDA graph of 64
back-to-back calls, divided by 64 (harness.timing.graph_call_seconds), and takes the slowest rank.
At world size 1 nothing crosses a link: the figures are each algorithm's fixed floor on this GPU
(NCCL is called directly, since the communicators skip a world of one). Writes
$OUT/all_reduce_latency.json: rows {op, algorithm, bytes, world_size, latency_us}, the shape of
harness.collectives.bench_collectives rows plus the algorithm, for the cost model's table.
"""
from __future__ import annotations

import argparse
import json
import os

import torch
import torch.distributed as dist

from harness.timing import graph_call_seconds
from impl.low_latency import LowLatencyCommunicator

KIB = 1024
SIZES = [2 * KIB, 8 * KIB, 32 * KIB, 128 * KIB, 256 * KIB, 1024 * KIB, 4096 * KIB, 8192 * KIB]  # 8 KiB: one token of hidden 4096; 128 KiB: 16
CALLS = 64


def time_rank(ctx, sizes: list[int]) -> dict:
    comm = LowLatencyCommunicator(ctx.tp_group, device=ctx.device)
    rows = []
    for nbytes in sizes:
        x = torch.randn(nbytes // 2, device=ctx.device).to(torch.bfloat16)
        runs = {"nccl": lambda: dist.all_reduce(x, group=ctx.tp_group)}
        if comm.buffer is not None:
            runs["one_shot"] = lambda: comm.symmetric_all_reduce(x, "one_shot")
            runs["two_shot"] = lambda: comm.symmetric_all_reduce(x, "two_shot")
        for algorithm, call in runs.items():
            seconds = graph_call_seconds([call] * CALLS)
            rows.append({"op": "all_reduce", "algorithm": algorithm, "bytes": nbytes, "world_size": ctx.comm.world_size,
                         "dtype": "bfloat16", "latency_us": seconds * 1e6, "captured": True})
    return {"rows": rows, "fallback_reason": comm.fallback_reason}


def main() -> None:
    from harness.runtime.orchestrator import MultiGPUOrchestrator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    world = MultiGPUOrchestrator(args.world_size, device="cuda", timeout_s=300.0)
    try:
        results = world.run(time_rank, SIZES)
    finally:
        world.shutdown()
    rows = [max(group, key=lambda r: r["latency_us"]) for group in zip(*(r["rows"] for r in results))]  # the slowest rank
    for row in rows:
        print(f"{row['algorithm']:>9} {row['bytes']:>9} B  {row['latency_us']:8.2f} us", flush=True)
    with open(f"{out}/all_reduce_latency.json", "w") as f:
        json.dump({"rows": rows, "fallback_reason": results[0]["fallback_reason"], "world_size": args.world_size,
                   "device": torch.cuda.get_device_name(0), "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
