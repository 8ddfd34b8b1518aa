"""The static, graph-captured decode step (impl/decoding.py) computes what eager decode computes,
and at TP > 1 it is one traced graph that contains its collectives.

On CPU the step is traced with torch.compile(fullgraph=True) through a backend that keeps the
FX graph: a graph break (a host round trip, a Python-side branch on a device value) fails
the trace, and the collectives found in the graph are counted against the TP algorithm
(2 all-reduces per block, 1 for the embedding, 1 all-gather for the logits). On CUDA the same
step is compiled by inductor and captured as a CUDA graph (test_cuda_graph_replay).
"""
from __future__ import annotations

import pytest
import torch

from impl.architecture import ModelConfig, TPConfigError
from impl.communication import NullCommunicator
from impl.decoding import StaticDecoder
from impl.model import random_model

CONFIG = ModelConfig(vocab_size=509, hidden_size=64, intermediate_size=96, num_layers=2, num_heads=8, num_kv_heads=4, max_seq_len=64)
BATCH, PROMPT, NEW_TOKENS, MAX_SEQ = 2, 5, 9, 24
SAMPLING = [dict(temperature=0.0), dict(temperature=0.8, top_k=20, seed=3)]


def _prompt(device="cpu"):
    return torch.randint(0, CONFIG.vocab_size, (BATCH, PROMPT), generator=torch.Generator().manual_seed(0)).to(device)


class GraphRecorder:
    """A torch.compile backend that runs the traced FX graph as is and keeps it."""

    def __init__(self):
        self.graphs = []

    def __call__(self, gm, example_inputs):
        self.graphs.append(gm)
        return gm.forward

    def collectives(self) -> list[str]:
        names = [str(n.target) for g in self.graphs for n in g.graph.nodes if n.op == "call_function"]
        return [n.split(".")[-1] for n in names if "c10d_functional" in n and "wait" not in n]


def decode_on_rank(ctx, dtype=torch.float32):
    """Eager generate vs the static decoder traced by dynamo, on this rank. On CPU whatever the
    world's device: this checks tracing, not kernels (and gloo's functional collectives on
    CUDA tensors crash inside dynamo-traced graphs on torch 2.11)."""
    model = random_model(CONFIG, ctx.comm, dtype=dtype, device="cpu", seed=1)
    ids = _prompt()
    results = []
    for kw in SAMPLING:
        recorder = GraphRecorder()
        eager = model.generate(ids, NEW_TOKENS, **kw)
        static = StaticDecoder(model, BATCH, MAX_SEQ, compile=recorder).generate(ids, NEW_TOKENS, **kw)
        results.append(dict(equal=bool(torch.equal(eager, static)), graphs=len(recorder.graphs), collectives=recorder.collectives()))
    return results


@pytest.mark.parametrize("world_size", [2, 4])
def test_tp_step_is_one_graph_with_its_collectives(worlds, world_size):
    expected = ["all_reduce"] * (1 + 2 * CONFIG.num_layers) + ["all_gather_into_tensor"]
    for rank, per_rank in enumerate(worlds[world_size].run(decode_on_rank)):
        for kw, result in zip(SAMPLING, per_rank):
            assert result["equal"], f"rank {rank} {kw}: static decode tokens differ from eager generate"
            assert result["graphs"] == 1, f"rank {rank}: the step was split into {result['graphs']} graphs (a graph break)"
            assert sorted(result["collectives"]) == sorted(expected), f"rank {rank}: collectives in the traced step {result['collectives']}"


@pytest.mark.parametrize("compile", [None, "aot_eager"])
def test_single_rank_matches_eager(compile):
    model = random_model(CONFIG, NullCommunicator(), dtype=torch.float32, seed=2)
    ids = _prompt()
    for kw in SAMPLING:
        eager = model.generate(ids, NEW_TOKENS, **kw)
        assert torch.equal(StaticDecoder(model, BATCH, MAX_SEQ, compile=compile).generate(ids, NEW_TOKENS, **kw), eager), kw


def test_static_step_logits_equal_eager_step():
    """Bitwise: the tensor-position path is the int-position path's kernels on the same data."""
    model = random_model(CONFIG, NullCommunicator(), dtype=torch.float32, seed=4)
    ids = _prompt()
    model.allocate_kv_cache(BATCH, MAX_SEQ)
    with torch.no_grad():
        model(ids, 0, use_cache=True)
        token = ids[:, -1:]
        eager = model(token, PROMPT, use_cache=True)
        static = model(token, torch.tensor(PROMPT), use_cache=True)
    assert torch.equal(eager, static)


def test_bad_arguments_name_the_argument():
    model = random_model(CONFIG, NullCommunicator(), dtype=torch.float32)
    with pytest.raises(TPConfigError, match="cuda_graph"):
        StaticDecoder(model, BATCH, MAX_SEQ, compile=None, cuda_graph=True)
    with pytest.raises(TPConfigError, match="compile_mode"):
        StaticDecoder(model, BATCH, MAX_SEQ, compile_mode="reduce-overhead")
    with pytest.raises(TPConfigError, match="max_seq_len"):
        StaticDecoder(model, BATCH, CONFIG.max_seq_len + 1, compile=None)
    decoder = StaticDecoder(model, BATCH, MAX_SEQ, compile=None)
    with pytest.raises(TPConfigError, match="prompt \\+ max_new_tokens"):
        decoder.generate(_prompt(), MAX_SEQ)
    with pytest.raises(TPConfigError, match="ids.shape"):
        decoder.generate(_prompt()[:1], 2)
    with pytest.raises(TPConfigError, match="use_cache"):
        model(_prompt(), torch.tensor(0))


needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graph capture needs a CUDA device")


def _generate_without_sync(decoder, ids):
    """sync debug mode 'error' raises on any implicit device->host synchronisation. It is armed
    once the first step is enqueued: the eager prefill before the loop reads the prompt's token
    ids on the host once, by design (out-of-range ids are refused, impl/tensor_parallel.py); every
    later sample and replay — the decode loop — must not synchronise."""
    def arm(step):
        if step == 0:
            torch.cuda.set_sync_debug_mode("error")

    try:
        return decoder.generate(ids, NEW_TOKENS, on_step=arm)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@needs_cuda
def test_cuda_graph_replay_equals_eager():
    """Captured once, replayed per token, no host sync in the loop; the uncompiled step runs the
    eager kernels on the same data, so the tokens are bitwise those of eager decode."""
    model = random_model(CONFIG, NullCommunicator(), dtype=torch.bfloat16, device="cuda", seed=5)
    ids = _prompt("cuda")
    eager = model.generate(ids, NEW_TOKENS)
    decoder = StaticDecoder(model, BATCH, MAX_SEQ, compile=None)
    decoder.warm_up()
    assert decoder.graph is not None
    assert torch.equal(_generate_without_sync(decoder, ids), eager)


@needs_cuda
def test_compiled_graph_error_within_eager_error():
    """inductor fuses and reorders the bf16 sums, so its tokens may part from eager's at a
    near-tie of random logits. It is held instead to the tolerance policy of the layer suites
    (harness/tolerance.py): against a float64 evaluation of the same weights and cache, its
    error may be at most twice eager bf16's error (E1) plus one bf16 rounding of the largest
    logit. A wrong position, mask or stale cache slot errs by the size of the logits."""
    import copy

    model = random_model(CONFIG, NullCommunicator(), dtype=torch.bfloat16, device="cuda", seed=5)
    exact_model = copy.deepcopy(model).double()
    ids = _prompt("cuda")
    decoder = StaticDecoder(model, BATCH, MAX_SEQ, compile="inductor")
    decoder.warm_up()  # compiling synchronises; the decode loop after it must not
    _generate_without_sync(decoder, ids)
    exact_model.allocate_kv_cache(BATCH, MAX_SEQ)  # the bf16 model keeps the decoder's cache
    logits = {}
    with torch.no_grad():
        for name, m in (("eager", model), ("exact", exact_model)):
            m(ids, 0, use_cache=True)
            logits[name] = m(ids[:, -1:], PROMPT, use_cache=True)[:, -1].double()
        logits["compiled"] = decoder.replay(ids[:, -1:], PROMPT).double()
    e1 = (logits["eager"] - logits["exact"]).abs().max().item()
    error = (logits["compiled"] - logits["exact"]).abs().max().item()
    assert error <= 2 * e1 + 2.0**-8 * logits["exact"].abs().max().item(), (error, e1)
