"""TP groups inside a larger world: which ranks share a group (contiguous {0,1},{2,3} or
strided {0,2},{1,3}), each rank's TP rank and group index, and an all-reduce over a TP
communicator summing its members only; a bad layout refused before any process starts."""
from __future__ import annotations

import multiprocessing

import pytest

from impl.architecture import TPConfigError
from harness.runtime.orchestrator import TP_LAYOUTS, MultiGPUOrchestrator, ProcessGroupManager, TorchrunWorld, tp_groups

from ..correctness import mutants
from . import rank_fns


@pytest.mark.parametrize("layout", TP_LAYOUTS)
@pytest.mark.parametrize("world_size,tp_size", [(4, 2), (8, 2), (8, 4), (6, 3), (4, 1), (4, 4)])
def test_layouts_partition_the_world(world_size, tp_size, layout):
    groups = tp_groups(world_size, tp_size, layout)
    assert sorted(r for g in groups for r in g) == list(range(world_size)), "every rank in exactly one group"
    for index, members in enumerate(groups):
        for rank in members:
            assert (index, list(members)) == rank_fns.expected_tp_group(rank, world_size, tp_size, layout)


@pytest.mark.parametrize("make", [
    lambda: MultiGPUOrchestrator(4, tp_size=2, tp_layout="interleaved"),
    lambda: ProcessGroupManager(4, 0, tp_size=2, tp_layout="interleaved"),
    lambda: TorchrunWorld(tp_size=2, tp_layout="interleaved"),  # named before torchrun's environment is read
], ids=["orchestrator", "manager", "torchrun"])
def test_unknown_layout_is_refused_before_any_process(make):
    before = set(multiprocessing.active_children())  # session worlds may be running
    with pytest.raises(TPConfigError) as info:
        make()
    assert (info.value.argument, info.value.value) == ("tp_layout", "interleaved")
    assert all(layout in info.value.constraint for layout in TP_LAYOUTS), info.value.constraint
    assert set(multiprocessing.active_children()) <= before, "a process was started for a bad layout"


def test_started_world_splits_into_its_tp_groups():
    """The orchestrator's own path: tp_layout handed to every rank's manager at start. Strided:
    the layout a contiguous-only (or layout-dropping) path gets wrong."""
    with MultiGPUOrchestrator(4, tp_size=2, tp_layout="strided", timeout_s=60.0) as world:
        reports = world.run(rank_fns.tp_group_report)
    assert not (problems := rank_fns.tp_group_problems(reports, 2, "strided")), problems


@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_manager_creates_the_layout_asked_for(layout, worlds):
    reports = worlds[4].run(rank_fns.tp_groups_made_by, ProcessGroupManager, 2, layout)
    assert not (problems := rank_fns.tp_group_problems(reports, 2, layout)), problems


def test_manager_that_drops_the_layout_is_caught(worlds):
    reports = worlds[4].run(rank_fns.tp_groups_made_by, mutants.LayoutDroppedManager, 2, "strided")
    assert rank_fns.tp_group_problems(reports, 2, "strided"), "contiguous groups built where strided ones were asked for slipped through"
