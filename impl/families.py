"""ModelConfig from the config.json of the families beyond Llama's: Qwen3, Gemma 2, Gemma 3 (text),
Phi-3 and Mixtral.

Each is the Llama-family config (vocabulary, sizes, heads, head_dim, rope, biases, tied
embeddings: read by ModelConfig.from_hf's own Llama path) plus the family's switches
(ModelConfig's fields after tie_word_embeddings). A field missing from config.json takes the
transformers config class's default; a value tpgate cannot compute is a TPConfigError naming the
config.json field.

  qwen3        q_norm / k_norm (RMSNorm over head_dim, before rotary); sliding layers as Qwen2's.
  gemma2       (1 + w) RMSNorms in float32, four per block, GeGLU, embeddings times sqrt(hidden),
               scale query_pre_attn_scalar**-0.5, attention and final logit soft-capping,
               sliding-window attention on the layers layer_types marks.
  gemma3_text  gemma2's, plus (1 + w) q_norm / k_norm and separate rope parameters for the
               sliding layers; no attention soft-capping (transformers' Gemma 3 never applies it).

Phi-3 and Mixtral differ from Llama in fields, not in how the shared ones read: ModelConfig.from_hf
reads the shared fields and hands them, with the config.json dict, to FAMILY_FIELDS[model_type],
which returns them amended (the semantics transformers 5.x gives each field):

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

from dataclasses import replace

from .architecture import TPConfigError, hf_attention_windows, require

# transformers 5.x config classes' defaults, for fields a config.json may leave out
DEFAULTS = {
    "qwen3": {"head_dim": 128, "tie_word_embeddings": False},
    "gemma2": {"head_dim": 256, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
               "sliding_window": 4096, "final_logit_softcapping": 30.0, "attn_logit_softcapping": 50.0, "max_position_embeddings": 8192},
    "gemma3_text": {"head_dim": 256, "tie_word_embeddings": True, "hidden_activation": "gelu_pytorch_tanh", "query_pre_attn_scalar": 256,
                    "sliding_window": 4096, "final_logit_softcapping": None, "attn_logit_softcapping": None, "max_position_embeddings": 131072},
}
GEMMA3_THETA = {"full_attention": 1_000_000.0, "sliding_attention": 10_000.0}
# Llama-path keys the family parsers decide themselves
OWN_KEYS = ("hidden_act", "hidden_activation", "sliding_window", "use_sliding_window", "layer_types", "rope_parameters", "rope_scaling")


def config_from_hf(cls, hf: dict):
    """ModelConfig of a qwen3, gemma2 or gemma3_text config.json dict."""
    kind = hf["model_type"]
    hf = {**DEFAULTS[kind], **hf}
    global_rope, local_rope = _rope(hf, kind)
    llama = {k: v for k, v in hf.items() if k not in OWN_KEYS} | {"model_type": "llama", "rope_parameters": global_rope}
    try:
        base = cls.from_hf(llama)
    except KeyError as e:
        raise TPConfigError(e.args[0], None, f"required in a {kind} config.json") from None
    windows = hf_attention_windows(hf, kind)
    features = dict(windows, extra={"model_type": kind, "sliding_window": windows["sliding_window"] if windows["layer_types"] and
                                    "sliding_attention" in windows["layer_types"] else None})
    if kind == "qwen3":
        require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "must be silu (SwiGLU MLP)")
        return replace(base, qk_norm=True, **features)
    require(hf["hidden_activation"] == "gelu_pytorch_tanh", "hidden_activation", hf["hidden_activation"],
            "must be gelu_pytorch_tanh (GeGLU with gelu's tanh approximation)")
    require(not hf.get("use_bidirectional_attention"), "use_bidirectional_attention", hf.get("use_bidirectional_attention"),
            "must be false or null: tpgate computes causal attention")
    require(hf["query_pre_attn_scalar"] is not None, "query_pre_attn_scalar", None, "must be a finite number > 0 (the attention scale is its -1/2 power)")
    if kind == "gemma3_text":
        require(hf["attn_logit_softcapping"] is None, "attn_logit_softcapping", hf["attn_logit_softcapping"],
                "must be null for gemma3_text (transformers' Gemma 3 attention does not apply it)")
        theta, scaling = _theta_and_scaling(local_rope, GEMMA3_THETA["sliding_attention"])
        features.update(qk_norm=True, local_rope_theta=theta, local_rope_scaling=scaling)
    return replace(base, norm_unit_offset=True, sandwich_norms=True, scale_embeddings=True, hidden_act=hf["hidden_activation"],
                   query_pre_attn_scalar=hf["query_pre_attn_scalar"], attn_logit_softcapping=hf["attn_logit_softcapping"],
                   final_logit_softcapping=hf["final_logit_softcapping"], **features)


def _rope(hf: dict, kind: str) -> tuple[dict, dict | None]:
    """(the global rope dict in rope_parameters form, Gemma 3's sliding-layer rope dict or None).
    Gemma 3 in 5.x: rope_parameters = {"full_attention": {...}, "sliding_attention": {...}};
    in 4.x: rope_theta / rope_scaling for the global layers, rope_local_base_freq for the local ones."""
    params = hf.get("rope_parameters")
    nested = isinstance(params, dict) and any(k in params for k in GEMMA3_THETA)
    if kind == "gemma3_text" and nested:
        for name in GEMMA3_THETA:
            value = params.get(name)
            require(value is None or isinstance(value, dict), f"rope_parameters.{name}", value, "must be a mapping (or null)")
        full = {"rope_theta": GEMMA3_THETA["full_attention"], **(params.get("full_attention") or {})}
        local = {"rope_theta": GEMMA3_THETA["sliding_attention"], **(params.get("sliding_attention") or {})}
        return full, local
    require(not nested, "rope_parameters", params, f"per-layer-type rope parameters are Gemma 3's, not {kind}'s")
    rope = dict(hf.get("rope_scaling") or params or {})  # 4.x rope_scaling wins, as in the Llama path
    default_theta = GEMMA3_THETA["full_attention"] if kind == "gemma3_text" else 10000.0
    rope.setdefault("rope_theta", hf.get("rope_theta", default_theta))
    local = {"rope_type": "default", "rope_theta": hf.get("rope_local_base_freq", GEMMA3_THETA["sliding_attention"])} if kind == "gemma3_text" else None
    return rope, local


def _theta_and_scaling(rope: dict, default_theta: float) -> tuple[float, dict | None]:
    rope = dict(rope)
    theta = rope.pop("rope_theta", default_theta)
    return theta, rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None

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
