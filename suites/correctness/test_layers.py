"""Property: every TP layer at world size 1/2/4 computes the single-device function,
forward and backward, in float32, bfloat16 and float16 (tolerances: harness/tolerance.py)."""
from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings

from harness.cases import KINDS
from harness.equivalence import evaluate, failures

from ..conftest import WORLD_SIZES
from .strategies import layer_cases

DTYPES = ("float32", "bfloat16", "float16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
@pytest.mark.parametrize("kind", KINDS)
def test_layer_matches_single_device(kind, world_size, dtype, worlds, metrics, examples, request):
    @settings(max_examples=examples, deadline=None, print_blob=True, suppress_health_check=[HealthCheck.too_slow])
    @given(case=layer_cases(kind, world_size, dtype))
    def check(case):
        rows = evaluate(worlds[world_size], case)
        metrics.write(rows, request.node.nodeid)
        assert all(r["passed"] for r in rows), f"seed={case.seed}\n" + failures(rows)

    check()
