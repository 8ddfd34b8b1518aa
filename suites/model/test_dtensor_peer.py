"""The dtensor peer (PyTorch's own tensor parallelism, impl/dtensor_peer.py) against tpgate and
transformers on the same checkpoints, at TP 1/2/4 in float32, judged by the tolerance policy.

References, all single-device and computed once per variant in the driver:
  hf64    transformers in float64: the independent y*;
  hf      transformers in float32: its error against hf64 is the E1 that calibrates the bound;
  exact   tpgate TP=1 in float64, and tp1, tpgate TP=1 in float32: the peer's sibling, for the
          peer-vs-tpgate equivalence (the peer reuses tpgate's rotary and norm code).
Correctness is judged against transformers alone (peer and tpgate within the bound of hf64,
E1 = max|hf - hf64|): a bug in the code the peer shares with tpgate sits in `exact` and tp1 as
much as in the peer, and a bound 2*max|hf - exact| would grow with it
(test_shared_rope_bug_fails_the_transformers_check shows one). Against tp1/exact, and the peer's
own single-device model in the tied-embedding test, the check is TP equivalence (the same
function at every TP degree), which a shared bug passes by design. The peer applies only
where kv heads and the vocabulary divide by tp (it neither replicates kv heads nor pads the
vocabulary); other (variant, tp) pairs are skipped with the reason.
"""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from harness.tolerance import compare
from harness.verify import VerifyRequest, hf_run
from impl.architecture import ModelConfig, TPConfigError
from impl.communication import NullCommunicator
from impl.dtensor_peer import COLWISE, ROWWISE, PlainLlama, check_dtensor_tp, load_dtensor_model, parallelize, tp_plan
from impl.model import checkpoint_shapes
from impl.model_loader import DistributedCheckpointLoader, read_config

from . import dtensor_rank_fns, rank_fns, rope_rank_fns

WORLD_SIZES = (1, 2, 4)
BATCH, PROMPT, SEED, NEW_TOKENS = 2, 12, 3, 6


def _ids(vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (BATCH, PROMPT), generator=torch.Generator().manual_seed(SEED))


@pytest.fixture(scope="module")
def references(checkpoint):
    """references(variant) -> {"directory", "config", "ids", "exact", "tp1", "hf", "hf64", "hf64_tokens"}, computed once."""
    cache = {}

    def get(variant: str) -> dict:
        if variant not in cache:
            directory = str(checkpoint(variant))
            config = read_config(directory)
            ids = _ids(config.vocab_size)
            with torch.no_grad():
                exact = DistributedCheckpointLoader(directory, NullCommunicator(1)).load(torch.float64)(ids).double()
                tp1 = DistributedCheckpointLoader(directory, NullCommunicator(1)).load(torch.float32)(ids).float()
            greedy = VerifyRequest(directory, (1,), new_tokens=NEW_TOKENS)
            hf = hf_run(greedy, ids, torch.float32, "cpu")
            hf64 = hf_run(greedy, ids, torch.float64, "cpu")
            cache[variant] = {"directory": directory, "config": config, "ids": ids, "exact": exact, "tp1": tp1, "hf": hf["logits"],
                              "hf64": hf64["logits"].double(), "hf64_tokens": hf64["tokens"]}
        return cache[variant]

    return get


def _skip_on_gloo_sharing_a_gpu(world_size: int, device: str) -> None:
    """On one GPU the ranks share it over gloo, and DTensor's functional collectives over gloo
    with CUDA tensors killed ranks with SIGSEGV at random (torch 2.11, 2 and 4 ranks; the
    reference's c10d collectives on the same worlds pass). The peer is checked on CPU (CI) and
    belongs on NCCL on a multi-GPU machine."""
    if world_size > 1 and device == "cuda" and torch.cuda.device_count() < world_size:
        pytest.skip(f"dtensor over gloo with CUDA tensors crashes (SIGSEGV) on torch 2.11; needs {world_size} GPUs for NCCL")


def _skip_unless_peer_applies(config: ModelConfig, world_size: int) -> None:
    try:
        check_dtensor_tp(config, world_size)
    except TPConfigError as e:
        pytest.skip(f"dtensor peer does not apply at tp={world_size}: {e}")


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_peer_matches_tpgate_and_transformers(variant, world_size, references, worlds, checkpoint):
    _skip_unless_peer_applies(read_config(str(checkpoint(variant))), world_size)  # before the references are computed
    ref = references(variant)
    _skip_on_gloo_sharing_a_gpu(world_size, worlds.device)
    per_rank = worlds[world_size].run(dtensor_rank_fns.logits, ref["directory"], ref["ids"])
    peer = per_rank[0]
    assert all(torch.equal(r, peer) for r in per_rank), "replicated logits must be bitwise identical on every rank"
    tpgate = worlds[world_size].run(rank_fns.logits, ref["directory"], ref["ids"])[0]
    vs_hf = compare("logits", peer, ref["hf"], ref["hf64"], torch.float32, world_size)
    vs_tp1 = compare("logits", peer, ref["tp1"], ref["exact"], torch.float32, world_size)  # TP equivalence with tpgate's single device
    tpgate_row = compare("logits", tpgate, ref["hf"], ref["hf64"], torch.float32, world_size)
    assert vs_hf["passed"], vs_hf
    assert vs_tp1["passed"], vs_tp1
    assert tpgate_row["passed"], tpgate_row
    # peer and tpgate at the same tp: both within the bound of transformers float64, and within one bound of each other
    assert (peer - tpgate).abs().max().item() <= min(vs_hf["bound"], tpgate_row["bound"]), ((peer - tpgate).abs().max().item(), vs_hf, tpgate_row)
    assert torch.equal(peer.argmax(-1), ref["hf64"].argmax(-1))  # fp32 has no near-ties at these margins


def test_shared_rope_bug_fails_the_transformers_check(references, worlds):
    """A rope frequency bug in the code the peer shares with tpgate, planted in the peer's ranks and
    in the driver's tpgate references: calibrated on tpgate's float64 model (E1 = |hf - exact|), as
    this check was, the bug becomes tolerance and the peer passes; calibrated on transformers
    alone (E1 = |hf - hf64|) it fails by orders of magnitude."""
    _skip_on_gloo_sharing_a_gpu(2, worlds.device)
    ref = references("llama3-rope-scaling")
    mutant = "exponent_missing_factor_2"
    peer = worlds[2].run(rope_rank_fns.with_mutant, mutant, dtensor_rank_fns.logits, ref["directory"], ref["ids"])[0]
    with rope_rank_fns.mutated(mutant), torch.no_grad():
        exact = DistributedCheckpointLoader(ref["directory"], NullCommunicator(1)).load(torch.float64)(ref["ids"]).double()
    self_calibrated = compare("logits", peer, ref["hf"], exact, torch.float32, 2)
    independent = compare("logits", peer, ref["hf"], ref["hf64"], torch.float32, 2)
    assert self_calibrated["passed"] and self_calibrated["err_single"] > 100 * independent["err_single"], (self_calibrated, independent)
    assert not independent["passed"] and independent["err_tp"] > 100 * independent["bound"], independent


@pytest.mark.parametrize("world_size", (2, 4))
def test_peer_greedy_decode_with_kv_cache(world_size, references, worlds):
    ref = references("llama3-rope-scaling")
    _skip_unless_peer_applies(ref["config"], world_size)
    _skip_on_gloo_sharing_a_gpu(world_size, worlds.device)
    per_rank = worlds[world_size].run(dtensor_rank_fns.greedy, ref["directory"], ref["ids"], NEW_TOKENS)
    assert all(torch.equal(r["tokens"], per_rank[0]["tokens"]) for r in per_rank)
    assert torch.equal(per_rank[0]["tokens"], ref["hf64_tokens"])  # transformers' float64 greedy tokens
    cached, full = per_rank[0]["cached"], per_rank[0]["full"]
    assert (cached - full).abs().max().item() <= 1e-5 * full.abs().max().item()


def _random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {name: (1.0 + 0.1 * torch.randn(shape, generator=g)) if name.endswith("norm.weight") else 0.05 * torch.randn(shape, generator=g)
            for name, shape in checkpoint_shapes(config).items()}


TIED = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=2, qkv_bias=True, o_bias=True,
                   tie_word_embeddings=True, max_seq_len=64)


def test_tied_embedding_and_biases_at_tp2(worlds):
    """Tied LM head (re-tied to the sharded embedding) and q/k/v/o biases, on random weights."""
    _skip_on_gloo_sharing_a_gpu(2, worlds.device)
    tensors = _random_tensors(TIED)
    ids = _ids(TIED.vocab_size)
    out = worlds[2].run(dtensor_rank_fns.random_peer_and_tpgate, TIED, tensors, ids)
    assert all(o["tied"] for o in out)
    with torch.no_grad():
        exact = PlainLlama.from_tensors(tensors, TIED, dtype=torch.float64)(ids)  # the peer's own single-device model
        single = PlainLlama.from_tensors(tensors, TIED)(ids)
    row = compare("logits", out[0]["peer"], single, exact, torch.float32, 2)
    assert row["passed"], row
    assert (out[0]["peer"] - out[0]["tpgate"]).abs().max().item() <= row["bound"]


def test_tp_plan_names_exactly_the_column_and_row_wise_modules():
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    config = ModelConfig(vocab_size=32, hidden_size=32, intermediate_size=64, num_layers=3, num_heads=4, num_kv_heads=2)
    plan = tp_plan(config)
    layers = [f"model.layers.{i}." for i in range(config.num_layers)]
    col = {p + n for p in layers for n in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "mlp.gate_proj", "mlp.up_proj")}
    row = {p + n for p in layers for n in ("self_attn.o_proj", "mlp.down_proj")}
    assert set(COLWISE) | set(ROWWISE) == {n.split(".", 3)[3] for n in col | row}
    assert set(plan) == col | row | {"model.embed_tokens", "lm_head"}
    assert all(type(plan[n]) is ColwiseParallel for n in col) and all(type(plan[n]) is RowwiseParallel for n in row)
    assert type(plan["lm_head"]) is ColwiseParallel and plan["lm_head"].output_layouts == (Replicate(),)
    assert type(plan["model.embed_tokens"]) is RowwiseParallel and plan["model.embed_tokens"].input_layouts == (Replicate(),)
    # every plan path is a module of the plain model, and every Linear/Embedding of it is in the plan
    model = PlainLlama.from_tensors(_random_tensors(config), config)
    modules = dict(model.named_modules())
    assert all(n in modules for n in plan)
    assert {n for n, m in modules.items() if isinstance(m, (torch.nn.Linear, torch.nn.Embedding))} == set(plan)


class _NoCollectiveMesh:
    """A mesh that knows its size and nothing else: any use beyond size() fails loudly."""

    def __init__(self, size: int):
        self._size = size

    def size(self, dim=None):
        return self._size

    def __getattr__(self, name):
        raise AssertionError(f"mesh.{name} used: parallelize went past its config check")


@pytest.mark.parametrize("tp,argument", [(2, "vocab_size"), (4, "num_kv_heads"), (3, "num_heads")])
def test_unsupported_config_raises_before_any_collective(tp, argument):
    config = ModelConfig(vocab_size=101, hidden_size=48, intermediate_size=96, num_layers=1, num_heads=4, num_kv_heads=2)
    model = PlainLlama.from_tensors(_random_tensors(config), config)
    with pytest.raises(TPConfigError, match=rf"^{argument}="):
        parallelize(model, _NoCollectiveMesh(tp))
    assert all(type(p) is torch.nn.Parameter and type(p.data) is torch.Tensor for p in model.parameters())  # nothing distributed


@pytest.mark.parametrize("variant,tp,argument", [("qwen2", 2, "vocab_size"), ("llama-mqa-tied", 2, "num_kv_heads"), ("llama-gqa", 4, "num_kv_heads")])
def test_loader_refuses_before_reading_tensors(variant, tp, argument, checkpoint, monkeypatch):
    import impl.model_loader

    monkeypatch.setattr(impl.model_loader, "HFCheckpoint", lambda *a, **k: pytest.fail("tensors read before the config check"))
    ctx = SimpleNamespace(comm=NullCommunicator(tp), device=torch.device("cpu"), manager=None)  # no process group: a collective would fail
    with pytest.raises(TPConfigError, match=rf"^{argument}=.*dtensor peer"):
        load_dtensor_model(str(checkpoint(variant)), ctx)


def test_refusal_on_ranks_leaves_the_world_usable(checkpoint, worlds):
    replies = worlds[2].run(dtensor_rank_fns.refused, str(checkpoint("qwen2")))
    assert [r["argument"] for r in replies] == ["vocab_size", "vocab_size"]
    assert worlds[2].run(rank_fns.logits, str(checkpoint("qwen2")), _ids(103))[0].shape == (BATCH, PROMPT, 103)


# --------------------------------------------------------------------------- the sweep's builders


SWEEP = ModelConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=64)


@pytest.mark.parametrize("last_only", (True, False))
def test_listed_collectives_are_what_dtensor_issues(worlds, last_only):
    """peer_collectives (what projections price) against torch's own count on a real tp=2 peer."""
    _skip_on_gloo_sharing_a_gpu(2, worlds.device)
    from impl.dtensor_peer import peer_collectives

    counted = worlds[2].run(dtensor_rank_fns.counted_collectives, SWEEP, 2, 5, last_only)[0]
    listed = peer_collectives(SWEEP, 2, 5, 2, torch.float32, last_only)
    kinds = {k: sum(r["kind"] == k for r in listed) for k in ("all_reduce", "all_gather")}
    assert sum(n for op, n in counted.items() if "all_reduce" in op) == kinds["all_reduce"] == 2 * SWEEP.num_layers + 1, counted
    assert sum(n for op, n in counted.items() if "all_gather" in op) == kinds["all_gather"] == 1, counted
    assert sum(counted.values()) == len(listed), counted
    assert {r["nbytes"] for r in listed if r["kind"] == "all_reduce"} == {2 * 5 * SWEEP.hidden_size * 4}
    assert [r["nbytes"] for r in listed if r["kind"] == "all_gather"] == [2 * (1 if last_only else 5) * (SWEEP.vocab_size // 2) * 4]
    assert peer_collectives(SWEEP, 2, 5, 1, torch.float32, last_only) == []


def test_shard_config_model_has_one_ranks_shapes():
    from impl.dtensor_peer import random_plain_model, shard_config

    shard = random_plain_model(shard_config(SWEEP, 2), torch.float32)
    full = random_plain_model(SWEEP, torch.float32)
    attn, full_attn = shard.model.layers[0].self_attn, full.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (full_attn.q_proj.weight.shape[0] // 2, SWEEP.hidden_size)
    assert attn.k_proj.weight.shape[0] == full_attn.k_proj.weight.shape[0] // 2
    assert attn.o_proj.weight.shape == (SWEEP.hidden_size, full_attn.o_proj.weight.shape[1] // 2)
    assert shard.model.layers[0].mlp.down_proj.weight.shape == (SWEEP.hidden_size, SWEEP.intermediate_size // 2)
    assert shard.lm_head.weight.shape == (SWEEP.vocab_size // 2, SWEEP.hidden_size)
    ids = torch.randint(0, SWEEP.vocab_size // 2, (2, 6))
    assert shard(ids, last_only=True).shape == (2, 1, SWEEP.vocab_size // 2)
    with pytest.raises(TPConfigError, match="^num_kv_heads="):
        shard_config(SWEEP, 4)


def test_random_weights_follow_the_seed_and_norms_are_one():
    from impl.dtensor_peer import random_plain_model

    a, b, c = (random_plain_model(SWEEP, torch.float32, seed=s) for s in (0, 0, 1))
    assert torch.equal(a.lm_head.weight, b.lm_head.weight) and not torch.equal(a.lm_head.weight, c.lm_head.weight)
    assert torch.equal(a.model.norm.weight, torch.ones(SWEEP.hidden_size))
    assert a.lm_head.weight.dtype == torch.float32 and 0.01 < a.lm_head.weight.std().item() < 0.03


def test_truncate_cache_rewinds_decode():
    from impl.dtensor_peer import random_plain_model

    model = random_plain_model(SWEEP, torch.float32)
    ids = torch.randint(0, SWEEP.vocab_size, (1, 6), generator=torch.Generator().manual_seed(1))
    first = model.generate_greedy(ids, 4)
    with torch.no_grad():
        model(ids, 0, use_cache=True)
        step = model(first[:, :1], 6, use_cache=True)
        model(first[:, 1:2], 7, use_cache=True)
        model.truncate_cache(6)  # back to the prompt: the same step again gives the same logits
        assert torch.equal(model(first[:, :1], 6, use_cache=True), step)
    with pytest.raises(TPConfigError, match="^length="):
        model.truncate_cache(99)
