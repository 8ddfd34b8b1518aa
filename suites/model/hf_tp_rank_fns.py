"""Rank-side functions and a stack of the hf-tp suite (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from harness.implementations import build_on_rank, local_parameter_count
from harness.implementations.hf_tp import HF_TP
from impl.communication import NullCommunicator
from impl.model_loader import DistributedCheckpointLoader


def local_shards(ctx, directory: str) -> dict:
    """What hf-tp's model holds on this rank: {parameter name: (type name, local tensor)} of the
    first layer's q/k/o projections, the embedding and the LM head, and this rank's parameter count."""
    _, model = build_on_rank("hf-tp", directory, ctx, torch.float32)
    names = ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.o_proj.weight",
             "model.embed_tokens.weight", "lm_head.weight")
    params = dict(model.named_parameters())
    out = {}
    for name in names:
        p = params[name]
        local = p.to_local() if hasattr(p, "to_local") else p
        out[name] = (type(p.data).__name__, local.detach().cpu().clone())
    return {"params": out, "local_parameters": local_parameter_count(model)}


def unchecked_logits(ctx, directory: str, ids: torch.Tensor) -> tuple:
    """hf-tp's load and logits with its check() skipped: what transformers does on its own."""
    impl, model = build_on_rank("hf-tp", directory, ctx, torch.float32)
    return tuple(impl.logits(model, ids.to(ctx.device)).shape)


def random_logits(ctx, config, ids: torch.Tensor, seed: int) -> dict:
    """hf-tp's random model of `config` (a tpgate ModelConfig): logits, greedy tokens and the local q_proj rows."""
    model = HF_TP.random(config, ctx, torch.float32, seed)
    q = model.model.layers[0].self_attn.q_proj.weight
    return {"logits": HF_TP.logits(model, ids).float().cpu(), "tokens": HF_TP.greedy(model, ids, 3).cpu(),
            "q_rows": (q.to_local() if hasattr(q, "to_local") else q).shape[0]}


class Unsharded:
    """A stack that computes the whole model on every rank (tpgate's TP=1 model, loaded whole on
    each rank) and so returns correct logits at any tp: it does not shard."""

    name = "unsharded"
    capabilities = frozenset({"greedy"})

    def check(self, config, tp):
        pass

    def load(self, directory, ctx, dtype):
        return DistributedCheckpointLoader(directory, NullCommunicator(1)).load(dtype, ctx.device)

    def logits(self, model, ids):
        with torch.no_grad():
            return model(ids)

    def greedy(self, model, ids, new_tokens):
        return model.generate(ids, new_tokens)


UNSHARDED = Unsharded()
UNSHARDED_SPEC = f"{__name__}:UNSHARDED"
