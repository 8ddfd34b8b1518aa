"""Bad input fails fast with TPConfigError naming the argument, its value and the
constraint — before any process is started or collective entered."""
from __future__ import annotations

import multiprocessing

import pytest
import torch

from impl.architecture import ModelConfig, TPConfigError, parse_dtype
from impl.communication import NullCommunicator
from impl.orchestrator import MultiGPUOrchestrator, ProcessGroupManager, choose_backend
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
