"""Property: in a world of several TP groups (4 ranks as 2 groups of 2, contiguous {0,1},{2,3}
and strided {0,2},{1,3}), every group computes the single-device function on its own inputs,
forward and backward, and its collectives stay inside the group: each record names exactly
the member's TP group, and each member issues what the same rank of a plain tp=2 world does.

Code that shards by the global rank, or communicates over the world group, passes every
suite whose TP group is the whole world; these cases are where it fails (the strided layout
catches `global rank % tp`, which is right for contiguous groups)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from harness.cases import KINDS
from harness.equivalence import collectives_unlike_plain_tp, evaluate_groups, failures, foreign_collectives, group_cases
from harness.runtime.orchestrator import TP_LAYOUTS

from ..conftest import SUBGROUP_TP, SUBGROUP_WORLD
from .strategies import layer_cases

GROUPS = SUBGROUP_WORLD // SUBGROUP_TP
# CI budget: every kind and both layouts, float32 only, 2 examples each. What is new here is
# which shard and which group a rank uses, a structural fact the dtype does not change: a wrong
# rank or group errs by the size of the output (harness/tolerance.py), and float32's bound is
# the tightest. The dtypes' rounding is covered by test_layers.py's full-world cases.
MAX_EXAMPLES = 2
DTYPE = "float32"


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_in_tp_groups(kind, layout, subgroup_worlds, worlds, metrics, examples, request):
    @settings(max_examples=min(examples, MAX_EXAMPLES), deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    @given(case=layer_cases(kind, SUBGROUP_TP, DTYPE))
    def check(case):
        cases = group_cases(case, GROUPS)
        rows = evaluate_groups(subgroup_worlds[layout], cases)
        metrics.write(rows, request.node.nodeid)
        assert all(r["passed"] for r in rows), f"seed={case.seed}\n" + failures(rows)
        assert all(r["inference_matches"] for r in rows if "inference_matches" in r), "the no-grad forward differs from the autograd forward"
        assert not (foreign := foreign_collectives(rows)), foreign
        assert not (unlike := collectives_unlike_plain_tp(rows, worlds[SUBGROUP_TP], cases)), unlike

    check()
