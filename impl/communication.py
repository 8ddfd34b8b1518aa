"""All communication of `impl/`: communicators and the autograd-aware regions.

This is the only module in `impl/` that calls torch.distributed collectives. Layers call
the region functions below; each region is a named autograd pair (Megatron's
copy-to / reduce-from / gather-from / scatter-to, plus the sequence-parallel pair), so the
backward pass communicates exactly what the forward pass's transpose needs.

Region               forward                    backward
copy_to_parallel     identity                   all-reduce
reduce_from_parallel all-reduce                 identity
gather_from_parallel all-gather(dim)            keep own slice(dim)
scatter_to_parallel  keep own slice(dim)        all-gather(dim)
reduce_scatter_to_sequence  reduce-scatter(dim) all-gather(dim)
gather_from_sequence all-gather(dim)            reduce-scatter(dim)
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.distributed._functional_collectives as funcol

from .architecture import Communicator, PendingCollective, require

# torch >= 2.12 renamed the tensor variants; 2.5-2.11 only have the old names.
_all_gather_tensor = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_tensor = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _move_to_front(tensor: torch.Tensor, dim: int) -> torch.Tensor:
    return tensor.movedim(dim, 0).contiguous()


class ProcessGroupCommunicator(Communicator):
    """Collectives over a torch.distributed process group (NCCL or gloo); None: the world.

    `rank` and `world_size` are this process's rank in the group and the group's size;
    `global_ranks` are the group's members as global ranks, in group-rank order."""

    def __init__(self, group: dist.ProcessGroup | None = None):
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)
        self.global_ranks = tuple(dist.get_process_group_ranks(dist.group.WORLD if group is None else group))

    def all_reduce(self, tensor):
        if self.world_size > 1:
            dist.all_reduce(tensor, group=self.group)
        return tensor

    def all_gather(self, tensor, dim=-1):
        return self._all_gather(tensor, dim, async_op=False).wait()

    def reduce_scatter(self, tensor, dim=0):
        return self._reduce_scatter(tensor, dim, async_op=False).wait()

    def all_gather_async(self, tensor, dim=-1, overlap_flops=0):
        """The all-gather started on the transport (NCCL's stream, gloo's worker thread)."""
        if torch.compiler.is_compiling() and self.world_size > 1:
            return self._traced(funcol.all_gather_tensor(_move_to_front(tensor, dim % tensor.dim()), 0, self._traced_group()), dim % tensor.dim())
        return self._all_gather(tensor, dim, async_op=True)

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        """The reduce-scatter started on the transport (NCCL's stream, gloo's worker thread)."""
        if torch.compiler.is_compiling() and self.world_size > 1:
            dim = dim % tensor.dim()
            require(tensor.shape[dim] % self.world_size == 0, f"tensor.shape[{dim}]", tensor.shape[dim], f"must be a multiple of world_size={self.world_size} to reduce-scatter")
            return self._traced(funcol.reduce_scatter_tensor(_move_to_front(tensor, dim), "sum", 0, self._traced_group()), dim)
        return self._reduce_scatter(tensor, dim, async_op=True)

    # torch.compile cannot trace async_op=True (a graph break per collective): traced, the
    # functional collective is issued where called and waited where wait() is called, which
    # keeps the pipeline's order in the graph.
    def _traced_group(self):
        return self.group if self.group is not None else dist.group.WORLD

    @staticmethod
    def _traced(issued: torch.Tensor, dim: int) -> PendingCollective:
        return PendingCollective(issued, None, lambda done: funcol.wait_tensor(done).movedim(0, dim))

    def _all_gather(self, tensor, dim, async_op):
        if self.world_size == 1:
            return PendingCollective(tensor)
        dim = dim % tensor.dim()
        front = _move_to_front(tensor, dim)
        out = front.new_empty((self.world_size * front.shape[0], *front.shape[1:]))
        work = _all_gather_tensor(out, front, group=self.group, async_op=async_op)
        return PendingCollective(out, work, lambda done: done.movedim(0, dim), keep_alive=(front,))

    def _reduce_scatter(self, tensor, dim, async_op):
        if self.world_size == 1:
            return PendingCollective(tensor)
        dim = dim % tensor.dim()
        require(tensor.shape[dim] % self.world_size == 0, f"tensor.shape[{dim}]", tensor.shape[dim], f"must be a multiple of world_size={self.world_size} to reduce-scatter")
        front = _move_to_front(tensor, dim)
        out = front.new_empty((front.shape[0] // self.world_size, *front.shape[1:]))
        work = _reduce_scatter_tensor(out, front, group=self.group, async_op=async_op)
        return PendingCollective(out, work, lambda done: done.movedim(0, dim), keep_alive=(front,))

    def broadcast(self, tensor, src=0):
        if self.world_size > 1:
            dist.broadcast(tensor, src=dist.get_global_rank(self.group, src) if self.group else src, group=self.group)
        return tensor

    def barrier(self):
        if self.world_size > 1:
            dist.barrier(group=self.group)


class NullCommunicator(Communicator):
    """Collectives that move no data between ranks, for one rank's share of a TP run.

    Shapes are those of a real `world_size`-way run, so one device can execute rank
    `rank`'s shard alone: all-reduce returns its input, all-gather tiles the local chunk
    and reduce-scatter keeps this rank's slice. The tiling/slicing does the local memory
    traffic of the collective's output, not the transfer. Values are therefore wrong for
    world_size > 1; use it for timing (T_null in the exposed-communication metric) and as
    the world-size-1 baseline, where it is exact.
    """

    def __init__(self, world_size: int = 1, rank: int = 0):
        require(isinstance(world_size, int) and world_size >= 1, "world_size", world_size, "must be an integer >= 1")
        require(isinstance(rank, int) and 0 <= rank < world_size, "rank", rank, f"must be in [0, {world_size})")
        self.world_size, self.rank = world_size, rank

    def all_reduce(self, tensor):
        return tensor

    def all_gather(self, tensor, dim=-1):
        if self.world_size == 1:
            return tensor
        reps = [1] * tensor.dim()
        reps[dim % tensor.dim()] = self.world_size
        return tensor.repeat(*reps)

    def reduce_scatter(self, tensor, dim=0):
        return self.shard(tensor, dim) if self.world_size > 1 else tensor

    def broadcast(self, tensor, src=0):
        return tensor

    def barrier(self):
        pass


@dataclass
class CollectiveRecord:
    kind: str
    nbytes: int  # bytes of the tensor this rank contributes (input of the collective)
    shape: tuple
    dtype: str
    group_ranks: tuple = ()  # global ranks of the group it ran on; () for a communicator without a process group
    # matmul FLOPs (2*m*n*k) the issuing code computes while this transfer is in flight; 0: the
    # transfer is exposed (every synchronous collective, a pipeline's fill or drain chunk)
    overlap_flops: int = 0


class WrappingCommunicator(Communicator):
    """Base of a communicator that wraps another, `inner`: its rank and world size are the inner
    one's, and every collective a subclass does not override passes to it unchanged."""

    inner: Communicator

    @property
    def rank(self):
        return self.inner.rank

    @property
    def world_size(self):
        return self.inner.world_size

    def all_reduce(self, tensor):
        return self.inner.all_reduce(tensor)

    def all_gather(self, tensor, dim=-1):
        return self.inner.all_gather(tensor, dim)

    def reduce_scatter(self, tensor, dim=0):
        return self.inner.reduce_scatter(tensor, dim)

    def all_gather_async(self, tensor, dim=-1, overlap_flops=0):
        return self.inner.all_gather_async(tensor, dim, overlap_flops=overlap_flops)

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        return self.inner.reduce_scatter_async(tensor, dim, overlap_flops=overlap_flops)

    def broadcast(self, tensor, src=0):
        return self.inner.broadcast(tensor, src)

    def barrier(self):
        self.inner.barrier()


@dataclass
class CountingCommunicator(WrappingCommunicator):
    """Wraps a communicator and records every collective's kind, input bytes and group
    (the wrapped communicator's `global_ranks`, where it has them)."""

    inner: Communicator
    records: list[CollectiveRecord] = field(default_factory=list)

    def _record(self, kind, tensor, overlap_flops=0):
        if torch.compiler.is_compiling():  # a traced graph replays without Python: count eager runs only
            return
        self.records.append(CollectiveRecord(kind, tensor.numel() * tensor.element_size(), tuple(tensor.shape), str(tensor.dtype), self._group_ranks(),
                                             int(overlap_flops)))

    def _group_ranks(self) -> tuple:
        return tuple(getattr(self.inner, "global_ranks", ()))

    def counts(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for r in self.records:
            out[r.kind] = out.get(r.kind, 0) + 1
        return out

    def reset(self):
        self.records.clear()

    def all_reduce(self, tensor):
        self._record("all_reduce", tensor)
        return self.inner.all_reduce(tensor)

    def all_gather(self, tensor, dim=-1):
        self._record("all_gather", tensor)
        return self.inner.all_gather(tensor, dim)

    def reduce_scatter(self, tensor, dim=0):
        self._record("reduce_scatter", tensor)
        return self.inner.reduce_scatter(tensor, dim)

    def all_gather_async(self, tensor, dim=-1, overlap_flops=0):
        self._record("all_gather", tensor, overlap_flops)
        return self.inner.all_gather_async(tensor, dim, overlap_flops=overlap_flops)

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        self._record("reduce_scatter", tensor, overlap_flops)
        return self.inner.reduce_scatter_async(tensor, dim, overlap_flops=overlap_flops)

    def broadcast(self, tensor, src=0):
        self._record("broadcast", tensor)
        return self.inner.broadcast(tensor, src)

    def barrier(self):
        self.records.append(CollectiveRecord("barrier", 0, (), "", self._group_ranks()))
        self.inner.barrier()


class ReduceInDtypeCommunicator(WrappingCommunicator):
    """Wraps a communicator so that reductions sum in `reduce_dtype` (default float32).

    all_reduce / reduce_scatter (and reduce_scatter_async) of a floating tensor narrower than
    `reduce_dtype` (bfloat16, float16 under float32) upcast it, reduce through `inner`, and cast
    the result back to the input's dtype: the tp - 1 additions of the collective then round
    once, at the end, instead of after every addition in the narrow dtype (each rank's partial
    is still the narrow value its matmul produced). all_reduce writes the result back into its
    input and returns it, as the contract allows and the autograd region (which marks its
    input dirty) needs. Tensors already at least as wide as `reduce_dtype`, integer tensors,
    and every collective at world_size 1 pass to `inner` untouched, so a TP=1 run (a
    NullCommunicator) is bitwise unchanged; all-gather, broadcast and barrier move data
    without arithmetic and pass through. `reductions` counts the reductions at world_size > 1
    (each ran in `reduce_dtype` or wider): evidence, for a caller, that a model's reductions go
    through this communicator."""

    def __init__(self, inner: Communicator, reduce_dtype: torch.dtype = torch.float32):
        require(isinstance(reduce_dtype, torch.dtype) and reduce_dtype.is_floating_point, "reduce_dtype", reduce_dtype, "must be a floating torch dtype")
        self.inner, self.reduce_dtype = inner, reduce_dtype
        self.reductions = 0

    @property
    def global_ranks(self):
        return getattr(self.inner, "global_ranks", ())

    def _upcasts(self, tensor: torch.Tensor) -> bool:
        if self.inner.world_size == 1:
            return False
        self.reductions += 1
        return tensor.dtype.is_floating_point and torch.finfo(tensor.dtype).bits < torch.finfo(self.reduce_dtype).bits

    def all_reduce(self, tensor):
        if not self._upcasts(tensor):
            return self.inner.all_reduce(tensor)
        return tensor.copy_(self.inner.all_reduce(tensor.to(self.reduce_dtype)))

    def reduce_scatter(self, tensor, dim=0):
        if not self._upcasts(tensor):
            return self.inner.reduce_scatter(tensor, dim)
        return self.inner.reduce_scatter(tensor.to(self.reduce_dtype), dim).to(tensor.dtype)

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        if not self._upcasts(tensor):
            return self.inner.reduce_scatter_async(tensor, dim, overlap_flops=overlap_flops)
        pending = self.inner.reduce_scatter_async(tensor.to(self.reduce_dtype), dim, overlap_flops=overlap_flops)
        return PendingCollective(pending.buffer, pending, lambda _: pending.wait().to(tensor.dtype))


# --------------------------------------------------------------------------- regions


class _CopyToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        ctx.comm = comm
        return x

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_reduce(grad.contiguous().clone()), None


class _ReduceFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm):
        if x.is_contiguous():  # reduced in place: tell autograd the input changed
            ctx.mark_dirty(x)
        return comm.all_reduce(x.contiguous())

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class _GatherFromParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.shard(grad, ctx.dim), None, None


class _ScatterToParallel(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.shard(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad.contiguous(), ctx.dim), None, None


class _ReduceScatterToSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.reduce_scatter(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.all_gather(grad.contiguous(), ctx.dim), None, None


class _GatherFromSequence(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, comm, dim):
        ctx.comm, ctx.dim = comm, dim
        return comm.all_gather(x, dim)

    @staticmethod
    def backward(ctx, grad):
        return ctx.comm.reduce_scatter(grad.contiguous(), ctx.dim), None, None


def needs_autograd(x: torch.Tensor) -> bool:
    """Inference calls the collective directly: the autograd pair exists only to give x a
    gradient, and skipping it keeps the forward traceable by torch.compile (which cannot
    trace an in-place autograd.Function, see impl/decoding.py)."""
    return torch.is_grad_enabled() and x.requires_grad


def copy_to_parallel(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Enter a TP region with a replicated input: identity forward, all-reduce backward."""
    return _CopyToParallel.apply(x, comm) if comm.world_size > 1 and needs_autograd(x) else x


def reduce_from_parallel(x: torch.Tensor, comm: Communicator) -> torch.Tensor:
    """Leave a TP region by summing partial results: all-reduce forward, identity backward."""
    if comm.world_size == 1:
        return x
    return _ReduceFromParallel.apply(x, comm) if needs_autograd(x) else comm.all_reduce(x.contiguous())


def gather_from_parallel(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """Concatenate per-rank shards along `dim`: all-gather forward, keep own slice backward."""
    if comm.world_size == 1:
        return x
    return _GatherFromParallel.apply(x, comm, dim) if needs_autograd(x) else comm.all_gather(x, dim)


def scatter_to_parallel(x: torch.Tensor, comm: Communicator, dim: int = -1) -> torch.Tensor:
    """Keep this rank's slice of a replicated tensor: slice forward, all-gather backward."""
    if comm.world_size == 1:
        return x
    return _ScatterToParallel.apply(x, comm, dim) if needs_autograd(x) else comm.shard(x, dim)


def reduce_scatter_to_sequence(x: torch.Tensor, comm: Communicator, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: sum partials and keep own sequence shard (backward: all-gather)."""
    if comm.world_size == 1:
        return x
    return _ReduceScatterToSequence.apply(x, comm, dim) if needs_autograd(x) else comm.reduce_scatter(x, dim)


def gather_from_sequence(x: torch.Tensor, comm: Communicator, dim: int = 1) -> torch.Tensor:
    """Sequence parallelism: rebuild the full sequence (backward: reduce-scatter)."""
    if comm.world_size == 1:
        return x
    return _GatherFromSequence.apply(x, comm, dim) if needs_autograd(x) else comm.all_gather(x, dim)


def all_reduce_sequence_parallel_grads(module: torch.nn.Module, comm: Communicator) -> int:
    """Sum, over the TP group, the gradients of parameters tagged `sequence_parallel_grad`.

    With sequence parallelism a replicated parameter used inside the sequence-sharded region
    (the RMSNorm weights of a block, a row-parallel bias added after the reduce-scatter) sees
    only this rank's 1/tp of the tokens, so its `.grad` after backward is a per-rank partial
    sum; the full gradient is the sum over ranks (Megatron's
    `allreduce_sequence_parallel_grads`). Whoever runs backward through a sequence-parallel
    layer (a training loop, the harness) must call this once after backward and before the
    optimizer step or the next forward. The grads are flattened into one buffer per dtype,
    so it costs one all-reduce per dtype. Returns the number of gradients reduced.
    """
    grads = [p.grad for p in module.parameters() if getattr(p, "sequence_parallel_grad", False) and p.grad is not None]
    if comm.world_size == 1 or not grads:
        return len(grads)
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for g in grads:
        by_dtype.setdefault(g.dtype, []).append(g)
    for group in by_dtype.values():
        flat = comm.all_reduce(torch.cat([g.reshape(-1) for g in group]))
        for g, reduced in zip(group, flat.split([g.numel() for g in group])):
            g.copy_(reduced.view_as(g))
    return len(grads)


def gather_objects(obj, dst: int = 0, group: dist.ProcessGroup | None = None) -> list | None:
    """Every rank's picklable `obj`, in rank order, on rank `dst` (None elsewhere)."""
    gathered = [None] * dist.get_world_size(group) if dist.get_rank(group) == dst else None
    dist.gather_object(obj, gathered, dst=dst, group=group)
    return gathered
