"""Which all-reduce algorithm a message of a given size takes on the low-latency communicator.

Decode all-reduces are small ((batch, hidden) activations: 8 KiB for one Llama-3-8B token in
bf16), so their time is almost all fixed latency: NCCL's ring pays a kernel launch plus 2(w-1)
synchronised steps. Over peer-to-peer buffers (symmetric memory, no NVLink multicast):
  one_shot   every rank reads all w inputs and sums them: one step, w x the bytes read per rank;
  two_shot   a reduce-scatter then an all-gather over the same buffers: two steps, bytes as a ring;
  nccl       large messages, where bandwidth dominates and NCCL's ring is as good.
The thresholds are one definition, read by the communicator that runs the algorithm and by the
cost model that prices it (harness/perf_model.py), so a projection prices what would run.
"""
from __future__ import annotations

from .architecture import require

ALGORITHMS = ("one_shot", "two_shot", "nccl")
# Bytes of the reduced tensor (per rank). One-shot reads w x the message per rank, so its edge over
# two-shot ends where that read costs more than a step's latency (~256 KiB on NVLink 4, as in
# vLLM's and TensorRT-LLM's custom all-reduce heuristics); beyond a few MiB the ring wins.
ONE_SHOT_MAX_BYTES = 256 * 1024
TWO_SHOT_MAX_BYTES = 8 * 1024 * 1024


def choose_all_reduce(nbytes: int, world_size: int) -> str:
    """The algorithm the low-latency communicator runs for an all-reduce of `nbytes` per rank
    on `world_size` ranks: one_shot, two_shot or nccl (see the module doc)."""
    require(isinstance(nbytes, int) and nbytes >= 0, "nbytes", nbytes, "must be an integer >= 0")
    require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
    if world_size == 1:
        return "nccl"  # nothing to sum: the communicator returns its input, as NCCL's path does
    if nbytes <= ONE_SHOT_MAX_BYTES:
        return "one_shot"
    return "two_shot" if nbytes <= TWO_SHOT_MAX_BYTES else "nccl"
