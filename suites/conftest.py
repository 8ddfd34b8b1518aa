"""Shared fixtures: persistent rank worlds and the model suite's checkpoints. The suites' settings (examples per property, device)
and the `metrics` sink are fixtures of a harness.suite_plugin.SuiteRun (loaded for every pytest
run of this project by pyproject's addopts, `-p harness.suite_plugin`)."""
from __future__ import annotations

import pytest

from harness.runtime.orchestrator import TP_LAYOUTS, MultiGPUOrchestrator

from .tp_groups import TPGroupsWorld

WORLD_SIZES = (1, 2, 4)
# worlds of several TP groups: SUBGROUP_WORLD ranks as SUBGROUP_WORLD // SUBGROUP_TP groups of SUBGROUP_TP
SUBGROUP_WORLD, SUBGROUP_TP = 4, 2


class Worlds:
    """Lazily started, session-long worlds of 1, 2 and 4 ranks (one process start each) on `device`."""

    def __init__(self, device: str):
        self.device = device
        self._worlds: dict[int, MultiGPUOrchestrator] = {}

    def __getitem__(self, n: int) -> MultiGPUOrchestrator:
        if n not in self._worlds:
            self._worlds[n] = MultiGPUOrchestrator(n, device=self.device, timeout_s=120.0)
        return self._worlds[n]  # run() (re)starts it on first use or after a failure

    def close(self):
        for w in self._worlds.values():
            w.shutdown()


@pytest.fixture(scope="session")
def worlds(device):
    w = Worlds(device)
    yield w
    w.close()


@pytest.fixture(scope="session")
def subgroup_worlds(worlds):
    """subgroup_worlds[layout]: SUBGROUP_WORLD ranks in TP groups of SUBGROUP_TP, laid out as
    `layout` (one of TP_LAYOUTS: contiguous {0,1},{2,3}; strided {0,2},{1,3}). They run on the
    ranks of worlds[SUBGROUP_WORLD] (suites/tp_groups.py): two more worlds of 4 would cost two
    process starts (~4 s each with the first call's imports on 2 cores) for the same groups."""
    return {layout: TPGroupsWorld(worlds[SUBGROUP_WORLD], SUBGROUP_TP, layout) for layout in TP_LAYOUTS}


@pytest.fixture(scope="session")
def checkpoint(tmp_path_factory):
    """checkpoint(name, sharded=False) -> directory of that suites/model/checkpoints.py variant,
    written once per session (transformers' save_pretrained: a test using it needs transformers)."""
    from .model.checkpoints import write_checkpoint

    cache = {}

    def get(name: str, sharded: bool = False):
        key = (name, sharded)
        if key not in cache:
            cache[key] = write_checkpoint(name, tmp_path_factory.mktemp(f"{name}{'-sharded' if sharded else ''}"), "20KB" if sharded else None)
        return cache[key]

    return get
