"""Deliberately broken rank-side implementations. The policy must reject every one of them;
if it did not, a passing suite would prove nothing."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.cases import build_layer, forward_backward
from impl.architecture import parse_dtype
from impl.communication import NullCommunicator, reduce_from_parallel


class _ClaimsRank:
    """The real communicator, but sharding as if this were another rank."""

    def __init__(self, comm, rank):
        self.inner, self.rank, self.world_size = comm, rank, comm.world_size

    def __getattr__(self, name):
        return getattr(self.inner, name)


def _run(ctx, case, layer):
    return forward_backward(layer.to(ctx.device), case, parse_dtype(case.dtype), ctx.comm)


def no_collectives(ctx, case):
    """Every collective dropped (each rank keeps its partial result)."""
    comm = NullCommunicator(ctx.world_size, ctx.rank)
    out = forward_backward(build_layer(case, comm, parse_dtype(case.dtype)).to(ctx.device), case, parse_dtype(case.dtype), comm)
    return {**out, "collectives": []}


def shifted_shard(ctx, case):
    """Each rank loads its neighbour's shard."""
    dtype = parse_dtype(case.dtype)
    layer = build_layer(case, _ClaimsRank(ctx.comm, (ctx.rank + 1) % ctx.world_size), dtype)
    return {**_run(ctx, case, layer), "collectives": []}


def bias_every_rank(ctx, case):
    """Row-parallel bias added before the all-reduce, i.e. tp times."""
    layer = build_layer(case, ctx.comm, parse_dtype(case.dtype))
    layer.forward = lambda x: reduce_from_parallel(F.linear(x.chunk(ctx.world_size, -1)[ctx.rank], layer.weight, layer.bias).contiguous(), ctx.comm)
    return {**_run(ctx, case, layer), "collectives": []}


def kv_head_of_rank0(ctx, case):
    """Every rank uses rank 0's kv heads (a GQA routing bug)."""
    dtype = parse_dtype(case.dtype)
    layer = build_layer(case, ctx.comm, dtype)
    wrong = build_layer(case, _ClaimsRank(ctx.comm, 0), dtype)
    q_rows = layer.local_heads * layer.head_dim
    with torch.no_grad():
        layer.weight[q_rows:] = wrong.weight[q_rows:]
    return {**_run(ctx, case, layer), "collectives": []}


def replicated_grad_off_rank0(ctx, case):
    """The real implementation, but ranks other than 0 end with a different gradient for the
    replicated parameters (norm weights, row-parallel bias), e.g. a per-rank partial never
    summed: the gathered gradients come from rank 0 only, so only the rank check sees it."""
    from harness.cases import replicated_grad_names, run_on_rank

    out = run_on_rank(ctx, case)
    if ctx.rank:
        for name in replicated_grad_names(case, out["grads"]):
            out["grads"][name] = out["grads"][name] * 0.5
    return out
