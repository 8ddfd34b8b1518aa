"""NaN/Inf born in one rank's weight shard is reported where it first appeared (rank, module,
dtype, count), not as a mismatch far downstream where every rank sees it."""
from __future__ import annotations

import pytest
import torch

from harness.numerics import FiniteWatch, NumericalError, raise_first_nonfinite
from impl.communication import NullCommunicator
from impl.model import random_model

from . import rank_fns
from .support import expect_error

# One forward of the tiny model under the hooks (~0.1 s measured) and one run() round trip;
# no failure and no teardown happen, so 5 s is ample headroom for a loaded 2-core machine.
NONFINITE_BOUND_S = 5.0
BAD = 1
ORIGIN = f"layers.{rank_fns.FAULT_LAYER}.mlp.gate_up"  # column-parallel: the corrupt shard stays on its rank until `down`


@pytest.mark.parametrize("value,kind", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_nonfinite_activation_names_rank_and_layer(fault_worlds, world_size, time_table, value, kind):
    world = fault_worlds.get(world_size)
    pids = world.pids
    f = expect_error(lambda: raise_first_nonfinite(world.run(rank_fns.nonfinite_forward, BAD, ORIGIN, value)), NumericalError, NONFINITE_BOUND_S)
    err = f.error
    assert (err.rank, err.module, err.dtype) == (BAD, ORIGIN, "float32")
    assert err.count >= 1 and kind in err.first.kinds
    assert f"rank {BAD}" in str(err) and ORIGIN in str(err) and "float32" in str(err)
    # every other rank saw it only after the row-parallel all-reduce spread it: later, downstream
    downstream = {o.rank: o for o in err.others}
    assert set(downstream) == set(range(world_size)) - {BAD}
    assert all(o.call_index > err.first.call_index and o.module != ORIGIN for o in downstream.values())
    assert world.pids == pids and world.run(rank_fns.all_reduce_rank) == [world_size * (world_size + 1) / 2] * world_size, "the world stays usable"
    time_table.record(f"{'NaN' if kind == 'nan' else 'Inf'} in one rank's weight shard → NumericalError (rank, module)", world_size, NONFINITE_BOUND_S, f.elapsed_s)


def test_finite_forward_raises_nothing(fault_worlds):
    records = fault_worlds.get(2).run(rank_fns.nonfinite_forward, BAD, ORIGIN, 0.5)
    assert records == [None, None]
    raise_first_nonfinite(records)


def test_watch_on_one_device_and_hooks_removed():
    model = random_model(rank_fns.TINY, NullCommunicator(1), torch.float32).eval()
    hooks = sum(len(m._forward_hooks) for m in model.modules())
    model.layers[0].attention.o_proj.weight.data[0, 0] = float("-inf")
    with FiniteWatch(model) as watch, torch.no_grad():
        model(torch.zeros(1, 4, dtype=torch.long))
    assert sum(len(m._forward_hooks) for m in model.modules()) == hooks
    with pytest.raises(NumericalError, match=r"rank 0: \d+ of \d+ float32 values non-finite \((nan\+)?inf\) in the output of layers\.0\.attention\.o_proj"):
        watch.check()
