"""Sequence-parallel linears with their collectives pipelined against the matmul, in token chunks.

Inference only: the layers call these when no gradient is needed (a forward that needs one runs
the autograd region pair of impl.communication unchanged, un-chunked).

Token layout. Rank r holds x_r = tokens [r*S/tp, (r+1)*S/tp) of the sequence (dim 1). Cut into
`chunks` = c pieces of L = S/(tp*c) tokens, chunk k of rank r is tokens r*S/tp + [k*L, (k+1)*L).
All-gathering chunk k gives [rank 0's chunk k, ..., rank tp-1's chunk k] (tp*L tokens): not a
contiguous range of the sequence, but every token of it exactly once across k. Splitting along
tokens changes no element's arithmetic (each output row is one row of x times W^T): the result
equals the un-chunked one wherever the matmul kernel's result for a row does not depend on how
many rows the call holds (suites/correctness/test_overlapped_prefill.py says where that holds).

Schedule (one transfer in flight beside one matmul):
  gather_linear          AG(0); then for k: issue AG(k+1), wait AG(k), matmul(k)
  linear_reduce_scatter  for k: matmul(k), issue RS(k), wait RS(k-1); wait RS(c-1)
Each collective is issued with `overlap_flops`, the matmul FLOPs computed while it is in flight:
AG(k+1) beside matmul(k), RS(k) beside matmul(k+1); AG(0) (the fill) and RS(c-1) (the drain) are
exposed (0). Bytes moved equal the un-chunked collective's, in c collectives.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .architecture import Communicator, require


def check_chunk_count(chunks) -> None:
    """TPConfigError unless `chunks` (overlap_chunks) is an integer >= 1."""
    require(isinstance(chunks, int) and not isinstance(chunks, bool) and chunks >= 1, "overlap_chunks", chunks, "must be an integer >= 1")


def check_chunks(chunks, local_tokens: int) -> None:
    """TPConfigError unless `chunks` (overlap_chunks) is an integer >= 1 dividing the local sequence length."""
    check_chunk_count(chunks)
    require(local_tokens % chunks == 0, "overlap_chunks", chunks,
            f"must divide the local sequence length seq/tp={local_tokens} (each chunk is seq/(tp*overlap_chunks) tokens)")


def _matmul_flops(rows: int, weight: torch.Tensor) -> int:
    return 2 * rows * weight.shape[0] * weight.shape[1]


def gather_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, comm: Communicator, chunks: int) -> torch.Tensor:
    """F.linear(all_gather(x, dim 1), weight, bias), the all-gather pipelined with the matmul.

    x: (batch, S/tp, in_features), this rank's sequence shard. weight: (out_local, in_features).
    Returns (batch, S, out_local) in sequence order, contiguous."""
    batch, local, _ = x.shape
    check_chunks(chunks, local)
    tp, length = comm.world_size, local // chunks
    flops = _matmul_flops(batch * tp * length, weight)  # one chunk's matmul
    pieces = x.split(length, dim=1)
    pending = comm.all_gather_async(pieces[0], 1, overlap_flops=0)  # the fill: nothing to compute beside it yet
    outputs = []
    for k in range(chunks):
        current = pending
        if k + 1 < chunks:
            pending = comm.all_gather_async(pieces[k + 1], 1, overlap_flops=flops)
        y = F.linear(current.wait(), weight, bias)  # (batch, tp*L, out): rank-major, L tokens each
        outputs.append(y.reshape(batch, tp, length, -1))
    # (batch, tp, c, L, out): rank r's chunk k is tokens r*S/tp + k*L + [0, L)
    return torch.stack(outputs, dim=2).reshape(batch, tp * local, -1)


def linear_reduce_scatter(x: torch.Tensor, weight: torch.Tensor, comm: Communicator, chunks: int) -> torch.Tensor:
    """reduce_scatter(F.linear(x, weight), dim 1), the reduce-scatter pipelined with the matmul.

    x: (batch, S, in_local), the full sequence. weight: (out_features, in_local).
    Returns (batch, S/tp, out_features): this rank's sequence shard of the summed partials."""
    batch, seq, inner = x.shape
    tp = comm.world_size
    require(seq % tp == 0, "sequence length", seq, f"must be a multiple of tp={tp} to reduce-scatter")
    check_chunks(chunks, seq // tp)
    length = seq // (tp * chunks)
    flops = _matmul_flops(batch * tp * length, weight)
    blocks = x.reshape(batch, tp, chunks, length, inner)  # [:, r, k]: rank r's chunk k
    results, in_flight = [], None
    for k in range(chunks):
        y = F.linear(blocks[:, :, k].reshape(batch, tp * length, inner), weight)
        # RS(k) runs beside matmul(k+1); the last one (the drain) beside nothing
        issued = comm.reduce_scatter_async(y, 1, overlap_flops=flops if k + 1 < chunks else 0)
        if in_flight is not None:
            results.append(in_flight.wait())
        in_flight = issued
    results.append(in_flight.wait())
    return torch.cat(results, dim=1)
