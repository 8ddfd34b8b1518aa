"""Rank-side functions of the TP-group model suite (module level so spawned ranks can import them)."""
from __future__ import annotations

from harness.verify import logits_digest, run_model
from impl.architecture import parse_dtype
from impl.model_loader import DistributedCheckpointLoader


def group_run(ctx, directory: str, prompts: list, dtype: str, new_tokens: int) -> dict:
    """This rank's TP group loads the checkpoint over its own communicator (ctx.comm) and runs
    its own prompt, prompts[ctx.tp_group_index] (batch, prompt_len): run_model's greedy "tokens"
    and "margins", "logits_digest", and where the rank sits ("tp_group_index", "tp_rank"); the
    prompt "logits" (batch, prompt_len, vocab) only from the group's TP rank 0, every other
    member's being bitwise copies of them (ADR-9), which the digest checks."""
    model = DistributedCheckpointLoader(directory, ctx.comm).load(parse_dtype(dtype), ctx.device)
    out = run_model(model, prompts[ctx.tp_group_index].to(ctx.device), new_tokens)
    out["logits_digest"] = logits_digest(out["logits"])
    if ctx.tp_rank:
        del out["logits"]
    return {**out, "tp_group_index": ctx.tp_group_index, "tp_rank": ctx.tp_rank}
