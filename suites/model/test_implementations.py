"""The run's implementations (`tpgate correctness --impl NAME[,NAME]`, plain pytest
`--tpgate-impl`), each judged by `verify` on checkpoint variants at TP 1, 2 and 4: the same
float64 reference, bound and transformers comparison as `tpgate verify --impl`.

One test per (implementation, checkpoint), parametrized by pytest_generate_tests from the
SuiteSettings of the SuiteRun registered with the session (harness.suite_plugin): the candidate
(the first implementation) on every checkpoint of the run (`--checkpoints`, default llama-gqa
and qwen2), each peer on the first only, so the default plain run (`reference` alone) adds two
tests. Each test records its implementation in its user_properties (the runner keeps it, and the
report leaves peers' tests out of the verdict), and every verify row becomes a metric row naming
it. A row the implementation refused (`Unsupported`, e.g. hf-tp at TP=4 on 2 kv heads) or that
failed on its ranks is that implementation's finding: the test fails with the reason, after the
other TP degrees ran."""
from __future__ import annotations

import math

import pytest

from harness.suite_plugin import SuiteSettings, registered_run
from harness.verify import VerifyRequest, verify

from .test_hf_equivalence import metric_row

TPS = (1, 2, 4)


def judged_pairs(settings: SuiteSettings) -> list[tuple[str, str]]:
    """(implementation, checkpoint) of every test: the candidate on each of the run's checkpoints,
    then each peer on the peers' checkpoints."""
    return [(settings.candidate, c) for c in settings.checkpoints] + [(p, c) for p in settings.peers for c in settings.peer_checkpoints]


def pytest_generate_tests(metafunc):
    if "implementation" in metafunc.fixturenames:
        run = registered_run(metafunc.config)
        pairs = judged_pairs(run.settings if run is not None else SuiteSettings())
        metafunc.parametrize("implementation, variant_name", pairs, ids=[f"{impl}-{variant}" for impl, variant in pairs])


def implementation_metric_row(implementation: str, variant: str, req: VerifyRequest, row: dict) -> dict:
    """The verify row in the report's schema, naming its implementation; a row without logits
    (refused or raised) has no error or budget (NaN: counted as failed) and carries its reason."""
    base = metric_row(variant, req, row if row["bound"] is not None else {**row, "max_abs_vs_exact": math.nan, "bound": math.nan})
    return {**base, "case": f"{implementation} {base['case']}", "implementation": implementation, "error": row["error"]}


def test_implementation_passes_verify_at_every_tp(implementation, variant_name, checkpoint, worlds, device, metrics, request):
    request.node.user_properties.append(("implementation", implementation))
    req = VerifyRequest(str(checkpoint(variant_name)), TPS, device, "float32", batch=2, prompt_len=8, new_tokens=3, seed=5,
                        implementations=(implementation,))
    result = verify(req, lambda n: worlds[n])
    rows = result["rows"]
    metrics.write([implementation_metric_row(implementation, variant_name, req, row) for row in rows], request.node.nodeid)
    assert [(r["implementation"], r["tp"]) for r in rows] == [(implementation, tp) for tp in TPS], rows
    assert result["reference"] == "transformers" and result["semantic_check"]["passed"], result["semantic_check"]
    failed = [r for r in rows if not r["passed"]]
    if failed:
        pytest.fail(f"{implementation} on {variant_name}: " + "; ".join(
            f"TP={r['tp']}: {r['error'] or describe(r)}" for r in failed), pytrace=False)


def describe(row: dict) -> str:
    """Why a row that produced logits failed."""
    return (f"max|logits - float64| {row['max_abs_vs_exact']:.3g} vs bound {row['bound']:.3g}, ranks agree {row['ranks_agree']}, "
            f"first diverging token {row['first_diverging_token']} (near tie: {row['divergence_at_near_tie']})")
