"""The suites' settings and metric rows, carried by a pytest plugin object (no environment).

`SuiteRun(SuiteSettings(examples, device, implementations, checkpoints))` is registered with the pytest session that runs the
suites: the correctness runner passes its own to `pytest.main(..., plugins=[run])` and reads
`run.metric_rows` afterwards; a plain `pytest` gets one built from the --tpgate-* options, which
this module registers (its hooks below; pyproject's addopts loads it with `-p harness.suite_plugin`,
so the options exist before pytest parses the command line, whatever the paths given). Its
session fixtures hand the suites what they need:

  suite_settings  the SuiteSettings
  examples        hypothesis examples per layer property (SuiteSettings.examples)
  device          "cpu" or "cuda": where the ranks and the single-device references compute
  implementations the implementation specs judged by suites/model/test_implementations.py
                  (harness.implementations names; default ("reference",)): the first is the
                  candidate, the run's verdict; the others are peers, judged and shown beside it
                  (harness.report); SuiteSettings.candidate / .peers
  checkpoints     the suites/model/checkpoints.py variants the candidate is judged on there
                  (default DEFAULT_CHECKPOINTS); peers are judged on the first only
                  (SuiteSettings.peer_checkpoints), which keeps their cost to one verify each
  metrics         `metrics.write(rows, test_id)` appends rows, each tagged {"test": test_id}

Rows are kept in their JSON form (a json round trip, non-JSON values as str), which is what
results.json holds: tuples become lists, integer dict keys strings, tensors and dtypes text.
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass

import pytest

from impl.architecture import TPConfigError, require
from harness.implementations import load_implementations
from harness.runtime.orchestrator import DEVICES

DEFAULT_EXAMPLES = 5  # a plain `pytest`'s examples per property; `tpgate correctness` uses pyproject's
DEFAULT_DEVICE = "cpu"
DEFAULT_IMPLEMENTATIONS = ("reference",)
# 2 kv heads each, so TP=4 replicates kv heads in the reference (and is refused by stacks that cannot);
# the first, llama-gqa (vocabulary 101), also shows the peers' findings: dtensor's at tp 2 and 4, hf-tp's at 4
DEFAULT_CHECKPOINTS = ("llama-gqa", "qwen2")


def known_checkpoints() -> tuple[str, ...]:
    """The model suite's checkpoint variants (suites/model/checkpoints.py VARIANTS), sorted."""
    from suites.model.checkpoints import VARIANTS

    return tuple(sorted(VARIANTS))


@dataclass(frozen=True)
class SuiteSettings:
    """What a suite run is parameterised by. Raises TPConfigError for a device not in DEVICES,
    examples that is not an integer >= 1, implementations that do not all resolve
    (harness.implementations.load_implementations: the error names the argument, the value and
    the names known), or checkpoints that are not distinct known variants (known_checkpoints)."""
    examples: int = DEFAULT_EXAMPLES
    device: str = DEFAULT_DEVICE
    implementations: tuple[str, ...] = DEFAULT_IMPLEMENTATIONS
    checkpoints: tuple[str, ...] = DEFAULT_CHECKPOINTS

    def __post_init__(self):
        require(isinstance(self.examples, int) and not isinstance(self.examples, bool) and self.examples >= 1,
                "examples", self.examples, "must be an integer >= 1")
        require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")
        require(isinstance(self.implementations, tuple) and all(isinstance(s, str) for s in self.implementations),
                "implementations", self.implementations, "must be a tuple of implementation names")
        load_implementations(self.implementations, "implementations")
        known = known_checkpoints()
        require(isinstance(self.checkpoints, tuple) and len(self.checkpoints) > 0 and len(set(self.checkpoints)) == len(self.checkpoints)
                and all(c in known for c in self.checkpoints), "checkpoints", self.checkpoints,
                f"must be a non-empty tuple of distinct model-suite checkpoints: {list(known)}")

    @property
    def candidate(self) -> str:
        """The implementation the run judges: its verdict and exit status are the report's."""
        return self.implementations[0]

    @property
    def peers(self) -> tuple[str, ...]:
        """Implementations judged beside the candidate; their results never change its verdict."""
        return self.implementations[1:]

    @property
    def peer_checkpoints(self) -> tuple[str, ...]:
        return self.checkpoints[:1]


class SuiteRun:
    """pytest plugin: the run's SuiteSettings, served as fixtures, and the metric rows the suites wrote."""

    def __init__(self, settings: SuiteSettings):
        self.settings = settings
        self.metric_rows: list[dict] = []

    def write(self, rows: list[dict], test_id: str) -> None:
        for row in rows:
            self.metric_rows.append(json.loads(json.dumps({**row, "test": test_id}, default=str)))

    @pytest.fixture(scope="session")
    def suite_settings(self) -> SuiteSettings:
        return self.settings

    @pytest.fixture(scope="session")
    def examples(self) -> int:
        return self.settings.examples

    @pytest.fixture(scope="session")
    def device(self) -> str:
        return self.settings.device

    @pytest.fixture(scope="session")
    def implementations(self) -> tuple[str, ...]:
        return self.settings.implementations

    @pytest.fixture(scope="session")
    def metrics(self) -> SuiteRun:
        return self


def registered_run(config) -> SuiteRun | None:
    """The SuiteRun registered with this pytest session, if any."""
    return next((p for p in config.pluginmanager.get_plugins() if isinstance(p, SuiteRun)), None)


# --------------------------------------------------------------------------- the --tpgate-* options (a plain pytest)


# option -> its dest; None as the parsed default tells "not given" from "given as the default"
OPTIONS = {"--tpgate-examples": "tpgate_examples", "--tpgate-device": "tpgate_device", "--tpgate-impl": "tpgate_impl",
           "--tpgate-checkpoints": "tpgate_checkpoints"}


def _examples_option(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: must be an integer >= 1")
    return value


def _names_option(text: str) -> tuple[str, ...]:
    # names only here; whether they resolve is SuiteSettings' check (pytest_configure), a UsageError naming them
    return tuple(name.strip() for name in text.split(",") if name.strip())


def pytest_addoption(parser):
    group = parser.getgroup("tpgate", "tpgate suites (set by `tpgate correctness` when it runs them)")
    group.addoption("--tpgate-examples", type=_examples_option, default=None, metavar="N",
                    help=f"hypothesis examples per layer property (default {DEFAULT_EXAMPLES})")
    group.addoption("--tpgate-device", choices=DEVICES, default=None,
                    help=f"where the ranks and single-device references compute (default {DEFAULT_DEVICE})")
    group.addoption("--tpgate-impl", type=_names_option, default=None, metavar="NAME[,NAME]",
                    help="implementations suites/model/test_implementations.py judges, the first as the candidate, the rest as peers "
                         "beside it: built-in (reference, dtensor, hf-tp), a tpgate.implementations entry point, or module:object "
                         "(default: reference)")
    group.addoption("--tpgate-checkpoints", type=_names_option, default=None, metavar="NAME[,NAME]",
                    help=f"model-suite checkpoints the candidate is judged on (peers: the first) (default: {','.join(DEFAULT_CHECKPOINTS)})")
    group.addoption("--tpgate-bench", action="store_true", help="run suites/scaling's layer benchmarks (also under --benchmark-disable)")
    group.addoption("--tpgate-fault-table", default=None, metavar="FILE", help="write suites/faults' time-to-error table (Markdown) to FILE")


def pytest_configure(config):
    given = {option: config.getoption(dest, None) for option, dest in OPTIONS.items()}
    given = {option: value for option, value in given.items() if value is not None}
    if registered_run(config) is not None:
        if given:  # the runner records its own settings in results.json: a second source would make that untrue
            raise pytest.UsageError(f"{', '.join(given)}: the correctness runner sets this "
                                    "(tpgate correctness --examples / --device / --impl / --checkpoints)")
        return
    try:
        settings = SuiteSettings(examples=given.get("--tpgate-examples", DEFAULT_EXAMPLES), device=given.get("--tpgate-device", DEFAULT_DEVICE),
                                 implementations=given.get("--tpgate-impl", DEFAULT_IMPLEMENTATIONS),
                                 checkpoints=given.get("--tpgate-checkpoints", DEFAULT_CHECKPOINTS))
    except TPConfigError as e:
        option = "--tpgate-checkpoints" if e.argument == "checkpoints" else "--tpgate-impl"
        raise pytest.UsageError(f"{option}: {e}") from None
    config.pluginmanager.register(SuiteRun(settings), "tpgate-suite-run")
