"""Bad configs and loader edge cases end in a named error before any weight is copied.

The table of damaged checkpoint files (truncated, corrupt header, missing shard, missing or
unexpected tensors, wrong shape or dtype, pickle) with time-to-error bounds lives in
suites/faults/test_checkpoint_faults.py."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from harness.verify import VerifyRequest, check_request
from impl.architecture import TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import CheckpointError, DistributedCheckpointLoader
from harness.runtime.orchestrator import RankError

from . import rank_fns


@pytest.fixture
def ckpt(checkpoint, tmp_path):
    d = tmp_path / "ckpt"
    shutil.copytree(checkpoint("llama-gqa"), d)
    return d


def _load(directory, tp=1):
    return DistributedCheckpointLoader(directory, NullCommunicator(tp, 0)).load()


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
    path = ckpt / "model.safetensors"
    tensors = load_file(path)
    del tensors["model.norm.weight"]
    save_file(tensors, path, metadata={"format": "pt"})
    with pytest.raises(RankError, match=r"CheckpointError: tensor model\.norm\.weight missing"):
        worlds[2].run(rank_fns.load_error, str(ckpt))


@pytest.mark.parametrize("edit,match", [
    ({"hidden_activation": "gelu"}, "hidden_activation='gelu'"),
    ({"layer_types": ["sliding_attention"]}, "layer_types=.*num_hidden_layers=2"),
    ({"final_logit_softcapping": 0}, "final_logit_softcapping=0"),
])
def test_bad_gemma_config_is_refused_before_processes(checkpoint, tmp_path, edit, match):
    d = tmp_path / "gemma2"
    shutil.copytree(checkpoint("gemma2"), d)
    path = d / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    with pytest.raises(TPConfigError, match=match):
        check_request(VerifyRequest(str(d), (1, 2)))
    with pytest.raises(TPConfigError, match=match):
        _load(d)
