"""The suites' settings and metric rows travel through pytest, never the environment.

`tpgate correctness` hands the suites its examples and device through a harness.suite_plugin
.SuiteRun and reads their metric rows back from it; a plain `pytest` takes them from
--tpgate-examples / --tpgate-device (suites/conftest.py). Whatever TPGATE_EXAMPLES,
TPGATE_DEVICE or TPGATE_METRICS say, nothing changes. The runs are in-process on tiny
generated test files (no rank worlds), as in test_report_integrity.py."""
from __future__ import annotations

import json
import os
import re
import uuid
from pathlib import Path

import pytest

from harness import runner, suite_plugin
from harness.runner import SuiteRunError
from impl.architecture import TPConfigError

# what the suites read before: each set to a value unlike the run's
OLD_ENV = {"TPGATE_EXAMPLES": "7", "TPGATE_DEVICE": "cuda"}
RUN_EXAMPLES, RUN_DEVICE = 3, "cpu"

ROWS_SUITE = """
def test_writes_rows(examples, device, suite_settings, metrics, request):
    row = {"layer": "column", "world_size": 2, "dtype": "float32", "case": "c", "examples": examples, "device": device,
           "settings": [suite_settings.examples, suite_settings.device], "shape": (2, 3)}
    metrics.write([{**row, "tensor": "output", "passed": True, "budget_used": 0.5},
                   {**row, "tensor": "grad_input", "passed": False, "budget_used": 2.0}], request.node.nodeid)
"""
SETTINGS_SUITE = """
def test_settings(examples, device):
    assert (examples, device) == ({examples!r}, {device!r}), (examples, device)
"""
CONFTEST = "from harness.suite_plugin import pytest_addoption, pytest_configure  # noqa: F401\n"


def _package(tmp_path: Path, test_text: str, conftest: str | None = None) -> Path:
    """A uniquely named package holding one test module (and a conftest): in-process pytest runs share sys.modules."""
    pkg = tmp_path / f"suite_{uuid.uuid4().hex}"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / f"test_{uuid.uuid4().hex}.py").write_text(test_text)
    if conftest is not None:
        (pkg / "conftest.py").write_text(conftest)
    return pkg


def _set_env(monkeypatch, env: dict[str, str]) -> None:
    for name in [k for k in os.environ if k.startswith("TPGATE_")]:
        monkeypatch.delenv(name)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def runner_problems(tmp_path: Path, monkeypatch, env: dict[str, str]) -> list[str]:
    """Runs ROWS_SUITE through run_correctness(examples=RUN_EXAMPLES, device=RUN_DEVICE) with
    `env` as the only TPGATE_* variables; what did not arrive as the runner set it (empty: all did)."""
    _set_env(monkeypatch, env)
    monkeypatch.setattr(runner, "SUITES", (str(_package(tmp_path, ROWS_SUITE)),))
    out = tmp_path / "correctness"
    runner.run_correctness(out, examples=RUN_EXAMPLES, device=RUN_DEVICE)
    data = json.loads((out / "results.json").read_text())
    summary = data["summary"]
    problems = []
    (test,) = [t["nodeid"] for t in data["tests"]]
    rows = [{k: r.get(k) for k in ("test", "tensor", "examples", "device", "settings", "shape")} for r in data["metrics"]]
    want = [{"test": test, "tensor": tensor, "examples": RUN_EXAMPLES, "device": RUN_DEVICE, "settings": [RUN_EXAMPLES, RUN_DEVICE], "shape": [2, 3]}
            for tensor in ("output", "grad_input")]
    if rows != want:
        problems.append(f"metric rows {rows}, expected {want}")
    # the test passed; its failed metric row alone must fail the verdict
    if (summary["verdict"], summary["n_passed"], summary["n_rows"], summary["n_rows_failed"]) != ("FAIL", 1, 2, 1):
        problems.append(f"summary {summary}")
    if data["run"]["examples"] != RUN_EXAMPLES:
        problems.append(f"run record examples {data['run']['examples']}")
    if "TPGATE_METRICS" in env and Path(env["TPGATE_METRICS"]).exists():
        problems.append("rows were written to $TPGATE_METRICS")
    return problems


@pytest.mark.parametrize("env", ["cleared", "contrary"])
def test_runner_hands_its_settings_to_the_suites_and_collects_their_rows(env, tmp_path, monkeypatch):
    variables = {} if env == "cleared" else {**OLD_ENV, "TPGATE_METRICS": str(tmp_path / "metrics.jsonl")}
    assert runner_problems(tmp_path, monkeypatch, variables) == []


# --------------------------------------------------------------------------- mutants of SuiteRun: the side channels it replaced


class ExamplesFromEnv(suite_plugin.SuiteRun):
    @pytest.fixture(scope="session")
    def examples(self) -> int:
        return int(os.environ.get("TPGATE_EXAMPLES", "5"))


class DeviceFromEnv(suite_plugin.SuiteRun):
    @pytest.fixture(scope="session")
    def device(self) -> str:
        return os.environ.get("TPGATE_DEVICE", "cpu")


class RowsToEnvFile(suite_plugin.SuiteRun):
    def write(self, rows, test_id):
        with open(os.environ["TPGATE_METRICS"], "a") as f:
            f.writelines(json.dumps({**row, "test": test_id}, default=str) + "\n" for row in rows)


@pytest.mark.parametrize("mutant", [ExamplesFromEnv, DeviceFromEnv, RowsToEnvFile], ids=lambda m: m.__name__)
def test_check_rejects_a_plugin_that_reads_the_environment(mutant, tmp_path, monkeypatch):
    monkeypatch.setattr(suite_plugin, "SuiteRun", mutant)
    assert runner_problems(tmp_path, monkeypatch, {**OLD_ENV, "TPGATE_METRICS": str(tmp_path / "metrics.jsonl")}), f"{mutant.__name__} slipped through"


# --------------------------------------------------------------------------- plain pytest: the --tpgate-* options


@pytest.mark.parametrize("args,examples,device", [
    ([], suite_plugin.DEFAULT_EXAMPLES, suite_plugin.DEFAULT_DEVICE),
    (["--tpgate-examples", "4", "--tpgate-device", "cuda"], 4, "cuda"),
])
def test_plain_pytest_takes_the_options_not_the_environment(args, examples, device, tmp_path, monkeypatch):
    _set_env(monkeypatch, {"TPGATE_EXAMPLES": "7", "TPGATE_DEVICE": "cuda" if device == "cpu" else "cpu"})
    pkg = _package(tmp_path, SETTINGS_SUITE.format(examples=examples, device=device), CONFTEST)
    assert pytest.main([str(pkg), "-q", "-p", "no:cacheprovider", *args]) == pytest.ExitCode.OK


@pytest.mark.parametrize("args,needle", [
    (["--tpgate-examples", "0"], "argument --tpgate-examples: '0': must be an integer >= 1"),
    (["--tpgate-examples", "two"], "argument --tpgate-examples: 'two': must be an integer >= 1"),
    (["--tpgate-device", "tpu"], "argument --tpgate-device: invalid choice: 'tpu'"),
])
def test_a_bad_option_is_a_usage_error_naming_it(args, needle, tmp_path, capsys):
    pkg = _package(tmp_path, SETTINGS_SUITE.format(examples=0, device="none"), CONFTEST)
    assert pytest.main([str(pkg), "-q", "-p", "no:cacheprovider", *args]) == pytest.ExitCode.USAGE_ERROR
    assert needle in capsys.readouterr().err


def test_the_runner_refuses_a_second_source_of_its_settings(tmp_path, monkeypatch):
    # results.json records the runner's examples: an option overriding them would make it untrue
    monkeypatch.setattr(runner, "SUITES", (str(_package(tmp_path, SETTINGS_SUITE.format(examples=4, device="cpu"), CONFTEST)),))
    with pytest.raises(SuiteRunError, match="USAGE_ERROR"):
        runner.run_correctness(tmp_path / "correctness", examples=RUN_EXAMPLES, pytest_args=["--tpgate-examples", "4"])
    assert not (tmp_path / "correctness").exists()


# --------------------------------------------------------------------------- implementations (--tpgate-impl / tpgate correctness --impl)

IMPL_SUITE = """
def test_implementations(implementations, suite_settings):
    assert implementations == suite_settings.implementations == {expected!r}, implementations
"""


@pytest.mark.parametrize("args,expected", [([], ("reference",)), (["--tpgate-impl", "dtensor,reference"], ("dtensor", "reference"))])
def test_plain_pytest_takes_the_implementations_option(args, expected, tmp_path):
    pkg = _package(tmp_path, IMPL_SUITE.format(expected=expected), CONFTEST)
    assert pytest.main([str(pkg), "-q", "-p", "no:cacheprovider", *args]) == pytest.ExitCode.OK


@pytest.mark.parametrize("value,needle", [
    ("nope", "implementations='nope': is not a known implementation"),
    ("reference,reference", "implementations=['reference', 'reference']: must not repeat an implementation"),
    (",", "implementations=[]: must name at least one implementation: ['dtensor', 'hf-tp', 'reference']"),
])
def test_an_unknown_implementation_is_a_usage_error_naming_it_and_the_known(value, needle, tmp_path, capsys):
    pkg = _package(tmp_path, IMPL_SUITE.format(expected=()), CONFTEST)
    assert pytest.main([str(pkg), "-q", "-p", "no:cacheprovider", "--tpgate-impl", value]) == pytest.ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert f"--tpgate-impl: {needle}" in err, err
    if value == "nope":
        assert "'dtensor'" in err and "'hf-tp'" in err and "'reference'" in err, err


def test_settings_check_the_implementations():
    assert suite_plugin.SuiteSettings().implementations == ("reference",)
    with pytest.raises(TPConfigError, match=r"implementations='nope': is not a known implementation .*'dtensor', 'hf-tp', 'reference'"):
        suite_plugin.SuiteSettings(implementations=("reference", "nope"))
    with pytest.raises(TPConfigError, match=r"implementations='reference': must be a tuple of implementation names"):
        suite_plugin.SuiteSettings(implementations="reference")


def test_the_runner_hands_its_implementations_to_the_suites_and_records_them(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SUITES", (str(_package(tmp_path, IMPL_SUITE.format(expected=("dtensor", "hf-tp")))),))
    out = tmp_path / "correctness"
    summary = runner.run_correctness(out, examples=RUN_EXAMPLES, implementations=("dtensor", "hf-tp"))
    data = json.loads((out / "results.json").read_text())
    assert summary["verdict"] == "PASS" and data["summary"]["n_passed"] == 1, data["tests"]
    assert data["run"]["implementations"] == ["dtensor", "hf-tp"]


def test_the_runner_refuses_an_unknown_implementation_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setattr(runner, "SUITES", (str(_package(tmp_path, IMPL_SUITE.format(expected=()))),))
    with pytest.raises(TPConfigError, match=r"implementations='nope': is not a known implementation"):
        runner.run_correctness(tmp_path / "correctness", examples=RUN_EXAMPLES, implementations=("nope",))
    assert not (tmp_path / "correctness").exists()


def test_the_runner_judges_the_configured_implementations_without_impl():
    assert runner.configured_implementations() == ("reference", "dtensor", "hf-tp")  # pyproject.toml: the reference and its peers


@pytest.mark.parametrize("value,needle", [
    ('"reference"', "must be a non-empty list of implementation names"),
    ("[]", "must be a non-empty list of implementation names"),
    ('["reference", 3]', "must be a non-empty list of implementation names"),
    ('["reference", "megatron"]', "[tool.tpgate.correctness].implementations='megatron': is not a known implementation"),
    ('["hf-tp", "hf-tp"]', "must not repeat an implementation"),
])
def test_a_bad_configured_implementations_value_names_the_key_before_anything_runs(value, needle, tmp_path, monkeypatch):
    (tmp_path / "pyproject.toml").write_text(f"[tool.tpgate.correctness]\nexamples = 2\nimplementations = {value}\n")
    monkeypatch.setattr(runner, "REPO", tmp_path)
    with pytest.raises(TPConfigError, match=re.escape(needle)) as raised:
        runner.run_correctness(tmp_path / "correctness", examples=RUN_EXAMPLES)
    assert "[tool.tpgate.correctness].implementations" in str(raised.value)
    assert not (tmp_path / "correctness").exists()
