"""Rank side of the overlapped-prefill checks (test_overlapped_prefill.py): the chunked
sequence-parallel linears and model against the un-chunked ones, and the broken pipelines those
checks must reject."""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

import impl.overlap as overlap
from impl.architecture import Communicator, ModelConfig, PendingCollective
from impl.communication import CountingCommunicator, WrappingCommunicator
from impl.model import random_model
from impl.tensor_parallel import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear

HIDDEN = 16


class DeliveredOnWait(WrappingCommunicator):
    """`inner`'s collectives, but an asynchronous one's data lands in its buffer only when its
    wait() is called — the latest any transport may deliver — and the buffer holds NaN until
    then: a pipeline that reads a result it did not wait for reads NaN, deterministically (on
    gloo or NCCL it would read whatever had arrived yet)."""

    def __init__(self, inner: Communicator):
        self.inner = inner

    def all_gather_async(self, tensor, dim=-1, overlap_flops=0):
        shape = list(tensor.shape)
        shape[dim] *= self.world_size
        return self._deferred(shape, tensor, lambda: self.inner.all_gather(tensor, dim))

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        shape = list(tensor.shape)
        shape[dim] //= self.world_size
        return self._deferred(shape, tensor, lambda: self.inner.reduce_scatter(tensor, dim))

    @staticmethod
    def _deferred(shape, like, collective):
        buffer = torch.full(shape, float("nan"), dtype=like.dtype, device=like.device)

        class Delivery:
            def wait(self):
                buffer.copy_(collective())

        return PendingCollective(buffer, Delivery())


# --------------------------------------------------------------------------- broken pipelines


def _chunks_concatenated(x, weight, bias, comm, chunks):
    """The gathered chunks' outputs concatenated as they come: [r0 k0, r1 k0, r0 k1, ...], not sequence order."""
    length = x.shape[1] // chunks
    return torch.cat([F.linear(comm.all_gather(piece, 1), weight, bias) for piece in x.split(length, 1)], 1)


def _last_gather_unwaited(x, weight, bias, comm, chunks):
    """The real schedule, but the last chunk's all-gather buffer is read without waiting for it."""
    batch, local, _ = x.shape
    tp, length = comm.world_size, local // chunks
    pending = [comm.all_gather_async(piece, 1) for piece in x.split(length, 1)]
    gathered = [p.wait() for p in pending[:-1]] + [pending[-1].buffer]
    outputs = [F.linear(g, weight, bias).reshape(batch, tp, length, -1) for g in gathered]
    return torch.stack(outputs, 2).reshape(batch, tp * local, -1)


def _drain_unwaited(x, weight, comm, chunks):
    """The real schedule, but the last (drain) reduce-scatter's buffer is read without waiting for it."""
    batch, seq, inner = x.shape
    tp = comm.world_size
    length = seq // (tp * chunks)
    blocks = x.reshape(batch, tp, chunks, length, inner)
    pending = [comm.reduce_scatter_async(F.linear(blocks[:, :, k].reshape(batch, tp * length, inner), weight), 1) for k in range(chunks)]
    return torch.cat([p.wait() for p in pending[:-1]] + [pending[-1].buffer], 1)


def _regathers_shard(x, weight, bias, comm, chunks):
    """Right values, but each chunk all-gathers the whole shard and keeps its own chunk: chunks x the bytes."""
    batch, local, _ = x.shape
    tp, length = comm.world_size, local // chunks
    outputs = []
    for k in range(chunks):
        whole = comm.all_gather_async(x, 1, overlap_flops=0).wait().reshape(batch, tp, local, -1)
        piece = whole[:, :, k * length:(k + 1) * length].reshape(batch, tp * length, -1)
        outputs.append(F.linear(piece, weight, bias).reshape(batch, tp, length, -1))
    return torch.stack(outputs, 2).reshape(batch, tp * local, -1)


def _fill_annotated(x, weight, bias, comm, chunks):
    """The real pipeline, but the fill all-gather is recorded as overlapped (nothing computes beside it)."""
    real_gather = comm.all_gather_async
    flops = 2 * x.shape[0] * comm.world_size * (x.shape[1] // chunks) * weight.shape[0] * weight.shape[1]
    comm.all_gather_async = lambda t, dim=-1, overlap_flops=0: real_gather(t, dim, overlap_flops=overlap_flops or flops)
    try:
        return REAL["gather_linear"](x, weight, bias, comm, chunks)
    finally:
        del comm.all_gather_async


REAL = {"gather_linear": overlap.gather_linear, "linear_reduce_scatter": overlap.linear_reduce_scatter}
MUTANTS = {  # name: (function of impl.tensor_parallel it replaces, the broken one)
    "chunks_concatenated": ("gather_linear", _chunks_concatenated),
    "last_gather_unwaited": ("gather_linear", _last_gather_unwaited),
    "drain_unwaited": ("linear_reduce_scatter", _drain_unwaited),
    "regathers_shard": ("gather_linear", _regathers_shard),
    "fill_annotated": ("gather_linear", _fill_annotated),
}


@contextlib.contextmanager
def pipeline(mutant: str | None):
    """impl.tensor_parallel's chunked pipeline, or `mutant` in place of one of its two functions."""
    import impl.tensor_parallel as tp_layers

    if mutant is None:
        yield
        return
    name, broken = MUTANTS[mutant]
    setattr(tp_layers, name, broken)
    try:
        yield
    finally:
        setattr(tp_layers, name, REAL[name])


# --------------------------------------------------------------------------- checks


def integer_tensor(shape, generator) -> torch.Tensor:
    """float32 entries in {-2, ..., 2}: every product and partial sum of the layers below is an
    integer of magnitude <= 4 * 2 * HIDDEN < 2**24, exact in float32 in any summation order."""
    return torch.randint(-2, 3, shape, generator=generator).float()


def _layers(comm, generator):
    """Each SP linear kind, from integer-valued full weights: (name, layer, input (batch, seq or seq/tp, features))."""
    tp, g = comm.world_size, generator
    w = lambda *shape: integer_tensor(shape, g)  # noqa: E731
    kw = dict(sequence_parallel=True)
    return [
        ("column", ColumnParallelLinear.from_full(w(2 * HIDDEN, HIDDEN), comm, bias=w(2 * HIDDEN), **kw), "shard"),
        ("merged", MergedColumnParallelLinear.from_full([w(HIDDEN, HIDDEN), w(2 * HIDDEN, HIDDEN)], comm, **kw), "shard"),
        ("qkv", QKVParallelLinear.from_full(w(HIDDEN, HIDDEN), w(HIDDEN // 2, HIDDEN), w(HIDDEN // 2, HIDDEN), comm, head_dim=4, **kw), "shard"),
        ("row", RowParallelLinear.from_full(w(HIDDEN, 2 * HIDDEN), comm, bias=w(HIDDEN), **kw), "full"),
    ]


def _summary(records) -> dict:
    """Per kind: (count, total bytes); and the overlap_flops of every record in issue order."""
    kinds: dict[str, list[int]] = {}
    for r in records:
        kinds.setdefault(r.kind, [0, 0])
        kinds[r.kind][0] += 1
        kinds[r.kind][1] += r.nbytes
    return {"kinds": {k: tuple(v) for k, v in kinds.items()}, "overlap_flops": [r.overlap_flops for r in records]}


def layers_chunked_vs_unchunked(ctx, chunk_counts, seed: int, delivered_on_wait: bool = False, mutant: str | None = None) -> dict:
    """For each SP linear kind and each chunk count c: its output with overlap_chunks=1 and =c
    (no grad, integer-valued inputs), and each run's collective summary. batch 2, seq 8*tp."""
    g = torch.Generator().manual_seed(seed)
    counting = CountingCommunicator(DeliveredOnWait(ctx.comm) if delivered_on_wait else ctx.comm)
    tp, out = ctx.comm.world_size, {}
    with torch.no_grad(), pipeline(mutant):
        for name, layer, held in _layers(counting, g):
            seq = 8 * tp
            full = integer_tensor((2, seq, layer.in_features // (tp if name == "row" else 1)), torch.Generator().manual_seed(seed + 1))
            x = full if held == "full" else ctx.comm.shard(full, 1)
            runs = {}
            for c in (1, *chunk_counts):
                layer.overlap_chunks = c
                counting.reset()
                runs[c] = {"y": layer(x), **_summary(counting.records), "matmul_flops": 2 * x.shape[0] * seq * layer.weight.numel()}
            out[name] = runs
    return out


SMALL = ModelConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)


def rows_invariant(rows: list[int], inner: int, outer: int, seed: int) -> list[int]:
    """The row counts m among `rows` for which this machine's float32 F.linear of an (m, inner)
    input by an (outer, inner) weight does not give the same bits as the same rows of a
    (4*max(rows), inner) call: where it does not, the kernel's summation order depends on m."""
    g = torch.Generator().manual_seed(seed)
    x, w = torch.randn(4 * max(rows), inner, generator=g), torch.randn(outer, inner, generator=g)
    whole = F.linear(x, w)
    return [m for m in rows if not all(torch.equal(F.linear(x[s:s + m], w), whole[s:s + m]) for s in range(0, x.shape[0] - m + 1, m))]


def model_chunked_vs_unchunked(ctx, chunk_counts, batch: int, seq: int, seed: int) -> dict:
    """A small random model's prefill logits (batch, seq, vocab) with overlap_chunks=1 and each c,
    each run's collective summary, and the call shapes (rows, in, out) of its chunked matmuls
    whose row-count invariance failed on this rank (expected: none)."""
    counting = CountingCommunicator(ctx.comm)
    model = random_model(SMALL, counting, torch.float32, seed=seed, sequence_parallel=True).eval()
    ids = torch.randint(0, SMALL.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(seed))
    tp, out = ctx.comm.world_size, {}
    with torch.no_grad():
        for c in (1, *chunk_counts):
            model.overlap_chunks = c
            counting.reset()
            out[c] = {"logits": model(ids), **_summary(counting.records)}
    shapes = {(layer.weight.shape[1], layer.weight.shape[0]) for layer in model.modules() if isinstance(layer, (ColumnParallelLinear, RowParallelLinear))}
    rows = sorted({batch * seq // c for c in (1, *chunk_counts)})  # rows per call: batch * tp * seq/(tp*c)
    out["not_row_invariant"] = [(m, i, o) for i, o in sorted(shapes) for m in rows_invariant(rows, i, o, seed)]
    return out
