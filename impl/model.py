"""Llama-family decoder built from `impl.tensor_parallel` layers.

Foundation scope: one pre-norm transformer block. The full model, loader and generation
build on it (see DISTRIBUTED_ARCHITECTURE.md).
"""
from __future__ import annotations

import torch
from torch import nn

from .architecture import Communicator, ModelConfig
from .tensor_parallel import ParallelAttention, ParallelMLP, RMSNorm

# Names of one block's full tensors, in Hugging Face Llama naming (without the layer prefix).
BLOCK_TENSORS = (
    "input_layernorm.weight",
    "self_attn.q_proj.weight",
    "self_attn.k_proj.weight",
    "self_attn.v_proj.weight",
    "self_attn.o_proj.weight",
    "post_attention_layernorm.weight",
    "mlp.gate_proj.weight",
    "mlp.up_proj.weight",
    "mlp.down_proj.weight",
)
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")


class TransformerBlock(nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). x: (batch, seq, hidden) replicated on every rank.

    Per block and forward: two all-reduces of (batch, seq, hidden) — one after o_proj, one
    after the MLP's down projection — and nothing else.
    """

    def __init__(self, attention: ParallelAttention, mlp: ParallelMLP, input_norm: RMSNorm, post_attention_norm: RMSNorm):
        super().__init__()
        self.attention, self.mlp = attention, mlp
        self.input_norm, self.post_attention_norm = input_norm, post_attention_norm

    def forward(self, x, start_pos: int = 0, use_cache: bool = False):
        h = x + self.attention(self.input_norm(x), start_pos, use_cache)
        return h + self.mlp(self.post_attention_norm(h))

    @classmethod
    def from_full(cls, tensors: dict, config: ModelConfig, comm: Communicator, dtype=torch.float32, device="cpu", sequence_parallel=False):
        """Build rank `comm.rank`'s shard from one block's full tensors (names: BLOCK_TENSORS).

        With `sequence_parallel`, x and the output are (batch, seq/tp, hidden) shards of the
        sequence: norms and residuals run on 1/tp of the tokens, and each all-reduce becomes
        an all-gather before the column-parallel input and a reduce-scatter after the row-parallel output.
        """
        kw = dict(dtype=dtype, device=device)
        t = tensors
        biases = {n.split(".")[1][0] + "_bias": t[n] for n in QKV_BIASES if n in t}
        attention = ParallelAttention.from_full(
            t["self_attn.q_proj.weight"], t["self_attn.k_proj.weight"], t["self_attn.v_proj.weight"], t["self_attn.o_proj.weight"],
            comm, head_dim=config.head_dim, rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, sequence_parallel=sequence_parallel, **biases, **kw,
        )
        mlp = ParallelMLP.from_full(t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"], comm, sequence_parallel=sequence_parallel, **kw)
        norm1 = RMSNorm.from_full(t["input_layernorm.weight"], eps=config.rms_norm_eps, **kw)
        norm2 = RMSNorm.from_full(t["post_attention_layernorm.weight"], eps=config.rms_norm_eps, **kw)
        return cls(attention, mlp, norm1, norm2)


def random_block_tensors(config: ModelConfig, generator: torch.Generator, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Full float32 tensors for one block, Llama-shaped, drawn from `generator`."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (config.num_heads * d, h),
        "self_attn.k_proj.weight": (config.num_kv_heads * d, h),
        "self_attn.v_proj.weight": (config.num_kv_heads * d, h),
        "self_attn.o_proj.weight": (h, config.num_heads * d),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if config.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (config.num_heads * d,), "self_attn.k_proj.bias": (config.num_kv_heads * d,), "self_attn.v_proj.bias": (config.num_kv_heads * d,)})
    out = {}
    for name, shape in shapes.items():
        if name.endswith("layernorm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[name] = std * torch.randn(shape, generator=generator)
    return out
