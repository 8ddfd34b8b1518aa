"""Shared fixtures: persistent rank worlds, and the suites' settings and metrics sink.

The settings (examples per property, device) and the `metrics` sink are fixtures of a
harness.suite_plugin.SuiteRun: the correctness runner registers its own; a plain `pytest` gets
one from --tpgate-examples N / --tpgate-device cpu|cuda (defaults: DEFAULT_EXAMPLES, cpu), whose
metric rows nobody reads.
"""
from __future__ import annotations

import argparse

import pytest

from harness.suite_plugin import DEFAULT_DEVICE, DEFAULT_EXAMPLES, SuiteRun, SuiteSettings, registered_run
from impl.orchestrator import DEVICES, TP_LAYOUTS, MultiGPUOrchestrator

from .tp_groups import TPGroupsWorld

WORLD_SIZES = (1, 2, 4)
# worlds of several TP groups: SUBGROUP_WORLD ranks as SUBGROUP_WORLD // SUBGROUP_TP groups of SUBGROUP_TP
SUBGROUP_WORLD, SUBGROUP_TP = 4, 2


# option -> its dest; None as the parsed default tells "not given" from "given as the default"
OPTIONS = {"--tpgate-examples": "tpgate_examples", "--tpgate-device": "tpgate_device"}


def _examples_option(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def pytest_addoption(parser):
    group = parser.getgroup("tpgate", "tpgate suites (set by `tpgate correctness` when it runs them)")
    group.addoption("--tpgate-examples", type=_examples_option, default=None, metavar="N",
                    help=f"hypothesis examples per layer property (default {DEFAULT_EXAMPLES})")
    group.addoption("--tpgate-device", choices=DEVICES, default=None,
                    help=f"where the ranks and single-device references compute (default {DEFAULT_DEVICE})")
    group.addoption("--tpgate-bench", action="store_true", help="run suites/scaling's layer benchmarks (also under --benchmark-disable)")
    group.addoption("--tpgate-fault-table", default=None, metavar="FILE", help="write suites/faults' time-to-error table (Markdown) to FILE")


def pytest_configure(config):
    given = {option: config.getoption(dest, None) for option, dest in OPTIONS.items()}
    given = {option: value for option, value in given.items() if value is not None}
    if registered_run(config) is not None:
        if given:  # the runner records its own settings in results.json: a second source would make that untrue
            raise pytest.UsageError(f"{', '.join(given)}: the correctness runner sets this (tpgate correctness --examples / --device)")
        return
    settings = SuiteSettings(examples=given.get("--tpgate-examples", DEFAULT_EXAMPLES), device=given.get("--tpgate-device", DEFAULT_DEVICE))
    config.pluginmanager.register(SuiteRun(settings), "tpgate-suite-run")


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
