"""Phi-3 and Mixtral-style MoE beyond the shared equivalence test (test_hf_equivalence.py runs the
"phi3" and "mixtral" variants at TP 1/2/4 in fp32 and bf16):

  - `verify` rejects realistic family bugs (phi_moe_rank_fns' mutants) that the equivalence test
    would otherwise have to catch: fused rows sliced as one block, gate/up swapped, a sharded
    router, top-k weights not renormalised, experts reduced per expert and again per layer,
    rank-dependent routing;
  - every rank routes every token to the same experts with bitwise the same weights (the router
    is replicated and its input is bitwise replicated, impl/moe.py), and in bf16 to the experts
    the exact float64 model picks (the precondition of the bf16 bound: a flipped choice is a
    discontinuity the error model does not cover);
  - an MoE layer issues exactly the collectives of a dense MLP (what projected sweeps price).
"""
from __future__ import annotations

import dataclasses

import pytest
import torch

from harness.verify import VerifyRequest, prompt, verify
from impl.architecture import ModelConfig
from impl.communication import CountingCommunicator, NullCommunicator
from impl.model import random_model
from impl.model_loader import read_config

from . import phi_moe_rank_fns
from .phi_moe_rank_fns import MOE_MUTANTS, MUTANT_SPECS, PHI3_MUTANTS, rank_jittered_router, reduced_per_expert


@pytest.mark.parametrize("dtype", ("float32", "bfloat16"))
@pytest.mark.parametrize("variant,mutants", [("phi3", PHI3_MUTANTS), ("mixtral", MOE_MUTANTS)])
def test_verify_rejects_family_bugs(variant, mutants, dtype, checkpoint, worlds):
    """At TP 2 (kv heads shard, so a one-block qkv slice has the right shape; 2 experts per rank for the sharded router).
    In bf16 the 1 % rank jitter leaves the routing choices of this prompt as they are and moves the logits by less than
    bf16's bound (3.9e-3 against 1.8e-2): below what bf16 logits resolve, so only the routing-identity check
    (test_routing_check_rejects_rank_dependent_routing) is asked to catch it there."""
    specs = tuple(MUTANT_SPECS[m.__name__] for m in mutants if not (dtype == "bfloat16" and m is rank_jittered_router))
    req = VerifyRequest(str(checkpoint(variant)), (2,), dtype=dtype, batch=2, prompt_len=12, new_tokens=3, seed=3, implementations=("reference", *specs))
    result = verify(req, lambda n: worlds[n])
    rows = {r["implementation"]: r for r in result["rows"]}
    assert result["semantic_check"]["passed"] and rows["reference"]["passed"], (result["semantic_check"], rows["reference"])
    slipped = {spec: (rows[spec]["max_abs_vs_exact"], rows[spec]["bound"]) for spec in specs if rows[spec]["passed"]}
    assert not slipped, f"mutants passed verify: {slipped}"


def _routing_ids(directory: str) -> torch.Tensor:
    return prompt(VerifyRequest(directory, (1,), batch=2, prompt_len=12, seed=3), read_config(directory).vocab_size)


def routing_mismatches(per_rank: list, reference: list | None = None) -> list[str]:
    """Layers where a rank's (weights, experts) are not bitwise rank 0's, or where rank 0's experts
    differ from `reference`'s (the exact model's choices)."""
    out = []
    for rank, layers in enumerate(per_rank[1:], 1):
        out += [f"rank {rank} layer {i}" for i, ((w, e), (w0, e0)) in enumerate(zip(layers, per_rank[0])) if not (torch.equal(w, w0) and torch.equal(e, e0))]
    if reference is not None:
        out += [f"layer {i}: experts differ from the exact model's" for i, ((_, e), (_, e_ref)) in enumerate(zip(per_rank[0], reference)) if not torch.equal(e, e_ref)]
    return out


@pytest.mark.parametrize("tp", (2, 4))
def test_every_rank_routes_identically(tp, checkpoint, worlds):
    directory = str(checkpoint("mixtral"))
    ids = _routing_ids(directory)
    exact = worlds[1].run(phi_moe_rank_fns.routing, directory, ids, torch.float64)[0]
    per_rank = worlds[tp].run(phi_moe_rank_fns.routing, directory, ids, torch.bfloat16)
    assert not routing_mismatches(per_rank, exact), routing_mismatches(per_rank, exact)


def test_routing_check_rejects_rank_dependent_routing(checkpoint, worlds):
    directory = str(checkpoint("mixtral"))
    per_rank = worlds[2].run(phi_moe_rank_fns.routing, directory, _routing_ids(directory), torch.bfloat16, MUTANT_SPECS["rank_jittered_router"])
    assert routing_mismatches(per_rank), "rank-dependent routing slipped through"


MOE = ModelConfig(vocab_size=37, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16,
                  num_experts=4, num_experts_per_tok=2)


def _collectives(config: ModelConfig, mutate=None) -> list[tuple]:
    """(kind, bytes, shape) of every collective rank 1 of 4 issues in one prompt forward (no processes: a NullCommunicator)."""
    comm = CountingCommunicator(NullCommunicator(4, 1))
    model = random_model(config, comm, dtype=torch.float32)
    if mutate:
        mutate(model, comm, None)
    with torch.no_grad():
        model(torch.arange(12).reshape(2, 6) % config.vocab_size)
    return [(r.kind, r.nbytes, r.shape) for r in comm.records]


def test_moe_layer_issues_the_collectives_of_a_dense_mlp():
    dense = _collectives(dataclasses.replace(MOE, num_experts=0, num_experts_per_tok=0))
    assert _collectives(MOE) == dense
    assert _collectives(MOE, reduced_per_expert) != dense  # the check sees a per-expert all-reduce
