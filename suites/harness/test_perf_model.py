"""harness.perf_model: pricing against hand-computed figures, the fit's round trip, and mutants
of the pricing rule (the class of bug a drifted copy carried) that the figures reject."""
from __future__ import annotations

import json
import math

import pytest

from harness import perf_model
from harness.perf_model import DEFAULTS, CostModel, OpCost, fit_cost_model, price_collectives

# DEFAULTS at world size 4, by hand: all_reduce of a 1 MB tensor: 15 us + 1e6 B * 2*3/4 / 360e3 B/us = 15 + 25/6 us;
# all_gather whose ranks each contribute 250 kB (nccl-tests size 1 MB): 12 us + 1e6 * 3/4 / 360e3 = 12 + 25/12 us.
RECORDS = [{"kind": "all_reduce", "nbytes": 1_000_000}, {"kind": "all_gather", "nbytes": 250_000}, {"kind": "broadcast", "nbytes": 8}]
HAND_S = 33.25e-6  # 15 + 12 + 25/6 + 25/12 = 33.25 us (broadcast: not priced)


def _check_pricing():
    assert price_collectives(RECORDS, 4, DEFAULTS, "nccl").transfer_s == pytest.approx(HAND_S, rel=1e-12)
    assert price_collectives(RECORDS, 1, DEFAULTS, "nccl").transfer_s == 0.0
    # a fitted alpha below zero (noise) is no credit: 1e6 B * 1 / 100e3 B/us = 10 us at world size 2
    assert CostModel({"all_reduce": OpCost(-5.0, 100.0)}).collective_us("all_reduce", 1_000_000, 2) == pytest.approx(10.0, rel=1e-12)


def test_pricing_matches_hand_computed_figures():
    _check_pricing()


MUTANTS = {
    "all_reduce factor (n-1)/n, like all_gather": ("busbw_factor", lambda op, n: (n - 1) / n),
    "all_gather priced at the per-rank input": ("nccl_tests_bytes", lambda op, nbytes, n: nbytes),
    "latency read as ms": ("busbw_factor", None),
}


@pytest.mark.parametrize("name", MUTANTS)
def test_pricing_check_rejects_mutants(name, monkeypatch):
    attr, bad = MUTANTS[name]
    if bad is None:  # units: alpha taken as ms, the drift between the two pricing copies this module replaced
        real = CostModel.collective_us
        monkeypatch.setattr(CostModel, "collective_us", lambda self, op, nbytes, ws, algorithm="nccl": real(self, op, nbytes, ws, algorithm) + (
            999 * max(0.0, self.params(op, ws).latency_us) if ws > 1 else 0.0))
    else:
        monkeypatch.setattr(perf_model, attr, bad)
    with pytest.raises(AssertionError):
        _check_pricing()


def test_fit_round_trips_through_json():
    truth = {2: OpCost(20.0, 50.0), 4: OpCost(45.0, 40.0)}
    rows = [{"op": "all_reduce", "bytes": b, "world_size": ws, "latency_us": p.latency_us + b * perf_model.busbw_factor("all_reduce", ws) / (p.busbw_GBps * 1e3)}
            for ws, p in truth.items() for b in (1 << 10, 1 << 16, 1 << 20)]
    fit = fit_cost_model(rows, per_world_size=True)
    for ws, p in truth.items():  # each world size's own fit recovers its parameters, and pricing uses it
        own = fit.by_world_size["all_reduce"][ws]
        assert math.isclose(own.latency_us, p.latency_us, rel_tol=1e-9) and math.isclose(own.busbw_GBps, p.busbw_GBps, rel_tol=1e-9)
        assert fit.collective_us("all_reduce", 1 << 20, ws) == pytest.approx(rows[[r["world_size"] for r in rows].index(ws) + 2]["latency_us"])
    priced = CostModel({**DEFAULTS.ops, **fit.ops}, fit.by_world_size, "fitted", "measured", fit)
    stored = json.loads(json.dumps(priced.to_dict()))  # JSON turns the world sizes into strings
    assert set(stored) == {"all_reduce", "all_gather", "reduce_scatter", "source", "reason", "fit"} and "fit" not in stored["fit"]
    assert CostModel.from_dict(stored) == priced
    assert CostModel.from_dict(DEFAULTS.to_dict()) == DEFAULTS


# --------------------------------------------------------------------------- harness.timing


def _check_percentile(percentile):
    ten = [7, 1, 9, 3, 5, 2, 10, 4, 8, 6]  # unsorted on purpose
    assert percentile(ten, 0.9) == 9  # nearest rank: ceil(0.9 * 10) = 9th smallest, not the maximum
    assert percentile(ten, 0.5) == 5 and percentile(ten, 1.0) == 10 and percentile(ten, 0.01) == 1
    assert percentile(list(range(1, 21)), 0.9) == 18 and percentile([4.0], 0.99) == 4.0


def test_percentile_is_nearest_rank():
    from harness.timing import percentile

    _check_percentile(percentile)


@pytest.mark.parametrize("mutant", [
    lambda v, q: sorted(v)[min(len(v) - 1, int(q * len(v)))],  # the floor-index copy sweep.py and bench.py had: p90 of 10 = the max
    lambda v, q: v[max(0, math.ceil(q * len(v)) - 1)],  # forgets to sort
])
def test_percentile_check_rejects_mutants(mutant):
    with pytest.raises(AssertionError):
        _check_percentile(mutant)


def test_time_calls_times_each_call_and_refuses_bad_iters():
    from impl.architecture import TPConfigError
    from harness.timing import time_calls

    calls = []
    times = time_calls(lambda: calls.append(1), 3, "cpu")
    assert len(times) == 3 and len(calls) == 3 and all(t >= 0 for t in times)
    with pytest.raises(TPConfigError) as e:
        time_calls(lambda: None, 0, "cpu")
    assert e.value.argument == "iters"


# --------------------------------------------------------------------------- harness.points


def _points(dtype, latencies, p90_spread=0.01):
    import pandas as pd

    return pd.DataFrame([{"implementation": "reference", "preset": "tiny", "phase": "prefill", "batch": 2, "prompt": 16, "steps": 0, "world_size": ws,
                          "device": "cpu", "dtype": dtype, "projected": False, "status": "ok", "latency_s": lat, "latency_p90_s": lat * (1 + p90_spread)}
                         for ws, lat in latencies.items()])


def _check_keys():
    import pandas as pd

    from harness.gate import REGRESSION, GateConfig, _regression
    from harness.scaling_analysis import add_speedups, normalise, projection_errors

    now = _points("bfloat16", {1: 1.0, 2: 0.6})
    faster_float32 = _points("float32", {1: 0.5, 2: 0.3})  # 2x faster, in another dtype: not this run's baseline
    regression = _regression(now, faster_float32, GateConfig())
    assert regression["name"] == REGRESSION and regression["status"] == "INCOMPLETE" and "dtype" in regression["note"]
    assert _regression(now, _points("bfloat16", {1: 0.5, 2: 0.3}), GateConfig())["status"] == "FAIL"  # the same point 2x faster: a regression
    # speedups divide by world size 1 of the same dtype: bfloat16 1.0 / 0.6, float32 0.5 / 0.3
    both = add_speedups(pd.concat([now, faster_float32], ignore_index=True))
    assert list(both["speedup"].round(6)) == [1.0, round(1.0 / 0.6, 6), 1.0, round(0.5 / 0.3, 6)]
    # a projection priced for float32 is no error estimate of a bfloat16 measurement
    projected = faster_float32.assign(projected=True)
    assert projection_errors(normalise(now), projected).empty
    assert len(projection_errors(normalise(now), projected.assign(dtype="bfloat16"))) == 2


def test_point_key_keeps_dtypes_apart():
    _check_keys()


def test_point_key_check_rejects_a_key_without_dtype(monkeypatch):
    from harness import points

    # the report's baseline join used to drop dtype from the key; gate and report now share the one key
    monkeypatch.setattr(points, "POINT_KEY", [k for k in points.POINT_KEY if k != "dtype"])
    with pytest.raises(AssertionError):
        _check_keys()


def test_regression_against_a_baseline_lacking_key_columns_is_incomplete():
    from harness.gate import GateConfig, _regression

    # read_baseline accepts a results.csv holding only scaling.BASELINE_COLUMNS; the gate used to raise KeyError on it after the sweep
    minimal = _points("float32", {1: 0.5}).drop(columns=["batch", "prompt", "steps", "dtype", "latency_p90_s"])
    criterion = _regression(_points("float32", {1: 1.0}), minimal, GateConfig())
    assert criterion["status"] == "INCOMPLETE" and "['batch', 'prompt', 'steps', 'dtype']" in criterion["note"]


# --------------------------------------------------------------------------- latency tables, algorithms, overlap

from harness.perf_model import LatencyTable, merge_tables, price_collectives  # noqa: E402

TABLE = LatencyTable(((1024, 5.0), (8192, 6.0), (65536, 20.0)), "by hand")


def _check_table():
    for b, us in TABLE.points:  # exact at its points
        assert TABLE.us(b) == us
    assert TABLE.us(1) == 5.0  # below the smallest: the latency floor
    # log-log linear: halfway in log(bytes) between 1024 and 8192 is the geometric mean of 5 and 6
    assert TABLE.us(int(round(math.sqrt(1024 * 8192)))) == pytest.approx(math.sqrt(5.0 * 6.0), rel=1e-4)
    sizes = [int(1024 * 2 ** (k / 8)) for k in range(0, 6 * 8 + 1)]  # 1 KiB .. 64 KiB
    priced = [TABLE.us(b) for b in sizes]
    assert all(a <= b for a, b in zip(priced, priced[1:]))  # monotone between the points
    # beyond the largest: the line through the two largest points (alpha-beta)
    assert TABLE.us(65536 + 57344) == pytest.approx(20.0 + 14.0, rel=1e-12)


def test_latency_table_interpolates_log_log_and_extrapolates_alpha_beta():
    _check_table()


TABLE_MUTANTS = {
    "linear in bytes between points": lambda self, n, slope=0.0: (
        self.points[0][1] if n <= self.points[0][0] else next(t0 + (t1 - t0) * (n - b0) / (b1 - b0) for (b0, t0), (b1, t1) in zip(self.points, self.points[1:]) if n <= b1)
        if n <= self.points[-1][0] else self.points[-1][1]),
    "flat beyond the largest point": lambda self, n, slope=0.0: REAL_US(self, min(n, self.points[-1][0])),
    "nearest point": lambda self, n, slope=0.0: min(self.points, key=lambda p: abs(math.log(n / p[0])))[1],
}
REAL_US = LatencyTable.us


@pytest.mark.parametrize("name", TABLE_MUTANTS)
def test_latency_table_check_rejects_mutants(name, monkeypatch):
    monkeypatch.setattr(LatencyTable, "us", TABLE_MUTANTS[name])
    with pytest.raises(AssertionError):
        _check_table()


def test_measured_table_is_made_monotone_and_a_bad_table_is_refused():
    from impl.architecture import TPConfigError

    t = LatencyTable.measured([(4096, 9.0), (1024, 5.0), (2048, 4.0), (1024, 6.0)], "noisy")
    assert t.points == ((1024, 6.0), (2048, 6.0), (4096, 9.0))  # slowest of a repeated size; never cheaper when larger
    with pytest.raises(TPConfigError):
        LatencyTable(((1024, 6.0), (2048, 4.0)))


# alpha-beta at world size 2: 10 us + 1e6 B * factor 1 / 100e3 B/us = 20 us per 1 MB all-reduce; matmul at 1e12 FLOP/s
OVERLAP_MODEL = CostModel({"all_reduce": OpCost(10.0, 100.0)})
CHUNK = {"kind": "all_reduce", "nbytes": 1_000_000}


def _check_overlap():
    flop_s = 1e12
    for compute_us in (5.0, 30.0):  # compute shorter, then longer, than the 20 us transfer
        priced = price_collectives([{**CHUNK, "overlap_flops": compute_us * 1e6}], 2, OVERLAP_MODEL, flop_s=flop_s)
        assert priced.transfer_s == pytest.approx(20e-6, rel=1e-12)
        # the shard's own time already holds the compute: compute + exposed = max(compute, transfer)
        assert compute_us * 1e-6 + priced.exposed_s == pytest.approx(max(compute_us, 20.0) * 1e-6, rel=1e-12)
    # a 4-chunk pipeline: chunk 0 (fill) and the last (drain) overlap nothing, the middle ones hide behind 30 us each
    pipeline = [{**CHUNK, "overlap_flops": 0}, {**CHUNK, "overlap_flops": 30e6}, {**CHUNK, "overlap_flops": 30e6}, dict(CHUNK)]
    priced = price_collectives(pipeline, 2, OVERLAP_MODEL, flop_s=flop_s)
    assert priced.transfer_s == pytest.approx(80e-6, rel=1e-12)  # without overlap: every transfer
    assert priced.exposed_s == pytest.approx(40e-6, rel=1e-12)  # with: fill and drain


def test_overlapped_record_costs_max_of_compute_and_transfer_and_fill_drain_are_exposed():
    _check_overlap()


OVERLAP_MUTANTS = {
    "compute and transfer summed": lambda t, flops, rate: t + flops / rate,
    "negative credit (no clamp)": lambda t, flops, rate: t - flops / rate,
    "a record without overlap taken as hidden (fill/drain ignored)": lambda t, flops, rate: max(0.0, t - (flops / rate if flops else t)),
    "overlap ignored": lambda t, flops, rate: t,
}


@pytest.mark.parametrize("name", OVERLAP_MUTANTS)
def test_overlap_check_rejects_mutants(name, monkeypatch):
    monkeypatch.setattr(perf_model, "exposed_transfer_s", OVERLAP_MUTANTS[name])
    with pytest.raises(AssertionError):
        _check_overlap()


def _check_low_latency():
    from impl.low_latency import ONE_SHOT_MAX_BYTES, TWO_SHOT_MAX_BYTES

    def one(nbytes, pricing, ws=4):
        return price_collectives([{"kind": "all_reduce", "nbytes": nbytes}], ws, DEFAULTS, pricing)

    small, mid, large = one(ONE_SHOT_MAX_BYTES, "low-latency"), one(2 * ONE_SHOT_MAX_BYTES, "low-latency"), one(TWO_SHOT_MAX_BYTES + 2, "low-latency")
    assert small.algorithms == {"one_shot": 1} and mid.algorithms == {"two_shot": 1} and large.algorithms == {"nccl": 1}
    assert small.transfer_s == pytest.approx(1e-6 * DEFAULTS.table("all_reduce", "one_shot", 4).us(ONE_SHOT_MAX_BYTES), rel=1e-12)
    assert mid.transfer_s == pytest.approx(1e-6 * DEFAULTS.table("all_reduce", "two_shot", 4).us(2 * ONE_SHOT_MAX_BYTES), rel=1e-12)
    assert large.transfer_s == one(TWO_SHOT_MAX_BYTES + 2, "nccl").transfer_s  # beyond two-shot: NCCL's price
    assert one(8192, "nccl").algorithms == {"nccl": 1} and one(8192, "nccl").transfer_s == pytest.approx(1e-6 * (15.0 + 8192 * 1.5 / 360e3))
    assert small.transfer_s < one(ONE_SHOT_MAX_BYTES, "nccl").transfer_s  # a decode-sized message: one-shot beats the ring
    # no two-shot figures at world size 2: priced as NCCL, and said so
    fallback = one(2 * ONE_SHOT_MAX_BYTES, "low-latency", ws=2)
    assert fallback.algorithms == {"nccl (no table)": 1} and fallback.transfer_s == one(2 * ONE_SHOT_MAX_BYTES, "nccl", ws=2).transfer_s


def test_low_latency_pricing_follows_choose_all_reduce():
    _check_low_latency()


@pytest.mark.parametrize("mutant", [
    lambda nbytes, ws: "nccl",  # the low-latency setting ignored
    lambda nbytes, ws: "one_shot",  # one-shot at every size
    lambda nbytes, ws: "two_shot" if nbytes <= 256 * 1024 else "one_shot",  # the thresholds swapped
])
def test_low_latency_check_rejects_mutants(mutant, monkeypatch):
    monkeypatch.setattr(perf_model, "choose_all_reduce", mutant)
    with pytest.raises(AssertionError):
        _check_low_latency()


def test_tables_round_trip_and_old_cost_models_load():
    rows = [{"op": "all_reduce", "bytes": b, "world_size": 4, "latency_us": 10.0 + b / 1e5, "backend": "nccl"} for b in (1 << 10, 1 << 16, 1 << 20)]
    fit = fit_cost_model(rows, per_world_size=True)
    assert fit.table("all_reduce", "nccl", 4).points == tuple((r["bytes"], r["latency_us"]) for r in rows)
    priced = CostModel({**DEFAULTS.ops, **fit.ops}, fit.by_world_size, "fitted", "measured", fit, merge_tables(DEFAULTS.tables, fit.tables))
    stored = json.loads(json.dumps(priced.to_dict()))
    assert "tables" in stored and CostModel.from_dict(stored) == priced
    assert priced.table("all_reduce", "one_shot", 4) == DEFAULTS.table("all_reduce", "one_shot", 4)  # defaults kept where nothing was measured
    # a results.json written before latency tables: loads as alpha-beta only and prices as it did
    from pathlib import Path

    old = json.loads((Path(__file__).resolve().parents[2] / "reports/baselines/scaling-h200_driver580.159_torch2.11-cu130_nccl2.28.9_compiled-decode-split-attention"
                      / "results.json").read_text())["collectives"]["cost_model"]
    assert "tables" not in old
    loaded = CostModel.from_dict(old)
    assert loaded.tables == {} and loaded.collective_us("all_reduce", 8192, 4) == pytest.approx(15.0 + 8192 * 1.5 / 360e3)
