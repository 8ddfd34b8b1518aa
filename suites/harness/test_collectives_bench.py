"""harness.collectives: the collective microbenchmark's rows, factors, sizes and cost-model fit.

Fast: gloo worlds of 1, 2 and 4 ranks from the session `worlds` fixture, tiny messages,
iters=3. Nothing here asserts a speed; latencies are only checked to be positive.
"""
from __future__ import annotations

import math

import pytest

from harness.collectives import OPS, bench_collectives, decode_and_prefill_sizes, message_bytes
from harness.perf_model import CostModel, busbw_factor, fit_cost_model
from impl.architecture import TPConfigError

ROW_KEYS = {"op", "algorithm", "captured", "bytes", "requested_bytes", "world_size", "dtype", "iters", "latency_us", "latency_p90_us", "algbw_GBps", "busbw_GBps",
            "backend", "device", "note"}
SIZES = [64, 1002, 4096]


# --------------------------------------------------------------------------- factors and sizes


@pytest.mark.parametrize("n", range(1, 9))
def test_busbw_factors_are_nccl_tests(n):
    assert busbw_factor("all_reduce", n) == pytest.approx(2 * (n - 1) / n)
    assert busbw_factor("all_gather", n) == pytest.approx((n - 1) / n)
    assert busbw_factor("reduce_scatter", n) == pytest.approx((n - 1) / n)


def test_busbw_factor_known_values_and_bad_input():
    assert (busbw_factor("all_reduce", 2), busbw_factor("all_reduce", 4), busbw_factor("all_reduce", 8)) == (1.0, 1.5, 1.75)
    assert (busbw_factor("all_gather", 2), busbw_factor("reduce_scatter", 8), busbw_factor("all_gather", 1)) == (0.5, 0.875, 0.0)
    with pytest.raises(TPConfigError) as e:
        busbw_factor("broadcast", 2)
    assert e.value.argument == "op"
    with pytest.raises(TPConfigError) as e:
        busbw_factor("all_reduce", 0)
    assert e.value.argument == "world_size"


def test_message_bytes_rounds_up_to_whole_elements_per_rank():
    assert message_bytes("all_reduce", 1001, 4, 2) == 1002
    assert message_bytes("all_gather", 1002, 4, 2) == 1008  # 4 ranks x 2 bytes
    assert message_bytes("reduce_scatter", 1024, 4, 2) == 1024
    assert message_bytes("all_gather", 1, 4, 4) == 16  # never zero


def test_decode_and_prefill_sizes():
    sizes = decode_and_prefill_sizes(4096)
    assert sizes == sorted(set(sizes))
    for expected in (1 * 4096 * 2, 16 * 4096 * 2, 8 * 2048 * 4096 * 2, 1 << 10, 64 << 20):
        assert expected in sizes
    assert all(s >= 1 << 10 for s in sizes)
    assert decode_and_prefill_sizes(8, batch_decode=(2,), prefill_tokens=4, elsize=4)[:2] == [32 * 2, 128]
    for kwargs, argument in (({"hidden": 0}, "hidden"), ({"hidden": 8, "batch_decode": (0,)}, "batch_decode"),
                             ({"hidden": 8, "prefill_tokens": -1}, "prefill_tokens"), ({"hidden": 8, "elsize": 0}, "elsize")):
        with pytest.raises(TPConfigError) as e:
            decode_and_prefill_sizes(**kwargs)
        assert e.value.argument == argument


# --------------------------------------------------------------------------- real runs


@pytest.mark.parametrize("n", (2, 4))
def test_rows_schema_and_consistency(worlds, n):
    rows = bench_collectives(worlds[n], SIZES, iters=3, warmup=1)
    assert len(rows) == len(OPS) * len(SIZES)
    assert {r["op"] for r in rows} == set(OPS)
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["world_size"] == n and r["iters"] == 3 and r["dtype"] == "bfloat16"
        assert r["backend"] in ("gloo", "nccl") and r["note"] is None
        unit = 2 if r["op"] == "all_reduce" else 2 * n
        assert r["bytes"] % unit == 0 and r["bytes"] >= r["requested_bytes"] and r["bytes"] - r["requested_bytes"] < unit
        assert r["latency_us"] > 0 and r["latency_p90_us"] >= r["latency_us"]
        assert r["algbw_GBps"] == pytest.approx(r["bytes"] / r["latency_us"] / 1e3)
        assert r["busbw_GBps"] == pytest.approx(r["algbw_GBps"] * busbw_factor(r["op"], n))
    assert [r["requested_bytes"] for r in rows if r["op"] == "all_gather"] == SIZES


def test_world_of_one_has_no_bus(worlds):
    rows = bench_collectives(worlds[1], [256], dtype="float32", ops=("all_reduce", "all_gather"), iters=3, warmup=0)
    assert [r["op"] for r in rows] == ["all_reduce", "all_gather"]
    for r in rows:
        assert r["world_size"] == 1 and r["busbw_GBps"] == 0.0 and r["latency_us"] > 0
        assert "world_size 1" in r["note"]


class _SpyWorld:
    """Records every run() request; a bad argument must be refused before any."""

    world_size = 2
    tp_size = None

    def __init__(self):
        self.calls = []

    def run(self, fn, *args, **kwargs):
        self.calls.append(fn)
        raise AssertionError("a rank was asked to work despite a bad argument")


@pytest.mark.parametrize("kwargs, argument", [
    ({"sizes_bytes": []}, "sizes_bytes"),
    ({"sizes_bytes": [1024, 0]}, "sizes_bytes[1]"),
    ({"sizes_bytes": [1024, 1.5]}, "sizes_bytes[1]"),
    ({"sizes_bytes": [1024], "ops": ("all_reduce", "all_to_all")}, "ops"),
    ({"sizes_bytes": [1024], "ops": ()}, "ops"),
    ({"sizes_bytes": [1024], "iters": 0}, "iters"),
    ({"sizes_bytes": [1024], "iters": -3}, "iters"),
    ({"sizes_bytes": [1024], "warmup": -1}, "warmup"),
    ({"sizes_bytes": [1024], "dtype": "int8"}, "dtype"),
    ({"sizes_bytes": [1024], "all_reduce_algorithms": ("nccl", "ring")}, "all_reduce_algorithms"),
    ({"sizes_bytes": [1024], "all_reduce_algorithms": ()}, "all_reduce_algorithms"),
    ({"sizes_bytes": [1024], "captured": True}, "captured"),  # the spy world is on the CPU: no CUDA graphs
])
def test_bad_input_is_refused_before_any_rank_runs(kwargs, argument):
    world = _SpyWorld()
    with pytest.raises(TPConfigError) as e:
        bench_collectives(world, **kwargs)
    assert e.value.argument == argument
    assert argument in str(e.value)
    assert world.calls == []


# --------------------------------------------------------------------------- cost model


TRUE_MODEL = {"all_reduce": (12.5, 150.0), "all_gather": (7.0, 80.0), "reduce_scatter": (9.25, 95.5)}  # (alpha us, busbw GB/s)


def _synthetic_rows(world_sizes=(2, 4, 8)):
    rows = []
    for op, (alpha, busbw) in TRUE_MODEL.items():
        for n in world_sizes:
            for nbytes in [1 << k for k in range(10, 27, 2)]:
                rows.append({"op": op, "bytes": nbytes, "world_size": n, "latency_us": alpha + nbytes * busbw_factor(op, n) / (busbw * 1e3)})
    rows.append({"op": "all_reduce", "bytes": 4096, "world_size": 1, "latency_us": 1e9})  # no bus: must be ignored
    return rows


def test_fit_recovers_a_known_model_exactly():
    model = fit_cost_model(_synthetic_rows())
    assert set(model.ops) == set(TRUE_MODEL) and model.by_world_size == {}
    alpha_beta = CostModel(model.ops)  # the fit without the latency tables it also made
    for op, (alpha, busbw) in TRUE_MODEL.items():
        assert set(model.to_dict()[op]) == {"latency_us", "busbw_GBps"}
        assert math.isclose(model.ops[op].latency_us, alpha, rel_tol=1e-6)
        assert math.isclose(model.ops[op].busbw_GBps, busbw, rel_tol=1e-6)
        for n, nbytes in ((2, 3 << 20), (8, 1 << 30)):
            truth = alpha + nbytes * busbw_factor(op, n) / (busbw * 1e3)
            assert math.isclose(alpha_beta.collective_us(op, nbytes, n), truth, rel_tol=1e-6)
        # the measured table prices a measured size as measured, and beyond the largest as the line through the two largest
        for n, nbytes in ((2, 1 << 20), (8, 1 << 30)):
            assert math.isclose(model.collective_us(op, nbytes, n), alpha + nbytes * busbw_factor(op, n) / (busbw * 1e3), rel_tol=1e-9)
    assert model.collective_us("all_reduce", 1 << 20, 1) == 0.0


def test_fit_keeps_other_all_reduce_algorithms_out_of_nccls_line():
    """One-shot rows (flat, a few us) make their own table and leave NCCL's alpha-beta exactly as
    the NCCL rows alone give it; pooled, they would pull its latency down."""
    nccl = _synthetic_rows()
    one_shot = [{**r, "algorithm": "one_shot", "latency_us": 4.0 + r["bytes"] * 1e-6} for r in nccl if r["op"] == "all_reduce"]
    both, alone = fit_cost_model(nccl + one_shot), fit_cost_model(nccl)
    assert both.ops == alone.ops
    assert math.isclose(both.collective_us("all_reduce", one_shot[0]["bytes"], one_shot[0]["world_size"], "one_shot"), one_shot[0]["latency_us"])
    pooled = fit_cost_model([{**r, "algorithm": "nccl"} for r in one_shot] + nccl)  # what the filter prevents
    assert pooled.ops["all_reduce"] != alone.ops["all_reduce"]


def test_fit_of_one_world_size_matches_its_factor():
    model = fit_cost_model(_synthetic_rows(world_sizes=(4,)))
    assert math.isclose(model.ops["all_gather"].busbw_GBps, 80.0, rel_tol=1e-6)


def test_fit_refuses_what_it_cannot_fit():
    with pytest.raises(TPConfigError) as e:
        fit_cost_model([])
    assert e.value.argument == "rows"
    with pytest.raises(TPConfigError) as e:  # one size: alpha and busbw not separable
        fit_cost_model([{"op": "all_reduce", "bytes": 1024, "world_size": 2, "latency_us": 5.0}] * 3)
    assert e.value.argument == "rows"
    with pytest.raises(TPConfigError) as e:  # only world size 1: no bus to fit
        fit_cost_model([{"op": "all_reduce", "bytes": b, "world_size": 1, "latency_us": 5.0} for b in (1024, 2048)])
    assert e.value.argument == "rows"
    with pytest.raises(TPConfigError) as e:
        fit_cost_model([{"op": "all_reduce", "bytes": 1024}])
    assert e.value.argument == "rows[0]"


def test_symmetric_algorithms_give_no_row_where_the_world_cannot_run_them(worlds):
    """gloo on the CPU has no symmetric memory: only NCCL's (here gloo's) all-reduce rows come back."""
    rows = bench_collectives(worlds[2], [1 << 10, 1 << 13], ops=("all_reduce",), all_reduce_algorithms=("nccl", "one_shot", "two_shot"), iters=2, warmup=0)
    assert [(r["algorithm"], r["bytes"]) for r in rows] == [("nccl", 1 << 10), ("nccl", 1 << 13)], rows
    assert not any(r["captured"] for r in rows)


def test_fit_on_measured_rows_runs(worlds):
    rows = bench_collectives(worlds[2], [1 << 10, 1 << 14], ops=("all_reduce",), iters=3, warmup=1)
    model = fit_cost_model(rows)
    assert set(model.ops) == {"all_reduce"}
    assert model.ops["all_reduce"].busbw_GBps > 0  # inf when gloo noise makes the slope non-positive
