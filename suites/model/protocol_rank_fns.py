"""Rank-side functions of the protocol suite (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from harness.implementations import build_on_rank, checked_logits, checked_tokens


def logits_and_tokens(ctx, spec: str, directory: str, ids: torch.Tensor, vocab: int, new_tokens: int) -> dict:
    impl, model = build_on_rank(spec, directory, ctx, torch.float32)
    ids = ids.to(ctx.device)
    out = {"logits": checked_logits(spec, impl.logits(model, ids), ids, vocab).float().cpu()}
    if "greedy" in impl.capabilities:
        out["tokens"] = checked_tokens(spec, impl.greedy(model, ids, new_tokens), ids, new_tokens, vocab).cpu()
    return out
