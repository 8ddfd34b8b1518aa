"""Greedy selection on the vocabulary shards (ParallelLMHead.greedy, LlamaModel.greedy) equals the
argmax of the gathered logits at TP 1/2/4: ties to the lowest index, padded rows never chosen.

The cases are integer-valued (greedy_rank_fns.integer_case): logits are exact in every dtype, so
ties are real ties — inside a shard and across shards — and the single-device float64 argmax is the
exact answer, with no rounding to excuse a difference."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from ..conftest import WORLD_SIZES
from . import greedy_rank_fns
from .greedy_rank_fns import integer_case


def _check(world, vocab, hidden, distinct, negative, seed, dtype, mutant=None):
    weight, x = integer_case(vocab, hidden, distinct, negative, seed)
    exact = (x.double() @ weight.double().T).argmax(-1)  # first maximum: torch.argmax's tie rule
    for rank, r in enumerate(world.run(greedy_rank_fns.greedy_vs_gathered, weight, x, dtype, mutant)):
        assert torch.equal(r["gathered_argmax"], exact), f"rank {rank}: the gathered logits' argmax is not the exact one"
        assert torch.equal(r["greedy"], exact), f"rank {rank}: greedy {r['greedy'].tolist()} != argmax {exact.tolist()}"


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_greedy_on_shards_equals_argmax_of_gathered_logits(world_size, dtype, worlds):
    @settings(max_examples=8, deadline=None)
    @given(vocab=st.integers(1, 41), hidden=st.integers(1, 12), distinct=st.integers(1, 4), negative=st.booleans(), seed=st.integers(0, 2**31 - 1))
    def check(vocab, hidden, distinct, negative, seed):
        _check(worlds[world_size], vocab, hidden, distinct, negative, seed, dtype)

    check()


# (mutant, a case that exposes it). Vocab 10 at tp 4: 3 rows per rank, rank 3 holds 9 and two padded rows.
# ties_to_last_rank: one prototype, so every real logit ties and index 0 must win over 9;
# local_index: seed 4's maxima sit at index 6 (rank 2); padding_unmasked: every real logit < 0.
MUTANT_CASES = [
    ("ties_to_last_rank", dict(vocab=10, hidden=4, distinct=1, negative=False, seed=1)),
    ("local_index", dict(vocab=10, hidden=4, distinct=3, negative=False, seed=4)),
    ("padding_unmasked", dict(vocab=10, hidden=4, distinct=3, negative=True, seed=3)),
]


@pytest.mark.parametrize("mutant,case", MUTANT_CASES, ids=[m for m, _ in MUTANT_CASES])
def test_broken_greedy_is_rejected(mutant, case, worlds):
    _check(worlds[4], **case, dtype="float32")
    with pytest.raises(AssertionError, match="greedy"):
        _check(worlds[4], **case, dtype="float32", mutant=mutant)
