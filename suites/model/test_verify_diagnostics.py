"""`tpgate verify` diagnostics (harness/diagnose.py): where a TP degree leaves the float64 reference,
rounding or bug, determinism, next-token KL; the float32-collectives communicator they rerun with;
the --diagnose / --html command line.

One diagnosed verify (the `diagnosed` fixture) of llama-gqa in bfloat16 at TP 1 and 2 judges, side by
side: tpgate's reference (the pure rounding case: its TP=2 logits differ from TP=1 bitwise and must be
called rounding), two planted single-layer bugs at tp > 1 only (rank 1's shard of layer 1's MLP down
projection scaled by 1.25; rank 1's copy of layer 1's input norm scaled by 1.25), which must be located
to that layer and sub-layer and called bugs, a stack adding rank- and call-dependent noise
(nondeterministic) and the dtensor peer, whose model is not tpgate's (diagnostics not available, with
the reason). The third planted bug (layer 0's attention o_proj) is the command line test's.
"""
from __future__ import annotations

import math

import pytest
import torch

from harness.diagnose import BUG, REDUCTION_ROUNDING, ROUNDING, UNDETERMINED, classify, next_token_kl
from harness.verify import VerifyRequest, verify
from impl.communication import NullCommunicator, ReduceInDtypeCommunicator

from . import diagnose_rank_fns as fns

IMPLEMENTATIONS = ("reference", fns.PLANTED_MLP_SPEC, fns.PLANTED_NORM_SPEC, fns.NOISY_SPEC, "dtensor")


def request(directory, **kw) -> VerifyRequest:
    return VerifyRequest(str(directory), (1, 2), dtype="bfloat16", prompt_len=8, new_tokens=2, diagnose=True, **kw)


@pytest.fixture(scope="module")
def diagnosed(checkpoint, worlds):
    result = verify(request(checkpoint("llama-gqa"), implementations=IMPLEMENTATIONS), lambda n: worlds[n])
    return result, {(r["implementation"], r["tp"]): r for r in result["rows"]}


# --------------------------------------------------------------------------- where and what


def test_a_planted_single_layer_bug_is_located_and_called_a_bug(diagnosed):
    """At TP=2 the first sub-layer over its bound is the broken one, and its error does not come
    back within the bound with float32 collectives: a bug. At TP=1 (nothing broken there) every
    sub-layer is within its bound: rounding. The bug is diluted below the logits' bound by the
    final layer, yet the sub-layer profile calls it a bug, and a diagnosed bug fails the row."""
    _, rows = diagnosed
    spec, layer, sublayer = fns.PLANTED_MLP_SPEC, 1, "mlp"
    d = rows[(spec, 2)]["diagnostics"]
    assert d["available"], d
    assert (d["first_exceeding"]["layer"], d["first_exceeding"]["sublayer"]) == (layer, sublayer), d["first_exceeding"]
    assert d["classification"]["class"] == BUG, d["classification"]
    row = rows[(spec, 2)]
    assert row["max_abs_vs_exact"] <= row["bound"], row  # the logits alone would pass: only the diagnosis fails it
    assert not row["passed"] and row["error"].startswith("diagnosed as a bug"), row
    at = next(p for p in d["fp32_collectives"]["profile"] if p["name"] == d["first_exceeding"]["name"])
    assert at["err"] > at["bound"], at  # does not shrink into the bound with float32 collectives
    before = [p for p in d["profile"] if p["name"] == d["first_exceeding"]["name"] or (p["layer"] is not None and p["layer"] < layer)
              or p["layer"] is None and p["name"] == "embed"]
    assert all(p["passed"] for p in before[:-1]), before  # every sub-layer ahead of it is within its bound
    assert d["ranks_differ_at"] == {}  # wrong, but the same wrong sum on every rank
    clean = rows[(spec, 1)]["diagnostics"]
    assert clean["first_exceeding"] is None and clean["classification"]["class"] == ROUNDING, clean


def test_a_stale_replicated_norm_on_one_rank_is_named_by_the_rank_comparison(diagnosed):
    """Rank 1's copy of layer 1's input norm scaled: rank 0's profile first leaves its bound at the
    attention after it (the all-reduce spreads rank 1's wrong partial to every rank), and the
    ranks' recorded outputs differ at that norm alone, on rank 1: the bug's own place."""
    _, rows = diagnosed
    d = rows[(fns.PLANTED_NORM_SPEC, 2)]["diagnostics"]
    assert (d["first_exceeding"]["layer"], d["first_exceeding"]["sublayer"]) == (1, "attention"), d["first_exceeding"]
    assert d["ranks_differ_at"] == {1: ["layers.1.input_norm"]}, d["ranks_differ_at"]
    assert d["classification"]["class"] == BUG, d["classification"]
    assert rows[("reference", 2)]["diagnostics"]["ranks_differ_at"] == {}


def test_bfloat16_tp2_differs_from_tp1_bitwise_and_is_called_rounding(diagnosed):
    """The reference in bfloat16 at TP=2: logits not bitwise TP=1's (a real reordering), every
    sub-layer of every block recorded and within its bound, ranks bitwise alike at each, rounding;
    its float32-collectives run reduced all 5 reductions (embedding + 2 per layer) through the
    wrapped communicator."""
    _, rows = diagnosed
    row = rows[("reference", 2)]
    assert row["passed"] and row["max_abs_vs_tp1"] > 0, row
    d = row["diagnostics"]
    assert d["classification"]["class"] == ROUNDING and d["first_exceeding"] is None, d["classification"]
    assert all(p["comparable"] and p["passed"] for p in d["profile"]), [p for p in d["profile"] if not p["passed"]]
    names = [p["name"] for p in d["profile"]]
    for layer in (0, 1):  # execution order inside a block, read from the model
        assert [n for n in names if n.startswith(f"layers.{layer}.")] == [
            f"layers.{layer}.{s}" for s in ("input_norm", "attention", "post_attention_norm", "mlp", "output")], names
    assert names[0] == "embed" and names[-2:] == ["norm", "lm_head"], names
    assert d["ranks_differ_at"] == {} and d["fp32_collectives"]["reductions"] == 5, d["fp32_collectives"].get("reductions")


@pytest.mark.parametrize("err, bound, err_fp32, expected", [
    (0.5, 1.0, None, ROUNDING),            # within the bound: rounding, whatever float32 would do
    (0.5, 1.0, 2.0, ROUNDING),
    (3.0, 1.0, 0.8, REDUCTION_ROUNDING),   # over it only with working-dtype collectives
    (3.0, 1.0, 2.9, BUG),                  # still over it without the collectives' rounding
    (3.0, 1.0, 1.01, BUG),                 # shrinks, but not into the bound
    (3.0, 1.0, None, UNDETERMINED),        # no float32 run to tell
])
def test_classification_decides_each_way(err, bound, err_fp32, expected):
    got = classify(err, bound, err_fp32, "no float32 run")
    assert got["class"] == expected, got
    assert (expected != UNDETERMINED) or "no float32 run" in got["reason"]


# --------------------------------------------------------------------------- determinism, KL, other stacks


def test_nondeterministic_stack_is_reported_and_the_reference_is_not(diagnosed):
    _, rows = diagnosed
    for tp in (1, 2):
        assert rows[("reference", tp)]["deterministic"] and rows[("reference", tp)]["nondeterministic_ranks"] == []
        noisy = rows[(fns.NOISY_SPEC, tp)]
        assert noisy["deterministic"] is False and noisy["nondeterministic_ranks"] == list(range(tp)), noisy


def test_diagnostics_of_a_stack_that_is_not_tpgates_are_not_available(diagnosed):
    _, rows = diagnosed
    row = rows[("dtensor", 1)]
    assert row["passed"] and row["diagnostics"] == {"available": False, "reason": row["diagnostics"]["reason"]}
    assert "PlainLlama) is not tpgate's" in row["diagnostics"]["reason"]
    assert row["deterministic"] and row["kl_max"] is not None  # the protocol-level checks still apply


def kl_independent(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """sum_v p log(p/q) per row of explicit probabilities, by scipy."""
    from scipy.stats import entropy

    return torch.tensor([entropy(a, b) for a, b in zip(p.reshape(-1, p.shape[-1]).numpy(), q.reshape(-1, q.shape[-1]).numpy())],
                        dtype=torch.float64).reshape(p.shape[:-1])


def kl_mutants():
    return {"reversed": lambda a, b: next_token_kl(b, a),
            "softmax over positions": lambda a, b: next_token_kl(a.transpose(-1, -2), b.transpose(-1, -2)).mean(-1, keepdim=True).expand(a.shape[:-1]),
            "float32 softmax": lambda a, b: (a.float().softmax(-1) * (a.float().log_softmax(-1) - b.float().log_softmax(-1))).sum(-1).double()}


def kl_agrees(kl, p: torch.Tensor, q: torch.Tensor) -> bool:
    """Equal up to float64's own error: each log-probability is off by <= u*|log p| from its
    rounding, and the terms' weights p sum to 1, so two float64 computations differ by at most
    ~2u*(max|log p| + max|log q|) per method (the tolerance below allows both)."""
    got, want = kl(p.log(), q.log()), kl_independent(p, q)
    slack = 4 * 2.0 ** -53 * float(p.log().abs().max() + q.log().abs().max())
    return got.shape == want.shape and bool(torch.allclose(got, want, rtol=1e-12, atol=slack))


def test_next_token_kl_against_an_independent_computation():
    """KL(p* || p) from logits = log-probabilities of known distributions: a closed form, scipy on
    random ones (batch 2, 3 positions, 5 tokens) and on two nearly equal ones (KL ~ 1e-13); the
    reversed divergence, a softmax over the wrong dim and a float32 computation are refused."""
    p, q = torch.tensor([[[0.5, 0.5]]], dtype=torch.float64), torch.tensor([[[0.9, 0.1]]], dtype=torch.float64)
    assert float(next_token_kl(p.log(), q.log())) == pytest.approx(0.5 * math.log(0.5 / 0.9) + 0.5 * math.log(0.5 / 0.1), rel=1e-12)
    g = torch.Generator().manual_seed(0)
    a = torch.rand(2, 3, 5, generator=g, dtype=torch.float64).softmax(-1)
    b = torch.rand(2, 3, 5, generator=g, dtype=torch.float64).softmax(-1)
    near = (a.log() + 1e-6 * torch.randn(a.shape, generator=g, dtype=torch.float64)).softmax(-1)
    for pair in ((a, b), (a, near)):
        assert kl_agrees(next_token_kl, *pair)
    for name, mutant in kl_mutants().items():
        assert not all(kl_agrees(mutant, *pair) for pair in ((a, b), (a, near))), name
    assert float(next_token_kl(a.log(), a.log()).max()) == 0.0


def test_rows_carry_the_kl_of_their_logits(diagnosed):
    result, rows = diagnosed
    assert rows[(fns.PLANTED_NORM_SPEC, 2)]["kl_max"] > 10 * rows[("reference", 2)]["kl_max"] > 0
    assert rows[(fns.PLANTED_NORM_SPEC, 1)]["kl_max"] == rows[("reference", 1)]["kl_max"]  # the same model at TP=1
    assert rows[("reference", 2)]["kl_mean"] <= rows[("reference", 2)]["kl_max"]


# --------------------------------------------------------------------------- the float32-collectives communicator


@pytest.mark.parametrize("communicator, rounds_once", [("plain", False), ("float32", True), ("mutant", False)])
def test_float32_collectives_reduce_in_float32(worlds, communicator, rounds_once):
    """Four ranks' bfloat16 values: the plain communicator's additions round in bfloat16 (its sums
    differ from the exact sum rounded once), ReduceInDtypeCommunicator's equal it for all-reduce,
    reduce-scatter and its async form, returned in bfloat16; a wrapper that takes the option and
    ignores it (the mutant) is caught."""
    for out in worlds[4].run(fns.reduced_in, communicator, 512):
        assert out["dtypes"] == ("torch.bfloat16",) * 3, out
        differs = [out["all_reduce_differs"], out["reduce_scatter_differs"], out["reduce_scatter_async_differs"]]
        assert (differs == [0, 0, 0]) if rounds_once else all(n > 0 for n in differs), (communicator, out)


def test_float32_collectives_keep_the_communicator_contract(worlds, checkpoint):
    """Through the wrapper, tpgate's bfloat16 model at TP=2, plain TP and sequence-parallel,
    forward and backward, is bitwise the plain communicator's (a sum of two bfloat16 values in
    float32 is exact, so rounding it once is bfloat16's own correctly rounded sum); at world
    size 1 the wrapper hands every tensor to a NullCommunicator untouched."""
    ids = torch.randint(0, 101, (2, 8), generator=torch.Generator().manual_seed(0))
    for out in worlds[2].run(fns.model_through, str(checkpoint("llama-gqa")), torch.bfloat16, ids):
        assert out["sp=False"] and out["sp=True"] and out["reductions"] > 0, out
    single = ReduceInDtypeCommunicator(NullCommunicator(1))
    x = torch.randn(4, 6).to(torch.bfloat16)
    assert single.all_reduce(x) is x and single.reduce_scatter(x, 0) is x and single.reductions == 0


# --------------------------------------------------------------------------- the command line


class SessionWorld:
    """The CLI's world of n ranks, backed by the session's persistent one (no process start)."""

    def __init__(self, worlds, n, **_):
        self.world = worlds[n]

    alive = True

    def run(self, *args, **kw):
        return self.world.run(*args, **kw)

    def shutdown(self):
        pass  # the session's world outlives the command


def test_tpgate_verify_diagnose_writes_the_page_with_its_plots(checkpoint, worlds, tmp_path, monkeypatch, capsys):
    """`tpgate verify CKPT --tp 2 --impl PLANTED_ATTENTION --diagnose --html out.html --json out.json`
    in this process (the ranks are the session's): exit 1, the table names layer 0's attention and
    BUG, the page replaces an old one in one step (no temporary left beside it) and holds the
    profile and logits plots, and the JSON carries the profile."""
    import json

    from harness import cli
    from harness.runtime import orchestrator

    monkeypatch.setattr(orchestrator, "MultiGPUOrchestrator", lambda n, **kw: SessionWorld(worlds, n, **kw))
    page, record = tmp_path / "out.html", tmp_path / "out.json"
    page.write_text("old page")
    status = cli.main(["verify", str(checkpoint("llama-gqa")), "--tp", "2", "--dtype", "bfloat16", "--prompt-len", "8", "--new-tokens", "2",
                       "--impl", fns.PLANTED_ATTENTION_SPEC, "--diagnose", "--html", str(page), "--json", str(record)])
    out = capsys.readouterr().out
    assert status == 1, out
    assert "tp=2: BUG; first over its bound: layer 0 attention" in out and "KL mean" in out and "bitwise" in out, out
    html = page.read_text()
    assert html.count('src="data:image/png;base64,') == 2 and "layer 0 attention" in html and ">bug<" in html, html[:400]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.html", "out.json"]
    row = json.loads(record.read_text())["rows"][0]
    assert row["diagnostics"]["first_exceeding"]["name"] == "layers.0.attention" and len(row["diagnostics"]["profile"]) == 1 + 5 * 2 + 2  # embed, 2 blocks, norm, LM head


def test_a_page_that_fails_to_render_leaves_the_old_one(diagnosed, tmp_path, monkeypatch):
    from harness import verify_report

    result, _ = diagnosed
    page = tmp_path / "out.html"
    page.write_text("old page")

    def broken(rows):
        raise RuntimeError("plot failed")

    monkeypatch.setattr(verify_report, "logits_plot", broken)
    with pytest.raises(RuntimeError, match="plot failed"):
        verify_report.write_verify_html(result, page)
    assert page.read_text() == "old page" and [p.name for p in tmp_path.iterdir()] == ["out.html"]


@pytest.mark.parametrize("argv, needle", [
    (["--html", "{tmp}"], "--html='{tmp}': must name a file, not a directory"),
    (["--html", "{tmp}/missing/out.html"], "its directory '{tmp}/missing' does not exist"),
    (["--json", "{tmp}/same", "--html", "{tmp}/same"], "--html='{tmp}/same': must differ from --json"),
    (["--save-logits", "{tmp}/same", "--html", "{tmp}/same"], "--html='{tmp}/same': must differ from --save-logits"),
])
def test_bad_html_paths_are_refused_before_any_process(checkpoint, tmp_path, capsys, argv, needle):
    from harness.cli import main

    from suites.faults.support import descendants

    before = descendants()
    assert main(["verify", str(checkpoint("llama-gqa")), "--diagnose", *[a.format(tmp=tmp_path) for a in argv]]) == 2
    assert needle.format(tmp=tmp_path) in capsys.readouterr().err
    assert descendants() == before
