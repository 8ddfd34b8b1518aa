"""Non-finite activations: find the module where NaN/Inf first appeared, on which rank.

A NaN born in one rank's shard spreads through the next all-reduce to every rank and then
to every later layer, so a comparison of final logits only says "mismatch at the output".
`FiniteWatch` puts a forward hook on every submodule of a model and records, per rank, the
first module (in call order) whose output holds a non-finite value. Hooks fire when a
module's forward returns, children before their parent, so the first record is the
innermost module that produced the value.

Contracts:
  FiniteWatch(model, rank).__enter__ registers the hooks, __exit__ removes them. The hooks
    only record (they never raise mid-forward: a rank that raised there would leave its peers
    waiting in the next collective). `first` is None or a `NonFinite` record; `check()` raises
    NumericalError for it. Hooks cost one isfinite per floating output: for diagnosis and
    tests, not for timing.
  earliest(records): given every rank's `first` (None where finite), the one with the lowest
    call index, i.e. the rank and module where the value first appeared; ties (the same call
    index on several ranks) go to the lowest rank.
  raise_first_nonfinite(records): NumericalError for `earliest`, listing where the other
    ranks first saw it; returns quietly when every record is None.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch


@dataclass(frozen=True)
class NonFinite:
    """The first non-finite output seen on one rank."""

    rank: int
    module: str  # path from the model root, e.g. "layers.1.mlp.gate_up"; "" is the model itself
    call_index: int  # forward calls on this rank before it (same on every rank: same model, same code)
    dtype: str
    count: int  # non-finite elements in that output
    numel: int
    kinds: str  # "nan", "inf" or "nan+inf"

    def describe(self) -> str:
        return (f"rank {self.rank}: {self.count} of {self.numel} {self.dtype} values non-finite ({self.kinds}) "
                f"in the output of {self.module or '<model>'} (forward call #{self.call_index})")


class NumericalError(ArithmeticError):
    """NaN/Inf appeared in activations. `first` names the rank and module where it first
    appeared; `others` where each other affected rank first saw it."""

    def __init__(self, first: NonFinite, others: tuple[NonFinite, ...] = ()):
        self.first, self.others = first, tuple(others)
        self.rank, self.module, self.dtype, self.count = first.rank, first.module, first.dtype, first.count
        seen = "".join(f"\n  then {o.describe()}" for o in self.others)
        super().__init__(f"non-finite activations first appeared on {first.describe()}{seen}")

    def __reduce__(self):  # picklable, so it can cross a process boundary intact
        return (NumericalError, (self.first, self.others))


def _tensors(output):
    if isinstance(output, torch.Tensor):
        yield output
    elif isinstance(output, (tuple, list)):
        for item in output:
            yield from _tensors(item)
    elif isinstance(output, dict):
        for item in output.values():
            yield from _tensors(item)


class FiniteWatch:
    """Record the first module whose forward output is not finite (see module docstring)."""

    def __init__(self, model: torch.nn.Module, rank: int = 0):
        self.model, self.rank = model, rank
        self.first: NonFinite | None = None
        self._calls = 0
        self._handles = []

    def _hook(self, name: str):
        def hook(module, inputs, output):
            index, self._calls = self._calls, self._calls + 1
            if self.first is not None:
                return
            for t in _tensors(output):
                if not t.is_floating_point():
                    continue
                t = t.detach()
                count = int((~torch.isfinite(t)).sum())
                if count:
                    nans = int(torch.isnan(t).sum())
                    kinds = "+".join(k for k, n in (("nan", nans), ("inf", count - nans)) if n)
                    self.first = NonFinite(self.rank, name, index, str(t.dtype).removeprefix("torch."), count, t.numel(), kinds)
                    return
        return hook

    def __enter__(self) -> "FiniteWatch":
        self.first, self._calls = None, 0
        self._handles = [m.register_forward_hook(self._hook(name)) for name, m in self.model.named_modules()]
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def check(self) -> None:
        if self.first is not None:
            raise NumericalError(self.first)

    def record(self) -> dict | None:
        """`first` as plain data (to return from a rank)."""
        return None if self.first is None else asdict(self.first)


def _as_record(r) -> NonFinite | None:
    return None if r is None else (r if isinstance(r, NonFinite) else NonFinite(**r))


def earliest(records) -> NonFinite | None:
    found = [x for x in map(_as_record, records) if x is not None]
    return min(found, key=lambda x: (x.call_index, x.rank)) if found else None


def raise_first_nonfinite(records) -> None:
    first = earliest(records)
    if first is None:
        return
    others = sorted((x for x in map(_as_record, records) if x is not None and x != first), key=lambda x: (x.call_index, x.rank))
    raise NumericalError(first, tuple(others))
