"""Sequence parallelism, resharding round trips and sampling across ranks."""
from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from harness.tolerance import compare
from impl.model_loader import HFCheckpoint, ShardCheckpoint, read_config

from . import rank_fns


def _ids(directory, batch=2, seq=8, seed=0):
    vocab = read_config(directory).vocab_size
    return torch.randint(0, vocab, (batch, seq), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("world_size,seq,dtype", [(ws, seq, "float32") for ws in (1, 2, 4) for seq in (8, 7)] + [(2, 8, "bfloat16"), (4, 8, "bfloat16")])
def test_sequence_parallel_model_matches_plain_tp(world_size, seq, dtype, checkpoint, worlds):
    """Sequence-parallel prefill (seq a multiple of tp; 7 is not, and falls back to plain TP) gives
    the single-device function within the tolerance policy: full logits, the last-token logits
    (only each shard's last token is gathered) and the greedy token (selected on the vocabulary
    shards, equal to the argmax of the same forward's last-token logits)."""
    directory, torch_dtype = str(checkpoint("llama-gqa")), getattr(torch, dtype)
    ids = _ids(directory, seq=seq)
    plain = worlds[world_size].run(rank_fns.prefill_outputs, directory, ids, False, torch_dtype)[0]
    sp = worlds[world_size].run(rank_fns.prefill_outputs, directory, ids, True, torch_dtype)
    for key in ("logits", "last", "greedy"):
        assert all(torch.equal(s[key], sp[0][key]) for s in sp), f"{key} differs between ranks"
    single = worlds[1].run(rank_fns.prefill_outputs, directory, ids, False, torch_dtype)[0]
    exact = worlds[1].run(rank_fns.prefill_outputs, directory, ids, False, torch.float64)[0]
    for key in ("logits", "last"):
        row = compare(key, sp[0][key], single[key], exact[key], torch_dtype, world_size)
        assert row["passed"], row
    assert torch.equal(sp[0]["greedy"], sp[0]["last"][:, -1].argmax(-1))
    if seq % world_size or world_size == 1:
        assert all(torch.equal(sp[0][key], plain[key]) for key in plain)


@pytest.mark.parametrize("save_tp,load_tp", [(4, 2), (2, 1), (1, 4), (4, 4)])
def test_resharding_round_trips_exactly(save_tp, load_tp, checkpoint, worlds, tmp_path, variant):
    directory = str(checkpoint(variant))
    out = tmp_path / "shards"
    worlds[save_tp].run(rank_fns.save, directory, str(out))
    meta = json.loads((out / "tpgate-shards.json").read_text())
    assert meta["tp"] == save_tp and len(meta["files"]) == save_tp
    # every full tensor rebuilt from the shards equals the original bit for bit
    original, rebuilt = HFCheckpoint(directory), ShardCheckpoint(out)
    for name in rebuilt:
        assert torch.equal(rebuilt[name], original[name][:].float()), name
    # and loading at another degree gives exactly the shards a direct load gives
    direct = worlds[load_tp].run(rank_fns.local_state, directory)
    resharded = worlds[load_tp].run(rank_fns.local_state, str(out))
    for a, b in zip(direct, resharded):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("world_size", (2, 4))
@pytest.mark.parametrize("temperature,top_k,top_p", [(0.0, None, None), (1.0, None, None), (0.8, 5, None), (1.2, None, 0.9), (1.0, 10, 0.8)])
def test_every_rank_samples_the_same_tokens(world_size, temperature, top_k, top_p, checkpoint, worlds):
    directory = str(checkpoint("qwen2"))
    ids = _ids(directory, seq=5)
    tokens = worlds[world_size].run(rank_fns.sample, directory, ids, temperature, top_k, top_p, 11)
    assert all(torch.equal(t, tokens[0]) for t in tokens)
    assert tokens[0].shape == (2, 6) and int(tokens[0].max()) < read_config(directory).vocab_size
    if temperature == 0:  # greedy does not depend on the world size
        assert torch.equal(tokens[0], worlds[1].run(rank_fns.sample, directory, ids, 0.0, None, None, 11)[0])


def test_top_k_one_is_greedy(checkpoint, worlds):
    directory = str(checkpoint("llama-gqa"))
    ids = _ids(directory, seq=5)
    greedy = worlds[2].run(rank_fns.sample, directory, ids, 0.0, None, None, 0)[0]
    assert torch.equal(worlds[2].run(rank_fns.sample, directory, ids, 1.5, 1, None, 123)[0], greedy)


def test_shard_files_hold_only_their_shard(checkpoint, worlds, tmp_path):
    directory = str(checkpoint("llama-gqa"))
    worlds[4].run(rank_fns.save, directory, str(tmp_path))
    with safe_open(str(tmp_path / "rank000-of-004.safetensors"), framework="pt") as f:
        qkv = f.get_slice("layers.0.attention.qkv.weight").get_shape()
    cfg = read_config(directory)
    assert qkv == [(cfg.num_heads // 4 + 2 * max(1, cfg.num_kv_heads // 4)) * cfg.head_dim, cfg.hidden_size]
