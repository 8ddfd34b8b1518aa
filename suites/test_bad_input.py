"""Bad input fails fast with TPConfigError naming the argument, its value and the
constraint — before any process is started or collective entered."""
from __future__ import annotations

import json
import multiprocessing

import pytest
import torch

from impl.architecture import ModelConfig, TPConfigError, parse_dtype
from impl.communication import NullCommunicator
from harness.runtime.orchestrator import MultiGPUOrchestrator, ProcessGroupManager, choose_backend
from impl.tensor_parallel import ColumnParallelLinear, MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding

tp4 = NullCommunicator(4, 1)


@pytest.mark.parametrize("build,argument,value", [
    (lambda: ColumnParallelLinear(8, 10, tp4), "out_features", 10),
    (lambda: RowParallelLinear(6, 8, tp4), "in_features", 6),
    (lambda: MergedColumnParallelLinear(8, [8, 6], tp4), "segment_sizes[1]", 6),
    (lambda: QKVParallelLinear(16, 4, 6, 2, tp4), "num_heads", 6),
    (lambda: QKVParallelLinear(24, 4, 12, 3, tp4), "num_kv_heads", 3),  # 3 neither divides nor is divided by 4
    (lambda: QKVParallelLinear(16, 4, 8, 3, tp4), "num_kv_heads", 3),  # does not divide num_heads
    (lambda: ModelConfig(num_heads=8, num_kv_heads=8, intermediate_size=10).check_tp(4), "intermediate_size", 10),
    (lambda: ModelConfig(hidden_size=96, num_heads=12, num_kv_heads=6, intermediate_size=8).check_tp(4), "num_kv_heads", 6),
    (lambda: ModelConfig(hidden_size=100, num_heads=8), "hidden_size", 100),
    (lambda: parse_dtype("float8"), "dtype", "float8"),
    (lambda: NullCommunicator(2, 5), "rank", 5),
])
def test_unshardable_configuration_names_argument_value_constraint(build, argument, value):
    with pytest.raises(TPConfigError) as info:
        build()
    err = info.value
    assert (err.argument, err.value) == (argument, value)
    assert argument in str(err) and repr(value) in str(err) and err.constraint in str(err)


@pytest.mark.parametrize("kwargs,argument", [
    ({"world_size": 0}, "world_size"),
    ({"world_size": 2, "device": "tpu"}, "device"),
    ({"world_size": 2, "backend": "mpi"}, "backend"),
    ({"world_size": 2, "backend": "nccl"}, "backend"),  # nccl needs CUDA
    ({"world_size": 2, "timeout_s": 0}, "timeout_s"),
])
def test_orchestrator_rejects_bad_world_before_starting_processes(kwargs, argument):
    before = set(multiprocessing.active_children())  # session worlds may be running
    with pytest.raises(TPConfigError) as info:
        MultiGPUOrchestrator(**kwargs).start()
    assert info.value.argument == argument
    assert set(multiprocessing.active_children()) <= before, "a process was started for a bad world"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-GPU message")
def test_cuda_world_without_gpu_is_refused():
    with pytest.raises(TPConfigError, match="no CUDA device"):
        MultiGPUOrchestrator(2, device="cuda")


@pytest.mark.parametrize("device,ranks,gpus,requested,expected", [
    ("cpu", 4, 0, "auto", "gloo"),
    ("cuda", 2, 2, "auto", "nccl"),
    ("cuda", 4, 8, "auto", "nccl"),
    ("cuda", 2, 1, "auto", "gloo"),  # ranks share a GPU: NCCL would refuse "Duplicate GPU"
    ("cuda", 4, 1, "gloo", "gloo"),
])
def test_backend_choice(device, ranks, gpus, requested, expected):
    assert choose_backend(device, ranks, gpus, requested) == expected


def test_nccl_with_more_ranks_than_gpus_is_refused():
    with pytest.raises(TPConfigError, match="one GPU per rank"):
        choose_backend("cuda", 4, 1, "nccl")


def test_torchrun_env_missing_is_named(monkeypatch):
    for var in ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(var, raising=False)
    with pytest.raises(TPConfigError, match="torchrun"):
        ProcessGroupManager.from_env()


def test_mismatched_input_dtype_is_named():
    layer = ColumnParallelLinear(4, 4, NullCommunicator(1), dtype=torch.bfloat16)
    with pytest.raises(TPConfigError, match="ColumnParallelLinear input"):
        layer(torch.ones(1, 4))
    emb = VocabParallelEmbedding(10, 4, NullCommunicator(1))
    with pytest.raises(TPConfigError, match="integer token ids"):
        emb(torch.ones(1, 2))


# --------------------------------------------------------------------------- rope scaling

ROPE_SIZES = dict(hidden_size=64, num_heads=4, num_kv_heads=4, max_seq_len=64)  # head_dim 16
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}
LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}


@pytest.mark.parametrize("rope_scaling,argument,value", [
    ({"rope_type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}, "rope_scaling.rope_type", "longrope"),
    ({"type": "axial"}, "rope_scaling.rope_type", "axial"),
    ({"rope_type": "ntk"}, "rope_scaling.rope_type", "ntk"),
    ("linear", "rope_scaling", "linear"),
    ({"rope_type": "linear"}, "rope_scaling.factor", None),
    ({"type": "linear", "factor": 0}, "rope_scaling.factor", 0),
    ({"rope_type": "dynamic", "factor": -2.0}, "rope_scaling.factor", -2.0),
    ({"rope_type": "linear", "factor": "2"}, "rope_scaling.factor", "2"),
    ({"rope_type": "yarn"}, "rope_scaling.factor", None),
    ({**YARN, "original_max_position_embeddings": 0}, "rope_scaling.original_max_position_embeddings", 0),
    ({**YARN, "original_max_position_embeddings": 16.5}, "rope_scaling.original_max_position_embeddings", 16.5),
    ({**YARN, "beta_fast": 1.0, "beta_slow": 2.0}, "rope_scaling.beta_fast", 1.0),
    ({**YARN, "beta_slow": -1.0}, "rope_scaling.beta_slow", -1.0),
    ({**YARN, "attention_factor": -1.0}, "rope_scaling.attention_factor", -1.0),
    ({**YARN, "truncate": "yes"}, "rope_scaling.truncate", "yes"),
    ({**YARN, "partial_rotary_factor": 0.5}, "rope_scaling.partial_rotary_factor", 0.5),
    ({k: v for k, v in LLAMA3.items() if k != "high_freq_factor"}, "rope_scaling.high_freq_factor", None),
    ({**LLAMA3, "low_freq_factor": 4.0}, "rope_scaling.high_freq_factor", 4.0),
    ({"rope_type": "proportional", "partial_rotary_factor": 1.5}, "rope_scaling.partial_rotary_factor", 1.5),
])
def test_bad_rope_scaling_names_field_value_constraint(rope_scaling, argument, value):
    with pytest.raises(TPConfigError) as info:
        ModelConfig(**ROPE_SIZES, rope_scaling=rope_scaling)
    err = info.value
    assert (err.argument, err.value) == (argument, value)
    assert f"{argument}={value!r}: {err.constraint}" == str(err) and err.constraint
    if argument == "rope_scaling.rope_type":  # the supported types are named
        assert "default, linear, dynamic, yarn, llama3, proportional" in err.constraint


@pytest.mark.parametrize("build,argument,value", [
    (lambda: ModelConfig(**ROPE_SIZES, rope_theta=0.0), "rope_theta", 0.0),
    (lambda: ModelConfig(**ROPE_SIZES, rope_theta=1.0, rope_scaling=YARN), "rope_theta", 1.0),  # yarn divides by log(theta)
    (lambda: ModelConfig(hidden_size=8, num_heads=4, num_kv_heads=4, rope_scaling={"rope_type": "dynamic", "factor": 2.0}), "head_dim", 2),
])
def test_rope_sizes_a_scaling_type_cannot_use(build, argument, value):
    with pytest.raises(TPConfigError) as info:
        build()
    assert (info.value.argument, info.value.value) == (argument, value)


HF_CONFIG = {"model_type": "llama", "vocab_size": 32, "hidden_size": 64, "intermediate_size": 96, "num_hidden_layers": 1,
             "num_attention_heads": 4, "max_position_embeddings": 64}


@pytest.mark.parametrize("rope,needle", [
    ({"rope_scaling": {"type": "longrope", "short_factor": [1.0] * 8, "long_factor": [2.0] * 8}}, "rope_scaling.rope_type='longrope'"),  # 4.x
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 0.0}}, "rope_scaling.factor=0.0"),  # 5.x
])
@pytest.mark.parametrize("tp_flag", ([], ["--tp", "1,2"]))
def test_tpgate_verify_refuses_an_unsupported_rope_before_any_rank(rope, needle, tp_flag, tmp_path, capsys, monkeypatch):
    """Exit 2 naming the field, read from config.json alone (no weights needed) before a world starts."""
    from harness.cli import main

    monkeypatch.setattr(MultiGPUOrchestrator, "__init__", lambda *a, **k: pytest.fail("a world was started"))
    (tmp_path / "config.json").write_text(json.dumps({**HF_CONFIG, **rope}))
    assert main(["verify", str(tmp_path), *tp_flag]) == 2
    assert needle in capsys.readouterr().err
