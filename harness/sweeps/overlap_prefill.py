"""What chunking the sequence-parallel prefill costs where nothing can overlap: CPU over gloo.

    python3 -m harness.sweeps.overlap_prefill [--preset tiny] [--world-sizes 1,2] [--rounds 15]

For each world size, one world (one process group) builds the preset's reference model once and
times its last-token prefill (harness.sweep.greedy_next, batch 2 x prompt 64, float32) at
overlap_chunks 1, 2 and 4, interleaved round by round so drift hits every setting alike. Prints
each setting's median (the slowest rank's) and its ratio to chunks=1. At world size 1 the setting
takes the un-chunked path (impl/tensor_parallel.py OverlapChunks), so its ratios measure noise.
"""
from __future__ import annotations

import argparse
import json
import statistics

import torch

from harness.runtime.orchestrator import MultiGPUOrchestrator
from harness.sweep import PRESETS, greedy_next
from harness.timing import time_calls
from impl.model import random_model

CHUNKS = (1, 2, 4)


def time_chunk_settings(ctx, preset: str, batch: int, prompt: int, rounds: int, warmup: int = 2) -> dict:
    """This rank's prefill seconds per overlap_chunks setting, `rounds` interleaved runs each."""
    model = random_model(PRESETS[preset], ctx.comm, torch.float32, ctx.device, sequence_parallel=True).eval()
    ids = torch.randint(0, PRESETS[preset].vocab_size, (batch, prompt), generator=torch.Generator().manual_seed(0))
    times: dict[int, list[float]] = {c: [] for c in CHUNKS}
    with torch.no_grad():
        for round_ in range(warmup + rounds):
            for c in CHUNKS:
                model.overlap_chunks = c
                ctx.comm.barrier()
                seconds = time_calls(lambda: greedy_next(model, ids), 1, ctx.device)[0]
                if round_ >= warmup:
                    times[c].append(seconds)
    return times


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    parser.add_argument("--world-sizes", default="1,2")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    figures = {}
    for ws in map(int, args.world_sizes.split(",")):
        world = MultiGPUOrchestrator(ws, device="cpu", timeout_s=600.0)
        try:
            ranks = world.run(time_chunk_settings, args.preset, args.batch, args.prompt, args.rounds)
        finally:
            world.shutdown()
        medians = {c: max(statistics.median(r[c]) for r in ranks) for c in CHUNKS}
        figures[ws] = {c: {"median_ms": 1e3 * medians[c], "ratio_to_1": medians[c] / medians[1]} for c in CHUNKS}
        for c in CHUNKS:
            print(f"tp={ws} overlap_chunks={c}: median {1e3 * medians[c]:.2f} ms, x{medians[c] / medians[1]:.3f} of chunks=1")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(figures, f, indent=1)
    return figures


if __name__ == "__main__":
    main()
