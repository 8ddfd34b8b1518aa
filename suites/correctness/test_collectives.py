"""Each layer communicates exactly what the TP algorithm prescribes: kind, count and bytes,
forward (with autograd and under torch.no_grad) and backward (CountingCommunicator on every rank)."""
from __future__ import annotations

import math

import pytest
from hypothesis import given, settings

from harness.equivalence import evaluate

from .strategies import layer_cases

# (forward, backward) collective kinds for world size > 1
EXPECTED = {
    "column": (None, ["all_reduce"]),  # forward depends on gather_output
    "row": (["all_reduce"], ["all_gather"]),  # input scattered locally; its backward gathers
    "merged_column": ([], ["all_reduce"]),
    "qkv": ([], ["all_reduce"]),
    "embedding": (["all_reduce"], []),
    "lm_head": (["all_gather"], ["all_reduce"]),
    "rmsnorm": ([], []),
    "attention": (["all_reduce"], ["all_reduce"]),
    "mlp": (["all_reduce"], ["all_reduce"]),
    "block": (["all_reduce", "all_reduce"], ["all_reduce", "all_reduce"]),
}
ELEMENT_BYTES = 4  # float32 cases


def expected_forward_bytes(case, tp):
    p, tokens = case.params, case.batch * case.seq
    if case.kind == "row":
        return [tokens * p["out"] * ELEMENT_BYTES]
    if case.kind == "column":
        return [tokens * p["out"] // tp * ELEMENT_BYTES] if p["gather"] else []
    if case.kind == "embedding":
        return [tokens * p["hidden"] * ELEMENT_BYTES]
    if case.kind == "lm_head":
        return [tokens * math.ceil(p["vocab"] / tp) * ELEMENT_BYTES]
    if case.kind in ("attention", "mlp", "block"):
        return [tokens * p["hidden"] * ELEMENT_BYTES] * len(EXPECTED[case.kind][0])
    return []


@pytest.mark.parametrize("world_size", (2, 4))
@pytest.mark.parametrize("kind", sorted(EXPECTED))
def test_collectives_match_the_algorithm(kind, world_size, worlds):
    @settings(max_examples=3, deadline=None)
    @given(case=layer_cases(kind, world_size, "float32"))
    def check(case):
        row = evaluate(worlds[world_size], case)[0]
        records = row["collectives"]
        backward = [r["kind"] for r in records if r["phase"] == "backward"]
        fwd_kinds, bwd_kinds = EXPECTED[kind]
        if kind == "column":
            fwd_kinds = ["all_gather"] if case.params["gather"] else []
        # forward with autograd and inference under torch.no_grad (communication.py's direct
        # branches) issue the same collectives, of the same bytes and dtype
        for phase in ("forward", "inference"):
            forward = [r for r in records if r["phase"] == phase]
            assert [r["kind"] for r in forward] == fwd_kinds, phase
            assert [r["nbytes"] for r in forward] == expected_forward_bytes(case, world_size), phase
            assert all(r["dtype"] == "torch.float32" for r in forward), phase
        assert backward == bwd_kinds
        assert row["inference_matches"], "the no-grad forward differs from the autograd forward"

    check()


def test_world_size_one_communicates_nothing(worlds):
    from harness.cases import LayerCase

    case = LayerCase("block", params={"hidden": 8, "heads": 2, "kv_heads": 1, "head_dim": 4, "inter": 8})
    assert evaluate(worlds[1], case)[0]["collectives"] == []
