"""Whole-model equivalence against Hugging Face transformers on the same weights, at TP 1/2/4,
through the same path as `tpgate verify` (loader -> model -> prompt logits + greedy tokens)."""
from __future__ import annotations

import pytest

from harness.verify import VerifyRequest, verify

WORLD_SIZES = (1, 2, 4)


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
def test_model_matches_transformers_at_every_tp(variant, dtype, checkpoint, worlds, metrics, request):
    req = VerifyRequest(str(checkpoint(variant)), WORLD_SIZES, "cpu", dtype, batch=2, prompt_len=12, new_tokens=6, seed=3)
    result = verify(req, lambda n: worlds[n])
    metrics.write([metric_row(variant, req, row) for row in result["rows"]], request.node.nodeid)
    assert result["reference"] == "transformers"
    assert result["semantic_check"]["passed"], result["semantic_check"]
    for row in result["rows"]:
        assert row["ranks_agree"], row
        assert row["max_abs_vs_exact"] <= row["bound"], row
        # tokens: identical, or first differing at a near-tie the dtype cannot resolve
        assert row["first_diverging_token"] is None or row["divergence_at_near_tie"], row
        if dtype == "float32":  # fp32 has no near-ties at these margins: tokens must agree exactly
            assert row["first_diverging_token"] is None and row["top1_agreement"] == 1.0, row


def test_sharded_index_checkpoint_loads(checkpoint, worlds):
    directory = checkpoint("llama-gqa", sharded=True)
    assert (directory / "model.safetensors.index.json").is_file()
    result = verify(VerifyRequest(str(directory), (1, 4), new_tokens=3), lambda n: worlds[n])
    assert result["passed"], result["rows"]


def metric_row(variant: str, req: VerifyRequest, row: dict) -> dict:
    """The verify row in the correctness report's schema (one 'model[...]' line of the matrix)."""
    return {"layer": f"model[{variant}]", "dtype": req.dtype, "seed": req.seed, "batch": req.batch, "seq": req.prompt_len,
            "params": f"new_tokens={req.new_tokens}", "world_size": row["tp"], "case": f"{variant} b={req.batch} s={req.prompt_len}",
            "tensor": "logits", "max_abs": row["max_abs_vs_single"], "max_rel": row["rel_vs_exact"], "ulp": -1, "err_single": float("nan"),
            "err_tp": row["max_abs_vs_exact"], "bound": row["bound"], "budget_used": row["max_abs_vs_exact"] / row["bound"],
            "passed": row["passed"], "ranks_consistent": row["ranks_agree"]}
