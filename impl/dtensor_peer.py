"""The "dtensor" peer: the same Llama-family model, sharded by PyTorch's own tensor parallelism.

A second, independent implementation under the same harness. `PlainLlama` is an ordinary
single-device model (separate nn.Linear q/k/v/o, gate/up/down, HF module names, so its
state dict keys are the checkpoint's tensor names). `parallelize` shards it with
`torch.distributed.tensor.parallel.parallelize_module` and a declarative plan
(`tp_plan`): column-wise q/k/v/gate/up, row-wise o/down, vocab-row-wise embedding and a
column-wise LM head gathered to replicated logits. Weights are sharded by `distribute_tensor`
from the full replicated weights every rank built (fine for test-sized models).

Unlike tpgate's layers (impl.tensor_parallel), every collective here is issued by DTensor,
not by impl.communication — that independence is the point of a peer. Replicated pieces
(RMSNorm, rotary tables, `apply_rotary`) are reused from impl.tensor_parallel, so rotary and
norm numerics are identical by construction.

Scope: the peer shards kv heads and vocabulary rows and never replicates or pads them, so
num_kv_heads and vocab_size must be multiples of tp (`check_dtensor_tp`, TPConfigError
otherwise, raised before any tensor is read or collective entered). No sliding-window
attention (same guard as tpgate), no sequence parallelism.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import ModelConfig, TPConfigError, require, require_divisible
from .model import checkpoint_shapes
from .tensor_parallel import RMSNorm, apply_rotary, rotary_inv_freq, rotary_tables

COLWISE = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")
ROWWISE = ("self_attn.o_proj", "mlp.down_proj")


# --------------------------------------------------------------------------- plain model


def _full(src, dtype, device) -> torch.Tensor:
    """A fresh tensor from a torch tensor or a safetensors lazy slice (never aliases `src`)."""
    t = src if isinstance(src, torch.Tensor) else src[:]
    return t.to(dtype=dtype, device=device, copy=True)


def _linear(weight: torch.Tensor, bias: torch.Tensor | None = None) -> nn.Linear:
    out_features, in_features = weight.shape
    layer = nn.Linear(in_features, out_features, bias=bias is not None, device="meta")  # no throwaway init
    layer.weight = nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        layer.bias = nn.Parameter(bias, requires_grad=False)
    return layer


def _norm(weight: torch.Tensor, eps: float) -> RMSNorm:
    norm = RMSNorm(weight.shape[0], eps=eps, dtype=weight.dtype, device="meta")
    norm.weight = nn.Parameter(weight, requires_grad=False)
    return norm


class PlainAttention(nn.Module):
    """Causal GQA self-attention. Head counts come from the projections' actual output
    widths, so after column-wise sharding each rank attends with its num_heads/tp query heads
    and num_kv_heads/tp kv heads (contiguous blocks: rank r's query heads use rank r's kv heads)."""

    def __init__(self, q_proj, k_proj, v_proj, o_proj, head_dim: int):
        super().__init__()
        self.q_proj, self.k_proj, self.v_proj, self.o_proj = q_proj, k_proj, v_proj, o_proj
        self.head_dim = head_dim
        self.past: tuple[torch.Tensor, torch.Tensor] | None = None  # KV cache: (batch, local_kv, seq, d) each

    def forward(self, x, cos, sin, start_pos: int = 0, use_cache: bool = False):
        b, s, _ = x.shape
        d = self.head_dim
        q, k, v = self.q_proj(x), self.k_proj(x), self.v_proj(x)
        hq, hkv = q.shape[-1] // d, k.shape[-1] // d  # local counts: sharded by ColwiseParallel
        q = q.view(b, s, hq, d).transpose(1, 2)
        k = k.view(b, s, hkv, d).transpose(1, 2)
        v = v.view(b, s, hkv, d).transpose(1, 2)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        if use_cache:
            if start_pos == 0:
                self.past = None
            require(self.past is None or self.past[0].shape[2] == start_pos, "start_pos", start_pos,
                    f"must equal the cached length {0 if self.past is None else self.past[0].shape[2]}")
            if self.past is not None:
                k, v = torch.cat([self.past[0], k], 2), torch.cat([self.past[1], v], 2)
            self.past = (k, v)
        if hkv != hq:
            k = k.repeat_interleave(hq // hkv, dim=1)
            v = v.repeat_interleave(hq // hkv, dim=1)
        if start_pos == 0:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            q_pos = torch.arange(start_pos, start_pos + s, device=x.device)[:, None]
            mask = torch.arange(k.shape[2], device=x.device)[None, :] <= q_pos
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))


class PlainMLP(nn.Module):
    def __init__(self, gate_proj, up_proj, down_proj):
        super().__init__()
        self.gate_proj, self.up_proj, self.down_proj = gate_proj, up_proj, down_proj

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class PlainBlock(nn.Module):
    def __init__(self, self_attn: PlainAttention, mlp: PlainMLP, input_layernorm: RMSNorm, post_attention_layernorm: RMSNorm):
        super().__init__()
        self.self_attn, self.mlp = self_attn, mlp
        self.input_layernorm, self.post_attention_layernorm = input_layernorm, post_attention_layernorm

    def forward(self, x, cos, sin, start_pos: int = 0, use_cache: bool = False):
        h = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, use_cache)
        return h + self.mlp(self.post_attention_layernorm(h))


class PlainDecoder(nn.Module):
    def __init__(self, embed_tokens: nn.Embedding, layers: list[PlainBlock], norm: RMSNorm):
        super().__init__()
        self.embed_tokens, self.layers, self.norm = embed_tokens, nn.ModuleList(layers), norm


class PlainLlama(nn.Module):
    """Single-device Llama/Mistral/Qwen2 decoder with Hugging Face module names
    (`model.layers.{i}.self_attn.q_proj`, ..., `lm_head`).

    forward(ids (batch, seq) long) -> logits (batch, seq, vocab_size) (or (batch, 1, vocab)
    with `last_only`). With `use_cache`, keys/values are kept per layer so that decode steps
    (`start_pos` = tokens already cached) attend to the prefix; `start_pos=0` resets the cache.
    """

    def __init__(self, config: ModelConfig, model: PlainDecoder, lm_head: nn.Linear, dtype: torch.dtype):
        super().__init__()
        self.config, self.model, self.lm_head, self.dtype = config, model, lm_head, dtype
        device = lm_head.weight.device
        self.register_buffer("inv_freq", rotary_inv_freq(config.head_dim, config.rope_theta, config.rope_scaling).to(device), persistent=False)

    @classmethod
    def from_tensors(cls, tensors: Mapping, config: ModelConfig, dtype=torch.float32, device="cpu") -> "PlainLlama":
        """Full model from full tensors (or safetensors lazy slices) in Hugging Face naming."""
        shapes = checkpoint_shapes(config)
        for name, shape in shapes.items():
            require(name in tensors, name, "missing", "tensor required by the config")
            got = tuple(tensors[name].shape) if isinstance(tensors[name], torch.Tensor) else tuple(tensors[name].get_shape())
            require(got == tuple(shape), name, got, f"shape must be {tuple(shape)} for this config")

        def t(name):
            return _full(tensors[name], dtype, device)

        def opt(name):
            return t(name) if name in shapes else None

        embed = nn.Embedding(config.vocab_size, config.hidden_size, device="meta")
        embed.weight = nn.Parameter(t("model.embed_tokens.weight"), requires_grad=False)
        layers = []
        for i in range(config.num_layers):
            p = f"model.layers.{i}."
            attn = PlainAttention(
                _linear(t(p + "self_attn.q_proj.weight"), opt(p + "self_attn.q_proj.bias")),
                _linear(t(p + "self_attn.k_proj.weight"), opt(p + "self_attn.k_proj.bias")),
                _linear(t(p + "self_attn.v_proj.weight"), opt(p + "self_attn.v_proj.bias")),
                _linear(t(p + "self_attn.o_proj.weight"), opt(p + "self_attn.o_proj.bias")),
                config.head_dim,
            )
            mlp = PlainMLP(_linear(t(p + "mlp.gate_proj.weight")), _linear(t(p + "mlp.up_proj.weight")), _linear(t(p + "mlp.down_proj.weight")))
            layers.append(PlainBlock(attn, mlp, _norm(t(p + "input_layernorm.weight"), config.rms_norm_eps), _norm(t(p + "post_attention_layernorm.weight"), config.rms_norm_eps)))
        decoder = PlainDecoder(embed, layers, _norm(t("model.norm.weight"), config.rms_norm_eps))
        if config.tie_word_embeddings:
            lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False, device="meta")
            lm_head.weight = embed.weight
        else:
            lm_head = _linear(t("lm_head.weight"))
        return cls(config, decoder, lm_head, dtype).eval()

    def rotary(self, positions: torch.Tensor):
        # float64 tables for a float64 model, as tpgate
        return rotary_tables(positions, self.inv_freq, self.dtype, self.config.rope_theta, self.config.rope_scaling)

    def forward(self, ids: torch.Tensor, start_pos: int = 0, use_cache: bool = False, last_only: bool = False) -> torch.Tensor:
        seq = ids.shape[1]
        window = self.config.extra.get("sliding_window")
        require(window is None or start_pos + seq <= window, "sequence length", start_pos + seq, f"must be <= sliding_window={window} (sliding-window attention is not implemented)")
        require(start_pos + seq <= self.config.max_seq_len, "sequence length", start_pos + seq, f"must be <= max_position_embeddings={self.config.max_seq_len}")
        cos, sin = self.rotary(torch.arange(start_pos, start_pos + seq, device=ids.device)[None])
        h = self.model.embed_tokens(ids)
        for layer in self.model.layers:
            h = layer(h, cos, sin, start_pos, use_cache)
        h = self.model.norm(h)
        if last_only:
            h = h[:, -1:]
        return self.lm_head(h)

    def truncate_cache(self, length: int) -> None:
        """Keep only the first `length` cached positions of every layer (rewinds the KV cache, e.g.
        to the prompt before each timed decode run of a benchmark)."""
        for layer in self.model.layers:
            past = layer.self_attn.past
            require(past is None or past[0].shape[2] >= length, "length", length, f"must be <= the cached length {0 if past is None else past[0].shape[2]}")
            if past is not None:
                layer.self_attn.past = (past[0][:, :, :length], past[1][:, :, :length])

    @torch.no_grad()
    def generate_greedy(self, ids: torch.Tensor, max_new_tokens: int) -> torch.Tensor:
        """Greedy continuation (batch, max_new_tokens) with the KV cache."""
        require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "must be >= 1")
        logits = self(ids, 0, use_cache=True, last_only=True)[:, -1]
        out = []
        for step in range(max_new_tokens):
            token = logits.argmax(-1)
            out.append(token)
            if step + 1 < max_new_tokens:
                logits = self(token[:, None], ids.shape[1] + step, use_cache=True)[:, -1]
        return torch.stack(out, 1)


# --------------------------------------------------------------------------- tensor parallelism


def check_dtensor_tp(config: ModelConfig, tp: int) -> None:
    """Raise TPConfigError if the dtensor peer cannot shard this model `tp` ways."""
    require(isinstance(tp, int) and tp >= 1, "tp", tp, "must be an integer >= 1")
    # the peer's plain model is a Llama with separate q/k/v and gate/up tensors and whole-head rope
    require(not config.num_experts, "num_experts", config.num_experts, "must be 0: the dtensor peer has no mixture-of-experts layer")
    require(not config.fused_projections, "fused_projections", True, "the dtensor peer loads separate q/k/v and gate/up tensors, not Phi-3's fused qkv_proj/gate_up_proj")
    require(config.rotary_dim is None, "rotary_dim", config.rotary_dim, "the dtensor peer rotates whole heads (no partial rotary)")
    require_divisible("num_heads", config.num_heads, tp)
    require(config.num_kv_heads % tp == 0, "num_kv_heads", config.num_kv_heads,
            f"must be a multiple of tp={tp}: the dtensor peer shards kv heads and does not replicate them")
    require_divisible("intermediate_size", config.intermediate_size, tp)
    require(config.vocab_size % tp == 0, "vocab_size", config.vocab_size,
            f"must be a multiple of tp={tp}: the dtensor peer shards vocabulary rows without padding")


def tp_plan(config: ModelConfig) -> dict:
    """{module path: ParallelStyle} for parallelize_module, one explicit entry per sharded module."""
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {
        "model.embed_tokens": RowwiseParallel(input_layouts=Replicate()),  # vocab rows; output all-reduced
        "lm_head": ColwiseParallel(output_layouts=Replicate()),  # vocab columns; logits all-gathered
    }
    for i in range(config.num_layers):
        for name in COLWISE:
            plan[f"model.layers.{i}.{name}"] = ColwiseParallel()
        for name in ROWWISE:
            plan[f"model.layers.{i}.{name}"] = RowwiseParallel()
    return plan


def tp_mesh(ctx):
    """A 1-D DeviceMesh over the rank's TP process group (ctx.manager.tp_group)."""
    from torch.distributed.device_mesh import DeviceMesh

    return DeviceMesh.from_group(ctx.manager.tp_group, ctx.device.type)


def parallelize(model: PlainLlama, mesh) -> PlainLlama:
    """Shard `model` in place over the 1-D `mesh` with `tp_plan`; returns it.

    The config is checked first, so an unsupported one raises TPConfigError before any
    collective. Every rank must hold the same full weights (distribute_tensor scatters rank
    0's). A tied LM head is re-tied to the sharded embedding (both are Shard(0) of one table).
    """
    from torch.distributed.tensor.parallel import parallelize_module

    check_dtensor_tp(model.config, mesh.size())
    parallelize_module(model, mesh, tp_plan(model.config))
    if model.config.tie_word_embeddings:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model


def load_dtensor_model(directory, ctx, dtype=torch.float32) -> PlainLlama:
    """Read a Hugging Face checkpoint directory and build this rank's dtensor-peer model.

    Every rank reads the full weights; with a TP group of more than one rank the model is
    then parallelized over it. TPConfigError (before any tensor read or collective) when
    the peer cannot shard the model ctx.comm.world_size ways.
    """
    from .model_loader import HFCheckpoint, read_config

    config = read_config(directory)
    tp = ctx.comm.world_size
    check_dtensor_tp(config, tp)
    source = HFCheckpoint(directory)
    source.validate(config)
    model = PlainLlama.from_tensors(source, config, dtype=dtype, device=ctx.device)
    if tp > 1:
        parallelize(model, tp_mesh(ctx))
    return model.eval()


# --------------------------------------------------------------------------- random weights (sweeps)


class _RandomSlice:
    """A lazy, safetensors-slice-like random tensor: `get_shape()` costs nothing, `[:]` draws it.

    PlainLlama.from_tensors checks every shape before it reads any tensor, so a sweep never
    holds more than the model plus one tensor being drawn (8B in bf16 fits one GPU)."""

    def __init__(self, shape, dtype, device, generator, std: float, norm: bool):
        self.shape, self.dtype, self.device, self.generator, self.std, self.norm = tuple(shape), dtype, device, generator, std, norm

    def get_shape(self):
        return list(self.shape)

    def __getitem__(self, _all):
        if self.norm:  # RMSNorm weights near 1, as trained models have them
            return torch.ones(self.shape, dtype=self.dtype, device=self.device)
        t = torch.empty(self.shape, dtype=self.dtype, device=self.device)
        return t.normal_(0.0, self.std, generator=self.generator)


def random_plain_model(config: ModelConfig, dtype=torch.bfloat16, device="cpu", seed: int = 0, std: float = 0.02) -> PlainLlama:
    """A full single-device PlainLlama of `config` with random weights drawn directly on `device`
    in `dtype` (no float32 or host copy): the peer's model for timing sweeps, where values do not
    matter but shapes do. Every rank passes the same `seed`, so the replicated weights
    `parallelize` starts from agree."""
    device = torch.device(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    tensors = {name: _RandomSlice(shape, dtype, device, generator, std, name.endswith("norm.weight")) for name, shape in checkpoint_shapes(config).items()}
    return PlainLlama.from_tensors(tensors, config, dtype=dtype, device=device)


def shard_config(config: ModelConfig, tp: int) -> ModelConfig:
    """The config of a plain model whose every matrix has one rank's shard shape at `tp`.

    A PlainLlama of this config computes exactly one rank's share of the parallelized peer's
    work (num_heads/tp query heads, num_kv_heads/tp kv heads, intermediate/tp, vocab/tp
    embedding rows and LM-head columns) and issues no collective: the peer's T_null, and the
    compute part of its projection. head_dim stays the full model's."""
    check_dtensor_tp(config, tp)
    return replace(config, vocab_size=config.vocab_size // tp, intermediate_size=config.intermediate_size // tp,
                   num_heads=config.num_heads // tp, num_kv_heads=config.num_kv_heads // tp, head_dim=config.head_dim)


def peer_collectives(config: ModelConfig, batch: int, seq: int, tp: int, dtype, last_only: bool) -> list[dict]:
    """The collectives one forward of the parallelized peer issues, in CountingCommunicator's
    record form ({"kind", "nbytes"}; nbytes = the input tensor's bytes on one rank).

    DTensor issues them itself, out of impl.communication's sight, so they are listed from the
    plan: the vocab-row-wise embedding's all-reduce (Partial -> Replicate), one all-reduce per
    row-wise o_proj and down_proj, and the LM head's all-gather of the vocab-sharded logits
    (last position only with `last_only`). None at tp == 1. The dtensor suite checks this list
    against torch's CommDebugMode on a real parallelized peer."""
    check_dtensor_tp(config, tp)
    if tp == 1:
        return []
    elsize = torch.empty((), dtype=dtype).element_size()
    hidden = batch * seq * config.hidden_size * elsize
    reduce = {"kind": "all_reduce", "nbytes": hidden}
    gather = {"kind": "all_gather", "nbytes": batch * (1 if last_only else seq) * (config.vocab_size // tp) * elsize}
    return [dict(reduce)] + [dict(reduce) for _ in range(2 * config.num_layers)] + [gather]


__all__ = ["PlainLlama", "TPConfigError", "check_dtensor_tp", "load_dtensor_model", "parallelize", "peer_collectives", "random_plain_model",
           "shard_config", "tp_mesh", "tp_plan"]
