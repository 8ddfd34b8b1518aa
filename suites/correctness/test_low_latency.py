"""The low-latency all-reduce (impl/low_latency.py, ADR-31): the algorithm by message size, the
symmetric-memory path where the hardware has it, and the clean fallback everywhere else.

On CPU (CI) the communicator must fall back, say why, and sum exactly as the plain communicator
does at TP 2 and 4. On one GPU the symmetric buffer must build and its one-shot and two-shot
kernels run at world size 1, eagerly and inside a CUDA graph, and one-shot compiles into a whole graph. Equality with NCCL across ranks
needs two or more GPUs (harness/sweeps/four_gpu.sh runs it there) and skips here with the reason.
Every result is checked against the exact (float64) sum of all ranks' inputs, which each rank
rebuilds from their seeds, within w*u*max sum|x_r| (w terms summed in any order, then rounded:
ADR-5's model); the fallback must also equal the plain communicator bit for bit (it is the same
call). The symmetric kernels sum in another order than NCCL's ring, so across GPUs only the bound
holds, and every rank must hold the same bits (a replicated activation must not drift)."""
from __future__ import annotations

import pytest
import torch

from impl.architecture import TPConfigError
from impl.low_latency import ONE_SHOT_MAX_BYTES, TWO_SHOT_MAX_BYTES, choose_all_reduce

from . import low_latency_rank_fns as fns


@pytest.mark.parametrize("nbytes, world_size, expected", [
    (8192, 4, "one_shot"), (ONE_SHOT_MAX_BYTES, 2, "one_shot"), (ONE_SHOT_MAX_BYTES + 16, 4, "two_shot"),
    (TWO_SHOT_MAX_BYTES, 4, "two_shot"), (TWO_SHOT_MAX_BYTES + 16, 8, "nccl"), (8192, 1, "nccl"),
])
def test_algorithm_by_message_size(nbytes, world_size, expected):
    assert choose_all_reduce(nbytes, world_size) == expected


@pytest.mark.parametrize("nbytes, world_size, argument", [(-1, 2, "nbytes"), (8, 0, "world_size"), (8.0, 2, "nbytes")])
def test_bad_sizes_name_the_argument(nbytes, world_size, argument):
    with pytest.raises(TPConfigError, match=argument):
        choose_all_reduce(nbytes, world_size)


# decode-sized (one_shot) and a prefill-sized tensor (two_shot on the GPU path), twice each: a reused buffer
SHAPES = [(1, 4096), (3, 5, 7), (1, 4096), (128, 1024)]


@pytest.mark.parametrize("world_size", (2, 4))
def test_falls_back_where_there_is_no_symmetric_memory(world_size, worlds, device):
    if device == "cuda":
        pytest.skip("ranks share one GPU over gloo here; the symmetric path is checked by the GPU tests")
    results = worlds[world_size].run(fns.low_latency_vs_process_group, SHAPES, torch.float32)
    for r in results:
        assert r["fallback_reason"] and "needs CUDA" in r["fallback_reason"], r
        assert r["algorithms"] == ["nccl"] * len(SHAPES), r  # no buffer: every call takes the plain path
        assert all(r["equal"]), r
        assert all(err <= bound for err, bound in r["errors"]), r
        assert r["skipped_peers"][0] > r["skipped_peers"][1], r  # the bound rejects a sum that missed the peers


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="symmetric memory needs a CUDA device")


@needs_cuda
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_symmetric_path_builds_and_runs_on_one_gpu(dtype, worlds, device):
    if device != "cuda":
        pytest.skip("run with --tpgate-device cuda")
    (r,) = worlds[1].run(fns.symmetric_path_at_world_size_one, (1, 4096), dtype)
    assert r["fallback_reason"] is None, r
    assert all(v for k, v in r.items() if k.endswith("_equal")) and len(r) == 6, r


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="equality with NCCL across ranks needs >= 2 GPUs (one rank per GPU)")
@pytest.mark.parametrize("world_size", (2, 4))
def test_symmetric_sums_equal_nccl(world_size, worlds, device):
    if world_size > torch.cuda.device_count() or device != "cuda":
        pytest.skip(f"needs {world_size} GPUs and --tpgate-device cuda")
    results = worlds[world_size].run(fns.low_latency_vs_process_group, SHAPES, torch.float32)
    for r in results:
        assert r["fallback_reason"] is None, r
        assert r["algorithms"][0] == "one_shot" and r["algorithms"][-1] == "two_shot", r
        assert all(err <= bound for err, bound in r["errors"]), r
    assert all(r["errors"] == results[0]["errors"] for r in results), results  # same bits on every rank
