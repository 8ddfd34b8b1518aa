"""Fused GPU kernels of the decode step (Triton), each beside the plain-PyTorch path it must equal.

`decode_attention` does one decode step's attention for one layer in one kernel: rotary on the new
query and key, both cache writes, and softmax(q·Kᵀ)·V over the cached positions — work that the
plain path (`impl.tensor_parallel`: `apply_rotary`, `index_copy_` into the cache, `decode_attention`
or SDPA) spreads over several kernels per layer. It reads only the cache rows already written
(a loop bounded by the position, read on the device), never the whole static cache.

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


def available(device: torch.device) -> bool:
    """Whether the fused kernel can run on tensors of `device` (a CUDA GPU, or the CPU under Triton's interpreter)."""
    return triton is not None and (device.type == "cuda" or (_INTERPRET and device.type == "cpu"))


if triton is not None:

    @triton.jit
    def _decode_attention_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, pos_ptr, out_ptr,
                                 sq_b, sq_h, sk_b, sk_h, sv_b, sv_h, sc_b, sc_h, sc_s, so_b, so_h, scale,
                                 GROUP: tl.constexpr, HALF: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_S: tl.constexpr):
        # one program per (batch row, kv head): the kv head's new key/value and its GROUP query heads
        b, kvh = tl.program_id(0), tl.program_id(1)
        pos = tl.load(pos_ptr)
        h = tl.arange(0, BLOCK_H)
        hm = h < HALF
        cos = tl.load(cos_ptr + h, mask=hm, other=0.0).to(tl.float32)  # both halves of the table are equal
        sin = tl.load(sin_ptr + h, mask=hm, other=0.0).to(tl.float32)
        dtype = k_cache_ptr.dtype.element_ty

        # the new key, rotated (half-split pairing) and rounded to the cache's dtype; the new value
        k_row = k_ptr + b * sk_b + kvh * sk_h
        k1 = tl.load(k_row + h, mask=hm, other=0.0).to(tl.float32)
        k2 = tl.load(k_row + HALF + h, mask=hm, other=0.0).to(tl.float32)
        kr1 = (k1 * cos - k2 * sin).to(dtype)
        kr2 = (k2 * cos + k1 * sin).to(dtype)
        v_row = v_ptr + b * sv_b + kvh * sv_h
        v1 = tl.load(v_row + h, mask=hm, other=0.0).to(dtype)
        v2 = tl.load(v_row + HALF + h, mask=hm, other=0.0).to(dtype)
        cache = b * sc_b + kvh * sc_h
        tl.store(k_cache_ptr + cache + pos * sc_s + h, kr1, mask=hm)
        tl.store(k_cache_ptr + cache + pos * sc_s + HALF + h, kr2, mask=hm)
        tl.store(v_cache_ptr + cache + pos * sc_s + h, v1, mask=hm)
        tl.store(v_cache_ptr + cache + pos * sc_s + HALF + h, v2, mask=hm)

        # the group's queries, rotated and rounded like the plain path's
        g = tl.arange(0, BLOCK_G)
        gm = g < GROUP
        q_rows = q_ptr + b * sq_b + (kvh * GROUP + g)[:, None] * sq_h
        qm = gm[:, None] & hm[None, :]
        q1 = tl.load(q_rows + h[None, :], mask=qm, other=0.0).to(tl.float32)
        q2 = tl.load(q_rows + HALF + h[None, :], mask=qm, other=0.0).to(tl.float32)
        # rounded to the cache's dtype like the plain path's, then products and sums in float32
        qr1 = (q1 * cos[None, :] - q2 * sin[None, :]).to(dtype).to(tl.float32)
        qr2 = (q2 * cos[None, :] + q1 * sin[None, :]).to(dtype).to(tl.float32)

        # online softmax, started from the new token (held in registers, never re-read from the cache)
        m = (tl.sum(qr1 * kr1.to(tl.float32)[None, :], 1) + tl.sum(qr2 * kr2.to(tl.float32)[None, :], 1)) * scale
        denominator = tl.full((BLOCK_G,), 1.0, tl.float32)
        acc1 = tl.zeros((BLOCK_G, BLOCK_H), tl.float32) + v1.to(tl.float32)[None, :]
        acc2 = tl.zeros((BLOCK_G, BLOCK_H), tl.float32) + v2.to(tl.float32)[None, :]
        for start in range(0, pos, BLOCK_S):
            s = start + tl.arange(0, BLOCK_S)
            sm = s < pos
            rows = k_cache_ptr + cache + s[:, None] * sc_s + h[None, :]
            km = sm[:, None] & hm[None, :]
            kt1 = tl.load(rows, mask=km, other=0.0).to(tl.float32)
            kt2 = tl.load(rows + HALF, mask=km, other=0.0).to(tl.float32)
            scores = (tl.dot(qr1, tl.trans(kt1), input_precision="ieee") + tl.dot(qr2, tl.trans(kt2), input_precision="ieee")) * scale
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
        out_rows = out_ptr + b * so_b + (kvh * GROUP + g)[:, None] * so_h
        tl.store(out_rows + h[None, :], (acc1 / denominator[:, None]).to(dtype), mask=qm)
        tl.store(out_rows + HALF + h[None, :], (acc2 / denominator[:, None]).to(dtype), mask=qm)


def _next_pow2(n: int, at_least: int) -> int:
    return max(at_least, 1 << (n - 1).bit_length())


def _launch(q, k, v, cos, sin, k_cache, v_cache, position, out) -> None:
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    # tl.dot needs every dimension >= 16; padded query rows and head-dim columns are masked out
    grid = (b, hkv)
    kernel = _decode_attention_kernel if _INTERPRET or not hasattr(torch.library, "wrap_triton") else torch.library.wrap_triton(_decode_attention_kernel)
    kernel[grid](q, k, v, cos, sin, k_cache, v_cache, position, out,
                 q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1),
                 k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), out.stride(0), out.stride(1), d ** -0.5,
                 GROUP=hq // hkv, HALF=d // 2, BLOCK_G=_next_pow2(hq // hkv, 16), BLOCK_H=_next_pow2(d // 2, 16), BLOCK_S=32)


if triton is not None and hasattr(torch.library, "triton_op"):
    @torch.library.triton_op("tpgate::decode_attention", mutates_args={"k_cache", "v_cache"})
    def _decode_attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                             k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(q)
        _launch(q, k, v, cos, sin, k_cache, v_cache, position, out)
        return out
else:
    _decode_attention_op = None


def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     k_cache: torch.Tensor, v_cache: torch.Tensor, position: torch.Tensor) -> torch.Tensor:
    """One decode step's attention for one layer, fused; returns (b, hq, 1, d) in q's dtype and writes
    the step's rotated key and its value into cache slot `position` of rows [0, b).

    q: (b, hq, 1, d), k and v: (b, hkv, 1, d) — before rotary, as the qkv projection produced them;
    cos, sin: the rotary tables of the step's position, d values each (any leading dims of size 1);
    k_cache, v_cache: (max_batch >= b, hkv, S, d), contiguous in d; position: a 1-element long tensor
    (tokens already cached, < S) on the same device. hq must be a multiple of hkv (GQA), d even.
    The plain path it equals: apply_rotary + index_copy_ + softmax(q·Kᵀ/√d)·V over positions <= position."""
    b, hq, s, d = q.shape
    hkv = k.shape[1]
    require(s == 1 and tuple(k.shape) == (b, hkv, 1, d) and tuple(v.shape) == (b, hkv, 1, d), "q/k/v shapes", (tuple(q.shape), tuple(k.shape), tuple(v.shape)),
            "must be (b, hq, 1, d) and (b, hkv, 1, d): one decode token")
    require(hq % hkv == 0 and d % 2 == 0, "heads / head_dim", (hq, hkv, d), "hq must be a multiple of hkv and head_dim even")
    require(k_cache.shape[1:] == (hkv, k_cache.shape[2], d) and k_cache.shape[0] >= b and k_cache.stride(-1) == 1, "k_cache", tuple(k_cache.shape),
            f"must be (>= {b}, {hkv}, S, {d}), contiguous in the last dim")
    require(v_cache.shape == k_cache.shape and v_cache.stride() == k_cache.stride(), "v_cache", tuple(v_cache.shape), "must match k_cache's shape and strides")
    q, k, v = (t.contiguous() for t in (q, k, v))
    cos, sin, position = cos.reshape(-1)[-d:].contiguous(), sin.reshape(-1)[-d:].contiguous(), position.reshape(1)
    if _decode_attention_op is not None and not _INTERPRET:
        return _decode_attention_op(q, k, v, cos, sin, k_cache, v_cache, position)
    out = torch.empty_like(q)
    _launch(q, k, v, cos, sin, k_cache, v_cache, position, out)
    return out
