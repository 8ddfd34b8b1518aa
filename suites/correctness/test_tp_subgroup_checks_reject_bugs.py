"""The TP-group checks of test_tp_subgroups.py can fail: rank functions that shard by the
global rank or communicate across TP groups are rejected, each by the check meant for it,
while the real implementation passes the same check on the same case."""
from __future__ import annotations

import pytest

from harness.cases import LayerCase
from harness.equivalence import collectives_unlike_plain_tp, evaluate_groups, foreign_collectives, group_cases
from harness.runtime.orchestrator import TP_LAYOUTS

from ..conftest import SUBGROUP_TP, SUBGROUP_WORLD
from . import mutants

# dimensions divisible by 4 as well: the world-group mutant shards 4 ways where 2 were meant
ATTN = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "bias": False}
COLUMN = LayerCase("column", "float32", 7, 2, 4, {"in": 16, "out": 32, "bias": True, "gather": True})
ROW = LayerCase("row", "float32", 7, 2, 4, {"in": 32, "out": 16, "bias": True})
BLOCK = LayerCase("block", "float32", 7, 2, 4, {**ATTN, "inter": 64})

CHECKS = {
    "values": lambda rows, cases, worlds: not all(r["passed"] for r in rows),  # the tolerance policy, group by group
    "group": lambda rows, cases, worlds: bool(foreign_collectives(rows)),  # each record names its rank's TP group
    "plain_tp": lambda rows, cases, worlds: bool(collectives_unlike_plain_tp(rows, worlds[SUBGROUP_TP], cases)),
}
# (mutant, case, check that must reject it, layouts where it must)
REJECTED = [
    # global rank % tp is the TP rank of a contiguous group: only the strided layout can tell
    (mutants.tp_rank_from_global_rank, COLUMN, "values", ("strided",)),
    (mutants.tp_rank_from_global_rank, BLOCK, "values", ("strided",)),
    (mutants.collectives_over_world_group, ROW, "group", TP_LAYOUTS),
    (mutants.collectives_over_world_group, ROW, "plain_tp", TP_LAYOUTS),
    (mutants.collectives_over_world_group, COLUMN, "values", TP_LAYOUTS),
    # records name the TP group (the communicator's), so only the values show the cross-group sum
    (mutants.all_reduce_without_group, BLOCK, "values", TP_LAYOUTS),
]


@pytest.mark.parametrize("mutant,case,check,layout", [(m, c, k, lay) for m, c, k, layouts in REJECTED for lay in layouts],
                         ids=[f"{m.__name__}-{c.kind}-{k}-{lay}" for m, c, k, layouts in REJECTED for lay in layouts])
def test_broken_tp_group_use_is_rejected(mutant, case, check, layout, subgroup_worlds, worlds):
    cases = group_cases(case, SUBGROUP_WORLD // SUBGROUP_TP)
    world = subgroup_worlds[layout]
    assert not CHECKS[check](evaluate_groups(world, cases), cases, worlds), f"the real implementation must pass the {check} check"
    assert CHECKS[check](evaluate_groups(world, cases, rank_fn=mutant), cases, worlds), f"{mutant.__name__} slipped through the {check} check"


def test_global_rank_is_the_tp_rank_of_contiguous_groups(subgroup_worlds, worlds):
    """Why the strided layout is in the suites: with contiguous groups the global-rank mutant
    computes the right function, so contiguous groups alone would let it through."""
    cases = group_cases(COLUMN, SUBGROUP_WORLD // SUBGROUP_TP)
    rows = evaluate_groups(subgroup_worlds["contiguous"], cases, rank_fn=mutants.tp_rank_from_global_rank)
    assert not any(CHECKS[check](rows, cases, worlds) for check in CHECKS)
