"""`hf-tp` (Hugging Face transformers' own tensor parallelism, harness/implementations/hf_tp.py)
and the harness's sharding-evidence check (harness.implementations.sharding_evidence).

hf-tp really shards (each rank holds its DTensor slice of the checkpoint's rows), passes
`verify` at TP 1 and 2, and its known limit (kv heads not a multiple of tp) is its own failure
row with the reason, caught before any process starts, while the reference passes beside it;
the check's condition is where transformers itself crashes. A stack that computes the whole
model on every rank returns right logits and is still refused at tp > 1."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from harness.implementations import ImplementationError, Unsupported, load_implementation, local_parameter_count, sharding_evidence
from harness.implementations.hf_tp import hf_config_of
from harness.sweep import PRESETS
from harness.verify import full_parameter_count
from impl.architecture import ModelConfig
from impl.communication import NullCommunicator
from impl.model_loader import read_config

from . import hf_tp_rank_fns

UNSHARDED = hf_tp_rank_fns.UNSHARDED_SPEC

KV_REASON = "num_kv_heads=2 is not a multiple of tp=4: transformers' colwise plan splits k_proj/v_proj by output rows and cannot replicate kv heads"


def test_hf_tp_is_a_builtin_with_greedy_and_random():
    impl = load_implementation("hf-tp")
    assert impl.name == "hf-tp" and impl.capabilities == {"greedy", "random"}


def test_hf_tp_really_shards_at_tp2(checkpoint, worlds):
    """Each rank's q/k (colwise) hold its half of the checkpoint's output rows, o_proj (rowwise)
    its half of the input columns, embedding and LM head their vocabulary rows (101 = 51 + 50),
    every one a DTensor; each rank holds fewer parameters than the whole model."""
    directory = checkpoint("llama-gqa")
    config = read_config(str(directory))
    full = load_file(directory / "model.safetensors")
    per_rank = worlds[2].run(hf_tp_rank_fns.local_shards, str(directory))
    for name, dim in (("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.0.self_attn.k_proj.weight", 0),
                      ("model.layers.0.self_attn.o_proj.weight", 1), ("model.embed_tokens.weight", 0), ("lm_head.weight", 0)):
        expected = full[name].chunk(2, dim)  # DTensor's Shard(dim): torch.chunk's split, rank r holds piece r
        for rank, got in enumerate(per_rank):
            kind, local = got["params"][name]
            assert kind == "DTensor", (name, rank, kind)
            assert torch.equal(local, expected[rank]), (name, rank, tuple(local.shape), tuple(expected[rank].shape))
    assert per_rank[0]["params"]["model.layers.0.self_attn.q_proj.weight"][1].shape[0] == config.num_heads * config.head_dim // 2
    for got in per_rank:
        assert got["local_parameters"] < full_parameter_count(config)


def test_verify_passes_hf_tp_at_tp_1_and_2(side_by_side):
    result, rows, full = side_by_side
    for tp in (1, 2):
        row = rows[("hf-tp", tp)]
        assert row["passed"] and row["error"] == "" and row["tokens_checked"], row
        assert row["first_diverging_token"] is None and row["max_abs_vs_exact"] <= row["bound"], row
        assert row["full_parameters"] == full and len(row["local_parameters"]) == tp, row
    assert rows[("hf-tp", 1)]["local_parameters"] == [full]
    assert all(n < full for n in rows[("hf-tp", 2)]["local_parameters"]), rows[("hf-tp", 2)]


def test_kv_heads_below_tp_is_hf_tp_failure_with_the_reason_and_the_reference_passes(side_by_side):
    result, rows, full = side_by_side
    row = rows[("hf-tp", 4)]
    assert not row["passed"] and row["error"] == f"unsupported: {KV_REASON}", row
    assert row["local_parameters"] is None  # refused by check(): no rank ever started on it
    for tp in (1, 2, 4):
        assert rows[("reference", tp)]["passed"], rows[("reference", tp)]
    assert all(n < full for n in rows[("reference", 4)]["local_parameters"])  # kv heads replicated, the rest sharded
    assert not result["passed"]


def test_a_stack_holding_the_whole_model_on_every_rank_fails_by_the_evidence_check(side_by_side):
    """UNSHARDED's logits are right (it passes at TP=1, where nothing need be sharded); at TP 2 and 4
    its rows fail naming its per-rank count and the full count, not its numerics."""
    result, rows, full = side_by_side
    assert rows[(UNSHARDED, 1)]["passed"] and rows[(UNSHARDED, 1)]["local_parameters"] == [full], rows[(UNSHARDED, 1)]
    for tp in (2, 4):
        row = rows[(UNSHARDED, tp)]
        assert not row["passed"], row
        assert f"ImplementationError: implementation '{UNSHARDED}': holds {full} parameters on this rank at tp={tp}, " \
               f">= the full model's {full}: it does not shard" in row["error"], row


def test_check_states_where_transformers_crashes(checkpoint, worlds):
    """Without check(), transformers itself fails where kv heads do not divide by tp: each rank's
    k_proj holds part of a head and the attention's view(batch, seq, -1, head_dim) raises. Shown
    on llama-mqa-tied (1 kv head) at TP=2, the same condition as 2 kv heads at TP=4 (a world of 2
    has hf-tp imported already; 4 more ranks importing transformers cost seconds). check() refuses
    exactly that config, and at TP=1 it does not."""
    directory = str(checkpoint("llama-mqa-tied"))
    config = read_config(directory)
    impl = load_implementation("hf-tp")
    with pytest.raises(Unsupported) as refused:
        impl.check(config, 2)
    assert (refused.value.implementation, refused.value.reason) == ("hf-tp", "num_kv_heads=1 is not a multiple of tp=2: transformers' colwise plan "
                                                                     "splits k_proj/v_proj by output rows and cannot replicate kv heads")
    impl.check(config, 1)
    ids = torch.randint(0, config.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0))
    with pytest.raises(RuntimeError) as crashed:
        worlds[2].run(hf_tp_rank_fns.unchecked_logits, directory, ids)
    local_kv_rows = config.num_kv_heads * config.head_dim // 2
    assert sorted(crashed.value.tracebacks) == [0, 1]
    assert f"RuntimeError: shape '[2, 16, -1, {config.head_dim}]' is invalid for input of size {2 * 16 * local_kv_rows}" \
           in crashed.value.tracebacks[0]


def test_check_refuses_mqa_at_tp2():
    config = ModelConfig(vocab_size=77, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=1)
    with pytest.raises(Unsupported, match=r"hf-tp: num_kv_heads=1 is not a multiple of tp=2"):
        load_implementation("hf-tp").check(config, 2)


def test_random_model_is_sharded_and_the_same_function_at_tp_1_and_2(worlds):
    """`random` gives transformers' model of a tpgate ModelConfig with seeded weights: at TP=2 each
    rank holds half the q_proj rows and the logits and greedy tokens are those of TP=1."""
    config = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(2))
    (one,) = worlds[1].run(hf_tp_rank_fns.random_logits, config, ids, 5)
    two = worlds[2].run(hf_tp_rank_fns.random_logits, config, ids, 5)
    assert one["q_rows"] == config.num_heads * config.head_dim and all(r["q_rows"] == one["q_rows"] // 2 for r in two)
    slack = 64 * torch.finfo(torch.float32).eps * one["logits"].abs().max().item()  # fp32 two-way sharded sums: reordering only
    assert one["logits"].abs().max().item() > 0
    for r in two:
        assert (r["logits"] - one["logits"]).abs().max().item() <= slack
        assert torch.equal(r["tokens"], one["tokens"])


ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
SMALL = dict(vocab_size=128, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=4, max_seq_len=64)


@pytest.mark.parametrize("config", [
    *PRESETS.values(),
    ModelConfig(**SMALL, qkv_bias=True),  # qwen2: q/k/v biases alone
    ModelConfig(**SMALL, qkv_bias=True, o_bias=True, tie_word_embeddings=True),  # llama attention_bias, tied head
    ModelConfig(**SMALL, rope_theta=500000.0, rope_scaling=ROPE_LLAMA3),
], ids=[*PRESETS, "qkv-bias", "attention-bias-tied", "llama3-rope"])
def test_random_builds_transformers_config_of_the_same_shape(config):
    """The transformers config `random` builds reads back (as a checkpoint's config.json) as the same ModelConfig."""
    assert ModelConfig.from_hf(hf_config_of(config).to_dict()) == config


def test_greedy_ignores_the_checkpoints_eos(checkpoint):
    """hf-tp's greedy is the plain argmax continuation even when the checkpoint's eos token is one
    it emits: transformers neither stops there nor masks it."""
    impl = load_implementation("hf-tp")
    ctx = SimpleNamespace(device=torch.device("cpu"), comm=NullCommunicator(1))
    model = impl.load(str(checkpoint("llama-gqa")), ctx, torch.float32)
    ids = torch.randint(0, model.config.vocab_size, (2, 10), generator=torch.Generator().manual_seed(4))
    seq = ids
    with torch.no_grad():
        for _ in range(5):  # full recompute, no cache
            seq = torch.cat([seq, model(seq).logits[:, -1].argmax(-1, keepdim=True)], 1)
    expected = seq[:, ids.shape[1]:]
    model.generation_config.eos_token_id = int(expected[0, 1])
    assert torch.equal(impl.greedy(model, ids, 5), expected)


def test_evidence_counts_local_parameters_and_refuses_a_whole_model_at_tp_above_1():
    model = nn.Sequential(nn.Linear(4, 6), nn.Linear(6, 3, bias=False))
    full = 4 * 6 + 6 + 6 * 3
    assert local_parameter_count(model) == full
    assert sharding_evidence("mine", model, full, 1) == full  # TP=1: nothing need be sharded
    with pytest.raises(ImplementationError, match=rf"implementation 'mine': holds {full} parameters on this rank at tp=2, >= the full model's {full}"):
        sharding_evidence("mine", model, full, 2)
    half = nn.Linear(4, 3)
    assert sharding_evidence("mine", half, full, 2) == 15  # fewer than the whole: accepted
    tied = nn.Module()
    tied.a = nn.Linear(3, 3, bias=False)
    tied.b = nn.Linear(3, 3, bias=False)
    tied.b.weight = tied.a.weight
    assert local_parameter_count(tied) == 9  # a tied weight is one tensor held once
    assert local_parameter_count(object()) is None and sharding_evidence("opaque", object(), full, 4) is None  # unknown: not refused
