"""Config fields of the model families whose config.json differs from Llama's: Phi-3 and Mixtral.

ModelConfig.from_hf reads the fields every family shares (sizes, heads, rope, norms) and hands
them, with the config.json dict, to FAMILY_FIELDS[model_type], which returns them amended with
what the family changes (the semantics transformers 5.x gives each field, read from its
models/phi3 and models/mixtral):

  phi3     qkv_proj / gate_up_proj fused in the checkpoint (fused_projections); no biases
           (transformers' Phi3Attention/Phi3MLP have none, whatever attention_bias says);
           partial_rotary_factor f < 1 rotates the first int(head_dim * f) dims of each head
           with frequencies over that width (rotary_dim); rope types other than default are
           longrope to transformers ("su" and "yarn" included): refused; sliding_window applies
           whenever set; attention/residual/embedding dropouts are training-only (ignored, as
           transformers ignores them in eval mode); original_max_position_embeddings only
           matters to longrope.
  mixtral  every MLP a mixture of num_local_experts experts, num_experts_per_tok per token;
           no biases; sliding_window applies whenever set; router_jitter_noise multiplies the
           router's input by noise in training mode only (transformers' eval forward, which is
           what tpgate computes, ignores it); router_aux_loss_coef and output_router_logits are
           training-only.
"""
from __future__ import annotations

from .architecture import require

# transformers' Phi3Config.convert_rope_params_to_dict: these rope types mean longrope to Phi-3
PHI3_LONGROPE_ALIASES = ("su", "yarn", "longrope")


def _rope_dict(hf: dict) -> dict:
    return dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})


def _number(hf: dict, key: str, default):
    value = hf.get(key, default)
    value = default if value is None else value
    require(isinstance(value, (int, float)) and not isinstance(value, bool), key, hf.get(key), "must be a number")
    return value


def phi3_fields(hf: dict, fields: dict) -> dict:
    rope = _rope_dict(hf)
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind in PHI3_LONGROPE_ALIASES:  # the refusal names longrope, whichever alias the config uses
        fields = dict(fields, rope_scaling={**rope, "rope_type": "longrope"})
    else:
        require(kind == "default", "rope_scaling.rope_type", kind, "must be default or longrope for phi3 (transformers' Phi3Config accepts only those)")
    partial = rope.get("partial_rotary_factor", hf.get("partial_rotary_factor"))
    partial = 1.0 if partial is None else partial
    require(isinstance(partial, (int, float)) and not isinstance(partial, bool) and 0 < partial <= 1, "partial_rotary_factor", partial, "must be in (0, 1]")
    head_dim = hf.get("head_dim") or hf["hidden_size"] // hf["num_attention_heads"]
    rotary_dim = int(head_dim * partial)
    require(rotary_dim >= 2 and rotary_dim % 2 == 0, "partial_rotary_factor", partial,
            f"must make int(head_dim * partial_rotary_factor) = {rotary_dim} an even number >= 2 (head_dim={head_dim}; rotary embeddings rotate pairs)")
    return dict(fields, qkv_bias=False, o_bias=False, fused_projections=True, rotary_dim=None if rotary_dim == head_dim else rotary_dim,
                extra=dict(fields["extra"], sliding_window=hf.get("sliding_window")))


def mixtral_fields(hf: dict, fields: dict) -> dict:
    for key in ("num_local_experts", "num_experts_per_tok"):
        value = hf.get(key)
        require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, key, value, "must be a positive integer (a mixtral config.json names it)")
    experts, top_k = hf["num_local_experts"], hf["num_experts_per_tok"]
    require(top_k <= experts, "num_experts_per_tok", top_k, f"must be <= num_local_experts={experts} (top-k picks k distinct experts)")
    jitter = _number(hf, "router_jitter_noise", 0.0)
    require(jitter >= 0, "router_jitter_noise", jitter, "must be >= 0 (it is training-only noise; inference ignores it)")
    return dict(fields, qkv_bias=False, o_bias=False, num_experts=experts, num_experts_per_tok=top_k,
                extra=dict(fields["extra"], sliding_window=hf.get("sliding_window")))


FAMILY_FIELDS = {"phi3": phi3_fields, "mixtral": mixtral_fields}

__all__ = ["FAMILY_FIELDS", "PHI3_LONGROPE_ALIASES", "mixtral_fields", "phi3_fields"]
