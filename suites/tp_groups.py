"""Worlds of several TP groups for the suites, hosted by a running world without new processes.

`TPGroupsWorld(world, tp_size, tp_layout)` has the orchestrator's `run` API over `world`'s
ranks split into TP groups of `tp_size`, laid out as `tp_layout` (harness.runtime.orchestrator.tp_groups):
on each rank, the first call creates the groups with the real ProcessGroupManager
(`create_tp_groups`, over the world's already initialised default group) and every call then
runs fn with a RankContext of that manager, exactly what a world started with
MultiGPUOrchestrator(n, tp_size=..., tp_layout=...) hands its rank functions (global `rank`,
`comm` over the TP group, `tp_rank`, `tp_group_index`, `tp_ranks`). The orchestrator suite
checks that such a started world builds the same groups (suites/orchestrator/test_tp_groups.py).
"""
from __future__ import annotations

from harness.runtime.orchestrator import ProcessGroupManager, RankContext, check_tp_layout


class TPGroupsWorld:
    def __init__(self, world, tp_size: int, tp_layout: str):
        check_tp_layout(tp_layout)
        self.world, self.world_size, self.device, self.tp_size, self.tp_layout = world, world.world_size, world.device, tp_size, tp_layout

    def run(self, fn, *args, timeout_s: float | None = None, **kwargs) -> list:
        return self.world.run(in_tp_groups, self.tp_size, self.tp_layout, fn, *args, timeout_s=timeout_s, **kwargs)


def in_tp_groups(ctx: RankContext, tp_size: int, tp_layout: str, fn, *args, **kwargs):
    """Rank side: fn(group_ctx, *args, **kwargs), group_ctx being this rank's context in the
    (tp_size, tp_layout) split of the world, made once per world (kept in ctx.state)."""
    key = ("tp_groups", tp_size, tp_layout)
    if key not in ctx.state:
        host = ctx.manager
        manager = ProcessGroupManager(ctx.world_size, ctx.rank, local_rank=host.local_rank, local_world_size=host.local_world_size, tp_size=tp_size,
                                      tp_layout=tp_layout, device=host.device.type, backend=host.backend, timeout_s=host.timeout_s).create_tp_groups()
        ctx.state[key] = RankContext(ctx.rank, ctx.world_size, manager.device, manager.backend, manager.communicator(), manager)
    return fn(ctx.state[key], *args, **kwargs)
