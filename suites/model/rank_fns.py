"""Rank-side functions of the model suites (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from impl.model_loader import DistributedCheckpointLoader, save_shards


def logits(ctx, directory, ids, sequence_parallel=False, dtype=torch.float32):
    model = DistributedCheckpointLoader(directory, ctx.comm).load(dtype, ctx.device, sequence_parallel=sequence_parallel)
    with torch.no_grad():
        return model(ids.to(ctx.device)).float().cpu()


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
