"""Fused GPU kernels of the decode step (Triton), each beside the plain-PyTorch path it must equal.

`decode_attention` does one decode step's attention for one layer in one kernel: rotary on the new
query and key, both cache writes, and softmax(q·Kᵀ)·V over the cached positions — work that the
plain path (`impl.tensor_parallel`: `apply_rotary`, `index_copy_` into the cache, `decode_attention`
or SDPA) spreads over several kernels per layer. It reads only the cache rows already written
(a loop bounded by the position, read on the device), never the whole static cache. At decode
sizes the kernel is latency-bound (a few hundred KB of cache per layer), and its grid of
(batch, kv heads) shrinks with TP, so the cached positions are split over `splits` programs per
kv head whose float32 partials a second, small kernel combines (flash-decoding); one split
(a grid already wide enough, e.g. at batch 16) needs no second kernel.

Importing this module never needs Triton or a GPU: `available()` says whether the kernel can run
here. Under TRITON_INTERPRET=1 Triton runs the kernel on CPU tensors (slowly), which is how CI
checks it against the plain path without a GPU.
"""
from __future__ import annotations

import os

import torch

from .architecture import require

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only machines: the plain path is the only path
    triton = None

_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


BLOCK_S = 32  # cached positions per loop iteration of one program
MAX_SPLITS = 32
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)  # it computes in float32: no float64 reference runs here


def available(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """Whether the fused kernel can run on tensors of `device` (a CUDA GPU, or the CPU under
    Triton's interpreter) and, if given, of `dtype`."""
    return triton is not None and (device.type == "cuda" or (_INTERPRET and device.type == "cpu")) and (dtype is None or dtype in KERNEL_DTYPES)


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(qkv_ptr, table_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr, part_ptr, s_row, sc_b, sc_h, sc_s, so_b, so_h,
                                 SCALE: tl.constexpr, HEADS: tl.constexpr, KV_HEADS: tl.constexpr, GROUP: tl.constexpr, HALF: tl.constexpr,
                                 SPLITS: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
        # one program per (batch row, kv head, split of the cached positions): the kv head's GROUP
        # query heads over one contiguous 1/SPLITS of the positions before `pos` (flash-decoding: a
        # decode step's attention is latency-bound, so the positions are spread over programs
        # rather than walked by one). Split 0 also owns the new token: it writes both cache rows
        # and starts its softmax from the new key, held in registers (no program reads slot pos).
        # A qkv row holds [q heads | k heads | v heads], each head 2*HALF values; the table [cos | sin].
        b, kvh, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        pos = tl.load(pos_ptr)
        h = tl.arange(0, BLOCK_H)
        hm = h < HALF
        cos = tl.load(table_ptr + h, mask=hm, other=0.0).to(tl.float32)  # both halves of each table are equal
        sin = tl.load(table_ptr + 2 * HALF + h, mask=hm, other=0.0).to(tl.float32)
        dtype = k_cache_ptr.dtype.element_ty
        row = qkv_ptr + b * s_row
        cache = b * sc_b + kvh * sc_h

        # the new key, rotated (half-split pairing) and rounded to the cache's dtype; the new value
        k_row = row + (HEADS + kvh) * 2 * HALF
        k1 = tl.load(k_row + h, mask=hm, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + HALF + h, mask=hm, other=0.0).to(tl.float32)
        kr1 = (k1 * cos - k2 * sin).to(dtype)
        kr2 = (k2 * cos + k1 * sin).to(dtype)
        v_row = row + (HEADS + KV_HEADS + kvh) * 2 * HALF
        v1 = tl.load(v_row + h, mask=hm, other=0.0).to(dtype)
        v2 = tl.load(v_row + HALF + h, mask=hm, other=0.0).to(dtype)
        owner = split == 0
        wm = hm & ((h * 0 + split) == 0)  # a vector mask: a scalar bool does not broadcast as one under the interpreter
        tl.store(k_cache_ptr + cache + pos * sc_s + h, kr1, mask=wm)
        tl.store(k_cache_ptr + cache + pos * sc_s + HALF + h, kr2, mask=wm)
        tl.store(v_cache_ptr + cache + pos * sc_s + h, v1, mask=wm)
        tl.store(v_cache_ptr + cache + pos * sc_s + HALF + h, v2, mask=wm)

        # the group's queries, rotated and rounded like the plain path's
        g = tl.arange(0, BLOCK_G)
        gm = g < GROUP
        q_rows = row + (kvh * GROUP + g)[:, None] * 2 * HALF
        qm = gm[:, None] & hm[None, :]
        q1 = tl.load(q_rows + h[None, :], mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF + h[None, :], mask=qm, other=0.0).to(tl.float32)
        # rounded to the cache's dtype like the plain path's, then products and sums in float32
        qr1 = (q1 * cos[None, :] - q2 * sin[None, :]).to(dtype).to(tl.float32)
        qr2 = (q2 * cos[None, :] + q1 * sin[None, :]).to(dtype).to(tl.float32)

        # online softmax over this split's positions; split 0 starts from the new token
        m_new_token = (tl.sum(qr1 * kr1.to(tl.float32)[None, :], 1) + tl.sum(qr2 * kr2.to(tl.float32)[None, :], 1)) * SCALE
        m = tl.where(owner, m_new_token, float("-inf"))
        denominator = tl.full((BLOCK_G,), 1.0, tl.float32) * owner.to(tl.float32)
        acc1 = tl.zeros((BLOCK_G, BLOCK_H), tl.float32) + v1.to(tl.float32)[None, :] * owner.to(tl.float32)
        acc2 = tl.zeros((BLOCK_G, BLOCK_H), tl.float32) + v2.to(tl.float32)[None, :] * owner.to(tl.float32)
        chunk = tl.cdiv(pos, SPLITS)
        lo = split * chunk
        hi = tl.minimum(lo + chunk, pos)
        for start in range(lo, hi, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            sm = s < hi
            rows = k_cache_ptr + cache + s[:, None] * sc_s + h[None, :]
            km = sm[:, None] & hm[None, :]
            kt1 = tl.load(rows, mask=km, other=0.0).to(tl.float32)
            kt2 = tl.load(rows + HALF, mask=km, other=0.0).to(tl.float32)
            scores = (tl.dot(qr1, tl.trans(kt1), input_precision="ieee") + tl.dot(qr2, tl.trans(kt2), input_precision="ieee")) * SCALE
            scores = tl.where(sm[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, 1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(scores - m_new[:, None])
            denominator = denominator * alpha + tl.sum(p, 1)
            vrows = v_cache_ptr + cache + s[:, None] * sc_s + h[None, :]
            vt1 = tl.load(vrows, mask=km, other=0.0).to(tl.float32)
            vt2 = tl.load(vrows + HALF, mask=km, other=0.0).to(tl.float32)
            acc1 = acc1 * alpha[:, None] + tl.dot(p, vt1, input_precision="ieee")
            acc2 = acc2 * alpha[:, None] + tl.dot(p, vt2, input_precision="ieee")
            m = m_new
        heads = kvh * GROUP + g
        if SPLITS == 1:
            out_rows = out_ptr + b * so_b + heads[:, None] * so_h
            tl.store(out_rows + h[None, :], (acc1 / denominator[:, None]).to(dtype), mask=qm)
            tl.store(out_rows + HALF + h[None, :], (acc2 / denominator[:, None]).to(dtype), mask=qm)
        else:
            # float32 partials, one record per (row, head, split): [max, denominator, acc (2*HALF)]
            record = part_ptr + ((b * HEADS + heads) * SPLITS + split) * (2 + 2 * HALF)
            tl.store(record, m, mask=gm)
            tl.store(record + 1, denominator, mask=gm)
            tl.store(record[:, None] + 2 + h[None, :], acc1, mask=qm)
            tl.store(record[:, None] + 2 + HALF + h[None, :], acc2, mask=qm)

    @triton.jit
    def _combine_splits_kernel(part_ptr, out_ptr, so_b, so_h, HEADS: tl.constexpr, HALF: tl.constexpr, SPLITS: tl.constexpr,
                               BLOCK_H: tl.constexpr):
        # one program per (batch row, head): softmax over all positions from the splits' partials,
        # each rescaled to the largest of their maxima (an empty split has max -inf and weight 0;
        # split 0 always holds the new token, so the largest is finite)
        b, head = tl.program_id(0), tl.program_id(1)
        sp = tl.arange(0, SPLITS)
        h = tl.arange(0, BLOCK_H)
        hm = h < HALF
        record = part_ptr + ((b * HEADS + head) * SPLITS + sp) * (2 + 2 * HALF)
        m = tl.load(record)
        weight = tl.exp(m - tl.max(m, 0))
        denominator = tl.sum(tl.load(record + 1) * weight, 0)
        acc1 = tl.sum(tl.load(record[:, None] + 2 + h[None, :], mask=hm[None, :], other=0.0) * weight[:, None], 0)
        acc2 = tl.sum(tl.load(record[:, None] + 2 + HALF + h[None, :], mask=hm[None, :], other=0.0) * weight[:, None], 0)
        dtype = out_ptr.dtype.element_ty
        out = out_ptr + b * so_b + head * so_h
        tl.store(out + h, (acc1 / denominator).to(dtype), mask=hm)
        tl.store(out + HALF + h, (acc2 / denominator).to(dtype), mask=hm)


def _next_pow2(n: int, at_least: int) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def splits_for(batch: int, kv_heads: int, max_seq_len: int, programs: int = 128, block_s: int = BLOCK_S) -> int:
    """How many programs share one (row, kv head)'s cached positions: enough that the grid has
    about `programs` of them (the step is latency-bound, not bandwidth-bound, at decode sizes),
    a power of two, and never more than the cache has BLOCK_S-position blocks. The defaults are
    the fastest or within 5 % of it at every point of harness/sweeps/attention_splits.py on an
    H200 (TP 1/2/4 head counts, batch 1 and 16, caches of 256 to 4096 positions)."""
    wanted = max(1, programs // max(1, batch * kv_heads))
    blocks = max(1, -(-max_seq_len // block_s))
    return min(1 << (wanted.bit_length() - 1), 1 << (blocks.bit_length() - 1), MAX_SPLITS)


def _kernel(fn):
    return fn if _INTERPRET or not hasattr(torch.library, "wrap_triton") else torch.library.wrap_triton(fn)


def _launch(qkv, table, k_cache, v_cache, position, out, heads: int, kv_heads: int, splits: int) -> None:
    b, d = qkv.shape[0], out.shape[-1]
    # float32 partials of every split, combined by a second kernel (unused when splits == 1)
    partials = qkv.new_empty((b * heads * splits * (2 + d)) if splits > 1 else 1, dtype=torch.float32)
    # tl.dot needs every dimension >= 16: padded query rows and head-dim columns are masked out
    _kernel(_decode_attention_kernel)[(b, kv_heads, splits)](
        qkv, table, k_cache, v_cache, position, out, partials, qkv.stride(0), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        out.stride(0), out.stride(1), SCALE=d ** -0.5, HEADS=heads, KV_HEADS=kv_heads, GROUP=heads // kv_heads, HALF=d // 2, SPLITS=splits,
        BLOCK_G=_next_pow2(heads // kv_heads, 16), BLOCK_H=_next_pow2(d // 2, 16), BLOCK_S=BLOCK_S)
    if splits > 1:
        _kernel(_combine_splits_kernel)[(b, heads)](partials, out, out.stride(0), out.stride(1), HEADS=heads, HALF=d // 2, SPLITS=splits,
                                                    BLOCK_H=_next_pow2(d // 2, 16))


if triton is not None and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("tpgate::decode_attention", mutates_args={"k_cache", "v_cache"})
    def _decode_attention_op(qkv: torch.Tensor, table: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor,
                             heads: int, kv_heads: int, splits: int) -> torch.Tensor:
        out = qkv.new_empty(qkv.shape[0], heads, 1, k_cache.shape[-1])
        _launch(qkv, table, k_cache, v_cache, position, out, heads, kv_heads, splits)
        return out
else:
    _decode_attention_op = None


def decode_attention(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     position: torch.Tensor, heads: int, kv_heads: int, splits: int | None = None) -> torch.Tensor:
    """One decode step's attention for one layer, fused; returns (b, heads, 1, d) in qkv's dtype and
    writes the step's rotated key and its value into cache slot `position` of rows [0, b).

    qkv: (b, 1, (heads + 2 kv_heads) d), the qkv projection's output before rotary, laid out
    [q heads | k heads | v heads] (QKVParallelLinear's local layout); cos, sin: the rotary tables of
    the step's position, d values each (leading dims of size 1); k_cache, v_cache: (max_batch >= b,
    kv_heads, S, d), contiguous in d; position: a 1-element long tensor (tokens already cached, < S)
    on the same device. heads a multiple of kv_heads (GQA), d even. splits: programs per (row,
    kv head) sharing its cached positions, a power of two up to MAX_SPLITS (default `splits_for`
    this batch, kv heads and cache length). The plain path it equals:
    apply_rotary + index_copy_ into the caches + softmax(q·Kᵀ/√d)·V over the positions <= position."""
    b, s, width = qkv.shape
    d = k_cache.shape[-1]
    require(s == 1 and width == (heads + 2 * kv_heads) * d, "qkv.shape", tuple(qkv.shape), f"must be (b, 1, (heads + 2 kv_heads) * head_dim = {(heads + 2 * kv_heads) * d}): one decode token")
    require(qkv.dtype in KERNEL_DTYPES, "qkv.dtype", qkv.dtype, f"must be one of {KERNEL_DTYPES} (the kernel computes in float32)")
    require(heads % kv_heads == 0 and d % 2 == 0, "heads / kv_heads / head_dim", (heads, kv_heads, d), "heads must be a multiple of kv_heads and head_dim even")
    require(k_cache.shape[1] == kv_heads and k_cache.shape[0] >= b and k_cache.stride(-1) == 1, "k_cache", tuple(k_cache.shape),
            f"must be (>= {b}, {kv_heads}, S, {d}), contiguous in the last dim")
    require(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), "v_cache", tuple(v_cache.shape), "must match k_cache's shape and strides")
    splits = splits_for(b, kv_heads, k_cache.shape[2]) if splits is None else splits
    require(isinstance(splits, int) and 1 <= splits <= MAX_SPLITS and splits & (splits - 1) == 0, "splits", splits,
            f"must be a power of two in [1, {MAX_SPLITS}]")
    qkv = qkv.reshape(b, width).contiguous()
    table = torch.cat([cos.reshape(-1)[-d:], sin.reshape(-1)[-d:]])  # one small tensor: one kernel to make, not two
    position = position.reshape(1)
    if _decode_attention_op is not None and not _INTERPRET:
        return _decode_attention_op(qkv, table, k_cache, v_cache, position, heads, kv_heads, splits)
    out = qkv.new_empty(b, heads, 1, d)
    _launch(qkv, table, k_cache, v_cache, position, out, heads, kv_heads, splits)
    return out
