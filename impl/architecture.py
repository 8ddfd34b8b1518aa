"""Contracts shared by every room of `impl/`: configs, errors and the Communicator interface.

Nothing here touches torch.distributed. Collectives live in `impl.communication` alone;
the harness's process runtime (`harness.runtime`) creates and destroys process groups but moves no tensors.
"""
from __future__ import annotations

import abc
import math
from dataclasses import dataclass, field

import torch


class TPConfigError(ValueError):
    """A configuration tensor parallelism cannot honour.

    Raised before any process is started or collective entered; the message names the
    argument, its value and the constraint it breaks.
    """

    def __init__(self, argument: str, value, constraint: str):
        self.argument, self.value, self.constraint = argument, value, constraint
        super().__init__(f"{argument}={value!r}: {constraint}")


def require(ok: bool, argument: str, value, constraint: str) -> None:
    if not ok:
        raise TPConfigError(argument, value, constraint)


def require_divisible(argument: str, value: int, tp: int) -> None:
    require(
        isinstance(value, int) and value > 0 and value % tp == 0,
        argument,
        value,
        f"must be a positive multiple of the tensor-parallel size {tp}",
    )


HF_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma2", "gemma3_text", "phi3", "mixtral")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, argument: str = "dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        require(name in DTYPES.values(), argument, name, f"must be one of {sorted(DTYPES)}")
        return name
    require(name in DTYPES, argument, name, f"must be one of {sorted(DTYPES)}")
    return DTYPES[name]


# Rotary position embeddings: the rope_type values transformers' Llama-family models accept
# (transformers.modeling_rope_utils.ROPE_INIT_FUNCTIONS plus "default") that tpgate computes exactly.
ROPE_TYPES = ("default", "linear", "dynamic", "yarn", "llama3", "proportional")
ROPE_TYPES_REFUSED = {
    "longrope": "its frequencies switch from short_factor to long_factor once the sequence passes original_max_position_embeddings, "
                "re-rotating every cached key (transformers' cached and recomputed results differ there); tpgate's static KV cache "
                "rotates each key once",
}


def _rope_number(params: dict, key: str, default=None, above: float | None = 0.0) -> float:
    """params[key] (`default` when absent or None) as a float: finite and, unless `above` is None, > above."""
    value = params.get(key)
    value = default if value is None else value
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and (above is None or value > above)
    require(ok, f"rope_scaling.{key}", params.get(key), "must be a finite number" + ("" if above is None else f" > {above:g}"))
    return float(value)


def _rope_positions(params: dict, max_position_embeddings: int | None) -> int:
    """original_max_position_embeddings, defaulting (as transformers does) to max_position_embeddings."""
    value = params.get("original_max_position_embeddings", max_position_embeddings)
    require(isinstance(value, int) and not isinstance(value, bool) and value >= 1, "rope_scaling.original_max_position_embeddings",
            params.get("original_max_position_embeddings"), "must be a positive integer (it defaults to max_position_embeddings)")
    return value


def _mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def rope_scaling_parameters(scaling: dict | None, head_dim: int, max_position_embeddings: int | None, rope_theta: float) -> dict | None:
    """The rope scaling of a config, validated, with transformers' defaults resolved; None for the
    unscaled (default) rope. Accepts 4.x `rope_scaling` (`type` or `rope_type`) and 5.x
    `rope_parameters` dicts (its `rope_theta` is read by ModelConfig.from_hf, ignored here), and
    its own output (idempotent). Keys per rope_type:
      linear        factor                      (inv_freq / factor)
      dynamic       factor, max_position_embeddings (NTK base growth past max_position_embeddings)
      yarn          factor, original_max_position_embeddings, attention_factor (resolved from
                    factor / mscale / mscale_all_dim when absent), beta_fast, beta_slow, truncate
      llama3        factor, low_freq_factor, high_freq_factor, original_max_position_embeddings
      proportional  factor, partial_rotary_factor (the last head_dim/2 - angles frequencies are 0)
    TPConfigError naming `rope_scaling.<field>` for an unsupported type or a field out of range.
    Transformers only warns about most out-of-range fields; tpgate refuses those that make the
    rotary tables undefined (division by zero, log of a non-positive number) or inverted."""
    require(scaling is None or isinstance(scaling, dict), "rope_scaling", scaling, "must be a mapping (or null)")
    params = dict(scaling or {})
    kind = params.get("rope_type", params.get("type", "default"))
    if isinstance(kind, str) and kind in ROPE_TYPES_REFUSED:
        raise TPConfigError("rope_scaling.rope_type", kind, f"not supported: {ROPE_TYPES_REFUSED[kind]}; supported: {', '.join(ROPE_TYPES)}")
    require(kind in ROPE_TYPES, "rope_scaling.rope_type", kind, f"must be one of {', '.join(ROPE_TYPES)}")
    if kind == "default":  # transformers' Llama default rope rotates the whole head whatever partial_rotary_factor says
        return None
    partial = _rope_number(params, "partial_rotary_factor", 1.0)
    if kind == "proportional":
        require(partial <= 1.0, "rope_scaling.partial_rotary_factor", params["partial_rotary_factor"], "must be in (0, 1]")
        return {"rope_type": kind, "factor": _rope_number(params, "factor", 1.0), "partial_rotary_factor": partial}
    # transformers rotates only head_dim * partial_rotary_factor dims here, and its Llama attention then fails on the shape
    require(partial == 1.0, "rope_scaling.partial_rotary_factor", params.get("partial_rotary_factor"), f"must be 1 for rope_type {kind} (partial rotary is proportional-only)")
    if kind == "linear":
        return {"rope_type": kind, "factor": _rope_number(params, "factor")}
    if kind == "dynamic":
        length = max_position_embeddings if max_position_embeddings is not None else params.get("max_position_embeddings")
        require(isinstance(length, int) and length >= 1, "max_position_embeddings", length, "dynamic rope scaling needs a positive integer")
        require(head_dim > 2, "head_dim", head_dim, "must be > 2 for dynamic rope scaling (its base exponent is head_dim / (head_dim - 2))")
        return {"rope_type": kind, "factor": _rope_number(params, "factor"), "max_position_embeddings": length}
    original = _rope_positions(params, max_position_embeddings)
    if kind == "llama3":
        low, high = _rope_number(params, "low_freq_factor"), _rope_number(params, "high_freq_factor")
        require(high > low, "rope_scaling.high_freq_factor", params["high_freq_factor"], f"must be > low_freq_factor={params['low_freq_factor']!r}")
        return {"rope_type": kind, "factor": _rope_number(params, "factor"), "low_freq_factor": low, "high_freq_factor": high,
                "original_max_position_embeddings": original}
    require(rope_theta > 1, "rope_theta", rope_theta, "must be > 1 for yarn rope scaling (its correction range divides by log(rope_theta))")
    if params.get("factor") is None:  # transformers: null means the ratio of the extended and the original context
        require("factor" in params and max_position_embeddings is not None, "rope_scaling.factor", None,
                "yarn needs a factor (null: max_position_embeddings / original_max_position_embeddings)")
        params["factor"] = max_position_embeddings / original
    factor = _rope_number(params, "factor")
    # transformers: `beta_fast or 32`, `beta_slow or 1`
    beta_fast = _rope_number(params, "beta_fast") if params.get("beta_fast") else 32.0
    beta_slow = _rope_number(params, "beta_slow") if params.get("beta_slow") else 1.0
    require(beta_fast >= beta_slow, "rope_scaling.beta_fast", params.get("beta_fast"), f"must be >= beta_slow={beta_slow:g} (the ramp would run backwards)")
    truncate = params.get("truncate", True)
    require(isinstance(truncate, bool), "rope_scaling.truncate", truncate, "must be true or false")
    if params.get("attention_factor") is not None:
        attention = _rope_number(params, "attention_factor")
    elif params.get("mscale") and params.get("mscale_all_dim"):  # transformers uses them only when both are non-zero
        numerator = _mscale(factor, _rope_number(params, "mscale", above=None))
        denominator = _mscale(factor, _rope_number(params, "mscale_all_dim", above=None))
        require(numerator > 0 and denominator > 0, "rope_scaling.mscale", (params["mscale"], params["mscale_all_dim"]),
                f"(mscale, mscale_all_dim) must make 0.1 * m * log(factor={factor:g}) + 1 positive for both")
        attention = numerator / denominator
    else:
        attention = _mscale(factor)
    return {"rope_type": kind, "factor": factor, "original_max_position_embeddings": original, "attention_factor": attention,
            "beta_fast": beta_fast, "beta_slow": beta_slow, "truncate": truncate}


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Sizes are the full (unsharded) ones. `rope_scaling` is stored as
    rope_scaling_parameters() returns it (validated, defaults resolved; None when unscaled).
    The fields after tie_word_embeddings switch on the features of Qwen3 and Gemma 2/3 (their
    names are config.json's where it has one): the MLP's hidden_act; sliding_window on the
    layers layer_types marks "sliding_attention" (None: every layer when sliding_window is set);
    qk_norm; norm_unit_offset ((1 + w) norms in float32); sandwich_norms (four per block);
    scale_embeddings (times sqrt(hidden)); query_pre_attn_scalar; the two soft-caps; and the
    sliding layers' own rope (local_rope_theta / local_rope_scaling, Gemma 3).
    The next fields (impl/families.py reads them for phi3 and mixtral):
      rotary_dim            the leading dims of each head that rotary embeddings rotate, with
                            frequencies over rotary_dim (Phi-3's partial_rotary_factor); the rest
                            pass through. None: the whole head.
      fused_projections     the checkpoint stores q|k|v as one `self_attn.qkv_proj` and gate|up as
                            one `mlp.gate_up_proj` (Phi-3); the model is the same.
      num_experts           > 0: every block's MLP is a mixture of that many SwiGLU experts of
                            intermediate_size each (Mixtral, impl/moe.py), num_experts_per_tok
                            of them per token. 0: a dense MLP.
    """

    vocab_size: int = 1000
    hidden_size: int = 256
    intermediate_size: int = 688
    num_layers: int = 2
    num_heads: int = 8
    num_kv_heads: int = 8
    head_dim: int | None = None
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_seq_len: int = 2048
    qkv_bias: bool = False
    o_bias: bool = False
    tie_word_embeddings: bool = False
    # Qwen3 / Gemma features (parsed by impl/families.py); the defaults are the Llama family's
    hidden_act: str = "silu"
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    qk_norm: bool = False
    norm_unit_offset: bool = False
    sandwich_norms: bool = False
    scale_embeddings: bool = False
    query_pre_attn_scalar: float | None = None
    attn_logit_softcapping: float | None = None
    final_logit_softcapping: float | None = None
    local_rope_theta: float | None = None
    local_rope_scaling: dict | None = None
    rotary_dim: int | None = None
    fused_projections: bool = False
    num_experts: int = 0
    num_experts_per_tok: int = 0
    extra: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads", "num_kv_heads", "max_seq_len"):
            v = getattr(self, name)
            require(isinstance(v, int) and v >= 1, name, v, "must be a positive integer")
        require(self.num_heads % self.num_kv_heads == 0, "num_kv_heads", self.num_kv_heads, f"must divide num_heads={self.num_heads}")
        if self.head_dim is None:
            require(self.hidden_size % self.num_heads == 0, "hidden_size", self.hidden_size, f"must be a multiple of num_heads={self.num_heads} when head_dim is not given")
            object.__setattr__(self, "head_dim", self.hidden_size // self.num_heads)
        require(self.head_dim % 2 == 0, "head_dim", self.head_dim, "must be even (rotary embeddings rotate pairs)")
        theta = self.rope_theta
        require(isinstance(theta, (int, float)) and not isinstance(theta, bool) and math.isfinite(theta) and theta > 0, "rope_theta", theta, "must be a finite number > 0")
        object.__setattr__(self, "rope_theta", float(theta))
        object.__setattr__(self, "rope_scaling", rope_scaling_parameters(self.rope_scaling, self.head_dim, self.max_seq_len, self.rope_theta))
        check_family_features(self)

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From a Hugging Face config.json dict (transformers 4.x `rope_theta`/`rope_scaling`
        or 5.x `rope_parameters`). Supported model_type: HF_MODEL_TYPES; impl/families.py reads what
        qwen3, gemma2, gemma3_text (config_from_hf), phi3 and mixtral (FAMILY_FIELDS) add."""
        from .families import FAMILY_FIELDS

        kind = hf.get("model_type")
        require(kind in HF_MODEL_TYPES, "model_type", kind, f"must be one of {HF_MODEL_TYPES}")
        if kind in FAMILY_MODEL_TYPES:
            from .families import config_from_hf

            return config_from_hf(cls, hf)
        require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "must be silu (SwiGLU MLP)")
        require(not hf.get("mlp_bias", False), "mlp_bias", hf.get("mlp_bias"), "MLP biases are not supported")
        # transformers 5.x: `rope_scaling` (4.x) wins over `rope_parameters`, and a rope_theta inside it over the top-level one
        rope = dict(hf.get("rope_scaling") or hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        if hf.get("partial_rotary_factor") is not None:
            rope.setdefault("partial_rotary_factor", hf["partial_rotary_factor"])
        scaling = rope if rope.get("rope_type", rope.get("type", "default")) != "default" else None
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        fields = dict(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=theta, rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048), qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=kind != "qwen2" and attention_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            extra={"model_type": kind, "sliding_window": hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None},
            **hf_attention_windows(hf, kind),
        )
        return cls(**(FAMILY_FIELDS[kind](hf, fields) if kind in FAMILY_FIELDS else fields))

    def layer_type(self, layer: int) -> str:
        """"sliding_attention" or "full_attention": layer_types[layer], else every layer slides when sliding_window is set."""
        if self.layer_types is not None:
            return self.layer_types[layer]
        return "sliding_attention" if self.sliding_window is not None else "full_attention"

    def layer_window(self, layer: int) -> int | None:
        """The key positions a query of this layer sees (itself included), None: all before it."""
        return self.sliding_window if self.layer_type(layer) == "sliding_attention" else None

    def layer_rope(self, layer: int) -> tuple[float, dict | None]:
        """(rope_theta, rope_scaling) of this layer: the local pair on sliding layers when one is set (Gemma 3)."""
        if self.local_rope_theta is not None and self.layer_type(layer) == "sliding_attention":
            return self.local_rope_theta, self.local_rope_scaling
        return self.rope_theta, self.rope_scaling

    def non_llama_features(self) -> list[str]:
        """The features of this config beyond the Llama family's (Llama, Mistral, Qwen2), by field name
        (the Qwen3 / Gemma switches, then Phi-3's and Mixtral's)."""
        flags = ("qk_norm", "norm_unit_offset", "sandwich_norms", "scale_embeddings")
        values = ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "local_rope_theta")
        flags += ("fused_projections", "num_experts")
        values += ("rotary_dim",)
        out = [name for name in flags if getattr(self, name)] + [name for name in values if getattr(self, name) is not None]
        return out + ([f"hidden_act={self.hidden_act}"] if self.hidden_act != "silu" else [])

    def check_tp(self, tp: int) -> None:
        """Raise TPConfigError if this model cannot be sharded `tp` ways."""
        require(isinstance(tp, int) and tp >= 1, "tp", tp, "must be an integer >= 1")
        require_divisible("num_heads", self.num_heads, tp)
        check_kv_heads(self.num_kv_heads, tp)
        require_divisible("intermediate_size", self.intermediate_size, tp)


FAMILY_MODEL_TYPES = ("qwen3", "gemma2", "gemma3_text")
LAYER_TYPES = ("full_attention", "sliding_attention")
HIDDEN_ACTS = ("silu", "gelu_pytorch_tanh")  # SwiGLU, GeGLU (gelu's tanh approximation)


def hf_attention_windows(hf: dict, kind: str) -> dict:
    """{"sliding_window", "layer_types"} of a config.json as transformers 5.x reads it: Mistral, Phi-3 and Mixtral slide
    on every layer when sliding_window is set; Qwen2/Qwen3 only with use_sliding_window, on the
    layers layer_types marks (default: from max_window_layers on); Gemma on the layers layer_types
    marks (default: Gemma 2 every other layer from the first, Gemma 3 all but every
    sliding_window_pattern-th)."""
    if kind in ("mistral", "phi3", "mixtral"):
        return {"sliding_window": hf.get("sliding_window"), "layer_types": None}
    if kind in ("qwen2", "qwen3"):
        window = hf.get("sliding_window") if hf.get("use_sliding_window", False) else None
        if window is None:  # transformers then gives every layer full attention, whatever layer_types says
            return {"sliding_window": None, "layer_types": None}
        first = hf.get("max_window_layers", 28)
        default = ["sliding_attention" if i >= first else "full_attention" for i in range(hf["num_hidden_layers"])]
        return {"sliding_window": window, "layer_types": hf.get("layer_types") or default}
    if kind in ("gemma2", "gemma3_text"):
        pattern = 2 if kind == "gemma2" else hf.get("sliding_window_pattern", hf.get("_sliding_window_pattern", 6))
        require(isinstance(pattern, int) and pattern >= 1, "sliding_window_pattern", pattern, "must be a positive integer")
        default = ["sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(hf["num_hidden_layers"])]
        return {"sliding_window": hf.get("sliding_window"), "layer_types": hf.get("layer_types") or default}
    return {"sliding_window": None, "layer_types": None}


def _positive_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value > 0


def check_family_features(config: "ModelConfig") -> None:
    """Validate (and normalise: layer_types to a tuple) the fields beyond the Llama family's."""
    require(config.hidden_act in HIDDEN_ACTS, "hidden_act", config.hidden_act, f"must be one of {HIDDEN_ACTS}")
    window = config.sliding_window
    require(window is None or (isinstance(window, int) and not isinstance(window, bool) and window >= 1), "sliding_window", window,
            "must be a positive integer (or null)")
    if config.layer_types is not None:
        types = config.layer_types
        require(isinstance(types, (list, tuple)) and len(types) == config.num_layers, "layer_types", types,
                f"must list one attention type per layer (num_hidden_layers={config.num_layers})")
        for i, kind in enumerate(types):
            require(kind in LAYER_TYPES, f"layer_types[{i}]", kind, f"must be one of {LAYER_TYPES}")
        require(window is not None or "sliding_attention" not in types, "sliding_window", window,
                "must be a positive integer when layer_types marks a layer sliding_attention")
        object.__setattr__(config, "layer_types", tuple(types))
    for name in ("query_pre_attn_scalar", "attn_logit_softcapping", "final_logit_softcapping", "local_rope_theta"):
        value = getattr(config, name)
        require(value is None or _positive_number(value), name, value, "must be a finite number > 0 (or null)")
        if value is not None:
            object.__setattr__(config, name, float(value))
    if config.local_rope_theta is not None:
        object.__setattr__(config, "local_rope_scaling",
                           rope_scaling_parameters(config.local_rope_scaling, config.head_dim, config.max_seq_len, config.local_rope_theta))

    rd = config.rotary_dim
    if rd is not None:
        require(isinstance(rd, int) and 2 <= rd <= config.head_dim and rd % 2 == 0, "rotary_dim", rd,
                f"must be an even integer in [2, head_dim={config.head_dim}] (rotary embeddings rotate pairs)")
        require(config.rope_scaling is None, "rotary_dim", rd, f"partial rotary needs the unscaled rope, not rope_scaling={config.rope_scaling}")
    experts, top_k = config.num_experts, config.num_experts_per_tok
    require(isinstance(experts, int) and experts >= 0, "num_experts", experts, "must be an integer >= 0 (0: a dense MLP)")
    if experts:
        require(isinstance(top_k, int) and 1 <= top_k <= experts, "num_experts_per_tok", top_k, f"must be an integer in [1, num_experts={experts}]")


def check_kv_heads(num_kv_heads: int, tp: int) -> None:
    require(
        num_kv_heads % tp == 0 or tp % num_kv_heads == 0,
        "num_kv_heads",
        num_kv_heads,
        f"must be a multiple of tp={tp} (sharded) or divide it (replicated)",
    )


class PendingCollective:
    """A collective that may still be in flight. `wait()` returns its result once it is complete
    (on NCCL: once the caller's current stream waits for it; the host does not block), and may
    be called more than once. `buffer` is the storage the transport writes into: reading it
    before `wait()` reads whatever is there yet. `finish` turns the completed buffer into the
    result (e.g. moves the gathered dim back); `work` is the transport's handle (None: done)."""

    def __init__(self, buffer: torch.Tensor, work=None, finish=None, keep_alive: tuple = ()):
        self.buffer, self._work, self._finish = buffer, work, finish
        self._keep_alive = keep_alive  # inputs the transport still reads until completion
        self._result = None

    def wait(self) -> torch.Tensor:
        if self._result is None:
            if self._work is not None:
                self._work.wait()
            self._result = self.buffer if self._finish is None else self._finish(self.buffer)
            self._work, self._keep_alive = None, ()
        return self._result


class Communicator(abc.ABC):
    """The collectives a TP layer may use, over one TP group.

    Contract: collectives are synchronous from the caller's point of view and return the
    result. `all_reduce` may reuse its input's storage (callers pass tensors they own).
    `all_gather` / `reduce_scatter` concatenate / split along `dim`, in rank order.
    `all_gather_async` / `reduce_scatter_async` start the same collectives and return a
    PendingCollective; every rank must issue the same collectives in the same order, and wait
    for each before using its result. The default runs the synchronous collective (nothing
    overlaps), so a communicator needs only the five synchronous collectives. `overlap_flops`
    is an annotation for communicators that record (CountingCommunicator): the matmul FLOPs the
    caller computes while this transfer is in flight; others ignore it.
    """

    rank: int
    world_size: int

    @abc.abstractmethod
    def all_reduce(self, tensor: torch.Tensor) -> torch.Tensor: ...

    @abc.abstractmethod
    def all_gather(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor: ...

    @abc.abstractmethod
    def reduce_scatter(self, tensor: torch.Tensor, dim: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> torch.Tensor: ...

    @abc.abstractmethod
    def barrier(self) -> None: ...

    def all_gather_async(self, tensor: torch.Tensor, dim: int = -1, overlap_flops: int = 0) -> PendingCollective:
        return PendingCollective(self.all_gather(tensor, dim))

    def reduce_scatter_async(self, tensor: torch.Tensor, dim: int = 0, overlap_flops: int = 0) -> PendingCollective:
        return PendingCollective(self.reduce_scatter(tensor, dim))

    def shard(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's contiguous 1/world_size slice along `dim` (no communication)."""
        size = tensor.shape[dim]
        require_divisible(f"tensor.shape[{dim}]", size, self.world_size)
        return tensor.narrow(dim, self.rank * (size // self.world_size), size // self.world_size).contiguous()
