"""Tied embeddings at TP > 1, and what a rank reads while loading.

Tied weights: on every rank of TP 1/2/4, whichever way the model is built (the loader on a tied
Hugging Face checkpoint, `LlamaModel.from_tensors` on full tensors, `random_model`, a tpgate
shard directory saved at another TP), the LM head's weight is the embedding's Parameter, and
the parameters, the state dict and the saved shard file hold exactly one rank's shards — no
second vocab-sized shard. The tied weight's gradient (the embedding's plus the LM head's
contribution) rebuilt from the ranks matches single device under harness/tolerance.py.

Loading: counting every byte a rank's `DistributedCheckpointLoader.load` pulls through the
safetensors slicing API (and get_tensor), a rank reads exactly its shard of each sharded tensor
and the replicated tensors, on single-file and indexed checkpoints (ADR-4, ADR-8).

The expected bytes are derived here from the config and tp alone (padded vs real vocab rows,
sharded vs replicated kv heads, row-parallel shards being column slices), never read back from
the implementation. Each check is shown to reject a broken variant (loading_rank_fns.MUTANTS).
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from harness.tolerance import compare
from impl.architecture import ModelConfig
from impl.communication import NullCommunicator
from impl.model import checkpoint_shapes
from impl.model_loader import read_config, shard_file
from impl.sharding import unshard
from impl.tensor_parallel import vocab_rows as vocab_spec

from . import loading_rank_fns

WORLD_SIZES = (1, 2, 4)
ITEMSIZE = {"F32": 4, "BF16": 2, "F16": 2}

# 37 rows: padded to 38 at tp 2 and 40 at tp 4 (the last rank holds 7 real rows and 3 padding);
# 2 kv heads: sharded at tp 2, replicated at tp 4; q/k/v and o biases (sharded and replicated).
TIED = ModelConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_layers=1, num_heads=4, num_kv_heads=2, qkv_bias=True, o_bias=True,
                   tie_word_embeddings=True, max_seq_len=16)
TIED_CHECKPOINT = "llama-mqa-tied"  # vocab 77, one kv head (replicated at tp 2 and 4)


# --------------------------------------------------------------------------- expected shards, from the config


def vocab_rows(vocab: int, tp: int, rank: int) -> tuple[int, int]:
    """(rows rank holds, how many of them are real): the table is padded to a multiple of tp."""
    held = -(-vocab // tp)
    return held, max(0, min(vocab, (rank + 1) * held) - rank * held)


def local_kv_heads(num_kv_heads: int, tp: int) -> int:
    """kv heads per rank: num_kv_heads / tp when they shard, else one (replicated) head."""
    return num_kv_heads // tp if num_kv_heads % tp == 0 else 1


def held_bytes(config: ModelConfig, tp: int, dtype: torch.dtype) -> int:
    """Bytes of one rank's parameters: vocab rows padded, the tied head adding nothing."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    q, kv = config.num_heads // tp * d, local_kv_heads(config.num_kv_heads, tp) * d
    vocab = vocab_rows(config.vocab_size, tp, 0)[0] * h * (1 if config.tie_word_embeddings else 2)
    block = 2 * h + (q + 2 * kv) * h + h * q + 3 * (i // tp) * h + config.qkv_bias * (q + 2 * kv) + config.o_bias * h
    return (vocab + h + config.num_layers * block) * torch.empty((), dtype=dtype).element_size()


def read_budget(name: str, shape: list[int], config: ModelConfig, tp: int, rank: int) -> int:
    """Elements of the full tensor `name` (of `shape`) rank may read: its shard, or all of a
    replicated tensor; nothing of a tied head or of an ignored buffer."""
    width = 1 if len(shape) == 1 else shape[1]
    d = config.head_dim
    if (name == "lm_head.weight" and config.tie_word_embeddings) or name.endswith("rotary_emb.inv_freq"):
        return 0
    if name in ("model.embed_tokens.weight", "lm_head.weight"):
        return vocab_rows(config.vocab_size, tp, rank)[1] * width
    # Phi-3's fused tensors (before the q/k/v and gate/up suffixes they end with): the rank's rows of each segment
    if name.endswith("qkv_proj.weight"):
        return (config.num_heads // tp + 2 * local_kv_heads(config.num_kv_heads, tp)) * d * width
    if name.endswith("gate_up_proj.weight"):
        return 2 * (config.intermediate_size // tp) * width
    # Mixtral's experts: w1/w3 column-parallel, w2 row-parallel (a column slice); the router (gate.weight) is replicated
    if name.endswith(("w1.weight", "w3.weight")):
        return config.intermediate_size // tp * width
    if name.endswith("w2.weight"):
        return shape[0] * (shape[1] // tp)
    if name.endswith(("q_proj.weight", "q_proj.bias")):
        return config.num_heads // tp * d * width
    if name.endswith(("k_proj.weight", "k_proj.bias", "v_proj.weight", "v_proj.bias")):
        return local_kv_heads(config.num_kv_heads, tp) * d * width
    if name.endswith(("gate_proj.weight", "up_proj.weight")):
        return config.intermediate_size // tp * width
    if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: a column slice
        return shape[0] * (shape[1] // tp)
    return shape[0] * width  # norms, o_proj's bias: replicated


def header(path: str | Path) -> dict[str, tuple[list[int], int]]:
    """{tensor name: (shape, bytes per element)} of a safetensors file, or of every one in a directory."""
    path = Path(path)
    out = {}
    for file in sorted(path.glob("*.safetensors")) if path.is_dir() else [path]:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                out[name] = (part.get_shape(), ITEMSIZE[part.get_dtype()])
    return out


def storage_failures(report: dict, expected_bytes: int) -> list[str]:
    """What is wrong with one rank's loading_rank_fns.storage_report of a tied model whose shards are expected_bytes."""
    failures = []
    if not (report["head_is_embedding"] and report["head_shares_storage"]):
        failures.append(f"the LM head's weight is not the embedding's parameter (same object: {report['head_is_embedding']}, same storage: {report['head_shares_storage']})")
    if report["parameter_bytes"] != expected_bytes:
        failures.append(f"parameters hold {report['parameter_bytes']} bytes, one rank's shards are {expected_bytes}")
    if not report["state_dict_head_shares"] or report["state_dict_bytes"] != expected_bytes:
        failures.append(f"state dict: lm_head.weight shares embed.weight's storage: {report['state_dict_head_shares']}, "
                        f"{report['state_dict_bytes']} bytes for {expected_bytes}")
    return failures


def saved_file_failures(directory: Path, config: ModelConfig, tp: int) -> list[str]:
    """Each rank file of a tied model's shard directory (saved at tp) holds that rank's shards
    once and no lm_head.weight. `config`: the tied model that was saved."""
    expected = held_bytes(config, tp, torch.float32)
    failures = []
    for rank in range(tp):
        tensors = header(directory / shard_file(rank, tp))
        stored = sum(itemsize * torch.Size(shape).numel() for shape, itemsize in tensors.values())
        if "lm_head.weight" in tensors or stored != expected:
            failures.append(f"{shard_file(rank, tp)}: {stored} bytes for {expected}, lm_head.weight stored: {'lm_head.weight' in tensors}")
    return failures


# --------------------------------------------------------------------------- storage of the tied weight


def _random_tensors(config: ModelConfig, seed: int = 0) -> dict[str, torch.Tensor]:
    """Full float32 tensors of config in Hugging Face naming: norms near 1, matrices ~ 1/sqrt(fan-in),
    biases 0.1, the (tied) embedding 0.5."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, shape in checkpoint_shapes(config).items():
        if name.endswith("norm.weight"):
            out[name] = 1.0 + 0.1 * torch.randn(shape, generator=g)
        elif name == "model.embed_tokens.weight":
            out[name] = 0.5 * torch.randn(shape, generator=g)
        else:
            out[name] = torch.randn(shape, generator=g) * (shape[1] ** -0.5 if len(shape) == 2 else 0.1)
    return out


@pytest.fixture(scope="module")
def tied_source(checkpoint) -> tuple[str, ModelConfig]:
    directory = str(checkpoint(TIED_CHECKPOINT))
    config = read_config(directory)
    assert config.tie_word_embeddings
    return directory, config


@pytest.fixture(scope="module")
def tied_shards(tied_source, worlds, tmp_path_factory) -> dict[int, tuple[Path, list[dict]]]:
    """{tp: (shard directory, per-rank storage reports)}: the tied checkpoint loaded through
    DistributedCheckpointLoader at each tp, reported, and saved there as tpgate shards."""
    out = {}
    for tp in WORLD_SIZES:
        directory = tmp_path_factory.mktemp(f"tied-shards-tp{tp}")
        out[tp] = (directory, worlds[tp].run(loading_rank_fns.load_and_save, tied_source[0], str(directory)))
    return out


def _storage_failures(loaded: list[dict], built: list[dict], checkpoint_config: ModelConfig, tp: int) -> dict[str, list[str]]:
    """{"rank r: path": failures} over the loader path's per-rank reports and built_reports' paths."""
    expected = {"from_tensors": held_bytes(TIED, tp, torch.float32), "random_model": held_bytes(TIED, tp, torch.bfloat16)}
    loaded_bytes = held_bytes(checkpoint_config, tp, torch.float32)  # the loader and every shards@ path
    out = {f"rank {rank}: loader": storage_failures(report, loaded_bytes) for rank, report in enumerate(loaded)}
    for rank, reports in enumerate(built):
        out.update({f"rank {rank}: {path}": storage_failures(report, expected.get(path, loaded_bytes)) for path, report in reports.items()})
    return out


def _built(world, tied_shards, tp: int, mutant: str | None = None) -> list[dict]:
    others = {saved: str(d) for saved, (d, _) in tied_shards.items() if saved != tp}
    built = world.run(loading_rank_fns.built_reports, TIED, _random_tensors(TIED), others, mutant)
    assert sorted(built[0]) == sorted(["from_tensors", "random_model", *(f"shards@{s}" for s in others)])
    return built


@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_tied_head_is_the_embedding_on_every_rank(tp, tied_source, tied_shards, worlds):
    """Loader, from_tensors, random_model and the shards saved at every other tp, loaded at tp:
    one vocab shard per rank, shared by embedding and LM head, in memory, state dict and file."""
    directory, loaded = tied_shards[tp]
    failures = {k: v for k, v in _storage_failures(loaded, _built(worlds[tp], tied_shards, tp), tied_source[1], tp).items() if v}
    assert not failures, failures
    assert not saved_file_failures(directory, tied_source[1], tp)


def test_storage_check_rejects_a_copied_tie(tied_source, tied_shards, worlds, tmp_path):
    """An LM head that copies the embedding's shard instead of sharing it (same logits) fails on
    every path and rank; the real implementation passes the same paths at this tp above."""
    tp = 2
    loaded = worlds[tp].run(loading_rank_fns.load_and_save, tied_source[0], str(tmp_path), "copied_tie")
    failures = _storage_failures(loaded, _built(worlds[tp], tied_shards, tp, "copied_tie"), tied_source[1], tp)
    assert all(failures.values()), f"a copied tie passed on {[path for path, f in failures.items() if not f]}"


def test_saved_file_check_rejects_a_duplicated_head(tied_source, worlds, tmp_path):
    """A save that writes the tied head as a tensor of its own is caught in every rank file."""
    worlds[2].run(loading_rank_fns.load_and_save, tied_source[0], str(tmp_path), "tie_lost_on_save")
    failures = saved_file_failures(tmp_path, tied_source[1], 2)
    assert len(failures) == 2 and all("lm_head.weight stored: True" in f for f in failures), failures


# --------------------------------------------------------------------------- the tied weight's gradient


def _grad_inputs(config: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """ids (2, 8) touching the first and the last real row (the last rank's, beside its padding),
    one id repeated; grad_out (2, 8, vocab)."""
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, config.vocab_size, (2, 8), generator=g)
    ids[0, 0], ids[0, 1], ids[1, 3] = config.vocab_size - 1, 0, ids[1, 2]
    return ids, torch.randn(2, 8, config.vocab_size, generator=g)


@pytest.fixture(scope="module")
def tied_grad_references() -> dict:
    """Single-device tied gradients (vocab, hidden): float32, float64 (exact) and the magnitude S
    (float64 on |weights|, |grad_out|), through the same rank function on a 1-rank communicator."""
    tensors, (ids, grad_out) = _random_tensors(TIED), _grad_inputs(TIED)
    ctx = SimpleNamespace(comm=NullCommunicator(1), device=torch.device("cpu"), rank=0, world_size=1)

    def run(dtype, absolute=False):
        return loading_rank_fns.tied_gradient(ctx, TIED, tensors, ids, grad_out, dtype, absolute)

    return {"inputs": (tensors, ids, grad_out), "single": run(torch.float32), "exact": run(torch.float64), "magnitude": run(torch.float64, True)}


def _tied_grad_row(refs: dict, world, mutant: str | None = None) -> dict:
    """The tied weight's gradient rebuilt from every rank as its spec declares (unshard strips the padding rows), against the policy."""
    tensors, ids, grad_out = refs["inputs"]
    per_rank = world.run(loading_rank_fns.tied_gradient, TIED, tensors, ids, grad_out, torch.float32, False, mutant)
    full = unshard(per_rank, vocab_spec(TIED.vocab_size, len(per_rank)))[0]
    return compare("grad_tied_weight", full, refs["single"], refs["exact"], torch.float32, len(per_rank), magnitude=refs["magnitude"])


def contribution_gap(refs: dict, tied_exact: torch.Tensor) -> float:
    """max |tied - (embedding's + LM head's gradient of an untied model with the same weights)|,
    in float64, over the magnitude S. The two contributions are computed alike in both models and
    the tied one adds them once more, so a right tie is a few float64 ulps of S away."""
    from impl.model import LlamaModel

    tensors, ids, grad_out = refs["inputs"]
    untied = LlamaModel.from_tensors({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"]}, dataclasses.replace(TIED, tie_word_embeddings=False),
                                     NullCommunicator(1), dtype=torch.float64)
    untied(ids).backward(grad_out.double())
    both = untied.embed.weight.grad + untied.lm_head.weight.grad
    assert untied.lm_head.weight.grad.abs().max() > 0.1 * both.abs().max()  # the head's share is not negligible
    return (both - tied_exact).abs().max().item() / refs["magnitude"].abs().max().item()


def test_single_device_tied_gradient_is_both_contributions(tied_grad_references):
    """The reference itself, which the TP runs are compared against: a tie broken at every tp
    (single device included) would pass that comparison, so the single-device tied gradient is
    checked against an untied model, and the check rejects a head detached from the graph."""
    assert contribution_gap(tied_grad_references, tied_grad_references["exact"]) <= 4 * 2.0 ** -53
    tensors, ids, grad_out = tied_grad_references["inputs"]
    ctx = SimpleNamespace(comm=NullCommunicator(1), device=torch.device("cpu"), rank=0, world_size=1)
    detached = loading_rank_fns.tied_gradient(ctx, TIED, tensors, ids, grad_out, torch.float64, False, "detached_tie")
    assert contribution_gap(tied_grad_references, detached) > 0.01


@pytest.mark.parametrize("tp", (2, 4))
def test_tied_gradient_matches_single_device(tp, tied_grad_references, worlds):
    row = _tied_grad_row(tied_grad_references, worlds[tp])
    assert row["passed"], row


@pytest.mark.parametrize("mutant", ("detached_tie", "copied_tie"))
def test_tied_gradient_check_rejects_a_broken_tie(mutant, tied_grad_references, worlds):
    """A head outside the embedding's autograd graph, or on a copy: the gradient misses the head's share."""
    assert _tied_grad_row(tied_grad_references, worlds[2])["passed"], "the real implementation must pass this case"
    row = _tied_grad_row(tied_grad_references, worlds[2], mutant)
    assert not row["passed"], f"{mutant} slipped through: {row}"


# --------------------------------------------------------------------------- bytes read while loading


@pytest.fixture(scope="module")
def read_checkpoints(checkpoint, tmp_path_factory) -> list[str]:
    """The tied checkpoint with the tied copy stored as well (some exporters do; the loader must
    not read it), one with q/k/v/o biases, an index of 20 KB shard files, Phi-3's fused
    qkv_proj / gate_up_proj and Mixtral's experts and router."""
    stored_copy = tmp_path_factory.mktemp("tied-with-stored-copy")
    source = checkpoint(TIED_CHECKPOINT)
    (stored_copy / "config.json").write_text((source / "config.json").read_text())
    tensors = load_file(source / "model.safetensors")
    save_file({**tensors, "lm_head.weight": tensors["model.embed_tokens.weight"].clone()}, stored_copy / "model.safetensors", metadata={"format": "pt"})
    sharded = checkpoint("llama-gqa", sharded=True)
    assert (sharded / "model.safetensors.index.json").is_file() and len(list(sharded.glob("*.safetensors"))) > 1
    return [str(stored_copy), str(checkpoint("llama-attention-bias")), str(sharded), str(checkpoint("phi3")), str(checkpoint("mixtral"))]


def _budget(directory: str, tp: int, rank: int) -> dict[str, int]:
    """{tensor name: bytes rank may read} over every tensor the checkpoint's files hold."""
    config = read_config(directory)
    return {name: read_budget(name, shape, config, tp, rank) * itemsize for name, (shape, itemsize) in header(directory).items()}


def read_mismatches(reads: dict[str, int], directory: str, tp: int, rank: int) -> list[str]:
    """Tensors whose bytes read differ from the rank's budget. More breaks the contract; less would
    mean bytes came past the counted handles (a correct loader reads each element of its shard once)."""
    budget = _budget(directory, tp, rank)
    return [f"{name}: read {reads.get(name, 0)} bytes, budget {budget.get(name, 0)}" for name in sorted(set(budget) | set(reads))
            if reads.get(name, 0) != budget.get(name, 0)]


@pytest.mark.parametrize("tp", WORLD_SIZES)
def test_each_rank_reads_only_its_shards(tp, read_checkpoints, worlds):
    per_rank = worlds[tp].run(loading_rank_fns.bytes_read, read_checkpoints)
    failures = {(rank, Path(d).name): read_mismatches(reads[d], d, tp, rank) for rank, reads in enumerate(per_rank) for d in read_checkpoints}
    assert not any(failures.values()), {k: v for k, v in failures.items() if v}


@pytest.mark.parametrize("mutant", ("whole_tensor_take", "materialised_checkpoint"))
def test_bytes_read_check_rejects_whole_tensor_loaders(mutant, read_checkpoints, worlds):
    """Loaders that read whole tensors and slice afterwards build the same shards; they are caught
    on every rank and checkpoint, reading more than the budget of some tensor."""
    tp = 4
    per_rank = worlds[tp].run(loading_rank_fns.bytes_read, read_checkpoints, mutant)
    for rank, reads in enumerate(per_rank):
        for d in read_checkpoints:
            assert any(reads[d].get(name, 0) > budget for name, budget in _budget(d, tp, rank).items()), (mutant, rank, Path(d).name)


def test_bytes_read_check_rejects_a_fused_view_that_reads_the_whole_tensor(read_checkpoints, worlds):
    """A row-range view of Phi-3's fused tensors that reads the whole fused tensor and slices it
    afterwards builds the same shards; every rank reads more than its budget of qkv_proj and gate_up_proj."""
    tp, phi3 = 4, next(d for d in read_checkpoints if read_config(d).fused_projections)
    per_rank = worlds[tp].run(loading_rank_fns.bytes_read, [phi3], "whole_fused_read")
    for rank, reads in enumerate(per_rank):
        over = {name for name, budget in _budget(phi3, tp, rank).items() if reads[phi3].get(name, 0) > budget}
        assert over and all(name.endswith(("qkv_proj.weight", "gate_up_proj.weight")) for name in over), (rank, over)
