"""Megatron-style tensor-parallel layers.

Every layer holds only its rank's shard and is built either empty (`__init__`) or from the
full, unsharded weights (`from_full`). Each `__init__` declares, on each of its parameters, how it
is split (`param.tp_shard`, an impl.sharding.ShardSpec: the dimension, the segments, kv-head
replicas, vocabulary padding); `from_full` slices through that declaration (`shard`, which accepts
torch tensors or safetensors lazy slices, so a rank never reads more than its shard), and
whatever rebuilds full tensors from every rank's locals — resharding a shard checkpoint,
comparing gathered gradients — reads the same declaration (`unshard`).

Weights follow torch's Linear layout, (out_features, in_features).
Column-parallel layers shard dim 0 of the weight (the output features);
row-parallel layers shard dim 1 (the input features).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .architecture import Communicator, TPConfigError, check_kv_heads, require, require_divisible, rope_scaling_parameters
from .communication import (copy_to_parallel, gather_from_parallel, gather_from_sequence, needs_autograd, reduce_from_parallel, reduce_scatter_to_sequence,
                            scatter_to_parallel)
from .kernels import decode_attention as fused_decode_attention
from .overlap import check_chunk_count, gather_linear, linear_reduce_scatter
from .sharding import Segment, ShardSpec, columns, declare, rows, shape_of, shard, spec_of, take, unshard


# --------------------------------------------------------------------------- sharding helpers


def _copy_into(param: torch.Tensor, value: torch.Tensor, name: str) -> None:
    require(tuple(value.shape) == tuple(param.shape), name, tuple(value.shape), f"shard shape must be {tuple(param.shape)}")
    with torch.no_grad():
        param.copy_(value.to(param.dtype))


def load_full(layer: nn.Module, **sources) -> None:
    """Copy this rank's shard of each named parameter of `layer` from its full tensors (a list:
    one per segment of the parameter's declared spec; None: the layer has no such parameter)."""
    for name, src in sources.items():
        if src is not None:
            param = getattr(layer, name)
            _copy_into(param, shard(src, spec_of(param), layer.comm.rank, layer.comm.world_size), name)


def check_input(x: torch.Tensor, weight: torch.Tensor, layer: str) -> None:
    """Mismatched dtype/device fail with a message naming the layer, not deep inside a matmul."""
    if x.dtype != weight.dtype or x.device != weight.device:
        raise TPConfigError(f"{layer} input", f"{x.dtype} on {x.device}", f"must match the layer's weights: {weight.dtype} on {weight.device}")


def host_check_allowed(t: torch.Tensor) -> bool:
    """Whether a check may read `t` on the host: not while torch.compile traces (the decode step
    must stay fullgraph) nor while a CUDA graph is being captured (a sync would break capture).
    There the inputs come from the model's own sampler (impl/decoding.py), always in range."""
    if torch.compiler.is_compiling():
        return False
    return not (t.is_cuda and torch.cuda.is_current_stream_capturing())


def _factory(dtype, device):
    return {"dtype": dtype, "device": device}


def tag_sequence_parallel_grad(param: torch.Tensor | None, active: bool) -> None:
    """Mark a replicated parameter that runs inside a sequence-parallel region: each rank's
    gradient is a partial sum over its own tokens and must be all-reduced over the TP group
    after backward (impl.communication.all_reduce_sequence_parallel_grads)."""
    if param is not None:
        param.sequence_parallel_grad = bool(active)


class SequenceParallelTags:
    """A `sequence_parallel` flag that (re)tags the module's replicated parameters which run
    on sequence shards (`replicated_in_sequence_region()`) whenever it is set."""

    def replicated_in_sequence_region(self) -> list:
        raise NotImplementedError

    @property
    def sequence_parallel(self) -> bool:
        return self._sequence_parallel

    @sequence_parallel.setter
    def sequence_parallel(self, active: bool) -> None:
        self._sequence_parallel = bool(active)
        for param in self.replicated_in_sequence_region():
            tag_sequence_parallel_grad(param, active)


class OverlapChunks:
    """`overlap_chunks`: with `sequence_parallel`, an inference forward (no gradient needed) at
    tp > 1 pipelines its all-gather / reduce-scatter with the matmul in that many token chunks
    (impl/overlap.py); 1, tp = 1, or a forward that needs a gradient runs the un-chunked
    region pair. At forward time the local sequence length (seq/tp) must be a multiple of it
    (TPConfigError naming overlap_chunks, before any collective)."""

    @property
    def overlap_chunks(self) -> int:
        return self._overlap_chunks

    @overlap_chunks.setter
    def overlap_chunks(self, chunks: int) -> None:
        check_chunk_count(chunks)
        self._overlap_chunks = chunks

    def overlapped(self, x: torch.Tensor) -> bool:
        """Whether this forward of x takes the chunked pipeline."""
        return self.sequence_parallel and self._overlap_chunks > 1 and self.comm.world_size > 1 and not needs_autograd(x)


# --------------------------------------------------------------------------- linear layers


class ColumnParallelLinear(OverlapChunks, nn.Module):
    """y = x W^T + b with W's output features split across ranks.

    x: (..., in_features), replicated (or sequence-sharded if `sequence_parallel`, dim 1).
    y: (..., out_features / tp), or (..., out_features) if `gather_output`.
    `overlap_chunks`: see OverlapChunks (all-gather pipelined with the matmul).
    """

    def __init__(self, in_features, out_features, comm: Communicator, bias=False, gather_output=False, sequence_parallel=False, dtype=torch.float32, device="cpu",
                 overlap_chunks=1):
        super().__init__()
        tp = comm.world_size
        require_divisible("out_features", out_features, tp)
        self.comm, self.gather_output, self.sequence_parallel = comm, gather_output, sequence_parallel
        self.overlap_chunks = overlap_chunks
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features // tp, in_features, **_factory(dtype, device)))
        self.bias = nn.Parameter(torch.zeros(out_features // tp, **_factory(dtype, device))) if bias else None
        for param in (self.weight, self.bias):
            declare(param, self.output_spec())

    def output_spec(self) -> ShardSpec:
        """How the output features (the weight's rows, the bias, the local output's last dim) are split."""
        return rows(self.out_features)

    def forward(self, x):
        check_input(x, self.weight, type(self).__name__)
        if self.overlapped(x):
            y = gather_linear(x, self.weight, self.bias, self.comm, self.overlap_chunks)
        else:
            x = gather_from_sequence(x, self.comm, 1) if self.sequence_parallel else copy_to_parallel(x, self.comm)
            y = F.linear(x, self.weight, self.bias)
        return gather_from_parallel(y, self.comm, -1) if self.gather_output else y

    @classmethod
    def from_full(cls, weight, comm: Communicator, bias=None, **kw):
        out_features, in_features = shape_of(weight)
        layer = cls(in_features, out_features, comm, bias=bias is not None, **kw)
        load_full(layer, weight=[weight], bias=None if bias is None else [bias])
        return layer


class RowParallelLinear(OverlapChunks, SequenceParallelTags, nn.Module):
    """y = x W^T + b with W's input features split across ranks.

    x: (..., in_features / tp) if `input_is_parallel` else (..., in_features) replicated.
    y: (..., out_features), all-reduced (or reduce-scattered on dim 1 if `sequence_parallel`).
    The bias is added once, after the reduction, never per rank. With `sequence_parallel` the
    bias is added to this rank's sequence shard only, so its gradient is a per-rank partial:
    it is tagged `sequence_parallel_grad` and whoever runs backward must call
    impl.communication.all_reduce_sequence_parallel_grads after it.
    `overlap_chunks`: see OverlapChunks (the matmul pipelined with the reduce-scatter).
    """

    def replicated_in_sequence_region(self):
        return [getattr(self, "bias", None)]

    def __init__(self, in_features, out_features, comm: Communicator, bias=False, input_is_parallel=True, sequence_parallel=False, dtype=torch.float32, device="cpu",
                 overlap_chunks=1):
        super().__init__()
        tp = comm.world_size
        require_divisible("in_features", in_features, tp)
        self.comm, self.input_is_parallel, self.sequence_parallel = comm, input_is_parallel, sequence_parallel
        self.overlap_chunks = overlap_chunks
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features // tp, **_factory(dtype, device)))
        self.bias = nn.Parameter(torch.zeros(out_features, **_factory(dtype, device))) if bias else None
        declare(self.weight, columns(in_features))  # the bias stays whole: added once, after the reduction
        self.sequence_parallel = sequence_parallel  # (re)tags the bias

    def forward(self, x):
        check_input(x, self.weight, "RowParallelLinear")
        if not self.input_is_parallel:
            x = scatter_to_parallel(x, self.comm, -1)
        if self.overlapped(x):
            y = linear_reduce_scatter(x, self.weight, self.comm, self.overlap_chunks)
        else:
            y = F.linear(x, self.weight)
            y = reduce_scatter_to_sequence(y, self.comm, 1) if self.sequence_parallel else reduce_from_parallel(y, self.comm)
        return y if self.bias is None else y + self.bias

    @classmethod
    def from_full(cls, weight, comm: Communicator, bias=None, **kw):
        out_features, in_features = shape_of(weight)
        layer = cls(in_features, out_features, comm, bias=bias is not None, **kw)
        load_full(layer, weight=[weight], bias=None if bias is None else [bias])
        return layer


class MergedColumnParallelLinear(ColumnParallelLinear):
    """Several column-parallel projections of the same input in one matmul.

    Each segment (e.g. gate and up of a SwiGLU MLP) is sharded on its own, so rank r holds
    [seg0 shard r | seg1 shard r | ...] and can split its output locally.
    """

    def __init__(self, in_features, segment_sizes: list[int], comm: Communicator, bias=False, **kw):
        for i, s in enumerate(segment_sizes):
            require_divisible(f"segment_sizes[{i}]", s, comm.world_size)
        self.segment_sizes = list(segment_sizes)
        super().__init__(in_features, sum(segment_sizes), comm, bias=bias, **kw)

    def output_spec(self) -> ShardSpec:
        return ShardSpec(0, tuple(Segment(size) for size in self.segment_sizes))

    @classmethod
    def from_full(cls, weights: list, comm: Communicator, biases: list | None = None, **kw):
        layer = cls(shape_of(weights[0])[1], [shape_of(w)[0] for w in weights], comm, bias=biases is not None, **kw)
        load_full(layer, weight=weights, bias=biases)
        return layer


class QKVParallelLinear(ColumnParallelLinear):
    """Fused q/k/v projection for grouped-query attention, sharded by heads.

    Query heads are split tp ways. Key/value heads are split when num_kv_heads >= tp and
    replicated (each rank holds the one kv head its query heads use) when tp is a multiple
    of num_kv_heads. Local output: [q (num_heads/tp * head_dim) | k | v (local_kv * head_dim)].
    """

    def __init__(self, hidden_size, head_dim, num_heads, num_kv_heads, comm: Communicator, bias=False, **kw):
        tp = comm.world_size
        require_divisible("num_heads", num_heads, tp)
        require(num_heads % num_kv_heads == 0, "num_kv_heads", num_kv_heads, f"must divide num_heads={num_heads}")
        check_kv_heads(num_kv_heads, tp)
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, num_heads, num_kv_heads
        self.local_heads = num_heads // tp
        self.kv_replicas = max(1, tp // num_kv_heads)  # ranks sharing one kv head
        self.local_kv_heads = max(1, num_kv_heads // tp)
        super().__init__(hidden_size, tp * (self.local_heads + 2 * self.local_kv_heads) * head_dim, comm, bias=bias, **kw)

    def output_spec(self) -> ShardSpec:
        """q heads split tp ways; k and v heads in blocks of local_kv_heads, each held by kv_replicas ranks."""
        d, kv = self.head_dim, Segment(self.num_kv_heads * self.head_dim, self.kv_replicas)
        return ShardSpec(0, (Segment(self.num_heads * d), kv, kv))

    def kv_head_range(self, rank: int) -> tuple[int, int]:
        first = (rank // self.kv_replicas) * self.local_kv_heads
        return first, first + self.local_kv_heads

    @classmethod
    def from_full(cls, q, k, v, comm: Communicator, head_dim: int, q_bias=None, k_bias=None, v_bias=None, **kw):
        num_heads, num_kv_heads = shape_of(q)[0] // head_dim, shape_of(k)[0] // head_dim
        layer = cls(shape_of(q)[1], head_dim, num_heads, num_kv_heads, comm, bias=q_bias is not None, **kw)
        load_full(layer, weight=[q, k, v], bias=None if q_bias is None else [q_bias, k_bias, v_bias])
        return layer


# --------------------------------------------------------------------------- vocabulary


def padded_vocab(vocab_size: int, tp: int) -> int:
    return math.ceil(vocab_size / tp) * tp


def vocab_rows(vocab_size: int, tp: int) -> ShardSpec:
    """Vocabulary rows, zero-padded to padded_vocab and split tp ways (embedding and LM head alike)."""
    return rows(vocab_size, padded=padded_vocab(vocab_size, tp))


class VocabParallelEmbedding(nn.Module):
    """Embedding table split by vocabulary rows; any vocab size (padded to a multiple of tp).

    ids: (...) long, replicated, each in [0, vocab_size) (checked eagerly: TPConfigError naming
    `ids`; not under torch.compile or CUDA-graph capture). out: (..., hidden), all-reduced (or reduce-scattered on
    dim 1 with `sequence_parallel`). Rank r holds rows [r*Vp/tp, (r+1)*Vp/tp) of the table padded to Vp = padded_vocab(V, tp).
    """

    def __init__(self, vocab_size, hidden_size, comm: Communicator, sequence_parallel=False, dtype=torch.float32, device="cpu"):
        super().__init__()
        require(isinstance(vocab_size, int) and vocab_size >= 1, "vocab_size", vocab_size, "must be a positive integer")
        self.comm, self.vocab_size, self.sequence_parallel = comm, vocab_size, sequence_parallel
        self.rows = padded_vocab(vocab_size, comm.world_size) // comm.world_size
        self.start = comm.rank * self.rows
        self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, **_factory(dtype, device)))
        declare(self.weight, vocab_rows(vocab_size, comm.world_size))

    def forward(self, ids):
        if ids.dtype not in (torch.int32, torch.int64) or ids.device != self.weight.device:
            raise TPConfigError("VocabParallelEmbedding input", f"{ids.dtype} on {ids.device}", f"must be integer token ids on {self.weight.device}")
        if ids.numel() and host_check_allowed(ids):
            # at tp > 1 an out-of-range id would fall outside every rank's rows and embed as zeros
            lo, hi = torch.stack([ids.min(), ids.max()]).tolist()  # one host sync
            require(0 <= lo and hi < self.vocab_size, "ids", (lo, hi), f"(min, max) must satisfy 0 <= id < vocab_size={self.vocab_size}")
        if self.comm.world_size == 1:
            return F.embedding(ids, self.weight)
        local = ids - self.start
        outside = (local < 0) | (local >= self.rows)
        out = F.embedding(local.masked_fill(outside, 0), self.weight).masked_fill(outside.unsqueeze(-1), 0.0)
        return reduce_scatter_to_sequence(out, self.comm, 1) if self.sequence_parallel else reduce_from_parallel(out, self.comm)

    @classmethod
    def from_full(cls, weight, comm: Communicator, **kw):
        vocab, hidden = shape_of(weight)
        layer = cls(vocab, hidden, comm, **kw)
        _copy_into(layer.weight, shard([weight], spec_of(layer.weight), comm.rank, comm.world_size), "weight")
        return layer


class ParallelLMHead(nn.Module):
    """Vocab-parallel output projection; shares the padded row layout of VocabParallelEmbedding.

    x: (..., hidden) replicated. forward returns (..., vocab_size) logits, gathered and with
    padding stripped; `local_logits` returns (..., V_padded/tp) with padded columns at -inf
    so they can never win an argmax or carry probability. `softcap` (Gemma's
    final_logit_softcapping): every logit is cap * tanh(logit / cap), on the shards, so forward
    and greedy both see capped logits.
    """

    def __init__(self, hidden_size, vocab_size, comm: Communicator, dtype=torch.float32, device="cpu", tied_to: VocabParallelEmbedding | None = None,
                 softcap: float | None = None):
        super().__init__()
        self.comm, self.vocab_size = comm, vocab_size
        self.softcap = softcap  # final-logit soft-capping (Gemma): cap * tanh(logits / cap), elementwise on each shard
        self.rows = padded_vocab(vocab_size, comm.world_size) // comm.world_size
        self.start = comm.rank * self.rows
        if tied_to is not None:
            self.weight = tied_to.weight
        else:
            self.weight = nn.Parameter(torch.empty(self.rows, hidden_size, **_factory(dtype, device)))
            declare(self.weight, vocab_rows(vocab_size, comm.world_size))
        self.num_padding = max(0, min(self.rows, self.start + self.rows - vocab_size))

    def local_logits(self, x):
        logits = F.linear(copy_to_parallel(x, self.comm), self.weight)
        if self.softcap is not None:  # before the padding mask: tanh would turn -inf into -cap
            logits = soft_cap(logits, self.softcap)
        if self.num_padding:
            pad = torch.zeros(self.rows, dtype=torch.bool, device=logits.device)
            pad[self.rows - self.num_padding:] = True
            logits = logits.masked_fill(pad, float("-inf"))
        return logits

    def forward(self, x):
        return gather_from_parallel(self.local_logits(x), self.comm, -1)[..., : self.vocab_size]

    def greedy(self, x):
        """The greedy token without gathering the logits: x (..., hidden) replicated -> (...) long,
        replicated, equal to `forward(x).argmax(-1)` — ties go to the lowest vocabulary index (as
        torch.argmax takes the first maximum), padded columns (-inf) are never chosen.

        Each rank reduces its V_padded/tp columns to (best value, global index); one all-gather of
        (..., 2) values replaces the all-gather of (..., V_padded/tp) logits. Ranks hold ascending
        vocabulary ranges, so the first rank holding the maximum holds its lowest index. The pair
        travels in the logits' dtype widened to at least float32, which holds every index exactly."""
        wide = torch.promote_types(self.weight.dtype, torch.float32)
        exact = 2 ** 24 if wide == torch.float32 else 2 ** 53  # integers a float holds exactly
        require(self.rows * self.comm.world_size <= exact, "vocab_size", self.vocab_size, f"must be <= {exact} for indices to travel exactly in {wide}")
        logits = self.local_logits(x)
        index = logits.argmax(-1, keepdim=True)
        pair = torch.cat([logits.gather(-1, index).to(wide), (index + self.start).to(wide)], -1)
        candidates = gather_from_parallel(pair, self.comm, -1).unflatten(-1, (self.comm.world_size, 2))
        winner = candidates[..., 0].argmax(-1, keepdim=True)
        return candidates[..., 1].gather(-1, winner).squeeze(-1).long()

    @classmethod
    def from_full(cls, weight, comm: Communicator, **kw):
        vocab, hidden = shape_of(weight)
        layer = cls(hidden, vocab, comm, **kw)
        _copy_into(layer.weight, shard([weight], spec_of(layer.weight), comm.rank, comm.world_size), "weight")
        return layer


def soft_cap(x: torch.Tensor, cap: float) -> torch.Tensor:
    """cap * tanh(x / cap) (Gemma's logit soft-capping), in x's dtype widened to float32, cast back."""
    wide = torch.promote_types(x.dtype, torch.float32)
    return (torch.tanh(x.to(wide) / cap) * cap).to(x.dtype)


# --------------------------------------------------------------------------- norm, rotary, attention, MLP


class RMSNorm(nn.Module):
    """Replicated RMSNorm, computed in float32 and cast back (the Llama convention)."""

    def __init__(self, hidden_size, eps=1e-5, dtype=torch.float32, device="cpu"):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(hidden_size, **_factory(dtype, device)))

    def forward(self, x):
        x32 = x.to(torch.promote_types(x.dtype, torch.float32))
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * normed.to(x.dtype)

    @classmethod
    def from_full(cls, weight, comm: Communicator | None = None, eps=1e-5, **kw):
        layer = cls(shape_of(weight)[0], eps=eps, **kw)
        _copy_into(layer.weight, shard([weight], spec_of(layer.weight), 0, 1), "weight")  # replicated: declares nothing
        return layer


class UnitOffsetRMSNorm(RMSNorm):
    """Gemma's RMSNorm: x / rms(x) * (1 + weight), the product in float32 (float64 for a float64
    input) and cast back once; `weight` is the checkpoint's (about 0 when trained), 0 when built empty."""

    def __init__(self, hidden_size, eps=1e-6, dtype=torch.float32, device="cpu"):
        super().__init__(hidden_size, eps, dtype, device)
        with torch.no_grad():
            self.weight.zero_()

    def forward(self, x):
        wide = torch.promote_types(x.dtype, torch.float32)
        x32 = x.to(wide)
        normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return (normed * (1.0 + self.weight.to(wide))).to(x.dtype)


def rotary_exponents(head_dim: int, device=None) -> torch.Tensor:
    """(head_dim/2,) float64: 2i / head_dim, so that frequency i of the unscaled rope is theta ** -exponent_i."""
    return torch.arange(0, head_dim, 2, dtype=torch.float64, device=device) / head_dim


def yarn_ramp(low: float, high: float, n: int) -> torch.Tensor:
    """(n,) float64: each frequency's share of interpolation in yarn, 0 up to index `low`, 1 from
    index `high`, linear between."""
    if low == high:
        high += 0.001  # transformers' guard against a zero-width ramp
    return ((torch.arange(n, dtype=torch.float64) - low) / (high - low)).clamp(0, 1)


def yarn_inv_freq(head_dim: int, theta: float, p: dict) -> torch.Tensor:
    """YaRN: frequencies that turn fewer than beta_slow times over the original context are
    interpolated (divided by factor), those turning more than beta_fast times are kept, a linear
    ramp over the dimensions blends the ones between."""
    base = theta ** rotary_exponents(head_dim)
    kept, interpolated = 1.0 / base, 1.0 / (p["factor"] * base)

    def dimension_turning(rotations: float) -> float:  # the (fractional) dimension that turns `rotations` times
        return head_dim * math.log(p["original_max_position_embeddings"] / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dimension_turning(p["beta_fast"]), dimension_turning(p["beta_slow"])
    if p["truncate"]:
        low, high = math.floor(low), math.ceil(high)
    share = yarn_ramp(max(low, 0), min(high, head_dim - 1), head_dim // 2)
    return interpolated * share + kept * (1 - share)


def llama3_inv_freq(inv: torch.Tensor, p: dict) -> torch.Tensor:
    """Llama 3.1: wavelengths beyond original/low_freq_factor divided by factor, below
    original/high_freq_factor kept, a smooth blend between."""
    factor, low, high, original = p["factor"], p["low_freq_factor"], p["high_freq_factor"], p["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv
    smooth = ((original / wavelen) - low) / (high - low)
    scaled = torch.where(wavelen > original / low, inv / factor, inv)
    mid = (wavelen <= original / low) & (wavelen >= original / high)
    return torch.where(mid, (1 - smooth) * inv / factor + smooth * inv, scaled)


def dynamic_ntk_base(head_dim: int, theta: float, p: dict, seq_len) -> torch.Tensor:
    """Dynamic NTK's rope base for a sequence of `seq_len` tokens: theta up to max_position_embeddings,
    growing beyond. `seq_len`: an int or a long tensor on any device (computed there: no host
    synchronisation). A 0-dim float64 tensor on that device."""
    length = torch.as_tensor(seq_len).to(torch.float64).clamp_min(p["max_position_embeddings"])
    return theta * (p["factor"] * length / p["max_position_embeddings"] - (p["factor"] - 1)) ** (head_dim / (head_dim - 2))


def dynamic_ntk_inv_freq(head_dim: int, theta: float, p: dict, seq_len) -> torch.Tensor:
    """(head_dim/2,) float64 frequencies of dynamic NTK for a sequence of `seq_len` tokens, on its device."""
    base = dynamic_ntk_base(head_dim, theta, p, seq_len)
    return 1.0 / (base ** rotary_exponents(head_dim, base.device))


def rotary_inv_freq(head_dim: int, theta: float, scaling: dict | None = None) -> torch.Tensor:
    """(head_dim/2,) float64 inverse frequencies, as transformers' rope init functions
    (modeling_rope_utils.ROPE_INIT_FUNCTIONS) compute them for `scaling`'s rope_type (any dict
    rope_scaling_parameters accepts). Dynamic NTK: those of a sequence within max_position_embeddings
    (rotary_tables recomputes them for longer ones)."""
    scaling = rope_scaling_parameters(scaling, head_dim, None, theta)
    kind = scaling["rope_type"] if scaling else "default"
    if kind == "yarn":
        return yarn_inv_freq(head_dim, theta, scaling)
    if kind == "dynamic":
        return dynamic_ntk_inv_freq(head_dim, theta, scaling, scaling["max_position_embeddings"])
    if kind == "proportional":  # the first `angles` frequencies rotate, the rest are 0 (cos 1, sin 0: passed through)
        angles = int(scaling["partial_rotary_factor"] * head_dim // 2)
        inv = 1.0 / (theta ** rotary_exponents(head_dim)[:angles])
        return torch.cat([inv, torch.zeros(head_dim // 2 - angles, dtype=torch.float64)]) / scaling["factor"]
    inv = 1.0 / (theta ** rotary_exponents(head_dim))
    if kind == "default":
        return inv
    if kind == "linear":
        return inv / scaling["factor"]
    return llama3_inv_freq(inv, scaling)


def rotary_attention_factor(scaling: dict | None) -> float:
    """The factor transformers multiplies cos and sin with: yarn's attention_factor, else 1."""
    return scaling.get("attention_factor", 1.0) if scaling else 1.0


def rotary_tables(positions: torch.Tensor, inv_freq: torch.Tensor, dtype: torch.dtype, theta: float, scaling: dict | None):
    """cos, sin: (batch or 1, seq, head_dim) for `positions` (batch or 1, seq) long, in
    promote(dtype, float32) (float64 tables for the float64 reference), times the attention
    factor. `inv_freq`: rotary_inv_freq's, `scaling`: rope_scaling_parameters' output. Dynamic NTK
    recomputes the frequencies for the longest position on the device."""
    wide = torch.promote_types(dtype, torch.float32)
    if scaling and scaling["rope_type"] == "dynamic":
        inv_freq = dynamic_ntk_inv_freq(2 * inv_freq.shape[-1], theta, scaling, positions.max() + 1)
    freqs = positions.to(wide)[..., None] * inv_freq.to(positions.device, wide)
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    factor = rotary_attention_factor(scaling)
    return (cos, sin) if factor == 1.0 else (cos * factor, sin * factor)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (batch, heads, seq, head_dim); cos/sin: (batch or 1, seq, rotary_dim). Half-split pairing
    within the first rotary_dim dims of each head; the dims past rotary_dim pass through
    (partial rotary, as transformers' Phi-3 applies it)."""
    if cos.shape[-1] < x.shape[-1]:
        width = cos.shape[-1]
        return torch.cat([apply_rotary(x[..., :width], cos, sin), x[..., width:]], dim=-1)
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    x1, x2 = x.chunk(2, dim=-1)
    rotated = torch.cat((-x2, x1), dim=-1)
    wide = torch.promote_types(x.dtype, torch.float32)
    return (x.to(wide) * cos + rotated.to(wide) * sin).to(x.dtype)


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float | None = None,
                     softcap: float | None = None) -> torch.Tensor:
    """One query token against the whole cache, written as broadcast products and sums so that
    torch.compile fuses it into a few reduction kernels (a library attention kernel costs more
    in launch and set-up than the ~1 MB it reads per layer at decode). Compiled decode only:
    eagerly it would materialise (batch, heads, cache, head_dim) products.
    q: (b, hq, 1, d); k, v: (b, hkv, S, d) with hq a multiple of hkv (GQA); mask: (1, S) bool
    (causal and, on a sliding layer, windowed: attention_mask). scale: None for d**-0.5;
    softcap: scores -> softcap * tanh(scores / softcap) before the mask (None: none)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    qg = q.reshape(b, hkv, hq // hkv, 1, d).float()
    scores = (qg * k.float()[:, :, None]).sum(-1) * (d**-0.5 if scale is None else scale)  # (b, hkv, group, S)
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    out = (probs[..., None] * v.float()[:, :, None]).sum(-2)  # (b, hkv, group, d)
    return out.reshape(b, hq, 1, d).to(q.dtype)


def attention_mask(positions: torch.Tensor, kv_len: int, window: int | None = None) -> torch.Tensor:
    """(s, kv_len) bool: query at positions[i] (absolute, (s,) long) sees key slot j when j <= positions[i]
    and, with a sliding `window`, j > positions[i] - window: the window counts the query itself
    (transformers' sliding_window_overlay: a query sees its `window` latest positions)."""
    keys = torch.arange(kv_len, device=positions.device)[None, :]
    mask = keys <= positions[:, None]
    return mask if window is None else mask & (keys > positions[:, None] - window)


def softcapped_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor, scale: float, softcap: float) -> torch.Tensor:
    """softmax(mask(softcap * tanh(q·Kᵀ·scale / softcap)))·V (Gemma 2: the cap before the mask),
    in q's dtype widened to float32. q: (b, hq, s, d); k, v: (b, hkv, S, d), query head j using
    kv head j // (hq/hkv) (GQA); mask: (s, S) bool. -> (b, hq, s, d) in q's dtype."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    wide = torch.promote_types(q.dtype, torch.float32)
    qg = q.reshape(b, hkv, hq // hkv, s, d).to(wide)
    scores = qg @ k.to(wide)[:, :, None].transpose(-1, -2) * scale  # (b, hkv, group, s, S)
    scores = torch.tanh(scores / softcap) * softcap
    probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
    return (probs @ v.to(wide)[:, :, None]).reshape(b, hq, s, d).to(q.dtype)


class ParallelAttention(nn.Module):
    """Causal self-attention with heads sharded across ranks, GQA and a preallocated KV cache.

    x: (batch, seq, hidden) replicated -> (batch, seq, hidden) replicated (all-reduced in o_proj);
    with sequence_parallel both are (batch, seq/tp, hidden), sharded on dim 1 (all-gathered before qkv,
    reduce-scattered after o_proj).
    Each rank attends with its num_heads/tp query heads and their kv heads.
    KV cache per rank: (max_batch, local_kv_heads, max_seq_len, head_dim) for k and v.
    Family features (None / off: Llama's attention): `q_norm`, `k_norm`, replicated norms over
    head_dim applied to each query / key head before rotary (Qwen3, Gemma 3); `scale`, the score
    scale (None: head_dim**-0.5); `softcap`, scores -> softcap * tanh(scores / softcap) before the
    mask (Gemma 2); `sliding_window`, each query sees only its `sliding_window` latest positions,
    itself included (attention_mask), in prefill and in cached decode (the cache keeps every
    position; older ones are masked); `rotary_dim` (even, <= head_dim; None: head_dim): rotary
    embeddings rotate the first rotary_dim dims of each head with frequencies over rotary_dim, the
    rest pass through (Phi-3's partial rotary).
    """

    def __init__(self, hidden_size, num_heads, num_kv_heads, comm: Communicator, head_dim=None, qkv_bias=False, rope_theta=10000.0, rope_scaling=None, sequence_parallel=False, dtype=torch.float32, device="cpu", qkv=None, o_proj=None,
                 q_norm: nn.Module | None = None, k_norm: nn.Module | None = None, scale: float | None = None, softcap: float | None = None,
                 sliding_window: int | None = None, rotary_dim: int | None = None):
        super().__init__()
        self.q_norm, self.k_norm = q_norm, k_norm
        self.scale, self.softcap, self.sliding_window = scale, softcap, sliding_window
        head_dim = head_dim or hidden_size // num_heads
        self.comm, self.head_dim = comm, head_dim
        # from_full passes prebuilt shards so no throwaway parameters are allocated
        self.qkv = qkv or QKVParallelLinear(hidden_size, head_dim, num_heads, num_kv_heads, comm, bias=qkv_bias, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.o_proj = o_proj or RowParallelLinear(num_heads * head_dim, hidden_size, comm, sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.rope_theta, self.rope_scaling = rope_theta, rope_scaling_parameters(rope_scaling, head_dim, None, rope_theta)
        self.rotary_dim = rotary_dim or head_dim
        self.register_buffer("inv_freq", rotary_inv_freq(self.rotary_dim, rope_theta, self.rope_scaling).to(device), persistent=False)
        self.k_cache = self.v_cache = None
        # "torch": rotary, cache writes and attention as separate PyTorch ops (any device; the reference);
        # "triton": a static decode step (one token, tensor start_pos) runs them as one fused kernel
        # (impl/kernels.py). Set by whoever owns the decode loop (impl/decoding.py StaticDecoder).
        self.decode_kernel = "torch"

    def unfused_features(self) -> list[str]:
        """The features of this layer the fused decode kernel (impl/kernels.py) does not compute."""
        present = {"q_norm/k_norm": self.q_norm is not None or self.k_norm is not None, "scale (query_pre_attn_scalar)": self.scale is not None,
                   "attn_logit_softcapping": self.softcap is not None, "sliding_window": self.sliding_window is not None,
                   "rotary_dim (partial rotary)": self.rotary_dim != self.head_dim}
        return [name for name, on in present.items() if on]

    def allocate_kv_cache(self, max_batch: int, max_seq_len: int):
        shape = (max_batch, self.qkv.local_kv_heads, max_seq_len, self.head_dim)
        w = self.qkv.weight
        self.k_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)
        self.v_cache = torch.zeros(shape, dtype=w.dtype, device=w.device)

    def rotary(self, positions: torch.Tensor):
        # float64 rotary tables when the layer itself is float64 (the exact reference)
        return rotary_tables(positions, self.inv_freq, self.qkv.weight.dtype, self.rope_theta, self.rope_scaling)

    def normed_rotary(self, q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """q (b, hq, s, d), k (b, hkv, s, d) at `positions` (s,) long: q_norm / k_norm per head (when
        the layer has them), then rotary — the order Qwen3 and Gemma 3 are trained with."""
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = self.rotary(positions[None])
        return apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)

    def forward(self, x, start_pos: int | torch.Tensor = 0, use_cache: bool = False):
        """`start_pos`: tokens already in the KV cache, a Python int or a 0-dim/1-element long
        tensor on x's device. With a tensor, every shape and every kernel is independent of the
        position (cache written with index_copy_, attention over the whole cache under a mask),
        so the call can be captured once as a CUDA graph and replayed at every decode step
        without a host synchronisation (impl/decoding.py). Without `use_cache`, start_pos must be 0
        (TPConfigError otherwise): the keys are then only x's own tokens."""
        b = x.shape[0]
        qkv = self.qkv(x)
        s = qkv.shape[1]
        d, hq, hkv = self.head_dim, self.qkv.local_heads, self.qkv.local_kv_heads
        static = isinstance(start_pos, torch.Tensor)
        if static and s == 1 and self.decode_kernel == "triton":
            require(not self.unfused_features(), "decode_kernel", "triton", f"the fused decode kernel does not implement {self.unfused_features()}: use the torch kernel")
            require(use_cache and self.k_cache is not None and b <= self.k_cache.shape[0], "use_cache", use_cache, "the fused decode step needs allocate_kv_cache() first, for at least this batch")
            positions = start_pos.reshape(1)
            cos, sin = self.rotary(positions[None])
            out = fused_decode_attention(qkv, cos, sin, self.k_cache, self.v_cache, positions, hq, hkv)
            return self.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))
        q, k, v = qkv.split([hq * d, hkv * d, hkv * d], dim=-1)
        q = q.view(b, s, hq, d).transpose(1, 2)
        k = k.view(b, s, hkv, d).transpose(1, 2)
        v = v.view(b, s, hkv, d).transpose(1, 2)
        require(use_cache or not static, "start_pos", "tensor", "a tensor start_pos needs use_cache=True (it addresses the static KV cache)")
        # without a cache the keys are only these s tokens: a later start would have nothing to attend to before them
        require(use_cache or start_pos == 0, "start_pos", start_pos, "must be 0 without use_cache=True (start_pos counts the tokens already in the KV cache)")
        positions = start_pos.reshape(1) + torch.arange(s, device=x.device) if static else torch.arange(start_pos, start_pos + s, device=x.device)
        q, k = self.normed_rotary(q, k, positions)
        if use_cache:
            require(self.k_cache is not None, "use_cache", use_cache, "call allocate_kv_cache() first")
            # a tensor position is checked by whoever owns the decode loop (reading it here would sync)
            require(static or (start_pos + s <= self.k_cache.shape[2] and b <= self.k_cache.shape[0]), "start_pos+seq", (b, start_pos + s), f"must fit the KV cache {tuple(self.k_cache.shape[:3])}")
            self.k_cache[:b].index_copy_(2, positions, k)
            self.v_cache[:b].index_copy_(2, positions, v)
            if static or start_pos > 0:
                # attend over the whole static cache; later slots are masked out (exp(-inf) = 0 exactly)
                k, v = self.k_cache[:b], self.v_cache[:b]
        gqa = dict(enable_gqa=True) if hkv != hq else {}
        if self.scale is not None:
            gqa["scale"] = self.scale
        if not static and start_pos == 0 and self.sliding_window is None and self.softcap is None:
            out = F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
        else:
            mask = attention_mask(positions, k.shape[2], self.sliding_window)
            if s == 1 and torch.compiler.is_compiling():
                out = decode_attention(q, k, v, mask, self.scale, self.softcap)
            elif self.softcap is not None:
                out = softcapped_attention(q, k, v, mask, d**-0.5 if self.scale is None else self.scale, self.softcap)
            else:
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, **gqa)
        return self.o_proj(out.transpose(1, 2).reshape(b, s, hq * d))

    @classmethod
    def from_full(cls, q, k, v, o, comm: Communicator, head_dim: int, q_bias=None, k_bias=None, v_bias=None, o_bias=None, rope_theta=10000.0, rope_scaling=None, sequence_parallel=False, dtype=torch.float32, device="cpu",
                  **features):
        """`features`: q_norm, k_norm (built modules), scale, softcap, sliding_window, rotary_dim (see the class)."""
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        qkv = QKVParallelLinear.from_full(q, k, v, comm, head_dim, q_bias, k_bias, v_bias, **kw)
        o_proj = RowParallelLinear.from_full(o, comm, bias=o_bias, **kw)
        return cls(shape_of(q)[1], shape_of(q)[0] // head_dim, shape_of(k)[0] // head_dim, comm, head_dim=head_dim, rope_theta=rope_theta, rope_scaling=rope_scaling, qkv=qkv, o_proj=o_proj, **kw,
                   **features)


class ParallelMLP(nn.Module):
    """Gated MLP: down(act(gate(x)) * up(x)), gate/up column-parallel and fused, down row-parallel;
    act: silu (SwiGLU) or gelu's tanh approximation (GeGLU), MLP_ACTIVATIONS[activation].

    x: (..., hidden) replicated -> (..., hidden) replicated; intermediate is sharded (.., inter/tp).
    With sequence_parallel, x and the output are (batch, seq/tp, hidden), sharded on dim 1.
    """

    def __init__(self, hidden_size, intermediate_size, comm: Communicator, sequence_parallel=False, dtype=torch.float32, device="cpu", gate_up=None, down=None,
                 activation: str = "silu"):
        super().__init__()
        require(activation in MLP_ACTIVATIONS, "hidden_act", activation, f"must be one of {tuple(MLP_ACTIVATIONS)}")
        self.activation = MLP_ACTIVATIONS[activation]
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        self.gate_up = gate_up or MergedColumnParallelLinear(hidden_size, [intermediate_size, intermediate_size], comm, **kw)
        self.down = down or RowParallelLinear(intermediate_size, hidden_size, comm, **kw)

    def forward(self, x):
        gate, up = self.gate_up(x).chunk(2, dim=-1)
        return self.down(self.activation(gate) * up)

    @classmethod
    def from_full(cls, gate, up, down, comm: Communicator, sequence_parallel=False, dtype=torch.float32, device="cpu", activation: str = "silu"):
        kw = dict(sequence_parallel=sequence_parallel, dtype=dtype, device=device)
        gate_up = MergedColumnParallelLinear.from_full([gate, up], comm, **kw)
        down_proj = RowParallelLinear.from_full(down, comm, **kw)
        return cls(shape_of(gate)[1], shape_of(gate)[0], comm, gate_up=gate_up, down=down_proj, activation=activation, **kw)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# hidden_act -> the gate's activation: SwiGLU (Llama, Qwen) and GeGLU with gelu's tanh approximation (Gemma)
MLP_ACTIVATIONS = {"silu": F.silu, "gelu_pytorch_tanh": gelu_tanh}
