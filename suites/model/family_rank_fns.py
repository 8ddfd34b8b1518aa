"""Qwen3 / Gemma bugs of the kind a port of a model family makes, and the wrappers that plant one
in the driver and in every rank (module level so spawned ranks can import it).

A mutant replaces one attribute of impl's modules. `mutated(name)` patches this process (the
driver: verify's float64 reference `exact`), `with_mutant` a rank for the duration of one call
(the persistent worlds keep running the real code afterwards), and `MutatedWorld` hands verify
worlds whose every call runs under the mutant. A bug shared by the reference and the TP run is
caught only by the independent reference (transformers: verify's semantic check); a bug on the
TP path alone (the shards) by the TP rows.
"""
from __future__ import annotations

import contextlib

import torch
import torch.nn.functional as F

from impl import model as model_module
from impl import tensor_parallel as layers
from impl.architecture import ModelConfig

from . import rope_rank_fns

REAL_MASK = layers.attention_mask
REAL_SOFTCAPPED = layers.softcapped_attention
REAL_LOCAL_LOGITS = layers.ParallelLMHead.local_logits
REAL_LAYER_ROPE = ModelConfig.layer_rope


def norm_after_rotary(self, q, k, positions):
    """q_norm / k_norm applied to the rotated heads."""
    cos, sin = self.rotary(positions[None])
    q, k = layers.apply_rotary(q, cos, sin), layers.apply_rotary(k, cos, sin)
    return (self.q_norm(q), self.k_norm(k)) if self.q_norm is not None else (q, k)


def unit_offset_forgotten(self, x):
    """Gemma's (1 + w) norm computed as Llama's w * norm(x)."""
    return layers.RMSNorm.forward(self, x)


def softcap_after_mask(q, k, v, mask, scale, softcap):
    """The cap applied after the mask: masked scores become -softcap, not -inf, and keep probability."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    scores = q.reshape(b, hkv, hq // hkv, s, d).float() @ k.float()[:, :, None].transpose(-1, -2) * scale
    probs = (torch.tanh(scores.masked_fill(~mask, float("-inf")) / softcap) * softcap).softmax(-1)
    return (probs @ v.float()[:, :, None]).reshape(b, hq, s, d).to(q.dtype)


def final_softcap_skipped_on_shards(self, x):
    """The final-logit cap applied only when the vocabulary is not sharded."""
    cap = self.softcap
    if self.comm.world_size > 1:
        self.softcap = None
    try:
        return REAL_LOCAL_LOGITS(self, x)
    finally:
        self.softcap = cap


def window_off_by_one(positions, kv_len, window=None):
    """A query sees window + 1 positions (j >= i - window)."""
    return REAL_MASK(positions, kv_len, None if window is None else window + 1)


def window_ignored_in_decode(positions, kv_len, window=None):
    """The window applied in prefill only: one-token (cached decode) steps attend to the whole cache."""
    return REAL_MASK(positions, kv_len, None if positions.numel() == 1 else window)


def rope_bases_swapped(self, layer):
    """Gemma 3's local rope on the full-attention layers and the global one on the sliding layers."""
    if self.local_rope_theta is None:
        return REAL_LAYER_ROPE(self, layer)
    if self.layer_type(layer) == "sliding_attention":
        return self.rope_theta, self.rope_scaling
    return self.local_rope_theta, self.local_rope_scaling


def embedding_scale_missing(config, h):
    """Embeddings left unscaled by sqrt(hidden_size)."""
    return torch.ones((), dtype=h.dtype, device=h.device)


MUTANTS = {  # name -> (object, attribute, replacement)
    "norm_after_rotary": (layers.ParallelAttention, "normed_rotary", norm_after_rotary),
    "unit_offset_forgotten": (layers.UnitOffsetRMSNorm, "forward", unit_offset_forgotten),
    "softcap_after_mask": (layers, "softcapped_attention", softcap_after_mask),
    "final_softcap_skipped_on_shards": (layers.ParallelLMHead, "local_logits", final_softcap_skipped_on_shards),
    "window_off_by_one": (layers, "attention_mask", window_off_by_one),
    "window_ignored_in_decode": (layers, "attention_mask", window_ignored_in_decode),
    "rope_bases_swapped": (ModelConfig, "layer_rope", rope_bases_swapped),
    "embedding_scale_missing": (model_module, "embedding_normalizer", embedding_scale_missing),
    "gelu_exact_not_tanh": (layers.MLP_ACTIVATIONS, "gelu_pytorch_tanh", F.gelu),
}


@contextlib.contextmanager
def mutated(name: str):
    target, attribute, replacement = MUTANTS[name]
    is_dict = isinstance(target, dict)
    real = target[attribute] if is_dict else getattr(target, attribute)
    if is_dict:
        target[attribute] = replacement
    else:
        setattr(target, attribute, replacement)
    try:
        yield
    finally:
        if is_dict:
            target[attribute] = real
        else:
            setattr(target, attribute, real)


def with_mutant(ctx, name: str, fn, *args):
    """Rank side: fn(ctx, *args) with mutant `name` planted in this rank, removed afterwards."""
    with mutated(name):
        return fn(ctx, *args)


def decode_vs_prefill(ctx, directory: str, ids: torch.Tensor, prompt_len: int) -> dict:
    """The checkpoint in float64 on this rank's TP group: the logits of ids (batch, n) from one
    prefill, against those of a cached decode that prefills ids[:, :prompt_len] and then feeds one
    token per step, once with int positions and once with tensor positions (the static-cache path
    of StaticDecoder). -> {"int", "tensor": max |decode - prefill| over positions prompt_len-1 .. n-1,
    "scale": max |prefill logits| there}."""
    from impl.model_loader import DistributedCheckpointLoader

    model = DistributedCheckpointLoader(directory, ctx.comm).load(torch.float64)
    ids = ids.to(ctx.device)
    batch, n = ids.shape
    out = {}
    with torch.no_grad():
        full = model(ids)[:, prompt_len - 1:]
        out["scale"] = full.abs().max().item()
        for kind in ("int", "tensor"):
            model.allocate_kv_cache(batch, n)
            steps = [model(ids[:, :prompt_len], 0, use_cache=True, last_only=True)]
            for t in range(prompt_len, n):
                start = t if kind == "int" else torch.tensor(t, device=ctx.device)
                steps.append(model(ids[:, t:t + 1], start, use_cache=True))
            out[kind] = (torch.cat(steps, 1) - full).abs().max().item()
    return out


class MutatedWorld(rope_rank_fns.MutatedWorld):
    """A world whose every run() executes with family mutant `name` planted in each rank (verify()'s worlds_factory)."""

    def run(self, fn, *args):
        return self.world.run(with_mutant, self.mutant, fn, *args)
