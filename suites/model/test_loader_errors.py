"""Every bad checkpoint ends in a CheckpointError naming the tensor and/or file — before any
weight is copied, and never by unpickling anything."""
from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from harness.verify import VerifyRequest, check_request
from impl.architecture import TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import CheckpointError, DistributedCheckpointLoader
from impl.orchestrator import RankError

from . import rank_fns


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama-gqa"), d)
    return d


def _load(directory, tp=1):
    return DistributedCheckpointLoader(directory, NullCommunicator(tp, 0)).load()


def _rewrite(directory, change):
    path = directory / "model.safetensors"
    tensors = load_file(path)
    change(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_truncated_file(ckpt):
    path = ckpt / "model.safetensors"
    path.write_bytes(path.read_bytes()[:-1000])
    with pytest.raises(CheckpointError, match=r"model\.safetensors: not a readable safetensors file"):
        _load(ckpt)


def test_corrupt_header(ckpt):
    path = ckpt / "model.safetensors"
    data = bytearray(path.read_bytes())
    data[8:40] = b"{not json at all, just garbage!!"
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="not a readable safetensors file"):
        _load(ckpt)


def test_missing_shard_file_named_in_index(checkpoint, tmp_path):
    d = tmp_path / "sharded"
    shutil.copytree(checkpoint("llama-gqa", sharded=True), d)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    victim = sorted(set(index["weight_map"].values()))[1]
    (d / victim).unlink()
    with pytest.raises(CheckpointError, match=f"{victim}: shard file named in model.safetensors.index.json is missing"):
        _load(d)


def test_missing_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.mlp\.up_proj\.weight missing from .*model\.safetensors"):
        _load(ckpt)


def test_unexpected_tensor(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.mlp.extra.weight", torch.zeros(2)))
    with pytest.raises(CheckpointError, match=r"model\.safetensors: unexpected tensor model\.layers\.0\.mlp\.extra\.weight"):
        _load(ckpt)


def test_wrong_shape(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.layers.0.self_attn.k_proj.weight", torch.zeros(8, 64)))
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.0\.self_attn\.k_proj\.weight has shape \(8, 64\), the config implies \(16, 64\)"):
        _load(ckpt)


def test_wrong_dtype(ckpt):
    _rewrite(ckpt, lambda t: t.__setitem__("model.norm.weight", torch.ones(64, dtype=torch.int32)))
    with pytest.raises(CheckpointError, match=r"tensor model\.norm\.weight has dtype I32"):
        _load(ckpt)


def test_pickle_checkpoint_is_refused_not_unpickled(ckpt, monkeypatch):
    (ckpt / "model.safetensors").unlink()
    (ckpt / "pytorch_model.bin").write_bytes(b"\x80\x04this would be a pickle")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load must never be called"))
    with pytest.raises(CheckpointError, match=r"only pickle checkpoints found \(pytorch_model\.bin\).*save_pretrained"):
        _load(ckpt)


@pytest.mark.parametrize("edit,match", [
    ({"model_type": "gpt2"}, "model_type='gpt2'"),
    ({"hidden_act": "gelu"}, "hidden_act='gelu'"),
])
def test_unsupported_config(ckpt, edit, match):
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(TPConfigError, match=match):
        _load(ckpt)


def test_missing_config(ckpt):
    (ckpt / "config.json").unlink()
    with pytest.raises(CheckpointError, match=r"config\.json: missing"):
        _load(ckpt)


def test_config_tp_cannot_shard_is_refused_before_processes(ckpt):
    path = ckpt / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "intermediate_size": 98}))
    with pytest.raises(TPConfigError, match="--tp=4.*intermediate_size=98"):
        check_request(VerifyRequest(str(ckpt), (1, 4)))
    with pytest.raises(CheckpointError, match="cannot shard 4 ways"):
        _load(ckpt, tp=4)


def test_error_on_ranks_reaches_the_driver_with_the_file_name(ckpt, worlds):
    _rewrite(ckpt, lambda t: t.pop("model.norm.weight"))
    with pytest.raises(RankError, match=r"CheckpointError: tensor model\.norm\.weight missing"):
        worlds[2].run(rank_fns.load_error, str(ckpt))


def test_sequence_beyond_sliding_window_is_refused(checkpoint):
    model = _load(checkpoint("mistral"))
    assert model.config.extra["sliding_window"] == 32
    with pytest.raises(TPConfigError, match="sliding_window=32"):
        model(torch.zeros(1, 33, dtype=torch.long))
