"""The tolerance policy: when is a TP result "the same function" as the single-device one?

Error model. A TP layer computes the same real-valued function as the single-device layer;
its floating-point result differs in two ways only:
  (a) reductions run in another order (each rank sums K/tp terms, then the collective sums
      tp partials), and
  (b) extra roundings: each rank's partial result is rounded to the working dtype before the
      collective, and the collective's tp-1 additions round again (gloo/NCCL reduce in the
      tensor's dtype).
Measured against an exact reference y* (the same layer, same quantised weights and inputs,
in float64), the single-device error E1 = max|y1 - y*| samples the accumulation error of
the computation; a different summation order (a) can land anywhere within the same bound.
Each rounding in (b) adds at most u*|p| for the value p it rounds (u = unit roundoff of
the dtype): one output rounding of |y| and tp partial roundings of |p_i|, where the
partials p_i sum to y. Partials may cancel, so sum|p_i| can far exceed |y| (hypothesis found
a 1-wide LM head whose two vocab halves cancel to 1/10 of either). The magnitude that bounds
them is S = the same computation on absolute values (|weights|, |inputs|, |output grad|):
for every reduction sum|p_i| <= sum|terms| = S. Hence the acceptance bound:

    max|y_tp - y*|  <=  2*E1  +  (tp + 1) * u * max S

2*E1: the TP path's own accumulation error, allowed to be twice the observed one since its
order differs; (tp + 1) * u * max S: tp partial roundings plus one output rounding, each of
a value no larger than S. At tp = 1 the paths are identical and the bound holds with slack.
Where S is not available (whole-model logits in `tpgate verify`, where absolute values
through many layers overflow any useful scale), the expected-case magnitude is used:
for tp independent zero-mean partials E[sum|p_i|] = sqrt(2/pi)*sqrt(tp)*rms(y) <
sqrt(tp)*max|y*|, giving 2*E1 + (tp+1)*sqrt(tp)*u*max|y*|.

The bound is per tensor (outputs, input gradients, each parameter gradient). It is not
tuned to pass: a wrong shard, a bias added tp times, a missing all-reduce or a misrouted kv
head produce errors of order max|y*| itself: the suites' deliberately broken implementations
(suites/correctness/mutants.py) land at 8-30x the bf16 bound and far beyond the fp32 one.
Composite layers (attention, MLP, block) chain several such steps; each step's error is
rescaled by the following layer's gain, which the measured E1 already reflects.

Alongside the verdict the suites record, per tensor: max-abs and max-relative difference
between TP and single-device results, their ULP distance in the working dtype (over
elements with |y*| >= max(1e-3, 16(tp+1)u) max|y*|, i.e. well clear of the rounding
budget; near zero a sign flip alone spans ~2^31 ULPs), E1,
the TP error and the bound, so the report can show how much of the budget was used.
"""
from __future__ import annotations

import torch

UNIT_ROUNDOFF = {torch.float32: 2.0 ** -24, torch.bfloat16: 2.0 ** -8, torch.float16: 2.0 ** -11, torch.float64: 2.0 ** -53}


def ulp_distance(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype) -> int:
    """Max number of representable `dtype` values between a and b (elementwise, then max)."""
    if a.numel() == 0:
        return 0
    int_type = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}[dtype]
    ia, ib = (t.to(dtype).contiguous().view(int_type).long() for t in (a, b))
    sign_bit = 1 << (torch.finfo(dtype).bits - 1)
    # map sign-magnitude bit patterns onto a monotone integer line
    ia = torch.where(ia < 0, -(ia & (sign_bit - 1)), ia)
    ib = torch.where(ib < 0, -(ib & (sign_bit - 1)), ib)
    finite = torch.isfinite(a) & torch.isfinite(b)
    return int((ia - ib).abs()[finite].max().item()) if finite.any() else 0


def compare(name: str, tp: torch.Tensor, single: torch.Tensor, exact: torch.Tensor, dtype: torch.dtype, tp_size: int,
            magnitude: torch.Tensor | None = None) -> dict:
    """Measure one tensor against the policy. Returns a metrics row with `passed`.

    `magnitude`: the same computation on absolute values (sum of |terms| of every reduction);
    when given, the rounding term uses it instead of the sqrt(tp) expectation."""
    u = UNIT_ROUNDOFF[dtype]
    if tuple(tp.shape) != tuple(exact.shape):
        nan = float("nan")
        return {"tensor": name, "max_abs": nan, "max_rel": nan, "ulp": -1, "err_single": nan, "err_tp": nan, "bound": nan,
                "budget_used": nan, "passed": False, "note": f"shape {tuple(tp.shape)} != expected {tuple(exact.shape)}"}
    tp64, single64, exact64 = tp.double(), single.double(), exact.double()
    finite = torch.isfinite(exact64)
    scale = exact64[finite].abs().max().item() if finite.any() else 0.0
    err_single = (single64 - exact64)[finite].abs().max().item() if finite.any() else 0.0
    err_tp = (tp64 - exact64)[finite].abs().max().item() if finite.any() else 0.0
    if magnitude is not None:
        mag = magnitude.double().abs()[finite]
        rounding = (tp_size + 1) * u * (mag.max().item() if mag.numel() else 0.0)
    else:
        rounding = (tp_size + 1) * tp_size ** 0.5 * u * scale
    bound = 2 * err_single + rounding
    # elements far enough from zero that the allowed rounding error cannot flip their sign
    significant = finite & (exact64.abs() >= max(1e-3, 16 * (tp_size + 1) * u) * scale)
    diff = (tp64 - single64)[finite].abs()
    denom = single64[finite].abs().clamp_min(u * max(scale, 1e-30))
    nonfinite_agree = bool(torch.equal(torch.isfinite(tp64), finite) and torch.equal(tp64[~finite], exact64[~finite]))
    passed = nonfinite_agree and err_tp <= bound
    return {
        "tensor": name,
        "max_abs": diff.max().item() if diff.numel() else 0.0,
        "max_rel": (diff / denom).max().item() if diff.numel() else 0.0,
        # ULPs are meaningful only away from zero, where a sign flip spans ~2^31 of them
        "ulp": ulp_distance(tp[significant], single[significant], dtype),
        "err_single": err_single,
        "err_tp": err_tp,
        "bound": bound,
        "budget_used": err_tp / bound if bound > 0 else (0.0 if err_tp == 0 else float("inf")),
        "passed": passed,
    }
