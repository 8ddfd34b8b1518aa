"""The gate's verdict logic and the sweep definition's validation."""
from __future__ import annotations

import json

import pandas as pd
import pytest

from harness.gate import GateConfig, evaluate_gate
from harness.sweep import PRESETS, Phase, collective_time_s, load_config
from impl.architecture import TPConfigError

WORKLOAD = {"preset": "llama3-8b", "phase": "prefill", "implementation": "reference"}


def _row(ws, device="cuda", projected=False, speedup=3.9, comm=0.05, dispatch=0.01, latency=1.0, p90=1.02):
    return {"implementation": "reference", "preset": "llama3-8b", "phase": "prefill", "batch": 8, "prompt": 2048, "steps": 0, "world_size": ws,
            "device": device, "dtype": "bfloat16", "projected": projected, "status": "ok", "speedup": speedup, "exposed_comm": comm,
            "dispatch_fraction": dispatch, "latency_s": latency, "latency_p90_s": p90}


@pytest.fixture
def passing_inputs(tmp_path):
    (tmp_path / "c.json").write_text(json.dumps({"verdict": "PASS"}))
    (tmp_path / "cov.json").write_text(json.dumps({"totals": {"percent_covered": 93.0}}))
    results = pd.DataFrame([_row(1, speedup=1.0), _row(4)])
    return results, tmp_path / "c.json", tmp_path / "cov.json", results.copy()


def test_all_criteria_measured_and_met_is_go(passing_inputs):
    results, corr, cov, base = passing_inputs
    gate = evaluate_gate(results, GateConfig(), corr, cov, base)
    assert gate["verdict"] == "GO", gate["criteria"]


@pytest.mark.parametrize("change,verdict,criterion", [
    (dict(speedup=3.5), "NO-GO", "speedup at world size 4"),
    (dict(comm=0.12), "NO-GO", "exposed communication at world size 4"),
    (dict(dispatch=0.2), "NO-GO", "dispatch overhead at world size 4"),
    (dict(projected=True), "INCOMPLETE", "speedup at world size 4"),  # projections never count towards GO
    (dict(device="cpu"), "INCOMPLETE", "speedup at world size 4"),  # CPU points are not GPU evidence
])
def test_each_criterion_can_stop_the_release(passing_inputs, change, verdict, criterion):
    results, corr, cov, base = passing_inputs
    results = pd.DataFrame([_row(1, speedup=1.0), _row(4, **change)])
    gate = evaluate_gate(results, GateConfig(), corr, cov, base)
    assert gate["verdict"] == verdict
    assert next(c for c in gate["criteria"] if c["name"] == criterion)["status"] == ("FAIL" if verdict == "NO-GO" else "INCOMPLETE")


def test_missing_evidence_is_incomplete_never_go(passing_inputs, tmp_path):
    results, corr, cov, base = passing_inputs
    assert evaluate_gate(results, GateConfig(), tmp_path / "none.json", cov, base)["verdict"] == "INCOMPLETE"
    assert evaluate_gate(results, GateConfig(), corr, None, base)["verdict"] == "INCOMPLETE"
    assert evaluate_gate(results, GateConfig(), corr, cov, None)["verdict"] == "INCOMPLETE"


def test_regression_beyond_noise_fails_within_noise_passes(passing_inputs):
    results, corr, cov, base = passing_inputs
    slower = results.copy()
    slower.loc[slower["world_size"] == 4, "latency_s"] = 1.3  # +30%, spread ~2%: a regression
    slower.loc[slower["world_size"] == 4, "latency_p90_s"] = 1.32
    assert evaluate_gate(slower, GateConfig(), corr, cov, base)["verdict"] == "NO-GO"
    noisy = results.copy()
    noisy.loc[:, "latency_s"] = 1.2
    noisy.loc[:, "latency_p90_s"] = 1.2 * 1.15  # 15% spread -> 45% allowed
    assert evaluate_gate(noisy, GateConfig(), corr, cov, base)["verdict"] == "GO"


@pytest.mark.parametrize("table,argument", [
    ({"presets": ["gpt-17"]}, "presets"),
    ({"implementations": ["jax"]}, "implementations"),
    ({"world_sizes": [0]}, "world_sizes"),
    ({"phases": [{"kind": "train", "batch": 1, "prompt": 1}]}, "phases.kind"),
    ({"phases": [{"kind": "decode", "batch": 1, "prompt": 4}]}, "phases.steps"),
    ({"phases": [{"knd": "decode"}]}, "phases"),
    ({"dtype": "int8"}, "dtype"),
    ({"colour": "blue"}, "[tool.tpgate.scaling]"),
    ({"presets": ["llama2-13b"], "world_sizes": [1, 3]}, "world_sizes"),
])
def test_malformed_sweep_definition_is_named(table, argument):
    with pytest.raises(TPConfigError) as info:
        load_config(table)
    assert info.value.argument == argument


def test_cost_model_prices_collectives_like_nccl_tests():
    model = {"all_reduce": {"latency_us": 10.0, "busbw_GBps": 100.0}}
    records = [{"kind": "all_reduce", "nbytes": 1_000_000}]
    # ring all-reduce on 4 ranks moves 2*(n-1)/n of the buffer per rank at bus bandwidth
    assert collective_time_s(records, 4, model) == pytest.approx(10e-6 + 1e6 * 1.5 / 100e9)
    assert collective_time_s(records, 1, model) == 0.0


def test_presets_shard_at_1_2_4():
    for config in PRESETS.values():
        for tp in (1, 2, 4):
            config.check_tp(tp)
    assert Phase("decode", 16, 8, 100).tokens() == 1600


def test_cpu_sweep_measures_every_point(worlds):
    from harness.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(world_sizes=(1, 2), phases=(Phase("prefill", 1, 8), Phase("decode", 1, 4, 3)), warmup=0, repeats=2).validate()
    frame = run_sweep(cfg, lambda n: worlds[n])
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    layers = PRESETS["tiny"].num_layers
    tp2 = frame[frame["world_size"] == 2]
    # per forward: 2 all-reduces per block + the embedding's all-reduce + the LM head's all-gather
    assert (tp2["collectives_per_step"] == 2 * layers + 2).all()
    assert (frame[frame["world_size"] == 1]["collectives_per_step"] == 0).all()
    assert frame["exposed_comm"].between(0, 1).all() and (frame["latency_s"] > 0).all()
    assert (frame[frame["world_size"] == 1]["speedup"] == 1.0).all()
    assert not frame["projected"].any()


def test_failed_point_is_recorded_and_sweep_goes_on(worlds, monkeypatch):
    import harness.sweep as sweep

    cfg = sweep.SweepConfig(world_sizes=(1,), phases=(Phase("prefill", 1, 4), Phase("decode", 1, 4, 2)), warmup=0, repeats=1).validate()
    real = sweep.measure_on_rank
    calls = []

    def flaky(world_for):
        def get(n):
            world = world_for(n)
            class Proxy:
                dispatch = world.dispatch
                backend = world.backend
                def run(self, fn, *args):
                    calls.append(args[1].kind)
                    if args[1].kind == "prefill":
                        raise RuntimeError("injected failure")
                    return world.run(fn, *args)
            return Proxy()
        return get

    frame = sweep.run_sweep(cfg, flaky(lambda n: worlds[n]))
    assert list(frame["status"]) == ["failed", "ok"]
    assert "injected failure" in frame.loc[0, "error"]
    assert real is sweep.measure_on_rank
