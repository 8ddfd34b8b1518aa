"""Contracts shared by every room of `impl/`: configs, errors and the Communicator interface.

Nothing here touches torch.distributed. Collectives live in `impl.communication` alone;
`impl.orchestrator` creates and destroys process groups but moves no tensors itself.
"""
from __future__ import annotations

import abc
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


HF_MODEL_TYPES = ("llama", "mistral", "qwen2")

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype, argument: str = "dtype") -> torch.dtype:
    if isinstance(name, torch.dtype):
        require(name in DTYPES.values(), argument, name, f"must be one of {sorted(DTYPES)}")
        return name
    require(name in DTYPES, argument, name, f"must be one of {sorted(DTYPES)}")
    return DTYPES[name]


@dataclass(frozen=True)
class ModelConfig:
    """A Llama-family decoder. Sizes are the full (unsharded) ones."""

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

    @classmethod
    def from_hf(cls, hf: dict) -> "ModelConfig":
        """From a Hugging Face config.json dict (transformers 4.x `rope_theta`/`rope_scaling`
        or 5.x `rope_parameters`). Supported model_type: llama, mistral, qwen2."""
        kind = hf.get("model_type")
        require(kind in HF_MODEL_TYPES, "model_type", kind, f"must be one of {HF_MODEL_TYPES}")
        require(hf.get("hidden_act", "silu") == "silu", "hidden_act", hf.get("hidden_act"), "must be silu (SwiGLU MLP)")
        require(not hf.get("mlp_bias", False), "mlp_bias", hf.get("mlp_bias"), "MLP biases are not supported")
        rope = dict(hf.get("rope_parameters") or {})
        theta = rope.pop("rope_theta", hf.get("rope_theta", 10000.0))
        scaling = hf.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        heads = hf["num_attention_heads"]
        attention_bias = bool(hf.get("attention_bias", False))
        return cls(
            vocab_size=hf["vocab_size"], hidden_size=hf["hidden_size"], intermediate_size=hf["intermediate_size"],
            num_layers=hf["num_hidden_layers"], num_heads=heads, num_kv_heads=hf.get("num_key_value_heads") or heads,
            head_dim=hf.get("head_dim"), rms_norm_eps=hf.get("rms_norm_eps", 1e-6), rope_theta=float(theta), rope_scaling=scaling,
            max_seq_len=hf.get("max_position_embeddings", 2048), qkv_bias=kind == "qwen2" or attention_bias,
            o_bias=kind != "qwen2" and attention_bias, tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
            extra={"model_type": kind, "sliding_window": hf.get("sliding_window") if hf.get("use_sliding_window", kind == "mistral") else None},
        )

    def check_tp(self, tp: int) -> None:
        """Raise TPConfigError if this model cannot be sharded `tp` ways."""
        require(isinstance(tp, int) and tp >= 1, "tp", tp, "must be an integer >= 1")
        require_divisible("num_heads", self.num_heads, tp)
        check_kv_heads(self.num_kv_heads, tp)
        require_divisible("intermediate_size", self.intermediate_size, tp)


def check_kv_heads(num_kv_heads: int, tp: int) -> None:
    require(
        num_kv_heads % tp == 0 or tp % num_kv_heads == 0,
        "num_kv_heads",
        num_kv_heads,
        f"must be a multiple of tp={tp} (sharded) or divide it (replicated)",
    )


class Communicator(abc.ABC):
    """The collectives a TP layer may use, over one TP group.

    Contract: collectives are synchronous from the caller's point of view and return the
    result. `all_reduce` may reuse its input's storage (callers pass tensors they own).
    `all_gather` / `reduce_scatter` concatenate / split along `dim`, in rank order.
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

    def shard(self, tensor: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """This rank's contiguous 1/world_size slice along `dim` (no communication)."""
        size = tensor.shape[dim]
        require_divisible(f"tensor.shape[{dim}]", size, self.world_size)
        return tensor.narrow(dim, self.rank * (size // self.world_size), size // self.world_size).contiguous()
