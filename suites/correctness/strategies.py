"""Hypothesis strategies for layer cases. Dimensions are drawn as multiples of the world
size where the layer requires it, and deliberately not where it must not (vocab sizes)."""
from __future__ import annotations

from hypothesis import strategies as st

from harness.cases import LayerCase

seeds = st.integers(0, 2**31 - 1)


def _kv_heads(heads: int, tp: int) -> list[int]:
    """Every kv-head count that divides `heads` and is shardable or replicable at `tp`."""
    return [k for k in range(1, heads + 1) if heads % k == 0 and (k % tp == 0 or tp % k == 0)]


@st.composite
def layer_cases(draw, kind: str, tp: int, dtype: str) -> LayerCase:
    mult = lambda lo, hi: draw(st.integers(lo, hi)) * tp  # noqa: E731
    p: dict = {}
    if kind in ("column", "row"):
        p = {"in": mult(1, 12) if kind == "row" else draw(st.integers(1, 48)),
             "out": mult(1, 12) if kind == "column" else draw(st.integers(1, 48)),
             "bias": draw(st.booleans())}
        if kind == "column":
            p["gather"] = draw(st.booleans())
    elif kind == "merged_column":
        p = {"in": draw(st.integers(1, 48)), "segments": [mult(1, 8), mult(1, 8)], "bias": draw(st.booleans())}
    elif kind in ("qkv", "attention", "block"):
        heads = mult(1, 4)
        p = {"hidden": draw(st.integers(2, 24)) * 2, "heads": heads, "kv_heads": draw(st.sampled_from(_kv_heads(heads, tp))),
             "head_dim": draw(st.sampled_from([2, 4, 8, 16])), "bias": draw(st.booleans())}
        if kind == "block":
            p["inter"] = mult(1, 16)
    elif kind in ("embedding", "lm_head"):
        p = {"vocab": draw(st.integers(1, 97)), "hidden": draw(st.integers(1, 32))}
    elif kind == "rmsnorm":
        p = {"hidden": draw(st.integers(1, 64))}
    elif kind == "mlp":
        p = {"hidden": draw(st.integers(1, 48)), "inter": mult(1, 16)}
    return LayerCase(kind, dtype, draw(seeds), draw(st.integers(1, 3)), draw(st.integers(1, 9)), p)
