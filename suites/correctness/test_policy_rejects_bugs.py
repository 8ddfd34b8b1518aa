"""The tolerance policy is not a rubber stamp: known-wrong TP implementations fail it,
in float32 and in bfloat16 (the loosest bound)."""
from __future__ import annotations

import pytest

from harness.cases import LayerCase
from harness.equivalence import evaluate

from . import mutants

ATTN = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "bias": False}
CASES = [
    (mutants.no_collectives, LayerCase("row", params={"in": 32, "out": 16, "bias": False}, batch=2, seq=4)),
    (mutants.no_collectives, LayerCase("block", params={**ATTN, "inter": 64}, batch=2, seq=4)),
    (mutants.shifted_shard, LayerCase("column", params={"in": 16, "out": 32, "bias": True, "gather": True}, batch=2, seq=4)),
    (mutants.shifted_shard, LayerCase("embedding", params={"vocab": 37, "hidden": 8}, batch=2, seq=4)),
    (mutants.bias_every_rank, LayerCase("row", params={"in": 32, "out": 16, "bias": True}, batch=2, seq=4)),
    (mutants.kv_head_of_rank0, LayerCase("qkv", params={**ATTN, "kv_heads": 2}, batch=2, seq=4)),
    (mutants.replicated_grad_off_rank0, LayerCase("row", params={"in": 32, "out": 16, "bias": True}, batch=2, seq=4)),
    (mutants.replicated_grad_off_rank0, LayerCase("block", params={**ATTN, "inter": 64}, batch=2, seq=4)),
]


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("mutant,case", CASES, ids=[f"{m.__name__}-{c.kind}" for m, c in CASES])
def test_broken_implementation_is_rejected(mutant, case, dtype, worlds):
    case = LayerCase(case.kind, dtype, 7, case.batch, case.seq, case.params)
    assert all(r["passed"] for r in evaluate(worlds[4], case)), "the real implementation must pass this case"
    rows = evaluate(worlds[4], case, rank_fn=mutant)
    assert not all(r["passed"] for r in rows), f"{mutant.__name__} slipped through: " + str([(r["tensor"], r["err_tp"], r["bound"]) for r in rows])
