"""Scaling report (files, self-containment, projected/failed marking, atomic publication) and the reports index."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

import harness.atomic as atomic
import harness.scaling_analysis as scaling_analysis
import harness.scaling_report as scaling_report
from harness.scaling_report import CPU_WARNING, write_index, write_scaling_report

GATE = {"verdict": "NO-GO", "criteria": [
    {"name": "correctness suites pass", "measured": "PASS", "threshold": "PASS", "status": "PASS", "evidence": "../correctness/index.html", "note": ""},
    {"name": "speedup at world size 4", "measured": 1.7, "threshold": ">= 3.8", "status": "FAIL", "evidence": "results.csv", "note": ""},
    {"name": "dispatch overhead at world size 4", "measured": None, "threshold": "< 10%", "status": "INCOMPLETE",
     "evidence": "https://example.com/not-a-link", "note": "only CPU points exist"},
]}
ENV = {"device": "cpu", "backend": "gloo", "torch": "x", "timestamp_utc": "2025-01-01T00:00:00+00:00"}


def _row(ws, latency, projected=False, status="ok", device="cpu", phase="prefill"):
    base = {"implementation": "reference", "preset": "tiny", "phase": phase, "batch": 2, "prompt": 64, "steps": 0 if phase == "prefill" else 16,
            "world_size": ws, "device": device, "dtype": "float32", "projected": projected, "status": status, "error": ""}
    if status != "ok":
        return {**base, "error": "RuntimeError: rank 3 died <boom>"}
    null = latency * 0.8
    return {**base, "latency_s": latency, "latency_p90_s": latency * 1.1, "null_latency_s": null, "exposed_comm": (latency - null) / latency,
            "tokens_per_s": 128 / latency, "peak_memory_bytes": 4e8 / ws, "collectives_per_step": 9.0, "comm_bytes_per_step": 1e6,
            "rank_latency_s": [latency] * ws, "dispatch_us_per_call": np.nan if projected else 300.0,
            "dispatch_fraction": np.nan if projected else 0.05, "dispatch_us_per_step": np.nan if projected else 60.0,
            "backend": "" if projected else "gloo", "cost_model": "defaults" if projected else np.nan}


def _results():
    rows = [_row(1, 0.010), _row(2, 0.006), _row(4, 0.004), _row(8, 0.003, projected=True), _row(8, np.nan, status="failed")]
    frame = pd.DataFrame(rows)
    frame["speedup"] = 0.010 / frame["latency_s"]
    frame["efficiency"] = frame["speedup"] / frame["world_size"]
    return frame


def test_report_files_self_contained_verdict_and_projection(tmp_path):
    out = tmp_path / "reports" / "scaling"
    summary = write_scaling_report(_results(), GATE, ENV, out)
    assert summary["verdict"] == "NO-GO" and summary["n_projected"] == 1 and summary["n_failed"] == 1
    assert {p.name for p in out.iterdir()} == {"index.html", "results.csv", "results.json"}
    html = (out / "index.html").read_text()
    assert "data:image/png;base64," in html
    assert not re.search(r"""(href|src)\s*=\s*["']?https?:""", html), "the page must not link off the disk"
    assert "http://" not in html.replace("https://example.com/not-a-link", "") and "https://" not in html.replace("https://example.com/not-a-link", "")
    assert 'id="gate"' in html and "NO-GO" in html and CPU_WARNING in html
    assert "rank 3 died &lt;boom&gt;" in html, "failed points are listed (escaped)"
    csv = pd.read_csv(out / "results.csv")
    assert csv.loc[csv["world_size"] == 8, "projected"].tolist() == [True, False]
    assert csv.loc[csv["status"] == "ok", "projected"].sum() == 1
    data = json.loads((out / "results.json").read_text())
    assert set(data) == {"kind", "gate", "environment", "rows", "projection_errors", "collectives"} and data["kind"] == "scaling" and data["gate"]["verdict"] == "NO-GO" and len(data["rows"]) == 5
    assert data["rows"][4]["latency_s"] is None, "NaN is stored as null"


def test_baseline_and_missing_columns(tmp_path):
    results = _results().drop(columns=["dispatch_us_per_step", "cost_model", "efficiency"])
    baseline = _results().assign(latency_s=lambda f: f["latency_s"] * 0.5)
    write_scaling_report(results, {"verdict": "GO", "criteria": []}, {}, tmp_path / "s", baseline)
    html = (tmp_path / "s" / "index.html").read_text()
    assert 'id="baseline"' in html and "2.000" in html  # now / baseline latency ratio
    assert "GO" in html and CPU_WARNING in html


def test_index_links_sub_reports_with_verdicts(tmp_path):
    root = tmp_path / "reports"
    index = write_index(root)
    html = index.read_text()
    for href in ("correctness/index.html", "scaling/index.html", "scaling/index.html#gate"):
        assert f'href="{href}"' in html
    assert html.count("not run yet") == 3
    write_scaling_report(_results(), GATE, ENV, root / "scaling")
    (root / "correctness").mkdir()
    (root / "correctness" / "results.json").write_text(json.dumps({"verdict": "PASS", "summary": {"n_failed": 0, "n_tests": 3}}))
    html = write_index(root).read_text()
    assert "NO-GO" in html and "PASS" in html and "not run yet" not in html
    assert "http://" not in html and "https://" not in html


@pytest.mark.parametrize("module,target", [(scaling_report, "_breakdown_plot"), (atomic, "write_bytes_atomic")])  # rendering; publishing
def test_failure_in_the_middle_keeps_previous_report(tmp_path, monkeypatch, module, target):
    out = tmp_path / "scaling"
    write_scaling_report(_results(), GATE, ENV, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(module, target, boom)
    with pytest.raises(KeyboardInterrupt):
        write_scaling_report(_results().iloc[:2], {"verdict": "GO", "criteria": []}, ENV, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["scaling"], "no staging directory may be left behind"


def _with_projection(frame):
    """A measured and a projected row of the same point at world size 2 (+50 % projection error)."""
    proj = frame[frame["world_size"] == 2].assign(projected=True, latency_s=0.009, cost_model="fitted")
    return pd.concat([frame, proj], ignore_index=True)


def test_projection_error_of_this_run_and_of_the_baseline(tmp_path):
    results = _with_projection(_results())
    baseline = _results().assign(projected=lambda f: f["world_size"] == 4, latency_s=lambda f: f["latency_s"] * 0.75)
    errors = scaling_analysis.projection_errors(scaling_analysis.normalise(results), baseline)
    assert list(errors["projection"]) == ["this run", "baseline"]
    assert errors.loc[0, "world_size"] == 2 and errors.loc[0, "error"] == pytest.approx(0.009 / 0.006 - 1)
    assert errors.loc[1, "world_size"] == 4 and errors.loc[1, "error"] == pytest.approx(-0.25)
    write_scaling_report(results, GATE, ENV, tmp_path / "s", baseline)
    html = (tmp_path / "s" / "index.html").read_text()
    assert 'id="projection-error"' in html and "+50.0%" in html and "-25.0%" in html
    data = json.loads((tmp_path / "s" / "results.json").read_text())
    assert [round(e["error"], 6) for e in data["projection_errors"]] == [0.5, -0.25]


def test_no_projection_error_without_a_pair(tmp_path):
    assert scaling_analysis.projection_errors(scaling_analysis.normalise(_results())).empty
    write_scaling_report(_results(), GATE, ENV, tmp_path / "s")
    assert "No point was both measured and projected" in (tmp_path / "s" / "index.html").read_text()


def test_collectives_cost_model_and_layer_benchmarks(tmp_path):
    rows = [{"op": op, "bytes": b, "requested_bytes": b, "world_size": 2, "dtype": "float32", "iters": 3, "latency_us": 100.0 + b / 1e3,
             "latency_p90_us": 120.0 + b / 1e3, "algbw_GBps": b / (100.0 + b / 1e3) / 1e3, "busbw_GBps": 1.0, "backend": "gloo", "device": "cpu", "note": None}
            for op in ("all_reduce", "all_gather") for b in (1024, 65536)]
    fit = {"all_reduce": {"latency_us": 100.0, "busbw_GBps": 1.0, "by_world_size": {2: {"latency_us": 99.0, "busbw_GBps": 1.1}}}}
    model = {**fit, "source": "fitted to this run's gloo collective benchmark", "reason": "same backend", "fit": fit}
    out = tmp_path / "s"
    out.mkdir()
    bench = {"datetime": "2025-01-01T00:00:00", "benchmarks": [{"name": "test_layer_forward[ParallelMLP-2]",
             "stats": {"median": 0.002, "iqr": 0.0001, "rounds": 3}, "extra_info": {"slowest_rank_us_per_forward": 150.0}}]}
    (out / scaling_report.LAYER_BENCHMARKS).write_text(json.dumps(bench))
    write_scaling_report(_with_projection(_results()), GATE, ENV, out, collectives={"rows": rows, "world_sizes": [2], "reason": "", "cost_model": model})
    html = (out / "index.html").read_text()
    assert "fitted to this run&#39;s gloo collective benchmark" in html and "99" in html  # the per-world-size fit is listed
    assert "test_layer_forward[ParallelMLP-2]" in html and 'href="layer-benchmarks.json"' in html
    assert json.loads((out / scaling_report.LAYER_BENCHMARKS).read_text()) == bench, "carried into the new report directory"
    assert len(pd.read_csv(out / "collectives.csv")) == 4
    assert html.count("data:image/png;base64,") >= 6  # five result plots + the collective plot
    data = json.loads((out / "results.json").read_text())
    assert data["collectives"]["cost_model"]["source"].startswith("fitted") and len(data["collectives"]["rows"]) == 4
    write_scaling_report(_results(), GATE, ENV, tmp_path / "t", collectives={"rows": [], "reason": "no collective benchmark: 1 GPU(s)", "cost_model": None})
    assert "no collective benchmark: 1 GPU(s)" in (tmp_path / "t" / "index.html").read_text()


def test_index_never_overwrites_a_page_tpgate_did_not_write(tmp_path):
    """`tpgate scaling --out ~/scaling` writes the index into ~: a user's own index.html stays."""
    (tmp_path / "index.html").write_text("<html>my homepage</html>")
    assert write_index(tmp_path) is None
    assert (tmp_path / "index.html").read_text() == "<html>my homepage</html>"
    (tmp_path / "index.html").unlink()
    assert write_index(tmp_path) is not None and write_index(tmp_path) is not None  # its own page it updates


def _priced_decode_rows():
    """A measured world-size-1 decode point and its world-size-4 projection priced by projection_columns."""
    from harness.perf_model import DEFAULTS, projection_columns

    records = [{"kind": "all_reduce", "nbytes": 8192}] * 65 + [{"kind": "all_gather", "nbytes": 8}]
    tp_s, cols = projection_columns(0.0022 * 16, records, 4, DEFAULTS, "low-latency", "cuda", "bfloat16", 16)
    one = {**_row(1, 0.0048, phase="decode"), "device": "cuda", "dtype": "bfloat16"}
    proj = {**_row(4, tp_s / 16, projected=True, phase="decode"), "device": "cuda", "dtype": "bfloat16", "null_latency_s": 0.0022, **cols}
    return pd.DataFrame([one, proj]), cols


def _check_variants(variants):
    frame, cols = _priced_decode_rows()
    v = variants(scaling_analysis.normalise(frame))
    assert len(v) == 1
    row = v.iloc[0]
    assert row["speedup"] == pytest.approx(0.0048 / (0.0022 + cols["comm_exposed_s"]))
    assert row["speedup_low_latency"] == pytest.approx(row["speedup"])  # the row was priced low-latency
    assert row["speedup_nccl"] == pytest.approx(0.0048 / cols["latency_nccl_s"]) and row["speedup_nccl"] < row["speedup_low_latency"]
    assert row["speedup_no_overlap"] == pytest.approx(0.0048 / cols["latency_no_overlap_s"])


def test_projection_variants_price_each_way_and_the_report_shows_them(tmp_path):
    from harness.perf_model import DEFAULTS
    from harness.scaling_analysis import projection_variants

    _check_variants(projection_variants)
    frame, _ = _priced_decode_rows()
    out = tmp_path / "scaling"
    write_scaling_report(frame, GATE, ENV, out, collectives={"rows": [], "reason": "one GPU", "cost_model": DEFAULTS.to_dict()})
    html = (out / "index.html").read_text()
    assert 'id="overlap-latency"' in html and "one_shot x65" in html and "sglang PR #2904" in html and "alt=\"all-reduce latency" in html
    stored = json.loads((out / "results.json").read_text())["rows"][1]
    assert stored["all_reduce_pricing"] == "low-latency" and stored["latency_nccl_s"] > stored["latency_low_latency_s"]


def test_projection_variants_check_rejects_swapped_pricings():
    from harness import scaling_analysis

    def swapped(r):  # the NCCL and low-latency columns read the wrong way round
        return scaling_analysis.projection_variants(r.rename(columns={"latency_nccl_s": "latency_low_latency_s", "latency_low_latency_s": "latency_nccl_s"}))

    with pytest.raises(AssertionError):
        _check_variants(swapped)
