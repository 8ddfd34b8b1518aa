"""Fixtures of the fault matrix: shared worlds (replaced after each fault) and the time-to-error table."""
from __future__ import annotations

import pytest

from .support import TimeTable, Worlds

# The worlds' default call timeout: never reached by a passing case (each hang case passes its
# own short timeout); a broken case still ends, within pytest-timeout's 300 s.
WORLD_TIMEOUT_S = 60.0


@pytest.fixture(scope="session")
def fault_worlds():
    worlds = Worlds(WORLD_TIMEOUT_S)
    yield worlds
    worlds.close()


@pytest.fixture(scope="session")
def time_table(pytestconfig):
    table = TimeTable(pytestconfig.getoption("tpgate_fault_table", None))
    yield table
    table.write()


@pytest.fixture(params=[2, 4], ids=lambda n: f"ws{n}")
def world_size(request):
    return request.param
