"""The tolerance policy's arithmetic: ULP distance and the bound."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness.tolerance import UNIT_ROUNDOFF, compare, ulp_distance


@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16, torch.float16))
@given(x=st.floats(-1e3, 1e3, allow_nan=False), steps=st.integers(0, 50))
@settings(max_examples=30, deadline=None)
def test_ulp_distance_counts_representable_steps(dtype, x, steps):
    a = torch.tensor([x]).to(dtype)
    b = a.clone()
    for _ in range(steps):
        b = torch.nextafter(b.float(), torch.tensor([float("inf")])).to(dtype) if dtype == torch.float32 else _next_up(b, dtype)
    assert ulp_distance(a, b, dtype) == steps


def _next_up(t, dtype):
    bits = t.view(torch.int16).clone()
    bits += torch.where(bits >= 0, 1, -1).to(torch.int16) if t.item() != 0 or not torch.signbit(t).item() else 0
    if t.item() == 0 and torch.signbit(t).item():  # -0 -> smallest positive
        bits = torch.tensor([1], dtype=torch.int16)
    out = bits.view(dtype)
    return out


def test_ulp_distance_across_zero():
    a, b = torch.tensor([-0.0]), torch.tensor([0.0])
    assert ulp_distance(a, b, torch.float32) == 0
    tiny = torch.tensor([torch.finfo(torch.float32).tiny])
    assert ulp_distance(-tiny, tiny, torch.float32) == 2 * (1 << 23)


def test_identical_results_pass_and_wrong_results_fail():
    exact = torch.linspace(-2, 2, 64, dtype=torch.float64)
    single = exact.float()
    ok = compare("y", single, single, exact, torch.float32, 4)
    assert ok["passed"] and ok["max_abs"] == 0 and ok["ulp"] == 0
    wrong = compare("y", single * 1.01, single, exact, torch.float32, 4)
    assert not wrong["passed"] and wrong["budget_used"] > 1


def test_bound_follows_the_error_model():
    exact = torch.full((8,), 3.0, dtype=torch.float64)
    row = compare("y", exact.float(), exact.float(), exact, torch.bfloat16, 4)
    assert row["bound"] == pytest.approx(5 * 2 * UNIT_ROUNDOFF[torch.bfloat16] * 3.0)


def test_shape_mismatch_and_nonfinite_disagreement_fail():
    exact = torch.zeros(4, dtype=torch.float64)
    assert not compare("y", torch.zeros(5), torch.zeros(4), exact, torch.float32, 2)["passed"]
    nan = torch.tensor([0.0, float("nan"), 0.0, 0.0])
    assert not compare("y", nan, torch.zeros(4), exact, torch.float32, 2)["passed"]
