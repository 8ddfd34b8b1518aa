"""Bad sweep, baseline, verify and loader-memory input is refused with a TPConfigError (or
CheckpointError) naming the field, before any rank process starts; the sweep's dispatch
fraction is per step. No test here starts a world: rank work is stubbed or run in-process."""
from __future__ import annotations

import os
from types import SimpleNamespace

import pytest
import torch

from harness import sweep
from harness.sweep import Phase, SweepConfig, load_config
from impl.architecture import TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import CheckpointError
from harness.runtime.orchestrator import DispatchRecord


def _no_world(*args, **kwargs):
    raise AssertionError("a rank world was started for input that should have been refused")


# --------------------------------------------------------------------------- sweep definition


@pytest.mark.parametrize("table,argument,value", [
    ({"repeats": "5"}, "repeats", "5"),
    ({"repeats": True}, "repeats", True),  # TOML true is not 1
    ({"warmup": -1}, "warmup", -1),
    ({"warmup": 1.5}, "warmup", 1.5),
    ({"world_sizes": "1,2"}, "world_sizes", "1,2"),  # was split into '1', ',', '2'
    ({"world_sizes": 4}, "world_sizes", 4),
    ({"world_sizes": [1, True]}, "world_sizes", True),
    ({"world_sizes": [1, 2, 2]}, "world_sizes", [1, 2, 2]),
    ({"presets": "tiny"}, "presets", "tiny"),
    ({"presets": [7]}, "presets", 7),
    ({"implementations": "reference"}, "implementations", "reference"),
    ({"phases": "prefill"}, "phases", "prefill"),
    ({"phases": ["prefill"]}, "phases", "prefill"),
    ({"phases": []}, "phases", []),
    ({"phases": [{"kind": "prefill", "batch": "2", "prompt": 8}]}, "phases.batch", "2"),
    ({"phases": [{"kind": "decode", "batch": 1, "prompt": 8, "steps": 2.0}]}, "phases.steps", 2.0),
    ({"phases": [{"kind": ["decode"], "batch": 1, "prompt": 8}]}, "phases.kind", ["decode"]),
    ({"dtype": ["float32"]}, "dtype", ["float32"]),
    ({"device": 0}, "device", 0),
    ({"decode_path": 1}, "decode_path", 1),
    ({"project": "yes"}, "project", "yes"),
])
def test_mistyped_sweep_field_is_named_with_its_value(table, argument, value):
    with pytest.raises(TPConfigError) as info:
        load_config(table)
    err = info.value
    assert (err.argument, err.value) == (argument, value), str(err)
    assert repr(value) in str(err)


def test_gate_workload_is_no_sweep_key():
    """The gate reads [tool.tpgate.gate].workload; a sweep key of that name would be silently ignored."""
    with pytest.raises(TPConfigError) as info:
        load_config({"gate_workload": {"preset": "tiny", "phase": "prefill"}})
    assert info.value.argument == "[tool.tpgate.scaling]" and info.value.value == ["gate_workload"]
    assert "gate_workload" not in SweepConfig.__dataclass_fields__


def test_repo_sweep_definitions_still_load():
    import tomllib

    from harness.scaling import REPO

    for path in (REPO / "pyproject.toml", REPO / "harness" / "sweeps" / "one_gpu.toml"):
        table = tomllib.loads(path.read_text())["tool"]["tpgate"]["scaling"]
        cfg = load_config(table, {"device": "cpu", "decode_path": "auto"})  # the GPU one checked for its fields, on this machine's CPU
        assert cfg.phases and all(isinstance(p, Phase) for p in cfg.phases)


def test_cuda_sweep_beyond_the_gpus_is_refused_unless_projected(monkeypatch):
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    table = {"device": "cuda", "world_sizes": [1, 2, 4]}
    with pytest.raises(TPConfigError) as info:
        load_config(table)
    assert info.value.argument == "world_sizes" and "--project" in str(info.value) and "2 visible" in str(info.value)
    assert load_config(table, {"project": True}).project
    assert load_config({"device": "cuda", "world_sizes": [1, 2]}).world_sizes == (1, 2)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    with pytest.raises(TPConfigError) as info:
        load_config(table, {"project": True})  # projecting still needs one GPU to run the shard on
    assert info.value.argument == "device"


def test_cli_refuses_a_cuda_sweep_beyond_the_gpus_before_any_world(monkeypatch, capsys):
    import harness.runtime.orchestrator
    from harness.cli import main

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(harness.runtime.orchestrator, "MultiGPUOrchestrator", _no_world)
    assert main(["scaling", "--device", "cuda", "--world-sizes", "1,2"]) == 2
    assert "--project" in capsys.readouterr().err


# --------------------------------------------------------------------------- dispatch fraction


class _StubWorld:
    """A world whose measure_on_rank calls return fixed timings and record DispatchRecords whose
    driver time spans the whole call (model build, warm-up, every repeat); `overheads_s[i]` is
    the i-th call's driver-observed minus slowest-rank time."""

    backend = "stub"

    def __init__(self, median_s: float, call_s: float, overheads_s: list[float], step_overhead_s: float):
        self.median_s, self.call_s, self.overheads_s, self.step_overhead_s = median_s, call_s, list(overheads_s), step_overhead_s
        self.dispatch: list[DispatchRecord] = []
        self.measure_calls = 0

    def run(self, fn, *args, **kwargs):
        if fn is not sweep.measure_on_rank:  # a single decode step (run_kept_step) or the release after them
            self.dispatch.append(DispatchRecord(f"{fn.__name__}#{len(self.dispatch)}", 0.002 + self.step_overhead_s, 0.002))
            return [[[0]]] if fn is sweep.run_kept_step else [None]
        implementation, preset, phase, dtype, warmup, repeats, mode = args
        overhead_s = self.overheads_s[self.measure_calls]
        self.measure_calls += 1
        self.dispatch.append(DispatchRecord(f"{fn.__name__}#{len(self.dispatch)}", self.call_s, self.call_s - overhead_s))
        return [{"rank": 0, "median_s": self.median_s, "p90_s": self.median_s, "times": [self.median_s] * repeats, "peak_memory": 0,
                 "collectives": [], "steps": phase.steps if phase.kind == "decode" else 1}]


@pytest.mark.parametrize("phase,per_step_s,step_overhead_s", [
    (Phase("decode", 1, 16, 16), 0.016 / 16, 0.002),  # a timed run decodes 16 tokens: 1 ms per step; single steps pay 2 ms
    (Phase("prefill", 2, 64), 0.016, 0.01),  # a timed run is one prefill call, the unit of work
])
def test_dispatch_fraction_is_one_calls_overhead_over_one_steps_latency(phase, per_step_s, step_overhead_s):
    # 10 ms of dispatch overhead on a call that ran 10 s (model build, warm-up, 5 repeats):
    # over the whole call it is 0.1 %, which no gate would ever fail; per step it is not.
    # The first (T_tp) call pays 50 ms, as a world's first call does (one-off costs): not per step.
    # Decode: the driver then issues single steps, one call each, each paying 2 ms: that is the per-step overhead.
    world = _StubWorld(median_s=0.016, call_s=10.0, overheads_s=[0.05, 0.01], step_overhead_s=0.002)
    cfg = SweepConfig(world_sizes=(1,), phases=(phase,), warmup=1, repeats=5).validate()
    row = sweep.run_sweep(cfg, lambda n: world).iloc[0]
    assert row["status"] == "ok", row["error"]
    assert row["latency_s"] == pytest.approx(per_step_s)
    assert row["dispatch_us_per_call"] == pytest.approx(1e4) and row["dispatch_us_per_step"] == pytest.approx(step_overhead_s * 1e6)
    assert row["dispatch_fraction"] == pytest.approx(step_overhead_s / per_step_s)
    assert row["dispatch_fraction"] > 0.10  # the gate's default threshold: this overhead must fail it


# --------------------------------------------------------------------------- --baseline


@pytest.mark.parametrize("content,why", [
    (b"", "EmptyDataError"),
    (b"\x00\xff\xfe\x00 not text", "UnicodeDecodeError"),
    (b"[tool.tpgate]\nworld_sizes = [1, 2, 4]\nphases = [{ kind = 'prefill', batch = 2 }]\n", "not a tpgate scaling results.csv"),  # TOML
    (b"tp,verdict\n1,PASS\n", "missing columns"),
    (b"implementation,preset,phase,world_size,device,latency_s,status,projected\n", "no rows"),
    (b"implementation,preset,phase,world_size,device,latency_s,status,projected\nreference,tiny,prefill,1,cpu,fast,ok,False\n", "latency_s"),
    (b"implementation,preset,phase,world_size,device,latency_s,status,projected\nreference,tiny,prefill,1,cpu,0.1,ok,maybe\n", "projected"),
])
def test_baseline_that_is_not_a_results_file_is_named(tmp_path, content, why):
    from harness.scaling import read_baseline

    path = tmp_path / "baseline.csv"
    path.write_bytes(content)
    with pytest.raises(TPConfigError) as info:
        read_baseline(str(path), SweepConfig())
    assert info.value.argument == "--baseline" and info.value.value == str(path)
    assert why in str(info.value)


def test_results_file_is_a_baseline(tmp_path):
    from harness.scaling import read_baseline

    path = tmp_path / "results.csv"
    path.write_text("implementation,preset,phase,world_size,device,latency_s,status,projected\nreference,tiny,prefill,1,cpu,0.1,ok,False\n"
                    "reference,tiny,prefill,2,cpu,,failed,True\n")
    assert len(read_baseline(str(path), SweepConfig())) == 2


# --------------------------------------------------------------------------- verify / loader-memory checkpoints


@pytest.fixture(scope="module")
def tiny_checkpoint(tmp_path_factory):
    """A 1-layer Llama checkpoint: 4 heads, 2 kv heads (shards 1, 2 and 4 ways, not 3)."""
    from harness.bench import write_synthetic_checkpoint

    directory = tmp_path_factory.mktemp("ckpt")
    write_synthetic_checkpoint(directory, layers=1, hidden=64, intermediate=128, heads=4, kv_heads=2, vocab=96)
    return str(directory)


def test_ranks_disagreeing_on_logits_are_named():
    from harness.verify import rank_disagreements

    tokens = torch.tensor([[1, 2]])
    same = {"tokens": tokens, "logits_digest": "a"}
    assert rank_disagreements([same, dict(same), dict(same)]) == []
    per_rank = [same, dict(same), {"tokens": tokens, "logits_digest": "b"}, {"tokens": tokens + 1, "logits_digest": "b"}]
    assert rank_disagreements(per_rank) == [{"rank": 2, "differs_in": ["logits"]}, {"rank": 3, "differs_in": ["tokens", "logits"]}]


def test_verify_fails_a_tp_degree_whose_ranks_hold_different_logits(tiny_checkpoint, monkeypatch):
    """Same greedy tokens, different logit bytes on rank 1: ADR-9's bitwise identity is broken."""
    import harness.verify as verify_mod

    monkeypatch.setattr(verify_mod, "hf_run", lambda *args: None)  # tpgate TP=1 is the single-device run: fast, no transformers

    class OneRankPlayingTwo:
        def run(self, fn, *args):
            rank0 = fn(SimpleNamespace(rank=0, device=torch.device("cpu"), comm=NullCommunicator(1)), *args)
            return [rank0, {"tokens": rank0["tokens"].clone(), "logits_digest": "0" * 64, "repeat_equal": rank0["repeat_equal"]}]

    result = verify_mod.verify(verify_mod.VerifyRequest(tiny_checkpoint, (1,), new_tokens=2), lambda n: OneRankPlayingTwo())
    row = result["rows"][0]
    assert not row["ranks_agree"] and row["disagreeing_ranks"] == [{"rank": 1, "differs_in": ["logits"]}]
    assert not row["passed"] and not result["passed"]


@pytest.mark.parametrize("field,argument", [("json_path", "--json"), ("save_logits", "--save-logits")])
def test_verify_output_path_is_checked_before_any_rank(tiny_checkpoint, tmp_path, field, argument):
    from harness.verify import VerifyRequest, check_request

    check_request(VerifyRequest(tiny_checkpoint, (1, 2), **{field: str(tmp_path / "out.file")}))
    for bad, why in ((tmp_path / "missing-dir" / "out.file", "does not exist"), (tmp_path, "not a directory")):
        with pytest.raises(TPConfigError) as info:
            check_request(VerifyRequest(tiny_checkpoint, (1, 2), **{field: str(bad)}))
        assert (info.value.argument, info.value.value) == (argument, str(bad)) and why in str(info.value)


@pytest.mark.parametrize("flag", ["--json", "--save-logits"])
def test_tpgate_verify_refuses_an_unwritable_output_before_any_rank(tiny_checkpoint, tmp_path, flag, capsys, monkeypatch):
    """The CLI hands --json/--save-logits to check_request: exit 2 before a world is started."""
    import harness.runtime.orchestrator as orchestrator
    from harness.cli import main

    monkeypatch.setattr(orchestrator.MultiGPUOrchestrator, "__init__", lambda *a, **k: pytest.fail("a world was started"))
    assert main(["verify", tiny_checkpoint, "--tp", "1", flag, str(tmp_path / "missing-dir" / "out")]) == 2
    assert flag in capsys.readouterr().err


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root may write into any directory")
def test_verify_output_in_a_read_only_directory_is_refused(tiny_checkpoint, tmp_path):
    from harness.verify import VerifyRequest, check_request

    locked = tmp_path / "locked"
    locked.mkdir()
    locked.chmod(0o500)
    try:
        with pytest.raises(TPConfigError, match="not writable"):
            check_request(VerifyRequest(tiny_checkpoint, (1,), json_path=str(locked / "r.json")))
    finally:
        locked.chmod(0o700)


def test_verify_json_and_logits_must_not_share_a_file(tiny_checkpoint, tmp_path):
    from harness.verify import VerifyRequest, check_request

    with pytest.raises(TPConfigError) as info:
        check_request(VerifyRequest(tiny_checkpoint, (1,), json_path=str(tmp_path / "x"), save_logits=str(tmp_path / "x")))
    assert info.value.argument == "--save-logits"


def test_loader_memory_refuses_bad_input_before_any_rank(tiny_checkpoint, tmp_path, monkeypatch):
    import harness.bench as bench

    monkeypatch.setattr(bench, "MultiGPUOrchestrator", _no_world)
    with pytest.raises(TPConfigError) as info:
        bench.loader_memory(tiny_checkpoint, 3)  # 4 heads cannot be split 3 ways
    assert (info.value.argument, info.value.value) == ("--tp", 3) and "num_heads" in str(info.value)
    with pytest.raises(CheckpointError, match="no such checkpoint directory"):
        bench.loader_memory(str(tmp_path / "nonexistent"), 2)
    (tmp_path / "no-config").mkdir()
    with pytest.raises(CheckpointError, match="model.safetensors"):
        bench.loader_memory(str(tmp_path / "no-config"), 2)
    assert bench.check_loader_memory(tiny_checkpoint, 4) is not None


def test_verify_may_generate_up_to_max_position_embeddings(tiny_checkpoint, monkeypatch):
    """The last generated token is never fed back: prompt + new - 1 positions must fit, and they do
    at the limit — run through the model, not only the check."""
    import harness.verify as verify_mod
    from impl.model_loader import read_config

    limit = read_config(tiny_checkpoint).max_seq_len
    verify_mod.check_request(verify_mod.VerifyRequest(tiny_checkpoint, (1,), prompt_len=limit - 3, new_tokens=4))
    with pytest.raises(TPConfigError) as info:
        verify_mod.check_request(verify_mod.VerifyRequest(tiny_checkpoint, (1,), prompt_len=limit - 3, new_tokens=5))
    assert info.value.argument == "--prompt-len + --new-tokens"
    monkeypatch.setattr(verify_mod, "hf_run", lambda *args: None)

    class OneRank:
        def run(self, fn, *args):
            return [fn(SimpleNamespace(rank=0, device=torch.device("cpu"), comm=NullCommunicator(1)), *args)]

    result = verify_mod.verify(verify_mod.VerifyRequest(tiny_checkpoint, (1,), prompt_len=limit - 3, new_tokens=4), lambda n: OneRank())
    assert result["passed"] and result["rows"][0]["first_diverging_token"] is None
