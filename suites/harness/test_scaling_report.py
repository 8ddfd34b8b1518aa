"""Scaling report (files, self-containment, projected/failed marking, atomic publication) and the reports index."""
from __future__ import annotations

import json
import re

import numpy as np
import pandas as pd
import pytest

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
    assert set(data) == {"gate", "environment", "rows"} and data["gate"]["verdict"] == "NO-GO" and len(data["rows"]) == 5
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


@pytest.mark.parametrize("target", ["_breakdown_plot", "write_bytes_atomic"])
def test_failure_in_the_middle_keeps_previous_report(tmp_path, monkeypatch, target):
    out = tmp_path / "scaling"
    write_scaling_report(_results(), GATE, ENV, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}

    def boom(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(scaling_report, target, boom)
    with pytest.raises(KeyboardInterrupt):
        write_scaling_report(_results().iloc[:2], {"verdict": "GO", "criteria": []}, ENV, out)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["scaling"], "no staging directory may be left behind"
