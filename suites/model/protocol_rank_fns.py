"""Rank-side functions and stacks of the protocol suite (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from harness.implementations import build_on_rank, checked_logits, checked_tokens
from harness.implementations.reference import Reference


def logits_and_tokens(ctx, spec: str, directory: str, ids: torch.Tensor, vocab: int, new_tokens: int) -> dict:
    impl, model = build_on_rank(spec, directory, ctx, torch.float32)
    ids = ids.to(ctx.device)
    out = {"logits": checked_logits(spec, impl.logits(model, ids), ids, vocab).float().cpu()}
    if "greedy" in impl.capabilities:
        out["tokens"] = checked_tokens(spec, impl.greedy(model, ids, new_tokens), ids, new_tokens, vocab).cpu()
    return out


class Skewed(Reference):
    """tpgate's stack with a 0.1 % error in its output scaling: right shapes, wrong numbers."""

    name = "skewed"

    def logits(self, model, ids):
        return super().logits(model, ids) * 1.001


class Misshaped(Reference):
    """tpgate's stack returning the last position's logits only: (batch, vocab), not (batch, seq, vocab)."""

    name = "misshaped"
    capabilities = frozenset()

    def logits(self, model, ids):
        return super().logits(model, ids)[:, -1]


SKEWED, MISSHAPED = Skewed(), Misshaped()
SKEWED_SPEC, MISSHAPED_SPEC = f"{__name__}:SKEWED", f"{__name__}:MISSHAPED"
