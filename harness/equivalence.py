"""Driver side of a layer-equivalence check: case -> world -> metric rows.

`evaluate(world, case)` runs the case on every rank of `world`, the single-device layer in
the case's dtype and in float64, and returns one metrics row per compared tensor (output,
input gradient, each parameter gradient) plus the rank-consistency and collective facts.
"""
from __future__ import annotations

import torch

from impl.architecture import parse_dtype

from .cases import LayerCase, gather_grads, gather_outputs, replicated_grads_agree, run_on_rank, run_single
from .tolerance import compare

# Which layer outputs are replicated on every rank (and must then be bitwise identical).
REPLICATED_OUTPUT = {"row", "embedding", "lm_head", "rmsnorm", "attention", "mlp", "block"}


def evaluate(world, case: LayerCase, rank_fn=run_on_rank) -> list[dict]:
    """`rank_fn(ctx, case)` is the rank side; the default runs the real implementation."""
    dtype = parse_dtype(case.dtype)
    per_rank = world.run(rank_fn, case)
    tp = len(per_rank)
    single = run_single(case, dtype)
    exact = run_single(case, torch.float64)
    magnitude = run_single(case, torch.float64, absolute=True)
    base = {**case.as_row(), "world_size": tp, "case": case.describe()}
    rows = []

    def add(name, got, ref1, ref64, mag):
        rows.append({**base, **compare(name, got, ref1, ref64, dtype, tp, magnitude=mag)})

    add("output", gather_outputs(case, [r["out"] for r in per_rank]), single["out"], exact["out"], magnitude["out"])
    if single["grad_in"] is not None:
        add("grad_input", per_rank[0]["grad_in"], single["grad_in"], exact["grad_in"], magnitude["grad_in"])
    full_grads = gather_grads(case, [r["grads"] for r in per_rank])
    for name in sorted(single["grads"]):
        add(f"grad_{name}", full_grads[name], single["grads"][name], exact["grads"][name], magnitude["grads"][name])

    replicated = case.kind in REPLICATED_OUTPUT or case.params.get("gather", False)
    consistent = all(torch.equal(r["out"], per_rank[0]["out"]) for r in per_rank) if replicated else True
    grad_in_consistent = all(r["grad_in"] is None or torch.equal(r["grad_in"], per_rank[0]["grad_in"]) for r in per_rank)
    grads_consistent = replicated_grads_agree(case, [r["grads"] for r in per_rank])  # gather_grads takes them from rank 0
    for row in rows:
        row["ranks_consistent"] = consistent and grad_in_consistent and grads_consistent
        row["passed"] = row["passed"] and row["ranks_consistent"]
    rows[0]["collectives"] = per_rank[0]["collectives"]
    # the no-grad forward (communication.py's inference branches) must compute what the autograd one does
    rows[0]["inference_matches"] = all(torch.equal(r["inference_out"], r["out"]) for r in per_rank if "inference_out" in r)
    return rows


def failures(rows: list[dict]) -> str:
    bad = [r for r in rows if not r["passed"]]
    return "\n".join(
        f"{r['case']} ws={r['world_size']} {r['tensor']}: err_tp={r['err_tp']:.3g} bound={r['bound']:.3g} "
        f"max_abs={r['max_abs']:.3g} ulp={r['ulp']} ranks_consistent={r['ranks_consistent']}" for r in bad)
