"""Rope frequency bugs shared by tpgate's single-device and TP code, and the rank-side wrapper
that plants one in a rank process (module level so spawned ranks can import it).

A mutant replaces one helper of impl.tensor_parallel; every rotary table — tpgate's layers at
any TP degree, the float64 reference the driver builds, the dtensor peer — reads its helpers
from that module, so the bug is shared by the implementation under test and its own reference,
and only an independent reference (transformers) can expose it. A driver-side monkeypatch does
not reach spawned ranks: they run `with_mutant`, and the driver wraps its own reference in
`mutated`.
"""
from __future__ import annotations

import contextlib

import torch

from impl import tensor_parallel as rotary

REAL = {name: getattr(rotary, name) for name in ("rotary_exponents", "yarn_ramp", "rotary_attention_factor", "dynamic_ntk_base")}


def exponent_missing_factor_2(head_dim, device=None):
    """i / head_dim instead of 2i / head_dim: every frequency but the first too high."""
    return torch.arange(head_dim // 2, dtype=torch.float64, device=device) / head_dim


def yarn_ramp_reversed(low, high, n):
    """yarn interpolates the fast frequencies and keeps the slow ones (the blend inverted)."""
    return 1 - REAL["yarn_ramp"](low, high, n)


def yarn_attention_factor_dropped(scaling):
    """cos and sin left unscaled by yarn's attention factor."""
    return 1.0


def dynamic_ntk_unclamped(head_dim, theta, p, seq_len):
    """The NTK base rescaled for sequences shorter than max_position_embeddings too."""
    length = torch.as_tensor(seq_len).to(torch.float64)
    return theta * (p["factor"] * length / p["max_position_embeddings"] - (p["factor"] - 1)) ** (head_dim / (head_dim - 2))


def dynamic_ntk_exponent_dropped(head_dim, theta, p, seq_len):
    """The NTK base grown by the length ratio alone, without the head_dim / (head_dim - 2) exponent."""
    length = torch.as_tensor(seq_len).to(torch.float64).clamp_min(p["max_position_embeddings"])
    return theta * (p["factor"] * length / p["max_position_embeddings"] - (p["factor"] - 1))


MUTANTS = {  # name -> (helper of impl.tensor_parallel it replaces, the replacement)
    "exponent_missing_factor_2": ("rotary_exponents", exponent_missing_factor_2),
    "yarn_ramp_reversed": ("yarn_ramp", yarn_ramp_reversed),
    "yarn_attention_factor_dropped": ("rotary_attention_factor", yarn_attention_factor_dropped),
    "dynamic_ntk_unclamped": ("dynamic_ntk_base", dynamic_ntk_unclamped),
    "dynamic_ntk_exponent_dropped": ("dynamic_ntk_base", dynamic_ntk_exponent_dropped),
}


@contextlib.contextmanager
def mutated(mutant: str | None):
    """impl.tensor_parallel with `mutant` planted (None: unchanged) for the duration of the block."""
    if mutant is None:
        yield
        return
    helper, replacement = MUTANTS[mutant]
    setattr(rotary, helper, replacement)
    try:
        yield
    finally:
        setattr(rotary, helper, REAL[helper])


def with_mutant(ctx, mutant: str | None, fn, *args):
    """Rank side: fn(ctx, *args) with `mutant` planted in this rank process."""
    with mutated(mutant):
        return fn(ctx, *args)


class MutatedWorld:
    """A world whose every run() executes with `mutant` planted in each rank (verify()'s worlds_factory)."""

    def __init__(self, world, mutant: str):
        self.world, self.mutant = world, mutant

    def run(self, fn, *args):
        return self.world.run(with_mutant, self.mutant, fn, *args)
