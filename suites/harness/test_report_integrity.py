"""A report is evidence only of what was run: an interrupted or unusable pytest run publishes
nothing, the gate's correctness criterion passes only for the full suites at the scaling run's
commit, `tpgate gate` re-evaluates from the reports as they are, --out never replaces what is not
an earlier report of its kind, and bad input exits 2 naming what is wrong.

The runner tests run pytest in-process on tiny generated test files (no rank worlds)."""
from __future__ import annotations

import json
import uuid
from pathlib import Path

import pandas as pd
import pytest

from harness import cli, runner
from harness.atomic import check_report_out, report_kind
from harness.gate import CORRECTNESS, REGRESSION, GateConfig, evaluate_gate
from harness.report import write_correctness_report
from harness.scaling_report import write_scaling_report
from impl.architecture import TPConfigError

COMMIT = "c0ffee" * 6 + "abcd"
CLEAN = {"git_commit": COMMIT, "git_dirty": False}
SUITE = """
def test_passes():
    pass

def test_also_passes():
    pass
"""


# --------------------------------------------------------------------------- helpers


def _suite(tmp_path: Path, monkeypatch, text: str = SUITE, name: str = "test_tiny") -> Path:
    """Points the runner's suites at one generated test file (an absolute path replaces REPO / s).
    Its module name is unique: in-process pytest runs share sys.modules."""
    path = tmp_path / "suite" / f"{name}_{uuid.uuid4().hex}.py"
    path.parent.mkdir(exist_ok=True)
    path.write_text(text)
    monkeypatch.setattr(runner, "SUITES", (str(path),))
    return path


def _earlier_report(out: Path) -> dict[str, bytes]:
    tests = pd.DataFrame([{"nodeid": "t", "outcome": "passed", "duration_s": 0.1, "message": ""}])
    write_correctness_report(pd.DataFrame(), tests, {}, out, "doc")
    return {p.name: p.read_bytes() for p in out.iterdir()}


def _correctness_json(path: Path, verdict="PASS", run: dict | None = None, **changes) -> Path:
    """A correctness results.json with a run record: the full suites at COMMIT, clean, 10 of 10 examples,
    reference judged (hf-tp beside it) on the required checkpoints."""
    record = {"suites": list(runner.SUITES), "pytest_args": [], "selection": "the full suites", "examples": 10,
              "examples_required": 10, "device": "cpu", "implementations": ["reference", "hf-tp"],
              "checkpoints": ["llama-gqa", "qwen2"], "checkpoints_required": ["llama-gqa", "qwen2"], **CLEAN, **changes}
    path.write_text(json.dumps({"kind": "correctness", "verdict": verdict, "run": record if run is None else run}))
    return path


def _row(ws, speedup=3.9):
    return {"implementation": "reference", "preset": "llama3-8b", "phase": "prefill", "batch": 8, "prompt": 2048, "steps": 0,
            "world_size": ws, "device": "cuda", "dtype": "bfloat16", "projected": False, "status": "ok", "speedup": speedup,
            "exposed_comm": 0.05, "dispatch_fraction": 0.01, "latency_s": 1.0, "latency_p90_s": 1.02}


def _criterion(gate: dict, name: str) -> dict:
    return next(c for c in gate["criteria"] if c["name"] == name)


# --------------------------------------------------------------------------- 1. pytest's exit code


def test_interrupted_run_exits_130_and_keeps_the_previous_report(tmp_path, monkeypatch, capsys):
    # pytest catches Ctrl-C itself and returns INTERRUPTED; the test that ran before it passed
    _suite(tmp_path, monkeypatch, SUITE + "\ndef test_interrupted():\n    raise KeyboardInterrupt\n")
    out = tmp_path / "correctness"
    earlier = _earlier_report(out)
    assert cli.main(["correctness", "--out", str(out), "--examples", "1"]) == 130
    assert "interrupted" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == earlier, "an interrupted run must not publish"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["correctness", "suite"], "no staging directory left behind"


@pytest.mark.parametrize("keyword,needle", [("not (", "USAGE_ERROR"), ("no_such_test", "no test was selected")])
def test_unusable_selection_exits_2_and_publishes_nothing(keyword, needle, tmp_path, monkeypatch, capsys):
    _suite(tmp_path, monkeypatch)
    out = tmp_path / "correctness"
    assert cli.main(["correctness", "--out", str(out), "-k", keyword]) == 2
    err = capsys.readouterr().err
    assert needle in err and repr(keyword) in err and "nothing was published" in err
    assert not out.exists()


def test_collection_error_is_a_failed_report_naming_the_module(tmp_path, monkeypatch):
    # pytest reports collection errors as INTERRUPTED too: they are failures of the suites, not a Ctrl-C
    _suite(tmp_path, monkeypatch, "import no_such_module_anywhere\n\ndef test_never_runs():\n    pass\n", "test_broken")
    out = tmp_path / "correctness"
    summary = runner.run_correctness(out, examples=1)
    assert summary["verdict"] == "FAIL"
    tests = json.loads((out / "results.json").read_text())["tests"]
    assert [(t["outcome"], "test_broken_" in t["nodeid"], "no_such_module_anywhere" in t["message"]) for t in tests] == [("error", True, True)]


def test_report_records_what_was_run(tmp_path, monkeypatch):
    _suite(tmp_path, monkeypatch)
    out = tmp_path / "correctness"
    summary = runner.run_correctness(out, examples=1, pytest_args=["-k", "test_passes"])
    assert summary["verdict"] == "PASS" and summary["n_tests"] == 1
    data = json.loads((out / "results.json").read_text())
    run = data["run"]
    assert data["kind"] == "correctness" and report_kind(out) == "correctness"
    assert run["pytest_args"] == ["-k", "test_passes"] and run["selection"] == "a -k subset: 'test_passes'"
    assert run["examples"] == 1 and run["examples_required"] == runner.configured_examples() and run["device"] == "cpu"
    assert (run["git_commit"], run["git_dirty"]) == (data["environment"]["git_commit"], data["environment"]["git_dirty"])
    assert any("Partial selection" in n for n in data["summary"]["notes"]), "the page must say the run is a subset"


# --------------------------------------------------------------------------- 2. what the correctness report is evidence of


@pytest.mark.parametrize("verdict,changes,status,needle", [
    ("PASS", {}, "PASS", ""),
    ("PASS", {"pytest_args": ["-k", "not faults"], "selection": "a -k subset: 'not faults'"}, "INCOMPLETE",
     "correctness report is a -k subset: 'not faults'"),
    ("PASS", {"examples": 3}, "INCOMPLETE", "ran 3 examples per property, the gate needs 10"),
    ("PASS", {"git_commit": "1234567890ab" + "0" * 28}, "INCOMPLETE", f"from commit 1234567890ab, scaling at {COMMIT[:12]}"),
    ("PASS", {"git_dirty": True}, "INCOMPLETE", "uncommitted changes"),
    ("FAIL", {"pytest_args": ["-k", "not faults"]}, "FAIL", ""),  # a failure at this commit is a failure, subset or not
    ("FAIL", {"git_commit": "1234567890ab" + "0" * 28}, "INCOMPLETE", "from commit 1234567890ab"),  # says nothing about this code
    ("PASS", {"checkpoints": ["llama-gqa"]}, "INCOMPLETE", "judged its candidate on checkpoints ['llama-gqa'], without ['qwen2']"),
    ("PASS", {"checkpoints": ["qwen2", "mistral", "llama-gqa"]}, "PASS", ""),  # more than required is still the full check
    # evidence about another stack: the workload is reference's, whatever the other's verdict
    ("PASS", {"implementations": ["hf-tp", "reference"]}, "INCOMPLETE", "correctness report judged 'hf-tp' (its candidate; peers ['reference']), "
     "the gate workload is 'reference''s: rerun tpgate correctness --impl reference"),
    ("FAIL", {"implementations": ["dtensor"]}, "INCOMPLETE", "judged 'dtensor'"),
    ("PASS", {"implementations": []}, "INCOMPLETE", "records no implementations judged"),
])
def test_correctness_criterion_judges_selection_examples_and_commit(tmp_path, verdict, changes, status, needle):
    corr = _correctness_json(tmp_path / "c.json", verdict, **changes)
    gate = evaluate_gate(None, GateConfig(), corr, None, None, scaling_source=CLEAN)
    criterion = _criterion(gate, CORRECTNESS)
    assert criterion["status"] == status, criterion
    assert needle in criterion["note"]


def test_correctness_criterion_follows_the_workloads_implementation(tmp_path):
    """A gate whose workload is hf-tp's needs a report with hf-tp as its candidate."""
    hf = GateConfig(workload={"preset": "llama3-8b", "phase": "prefill", "implementation": "hf-tp"})
    ours = _correctness_json(tmp_path / "ours.json", implementations=["hf-tp", "reference"])
    assert _criterion(evaluate_gate(None, hf, ours, None, None, scaling_source=CLEAN), CORRECTNESS)["status"] == "PASS"
    theirs = _criterion(evaluate_gate(None, hf, _correctness_json(tmp_path / "c.json"), None, None, scaling_source=CLEAN), CORRECTNESS)
    assert theirs["status"] == "INCOMPLETE" and "judged 'reference'" in theirs["note"], theirs


def test_dirty_scaling_run_or_a_report_without_run_record_is_not_evidence(tmp_path):
    corr = _correctness_json(tmp_path / "c.json")
    assert _criterion(evaluate_gate(None, GateConfig(), corr, None, None, scaling_source={**CLEAN, "git_dirty": True}), CORRECTNESS)["status"] == "INCOMPLETE"
    (tmp_path / "old.json").write_text(json.dumps({"verdict": "PASS"}))  # written before the run record existed
    old = _criterion(evaluate_gate(None, GateConfig(), tmp_path / "old.json", None, None, scaling_source=CLEAN), CORRECTNESS)
    assert old["status"] == "INCOMPLETE" and "records no run" in old["note"]
    (tmp_path / "bad.json").write_text("{")
    bad = _criterion(evaluate_gate(None, GateConfig(), tmp_path / "bad.json", None, None, scaling_source=CLEAN), CORRECTNESS)
    assert bad["status"] == "INCOMPLETE" and "bad.json" in bad["note"]


@pytest.mark.parametrize("scaling_changes,status,needle", [
    # a device machine's copy of the tree carries a stale .git: same bytes still mean the same code
    ({"git_commit": "1234567890ab" + "0" * 28, "git_dirty": True}, "PASS", ""),
    ({"source_digest": "b" * 64}, "INCOMPLETE", f"correctness report ran source {'a' * 12}, the scaling run {'b' * 12}"),
])
def test_source_digest_decides_over_git_when_both_runs_recorded_one(tmp_path, scaling_changes, status, needle):
    corr = _correctness_json(tmp_path / "c.json", source_digest="a" * 64, git_dirty=True)
    source = {**CLEAN, "source_digest": "a" * 64, **scaling_changes}
    criterion = _criterion(evaluate_gate(None, GateConfig(), corr, None, None, scaling_source=source), CORRECTNESS)
    assert criterion["status"] == status and needle in criterion["note"], criterion


def test_source_digest_changes_with_any_source_byte_and_ignores_bytecode(tmp_path):
    from harness.environment import source_digest

    (tmp_path / "impl" / "__pycache__").mkdir(parents=True)
    (tmp_path / "impl" / "model.py").write_text("x = 1\n")
    before = source_digest(tmp_path)
    (tmp_path / "impl" / "__pycache__" / "model.cpython-311.pyc").write_bytes(b"\0")
    (tmp_path / "impl" / "notes.txt").write_text("not code")
    assert source_digest(tmp_path) == before
    (tmp_path / "impl" / "model.py").write_text("x = 2\n")
    assert source_digest(tmp_path) != before


def test_gate_compares_with_this_checkout_by_default(tmp_path):
    # tpgate scaling evaluates the gate right after measuring this checkout
    from harness.gate import checkout_source

    here = checkout_source()["git_commit"]
    corr = _correctness_json(tmp_path / "c.json", git_commit="f" * 40)
    note = _criterion(evaluate_gate(None, GateConfig(), corr, None, None), CORRECTNESS)["note"]
    known = here and here != "unknown"  # outside a git checkout the commit cannot be compared
    assert (f"from commit {'f' * 12}, scaling at {here[:12]}" if known else "the scaling run's git commit is unknown") in note


def _reports(tmp_path: Path, correctness_changes: dict | None = None) -> Path:
    """reports/ with a scaling report whose stored gate predates the coverage and correctness
    reports (INCOMPLETE: "no coverage report"), and both of those written since."""
    reports = tmp_path / "reports"
    results = pd.DataFrame([_row(1, speedup=1.0), _row(4)])
    frozen = evaluate_gate(results, GateConfig(), None, None, results.copy(), scaling_source=CLEAN)
    assert frozen["verdict"] == "INCOMPLETE" and _criterion(frozen, REGRESSION)["status"] == "PASS"
    write_scaling_report(results, frozen, {**CLEAN, "device": "cuda"}, reports / "scaling")
    (reports / "correctness").mkdir()
    _correctness_json(reports / "correctness" / "results.json", **(correctness_changes or {}))
    (reports / "coverage").mkdir()
    (reports / "coverage" / "coverage.json").write_text(json.dumps({"totals": {"percent_covered": 93.0}}))
    return reports


def test_gate_command_reevaluates_from_the_current_reports(tmp_path, capsys):
    reports = _reports(tmp_path)
    assert cli.main(["gate", "--reports", str(reports)]) == 0
    out = capsys.readouterr().out
    assert "gate: GO" in out and "no coverage report" not in out and "recorded INCOMPLETE" in out


def test_gate_command_names_a_subset_correctness_report(tmp_path, capsys):
    reports = _reports(tmp_path, {"pytest_args": ["-k", "not faults"], "selection": "a -k subset: 'not faults'"})
    assert cli.main(["gate", "--reports", str(reports)]) == 1
    out = capsys.readouterr().out
    assert "gate: INCOMPLETE" in out and "correctness report is a -k subset: 'not faults'" in out


# --------------------------------------------------------------------------- 3. --out


def _never_run(monkeypatch):
    def ran(*a, **k):
        raise AssertionError("work started for a refused --out")
    monkeypatch.setattr(pytest, "main", ran)
    import harness.scaling
    monkeypatch.setattr(harness.scaling, "run_scaling", ran)


@pytest.mark.parametrize("command,out", [
    ("correctness", "reports"), ("correctness", "reports/baselines"), ("correctness", "."), ("scaling", "reports"),
    ("correctness", "reports/baselines/correctness-h100-80gb-hbm3_driver580.159_torch2.11-cu130_nccl2.28.9"),
])
def test_out_that_would_delete_baselines_is_refused_before_any_work(command, out, monkeypatch, capsys):
    _never_run(monkeypatch)
    monkeypatch.chdir(runner.REPO)
    assert cli.main([command, "--out", out]) == 2
    err = capsys.readouterr().err
    assert f"--out={out!r}" in err and "baselines" in err
    assert (runner.REPO / "reports" / "baselines").is_dir()


def test_out_holding_something_else_is_refused_and_left_alone(tmp_path, monkeypatch, capsys):
    _never_run(monkeypatch)
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    scaling = tmp_path / "scaling"
    scaling.mkdir()
    (scaling / "results.json").write_text(json.dumps({"gate": {}, "rows": []}))  # a scaling report (written before "kind")
    assert cli.main(["correctness", "--out", str(other)]) == 2
    assert "holds no tpgate report, not a correctness report" in capsys.readouterr().err
    assert cli.main(["correctness", "--out", str(scaling)]) == 2
    assert "holds a tpgate scaling report" in capsys.readouterr().err
    assert (other / "keep.txt").read_text() == "mine"
    (tmp_path / "file").write_text("x")
    with pytest.raises(TPConfigError, match="not a directory"):
        check_report_out(tmp_path / "file", "correctness", runner.REPO)


def test_out_that_is_new_empty_or_an_earlier_report_is_accepted(tmp_path):
    earlier = tmp_path / "earlier"
    _earlier_report(earlier)
    (tmp_path / "empty").mkdir()
    for out in (tmp_path / "new", tmp_path / "empty", earlier):
        assert check_report_out(out, "correctness", runner.REPO) == out.resolve()
    assert report_kind(earlier) == "correctness"


def test_scaling_out_holding_only_the_layer_benchmarks_is_accepted(tmp_path):
    """`nox -s scaling` runs the benchmarks first: their JSON is already in reports/scaling/ (CI's path)."""
    out = tmp_path / "scaling"
    out.mkdir()
    (out / "layer-benchmarks.json").write_text("{}")
    assert check_report_out(out, "scaling", runner.REPO) == out.resolve()
    with pytest.raises(TPConfigError):  # it is no correctness report's by-product
        check_report_out(out, "correctness", runner.REPO)


# --------------------------------------------------------------------------- 4. bad input exits 2, naming it


@pytest.mark.parametrize("text,needle", [
    ("{", "JSONDecodeError"),
    (json.dumps({"rows": []}), "holds no gate"),
    (json.dumps([1, 2]), "not a JSON object"),
    (json.dumps({"gate": {"verdict": "GO", "config": {}}, "rows": [{"world_size": 4}]}), "lack columns"),
    (json.dumps({"gate": {"verdict": "GO", "config": {"min_speedup_ws4": "fast"}}, "rows": []}), "min_speedup_ws4"),
])
def test_gate_with_a_broken_scaling_report_exits_2_naming_the_file(tmp_path, text, needle, capsys):
    (tmp_path / "scaling").mkdir()
    (tmp_path / "scaling" / "results.json").write_text(text)
    assert cli.main(["gate", "--reports", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert str(tmp_path / "scaling" / "results.json") in err and needle in err and "Traceback" not in err


def test_loader_memory_without_a_checkpoint_exits_2(tmp_path, capsys):
    assert cli.main(["loader-memory", str(tmp_path / "absent")]) == 2
    assert "no such checkpoint directory" in capsys.readouterr().err


# --------------------------------------------------------------------------- 5. the gate table


@pytest.mark.parametrize("table,needle", [
    ({"min_speedup_ws4": "3.8"}, "min_speedup_ws4='3.8': must be a number > 0"),
    ({"max_exposed_comm": 10}, "max_exposed_comm=10: must be a fraction in (0, 1]"),
    ({"min_coverage": True}, "min_coverage=True: must be a percentage"),
    ({"regression_threshold": float("nan")}, "regression_threshold=nan"),
    ({"workload": {"phase": "prefill"}}, "must name a preset"),
    ({"workload": {"preset": "llama3-8b", "phase": "prefil"}}, "workload.phase='prefil': must be one of"),
    ({"workload": {"preset": "llama3-8b", "phase": "prefill", "batch": 8}}, "unknown keys"),
    ({"workload": "llama3-8b"}, "workload='llama3-8b': must be a table"),
])
def test_gate_table_is_checked_when_read(table, needle):
    with pytest.raises(TPConfigError) as info:
        GateConfig.from_table(table)
    assert needle in str(info.value) and "[tool.tpgate.gate]" in str(info.value)


def test_the_shipped_gate_tables_are_valid():
    import tomllib

    for path in (runner.REPO / "pyproject.toml", runner.REPO / "harness" / "sweeps" / "one_gpu.toml"):
        table = tomllib.loads(path.read_text())["tool"]["tpgate"]["gate"]
        assert GateConfig.from_table(table).workload["preset"] == table["workload"]["preset"]


def test_scaling_with_a_bad_gate_table_exits_2_before_the_sweep(tmp_path, monkeypatch, capsys):
    _never_run(monkeypatch)
    config = tmp_path / "c.toml"
    config.write_text('[tool.tpgate.gate]\nmin_speedup_ws4 = "3.8"\n')
    assert cli.main(["scaling", "--config", str(config), "--out", str(tmp_path / "scaling")]) == 2
    assert "min_speedup_ws4='3.8'" in capsys.readouterr().err
