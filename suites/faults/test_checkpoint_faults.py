"""Bad checkpoints: one table, each row a CheckpointError that names the file and/or tensor and
the constraint, raised from headers alone (before any weight is copied or collective run).

Every row runs for each rank of world sizes 2 and 4 the way a rank does it
(`DistributedCheckpointLoader(dir, comm).load()` with that rank's (rank, world size)), in the
test process: checkpoint validation is per rank and collective-free, so a process per row
would only add a world start (~1-2 s) per row. How a rank's CheckpointError reaches the
driver (RankError naming every rank, no survivors, a new world starts) is checked once per
world size through real ranks, in `test_checkpoint_error_through_ranks`.
"""
from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from impl.architecture import ModelConfig
from impl.communication import NullCommunicator
from impl.model import checkpoint_shapes
from impl.model_loader import CheckpointError, DistributedCheckpointLoader
from harness.runtime.orchestrator import RankError

from . import rank_fns
from .support import expect_error, world_fault

HF_CONFIG = {"model_type": "llama", "vocab_size": 101, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 2,
             "num_attention_heads": 8, "num_key_value_heads": 2, "max_position_embeddings": 64, "rms_norm_eps": 1e-5}
# Only headers (a few KB) and config.json are read before the error; ~10 ms measured. 2 s leaves
# room for a loaded 2-core machine and for the first import of safetensors in the process.
HEADER_BOUND_S = 2.0
# Through ranks: rank-side validation, then a polite shutdown of the failed world (every rank
# failed, so each is back in its loop: join up to 5 s, ~0.5 s measured) plus 2 s of slack.
THROUGH_RANKS_BOUND_S = HEADER_BOUND_S + 5.0


def write_checkpoint(directory, sharded: bool = False):
    """A random llama checkpoint in Hugging Face layout (config.json + safetensors), no transformers needed."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "config.json").write_text(json.dumps(HF_CONFIG))
    g = torch.Generator().manual_seed(0)
    tensors = {name: torch.randn(shape, generator=g) for name, shape in checkpoint_shapes(ModelConfig.from_hf(HF_CONFIG)).items()}
    if not sharded:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
        return directory
    names = sorted(tensors)
    files = {"model-00001-of-00002.safetensors": names[: len(names) // 2], "model-00002-of-00002.safetensors": names[len(names) // 2:]}
    for file, part in files.items():
        save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
    index = {"metadata": {}, "weight_map": {n: f for f, part in files.items() for n in part}}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))
    return directory


def _rewrite(d, change):
    path = d / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def _truncate(d):
    path = d / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])


def _corrupt_header(d):
    path = d / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all, just garbage!!"
    path.write_bytes(bytes(data))


def _remove_shard(d):
    (d / "model-00002-of-00002.safetensors").unlink()


def _pickle_only(suffix):
    def corrupt(d):
        (d / "model.safetensors").unlink()
        (d / f"pytorch_model{suffix}").write_bytes(b"\x80\x04this would be a pickle")
    return corrupt


K = "model.layers.0.self_attn.k_proj.weight"
# row: (corrupt(dir), sharded, what the message must say: file and/or tensor and the constraint)
CASES = {
    "truncated safetensors file": (_truncate, False, r"model\.safetensors: not a readable safetensors file \(\d+ bytes; .*file not fully covered"),
    "corrupt safetensors header": (_corrupt_header, False, r"model\.safetensors: not a readable safetensors file \(\d+ bytes; .*invalid JSON in header"),
    "shard file named in the index missing": (_remove_shard, True,
                                              r"model-00002-of-00002\.safetensors: shard file named in model\.safetensors\.index\.json is missing \(holds model\."),
    "missing tensor key": (lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")), False,
                           r"tensor model\.layers\.1\.mlp\.up_proj\.weight missing from \[.*model\.safetensors'\] .*required by .*config\.json"),
    "unexpected tensor key": (lambda d: _rewrite(d, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2))), False,
                              r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.extra\.weight .* for a llama config"),
    "wrong shape": (lambda d: _rewrite(d, lambda t: t.__setitem__(K, torch.zeros(8, 64))), False,
                    rf"model\.safetensors: tensor {re.escape(K)} has shape \(8, 64\), the config implies \(16, 64\)"),
    "wrong dtype": (lambda d: _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32))), False,
                    r"model\.safetensors: tensor model\.norm\.weight has dtype I32, expected one of \['BF16', 'F16', 'F32'\]"),
    "pickle checkpoint (.bin)": (_pickle_only(".bin"), False, r"only pickle checkpoints found \(pytorch_model\.bin\); tpgate never unpickles"),
    "pickle checkpoint (.pt)": (_pickle_only(".pt"), False, r"only pickle checkpoints found \(pytorch_model\.pt\); tpgate never unpickles"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_checkpoint_is_named(case, world_size, tmp_path, monkeypatch, time_table):
    corrupt, sharded, message = CASES[case]
    d = write_checkpoint(tmp_path / "ckpt", sharded)
    corrupt(d)
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))  # never unpickle
    worst = 0.0
    for rank in range(world_size):
        loader = DistributedCheckpointLoader(d, NullCommunicator(world_size, rank))
        f = expect_error(loader.load, CheckpointError, HEADER_BOUND_S)
        assert re.search(message, str(f.error)), f"{case}: {f.error}"
        worst = max(worst, f.elapsed_s)
    time_table.record(f"checkpoint: {case} → CheckpointError", world_size, HEADER_BOUND_S, worst)


def test_checkpoint_error_through_ranks(fault_worlds, world_size, tmp_path, time_table):
    d = write_checkpoint(tmp_path / "ckpt")
    _rewrite(d, lambda t: t.pop("model.norm.weight"))
    f = world_fault(fault_worlds, world_size, tmp_path, rank_fns.load_checkpoint, str(d), error=RankError, bound_s=THROUGH_RANKS_BOUND_S)
    assert f.error.ranks == list(range(world_size)), "every rank validates and fails alike"
    assert all("CheckpointError: tensor model.norm.weight missing from" in tb for tb in f.error.tracebacks.values())
    time_table.record("checkpoint error on every rank → RankError (driver)", world_size, THROUGH_RANKS_BOUND_S, f.elapsed_s)
