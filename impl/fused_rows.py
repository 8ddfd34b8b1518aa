"""Row ranges of a fused checkpoint tensor, read lazily: Phi-3's qkv_proj (rows [q | k | v])
and gate_up_proj (rows [gate | up]) as the separate q, k, v (gate, up) sources `shard()` takes.

`split_rows(src, sizes)` cuts `src` (a torch tensor or a safetensors lazy slice; rows along
dim 0) into consecutive row ranges of `sizes`. A torch tensor gives `narrow` views; a lazy
slice gives RowRange views that translate every read into the same read of the underlying
slice, offset by the range's start, so rank r's `shard()` reads its q rows, its k rows and its
v rows of the fused tensor and nothing else (suites/model/test_tied_and_loading.py counts it).
"""
from __future__ import annotations

import torch

from .architecture import require
from .sharding import shape_of


class RowRange:
    """Rows [start, start + rows) of a lazy slice `src`, itself with the lazy-slice interface
    `shard()` uses: get_shape(), get_dtype(), and [index] with an index of slices (step 1)
    whose first entry selects rows of the range."""

    def __init__(self, src, start: int, rows: int):
        self.src, self.start, self.rows = src, start, rows

    def get_shape(self) -> list[int]:
        return [self.rows, *shape_of(self.src)[1:]]

    def get_dtype(self):
        return self.src.get_dtype()

    def __getitem__(self, index):
        index = index if isinstance(index, tuple) else (index,)
        first, rest = index[0], index[1:]
        require(isinstance(first, slice) and first.step in (None, 1), "index", index, "a row range reads slices of rows (step 1)")
        lo, hi, _ = first.indices(self.rows)
        return self.src[(slice(self.start + lo, self.start + max(lo, hi)), *rest)]


def split_rows(src, sizes: list[int], name: str = "fused tensor") -> list:
    """Consecutive row ranges of `src` with `sizes` rows each (their sum must be its row count)."""
    total = shape_of(src)[0]
    require(sum(sizes) == total, f"{name} rows", total, f"must be {' + '.join(map(str, sizes))} = {sum(sizes)} (the config's segments)")
    starts = [sum(sizes[:i]) for i in range(len(sizes))]
    if isinstance(src, torch.Tensor):
        return [src.narrow(0, start, size) for start, size in zip(starts, sizes)]
    return [RowRange(src, start, size) for start, size in zip(starts, sizes)]


__all__ = ["RowRange", "split_rows"]
