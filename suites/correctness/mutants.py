"""Deliberately broken rank-side implementations. The policy must reject every one of them;
if it did not, a passing suite would prove nothing."""
from __future__ import annotations

from dataclasses import replace

import torch
import torch.distributed as dist
import torch.nn.functional as F

from harness.cases import build_layer, forward_backward, run_on_rank
from impl.architecture import parse_dtype
from impl.communication import NullCommunicator, ProcessGroupCommunicator, reduce_from_parallel
from harness.runtime.orchestrator import ProcessGroupManager


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
        for name in replicated_grad_names(out):
            out["grads"][name] = out["grads"][name] * 0.5
    return out


# --------------------------------------------------------------------------- TP groups inside a larger world


class GlobalRankCommunicator(ProcessGroupCommunicator):
    """The TP group's collectives, but its rank derived from the global rank: right for
    contiguous groups ({0,1},{2,3}: global % tp is the TP rank), wrong for strided ones."""

    def __init__(self, group):
        super().__init__(group)
        self.rank = dist.get_rank() % self.world_size


class UngroupedAllReduceCommunicator(ProcessGroupCommunicator):
    """all_reduce issued without `group=`, i.e. over the whole world (it sums the partials of
    every TP group); the records still name the TP group, only the values can tell."""

    def all_reduce(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor


def world_communicator(ctx) -> ProcessGroupCommunicator:
    """A communicator over the world group where the TP group's was meant (ProcessGroupCommunicator()'s default)."""
    return ProcessGroupCommunicator()


MUTANT_COMMUNICATORS = {
    "global_rank": lambda ctx: GlobalRankCommunicator(ctx.manager.tp_group),
    "ungrouped_all_reduce": lambda ctx: UngroupedAllReduceCommunicator(ctx.manager.tp_group),
    "world_group": world_communicator,
}


def on_mutant_communicator(ctx, mutant: str, fn, *args):
    """fn(ctx, *args) with ctx.comm replaced by MUTANT_COMMUNICATORS[mutant]: any rank function
    (a layer case, a whole model) run over that broken communicator."""
    return fn(replace(ctx, comm=MUTANT_COMMUNICATORS[mutant](ctx)), *args)


def tp_rank_from_global_rank(ctx, case):
    return on_mutant_communicator(ctx, "global_rank", run_on_rank, case)


def all_reduce_without_group(ctx, case):
    return on_mutant_communicator(ctx, "ungrouped_all_reduce", run_on_rank, case)


def collectives_over_world_group(ctx, case):
    return on_mutant_communicator(ctx, "world_group", run_on_rank, case)


class LayoutDroppedManager(ProcessGroupManager):
    """Accepts tp_layout but does not pass it on (a wrapper forwarding every argument but the
    new one): contiguous groups whatever was asked, while `tp_layout` reports the request."""

    def __init__(self, world_size, rank, *, tp_layout="contiguous", **kw):
        super().__init__(world_size, rank, **kw)
        self.tp_layout = tp_layout
