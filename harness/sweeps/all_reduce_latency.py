"""All-reduce latency by algorithm and message size, captured in a CUDA graph, as decode runs it.

    OUT=DIR python3 -m harness.sweeps.all_reduce_latency [--world-size N]     (N CUDA GPUs, one rank each)

harness.collectives.bench_collectives over `--world-size` ranks with every algorithm of
impl.low_latency (nccl; one_shot and two_shot where the symmetric buffer builds), each call timed
inside a CUDA graph of 64 calls; the sizes include the decode messages of Llama-3-8B at batch 1
and 16 (8 and 128 KiB). At world size 1 nothing crosses a link and NCCL's call is empty: the
symmetric figures are each algorithm's fixed floor on this GPU. Writes
$OUT/all_reduce_latency.json ({"rows": bench rows, ...}), which `fit_cost_model` turns into the
cost model's latency tables.
"""
from __future__ import annotations

import argparse
import json
import os

import torch

from harness.collectives import KIB, bench_collectives
from impl.low_latency import ALGORITHMS

SIZES = [2 * KIB, 8 * KIB, 32 * KIB, 128 * KIB, 256 * KIB, 1024 * KIB, 4096 * KIB, 8192 * KIB]


def main() -> None:
    from harness.runtime.orchestrator import MultiGPUOrchestrator

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--world-size", type=int, default=1)
    args = parser.parse_args()
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    world = MultiGPUOrchestrator(args.world_size, device="cuda", timeout_s=300.0)
    try:
        rows = bench_collectives(world, SIZES, ops=("all_reduce",), all_reduce_algorithms=ALGORITHMS, iters=64, captured=True)
    finally:
        world.shutdown()
    for row in rows:
        print(f"{row['algorithm']:>9} {row['bytes']:>9} B  {row['latency_us']:8.2f} us", flush=True)
    with open(f"{out}/all_reduce_latency.json", "w") as f:
        json.dump({"rows": rows, "world_size": args.world_size, "device": torch.cuda.get_device_name(0), "torch": torch.__version__}, f, indent=1)


if __name__ == "__main__":
    main()
