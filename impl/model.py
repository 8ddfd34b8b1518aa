"""Llama-family decoder (Llama 1/2/3, Mistral, Qwen2; Qwen3, Gemma 2, Gemma 3 text, Phi-3 and Mixtral
through the family fields of ModelConfig) built from `impl.tensor_parallel` layers (Mixtral's
mixture-of-experts MLP: `impl.moe`).

Tensor names follow Hugging Face's Llama layout (`model.layers.{i}.self_attn.q_proj.weight`, ...);
`LlamaModel.from_tensors` takes any mapping from those names to tensors or safetensors lazy
slices, so a checkpoint file, a resharded tpgate checkpoint and a test's random weights all
build the model through the layers' one `from_full` path.
"""
from __future__ import annotations

import dataclasses
from collections.abc import Mapping

import torch
from torch import nn

from .architecture import Communicator, ModelConfig, require
from .communication import gather_from_parallel
from .fused_rows import split_rows
from .moe import ParallelMoE, moe_block_shapes
from .overlap import check_chunk_count, check_chunks
from .tensor_parallel import (OverlapChunks, ParallelAttention, ParallelLMHead, ParallelMLP, RMSNorm, RowParallelLinear, SequenceParallelTags,
                              UnitOffsetRMSNorm, VocabParallelEmbedding, tag_sequence_parallel_grad)

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
O_BIAS = "self_attn.o_proj.bias"


class TransformerBlock(SequenceParallelTags, nn.Module):
    """x + attn(norm(x)), then + mlp(norm(.)). x: (batch, seq, hidden) replicated on every rank.

    Per block and forward: two all-reduces of (batch, seq, hidden) — one after o_proj, one
    after the MLP's down projection — and nothing else.

    With `sequence_parallel` the norms (and o_proj's/down's bias) see only this rank's
    sequence shard, so after backward their `.grad` is a per-rank partial: they are tagged
    `sequence_parallel_grad`, and whoever runs backward (a training loop, the harness) must
    call `impl.communication.all_reduce_sequence_parallel_grads(block, comm)` after it.
    """

    def __init__(self, attention: ParallelAttention, mlp: ParallelMLP, input_norm: RMSNorm, post_attention_norm: RMSNorm):
        super().__init__()
        self.attention, self.mlp = attention, mlp
        self.input_norm, self.post_attention_norm = input_norm, post_attention_norm
        self.sequence_parallel = attention.o_proj.sequence_parallel

    def replicated_in_sequence_region(self):
        """The norms; the sub-layers carry their own flag (LlamaModel sets every module's)."""
        return [self.input_norm.weight, self.post_attention_norm.weight]

    def forward(self, x, start_pos: int | torch.Tensor = 0, use_cache: bool = False):
        h = x + self.attention(self.input_norm(x), start_pos, use_cache)
        return h + self.mlp(self.post_attention_norm(h))

    @classmethod
    def from_full(cls, tensors: dict, config: ModelConfig, comm: Communicator, dtype=torch.float32, device="cpu", sequence_parallel=False, layer: int = 0):
        """Build rank `comm.rank`'s shard of block `layer` (its window and rope) from one block's
        full tensors (names: block_shapes(config): BLOCK_TENSORS, with Phi-3's fused tensors or
        Mixtral's router and experts where the config says so).

        With `sequence_parallel`, x and the output are (batch, seq/tp, hidden) shards of the
        sequence: norms and residuals run on 1/tp of the tokens, and each all-reduce becomes
        an all-gather before the column-parallel input and a reduce-scatter after the row-parallel output.
        """
        kw = dict(dtype=dtype, device=device)
        t = unfused_block_tensors(tensors, config) if config.fused_projections else tensors
        attention = block_attention(t, config, comm, layer, sequence_parallel, **kw)
        if config.num_experts:
            mlp = ParallelMoE.from_full(t, config, comm, sequence_parallel=sequence_parallel, **kw)
        else:
            mlp = ParallelMLP.from_full(t["mlp.gate_proj.weight"], t["mlp.up_proj.weight"], t["mlp.down_proj.weight"], comm, sequence_parallel=sequence_parallel,
                                        activation=config.hidden_act, **kw)
        norms = [norm_class(config).from_full(t[f"{name}.weight"], eps=config.rms_norm_eps, **kw) for name in block_norms(config)]
        return cls(attention, mlp, *norms)


class SandwichNormBlock(TransformerBlock):
    """Gemma 2/3: h = x + post_attention_norm(attn(input_norm(x))), then
    h + post_feedforward_norm(mlp(pre_feedforward_norm(h))). Norm names as in Hugging Face's
    checkpoint (Gemma's post_attention_layernorm normalises the attention output). Shapes and
    communication as TransformerBlock's; with sequence_parallel all four norms run on sequence
    shards and are tagged sequence_parallel_grad."""

    def __init__(self, attention: ParallelAttention, mlp: ParallelMLP, input_norm: RMSNorm, post_attention_norm: RMSNorm, pre_feedforward_norm: RMSNorm,
                 post_feedforward_norm: RMSNorm):
        super().__init__(attention, mlp, input_norm, post_attention_norm)
        self.pre_feedforward_norm, self.post_feedforward_norm = pre_feedforward_norm, post_feedforward_norm
        self.sequence_parallel = self.sequence_parallel  # tags the two norms set after TransformerBlock's tagging

    def replicated_in_sequence_region(self):
        later = [getattr(self, name, None) for name in ("pre_feedforward_norm", "post_feedforward_norm")]
        return super().replicated_in_sequence_region() + [norm.weight for norm in later if norm is not None]

    def forward(self, x, start_pos: int | torch.Tensor = 0, use_cache: bool = False):
        h = x + self.post_attention_norm(self.attention(self.input_norm(x), start_pos, use_cache))
        return h + self.post_feedforward_norm(self.mlp(self.pre_feedforward_norm(h)))


SANDWICH_NORMS = ("input_layernorm", "post_attention_layernorm", "pre_feedforward_layernorm", "post_feedforward_layernorm")
QK_NORMS = ("self_attn.q_norm.weight", "self_attn.k_norm.weight")


def block_class(config: ModelConfig) -> type[TransformerBlock]:
    return SandwichNormBlock if config.sandwich_norms else TransformerBlock


def norm_class(config: ModelConfig) -> type[RMSNorm]:
    """Gemma's (1 + w) norm in float32, or Llama's w * norm(x)."""
    return UnitOffsetRMSNorm if config.norm_unit_offset else RMSNorm


def block_norms(config: ModelConfig) -> tuple[str, ...]:
    """A block's hidden-size norms, in the order its class takes them."""
    return SANDWICH_NORMS if config.sandwich_norms else ("input_layernorm", "post_attention_layernorm")


def block_attention(t: Mapping, config: ModelConfig, comm: Communicator, layer: int, sequence_parallel: bool, dtype=torch.float32, device="cpu") -> ParallelAttention:
    """Rank comm.rank's attention of block `layer` from its full tensors `t` (block names), with
    the layer's rope (ModelConfig.layer_rope), window (layer_window) and the family's features."""
    kw = dict(dtype=dtype, device=device)
    biases = {n.split(".")[1][0] + "_bias": t[n] for n in (*QKV_BIASES, O_BIAS) if n in t}
    features = {"sliding_window": config.layer_window(layer), "softcap": config.attn_logit_softcapping, "rotary_dim": config.rotary_dim,
                "scale": None if config.query_pre_attn_scalar is None else config.query_pre_attn_scalar ** -0.5}
    if config.qk_norm:
        features["q_norm"], features["k_norm"] = (norm_class(config).from_full(t[name], eps=config.rms_norm_eps, **kw) for name in QK_NORMS)
    theta, scaling = config.layer_rope(layer)
    return ParallelAttention.from_full(t["self_attn.q_proj.weight"], t["self_attn.k_proj.weight"], t["self_attn.v_proj.weight"], t["self_attn.o_proj.weight"],
                                       comm, head_dim=config.head_dim, rope_theta=theta, rope_scaling=scaling, sequence_parallel=sequence_parallel,
                                       **biases, **kw, **features)


def block_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Full shape of every tensor of one block, by its name within the block."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads * d, config.num_kv_heads * d
    shapes = {
        "input_layernorm.weight": (h,),
        "self_attn.q_proj.weight": (q, h),
        "self_attn.k_proj.weight": (kv, h),
        "self_attn.v_proj.weight": (kv, h),
        "self_attn.o_proj.weight": (h, q),
        "post_attention_layernorm.weight": (h,),
        "mlp.gate_proj.weight": (i, h),
        "mlp.up_proj.weight": (i, h),
        "mlp.down_proj.weight": (h, i),
    }
    if config.fused_projections:
        shapes = fused_block_shapes(shapes)
    if config.num_experts:
        shapes = {**{n: v for n, v in shapes.items() if not n.startswith("mlp.")}, **moe_block_shapes(config)}
    if config.qkv_bias:
        shapes.update({"self_attn.q_proj.bias": (q,), "self_attn.k_proj.bias": (kv,), "self_attn.v_proj.bias": (kv,)})
    if config.o_bias:
        shapes[O_BIAS] = (h,)
    shapes.update(family_block_shapes(config))
    return shapes


def family_block_shapes(config: ModelConfig) -> dict[str, tuple]:
    """The block tensors of Qwen3 / Gemma beyond the Llama family's."""
    shapes = {name: (config.head_dim,) for name in QK_NORMS} if config.qk_norm else {}
    if config.sandwich_norms:
        shapes.update({f"{name}.weight": (config.hidden_size,) for name in SANDWICH_NORMS[2:]})
    return shapes


FUSED = {"self_attn.qkv_proj.weight": ("self_attn.q_proj.weight", "self_attn.k_proj.weight", "self_attn.v_proj.weight"),
         "mlp.gate_up_proj.weight": ("mlp.gate_proj.weight", "mlp.up_proj.weight")}


def fused_block_shapes(shapes: dict[str, tuple]) -> dict[str, tuple]:
    """A block's shapes with each FUSED group replaced by its fused tensor (rows laid end to end), in place of its first part."""
    parts = {part: fused for fused, group in FUSED.items() for part in group}
    out = {}
    for name, shape in shapes.items():
        if name not in parts:
            out[name] = shape
        elif name == FUSED[parts[name]][0]:
            out[parts[name]] = (sum(shapes[p][0] for p in FUSED[parts[name]]), *shape[1:])
    return out


def unfused_block_tensors(tensors: dict, config: ModelConfig) -> dict:
    """One block's tensors with each fused tensor (Phi-3 naming) split into its q, k, v (gate, up)
    row ranges, read lazily (impl/fused_rows.py): a rank that shards them reads only its rows."""
    sizes = {name: shape[0] for name, shape in block_shapes(dataclasses.replace(config, fused_projections=False)).items()}
    out = {name: t for name, t in tensors.items() if name not in FUSED}
    for fused, group in FUSED.items():
        out.update(zip(group, split_rows(tensors[fused], [sizes[p] for p in group], fused)))
    return out


def checkpoint_shapes(config: ModelConfig) -> dict[str, tuple]:
    """Every tensor a Hugging Face checkpoint of this config holds, with its full shape."""
    shapes = {"model.embed_tokens.weight": (config.vocab_size, config.hidden_size), "model.norm.weight": (config.hidden_size,)}
    if not config.tie_word_embeddings:
        shapes["lm_head.weight"] = (config.vocab_size, config.hidden_size)
    for layer in range(config.num_layers):
        shapes.update({f"model.layers.{layer}.{name}": shape for name, shape in block_shapes(config).items()})
    return shapes


def check_moe_sequence_parallel(config: ModelConfig, sequence_parallel: bool) -> None:
    require(not (sequence_parallel and config.num_experts), "sequence_parallel", sequence_parallel,
            f"is not supported for mixture-of-experts models (num_experts={config.num_experts}); load with sequence_parallel=False")


def random_block_tensors(config: ModelConfig, generator: torch.Generator, std: float = 0.02) -> dict[str, torch.Tensor]:
    """Full float32 tensors for one block, Llama-shaped, drawn from `generator`."""
    out = {}
    for name, shape in block_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=generator)
        else:
            out[name] = std * torch.randn(shape, generator=generator)
    return out


class LlamaModel(nn.Module):
    """Embedding -> blocks -> final norm -> LM head, each rank holding its shards.

    forward(ids (batch, seq) long, replicated) -> logits (batch, seq or 1, vocab_size),
    gathered on every rank (bitwise identical across ranks: all-gather copies, it does not add).
    With `sequence_parallel`, prompts whose length is a multiple of tp run norms and residuals
    on sequence shards (reduce-scatter / all-gather instead of all-reduce); other lengths,
    and decode steps, run the plain TP path with the same weights. The replicated parameters
    that then run on sequence shards (norm weights, row-parallel biases) are tagged
    `sequence_parallel_grad` for that forward: a caller that runs backward through a
    sequence-parallel forward must call `impl.communication.all_reduce_sequence_parallel_grads(model, comm)`
    after backward (their per-rank grads are partial sums over this rank's tokens).
    `overlap_chunks` (an integer >= 1, set on every sequence-parallel linear layer): a
    sequence-parallel prefill without gradients pipelines each all-gather -> column-parallel
    matmul and row-parallel matmul -> reduce-scatter in that many token chunks (impl/overlap.py);
    every sequence-parallel prompt's seq/tp must be a multiple of it (TPConfigError before any
    collective). 1: no chunking.
    """

    def __init__(self, config: ModelConfig, comm: Communicator, embed: VocabParallelEmbedding, layers: list[TransformerBlock], norm: RMSNorm,
                 lm_head: ParallelLMHead, sequence_parallel: bool = False, overlap_chunks: int = 1):
        super().__init__()
        self.config, self.comm, self.sequence_parallel = config, comm, sequence_parallel
        self.embed, self.layers, self.norm, self.lm_head = embed, nn.ModuleList(layers), norm, lm_head
        self._sp_active = None
        self.overlap_chunks = overlap_chunks

    @property
    def overlap_chunks(self) -> int:
        return self._overlap_chunks

    @overlap_chunks.setter
    def overlap_chunks(self, chunks: int) -> None:
        check_chunk_count(chunks)
        for module in self.modules():
            if isinstance(module, OverlapChunks):
                module.overlap_chunks = chunks
        self._overlap_chunks = chunks

    @classmethod
    def from_tensors(cls, tensors: Mapping, config: ModelConfig, comm: Communicator, dtype=torch.float32, device="cpu", sequence_parallel=False,
                     overlap_chunks: int = 1) -> "LlamaModel":
        """Build rank comm.rank's model from full tensors (or lazy slices) in Hugging Face naming."""
        config.check_tp(comm.world_size)
        check_moe_sequence_parallel(config, sequence_parallel)
        kw = dict(dtype=dtype, device=device)
        embed = VocabParallelEmbedding.from_full(tensors["model.embed_tokens.weight"], comm, **kw)
        layers = []
        for i in range(config.num_layers):
            prefix = f"model.layers.{i}."
            block = {name: tensors[prefix + name] for name in block_shapes(config)}
            layers.append(block_class(config).from_full(block, config, comm, layer=i, **kw))
        norm = norm_class(config).from_full(tensors["model.norm.weight"], eps=config.rms_norm_eps, **kw)
        cap = config.final_logit_softcapping
        if config.tie_word_embeddings:
            lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, comm, tied_to=embed, softcap=cap, **kw)
        else:
            lm_head = ParallelLMHead.from_full(tensors["lm_head.weight"], comm, softcap=cap, **kw)
        return cls(config, comm, embed, layers, norm, lm_head, sequence_parallel, overlap_chunks)

    def allocate_kv_cache(self, max_batch: int, max_seq_len: int) -> None:
        require(max_seq_len <= self.config.max_seq_len, "max_seq_len", max_seq_len, f"must be <= the model's max_position_embeddings={self.config.max_seq_len}")
        for layer in self.layers:
            layer.attention.allocate_kv_cache(max_batch, max_seq_len)

    def _use_sequence_parallel(self, active: bool) -> None:
        if active == self._sp_active:
            return
        for module in self.modules():
            if hasattr(module, "sequence_parallel") and module is not self:
                module.sequence_parallel = active
        tag_sequence_parallel_grad(self.norm.weight, active)  # the final norm runs on sequence shards too
        self._sp_active = active

    def final_hidden(self, ids: torch.Tensor, start_pos: int | torch.Tensor = 0, use_cache: bool = False, last_only: bool = False) -> torch.Tensor:
        """ids (batch, seq) long, replicated -> the final norm's output (batch, seq or 1, hidden),
        replicated: what the LM head reads. `start_pos` may be a long tensor on ids' device
        (static decode, see ParallelAttention). With sequence parallelism and `last_only`, only
        each shard's last token is all-gathered (the last rank's is the sequence's last), not
        the whole (batch, seq, hidden) hidden state."""
        tp, seq = self.comm.world_size, ids.shape[1]
        sp = self.sequence_parallel and tp > 1 and seq % tp == 0
        if sp:  # the chunked path's constraint (for every such prompt, whether it runs chunked or not), before the embedding's reduce-scatter
            check_chunks(self.overlap_chunks, seq // tp)
        self._use_sequence_parallel(sp)
        h = self.embed(ids)
        if self.config.scale_embeddings:
            h = h * embedding_normalizer(self.config, h)
        for layer in self.layers:
            h = layer(h, start_pos, use_cache)
        h = self.norm(h)
        if last_only:
            h = h[:, -1:]
        if sp:
            # all-gather whose backward keeps this rank's slice: the LM head's copy_to_parallel
            # already all-reduces the input gradient, so a reduce-scatter here would count it tp times
            h = gather_from_parallel(h, self.comm, 1)
            h = h[:, -1:] if last_only else h
        return h

    def forward(self, ids: torch.Tensor, start_pos: int | torch.Tensor = 0, use_cache: bool = False, last_only: bool = False) -> torch.Tensor:
        """Logits (batch, seq or 1, vocab_size), replicated (see final_hidden for the arguments)."""
        return self.lm_head(self.final_hidden(ids, start_pos, use_cache, last_only))

    def greedy(self, ids: torch.Tensor, start_pos: int | torch.Tensor = 0, use_cache: bool = False) -> torch.Tensor:
        """The greedy next token after `ids` (batch, seq): (batch,) long, replicated, equal to
        `forward(..., last_only=True)[:, -1].argmax(-1)` but selected on the vocabulary shards
        (ParallelLMHead.greedy: one all-gather of (batch, 2) instead of (batch, vocab/tp) logits)."""
        return self.lm_head.greedy(self.final_hidden(ids, start_pos, use_cache, last_only=True))[:, -1]

    @torch.no_grad()
    def generate(self, ids: torch.Tensor, max_new_tokens: int, temperature: float = 0.0, top_k: int | None = None, top_p: float | None = None,
                 seed: int = 0) -> torch.Tensor:
        """Prefill `ids` (batch, prompt), then decode `max_new_tokens`; returns (batch, max_new_tokens).

        Every rank picks the same token without a broadcast: the logits are bitwise identical
        on every rank (gathered, not reduced) and sampling draws from a generator seeded with
        the same `seed` on every rank, so the same inputs give the same draw. That saves one
        collective per decode step; the suites check it across ranks.
        """
        require(max_new_tokens >= 1, "max_new_tokens", max_new_tokens, "must be >= 1")
        require(temperature >= 0, "temperature", temperature, "must be >= 0 (0 = greedy)")
        require(top_k is None or top_k >= 1, "top_k", top_k, "must be >= 1")
        require(top_p is None or 0 < top_p <= 1, "top_p", top_p, "must be in (0, 1]")
        batch, prompt = ids.shape
        # the last token is returned, never fed back: prompt + max_new_tokens - 1 positions are cached
        self.allocate_kv_cache(batch, prompt + max_new_tokens - 1)
        generator = torch.Generator(device=ids.device).manual_seed(seed)

        def next_token(x: torch.Tensor, start_pos: int) -> torch.Tensor:
            if temperature == 0:  # on the vocabulary shards: no logits gathered
                return self.greedy(x, start_pos, use_cache=True)
            return sample(self(x, start_pos, use_cache=True, last_only=True)[:, -1].float(), temperature, top_k, top_p, generator)

        out = [next_token(ids, 0)]
        for step in range(1, max_new_tokens):
            out.append(next_token(out[-1][:, None], prompt + step - 1))
        return torch.stack(out, 1)


def embedding_normalizer(config: ModelConfig, h: torch.Tensor) -> torch.Tensor:
    """Gemma's embedding multiplier sqrt(hidden_size), a 0-dim tensor in h's dtype and device:
    rounded to the hidden dtype (bfloat16 too) before the product, as transformers does."""
    return torch.tensor(config.hidden_size ** 0.5, dtype=h.dtype, device=h.device)


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None, generator: torch.Generator) -> torch.Tensor:
    """Next token per row of logits (batch, vocab): greedy at temperature 0, else top-k/top-p sampling."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        drop = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the smallest prefix reaching top_p
        logits = logits.masked_fill(drop.scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator)[:, 0]


def random_model(config: ModelConfig, comm: Communicator, dtype=torch.bfloat16, device="cpu", seed: int = 0, std: float = 0.02,
                 sequence_parallel: bool = False, overlap_chunks: int = 1) -> LlamaModel:
    """A model of `config` whose local shards are drawn directly on this rank (no full tensors
    exist anywhere): for timing and memory sweeps, where values do not matter but shapes do.
    Llama-family and Mixtral blocks: TPConfigError for a config with Qwen3 / Gemma features."""
    config.check_tp(comm.world_size)
    # Mixtral's experts and Phi-3's partial rotary are built below; Qwen3's and Gemma's switches are not
    features = [f for f in config.non_llama_features() if f not in ("fused_projections", "num_experts", "rotary_dim")]
    require(not features, "model_type", config.extra.get("model_type"), f"random_model builds Llama-family and Mixtral blocks only; this config needs {features}")
    check_moe_sequence_parallel(config, sequence_parallel)
    kw = dict(dtype=dtype, device=device)
    embed = VocabParallelEmbedding(config.vocab_size, config.hidden_size, comm, **kw)
    layers = []
    for _ in range(config.num_layers):
        o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, comm, bias=config.o_bias, **kw)
        attention = ParallelAttention(config.hidden_size, config.num_heads, config.num_kv_heads, comm, head_dim=config.head_dim, qkv_bias=config.qkv_bias,
                                      rope_theta=config.rope_theta, rope_scaling=config.rope_scaling, o_proj=o_proj, rotary_dim=config.rotary_dim, **kw)
        if config.num_experts:
            mlp = ParallelMoE(config.hidden_size, config.intermediate_size, config.num_experts, config.num_experts_per_tok, comm, **kw)
        else:
            mlp = ParallelMLP(config.hidden_size, config.intermediate_size, comm, **kw)
        layers.append(TransformerBlock(attention, mlp, RMSNorm(config.hidden_size, config.rms_norm_eps, **kw), RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)))
    norm = RMSNorm(config.hidden_size, config.rms_norm_eps, **kw)
    lm_head = ParallelLMHead(config.hidden_size, config.vocab_size, comm, tied_to=embed if config.tie_word_embeddings else None, **kw)
    model = LlamaModel(config, comm, embed, layers, norm, lm_head, sequence_parallel, overlap_chunks)
    generator = torch.Generator(device=device).manual_seed(seed + comm.rank)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if not name.endswith("norm.weight"):
                p.normal_(0.0, std, generator=generator)
    return model
