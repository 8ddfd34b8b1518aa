"""Layer benchmarks run only when asked for, so a plain `pytest` stays fast.

They run when any of these is given: --benchmark-enable, --benchmark-only,
--benchmark-autosave, --benchmark-save, --benchmark-json, --benchmark-compare, or
--tpgate-bench (suites/conftest.py). Otherwise every test in this directory is skipped at
collection (no rank world is started). Under --benchmark-disable (with --tpgate-bench)
pytest-benchmark calls each benchmarked function once and records nothing; the tests'
shape/finiteness checks still run.
"""
from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent
_OPT_IN = ("tpgate_bench", "benchmark_enable", "benchmark_only", "benchmark_autosave", "benchmark_save", "benchmark_json", "benchmark_compare")


def benchmarks_requested(config) -> bool:
    return any(config.getoption(name, default=None) for name in _OPT_IN)


def pytest_collection_modifyitems(config, items):
    if benchmarks_requested(config):
        return
    skip = pytest.mark.skip(reason="layer benchmarks: pass --benchmark-enable (or --benchmark-only/--benchmark-autosave) or --tpgate-bench")
    for item in items:
        if HERE in Path(item.path).parents:  # this hook sees the whole session's items
            item.add_marker(skip)
