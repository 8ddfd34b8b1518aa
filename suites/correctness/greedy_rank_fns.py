"""Rank side of the sharded greedy-selection checks (test_sharded_greedy.py), with the
deliberately broken selections those checks must reject."""
from __future__ import annotations

import torch

from impl.architecture import parse_dtype
from impl.communication import gather_from_parallel
from impl.tensor_parallel import ParallelLMHead


def integer_case(vocab: int, hidden: int, distinct: int, negative: bool, seed: int, batch: int = 3) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight (vocab, hidden), x (batch, 2, hidden)) with small integer entries: every logit is an
    integer below 2**8 in magnitude, so it is exact in bfloat16 and float32 whatever the summation
    order, and rows copied from `distinct` prototypes tie exactly — within a shard and across shards.
    `negative`: every real logit < 0, so a padding column that leaked out of its -inf mask (logit 0,
    its row is zero) would win."""
    g = torch.Generator().manual_seed(seed)
    prototypes = torch.randint(-2, 3, (distinct, hidden), generator=g)
    weight = prototypes[torch.randint(0, distinct, (vocab,), generator=g)].float()
    x = torch.randint(-2, 3, (batch, 2, hidden), generator=g).float()
    if negative:
        weight, x = -weight.abs() - 1, x.abs() + 1
    return weight, x


def _mutant_greedy(head: ParallelLMHead, x: torch.Tensor, mutant: str) -> torch.Tensor:
    logits = head.local_logits(x)
    if mutant == "padding_unmasked":  # the padded rows' zero logits instead of -inf
        logits = torch.nn.functional.linear(x, head.weight)
    index = logits.argmax(-1, keepdim=True)
    offset = 0 if mutant == "local_index" else head.start  # forgets the shard's first global index
    pair = torch.cat([logits.gather(-1, index).float(), (index + offset).float()], -1)
    candidates = gather_from_parallel(pair, head.comm, -1).unflatten(-1, (head.comm.world_size, 2))
    values = candidates[..., 0]
    if mutant == "ties_to_last_rank":  # a max-reduction that keeps the last maximum, not the first
        winner = values.shape[-1] - 1 - values.flip(-1).argmax(-1, keepdim=True)
    else:
        winner = values.argmax(-1, keepdim=True)
    return candidates[..., 1].gather(-1, winner).squeeze(-1).long()


def greedy_vs_gathered(ctx, weight: torch.Tensor, x: torch.Tensor, dtype: str, mutant: str | None = None) -> dict:
    """This rank's greedy tokens (batch, 2) from ParallelLMHead.greedy (or a mutant of it), and
    the argmax of the gathered logits (the contract it must equal)."""
    head = ParallelLMHead.from_full(weight, ctx.comm, dtype=parse_dtype(dtype)).to(ctx.device)
    x = x.to(ctx.device, parse_dtype(dtype))
    with torch.no_grad():
        greedy = head.greedy(x) if mutant is None else _mutant_greedy(head, x, mutant)
        gathered = head(x).argmax(-1)
    return {"greedy": greedy.cpu(), "gathered_argmax": gathered.cpu()}
