"""Every rope scaling type tpgate implements, against transformers on the same weights.

Frequencies: tpgate's float64 inverse frequencies and attention factor against transformers'
own rope init functions, for each type and its optional fields. Models: small random
checkpoints written by transformers' save_pretrained (one per type, this module's own table),
run through `verify()` (loader -> model -> prompt logits + greedy KV-cache decode) at TP 1/2/4
with prompt + generated positions past original_max_position_embeddings, and judged twice:
by verify (bound of tpgate's float64 model, calibrated on transformers alone; semantic check
against transformers float64) and against transformers float64 directly (E1 = transformers
float32 vs float64), so that a bug in tpgate's frequency code, shared by its single-device, TP
and float64 paths, cannot pass. The rope frequency bugs of suites/model/rope_rank_fns.py,
planted in the ranks and the driver's reference alike, must fail that judgement.
"""
from __future__ import annotations

import json
from unittest import mock

import pytest
import torch

from harness.tolerance import compare
from harness.verify import SEMANTIC_RTOL, VerifyRequest, hf_run, verify
from impl.architecture import ModelConfig
from impl.communication import NullCommunicator
from impl.model_loader import DistributedCheckpointLoader, read_config
from impl.tensor_parallel import dynamic_ntk_inv_freq, rotary_attention_factor, rotary_inv_freq

from . import checkpoints, rank_fns, rope_rank_fns
from .test_hf_equivalence import metric_row

BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, vocab_size=96,
            max_position_embeddings=64, rope_theta=100.0, rms_norm_eps=1e-5)
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16, "beta_fast": 8.0, "beta_slow": 0.5}
# factor null: max_position_embeddings / original = 4; mscale / mscale_all_dim set the attention factor; an untruncated ramp
YARN_MSCALE = {"rope_type": "yarn", "factor": None, "original_max_position_embeddings": 16, "mscale": 0.8, "mscale_all_dim": 0.5, "truncate": False}
ROPE_CHECKPOINTS = {
    # name: (config class name, kwargs); head_dim 16, kv heads replicated at TP 4
    "linear": ("LlamaConfig", dict(BASE, rope_theta=10000.0, rope_scaling={"type": "linear", "factor": 4.0})),
    # positions stop at max_position_embeddings - 1 = 18: the KV cache holds all max_position_embeddings it may (dynamic's growth: test below)
    "dynamic": ("Qwen2Config", dict(BASE, max_position_embeddings=19, rope_scaling={"rope_type": "dynamic", "factor": 2.0})),
    "yarn": ("LlamaConfig", dict(BASE, rope_scaling=YARN)),
    "yarn-mscale": ("MistralConfig", dict(BASE, rope_scaling=YARN_MSCALE)),
    "proportional": ("LlamaConfig", dict(BASE, rope_scaling={"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0})),
}
LEGACY_CONFIG = {"linear"}  # config.json rewritten the transformers 4.x way: top-level rope_theta, rope_scaling with "type"
PROMPT, NEW_TOKENS = 12, 8  # positions 0..18: past original_max_position_embeddings=16


def _as_legacy_config(directory) -> None:
    path = directory / "config.json"
    config = json.loads(path.read_text())
    rope = config.pop("rope_parameters")
    config["rope_theta"] = rope.pop("rope_theta")
    config["rope_scaling"] = {"type": rope.pop("rope_type"), **{k: v for k, v in rope.items() if k != "type"}}
    path.write_text(json.dumps(config))


@pytest.fixture(scope="module")
def rope_checkpoint(tmp_path_factory):
    """rope_checkpoint(name) -> directory of that checkpoint, written once per module."""
    cache = {}

    def get(name: str):
        if name not in cache:
            directory = tmp_path_factory.mktemp(f"rope-{name}")
            # the variants' own writer (seeding, perturbed norms and biases), for a checkpoint outside VARIANTS
            with mock.patch.dict(checkpoints.VARIANTS, {name: ROPE_CHECKPOINTS[name]}):
                checkpoints.write_checkpoint(name, directory)
            if name in LEGACY_CONFIG:
                _as_legacy_config(directory)
            cache[name] = directory
        return cache[name]

    return get


def _request(directory, tps=(1, 2, 4)) -> VerifyRequest:
    return VerifyRequest(str(directory), tps, "cpu", "float32", batch=2, prompt_len=PROMPT, new_tokens=NEW_TOKENS, seed=5)


def equivalence_failures(result: dict) -> list[str]:
    """Why a float32 verify() result does not show tpgate's model equal to transformers' (empty: it does).
    Beyond verify's own verdict, each TP degree's prompt logits must lie within the policy's bound
    of transformers float64, E1 being transformers float32 against float64: no tpgate reference
    in it. (Both transformers runs use the same float32 rotary tables, so those cancel in E1;
    tpgate's float32 tables differ from them by at most an ulp of each frequency, ~2u of the
    logits at these positions, within the bound's rounding term.)"""
    failures = [] if result["reference"] == "transformers" else [f"reference is {result['reference']}, not transformers"]
    if not result["semantic_check"]["passed"]:
        failures.append(f"semantic check: {result['semantic_check']}")
    hf = result["transformers_logits"]
    for row in result["rows"]:
        if not row["passed"] or row["first_diverging_token"] is not None:  # fp32 has no near-ties at these margins
            failures.append(f"tp={row['tp']}: {row}")
        independent = compare("logits", result["logits"][row["tp"]], hf["working"], hf["float64"], torch.float32, row["tp"])
        if not independent["passed"]:
            failures.append(f"tp={row['tp']} against transformers float64: err {independent['err_tp']:.3g} > bound {independent['bound']:.3g}")
    return failures


# --------------------------------------------------------------------------- frequencies


FREQUENCY_CASES = [
    {"rope_type": "linear", "factor": 4.0},
    {"type": "linear", "factor": 2.5},
    {"rope_type": "dynamic", "factor": 2.0},
    YARN,
    {**YARN, "truncate": False},
    YARN_MSCALE,
    {"rope_type": "yarn", "factor": 4.0, "attention_factor": 0.8},
    {"rope_type": "yarn", "factor": 8.0},  # original_max_position_embeddings defaults to max_position_embeddings
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
    {"rope_type": "proportional", "partial_rotary_factor": 0.5, "factor": 2.0},
    {"rope_type": "proportional", "partial_rotary_factor": 0.3},
]
# transformers evaluates these in float32: a pow and at most 6 further roundings (divide, scale,
# ramp, blend), each <= u = 2^-24 relative, against tpgate's float64 (exact to ~1e-15): 8u bounds
# the gap. A wrong exponent, factor, ramp bound or blend moves some frequency by >= 1e-2.
FREQUENCY_RTOL = 8 * 2.0 ** -24


@pytest.mark.parametrize("theta", (100.0, 500000.0))
@pytest.mark.parametrize("scaling", FREQUENCY_CASES, ids=lambda s: "-".join(f"{k}={v}" for k, v in s.items()))
def test_frequencies_and_attention_factor_match_transformers(scaling, theta):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    head_dim, max_positions = 32, 64
    hf = transformers.LlamaConfig(hidden_size=4 * head_dim, num_attention_heads=4, head_dim=head_dim, max_position_embeddings=max_positions,
                                  rope_theta=theta, rope_scaling=dict(scaling))
    hf_inv, hf_factor = ROPE_INIT_FUNCTIONS[hf.rope_parameters["rope_type"]](hf, "cpu")
    config = ModelConfig(hidden_size=4 * head_dim, num_heads=4, num_kv_heads=4, head_dim=head_dim, max_seq_len=max_positions, rope_theta=theta,
                         rope_scaling=dict(scaling))
    inv = rotary_inv_freq(head_dim, theta, config.rope_scaling)
    torch.testing.assert_close(inv, hf_inv.double(), rtol=FREQUENCY_RTOL, atol=0)
    assert rotary_attention_factor(config.rope_scaling) == pytest.approx(hf_factor, rel=1e-12)
    if config.rope_scaling["rope_type"] == "dynamic":  # the base grows past max_position_embeddings
        for length in (max_positions + 1, 3 * max_positions):
            hf_long, _ = ROPE_INIT_FUNCTIONS["dynamic"](hf, "cpu", seq_len=torch.tensor(length))
            torch.testing.assert_close(dynamic_ntk_inv_freq(head_dim, theta, config.rope_scaling, torch.tensor(length)), hf_long.double(),
                                       rtol=FREQUENCY_RTOL, atol=0)


def test_4x_rope_scaling_and_5x_rope_parameters_read_alike():
    base = {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
            "num_attention_heads": 4, "max_position_embeddings": 64}
    legacy = ModelConfig.from_hf({**base, "rope_theta": 100.0, "rope_scaling": {"type": "yarn", "factor": 4.0, "beta_fast": 8}})
    current = ModelConfig.from_hf({**base, "rope_parameters": {"rope_type": "yarn", "rope_theta": 100.0, "factor": 4.0, "beta_fast": 8.0,
                                                                "original_max_position_embeddings": 64}})
    assert legacy == current and legacy.rope_theta == 100.0
    assert ModelConfig(**{**current.__dict__}) == current  # the stored form reads back unchanged (tpgate shard metadata)
    # the default rope rotates the whole head in transformers' Llama, whatever partial_rotary_factor says
    assert ModelConfig.from_hf({**base, "partial_rotary_factor": 0.5}).rope_scaling is None


# --------------------------------------------------------------------------- models at TP 1/2/4


@pytest.mark.parametrize("name", sorted(ROPE_CHECKPOINTS))
def test_rope_scaling_model_matches_transformers_at_every_tp(name, rope_checkpoint, worlds, metrics, request):
    req = _request(rope_checkpoint(name))
    result = verify(req, lambda n: worlds[n])
    metrics.write([metric_row(f"rope-{name}", req, row) for row in result["rows"]], request.node.nodeid)
    assert not equivalence_failures(result)


MUTANT_CASES = [
    ("exponent_missing_factor_2", "linear"),
    ("yarn_ramp_reversed", "yarn"),
    ("yarn_attention_factor_dropped", "yarn-mscale"),
    ("dynamic_ntk_unclamped", "dynamic"),
]


@pytest.mark.parametrize("mutant,name", MUTANT_CASES)
def test_shared_rope_bug_fails_the_equivalence(mutant, name, rope_checkpoint, worlds):
    """The bug in tpgate's ranks and in its float64 reference: only transformers can tell.
    (The unmutated checkpoint passes in test_rope_scaling_model_matches_transformers_at_every_tp.)"""
    with rope_rank_fns.mutated(mutant):  # the driver-side references verify() builds
        result = verify(_request(rope_checkpoint(name), tps=(2,)), lambda n: rope_rank_fns.MutatedWorld(worlds[n], mutant))
    failures = equivalence_failures(result)
    assert failures and any("against transformers float64" in f for f in failures), failures


# --------------------------------------------------------------------------- dynamic NTK past max_position_embeddings


def long_prompt_failures(directory, world, mutant=None) -> list[str]:
    """A prefill (no KV cache) longer than max_position_embeddings, where dynamic NTK grows its base,
    at the world's TP degree: the semantic check and the bound against transformers float64."""
    config = read_config(directory)
    ids = torch.randint(0, config.vocab_size, (2, config.max_seq_len + 16), generator=torch.Generator().manual_seed(8))
    got = world.run(rope_rank_fns.with_mutant, mutant, rank_fns.logits, str(directory), ids)[0]
    one_step = VerifyRequest(str(directory), (1,), new_tokens=1)
    hf, hf64 = (hf_run(one_step, ids, dtype, "cpu")["logits"] for dtype in (torch.float32, torch.float64))
    with rope_rank_fns.mutated(mutant), torch.no_grad():
        exact = DistributedCheckpointLoader(str(directory), NullCommunicator(1)).load(torch.float64)(ids).double()
    failures = []
    if (hf64.double() - exact).abs().max() > SEMANTIC_RTOL * exact.abs().max():
        failures.append("semantic check")
    row = compare("logits", got, hf, hf64, torch.float32, world.world_size)
    if not row["passed"]:
        failures.append(f"against transformers float64: err {row['err_tp']:.3g} > bound {row['bound']:.3g}")
    return failures


def test_dynamic_ntk_past_max_position_embeddings(rope_checkpoint, worlds):
    directory = rope_checkpoint("dynamic")
    assert not long_prompt_failures(directory, worlds[2])
    assert long_prompt_failures(directory, worlds[2], "dynamic_ntk_exponent_dropped")
