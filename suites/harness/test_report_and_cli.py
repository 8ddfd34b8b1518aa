"""Report writing (verdict, atomic publication) and the CLI's handling of bad input."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness import cli
from harness.atomic import write_text_atomic
from harness.report import write_correctness_report


def _metrics(passed=True):
    return pd.DataFrame([{"layer": "row", "dtype": "float32", "seed": 1, "batch": 1, "seq": 2, "params": "{}", "world_size": ws,
                          "case": f"row-{ws}", "tensor": "output", "max_abs": 0.0, "max_rel": 0.0, "ulp": 0, "err_single": 0.0,
                          "err_tp": 1e-8, "bound": 1e-7, "budget_used": 0.1, "passed": passed or ws != 4, "ranks_consistent": True,
                          "test": "t"} for ws in (1, 2, 4)])


def _tests(outcome="passed"):
    return pd.DataFrame([{"nodeid": "t", "outcome": outcome, "duration_s": 0.1, "message": ""}])


def test_passing_report_is_written_whole(tmp_path):
    out = tmp_path / "correctness"
    summary = write_correctness_report(_metrics(), _tests(), {"torch": "x"}, out, "doc")
    assert summary["verdict"] == "PASS"
    assert {p.name for p in out.iterdir()} == {"index.html", "results.csv", "results.json"}
    assert json.loads((out / "results.json").read_text())["verdict"] == "PASS"
    html = (out / "index.html").read_text()
    assert "PASS" in html and "data:image/png;base64," in html and "http://" not in html and "https://" not in html


@pytest.mark.parametrize("metrics,tests", [(_metrics(passed=False), _tests()), (_metrics(), _tests("failed")), (_metrics(), _tests().iloc[:0])])
def test_any_failure_or_no_tests_is_fail(tmp_path, metrics, tests):
    assert write_correctness_report(metrics, tests, {}, tmp_path / "r", "doc")["verdict"] == "FAIL"


def test_failed_write_leaves_previous_report_intact(tmp_path, monkeypatch):
    out = tmp_path / "r"
    write_correctness_report(_metrics(), _tests(), {}, out, "doc")
    before = (out / "index.html").read_text()
    import harness.report as report

    monkeypatch.setattr(report, "_render_html", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()), raising=False)
    monkeypatch.setattr(report.jinja2.Environment, "get_template", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        write_correctness_report(_metrics(passed=False), _tests(), {}, out, "doc")
    assert (out / "index.html").read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["r"], "no staging directory may be left behind"


def test_atomic_write_never_leaves_partial_file(tmp_path):
    target = tmp_path / "f.txt"
    write_text_atomic(target, "old")

    class Boom(str):
        def encode(self, *a, **k):
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        write_text_atomic(target, Boom("new"))
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]


@pytest.mark.parametrize("argv,needle", [
    (["correctness", "--examples", "0"], "--examples"),
    (["correctness", "--examples", "many"], "--examples"),
    (["correctness", "--device", "tpu"], "--device"),
    (["dispatch", "--world-size", "-1"], "--world-size"),
    (["nonsense"], "invalid choice"),
])
def test_cli_rejects_bad_arguments_naming_them(argv, needle, capsys):
    with pytest.raises(SystemExit) as info:
        cli.main(argv)
    assert info.value.code == 2
    assert needle in capsys.readouterr().err


def test_report_shows_results_per_implementation(tmp_path):
    """Rows naming an implementation (suites/model/test_implementations.py) get their own matrix
    line and per-implementation counts; rows naming none are tpgate's own stack, `reference`."""
    theirs = _metrics(passed=False).assign(implementation="dtensor", layer="model[qwen2]", test="u")
    out = tmp_path / "correctness"
    write_correctness_report(pd.concat([_metrics(), theirs]), _tests(), {}, out, "doc", {"implementations": ["reference", "dtensor"]})
    data = json.loads((out / "results.json").read_text())
    assert data["summary"]["implementations"] == {
        "reference": {"n_examples": 3, "n_examples_failed": 0, "n_rows": 3, "n_rows_failed": 0, "n_tests": 1, "n_tests_failed": 0},
        "dtensor": {"n_examples": 3, "n_examples_failed": 1, "n_rows": 3, "n_rows_failed": 1, "n_tests": 1, "n_tests_failed": 1}}
    assert [r["implementation"] for r in data["metrics"]] == ["reference"] * 3 + ["dtensor"] * 3
    html = (out / "index.html").read_text()
    matrix = html[html.index('<table class="matrix">'):html.index("</table>", html.index('<table class="matrix">'))]
    assert '<td class="layer">reference</td><td class="layer">row</td><td class="ok">1/1</td><td class="ok">1/1</td><td class="ok">1/1</td>' in matrix
    assert '<td class="layer">dtensor</td><td class="layer">model[qwen2]</td><td class="ok">1/1</td><td class="ok">1/1</td><td class="bad">0/1</td>' in matrix
    assert "Implementations judged: reference, dtensor" in html
    per_impl = html[html.index('<table class="data per-impl">'):]
    assert per_impl.index("<td>reference</td>") < per_impl.index("<td>dtensor</td>") < per_impl.index("</table>")
