"""The overlapped sequence-parallel prefill (impl/overlap.py) computes exactly what the
un-chunked one does, moves the same bytes in `chunks` times as many collectives, and marks every
transfer but the pipeline's fill (all-gather) / drain (reduce-scatter) as overlapped.

Why equality is exact, and where. Chunking along tokens changes no element's arithmetic: each
output row is one input row times W^T (column-parallel), or the tp-way sum of such rows, summed by
the same reduce-scatter block as before (row-parallel). Only the number of rows in each matmul
call changes, and on this machine's MKL sgemm that changes the bits of small calls: with 1 thread
per rank, calls of m <= 3 rows; with 2 threads, m < 12 unless m is 4 or 8 (MKL's small-m kernels
sum over k in another order than its blocked kernel does). Hence:
  * the layer checks use integer-valued inputs and weights (|entry| <= 2, so every partial sum is
    an integer far below 2**24): exact in float32 whatever the kernel's order, so they hold on any
    BLAS, at any rows per call;
  * the model check (random float weights) keeps every chunked call at >= 16 rows, and first
    asserts on each rank that this machine's F.linear gives those row counts the same bits as a
    larger call: the premise of its exact equality is measured, not assumed.
"""
from __future__ import annotations

import pytest
import torch

import impl.model
import impl.tensor_parallel as tp_layers
from impl.architecture import TPConfigError
from impl.communication import CountingCommunicator, NullCommunicator
from impl.model import random_model
from impl.tensor_parallel import ColumnParallelLinear, OverlapChunks

from . import overlap_rank_fns
from .overlap_rank_fns import MUTANTS, SMALL

CHUNKS = (2, 4)


def _expected_overlap_flops(kind: str, chunks: int, matmul_flops: int) -> list[int]:
    """All-gather -> matmul: the fill exposed, AG(k+1) beside matmul(k); matmul -> reduce-scatter:
    RS(k) beside matmul(k+1), the drain exposed. One chunk's matmul is 1/chunks of the layer's."""
    per_chunk = [matmul_flops // chunks] * (chunks - 1)
    return [0, *per_chunk] if kind == "all_gather" else [*per_chunk, 0]


def _check_runs(rank: int, name: str, runs: dict, output: str) -> None:
    base = runs[1]
    assert not any(base["overlap_flops"]), f"rank {rank} {name}: an un-chunked collective recorded as overlapped"
    for c in [c for c in runs if c != 1]:
        run = runs[c]
        assert torch.equal(run[output], base[output]), f"rank {rank} {name}: overlap_chunks={c} differs from the un-chunked path"
        assert run["kinds"].keys() == base["kinds"].keys(), f"rank {rank} {name}: collective kinds {run['kinds']} != {base['kinds']}"
        for kind, (count, nbytes) in base["kinds"].items():
            chunked_count, chunked_bytes = run["kinds"][kind]
            assert chunked_bytes == nbytes, f"rank {rank} {name}: overlap_chunks={c} moves {chunked_bytes} bytes of {kind}, un-chunked {nbytes}"
            if "matmul_flops" in run:  # a layer: one collective, cut in c
                assert chunked_count == c * count, f"rank {rank} {name}: {chunked_count} {kind}s at overlap_chunks={c}, expected {c * count}"
        if "matmul_flops" in run:
            (kind,) = run["kinds"]
            expected = _expected_overlap_flops(kind, c, run["matmul_flops"])
            assert run["overlap_flops"] == expected, f"rank {rank} {name}: overlap_flops {run['overlap_flops']} at overlap_chunks={c}, expected {expected}"


def _check_layers(world, delivered_on_wait: bool, mutant: str | None = None, chunk_counts=CHUNKS) -> None:
    results = world.run(overlap_rank_fns.layers_chunked_vs_unchunked, chunk_counts, 7, delivered_on_wait, mutant)
    for rank, layers in enumerate(results):
        for name, runs in layers.items():
            _check_runs(rank, name, runs, "y")


@pytest.mark.parametrize("world_size", (2, 4))
def test_chunked_layers_equal_unchunked(world_size, worlds):
    """Column, merged, QKV and row-parallel SP linears at chunks 2 and 4: over gloo's asynchronous
    collectives, and with every transfer delivered only at its wait (DeliveredOnWait)."""
    for delivered_on_wait in (False, True):
        _check_layers(worlds[world_size], delivered_on_wait)


MUTANT_MESSAGES = {
    "chunks_concatenated": "differs from the un-chunked path",
    "last_gather_unwaited": "differs from the un-chunked path",
    "drain_unwaited": "differs from the un-chunked path",
    "regathers_shard": "bytes of all_gather",
    "fill_annotated": "overlap_flops",
}


@pytest.mark.parametrize("mutant", sorted(MUTANTS))
def test_broken_pipeline_is_rejected(mutant, worlds):
    with pytest.raises(AssertionError, match=MUTANT_MESSAGES[mutant]):
        _check_layers(worlds[2], delivered_on_wait=True, mutant=mutant, chunk_counts=(2,))


@pytest.mark.parametrize("world_size", (2, 4))
def test_chunked_model_prefill_equals_unchunked(world_size, worlds):
    """A small model's whole prefill (batch 2, seq 32: >= 16 rows in every chunked matmul call)."""
    for rank, out in enumerate(worlds[world_size].run(overlap_rank_fns.model_chunked_vs_unchunked, CHUNKS, 2, 32, 3)):
        assert out.pop("not_row_invariant") == [], (f"rank {rank}: this machine's float32 F.linear changes bits with the rows per call at "
                                                    "these (rows, in, out), so chunked and un-chunked prefill cannot be compared exactly here")
        _check_runs(rank, "model", out, "logits")
        for c in CHUNKS:  # every SP linear (4 per layer) cut in c, the rest (embedding, final gathers) not
            assert len(out[c]["overlap_flops"]) == len(out[1]["overlap_flops"]) + 4 * SMALL.num_layers * (c - 1)
            assert sum(f > 0 for f in out[c]["overlap_flops"]) == 4 * SMALL.num_layers * (c - 1)


# --------------------------------------------------------------------------- settings (one process, no world)


def _refused_before_collective(model, ids) -> bool:
    """Whether model(ids) raises TPConfigError naming overlap_chunks before any collective is issued."""
    model.comm.reset()
    try:
        with torch.no_grad():
            model(ids)
    except TPConfigError as e:
        return e.argument == "overlap_chunks" and model.comm.records == []
    return False


def test_bad_overlap_chunks_refused_before_any_collective(monkeypatch):
    comm = CountingCommunicator(NullCommunicator(2, 0))
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(TPConfigError, match="overlap_chunks"):
            ColumnParallelLinear(8, 8, comm, sequence_parallel=True, overlap_chunks=bad)
        with pytest.raises(TPConfigError, match="overlap_chunks"):
            random_model(SMALL, comm, torch.float32).overlap_chunks = bad
    layer = ColumnParallelLinear(8, 8, comm, sequence_parallel=True, overlap_chunks=3)
    with torch.no_grad(), pytest.raises(TPConfigError, match="seq/tp=4"):
        layer(torch.zeros(1, 4, 8))
    assert comm.records == []
    model = random_model(SMALL, comm, torch.float32, sequence_parallel=True, overlap_chunks=3)
    ids = torch.zeros(1, 8, dtype=torch.long)  # seq/tp = 4
    assert _refused_before_collective(model, ids)
    # the mutant: only the layers check, so the embedding's reduce-scatter has run when they refuse
    monkeypatch.setattr(impl.model, "check_chunks", lambda chunks, tokens: None)
    assert not _refused_before_collective(model, ids)


def _pipeline_calls(monkeypatch) -> list:
    calls = []
    for name in ("gather_linear", "linear_reduce_scatter"):
        monkeypatch.setattr(tp_layers, name, lambda *a, _name=name, **k: calls.append(_name))
    return calls


def _unchunked(monkeypatch, comm, x, grad: bool) -> bool:
    """Whether a chunks=2 SP column layer on `comm` runs x without the chunked pipeline."""
    calls = _pipeline_calls(monkeypatch)
    layer = ColumnParallelLinear(8, 8, comm, sequence_parallel=True, overlap_chunks=2)
    with torch.set_grad_enabled(grad):
        layer(x.requires_grad_(grad))
    monkeypatch.undo()
    return calls == []


def test_world_size_one_and_gradients_take_the_unchunked_path(monkeypatch):
    """At tp = 1 there is nothing to overlap, and a forward that needs a gradient keeps the autograd
    region pair: neither may enter the chunked pipeline. A chunks=2 world-size-2 inference forward
    (the control) does."""
    x = torch.zeros(1, 4, 8)
    assert _unchunked(monkeypatch, NullCommunicator(1, 0), x.clone(), grad=False)
    assert _unchunked(monkeypatch, NullCommunicator(2, 0), x.clone(), grad=True)
    assert not _unchunked(monkeypatch, NullCommunicator(2, 0), x.clone(), grad=False)
    # the mutant: chunking whatever the world size
    monkeypatch.setattr(OverlapChunks, "overlapped", lambda self, x: self.sequence_parallel and self.overlap_chunks > 1)
    calls = _pipeline_calls(monkeypatch)
    with torch.no_grad():
        ColumnParallelLinear(8, 8, NullCommunicator(1, 0), sequence_parallel=True, overlap_chunks=2)(x)
    assert calls == ["gather_linear"]
