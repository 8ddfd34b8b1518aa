"""The model suite rejects the bugs a port of Qwen3 / Gemma 2 / Gemma 3 makes: each mutant
(family_rank_fns.MUTANTS) is planted in the driver's float64 reference and in every rank, and
`tpgate verify`'s own path must fail — on the semantic check against transformers (a bug the
reference shares) or on the TP rows (a bug of the sharded path alone). The same request on the
real implementation passes (and passes at TP 1/2/4 in float32 and bfloat16 in
test_hf_equivalence.test_model_matches_transformers_at_every_tp)."""
from __future__ import annotations

import pytest

from harness.verify import VerifyRequest, verify

from . import family_rank_fns

# (mutant, variant, TP degrees run): TP=1 where the bug is shared by every degree, 2 where it lives on the shards
CASES = [
    ("norm_after_rotary", "qwen3", (1,)),
    ("unit_offset_forgotten", "gemma2", (1,)),
    ("softcap_after_mask", "gemma2", (1,)),
    ("final_softcap_skipped_on_shards", "gemma2", (2,)),
    ("window_off_by_one", "gemma2", (1,)),
    ("rope_bases_swapped", "gemma3", (1,)),
    ("embedding_scale_missing", "gemma3", (1,)),
    ("gelu_exact_not_tanh", "gemma3", (1,)),
]


def _request(directory, tps) -> VerifyRequest:
    return VerifyRequest(str(directory), tps, "cpu", "float32", batch=2, prompt_len=12, new_tokens=6, seed=3)


@pytest.fixture(scope="module")
def real_result(checkpoint, worlds):
    cache = {}

    def get(variant, tps):
        if (variant, tps) not in cache:
            cache[variant, tps] = verify(_request(checkpoint(variant), tps), lambda n: worlds[n])
        return cache[variant, tps]

    return get


@pytest.mark.parametrize("mutant,variant,tps", CASES, ids=[c[0] for c in CASES])
def test_family_bug_fails_verify(mutant, variant, tps, checkpoint, worlds, real_result):
    real = real_result(variant, tps)
    assert real["passed"] and real["semantic_check"]["passed"], (real["semantic_check"], real["rows"])
    with family_rank_fns.mutated(mutant):  # the driver-side float64 reference shares the bug
        result = verify(_request(checkpoint(variant), tps), lambda n: family_rank_fns.MutatedWorld(worlds[n], mutant))
    assert not result["passed"], f"{mutant} slipped through: {result['semantic_check']} {result['rows']}"
    semantic = result["semantic_check"]
    if tps == (1,):  # a shared bug: only transformers can tell, by far more than the check's 1e-5 relative
        assert not semantic["passed"], semantic
    else:  # a bug of the sharded path: the float64 reference is right, the TP row is not
        assert semantic["passed"] and not any(r["passed"] for r in result["rows"]), (semantic, result["rows"])


DECODE_PROMPT, DECODE_LEN = 6, 14  # past both variants' windows (5 and 4) in the prompt and in decode


def _decode_check(world, directory, mutant=None):
    from impl.model_loader import read_config
    import torch

    ids = torch.randint(0, read_config(directory).vocab_size, (2, DECODE_LEN), generator=torch.Generator().manual_seed(1))
    args = (family_rank_fns.decode_vs_prefill, str(directory), ids, DECODE_PROMPT)
    return world.run(*args) if mutant is None else world.run(family_rank_fns.with_mutant, mutant, *args)


@pytest.mark.parametrize("variant", ("gemma2", "gemma3"))
def test_cached_decode_keeps_the_window(variant, checkpoint, worlds):
    """Cached decode (int and tensor positions) past the sliding window gives the prefill's
    logits; verify checks decode only through its greedy tokens, which a decode-only window bug
    can leave unchanged (window_ignored_in_decode passes verify on gemma3), so this check compares
    logits. Both sides are one float64 model at TP=2 (gemma3: its one kv head replicated):
    the same function by different kernels, so they agree to ~1e-15 relative; 1e-10 leaves room
    for reassociation and none for a wrong window, an O(1e-2) change. The mutant must fail it."""
    for got in _decode_check(worlds[2], checkpoint(variant)):
        assert max(got["int"], got["tensor"]) <= 1e-10 * got["scale"], got
    for got in _decode_check(worlds[2], checkpoint(variant), "window_ignored_in_decode"):
        assert min(got["int"], got["tensor"]) > 1e-6 * got["scale"], got


def test_mistral_beyond_its_sliding_window_matches_transformers(checkpoint, worlds):
    """Mistral's window (32 of 64 positions) is computed, not refused: a 36-token prompt and 4
    decoded tokens cross it, and verify (semantic check against transformers' float64 model,
    TP=1 against tpgate's float64 model) passes; with the window one position too wide it fails."""
    req = VerifyRequest(str(checkpoint("mistral")), (1,), "cpu", "float32", batch=2, prompt_len=36, new_tokens=4, seed=3)
    result = verify(req, lambda n: worlds[n])
    assert result["passed"] and result["semantic_check"]["passed"], (result["semantic_check"], result["rows"])
    with family_rank_fns.mutated("window_off_by_one"):
        mutant = verify(req, lambda n: family_rank_fns.MutatedWorld(worlds[n], "window_off_by_one"))
    assert not mutant["semantic_check"]["passed"], mutant["semantic_check"]
