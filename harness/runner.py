"""The correctness runner: suites -> pytest -> metric rows -> pandas -> report.

Runs the correctness suites in-process under pytest, with a harness.suite_plugin.SuiteRun
plugin that hands the suites this run's settings (examples, device) as fixtures and keeps every
metric row they emit; collects each test's outcome, and hands both tables to the report writer,
with the run record the gate judges it by.

A report is published only when pytest ran the selection to its end (all passed, some failed,
or a collection error, which the report shows as a failed test). An interrupted run (Ctrl-C:
pytest catches it and returns INTERRUPTED) raises KeyboardInterrupt; a usage or internal error
(e.g. a bad -k expression), nothing collected, or an early stop raise SuiteRunError. In those
cases nothing is written and the previous report stays as it was.
"""
from __future__ import annotations

import time
from pathlib import Path

import pandas as pd

from impl.architecture import TPConfigError, require

from . import tolerance
from .atomic import check_report_out
from .environment import collect_environment
from .report import write_correctness_report

REPO = Path(__file__).resolve().parent.parent
SUITES = ("suites/correctness", "suites/model", "suites/orchestrator", "suites/faults", "suites/test_bad_input.py")


class SuiteRunError(RuntimeError):
    """pytest did not run the selected suites to their end, for a reason other than an interrupt:
    there are no results to report, and nothing was published."""


class _Outcomes:
    """pytest plugin: one row per test (call phase, or the failing setup/teardown), one error row
    per module that failed to collect, and what stopped the session early, if anything. A test
    that judges one implementation records it (`request.node.user_properties.append(("implementation",
    spec))`, suites/model/test_implementations.py); its row's "implementation" is that spec, None
    for every other test, which is how the report tells a peer's test from the candidate's."""

    def __init__(self):
        self.rows: dict[str, dict] = {}
        self.collection_errors = 0
        self.stopped_by: BaseException | None = None

    def pytest_collectreport(self, report):
        if report.failed:  # otherwise a broken module would just be missing from a PASS report
            self.collection_errors += 1
            nodeid = report.nodeid or "<collection>"
            self.rows[nodeid] = {"nodeid": nodeid, "outcome": "error", "duration_s": 0.0, "implementation": None,
                                 "message": str(report.longrepr)[-4000:] if report.longrepr else "collection failed"}

    def pytest_keyboard_interrupt(self, excinfo):
        # called for a real Ctrl-C and for pytest's own early stops (Session.Interrupted, e.g. after collection errors)
        self.stopped_by = excinfo.value

    def pytest_runtest_logreport(self, report):
        if report.when == "call" or report.outcome != "passed":
            row = self.rows.setdefault(report.nodeid, {"nodeid": report.nodeid, "outcome": "passed", "duration_s": 0.0, "message": "",
                                                       "implementation": dict(report.user_properties).get("implementation")})
            row["duration_s"] += report.duration
            if report.outcome != "passed" and row["outcome"] == "passed":
                row["outcome"] = "error" if report.when != "call" and report.outcome == "failed" else report.outcome
                row["message"] = str(report.longrepr)[-4000:] if report.longrepr else ""


def _correctness_table() -> dict:
    import tomllib

    try:
        config = tomllib.loads((REPO / "pyproject.toml").read_text())
    except (OSError, tomllib.TOMLDecodeError):
        return {}
    return config.get("tool", {}).get("tpgate", {}).get("correctness", {})


def configured_examples(default: int = 10) -> int:
    """`examples` from [tool.tpgate.correctness] in pyproject.toml (hypothesis examples per property)."""
    value = _correctness_table().get("examples", default)
    if not isinstance(value, int) or value < 1:
        raise TPConfigError("[tool.tpgate.correctness].examples", value, "must be an integer >= 1")
    return value


def configured_implementations(default: tuple[str, ...] = ("reference",)) -> tuple[str, ...]:
    """`implementations` from [tool.tpgate.correctness] in pyproject.toml: the candidate first, then
    its peers (what `tpgate correctness` judges without --impl). A value that is not a non-empty
    list of distinct implementation names that resolve is a TPConfigError naming the key."""
    from .implementations import load_implementations

    key = "[tool.tpgate.correctness].implementations"
    value = _correctness_table().get("implementations", list(default))
    require(isinstance(value, list) and len(value) > 0 and all(isinstance(v, str) and v for v in value), key, value,
            "must be a non-empty list of implementation names (reference, dtensor, hf-tp, an entry point or module:object)")
    load_implementations(value, key)
    return tuple(value)


def describe_selection(pytest_args: list[str] | None) -> str:
    """How a run's pytest arguments narrow the suites, in words ("the full suites" when they do not)."""
    args = list(pytest_args or [])
    if not args:
        return "the full suites"
    if len(args) == 2 and args[0] == "-k":
        return f"a -k subset: {args[1]!r}"
    return f"a selection narrowed by pytest {' '.join(args)}"


def run_record(pytest_args: list[str] | None, examples: int, device: str, environment: dict,
               implementations: tuple[str, ...] = ("reference",), checkpoints: tuple[str, ...] | None = None) -> dict:
    """What a correctness run covered, stored as results.json's "run" for the gate
    (harness.gate): the suites, the extra pytest arguments (none for the full release check),
    the examples per property run and required, the device, the implementations the model suite
    judged (--impl: the first is the candidate, the report's verdict; the rest peers), the
    checkpoints it judged the candidate on and those required (--checkpoints; the suite's
    default) and the peers on, the git commit and dirty flag, and the digest of the source it ran
    (harness.environment.source_digest)."""
    from .suite_plugin import DEFAULT_CHECKPOINTS

    checkpoints = tuple(checkpoints or DEFAULT_CHECKPOINTS)
    return {"suites": list(SUITES), "pytest_args": list(pytest_args or []), "selection": describe_selection(pytest_args),
            "examples": examples, "examples_required": configured_examples(), "device": device,
            "implementations": list(implementations), "checkpoints": list(checkpoints), "checkpoints_required": list(DEFAULT_CHECKPOINTS),
            "peer_checkpoints": list(checkpoints[:1]),
            "git_commit": environment.get("git_commit"), "git_dirty": environment.get("git_dirty"), "source_digest": environment.get("source_digest")}


def _require_complete_run(code, plugin: _Outcomes, pytest_args: list[str] | None) -> None:
    """Return only if pytest ran the selection to its end; see the module docstring."""
    import pytest

    if code in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED):
        return
    where = f"{describe_selection(pytest_args)}; nothing was published, the previous report is unchanged"
    if code == pytest.ExitCode.INTERRUPTED:
        if plugin.collection_errors and isinstance(plugin.stopped_by, pytest.Session.Interrupted):
            return  # pytest stops after collection errors; the report shows them as failed tests
        if isinstance(plugin.stopped_by, KeyboardInterrupt) and not isinstance(plugin.stopped_by, pytest.Session.Interrupted):
            raise KeyboardInterrupt  # a real Ctrl-C: the CLI exits 130
        raise SuiteRunError(f"pytest stopped before the end ({plugin.stopped_by or 'no reason given'}) running {where}")
    if code == pytest.ExitCode.NO_TESTS_COLLECTED:
        raise SuiteRunError(f"no test was selected by {where}")
    name = code.name if isinstance(code, pytest.ExitCode) else f"exit code {code}"
    raise SuiteRunError(f"pytest failed with {name} (its message is above) running {where}")


def run_correctness(out_dir: str | Path = "reports/correctness", examples: int | None = None, device: str = "cpu",
                    pytest_args: list[str] | None = None, implementations: tuple[str, ...] | None = None,
                    checkpoints: tuple[str, ...] | None = None) -> dict:
    """Run the suites and write the report. Returns the report summary (verdict etc.).
    `implementations` (--impl; default configured_implementations()) are the stacks
    suites/model/test_implementations.py judges: the first is the candidate, whose verdict the
    report's is, the rest peers shown beside it. `checkpoints` (--checkpoints; default the
    suite's, harness.suite_plugin.DEFAULT_CHECKPOINTS) are the variants the candidate is judged on.

    Raises TPConfigError for a bad out_dir, device or implementation before anything runs, KeyboardInterrupt when
    the run was interrupted and SuiteRunError when pytest could not run the selection; in all
    three cases no report is written."""
    import pytest

    from harness.runtime.orchestrator import choose_backend

    from .suite_plugin import DEFAULT_CHECKPOINTS, SuiteRun, SuiteSettings

    out_dir = check_report_out(out_dir, "correctness", REPO)
    gpus = _gpu_count(device)
    choose_backend(device, 1, gpus)  # validates device before anything runs
    # the suites run worlds of 1, 2 and 4 ranks: on fewer GPUs than ranks, those share GPUs over gloo
    backend = ", ".join(f"{n} rank{'s' * (n > 1)}: {choose_backend(device, n, gpus)}" for n in (1, 2, 4))
    examples = examples or configured_examples()
    implementations = tuple(implementations) if implementations is not None else configured_implementations()
    settings = SuiteSettings(examples, device, implementations, tuple(checkpoints) if checkpoints is not None else DEFAULT_CHECKPOINTS)
    suite_run, outcomes = SuiteRun(settings), _Outcomes()
    start = time.monotonic()
    code = pytest.main(["-q", "-p", "no:cacheprovider", *[str(REPO / s) for s in SUITES], *(pytest_args or [])], plugins=[suite_run, outcomes])
    _require_complete_run(code, outcomes, pytest_args)
    wall_s = time.monotonic() - start
    metrics = pd.DataFrame(suite_run.metric_rows)
    tests = pd.DataFrame(list(outcomes.rows.values()), columns=["nodeid", "outcome", "duration_s", "message", "implementation"])
    environment = {**collect_environment(backend, device), "wall_time_s": round(wall_s, 1)}
    run = run_record(pytest_args, examples, device, environment, settings.implementations, settings.checkpoints)
    return write_correctness_report(metrics, tests, environment, out_dir, tolerance.__doc__, run)


def _gpu_count(device: str) -> int:
    import torch

    return torch.cuda.device_count() if device == "cuda" else 0
