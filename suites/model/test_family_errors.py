"""Phi-3 and Mixtral configs and checkpoints tpgate cannot shard or compute end in a TPConfigError
or CheckpointError naming the field or tensor, its value and the constraint, before any process
starts (`verify`'s check_request) or any weight is copied (the loader's validate)."""
from __future__ import annotations

import json
import shutil

import pytest
from safetensors.torch import load_file, save_file

from harness.verify import VerifyRequest, check_request
from impl.architecture import ModelConfig, TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import CheckpointError, DistributedCheckpointLoader

LONGROPE = {"rope_type": "longrope", "short_factor": [1.0] * 4, "long_factor": [2.0] * 4, "rope_theta": 10000.0}


def _copy(checkpoint, tmp_path, variant: str, **edit):
    d = tmp_path / variant
    shutil.copytree(checkpoint(variant), d)
    path = d / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **edit}))
    return d


@pytest.mark.parametrize("variant,edit,argument,value", [
    # Phi-3-mini-128k's config says {"type": "longrope"} (older ones "su"): transformers' Phi3Config maps su and yarn to longrope
    ("phi3", {"rope_scaling": {**{k: v for k, v in LONGROPE.items() if k != "rope_type"}, "type": "su"}}, "rope_scaling.rope_type", "longrope"),
    ("phi3", {"rope_parameters": LONGROPE}, "rope_scaling.rope_type", "longrope"),
    ("phi3", {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0}}, "rope_scaling.rope_type", "linear"),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.1}}, "partial_rotary_factor", 0.1),
    ("phi3", {"rope_parameters": {"rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 1.5}}, "partial_rotary_factor", 1.5),
    ("phi3", {"hidden_act": "gelu"}, "hidden_act", "gelu"),
    ("mixtral", {"num_experts_per_tok": 5}, "num_experts_per_tok", 5),
    ("mixtral", {"num_experts_per_tok": 0}, "num_experts_per_tok", 0),
    ("mixtral", {"num_local_experts": None}, "num_local_experts", None),
    ("mixtral", {"router_jitter_noise": -0.1}, "router_jitter_noise", -0.1),
    ("mixtral", {"intermediate_size": 98}, "--tp", 4),  # each expert's w1/w3 rows and w2 columns split 4 ways
])
def test_family_config_refused_before_processes(variant, edit, argument, value, checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path, variant, **edit)
    with pytest.raises(TPConfigError) as info:
        check_request(VerifyRequest(str(d), (1, 2, 4)))
    err = info.value
    assert (err.argument, err.value) == (argument, value), str(err)
    assert argument in str(err) and repr(value) in str(err) and err.constraint in str(err)


def test_expert_intermediate_size_is_named_in_the_tp_refusal(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path, "mixtral", intermediate_size=98)
    with pytest.raises(TPConfigError, match="--tp=4.*intermediate_size=98"):
        check_request(VerifyRequest(str(d), (4,)))


@pytest.mark.parametrize("variant,tensor,rows", [
    ("phi3", "model.layers.0.self_attn.qkv_proj.weight", 88),  # one kv head's rows short of q (64) + k (16) + v (16)
    ("phi3", "model.layers.1.mlp.gate_up_proj.weight", 96),  # gate's rows alone
    ("mixtral", "model.layers.0.block_sparse_moe.gate.weight", 3),  # a router for 3 of the 4 experts
    ("mixtral", "model.layers.1.block_sparse_moe.experts.2.w3.weight", 48),
])
def test_misshaped_family_tensor_is_named_before_loading(variant, tensor, rows, checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path, variant)
    tensors = load_file(d / "model.safetensors")
    expected = tuple(tensors[tensor].shape)
    tensors[tensor] = tensors[tensor][:rows].clone()
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError) as info:
        DistributedCheckpointLoader(d, NullCommunicator(2, 0)).load()
    assert f"tensor {tensor} has shape {(rows, *expected[1:])}, the config implies {expected}" in str(info.value)


def test_missing_expert_is_named(checkpoint, tmp_path):
    d = _copy(checkpoint, tmp_path, "mixtral")
    tensors = load_file(d / "model.safetensors")
    del tensors["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    save_file(tensors, d / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(CheckpointError, match=r"tensor model\.layers\.1\.block_sparse_moe\.experts\.3\.w2\.weight missing"):
        DistributedCheckpointLoader(d, NullCommunicator(1, 0)).load()


def test_sequence_parallel_moe_is_refused(checkpoint):
    with pytest.raises(TPConfigError, match="sequence_parallel=True: is not supported for mixture-of-experts"):
        DistributedCheckpointLoader(checkpoint("mixtral"), NullCommunicator(2, 0)).load(sequence_parallel=True)


@pytest.mark.parametrize("kwargs,argument,value", [
    ({"num_experts": 4, "num_experts_per_tok": 5}, "num_experts_per_tok", 5),
    ({"num_experts": -1}, "num_experts", -1),
    ({"rotary_dim": 3}, "rotary_dim", 3),
    ({"rotary_dim": 10}, "rotary_dim", 10),  # > head_dim 8
])
def test_model_config_family_fields_checked(kwargs, argument, value):
    with pytest.raises(TPConfigError) as info:
        ModelConfig(hidden_size=64, num_heads=8, num_kv_heads=2, **kwargs)
    assert (info.value.argument, info.value.value) == (argument, value)


def test_dtensor_peer_refuses_the_families(checkpoint):
    from harness.implementations import Unsupported
    from harness.implementations.dtensor import DTENSOR
    from impl.model_loader import read_config

    for variant, field in (("phi3", "fused_projections"), ("mixtral", "num_experts")):
        with pytest.raises(Unsupported, match=field):
            DTENSOR.check(read_config(checkpoint(variant)), 1)
