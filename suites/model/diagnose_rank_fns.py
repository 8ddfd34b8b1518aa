"""Stacks and rank functions of the verify-diagnostics tests (module level so spawned ranks can import them).

The planted bugs are tpgate's reference model with one layer broken only at tp > 1, the kind of
bug a TP port introduces in one place: rank 1's shard of one row-parallel projection scaled (a
wrong shard, a scale applied to a partial instead of the sum). The noisy stack adds rank- and
call-dependent noise of a few ulps to its logits, as an atomics-ordered kernel would.
"""
from __future__ import annotations

import torch

from harness.implementations.reference import Reference
from impl.communication import ReduceInDtypeCommunicator

SCALE = 1.25  # large enough to stand out of the bfloat16 bound in a 2-layer model


class PlantedBug(Reference):
    """tpgate's model with rank 1's copy of layer `layer`'s `projection` weight scaled by SCALE, at
    tp > 1 only: a row-parallel shard ("mlp.down", "attention.o_proj"), or a replicated norm
    ("input_norm": rank 1's copy stale, which the all-reduce after it hides from rank 0)."""

    capabilities = frozenset({"greedy"})

    def __init__(self, layer: int, projection: str):
        self.name, self.layer, self.projection = f"planted-{projection}-{layer}", layer, projection

    def load(self, directory, ctx, dtype):
        model = super().load(directory, ctx, dtype)
        if ctx.comm.world_size > 1 and ctx.comm.rank == 1:
            module = model.layers[self.layer]
            for part in self.projection.split("."):
                module = getattr(module, part)
            with torch.no_grad():
                module.weight.mul_(SCALE)
        return model


class Noisy(Reference):
    """tpgate's model whose logits() adds noise of ~4 ulps (of the logits' dtype) of the largest
    logit that depends on the rank and on how many times logits() ran: never the same bits twice."""

    name = "noisy"
    capabilities = frozenset({"greedy"})

    def load(self, directory, ctx, dtype):
        self.rank, self.calls = ctx.comm.rank, 0
        return super().load(directory, ctx, dtype)

    def logits(self, model, ids):
        out = super().logits(model, ids)
        self.calls += 1
        noise = torch.randn(out.shape, generator=torch.Generator().manual_seed(1000 * self.rank + self.calls))
        return out + (4 * torch.finfo(out.dtype).eps * out.abs().max() * noise).to(out.dtype)


PLANTED_MLP, PLANTED_ATTENTION, PLANTED_NORM = PlantedBug(1, "mlp.down"), PlantedBug(0, "attention.o_proj"), PlantedBug(1, "input_norm")
NOISY = Noisy()
PLANTED_MLP_SPEC, PLANTED_ATTENTION_SPEC, PLANTED_NORM_SPEC, NOISY_SPEC = (f"{__name__}:PLANTED_MLP", f"{__name__}:PLANTED_ATTENTION",
                                                                           f"{__name__}:PLANTED_NORM", f"{__name__}:NOISY")


class IgnoresReduceDtype(ReduceInDtypeCommunicator):
    """Mutant: takes the float32 option and reduces in the tensor's own dtype anyway."""

    def all_reduce(self, tensor):
        return self.inner.all_reduce(tensor)

    def reduce_scatter(self, tensor, dim=0):
        return self.inner.reduce_scatter(tensor, dim)

    def reduce_scatter_async(self, tensor, dim=0, overlap_flops=0):
        return self.inner.reduce_scatter_async(tensor, dim, overlap_flops=overlap_flops)


def reduced_in(ctx, communicator: str, n: int) -> dict:
    """Every rank's seeded bfloat16 values (n of them) all-reduced and reduce-scattered through
    `communicator` ("plain": ctx.comm; "float32": ReduceInDtypeCommunicator(ctx.comm); "mutant":
    IgnoresReduceDtype(ctx.comm)), against the exact sum rounded once to bfloat16 (computed here
    from every rank's values in float64): elements that differ, and the result dtypes."""
    world = ctx.comm.world_size
    values = [torch.randn(n, generator=torch.Generator().manual_seed(rank)).to(torch.bfloat16) for rank in range(world)]
    once = torch.stack(values).double().sum(0).to(torch.bfloat16)
    comm = {"plain": lambda c: c, "float32": ReduceInDtypeCommunicator, "mutant": IgnoresReduceDtype}[communicator](ctx.comm)
    reduced = comm.all_reduce(values[ctx.comm.rank].clone())
    scattered = comm.reduce_scatter(values[ctx.comm.rank].clone(), 0)
    started = comm.reduce_scatter_async(values[ctx.comm.rank].clone(), 0).wait()
    mine = once.chunk(world)[ctx.comm.rank]
    return {"all_reduce_differs": int((reduced != once).sum()), "reduce_scatter_differs": int((scattered != mine).sum()),
            "reduce_scatter_async_differs": int((started != mine).sum()), "dtypes": (str(reduced.dtype), str(scattered.dtype), str(started.dtype))}


def model_through(ctx, directory: str, dtype: torch.dtype, ids: torch.Tensor) -> dict:
    """tpgate's model on `ids`, sequence-parallel prefill (reduce-scatter, all-gather) and plain TP
    (all-reduce), forward and backward, built on ctx.comm and on ReduceInDtypeCommunicator(ctx.comm):
    whether each output and input-embedding gradient is bitwise equal between the two, and how
    many reductions went through the wrapper."""
    from impl.model_loader import DistributedCheckpointLoader

    out, wrapped = {}, ReduceInDtypeCommunicator(ctx.comm)
    for sequence_parallel in (False, True):
        results = []
        for comm in (ctx.comm, wrapped):
            model = DistributedCheckpointLoader(directory, comm).load(dtype, ctx.device, sequence_parallel=sequence_parallel)
            logits = model(ids.to(ctx.device))
            logits.float().square().sum().backward()
            results.append((logits.detach(), model.embed.weight.grad))
        out[f"sp={sequence_parallel}"] = bool(torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1]))
    out["reductions"] = wrapped.reductions
    return out
