"""`tpgate scaling --implementations` with stacks known only through the protocol
(harness/protocol_sweep.py): measured from outside beside the built-in ones, what cannot be
measured is NaN (never a made-up figure), what the stack cannot do is its points' failure with
the reason, and one failing stack does not stop the others."""
from __future__ import annotations

import math
import sys
import types

import pytest
import torch

import harness.protocol_sweep as protocol_sweep
from harness.implementations import load_implementation
from harness.sweep import PRESETS, Phase, SweepConfig, run_sweep
from impl.architecture import ModelConfig, TPConfigError


class _NoRandom:
    """A stack that can be judged by verify but not swept (no random weights)."""
    name = "no-random"
    capabilities = frozenset({"greedy"})

    def check(self, config, tp):
        pass

    def load(self, directory, ctx, dtype):
        raise NotImplementedError

    def logits(self, model, ids):
        raise NotImplementedError

    def greedy(self, model, ids, new_tokens):
        raise NotImplementedError


@pytest.fixture
def no_random_stack(monkeypatch):
    module = types.ModuleType("tpgate_test_no_random_stack")
    module.IMPL = _NoRandom()
    monkeypatch.setitem(sys.modules, module.__name__, module)
    return f"{module.__name__}:IMPL"


def test_refusals_name_the_reason(no_random_stack):
    two_kv = ModelConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_layers=1, num_heads=8, num_kv_heads=2, max_seq_len=64)
    decode = Phase("decode", 1, 4, 4)
    assert "num_kv_heads=2 is not a multiple of tp=4" in protocol_sweep.refusal("hf-tp", two_kv, decode, 4, False)
    assert protocol_sweep.refusal("hf-tp", two_kv, decode, 2, False) is None
    assert protocol_sweep.refusal("hf-tp", two_kv, decode, 2, True).startswith("not projectable: hf-tp")
    assert "steps >= 2" in protocol_sweep.refusal("hf-tp", two_kv, Phase("decode", 1, 4, 1), 2, False)
    assert "'random' capability" in protocol_sweep.refusal(no_random_stack, two_kv, decode, 1, False)


def test_unknown_stack_is_refused_before_any_process():
    with pytest.raises(TPConfigError) as info:
        SweepConfig(implementations=("reference", "megatron")).validate()
    assert info.value.argument == "implementations" and "'hf-tp'" in str(info.value)


def test_decode_step_cancels_the_prompt(monkeypatch):
    """(T(steps) - T(1)) * steps / (steps - 1): a stack whose prompt costs P and each token D
    reports D per step, whatever P (time_calls replaced by the stack's own clock)."""
    prompt_s, token_s, steps = 0.5, 0.01, 5

    class Clocked:
        name, capabilities = "clocked", frozenset({"random", "greedy"})

        def check(self, config, tp):
            pass

        def random(self, config, ctx, dtype, seed=0):
            return None

        def greedy(self, model, ids, new_tokens):
            return torch.zeros(ids.shape[0], new_tokens, dtype=torch.long)

        def logits(self, model, ids):
            raise NotImplementedError

    def fake_time_calls(call, iters, device):
        tokens = call().shape[1]
        return [prompt_s + token_s * tokens]

    monkeypatch.setattr(protocol_sweep, "load_implementation", lambda spec, argument=None: Clocked())
    monkeypatch.setattr(protocol_sweep, "time_calls", fake_time_calls)
    ctx = types.SimpleNamespace(device=torch.device("cpu"), rank=0, comm=types.SimpleNamespace(barrier=lambda: None))
    out = protocol_sweep.measure_protocol_on_rank(ctx, "clocked", PRESETS["tiny"], Phase("decode", 1, 4, steps), "float32", 0, 3)
    assert out["median_s"] == pytest.approx(token_s * steps) and out["steps"] == steps and out["collectives"] == []


def test_protocol_stack_swept_beside_the_reference(worlds, no_random_stack):
    cfg = SweepConfig(world_sizes=(1, 2), phases=(Phase("prefill", 1, 8), Phase("decode", 1, 4, 3)),
                      implementations=("reference", "hf-tp", no_random_stack), compare_projection=True, warmup=0, repeats=1).validate()
    frame = run_sweep(cfg, lambda n: worlds[n])
    by = {impl: frame[frame["implementation"] == impl] for impl in cfg.implementations}
    assert (by["reference"]["status"] == "ok").all(), by["reference"]["error"].tolist()
    hf = by["hf-tp"]
    assert (hf["status"] == "ok").all() and not hf["projected"].any(), hf["error"].tolist()  # measured, never projected
    assert len(hf) == 4 and (hf["latency_s"] > 0).all()
    assert hf["exposed_comm"].map(math.isnan).all() and hf["null_latency_s"].map(math.isnan).all()  # not measurable from outside
    assert hf[hf["world_size"] == 2]["collectives_per_step"].map(math.isnan).all()  # hf-tp declares none
    assert set(hf["decode_path"]) == {"", "own"} and set(hf["prefill_path"]) == {"", "own"}
    broken = by[no_random_stack]
    assert (broken["status"] == "failed").all() and broken["error"].str.contains("'random' capability").all()
    assert load_implementation("hf-tp").name == "hf-tp"
