"""Rank-side functions of the dtensor-peer suite (module level so spawned ranks can import them)."""
from __future__ import annotations

import torch

from impl.architecture import ModelConfig, TPConfigError
from impl.dtensor_peer import PlainLlama, load_dtensor_model, parallelize, tp_mesh
from impl.model import LlamaModel


def logits(ctx, directory, ids, dtype=torch.float32):
    """Prefill logits (batch, seq, vocab) of the dtensor peer, float32 on the CPU."""
    model = load_dtensor_model(directory, ctx, dtype)
    with torch.no_grad():
        return model(ids.to(ctx.device)).float().cpu()


def greedy(ctx, directory, ids, new_tokens):
    """Greedy tokens with the peer's KV cache, and the cached last-step logits against a full recompute."""
    model = load_dtensor_model(directory, ctx)
    ids = ids.to(ctx.device)
    tokens = model.generate_greedy(ids, new_tokens)
    with torch.no_grad():
        # one more decode step from the cache (which holds prompt + new_tokens - 1 positions) vs a full recompute
        cached = model(tokens[:, -1:], ids.shape[1] + new_tokens - 1, use_cache=True)[:, -1]
        full = model(torch.cat([ids, tokens], 1))[:, -1]
    return {"tokens": tokens.cpu(), "cached": cached.float().cpu(), "full": full.float().cpu()}


def refused(ctx, directory):
    """The TPConfigError load_dtensor_model raises on this rank (None if it loads)."""
    try:
        load_dtensor_model(directory, ctx)
    except TPConfigError as e:
        return {"argument": e.argument, "message": str(e)}
    return None


def random_peer_and_tpgate(ctx, config: ModelConfig, tensors: dict, ids):
    """Peer and tpgate logits for the same random full tensors (e.g. a tied-embedding config)."""
    peer = parallelize(PlainLlama.from_tensors(tensors, config, device=ctx.device), tp_mesh(ctx))
    ref = LlamaModel.from_tensors(tensors, config, ctx.comm, device=ctx.device)
    tied = peer.lm_head.weight is peer.model.embed_tokens.weight
    with torch.no_grad():
        return {"peer": peer(ids).float().cpu(), "tpgate": ref(ids).float().cpu(), "tied": tied}


def counted_collectives(ctx, config: ModelConfig, batch: int, seq: int, last_only: bool):
    """{op name: count} that torch's CommDebugMode sees in one forward of the parallelized,
    random-weight peer (every rank builds the same weights from one seed)."""
    from torch.distributed.tensor.debug import CommDebugMode

    from impl.dtensor_peer import random_plain_model

    model = parallelize(random_plain_model(config, torch.float32, ctx.device), tp_mesh(ctx))
    ids = torch.randint(0, config.vocab_size, (batch, seq), generator=torch.Generator().manual_seed(0))
    mode = CommDebugMode()
    with torch.no_grad(), mode:
        model(ids, last_only=last_only)[:, -1].argmax(-1)
    return {str(op).split(".")[-1]: n for op, n in mode.get_comm_counts().items()}
