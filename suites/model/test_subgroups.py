"""Whole models in a world of several TP groups (4 ranks as 2 groups of 2, contiguous and
strided): each group loads the checkpoint over its own TP communicator and runs its own prompt;
its prompt logits must match the single-device references on that prompt within the tolerance
policy, its greedy tokens the exact ones, and every member must hold bitwise its group's TP
rank 0's logits and tokens. A group sharding by the global rank, or summing with the other
group, fails it (test_broken_tp_group_use_is_rejected)."""
from __future__ import annotations

import pytest
import torch

from harness.tolerance import compare
from harness.verify import SEMANTIC_RTOL, VerifyRequest, first_divergence, hf_run, prompt, rank_disagreements, run_model
from impl.communication import NullCommunicator
from impl.model_loader import DistributedCheckpointLoader, read_config
from harness.runtime.orchestrator import TP_LAYOUTS

from ..conftest import SUBGROUP_TP, SUBGROUP_WORLD
from ..correctness import mutants
from . import subgroup_rank_fns

# replicated kv heads (1 kv head, tp 2: the TP rank picks q heads, both hold the kv head), a
# vocabulary that does not divide by 2 (padded LM-head shards) and a tied LM head
VARIANT = "llama-mqa-tied"
GROUPS = SUBGROUP_WORLD // SUBGROUP_TP
# float32 only: what is checked is which shard and group each rank uses (an error of the size of
# the logits when wrong); the bf16 model path is test_hf_equivalence.py's. In float32 the greedy
# tokens have no near-ties at these margins, so they must equal the exact ones.
DTYPE = "float32"
NEW_TOKENS = 4


def _requests(directory: str) -> list[VerifyRequest]:
    """One request per TP group: same shapes, its own prompt seed."""
    return [VerifyRequest(directory, (SUBGROUP_TP,), "cpu", DTYPE, batch=2, prompt_len=12, new_tokens=NEW_TOKENS, seed=3 + g) for g in range(GROUPS)]


@pytest.fixture(scope="module")
def references(checkpoint):
    """Per TP group: its prompt, tpgate's single-device float64 run ("exact", y* of the policy),
    transformers in the working dtype ("hf", whose error calibrates the bound) and in float64."""
    directory = str(checkpoint(VARIANT))
    exact_model = DistributedCheckpointLoader(directory, NullCommunicator(1)).load(torch.float64)
    out = []
    for req in _requests(directory):
        ids = prompt(req, read_config(directory).vocab_size)
        out.append({"ids": ids, "exact": run_model(exact_model, ids, NEW_TOKENS), "hf": hf_run(req, ids, torch.float32, "cpu"),
                    "hf64": hf_run(req, ids, torch.float64, "cpu")})
    return directory, out


def group_rows(per_rank: list[dict], refs: list[dict], layout: str) -> list[dict]:
    """One metrics row per TP group and compared tensor: "logits" against tpgate's float64
    reference, "logits_vs_transformers" against transformers' float64 run (both with
    transformers' working-dtype error as E1); a row passes only if, besides, the group's greedy
    tokens equal the exact ones and every member agrees bitwise with the group's TP rank 0."""
    members: dict[int, dict[int, dict]] = {}
    for result in per_rank:
        members.setdefault(result["tp_group_index"], {})[result["tp_rank"]] = result
    rows = []
    for g, ref in enumerate(refs):
        group = [members[g][i] for i in sorted(members[g])]
        got, exact = group[0], ref["exact"]
        disagreeing = rank_disagreements(group)
        first, _ = first_divergence(got["tokens"], exact["tokens"], exact["margins"], 0.0)
        for name, y_star in (("logits", exact["logits"]), ("logits_vs_transformers", ref["hf64"]["logits"])):
            row = compare(name, got["logits"], ref["hf"]["logits"], y_star, torch.float32, len(group))
            rows.append({**row, "layer": f"model[{VARIANT}]@tp{len(group)}x{len(refs)}-{layout}", "dtype": DTYPE, "seed": 3 + g,
                         "batch": ref["ids"].shape[0], "seq": ref["ids"].shape[1], "params": f"new_tokens={NEW_TOKENS}", "world_size": len(group),
                         "case": f"{VARIANT} group {g} b={ref['ids'].shape[0]} s={ref['ids'].shape[1]}", "tp_group": g,
                         "ranks_consistent": not disagreeing, "first_diverging_token": first,
                         "passed": bool(row["passed"] and not disagreeing and first is None)})
    return rows


def _run(world, directory: str, refs: list[dict], mutant: str | None = None) -> list[dict]:
    """group_run on every rank, over the real TP communicator or mutants.MUTANT_COMMUNICATORS[mutant]."""
    args = (subgroup_rank_fns.group_run, directory, [r["ids"] for r in refs], DTYPE, NEW_TOKENS)
    return world.run(*args) if mutant is None else world.run(mutants.on_mutant_communicator, mutant, *args)


@pytest.mark.parametrize("layout", TP_LAYOUTS)
def test_each_tp_group_runs_its_own_prompt(layout, references, subgroup_worlds, metrics, request):
    directory, refs = references
    assert not torch.equal(refs[0]["ids"], refs[1]["ids"]), "the groups' prompts must differ, or a group running the other's would pass"
    for ref in refs:  # transformers and tpgate agree in float64 on these prompts (the reference is sound)
        scale = ref["exact"]["logits"].abs().max().item()
        assert (ref["hf64"]["logits"] - ref["exact"]["logits"]).abs().max().item() <= SEMANTIC_RTOL * scale
    rows = group_rows(_run(subgroup_worlds[layout], directory, refs), refs, layout)
    metrics.write(rows, request.node.nodeid)
    assert all(r["passed"] for r in rows), rows


@pytest.mark.parametrize("mutant,layout", [("global_rank", "strided"), ("world_group", "contiguous"), ("ungrouped_all_reduce", "strided")])
def test_broken_tp_group_use_is_rejected(mutant, layout, references, subgroup_worlds):
    """The real implementation passes in the same world (test above); these do not: TP rank
    taken as global rank % tp (wrong for strided groups only), the model loaded over the world
    group, an all-reduce without group= (both sum over the other group's prompt)."""
    directory, refs = references
    per_rank = _run(subgroup_worlds[layout], directory, refs, mutant)
    assert not all(r["passed"] for r in group_rows(per_rank, refs, layout)), f"{mutant} slipped through"
