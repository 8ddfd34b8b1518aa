"""How each parameter is split across the ranks of its TP group, declared once, by the layer that owns it.

Every parameter of impl/tensor_parallel.py's layers carries a `ShardSpec` (`param.tp_shard`, set
in the layer's `__init__`), in the manner of Megatron's `partition_dim`. One pair of functions
reads it, and everything that moves between full and sharded tensors goes through that pair:

  shard(sources, spec, rank, tp)    the full tensors (one per segment; torch tensors or
                                    safetensors lazy slices, read only in the rank's range)
                                    -> this rank's local tensor (the layers' `from_full`, so
                                    the Hugging Face loader);
  unshard(locals, spec)             every rank's local tensor -> the full tensors, one per
                                    segment (the layers' `full_state`: resharding a tpgate shard
                                    checkpoint, whose metadata stores each tensor's spec, and the
                                    equivalence cases' gathered outputs and gradients).

A spec is `dim` (None: replicated, every rank holds the whole tensor) and the `segments` laid
end to end along `dim`, each split on its own so that a rank's local tensor is
[segment 0's block | segment 1's block | ...] (q|k|v, gate|up). A segment of `size` rows is cut
into tp // `replicas` equal blocks, block b held by ranks b*replicas .. (b+1)*replicas - 1
(replicas > 1: kv heads shared by several ranks when tp > num_kv_heads); `padded` (>= size, a
multiple of the block count) zero-pads it first (vocabulary rows at any vocab size).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

from .architecture import require


@dataclass(frozen=True)
class Segment:
    size: int  # full rows along the spec's dim
    replicas: int = 1  # ranks holding the same block
    padded: int | None = None  # full rows after zero padding (None: size)

    def blocks(self, tp: int) -> int:
        return tp // self.replicas

    def local(self, tp: int) -> int:
        return (self.padded or self.size) // self.blocks(tp)


@dataclass(frozen=True)
class ShardSpec:
    dim: int | None  # None: replicated
    segments: tuple[Segment, ...] = ()

    def full_size(self) -> int:
        return sum(s.size for s in self.segments)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> "ShardSpec":
        return cls(data["dim"], tuple(Segment(**s) for s in data["segments"]))


REPLICATED = ShardSpec(None)


def rows(size: int, replicas: int = 1, padded: int | None = None) -> ShardSpec:
    """One segment split along dim 0 (column-parallel weights and biases, vocabulary rows)."""
    return ShardSpec(0, (Segment(size, replicas, padded),))


def columns(size: int) -> ShardSpec:
    """One segment split along dim 1 (row-parallel weights)."""
    return ShardSpec(1, (Segment(size),))


def declare(param: torch.Tensor | None, spec: ShardSpec) -> None:
    if param is not None:
        param.tp_shard = spec


def spec_of(param: torch.Tensor) -> ShardSpec:
    """The parameter's declared spec (REPLICATED for one that declares none: held whole by every rank)."""
    return getattr(param, "tp_shard", REPLICATED)


def shape_of(src) -> tuple[int, ...]:
    return tuple(src.shape) if isinstance(src, torch.Tensor) else tuple(src.get_shape())


def take(src, dim: int, start: int, stop: int) -> torch.Tensor:
    """Rows [start, stop) of `src` along `dim` (0 or 1); rows past the end are zero padding.

    Reads only that range when `src` is a safetensors lazy slice.
    """
    size = shape_of(src)[dim]
    real_stop = min(stop, size)
    index = (slice(start, real_stop),) if dim == 0 else (slice(None), slice(start, real_stop))
    part = src[index] if start < real_stop else None
    if isinstance(part, torch.Tensor):
        part = part.clone() if isinstance(src, torch.Tensor) else part
    if real_stop == stop:
        return part
    pad_shape = list(shape_of(src))
    pad_shape[dim] = stop - max(start, real_stop)
    dtype = src.dtype if isinstance(src, torch.Tensor) else (part.dtype if part is not None else torch.float32)
    pad = torch.zeros(pad_shape, dtype=dtype)
    return pad if part is None else torch.cat([part, pad], dim)


def shard(sources: list, spec: ShardSpec, rank: int, tp: int, duplicates: str = "copy") -> torch.Tensor:
    """This rank's local tensor of the full `sources` (one per segment, in order; one source for a
    replicated spec). `duplicates="zero"` gives zeros for a block this rank holds as a replica but
    not as its first holder (an output gradient that must reach each replicated head once)."""
    if spec.dim is None:
        require(len(sources) == 1, "sources", len(sources), "a replicated tensor has one source")
        return take(sources[0], 0, 0, shape_of(sources[0])[0])
    require(len(sources) == len(spec.segments), "sources", len(sources), f"must be one per segment ({len(spec.segments)})")
    parts = []
    for src, seg in zip(sources, spec.segments):
        n, block = seg.local(tp), rank // seg.replicas
        part = take(src, spec.dim, block * n, (block + 1) * n)
        parts.append(torch.zeros_like(part) if duplicates == "zero" and rank % seg.replicas else part)
    return parts[0] if len(parts) == 1 else torch.cat(parts, spec.dim)


class ShardLayoutError(ValueError):
    """Local tensors that do not have the shape their spec gives at this TP degree."""


def unshard(locals_: list[torch.Tensor], spec: ShardSpec, sum_replicas: bool = False) -> list[torch.Tensor]:
    """The full tensors, one per segment, from every rank's local tensor (rank order). A replicated
    spec gives rank 0's. A block held by several ranks is taken from its first holder, or summed
    over its holders when `sum_replicas` (gradients: each holder saw a share of the heads).
    ShardLayoutError when a local tensor's size along the spec's dim is not what `len(locals_)` ranks hold."""
    if spec.dim is None:
        return [locals_[0]]
    tp = len(locals_)
    expected = sum(s.local(tp) for s in spec.segments)
    wrong = [r for r, t in enumerate(locals_) if t.shape[spec.dim] != expected]
    if wrong:
        raise ShardLayoutError(f"rank {wrong[0]}'s tensor has {locals_[wrong[0]].shape[spec.dim]} rows along dim {spec.dim}; "
                               f"{spec} at tp={tp} gives {expected}")
    split = [torch.split(t, [s.local(tp) for s in spec.segments], spec.dim) for t in locals_]
    full = []
    for i, seg in enumerate(spec.segments):
        blocks = []
        for b in range(seg.blocks(tp)):
            holders = [split[b * seg.replicas + j][i] for j in range(seg.replicas)]
            blocks.append(sum(holders[1:], holders[0]) if sum_replicas else holders[0])
        full.append(torch.cat(blocks, spec.dim).narrow(spec.dim, 0, seg.size))
    return full


__all__ = ["REPLICATED", "Segment", "ShardLayoutError", "ShardSpec", "columns", "declare", "rows", "shape_of", "shard", "spec_of", "take", "unshard"]
