"""Rank-side functions of the fault matrix (module level, so spawned ranks can import them).

Faults are injected with forward hooks on one rank's model, so impl/ is exercised as shipped.
"""
from __future__ import annotations

import os
import signal
import time

import torch

from harness.numerics import FiniteWatch
from impl.architecture import ModelConfig
from impl.model import random_model
from impl.model_loader import DistributedCheckpointLoader

# Small but collective-heavy: embedding all-reduce, 2 all-reduces per layer, LM-head all-gather.
TINY = ModelConfig(vocab_size=96, hidden_size=64, intermediate_size=128, num_layers=4, num_heads=4, num_kv_heads=4, max_seq_len=64)
FAULT_LAYER = 2  # the fault strikes after 1 + 2*FAULT_LAYER + 1 collectives, with more to come


class InjectedFault(RuntimeError):
    pass


def all_reduce_rank(ctx):
    return ctx.comm.all_reduce(torch.tensor([float(ctx.rank + 1)])).item()


def _model(ctx, seed: int = 0):
    return random_model(TINY, ctx.comm, torch.float32, ctx.device, seed=seed).eval()


def _ids(ctx):
    return torch.randint(0, TINY.vocab_size, (2, 16), generator=torch.Generator().manual_seed(0)).to(ctx.device)


def _inject(kind: str, rank: int, seconds: float):
    if kind == "raise":
        raise InjectedFault(f"injected failure on rank {rank} entering layers.{FAULT_LAYER}.mlp")
    if kind == "exit":
        os._exit(7)
    if kind == "sigkill":  # what the OOM killer does; the driver sees the same as an external kill -9
        os.kill(os.getpid(), signal.SIGKILL)
    if kind == "sleep":
        time.sleep(seconds)


def forward_with_fault(ctx, kind: str, bad_rank: int, seconds: float = 0.0):
    """A full forward in which `bad_rank` meets `kind` on entering layers.FAULT_LAYER.mlp:
    its peers go on into that MLP's all-reduce and wait there for it."""
    model = _model(ctx)
    hook = None
    if ctx.rank == bad_rank:
        hook = model.layers[FAULT_LAYER].mlp.register_forward_pre_hook(lambda module, args: _inject(kind, ctx.rank, seconds))
    with torch.no_grad():
        out = model(_ids(ctx))
    if hook is not None:
        hook.remove()
    return out.sum().item()


def stray_collective(ctx, bad_rank: int):
    """A forward, then `bad_rank` alone enters one more all-reduce, which nobody joins:
    it hangs inside a collective while its peers have returned."""
    with torch.no_grad():
        out = _model(ctx)(_ids(ctx)).sum().item()
    if ctx.rank == bad_rank:
        ctx.comm.all_reduce(torch.ones(1))
    return out


def nonfinite_forward(ctx, bad_rank: int, module: str, value: float):
    """Corrupt one element of `bad_rank`'s shard of `module`.weight with `value` (nan/inf),
    run a forward under FiniteWatch and return where this rank first saw a non-finite value."""
    model = _model(ctx)
    if ctx.rank == bad_rank:
        with torch.no_grad():
            model.get_submodule(module).weight.view(-1)[0] = value
    with FiniteWatch(model, ctx.rank) as watch, torch.no_grad():
        model(_ids(ctx))
    return watch.record()


def load_checkpoint(ctx, directory: str):
    DistributedCheckpointLoader(directory, ctx.comm).load()
