"""Rank-side functions of suites/model/test_families.py (module level so spawned ranks can import
them), and the deliberately broken Phi-3 and MoE stacks those checks must reject.

Each mutant is tpgate's reference stack with one realistic TP bug installed on the loaded model
instance (nothing global: the persistent worlds' next call sees the real code), usable as a
`verify --impl` protocol spec (MUTANT_SPECS)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from harness.implementations import build_on_rank
from harness.implementations.reference import Reference
from impl.model_loader import HFCheckpoint
from impl.moe import route
from impl.sharding import rows, shard, shape_of


def fused_qkv_one_block(model, comm, directory):
    """qkv_proj sharded as one column-parallel tensor: rank r takes rows [r*N/tp, (r+1)*N/tp) of
    [q | k | v] instead of its q, k and v rows (same local shape when kv heads shard)."""
    checkpoint = HFCheckpoint(directory)
    for i, layer in enumerate(model.layers):
        fused = checkpoint[f"model.layers.{i}.self_attn.qkv_proj.weight"]
        layer.attention.qkv.weight.copy_(shard([fused], rows(shape_of(fused)[0]), comm.rank, comm.world_size))


def gate_up_swapped(model, comm, directory):
    """gate_up_proj read as [up | gate]: silu applied to the up projection."""
    for layer in model.layers:
        gate, up = layer.mlp.gate_up.weight.chunk(2, 0)
        layer.mlp.gate_up.weight.copy_(torch.cat([up, gate]))


def sharded_router(model, comm, directory):
    """The router declared column-parallel like the experts' w1: rank r keeps the rows of experts
    [r*E/tp, (r+1)*E/tp) and picks its top-k among them."""
    for layer in model.layers:
        moe, n = layer.mlp, layer.mlp.num_experts // comm.world_size
        local = moe.router.weight[comm.rank * n:(comm.rank + 1) * n]

        def rank_route(flat, moe=moe, local=local, n=n):
            weights, experts = route(flat, local, min(moe.top_k, n))
            return weights, experts + comm.rank * n

        moe.route = rank_route


def weights_not_renormalised(model, comm, directory):
    """The top-k softmax probabilities used as they are, not divided by their sum."""
    for layer in model.layers:
        moe = layer.mlp
        moe.route = lambda flat, moe=moe: tuple(F.linear(flat, moe.router.weight).float().softmax(-1).topk(moe.top_k, dim=-1))


def reduced_per_expert(model, comm, directory):
    """Each expert's down projection run as a RowParallelLinear (which all-reduces), then the layer
    all-reduces the sum again: every expert output counted tp times."""
    for layer in model.layers:
        for expert in layer.mlp.experts:
            def reduced(x, expert=expert):
                gate, up = F.linear(x, expert.gate_up.weight).chunk(2, dim=-1)
                return expert.down(F.silu(gate) * up)

            expert.partial = reduced


def rank_jittered_router(model, comm, directory):
    """Router jitter (1 %, Mixtral's training-time noise) left on at inference and drawn from each
    rank's own generator: the routing input differs per rank."""
    for layer in model.layers:
        moe = layer.mlp

        def jittered(flat, moe=moe, generator=torch.Generator().manual_seed(comm.rank)):
            noise = torch.empty(flat.shape, dtype=flat.dtype).uniform_(0.99, 1.01, generator=generator).to(flat.device)
            return route(flat * noise, moe.router.weight, moe.top_k)

        moe.route = jittered


class Mutated(Reference):
    """tpgate's reference stack with `mutate(model, comm, directory)` applied after loading."""

    def __init__(self, mutate):
        self.mutate, self.name = mutate, mutate.__name__

    def load(self, directory: str, ctx, dtype: torch.dtype):
        model = super().load(directory, ctx, dtype)
        with torch.no_grad():
            self.mutate(model, ctx.comm, directory)
        return model


PHI3_MUTANTS = (fused_qkv_one_block, gate_up_swapped)
MOE_MUTANTS = (sharded_router, weights_not_renormalised, reduced_per_expert, rank_jittered_router)
MUTANTS = {m.__name__: Mutated(m) for m in PHI3_MUTANTS + MOE_MUTANTS}  # verify --impl "<this module>:MUTANTS" cannot index: one attribute each below
FUSED_QKV_ONE_BLOCK, GATE_UP_SWAPPED = MUTANTS["fused_qkv_one_block"], MUTANTS["gate_up_swapped"]
SHARDED_ROUTER, WEIGHTS_NOT_RENORMALISED = MUTANTS["sharded_router"], MUTANTS["weights_not_renormalised"]
REDUCED_PER_EXPERT, RANK_JITTERED_ROUTER = MUTANTS["reduced_per_expert"], MUTANTS["rank_jittered_router"]
MUTANT_SPECS = {name: f"{__name__}:{name.upper()}" for name in MUTANTS}


def routing(ctx, directory: str, ids: torch.Tensor, dtype: torch.dtype, spec: str = "reference") -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Every MoE layer's (weights (tokens, top_k) float32, experts (tokens, top_k) long) of this
    rank's prompt forward of `ids` (batch, seq), with implementation `spec`."""
    _, model = build_on_rank(spec, directory, ctx, dtype)
    with torch.no_grad():
        model(ids.to(ctx.device))
    return [tuple(t.cpu() for t in layer.mlp.last_routing) for layer in model.layers]
