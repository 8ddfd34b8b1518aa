"""Bring your own TP stack: the guide's example, judged as a user would judge it.

suites/model/byo/ holds tinystack.py (a small TP Llama stack on plain torch.distributed, no
tpgate import) and tinystack_tpgate.py (its adapter to the protocol, harness.implementations).
Both are copied out of the repository. Each command a user judges a stack with runs once as the
user runs it, a subprocess with PYTHONPATH = the copy only: `tpgate verify --impl`, `tpgate
correctness --impl` (the model suite's implementation test) and `tpgate scaling
--implementations`; the good copy passes each. The other findings are judged in this process on
the session's persistent worlds, with the copy put on the ranks' sys.path for the call
(byo_rank_fns), or by a `tpgate correctness` run in this process, whose ranks inherit sys.path:
a copy without the MLP's row-parallel all_reduce fails the model suite at tp > 1 (and passes at
TP=1, where there is nothing to sum), and a checkpoint whose kv heads tinystack cannot shard is
tinystack's Unsupported failure row with the reason. The guide shows the adapter verbatim (checked here, so the two cannot drift).

These test tpgate's pipeline for an outside stack, not the stack a correctness report judges,
so they live in the harness suite (`nox -s tests`), not in `tpgate correctness`'s suites.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest

pytest.importorskip("transformers", reason="tinystack is judged against transformers (a test dependency)")

from harness import cli  # noqa: E402
from harness.implementations import Unsupported, load_implementation  # noqa: E402
from harness.verify import VerifyRequest, verify  # noqa: E402
from impl.model_loader import read_config  # noqa: E402

from . import byo_rank_fns  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
BYO = REPO / "suites" / "model" / "byo"
GUIDE = REPO / "DISTRIBUTED_INFERENCE_GUIDE.md"
SPEC = "tinystack_tpgate:IMPL"
SECTION = "### Bring your own TP stack"
MODEL_TEST = "test_implementation_passes_verify_at_every_tp"
BROKEN = ('return self.row_parallel(h, layer, "down")', 'return F.linear(h, layer["down"])')  # the down projection's sums left unsummed


def outside_copy(directory: Path, edit: tuple[str, str] | None = None) -> Path:
    """tinystack.py and its adapter copied into `directory` (outside the repository); `edit` =
    (old, new) replaced in the copied tinystack.py, which must contain `old` exactly once."""
    assert REPO not in directory.resolve().parents
    directory.mkdir(parents=True, exist_ok=True)
    for name in ("tinystack.py", "tinystack_tpgate.py"):
        text = (BYO / name).read_text()
        if edit and name == "tinystack.py":
            assert text.count(edit[0]) == 1, f"{edit[0]!r} is not in tinystack.py exactly once"
            text = text.replace(*edit)
        (directory / name).write_text(text)
    return directory


def as_a_user(*argv: str, stack: Path) -> subprocess.CompletedProcess:
    """`tpgate ARGV` with PYTHONPATH = `stack` only (tpgate itself from the repository: `python -m` in its root)."""
    return subprocess.run([sys.executable, "-m", "harness.cli", *argv], cwd=REPO, env={**os.environ, "PYTHONPATH": str(stack)},
                          capture_output=True, text=True, timeout=600)


@contextmanager
def importable(stack: Path, worlds, sizes: tuple[int, ...]):
    """`stack` importable here and on the ranks of worlds[n] for each n in `sizes` for the block,
    its modules forgotten everywhere after it (a later copy must not find this one's)."""
    byo_rank_fns.importable(None, str(stack), True)
    try:
        for n in sizes:
            worlds[n].run(byo_rank_fns.importable, str(stack), True)
        yield
    finally:
        byo_rank_fns.forget(str(stack))
        for n in sizes:
            worlds[n].run(byo_rank_fns.importable, str(stack), False)


def correctness_report(out: Path) -> tuple[dict, dict]:
    """results.json of a `tpgate correctness` run in `out`, and {tp: metric row} of its tinystack rows."""
    data = json.loads((out / "results.json").read_text())
    rows = {r["world_size"]: r for r in data["metrics"] if r["implementation"] == SPEC}
    return data, rows


def test_tinystack_passes_verify_at_every_tp_degree(checkpoint, tmp_path):
    """`tpgate verify --tp 1,2,4 --impl tinystack_tpgate:IMPL`: attention biases (split for q/k/v,
    whole and added once after o's sum), 8 kv heads."""
    out = tmp_path / "verify.json"
    done = as_a_user("verify", str(checkpoint("llama-attention-bias")), "--tp", "1,2,4", "--impl", SPEC, "--new-tokens", "3",
                     "--json", str(out), stack=outside_copy(tmp_path / "stack"))
    assert done.returncode == 0, done.stdout + done.stderr
    rows = {r["tp"]: r for r in json.loads(out.read_text())["rows"]}
    assert sorted(rows) == [1, 2, 4] and all(r["implementation"] == SPEC for r in rows.values()), rows
    for tp, row in rows.items():
        assert row["passed"] and not row["error"] and row["tokens_checked"], (tp, row)


def test_tinystack_passes_the_model_suite(checkpoint, tmp_path):
    """`tpgate correctness --impl tinystack_tpgate:IMPL --checkpoints llama-attention-bias -k` the
    model suite's implementation test: PASS (exit 0), tinystack the candidate, its rows at TP 1, 2, 4."""
    out = tmp_path / "report"
    done = as_a_user("correctness", "--impl", SPEC, "--checkpoints", "llama-attention-bias", "-k", MODEL_TEST, "--examples", "1",
                     "--out", str(out), stack=outside_copy(tmp_path / "stack"))
    assert done.returncode == 0, done.stdout + done.stderr
    data, rows = correctness_report(out)
    assert data["verdict"] == "PASS" and data["run"]["implementations"] == [SPEC], data["summary"]
    assert data["run"]["checkpoints"] == ["llama-attention-bias"]
    (test,) = data["tests"]
    assert test["nodeid"].endswith(f"{MODEL_TEST}[{SPEC}-llama-attention-bias]") and test["outcome"] == "passed", test
    assert sorted(rows) == [1, 2, 4] and all(r["passed"] for r in rows.values()), rows
    assert data["summary"]["implementations"][SPEC]["role"] == "candidate"


def test_dropping_the_mlp_all_reduce_fails_the_model_suite_beyond_tp1(checkpoint, tmp_path, monkeypatch, capsys):
    """The down projection's partial sums left unsummed, each rank holding its share only:
    `tpgate correctness --impl tinystack_tpgate:IMPL` of that copy (in this process, the copy on
    sys.path, which the run's own ranks inherit) is FAIL, exit 1; its TP=1 row passes (one rank
    holds the whole sum), its TP=2 and TP=4 rows are over their bounds, not errors."""
    broken = outside_copy(tmp_path / "broken", BROKEN)
    monkeypatch.syspath_prepend(str(broken))
    out = tmp_path / "report"
    try:
        code = cli.main(["correctness", "--impl", SPEC, "--checkpoints", "llama-attention-bias", "-k", MODEL_TEST, "--examples", "1",
                         "--out", str(out)])
    finally:
        byo_rank_fns.forget(str(broken))
    assert code == 1, capsys.readouterr().out
    data, rows = correctness_report(out)
    assert data["verdict"] == "FAIL" and data["summary"]["n_failed"] == 1, data["summary"]
    assert sorted(rows) == [1, 2, 4] and rows[1]["passed"], rows
    for tp in (2, 4):
        assert not rows[tp]["passed"] and not rows[tp]["error"] and rows[tp]["err_tp"] > rows[tp]["bound"], rows[tp]


def test_kv_heads_tinystack_cannot_shard_are_its_unsupported_row(checkpoint, worlds, tmp_path, capsys):
    """llama-gqa: 2 kv heads. tpgate replicates them at tp=4; tinystack refuses, before any rank
    starts. At tp=2 it runs, with its vocabulary of 101 split 51 + 50 (zero-padded to 51)."""
    with importable(outside_copy(tmp_path / "stack"), worlds, (2,)):  # tp=4 is refused in this process: no rank imports it
        result = verify(VerifyRequest(str(checkpoint("llama-gqa")), (2, 4), new_tokens=3, implementations=(SPEC,)), lambda n: worlds[n])
    rows = {r["tp"]: r for r in result["rows"]}
    assert rows[2]["passed"], rows[2]
    reason = "unsupported: num_kv_heads=2 is not a multiple of tp=4 (tinystack shards kv heads and never replicates them)"
    assert rows[4]["error"] == reason and not rows[4]["passed"] and rows[4]["local_parameters"] is None, rows[4]
    assert not result["passed"]
    cli._print_verify(result)
    assert f"FAIL: {reason}" in capsys.readouterr().out


@pytest.fixture
def adapter(monkeypatch):
    """The adapter imported in this process from suites/model/byo (the driver side: check only)."""
    monkeypatch.syspath_prepend(str(BYO))
    yield load_implementation(SPEC)
    byo_rank_fns.forget(str(BYO))


@pytest.mark.parametrize("variant, tp, reason", [
    ("qwen2", 1, "model_type='qwen2': tinystack implements llama and mistral only"),
    ("llama3-rope-scaling", 1, "rope_scaling of type 'llama3': tinystack has plain rotary only"),
    ("mistral", 1, "sliding_window=32 < max_position_embeddings=64: tinystack has no sliding-window attention"),
    ("llama-mqa-tied", 2, "num_kv_heads=1 is not a multiple of tp=2"),
])
def test_check_refuses_what_tinystack_does_not_implement(variant, tp, reason, checkpoint, adapter):
    with pytest.raises(Unsupported, match=re.escape(reason)):
        adapter.check(read_config(str(checkpoint(variant))), tp)
    adapter.check(read_config(str(checkpoint("llama-attention-bias"))), 4)  # and nothing for what it does


def test_guide_shows_the_adapter_verbatim():
    """The guide's "Bring your own TP stack" section: its one python block is tinystack_tpgate.py
    to the byte, and it names the command that judges it."""
    lines = GUIDE.read_text().splitlines(keepends=True)
    start = next(i for i, line in enumerate(lines) if line.startswith(SECTION))
    end = next((i for i in range(start + 1, len(lines)) if re.match(r"#{2,3} ", lines[i])), len(lines))
    section = "".join(lines[start:end])
    blocks = re.findall(r"^```python\n(.*?)^```$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"{len(blocks)} python blocks in the guide's {SECTION!r} section"
    assert blocks[0] == (BYO / "tinystack_tpgate.py").read_text()
    assert f"--impl {SPEC}" in section


# the smallest sweep the assertions need (a user's [tool.tpgate.scaling] table, given by --config):
# both phases at world sizes 1 and 2 (decode needs >= 2 steps), one warmup, two repeats, no projections
SWEEP = """[tool.tpgate.scaling]
world_sizes = [1, 2]
presets = ["tiny"]
device = "cpu"
warmup = 1
repeats = 2
phases = [{ kind = "prefill", batch = 1, prompt = 16 }, { kind = "decode", batch = 1, prompt = 8, steps = 8 }]
"""


def test_tinystack_is_swept_beside_the_reference(tmp_path):
    """`tpgate scaling --implementations reference,tinystack_tpgate:IMPL` on the copy outside the
    repository: every point of both stacks measured, tinystack's exposed communication not
    measurable (it cannot be switched off from outside) and none of its points projected."""
    import pandas as pd

    (tmp_path / "sweep.toml").write_text(SWEEP)
    out = tmp_path / "report"
    done = as_a_user("scaling", "--config", str(tmp_path / "sweep.toml"), "--implementations", f"reference,{SPEC}", "--out", str(out),
                     stack=outside_copy(tmp_path / "stack"))
    assert (out / "results.csv").exists(), done.stdout + done.stderr
    frame = pd.read_csv(out / "results.csv")
    mine = frame[frame["implementation"] == SPEC]
    assert set(zip(mine["phase"], mine["world_size"])) == {(p, w) for p in ("prefill", "decode") for w in (1, 2)}, mine
    assert (mine["status"] == "ok").all() and not mine["projected"].any(), mine["error"].tolist()
    assert (mine["latency_s"] > 0).all() and mine["exposed_comm"].isna().all()
    assert (frame[frame["implementation"] == "reference"]["status"] == "ok").all()
    assert SPEC in (out / "index.html").read_text()
