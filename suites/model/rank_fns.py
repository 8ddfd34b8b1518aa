"""Rank-side functions of the model suites (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from impl.model_loader import DistributedCheckpointLoader, save_shards


def logits(ctx, directory, ids, sequence_parallel=False, dtype=torch.float32):
    model = DistributedCheckpointLoader(directory, ctx.comm).load(dtype, ctx.device, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        return model(ids.to(ctx.device)).float().cpu()


def prefill_outputs(ctx, directory, ids, sequence_parallel=False, dtype=torch.float32):
    """A prompt's full logits (batch, seq, vocab), its last-token logits (batch, 1, vocab) and the
    greedy next token (batch,) selected on the vocabulary shards, on this rank."""
    model = DistributedCheckpointLoader(directory, ctx.comm).load(dtype, ctx.device, sequence_parallel=sequence_parallel)
    ids, wide = ids.to(ctx.device), torch.promote_types(dtype, torch.float32)  # a float64 reference stays float64
    with torch.no_grad():
        return {"logits": model(ids).to(wide).cpu(), "last": model(ids, last_only=True).to(wide).cpu(), "greedy": model.greedy(ids).cpu()}


def save(ctx, directory, out_dir):
    model = DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32, ctx.device)
    save_shards(model, out_dir)


def local_state(ctx, directory):
    model = DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32, ctx.device)
    return {k: v.cpu() for k, v in model.state_dict().items()}


def sample(ctx, directory, ids, temperature, top_k, top_p, seed):
    model = DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32, ctx.device)
    return model.generate(ids.to(ctx.device), 6, temperature=temperature, top_k=top_k, top_p=top_p, seed=seed).cpu()


def load_error(ctx, directory):
    DistributedCheckpointLoader(directory, ctx.comm).load()
