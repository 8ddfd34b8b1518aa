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
    finding = {"test": "u", "tp": 4, "reason": "output: failed"}
    assert data["summary"]["implementations"] == {
        "reference": {"role": "candidate", "verdict": "PASS", "n_examples": 3, "n_examples_failed": 0, "n_rows": 3, "n_rows_failed": 0,
                      "n_tests": 1, "n_tests_failed": 0, "findings": []},
        "dtensor": {"role": "peer", "verdict": "FAIL", "n_examples": 3, "n_examples_failed": 1, "n_rows": 3, "n_rows_failed": 1,
                    "n_tests": 1, "n_tests_failed": 1, "findings": [finding]}}
    assert [r["implementation"] for r in data["metrics"]] == ["reference"] * 3 + ["dtensor"] * 3
    html = (out / "index.html").read_text()
    matrix = html[html.index('<table class="matrix">'):html.index("</table>", html.index('<table class="matrix">'))]
    assert '<td class="layer">reference</td><td class="layer">row</td><td class="ok">1/1</td><td class="ok">1/1</td><td class="ok">1/1</td>' in matrix
    assert '<td class="layer">dtensor</td><td class="layer">model[qwen2]</td><td class="ok">1/1</td><td class="ok">1/1</td><td class="bad">0/1</td>' in matrix
    assert "Implementations judged: reference, dtensor" in html
    per_impl = html[html.index('<table class="data per-impl">'):]
    assert per_impl.index("<td>reference</td>") < per_impl.index("<td>dtensor</td>") < per_impl.index("</table>")


# --------------------------------------------------------------------------- the candidate and its peers

KV_FINDING = "unsupported: num_kv_heads=2 is not a multiple of tp=4"


def _side_by_side() -> tuple[pd.DataFrame, pd.DataFrame]:
    """The layer suite's unnamed rows and test (all pass); reference's and hf-tp's model tests,
    each recording its implementation: reference passes, hf-tp refuses TP=4 (a row with its reason)."""
    layer = _metrics().assign(test="layer")
    model = pd.concat([_metrics().assign(implementation="reference", test="model[reference]"),
                       _metrics(passed=False).assign(implementation="hf-tp", test="model[hf-tp]")])
    model["error"] = ["", "", "", "", "", KV_FINDING]
    tests = pd.DataFrame([{"nodeid": "layer", "outcome": "passed", "duration_s": 0.1, "message": "", "implementation": None},
                          {"nodeid": "model[reference]", "outcome": "passed", "duration_s": 0.1, "message": "", "implementation": "reference"},
                          {"nodeid": "model[hf-tp]", "outcome": "failed", "duration_s": 0.1, "message": f"hf-tp: TP=4: {KV_FINDING}",
                           "implementation": "hf-tp"}])
    return pd.concat([layer, model]), tests


def _judge(tmp_path, implementations):
    metrics, tests = _side_by_side()
    out = tmp_path / "_".join(implementations)
    summary = write_correctness_report(metrics, tests, {}, out, "doc", {"implementations": implementations})
    return summary, json.loads((out / "results.json").read_text()), (out / "index.html").read_text()


def test_a_peer_failing_leaves_the_candidates_verdict(tmp_path):
    """reference judged, hf-tp beside it: hf-tp's failed test and row are its FAIL with the reason,
    shown in the table, and the verdict, exit status and top-level counts are the candidate's PASS."""
    summary, data, html = _judge(tmp_path, ["reference", "hf-tp"])
    assert summary["verdict"] == "PASS" and (summary["n_tests"], summary["n_failed"]) == (2, 0), summary
    peer = data["summary"]["implementations"]["hf-tp"]
    assert (peer["role"], peer["verdict"], peer["n_tests_failed"]) == ("peer", "FAIL", 1), peer
    assert peer["findings"] == [{"test": "model[hf-tp]", "tp": 4, "reason": KV_FINDING}]
    assert data["summary"]["implementations"]["reference"]["role"] == "candidate"
    assert (data["summary"]["n_peer_tests"], data["summary"]["n_peer_tests_failed"]) == (1, 1)
    per_impl = html[html.index('<table class="data per-impl">'):]
    assert f"TP=4: {KV_FINDING}" in per_impl[:per_impl.index("</table>")]
    assert "never change the verdict" in html


def test_the_candidate_failing_fails_the_verdict(tmp_path):
    """hf-tp judged with reference as its peer: the same rows, now hf-tp's FAIL; the layer suite's
    unnamed rows still count (they are never a peer's, even with reference a peer)."""
    summary, data, _ = _judge(tmp_path, ["hf-tp", "reference"])
    assert summary["verdict"] == "FAIL" and summary["n_failed"] == 1, summary
    assert data["summary"]["n_rows"] == 6  # the layer rows and hf-tp's, not reference's model rows
    assert data["summary"]["implementations"]["hf-tp"]["role"] == "candidate"
    assert data["summary"]["implementations"]["reference"]["verdict"] == "PASS"


def _everything_counts(m, t, named, run):
    return pd.Series(False, index=m.index), pd.Series(False, index=t.index)


def _every_named_row_is_a_peers(m, t, named, run):
    return named.copy(), t["implementation"].notna()


@pytest.mark.parametrize("mutant", [_everything_counts, _every_named_row_is_a_peers], ids=lambda f: f.__name__.strip("_"))
def test_the_role_checks_reject_a_report_that_mixes_up_candidate_and_peers(mutant, tmp_path, monkeypatch):
    from harness import report

    monkeypatch.setattr(report, "peer_masks", mutant)
    caught = []
    for check in (test_a_peer_failing_leaves_the_candidates_verdict, test_the_candidate_failing_fails_the_verdict):
        try:
            check(tmp_path / check.__name__)
        except AssertionError:
            caught.append(check.__name__)
    assert caught, f"{mutant.__name__} slipped through"
