"""Mixtral-style mixture of experts, tensor-parallel: a replicated router, experts sharded like ParallelMLP.

Per token, the router's logits x W_r^T (W_r: (num_experts, hidden), replicated: every rank holds
it whole) go through a float32 softmax over all experts; the top_k probabilities are kept and
renormalised to sum to 1 (transformers' MixtralTopKRouter). The output is
sum_k weight_k * expert_{index_k}(x), expert_e(x) = w2_e(silu(w1_e x) * w3_e x).

Sharding: every expert's w1 (gate) and w3 (up) are column-parallel (rank r holds rows
[r*I/tp, (r+1)*I/tp) of each, fused as [gate | up] like ParallelMLP) and w2 (down) row-parallel
(columns of the same range). Rank r's expert_e(x) restricted to its intermediate columns is a
partial sum of the full expert output; weighting by the routing weight is linear, so every
expert's weighted partials are accumulated locally and ONE all-reduce of (batch, seq, hidden)
per layer sums experts and ranks at once — the collectives of a dense MLP, whatever num_experts.

Routing is identical on every rank: the router's input is the post-attention norm of the
residual stream, replicated and bitwise identical on every rank (each rank adds the same
all-reduced bytes — all-reduce hands every rank the same result — to the same residual), the
router weight is the same bytes everywhere, and every rank runs the same kernels on them; so
the logits, their softmax and torch.topk (ties included) are bitwise identical, and no
broadcast of the routing decision is needed (suites/model/test_families.py gathers every rank's
choices and compares them).

Sequence parallelism is refused (TPConfigError): the router would run on gathered tokens whose
gradient path differs from the experts' (gather_from_sequence's backward reduce-scatters).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Communicator, ModelConfig, require
from .communication import copy_to_parallel, reduce_from_parallel
from .sharding import REPLICATED, declare, shape_of, shard
from .tensor_parallel import MergedColumnParallelLinear, RowParallelLinear, _copy_into, check_input, load_full

ROUTER = "block_sparse_moe.gate.weight"


def expert_tensor(e: int, w: str) -> str:
    """Name of expert e's w1 (gate, (inter, hidden)), w3 (up, (inter, hidden)) or w2 (down, (hidden, inter)) within a block."""
    return f"block_sparse_moe.experts.{e}.{w}.weight"


def moe_block_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Full shapes of a Mixtral block's MoE tensors (transformers' save_pretrained layout)."""
    h, i = config.hidden_size, config.intermediate_size
    shapes = {ROUTER: (config.num_experts, h)}
    for e in range(config.num_experts):
        shapes.update({expert_tensor(e, "w1"): (i, h), expert_tensor(e, "w2"): (h, i), expert_tensor(e, "w3"): (i, h)})
    return shapes


def route(x: torch.Tensor, router_weight: torch.Tensor, top_k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """x: (tokens, hidden) -> (weights (tokens, top_k) float32 summing to 1 per token, experts
    (tokens, top_k) long). The logits in x's dtype, softmax, top-k and renormalisation in
    float32 (also for a float64 model: transformers' routing is float32 whatever the dtype)."""
    probs = F.linear(x, router_weight).float().softmax(-1)
    weights, experts = probs.topk(top_k, dim=-1)
    return weights / weights.sum(-1, keepdim=True), experts


class ParallelMoE(nn.Module):
    """Sparse MoE MLP. x: (batch, seq, hidden) replicated -> (batch, seq, hidden) replicated,
    one all-reduce. Each expert: gate_up (MergedColumnParallelLinear, local (2*inter/tp, hidden))
    and down (RowParallelLinear, local (hidden, inter/tp)); their weights are used directly,
    so no collective runs per expert. `router.weight`: (num_experts, hidden), replicated.
    `last_routing` holds the (weights, experts) of the latest forward (for the suites)."""

    def __init__(self, hidden_size, intermediate_size, num_experts, top_k, comm: Communicator, sequence_parallel=False, dtype=torch.float32, device="cpu",
                 experts: list | None = None):
        super().__init__()
        require(not sequence_parallel, "sequence_parallel", sequence_parallel, "is not supported for mixture-of-experts models")
        require(1 <= top_k <= num_experts, "num_experts_per_tok", top_k, f"must be in [1, num_experts={num_experts}]")
        self.comm, self.top_k, self.num_experts = comm, top_k, num_experts
        self.router = nn.Linear(hidden_size, num_experts, bias=False, dtype=dtype, device=device)
        declare(self.router.weight, REPLICATED)
        kw = dict(dtype=dtype, device=device)
        self.experts = nn.ModuleList(experts or [Expert(hidden_size, intermediate_size, comm, **kw) for _ in range(num_experts)])
        self.last_routing = None

    @property
    def sequence_parallel(self) -> bool:
        return False

    @sequence_parallel.setter
    def sequence_parallel(self, active: bool) -> None:
        require(not active, "sequence_parallel", active, "is not supported for mixture-of-experts models")

    def route(self, flat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """flat: (tokens, hidden), replicated -> route()'s (weights, experts), the same on every rank."""
        return route(flat, self.router.weight, self.top_k)

    def forward(self, x):
        check_input(x, self.router.weight, "ParallelMoE")
        flat = x.reshape(-1, x.shape[-1])
        weights, chosen = self.route(flat)
        self.last_routing = (weights.detach(), chosen)
        # the experts' partial outputs depend on x and on the weights: both enter the TP region
        # replicated (identity forward, all-reduce of their rank-partial gradients backward)
        xin, weights = copy_to_parallel(flat, self.comm), copy_to_parallel(weights, self.comm)
        out = torch.zeros_like(flat, dtype=torch.promote_types(x.dtype, torch.float32))
        for e, expert in enumerate(self.experts):
            token, slot = torch.where(chosen == e)
            if token.numel():
                partial = expert.partial(xin[token])  # this rank's share of expert e's output
                out = out.index_add(0, token, partial * weights[token, slot, None])
        return reduce_from_parallel(out.to(x.dtype).view_as(x), self.comm)

    @classmethod
    def from_full(cls, tensors: dict, config: ModelConfig, comm: Communicator, sequence_parallel=False, dtype=torch.float32, device="cpu"):
        """From one block's full MoE tensors (names: moe_block_shapes)."""
        kw = dict(dtype=dtype, device=device)
        experts = [Expert.from_full(tensors[expert_tensor(e, "w1")], tensors[expert_tensor(e, "w3")], tensors[expert_tensor(e, "w2")], comm, **kw)
                   for e in range(config.num_experts)]
        layer = cls(config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok, comm, sequence_parallel, experts=experts, **kw)
        _copy_into(layer.router.weight, shard([tensors[ROUTER]], REPLICATED, comm.rank, comm.world_size), "router.weight")
        return layer


class Expert(nn.Module):
    """One SwiGLU expert's shard: gate_up (2*inter/tp, hidden) rows [gate | up], down (hidden, inter/tp)."""

    def __init__(self, hidden_size, intermediate_size, comm: Communicator, dtype=torch.float32, device="cpu", gate_up=None, down=None):
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.gate_up = gate_up or MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], comm, **kw)
        self.down = down or RowParallelLinear(intermediate_size, hidden_size, comm, **kw)

    def partial(self, x: torch.Tensor) -> torch.Tensor:
        """x: (tokens, hidden) -> (tokens, hidden), this rank's partial sum of the expert's output (not reduced)."""
        gate, up = F.linear(x, self.gate_up.weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down.weight)

    @classmethod
    def from_full(cls, w1, w3, w2, comm: Communicator, **kw):
        hidden, inter = shape_of(w2)
        expert = cls(hidden, inter, comm, **kw)
        load_full(expert.gate_up, weight=[w1, w3])
        load_full(expert.down, weight=[w2])
        return expert


__all__ = ["Expert", "ParallelMoE", "ROUTER", "expert_tensor", "moe_block_shapes", "route"]
