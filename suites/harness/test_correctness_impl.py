"""`tpgate correctness --impl NAME[,NAME]` and plain pytest's `--tpgate-impl`: the model suite
suites/model/test_implementations.py has one test per named implementation and checkpoint, and
a run through the CLI judges the named stack, fails on its refusals with the reason, and records
what it judged in results.json and on the page. In-process (pytest.main, cli.main) on the real
suite: a subprocess would pay torch's and transformers' imports again."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="the model suite compares against transformers (a test dependency)")

from harness import cli  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
SUITE = "suites/model/test_implementations.py"
TEST = "test_implementation_passes_verify_at_every_tp"


class _Collected:
    """pytest plugin: the node ids a session collected."""

    def __init__(self):
        self.ids: list[str] = []

    def pytest_collection_finish(self, session):
        self.ids = [item.nodeid for item in session.items]


@pytest.mark.parametrize("option,expected", [
    ([], [("reference", "llama-gqa"), ("reference", "qwen2")]),
    (["--tpgate-impl", "reference,dtensor,hf-tp"], [("reference", "llama-gqa"), ("reference", "qwen2"), ("dtensor", "llama-gqa"), ("hf-tp", "llama-gqa")]),
    (["--tpgate-impl", "hf-tp"], [("hf-tp", "llama-gqa"), ("hf-tp", "qwen2")]),
    (["--tpgate-impl", "dtensor,reference", "--tpgate-checkpoints", "mistral,llama-attention-bias"],
     [("dtensor", "mistral"), ("dtensor", "llama-attention-bias"), ("reference", "mistral")]),
])
def test_the_model_suite_judges_the_candidate_on_every_checkpoint_and_peers_on_the_first(option, expected):
    collected = _Collected()
    code = pytest.main([str(REPO / SUITE), "--collect-only", "-q", "-p", "no:cacheprovider", *option], plugins=[collected])
    assert code == pytest.ExitCode.OK, code
    assert collected.ids == [f"{SUITE}::{TEST}[{impl}-{variant}]" for impl, variant in expected], collected.ids


def test_a_bad_checkpoint_is_a_usage_error_naming_it_and_the_known(capsys):
    code = pytest.main([str(REPO / SUITE), "--collect-only", "-q", "-p", "no:cacheprovider", "--tpgate-checkpoints", "llama-gqa,gpt2"])
    assert code == pytest.ExitCode.USAGE_ERROR
    err = capsys.readouterr().err
    assert "--tpgate-checkpoints: checkpoints=('llama-gqa', 'gpt2'): must be a non-empty tuple of distinct model-suite checkpoints" in err, err
    assert "'llama-attention-bias'" in err and "'qwen2'" in err, err


def test_correctness_impl_judges_the_named_stack_and_fails_on_its_refusals_with_the_reason(tmp_path, capsys):
    """dtensor on qwen2 (vocabulary 103, 2 kv heads): TP=1 runs and passes, TP 2 and 4 are refused
    by its check() before any process starts. The run completes, the test fails naming both
    reasons, every TP degree is a metric row naming dtensor, and the run record says dtensor."""
    out = tmp_path / "correctness"
    code = cli.main(["correctness", "--impl", "dtensor", "-k", f"{TEST} and qwen2", "--examples", "1", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 1 and "tpgate correctness: FAIL — 1 tests, 1 failed" in printed, printed
    data = json.loads((out / "results.json").read_text())
    assert data["run"]["implementations"] == ["dtensor"]
    (test,) = data["tests"]
    assert test["nodeid"].endswith(f"{TEST}[dtensor-qwen2]") and test["outcome"] == "failed", test
    assert "TP=2: unsupported: vocab_size=103: must be a multiple of tp=2" in test["message"], test["message"]
    assert "TP=4: unsupported: num_kv_heads=2: must be a multiple of tp=4" in test["message"], test["message"]
    rows = [(r["implementation"], r["world_size"], r["passed"]) for r in data["metrics"]]
    assert rows == [("dtensor", 1, True), ("dtensor", 2, False), ("dtensor", 4, False)], rows
    assert data["summary"]["implementations"]["dtensor"]["n_rows_failed"] == 2, data["summary"]
    assert "Implementations judged: dtensor" in (out / "index.html").read_text()


def test_correctness_refuses_an_unknown_impl_naming_it_and_the_known_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "correctness"
    assert cli.main(["correctness", "--impl", "reference,nope", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tpgate correctness: error: implementations='nope': is not a known implementation" in err, err
    assert "['dtensor', 'hf-tp', 'reference']" in err, err
    assert not out.exists()


def test_correctness_refuses_an_unknown_checkpoint_before_anything_runs(tmp_path, capsys):
    out = tmp_path / "correctness"
    assert cli.main(["correctness", "--checkpoints", "llama-gqa,gpt2", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "tpgate correctness: error: checkpoints=('llama-gqa', 'gpt2'): must be a non-empty tuple of distinct model-suite checkpoints" in err, err
    assert not out.exists()
