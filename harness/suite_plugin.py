"""The suites' settings and metric rows, carried by a pytest plugin object (no environment).

`SuiteRun(SuiteSettings(examples, device))` is registered with the pytest session that runs the
suites: the correctness runner passes its own to `pytest.main(..., plugins=[run])` and reads
`run.metric_rows` afterwards; a plain `pytest` gets one built from the --tpgate-* options by
suites/conftest.py. Its session fixtures hand the suites what they need:

  suite_settings  the SuiteSettings
  examples        hypothesis examples per layer property (SuiteSettings.examples)
  device          "cpu" or "cuda": where the ranks and the single-device references compute
  metrics         `metrics.write(rows, test_id)` appends rows, each tagged {"test": test_id}

Rows are kept in their JSON form (a json round trip, non-JSON values as str), which is what
results.json holds: tuples become lists, integer dict keys strings, tensors and dtypes text.
"""
from __future__ import annotations

import json
from dataclasses import dataclass

import pytest

from impl.architecture import require
from impl.orchestrator import DEVICES

DEFAULT_EXAMPLES = 5  # a plain `pytest`'s examples per property; `tpgate correctness` uses pyproject's
DEFAULT_DEVICE = "cpu"


@dataclass(frozen=True)
class SuiteSettings:
    """What a suite run is parameterised by. Raises TPConfigError for a device not in DEVICES or
    examples that is not an integer >= 1."""
    examples: int = DEFAULT_EXAMPLES
    device: str = DEFAULT_DEVICE

    def __post_init__(self):
        require(isinstance(self.examples, int) and not isinstance(self.examples, bool) and self.examples >= 1,
                "examples", self.examples, "must be an integer >= 1")
        require(self.device in DEVICES, "device", self.device, f"must be one of {DEVICES}")


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
    def metrics(self) -> SuiteRun:
        return self


def registered_run(config) -> SuiteRun | None:
    """The SuiteRun registered with this pytest session, if any."""
    return next((p for p in config.pluginmanager.get_plugins() if isinstance(p, SuiteRun)), None)
