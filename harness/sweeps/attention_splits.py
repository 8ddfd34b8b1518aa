"""The fused decode-attention kernel (impl/kernels.py) alone, by how its cached positions are split.

    OUT=DIR python3 -m harness.sweeps.attention_splits          (one CUDA device with Triton)

For the Llama-3-8B attention of one rank at TP 1, 2 and 4 (32/8, 16/4, 8/2 query/kv heads, head
dim 128, bf16), batch 1 and 16, and a few positions, times one call of `decode_attention` for
each power-of-two split count: replays of a CUDA graph of 32 calls (one per layer, each with its
own cache, as in the decode step), CUDA events around the replays. Also checks each result
against splits=1 on the same inputs (max |difference|: float32 partials combined in another
order). Writes $OUT/attention_splits.json with the default split count (`kernels.splits_for`)
beside the fastest one, which is what decides that default.
"""
import json
import os

import torch

from harness.timing import graph_call_seconds
from impl import kernels

LAYERS = 32
SHAPES = {"tp1": (32, 8), "tp2": (16, 4), "tp4": (8, 2)}  # (local q heads, local kv heads)


def measure(heads: int, kv_heads: int, batch: int, position: int, cache_len: int, d: int = 128) -> dict:
    g = torch.Generator(device="cuda").manual_seed(0)
    qkv = torch.randn(batch, 1, (heads + 2 * kv_heads) * d, device="cuda", generator=g).to(torch.bfloat16)
    caches = [tuple(torch.randn(batch, kv_heads, cache_len, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(2)) for _ in range(LAYERS)]
    cos, sin = torch.rand(d, device="cuda", generator=g), torch.rand(d, device="cuda", generator=g)
    pos = torch.tensor([position], device="cuda")
    row = {"heads": heads, "kv_heads": kv_heads, "batch": batch, "position": position, "cache_len": cache_len,
           "default_splits": kernels.splits_for(batch, kv_heads, cache_len), "splits": {}}
    one = kernels.decode_attention(qkv, cos, sin, caches[0][0], caches[0][1], pos, heads, kv_heads, 1).float()
    splits = 1
    while splits <= kernels.MAX_SPLITS:
        out = kernels.decode_attention(qkv, cos, sin, caches[0][0], caches[0][1], pos, heads, kv_heads, splits).float()
        us = 1e6 * graph_call_seconds([lambda k=k, v=v, s=splits: kernels.decode_attention(qkv, cos, sin, k, v, pos, heads, kv_heads, s) for k, v in caches])
        row["splits"][splits] = {"us": us, "max_abs_vs_one_split": (out - one).abs().max().item()}
        splits *= 2
    row["fastest_splits"] = int(min(row["splits"], key=lambda s: row["splits"][s]["us"]))
    return row


def main() -> None:
    out = os.environ.get("OUT", "/tmp/out")
    os.makedirs(out, exist_ok=True)
    rows = []
    for tp, (heads, kv_heads) in SHAPES.items():
        for batch in (1, 16):
            for position, cache_len in ((100, 256), (200, 256), (1000, 1024), (4000, 4096)):
                row = {"tp": tp, **measure(heads, kv_heads, batch, position, cache_len)}
                rows.append(row)
                times = {s: round(v["us"], 2) for s, v in row["splits"].items()}
                print(tp, f"b={batch} pos={position}", "default", row["default_splits"], "fastest", row["fastest_splits"], times, flush=True)
    with open(f"{out}/attention_splits.json", "w") as f:
        json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
