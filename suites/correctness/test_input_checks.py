"""Inputs the layers cannot honour are refused with a TPConfigError naming the argument, not
computed silently: out-of-range token ids (at tp > 1 they would embed as zeros), a start_pos
without a KV cache (it would drop causal masking); and generation fills the KV cache exactly
(the last token is never fed back)."""
from __future__ import annotations

import pytest
import torch

from impl.architecture import ModelConfig, TPConfigError
from impl.communication import NullCommunicator
from impl.decoding import StaticDecoder
from impl.model import random_model
from impl.tensor_parallel import ParallelAttention, VocabParallelEmbedding

from ..conftest import WORLD_SIZES

VOCAB, HIDDEN = 5, 4  # 5 rows: padded to 6 at tp=2 and to 8 at tp=4, so ids 5.. fall in the padding
BAD_IDS = ([[0, -1]], [[VOCAB, 1]], [[VOCAB + 2]], [[100, -3]])


def embed_ids(ctx, ids_list):
    """Rank side: embed each id list; TPConfigError's (argument, value) where refused, else None."""
    weight = torch.randn(VOCAB, HIDDEN, generator=torch.Generator().manual_seed(0))
    layer = VocabParallelEmbedding.from_full(weight, ctx.comm)
    out = []
    for ids in ids_list:
        try:
            with torch.no_grad():
                emb = layer(torch.tensor(ids))
            out.append(("ok", bool(torch.equal(emb, weight[torch.tensor(ids)]))))
        except TPConfigError as e:
            out.append((e.argument, e.value, e.constraint))
    return out


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_out_of_range_token_ids_are_refused(world_size, worlds):
    good = [[0, 1, 2, 3, 4]]
    results = worlds[world_size].run(embed_ids, [good, *BAD_IDS])
    for r in results:
        assert r[0] == ("ok", True), "in-range ids embed their rows"
        for ids, got in zip(BAD_IDS, r[1:]):
            flat = [i for row in ids for i in row]
            assert got[:2] == ("ids", (min(flat), max(flat))), (ids, got)
            assert f"vocab_size={VOCAB}" in got[2]


def _attention():
    g = torch.Generator().manual_seed(0)
    h, d, nh = 16, 4, 4
    q, k, v, o = (0.3 * torch.randn(nh * d, h, generator=g) for _ in range(4))
    return ParallelAttention.from_full(q, k, v, o.T.contiguous(), NullCommunicator(1), head_dim=d), torch.randn(1, 4, h, generator=g)


def test_start_pos_without_cache_is_refused():
    att, x = _attention()
    with torch.no_grad():
        full = att(x, 0)
        with pytest.raises(TPConfigError) as e:
            att(x, 2)
        assert e.value.argument == "start_pos" and e.value.value == 2
        # with the cache, start_pos continues a sequence: prefill 2 then 2 more = the full forward
        att.allocate_kv_cache(1, 4)
        cached = torch.cat([att(x[:, :2], 0, use_cache=True), att(x[:, 2:], 2, use_cache=True)], 1)
    torch.testing.assert_close(cached, full)


CONFIG = ModelConfig(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=1, num_heads=4, num_kv_heads=2, max_seq_len=12)
PROMPT = 4


def _model():
    return random_model(CONFIG, NullCommunicator(), dtype=torch.float32, seed=1)


def test_generation_fills_the_cache_to_max_position_embeddings():
    """prompt + max_new_tokens - 1 positions are ever fed: a generation whose fed tokens end
    exactly at max_position_embeddings is accepted; one more is refused."""
    ids = torch.randint(0, CONFIG.vocab_size, (2, PROMPT), generator=torch.Generator().manual_seed(0))
    most = CONFIG.max_seq_len - PROMPT + 1
    tokens = _model().generate(ids, most)
    assert tokens.shape == (2, most)
    assert torch.equal(tokens[:, :-1], _model().generate(ids, most - 1))
    with pytest.raises(TPConfigError, match="max_seq_len"):
        _model().generate(ids, most + 1)
    decoder = StaticDecoder(_model(), 2, CONFIG.max_seq_len, compile=None)
    assert torch.equal(decoder.generate(ids, most), tokens)
    with pytest.raises(TPConfigError, match="prompt \\+ max_new_tokens"):
        decoder.generate(ids, most + 1)
