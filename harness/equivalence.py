"""Driver side of a layer-equivalence check: case -> world -> metric rows.

`evaluate(world, case)` runs the case on every rank of `world`, the single-device layer (on
`world.device`, the ranks' device kind) in the case's dtype and in float64, and returns one metrics row per compared tensor (output,
input gradient, each parameter gradient) plus the rank-consistency and collective facts.
`evaluate_groups(world, cases)` does the same for a world of several TP groups, each group on
its own case, group by group.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from impl.architecture import parse_dtype

from .cases import LayerCase, gather_grads, gather_outputs, replicated_grads_agree, run_on_rank, run_single
from .tolerance import compare

# Which layer outputs are replicated on every rank (and must then be bitwise identical).
REPLICATED_OUTPUT = {"row", "embedding", "lm_head", "rmsnorm", "attention", "mlp", "block"}


def evaluate(world, case: LayerCase, rank_fn=run_on_rank) -> list[dict]:
    """`rank_fn(ctx, case)` is the rank side; the default runs the real implementation.
    For a world whose TP group is the whole world (see evaluate_groups otherwise)."""
    return _group_rows(case, world.run(rank_fn, case), world.device)


GROUP_SEED_STRIDE = 7919  # > the seed offsets cases.py derives from one seed (+1 input, +2 output grad)


def group_cases(case: LayerCase, groups: int) -> list[LayerCase]:
    """One case per TP group: same kind, dimensions and dtype, its own seed (so its own weights,
    inputs and output gradient), group 0's being `case` itself."""
    return [replace(case, seed=(case.seed + GROUP_SEED_STRIDE * g) % 2**31) for g in range(groups)]


def run_group_case(ctx, cases: list[LayerCase], rank_fn=run_on_rank) -> dict:
    """Rank side of evaluate_groups: rank_fn on this rank's TP group's case, with where the rank sits."""
    return {**rank_fn(ctx, cases[ctx.tp_group_index]), "tp_group_index": ctx.tp_group_index, "tp_rank": ctx.tp_rank}


def evaluate_groups(world, cases: list[LayerCase], rank_fn=run_on_rank) -> list[dict]:
    """A world of several TP groups (world.tp_size < world.world_size), evaluated group by group.

    Every rank runs `rank_fn(ctx, cases[ctx.tp_group_index])`; each group's results, in TP-rank
    order, get evaluate's rows and checks against the single-device layer on that group's case
    (outputs, input gradient, parameter gradients, rank consistency within the group, the
    inference path). Rows also carry `tp_group` and `group_ranks` (its global ranks, TP-rank
    order) and are labelled `layer` = "KIND@tpTxG-LAYOUT" (T ranks per group, G groups) for the
    report; `world_size` is the group's size. A group's first row holds `collectives`: every
    member's records, keyed by global rank."""
    per_rank = world.run(run_group_case, cases, rank_fn)
    members: dict[int, dict[int, int]] = {}  # group index -> tp rank -> global rank
    for rank, result in enumerate(per_rank):
        members.setdefault(result["tp_group_index"], {})[result["tp_rank"]] = rank
    tp = len(per_rank) // len(cases)
    if sorted(members) != list(range(len(cases))) or any(sorted(m) != list(range(tp)) for m in members.values()):
        raise ValueError(f"{len(cases)} cases for a world whose ranks report TP groups {members} (group -> tp rank -> global rank)")
    layout = getattr(world, "tp_layout", "contiguous")
    rows = []
    for g, case in enumerate(cases):
        ranks = [members[g][i] for i in range(tp)]
        group_rows = _group_rows(case, [per_rank[r] for r in ranks], world.device)
        for row in group_rows:
            row.update(layer=f"{case.kind}@tp{tp}x{len(cases)}-{layout}", tp_group=g, group_ranks=tuple(ranks))
        group_rows[0]["collectives"] = {r: per_rank[r]["collectives"] for r in ranks}
        rows += group_rows
    return rows


def _group_rows(case: LayerCase, per_rank: list[dict], device: str) -> list[dict]:
    """Metric rows of one TP group from its ranks' results, `per_rank` in TP-rank order, against
    the single-device layer on `device`."""
    dtype = parse_dtype(case.dtype)
    tp = len(per_rank)
    single = run_single(case, dtype, device=device)
    exact = run_single(case, torch.float64, device=device)
    magnitude = run_single(case, torch.float64, absolute=True, device=device)
    base = {**case.as_row(), "world_size": tp, "case": case.describe()}
    rows = []

    def add(name, got, ref1, ref64, mag):
        rows.append({**base, **compare(name, got, ref1, ref64, dtype, tp, magnitude=mag)})

    add("output", gather_outputs(case, per_rank), single["out"], exact["out"], magnitude["out"])
    if single["grad_in"] is not None:
        add("grad_input", per_rank[0]["grad_in"], single["grad_in"], exact["grad_in"], magnitude["grad_in"])
    full_grads = gather_grads(per_rank)
    for name in sorted(single["grads"]):
        add(f"grad_{name}", full_grads[name], single["grads"][name], exact["grads"][name], magnitude["grads"][name])

    replicated = case.kind in REPLICATED_OUTPUT or case.params.get("gather", False)
    consistent = all(torch.equal(r["out"], per_rank[0]["out"]) for r in per_rank) if replicated else True
    grad_in_consistent = all(r["grad_in"] is None or torch.equal(r["grad_in"], per_rank[0]["grad_in"]) for r in per_rank)
    grads_consistent = replicated_grads_agree(per_rank)  # gather_grads takes them from rank 0
    for row in rows:
        row["ranks_consistent"] = consistent and grad_in_consistent and grads_consistent
        row["passed"] = row["passed"] and row["ranks_consistent"]
    rows[0]["collectives"] = per_rank[0]["collectives"]
    # the no-grad forward (communication.py's inference branches) must compute what the autograd one does
    rows[0]["inference_matches"] = all(torch.equal(r["inference_out"], r["out"]) for r in per_rank if "inference_out" in r)
    return rows


def foreign_collectives(rows: list[dict]) -> list[str]:
    """evaluate_groups' collective records, of every member of every group, that ran on a group
    other than that member's TP group (each record names its group's global ranks); empty
    when the TP groups never talk to each other."""
    out = []
    for row in rows:
        if isinstance(row.get("collectives"), dict):  # a group's first row: every member's records
            for rank, records in row["collectives"].items():
                out += [f"rank {rank} {r['phase']} {r['kind']} ran on ranks {tuple(r['group_ranks'])}, its TP group is {row['group_ranks']}"
                        for r in records if tuple(r["group_ranks"]) != row["group_ranks"]]
    return out


def collectives_unlike_plain_tp(rows: list[dict], plain_world, cases: list[LayerCase]) -> list[str]:
    """evaluate_groups' members whose records (kind, bytes, shape, dtype, phase: all but the
    group) differ from those of the same TP rank of `plain_world` (a world that is one TP group
    of the same size) running the member's group's case; empty when each group communicates
    exactly as a TP world of its size alone would."""
    strip = lambda records: [{k: v for k, v in r.items() if k != "group_ranks"} for r in records]  # noqa: E731
    out = []
    for row in rows:
        if isinstance(row.get("collectives"), dict):
            plain = plain_world.run(run_on_rank, cases[row["tp_group"]])
            for tp_rank, rank in enumerate(row["group_ranks"]):
                got, want = strip(row["collectives"][rank]), strip(plain[tp_rank]["collectives"])
                if got != want:
                    out.append(f"rank {rank} (group {row['tp_group']}, tp rank {tp_rank}) issued {got}; alone, a tp={len(plain)} world {want}")
    return out


def failures(rows: list[dict]) -> str:
    bad = [r for r in rows if not r["passed"]]
    where = lambda r: f"ws={r['world_size']}" + (f" ranks={r['group_ranks']}" if "group_ranks" in r else "")  # noqa: E731
    return "\n".join(
        f"{r['case']} {where(r)} {r['tensor']}: err_tp={r['err_tp']:.3g} bound={r['bound']:.3g} "
        f"max_abs={r['max_abs']:.3g} ulp={r['ulp']} ranks_consistent={r['ranks_consistent']}" for r in bad)
