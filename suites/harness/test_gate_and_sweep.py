"""The gate's verdict logic and the sweep definition's validation."""
from __future__ import annotations

import json

import pandas as pd
import pytest
import torch

from harness import gate as gate_module
from harness.gate import GateConfig, evaluate_gate
from harness.perf_model import CostModel, price_collectives
from harness.sweep import PRESETS, Phase, load_config
from impl.architecture import TPConfigError

WORKLOAD = {"preset": "llama3-8b", "phase": "prefill", "implementation": "reference"}


def _row(ws, device="cuda", projected=False, speedup=3.9, comm=0.05, dispatch=0.01, latency=1.0, p90=1.02):
    return {"implementation": "reference", "preset": "llama3-8b", "phase": "prefill", "batch": 8, "prompt": 2048, "steps": 0, "world_size": ws,
            "device": device, "dtype": "bfloat16", "projected": projected, "status": "ok", "speedup": speedup, "exposed_comm": comm,
            "dispatch_fraction": dispatch, "latency_s": latency, "latency_p90_s": p90}


@pytest.fixture
def passing_inputs(tmp_path, monkeypatch):
    # the full suites, all examples and checkpoints, judging the workload's stack (reference), at the (clean)
    # commit the scaling run measured: the only correctness report that counts
    source = {"git_commit": "a" * 40, "git_dirty": False}
    run = {"pytest_args": [], "examples": 10, "examples_required": 10, "implementations": ["reference", "dtensor", "hf-tp"],
           "checkpoints": ["llama-gqa", "qwen2"], "checkpoints_required": ["llama-gqa", "qwen2"], **source}
    (tmp_path / "c.json").write_text(json.dumps({"verdict": "PASS", "run": run}))
    monkeypatch.setattr(gate_module, "checkout_source", lambda: source)
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
    ({"implementations": []}, "implementations"),
    ({"compare_projection": "yes"}, "compare_projection"),
    ({"decode_path": "fast"}, "decode_path"),
    ({"decode_path": "cuda-graph", "device": "cpu"}, "decode_path"),
])
def test_malformed_sweep_definition_is_named(table, argument):
    with pytest.raises(TPConfigError) as info:
        load_config(table)
    assert info.value.argument == argument


def test_unknown_implementation_names_the_allowed_ones():
    with pytest.raises(TPConfigError) as info:
        load_config({"implementations": ["reference", "megatron"]})
    assert info.value.argument == "implementations" and "'dtensor', 'hf-tp', 'reference'" in str(info.value)


def test_dtensor_limits_are_checked_before_any_process(monkeypatch):
    from impl.architecture import ModelConfig

    # kv heads 2 at world size 4: tpgate replicates them, the peer cannot
    monkeypatch.setitem(PRESETS, "kv2", ModelConfig(vocab_size=64, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=4, num_kv_heads=2))
    load_config({"presets": ["kv2"], "implementations": ["reference"], "world_sizes": [1, 4]})
    with pytest.raises(TPConfigError) as info:
        load_config({"presets": ["kv2"], "implementations": ["reference", "dtensor"], "world_sizes": [1, 4]})
    assert info.value.argument == "world_sizes" and "dtensor" in str(info.value) and "num_kv_heads" in str(info.value)


def test_tasks_measure_then_project():
    from harness.sweep import SweepConfig, sweep_tasks

    cfg = SweepConfig(world_sizes=(1, 2, 4), phases=(Phase("prefill", 1, 4),), device="cuda", project=True)
    assert [(ws, proj) for _, _, _, ws, proj in sweep_tasks(cfg, gpus=1)] == [(1, False), (2, True), (4, True)]
    cfg = SweepConfig(world_sizes=(1, 2, 4), phases=(Phase("prefill", 1, 4),), compare_projection=True)
    assert [(ws, proj) for _, _, _, ws, proj in sweep_tasks(cfg, gpus=0)] == [(1, False), (2, False), (2, True), (4, False), (4, True)]


def test_cost_model_prefers_the_world_sizes_own_fit():
    model = CostModel.from_dict({"all_reduce": {"latency_us": 10.0, "busbw_GBps": 100.0, "by_world_size": {2: {"latency_us": 1.0, "busbw_GBps": 1000.0}}}})
    records = [{"kind": "all_reduce", "nbytes": 1_000_000}]
    assert price_collectives(records, 2, model, "nccl").transfer_s == pytest.approx(1e-6 + 1e6 * 1.0 / 1000e9)
    assert price_collectives(records, 4, model, "nccl").transfer_s == pytest.approx(10e-6 + 1e6 * 1.5 / 100e9)  # no fit of 4: the pooled one


def _bench_rows(backend, device, sizes=(1 << 10, 1 << 16, 1 << 20)):
    from harness.perf_model import busbw_factor

    rows = []
    for ws, alpha in ((2, 100.0), (4, 400.0)):
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            rows += [{"op": op, "bytes": b, "world_size": ws, "latency_us": alpha + b * busbw_factor(op, ws) / 2e3, "backend": backend, "device": device}
                     for b in sizes]
    return rows


def test_fit_prices_projections_only_for_the_backend_it_measured():
    from harness.scaling import choose_cost_model
    from harness.perf_model import DEFAULTS
    from harness.sweep import SweepConfig

    defaults = DEFAULTS.to_dict()
    cpu = choose_cost_model(SweepConfig(), {"rows": _bench_rows("gloo", "cpu")}).to_dict()
    assert "fitted" in cpu["source"] and cpu["all_reduce"]["by_world_size"][4]["latency_us"] == pytest.approx(400.0)
    assert cpu["all_reduce"]["by_world_size"][2]["busbw_GBps"] == pytest.approx(2.0)
    shared_gpu = choose_cost_model(SweepConfig(device="cuda"), {"rows": _bench_rows("gloo", "cuda:0")}).to_dict()
    assert shared_gpu["source"] == defaults["source"] and "gloo/cuda" in shared_gpu["reason"] and shared_gpu["fit"]
    assert shared_gpu["all_reduce"] == defaults["all_reduce"]
    nccl = choose_cost_model(SweepConfig(device="cuda"), {"rows": _bench_rows("nccl", "cuda:0")}).to_dict()
    assert "nccl" in nccl["source"]
    none = choose_cost_model(SweepConfig(device="cuda"), {"rows": [], "reason": "no collective benchmark: 1 GPU(s) give no world"}).to_dict()
    assert none["source"] == defaults["source"] and "1 GPU" in none["reason"]


def test_collective_sizes_cover_the_swept_messages():
    from harness.scaling import collective_sizes, collective_benchmark
    from harness.sweep import SweepConfig

    cfg = SweepConfig(phases=(Phase("prefill", 2, 64), Phase("decode", 3, 16, 4)))
    tiny = PRESETS["tiny"]
    sizes = collective_sizes(cfg)
    for expected in (2 * 64 * tiny.hidden_size * 4, 3 * tiny.hidden_size * 4, 3 * tiny.vocab_size * 4, 1 << 10, 4 << 20):
        assert expected in sizes
    assert sizes == sorted(set(sizes))
    out = collective_benchmark(SweepConfig(world_sizes=(1,)), lambda n: pytest.fail("no world may start"), gpus=0)
    assert out["rows"] == [] and "no world of >= 2 ranks" in out["reason"]


def test_cost_model_prices_collectives_like_nccl_tests():
    model = CostModel.from_dict({"all_reduce": {"latency_us": 10.0, "busbw_GBps": 100.0}})
    records = [{"kind": "all_reduce", "nbytes": 1_000_000}]
    # ring all-reduce on 4 ranks moves 2*(n-1)/n of the buffer per rank at bus bandwidth
    assert price_collectives(records, 4, model, "nccl").transfer_s == pytest.approx(10e-6 + 1e6 * 1.5 / 100e9)
    assert price_collectives(records, 1, model, "nccl").transfer_s == 0.0


def test_presets_shard_at_1_2_4():
    for config in PRESETS.values():
        for tp in (1, 2, 4):
            config.check_tp(tp)
    assert Phase("decode", 16, 8, 100).tokens() == 1600


def test_cpu_sweep_measures_every_point(worlds):
    from harness.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(world_sizes=(1, 2), phases=(Phase("prefill", 1, 8), Phase("decode", 1, 4, 3)), implementations=("reference", "dtensor"),
                      compare_projection=True, warmup=0, repeats=2).validate()
    frame = run_sweep(cfg, lambda n: worlds[n])
    assert (frame["status"] == "ok").all(), frame["error"].tolist()
    assert len(frame) == 2 * 2 * 3  # implementations x phases x (ws 1, ws 2, ws 2 projected)
    c = PRESETS["tiny"]
    layers, h, f32 = c.num_layers, c.hidden_size, 4
    tp2 = frame[frame["world_size"] == 2].set_index(["implementation", "phase", "projected"])
    # (collectives, bytes this rank sends) per step, from the algorithm. Plain TP (the peer; the reference's
    # decode): 2 all-reduces per block + the embedding's all-reduce of (b, s, h), then an all-gather —
    # of (b, 1, vocab/tp) logits for the peer, of one (value, index) pair per row for the reference's
    # greedy selection on its vocabulary shards. The reference's prefill is sequence-parallel (8 % 2 == 0):
    # per block 2 all-gathers of (b, s/2, h) and 2 reduce-scatters of (b, s, h), the embedding's
    # reduce-scatter, the all-gather of each shard's last token, the pair.
    b, s, tp = 1, 8, 2
    expected = {
        ("dtensor", "prefill"): (2 * layers + 2, (2 * layers + 1) * b * s * h * f32 + b * c.vocab_size // tp * f32),
        ("dtensor", "decode"): (2 * layers + 2, (2 * layers + 1) * b * h * f32 + b * c.vocab_size // tp * f32),
        ("reference", "prefill"): (4 * layers + 3, (2 * layers * (b * s // tp * h) + (2 * layers + 1) * b * s * h + b * h + 2 * b) * f32),
        ("reference", "decode"): (2 * layers + 2, ((2 * layers + 1) * b * h + 2 * b) * f32),
    }
    for (impl, phase), (count, nbytes) in expected.items():
        for projected in (False, True):
            row = tp2.loc[(impl, phase, projected)]
            assert (row["collectives_per_step"], row["comm_bytes_per_step"]) == (count, nbytes), (impl, phase, projected)
    assert frame[(frame["phase"] == "prefill") & (frame["world_size"] == 2)].groupby("implementation")["sequence_parallel"].all().to_dict() == {"dtensor": False, "reference": True}
    # measured decode points: the driver issued single steps, one call each (median and p99 of their overhead)
    measured = frame[~frame["projected"]]
    decode, prefill = measured[measured["phase"] == "decode"], measured[measured["phase"] == "prefill"]
    assert (decode["dispatch_us_per_step_p99"] >= decode["dispatch_us_per_step"]).all() and (decode["dispatch_us_per_step"] > 0).all()
    assert prefill["dispatch_us_per_step_p99"].isna().all() and (prefill["dispatch_us_per_step"] == prefill["dispatch_us_per_call"]).all()
    assert (frame[frame["world_size"] == 1]["collectives_per_step"] == 0).all()
    assert frame["exposed_comm"].between(0, 1).all() and (frame["latency_s"] > 0).all()
    from harness.scaling_analysis import add_speedups

    assert (add_speedups(frame)[frame["world_size"] == 1]["speedup"] == 1.0).all()
    projected = frame[frame["projected"]]
    assert set(projected["world_size"]) == {2} and len(projected) == 4
    assert projected["cost_model"].str.contains("not measured").all() and projected["dispatch_fraction"].isna().all()
    assert (frame[~frame["projected"]]["backend"] == "gloo").all()


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
                def run(self, fn, *args, **kwargs):
                    if fn is not sweep.measure_on_rank:  # the single decode steps the driver issues after a point
                        return world.run(fn, *args, **kwargs)
                    calls.append(args[2].kind)
                    if args[2].kind == "prefill":
                        raise RuntimeError("injected failure")
                    return world.run(fn, *args, **kwargs)
            return Proxy()
        return get

    frame = sweep.run_sweep(cfg, flaky(lambda n: worlds[n]))
    assert list(frame["status"]) == ["failed", "ok"]
    assert "injected failure" in frame.loc[0, "error"]
    assert real is sweep.measure_on_rank


def test_graph_decode_counts_one_eager_step():
    """A replayed graph is invisible to the Communicator: the sweep counts one eager step instead.
    That count must equal what an eager decode run records per step."""
    import torch

    from harness.sweep import BuiltModel, _step_counter, make_decode
    from impl.communication import CountingCommunicator, NullCommunicator
    from impl.model import random_model

    comm = CountingCommunicator(NullCommunicator(2))
    model = random_model(PRESETS["tiny"], comm, torch.float32)
    built = BuiltModel(model, PRESETS["tiny"].vocab_size, comm.reset, lambda phase: [r.__dict__ for r in comm.records])
    ids = torch.randint(0, 100, (2, 5))
    one_step = _step_counter(built)(ids, 16)
    setup, run, none, _ = make_decode(model, ids, 3)
    comm.reset()
    run()
    assert none is None and len(one_step) == 2 * PRESETS["tiny"].num_layers + 2
    assert [r.__dict__ for r in comm.records] == one_step * 3


@pytest.mark.parametrize("path", ("eager", "compiled"))
def test_prefill_collectives_are_counted_on_either_path(path, monkeypatch):
    """A compiled prefill's runs are invisible to the counting communicator; the point's collectives
    come from make_prefill's first, eager call instead, so the projection prices the same messages
    on both paths (torch.compile's backend is swapped for "eager" here: tracing, no code generation)."""
    from types import SimpleNamespace

    from harness.sweep import measure_on_rank
    from impl.communication import NullCommunicator

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: real_compile(fn, backend="eager", dynamic=kw.get("dynamic")))
    ctx = SimpleNamespace(rank=0, world_size=1, device=torch.device("cpu"), comm=NullCommunicator(1), state={})
    out = measure_on_rank(ctx, "reference", "tiny", Phase("prefill", 1, 8), "float32", 0, 2, "projected", world=2, prefill_path=path, sequence_parallel=True)
    layers = PRESETS["tiny"].num_layers
    kinds = [r["kind"] for r in out["collectives"]]
    assert len(kinds) == 4 * layers + 3 and kinds.count("reduce_scatter") == 2 * layers + 1, kinds


OOM_MESSAGE = ("CUDA out of memory. Tried to allocate 2.50 GiB. GPU 0 has a total capacity of 139.80 GiB of which 1.25 GiB is free. "
               "Including non-PyTorch memory, this process has 138.50 GiB memory in use.")


def test_out_of_memory_is_described_in_bytes():
    from harness.sweep import describe_out_of_memory

    line = describe_out_of_memory(3, torch.OutOfMemoryError(OOM_MESSAGE), free_bytes=1342177280, total_bytes=150107537408)
    assert line == f"rank 3: CUDA out of memory: requested {int(2.5 * 2**30)} bytes, 1342177280 bytes free of 150107537408"
    assert "requested an unknown number of bytes" in describe_out_of_memory(0, torch.OutOfMemoryError("out of memory"), 0, 0)


def test_rank_out_of_memory_fails_its_point_naming_rank_and_bytes(worlds):
    """A rank's out-of-memory reaches the driver as a RankError whose traceback ends in the
    PointOutOfMemory line; the row keeps that line (not the head of the traceback), the next
    point runs on a fresh world."""
    import harness.sweep as sweep
    from harness.runtime.orchestrator import RankError

    cfg = sweep.SweepConfig(world_sizes=(1,), phases=(Phase("prefill", 1, 4), Phase("decode", 1, 4, 2)), warmup=0, repeats=1).validate()
    line = sweep.describe_out_of_memory(0, torch.OutOfMemoryError(OOM_MESSAGE), 1342177280, 150107537408)
    traceback = "Traceback (most recent call last):\n" + '  File "x.py", line 1, in f\n' * 200 + f"harness.sweep.PointOutOfMemory: {line}\n"

    def world_for(n):
        world = worlds[n]

        class OutOfMemoryOnPrefill:
            dispatch, backend = world.dispatch, world.backend

            def run(self, fn, *args, **kwargs):
                if fn is sweep.measure_on_rank and args[2].kind == "prefill":
                    raise RankError({0: traceback}, "measure_on_rank#1")
                return world.run(fn, *args, **kwargs)

        return OutOfMemoryOnPrefill()

    frame = sweep.run_sweep(cfg, world_for)
    assert list(frame["status"]) == ["failed", "ok"]
    assert frame.loc[0, "error"] == f"RankError: rank 0: harness.sweep.PointOutOfMemory: {line}"


@pytest.mark.gpu
def test_cuda_out_of_memory_mid_sweep_is_that_points_failure(worlds):
    """On a GPU: a point whose activations cannot fit fails naming the rank and the bytes, and the
    points after it are measured."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device (a real out-of-memory)")
    import harness.sweep as sweep
    from harness.runtime.orchestrator import MultiGPUOrchestrator

    cfg = sweep.SweepConfig(world_sizes=(1,), phases=(Phase("prefill", 1, 16), Phase("prefill", 2**20, 1024), Phase("decode", 1, 8, 2)),
                            device="cuda", dtype="bfloat16", warmup=0, repeats=1).validate()
    with MultiGPUOrchestrator(1, device="cuda") as world:
        frame = sweep.run_sweep(cfg, lambda n: world)
    assert list(frame["status"]) == ["ok", "failed", "ok"], frame["error"].tolist()
    error = frame.loc[1, "error"]
    assert "rank 0: CUDA out of memory: requested " in error and " bytes free of " in error and "unknown" not in error, error


def test_decode_all_reduce_setting_is_validated():
    assert load_config({"decode_all_reduce": "low-latency"}).decode_all_reduce == "low-latency"
    assert load_config({}).decode_all_reduce == "nccl"
    for bad in ("one_shot", 1):
        with pytest.raises(TPConfigError) as e:
            load_config({"decode_all_reduce": bad})
        assert e.value.argument == "decode_all_reduce"


def test_low_latency_decode_is_measured_on_its_communicator_and_says_it_fell_back(worlds):
    """A measured decode point with decode_all_reduce = low-latency runs on impl.low_latency's
    communicator; on gloo it falls back, and the row says so (the same tokens come out: the
    fallback is the plain collective). Prefill and the projection are untouched by the setting."""
    from harness.sweep import SweepConfig, run_sweep

    cfg = SweepConfig(world_sizes=(2,), phases=(Phase("decode", 1, 4, 2),), decode_all_reduce="low-latency", warmup=0, repeats=1).validate()
    (row,) = run_sweep(cfg, lambda n: worlds[n]).to_dict("records")
    assert row["status"] == "ok", row["error"]
    assert row["all_reduce_measured"].startswith("gloo all-reduce (fallback: device cpu"), row["all_reduce_measured"]
    (ctx_kind,) = set(worlds[2].run(_low_latency_kind))
    assert ctx_kind == "LowLatencyCommunicator"  # kept on the rank: the point ran on it


def _low_latency_kind(ctx):
    from harness.sweep import LOW_LATENCY_COMM

    return type(ctx.state[LOW_LATENCY_COMM]).__name__
