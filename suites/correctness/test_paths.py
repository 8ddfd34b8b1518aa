"""Alternative execution paths compute the same function at TP 1/2/4:
KV-cache prefill+decode, sequence parallelism, and the vocab-parallel argmax."""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from harness import paths
from harness.cases import LayerCase, build_layer, full_tensors, gather_grads, replicated_grads_agree
from harness.tolerance import compare
from impl.architecture import parse_dtype

from ..conftest import WORLD_SIZES
from .strategies import layer_cases

DTYPES = ("float32", "bfloat16")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_kv_cache_decode_matches_full_forward(world_size, dtype, worlds):
    @settings(max_examples=4, deadline=None)
    @given(case=layer_cases("block", world_size, dtype), data=st.data())
    def check(case, data):
        prefill = data.draw(st.integers(1, case.seq), label="prefill")
        outs = worlds[world_size].run(paths.cached_decode, case, prefill)
        assert all(torch.equal(o, outs[0]) for o in outs), "ranks disagree"
        device = worlds[world_size].device
        single = paths.block_reference(case, parse_dtype(dtype), device=device)["out"]
        exact = paths.block_reference(case, torch.float64, device=device)["out"]
        magnitude = paths.block_reference(case, torch.float64, absolute=True, device=device)["out"]  # S of the policy
        row = compare("output", outs[0], single, exact, parse_dtype(dtype), world_size, magnitude=magnitude)
        assert row["passed"], row

    check()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("world_size", (2, 4))
def test_sequence_parallel_block_matches_single_device(world_size, dtype, worlds):
    @settings(max_examples=4, deadline=None)
    @given(case=layer_cases("block", world_size, dtype), seq_mult=st.integers(1, 3))
    def check(case, seq_mult):
        case = LayerCase(case.kind, dtype, case.seed, case.batch, world_size * seq_mult, case.params)
        check_sequence_parallel(worlds[world_size], case, world_size)

    check()


def check_sequence_parallel(world, case, world_size, reduce_grads=True):
    """SP block vs the single-device block: output, input grad and every parameter grad
    (replicated ones — norms, o_proj bias — only after all_reduce_sequence_parallel_grads)."""
    dtype = parse_dtype(case.dtype)
    ranks = world.run(paths.sequence_parallel_block, case, reduce_grads)
    res = ranks[0]
    assert res["tagged"] == ["attention.o_proj.bias", "input_norm.weight", "post_attention_norm.weight"], res["tagged"]
    # forward with autograd and under torch.no_grad: the same collectives, bytes and dtype, the same output
    full, shard = case.batch * case.seq * case.params["hidden"] * dtype.itemsize, case.batch * case.seq // world_size * case.params["hidden"] * dtype.itemsize
    expected = [("all_gather", shard, str(dtype)), ("reduce_scatter", full, str(dtype))] * 2
    assert all(r["forward_collectives"] == expected and r["inference_collectives"] == expected for r in ranks), res["inference_collectives"]
    assert all(r["inference_equal"] for r in ranks)
    single = paths.block_reference(case, dtype, res["grad"], o_bias=True, device=world.device)
    exact = paths.block_reference(case, torch.float64, res["grad"], o_bias=True, device=world.device)
    # S of the tolerance policy: without it the bound falls back to the expected-case sqrt(tp)
    # magnitude, too tight for gradients summed over tokens that cancel (norm weights, bias)
    magnitude = paths.block_reference(case, torch.float64, res["grad"], o_bias=True, absolute=True, device=world.device)
    for name in ("out", "grad_in"):
        row = compare(name, res[name], single[name].float(), exact[name], dtype, world_size, magnitude=magnitude[name])
        assert row["passed"], row
    assert replicated_grads_agree(ranks), "ranks disagree on a replicated parameter's gradient"
    full = gather_grads(ranks)
    assert sorted(full) == sorted(single["grads"])
    for name in sorted(single["grads"]):
        row = compare(f"grad_{name}", full[name].float(), single["grads"][name].float(), exact["grads"][name], dtype, world_size,
                      magnitude=magnitude["grads"][name])
        assert row["passed"], row


@pytest.mark.parametrize("world_size", (2, 4))
def test_sequence_parallel_grads_fail_without_all_reduce(world_size, worlds):
    """The parameter-gradient comparison above can fail: skipping the all-reduce of the
    replicated parameters' grads leaves per-rank partials, which it must reject."""
    case = LayerCase("block", "float32", 5, 2, 2 * world_size, {"hidden": 16, "heads": 4, "kv_heads": 4, "head_dim": 4, "inter": 8, "bias": False})
    check_sequence_parallel(worlds[world_size], case, world_size)
    with pytest.raises(AssertionError):
        check_sequence_parallel(worlds[world_size], case, world_size, reduce_grads=False)


@pytest.mark.parametrize("world_size", WORLD_SIZES)
def test_padded_vocab_rows_never_win_argmax(world_size, worlds):
    @settings(max_examples=6, deadline=None)
    @given(vocab=st.integers(1, 41), hidden=st.integers(1, 16), seed=st.integers(0, 2**31 - 1))
    def check(vocab, hidden, seed):
        case = LayerCase("lm_head", "float32", seed, 2, 3, {"vocab": vocab, "hidden": hidden})
        results = worlds[world_size].run(paths.lm_head_argmax, case)
        for r in results:
            assert r["logits"].shape[-1] == vocab, "padding must be stripped from gathered logits"
            assert int(r["argmax"].max()) < vocab
            assert r["local_width"] == -(-vocab // world_size), "each rank holds ceil(vocab/tp) columns"
            assert r["pad_is_neg_inf"], "padding columns (global index >= vocab) must be -inf"
            assert r["real_are_finite"], "real vocabulary columns must not be masked"
        assert all(torch.equal(r["argmax"], results[0]["argmax"]) for r in results)

    check()


SP_CONFIG = dict(vocab_size=37, hidden_size=16, intermediate_size=32, num_layers=2, num_heads=4, num_kv_heads=2, max_seq_len=16)


def _sp_model(comm, dtype, sequence_parallel):
    from impl.architecture import ModelConfig
    from impl.model import LlamaModel, checkpoint_shapes

    config = ModelConfig(**SP_CONFIG, o_bias=True)
    g = torch.Generator().manual_seed(11)
    tensors = {n: (1.0 + 0.1 * torch.randn(s, generator=g)) if n.endswith("norm.weight") else 0.2 * torch.randn(s, generator=g)
               for n, s in checkpoint_shapes(config).items()}
    return LlamaModel.from_tensors(tensors, config, comm, dtype=dtype, sequence_parallel=sequence_parallel)


def model_replicated_grads(ctx, dtype=torch.float32, sequence_parallel=True):
    """Backward through a sequence-parallel LlamaModel forward, then all_reduce_sequence_parallel_grads:
    the replicated parameters' (norms, o_proj biases) gradients on this rank."""
    from impl.communication import all_reduce_sequence_parallel_grads

    model = _sp_model(ctx.comm, dtype, sequence_parallel)
    ids = torch.randint(0, SP_CONFIG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    logits = model(ids)
    weight = torch.randn(logits.shape, generator=torch.Generator().manual_seed(2)).to(dtype)
    (logits * weight).sum().backward()
    all_reduce_sequence_parallel_grads(model, ctx.comm)
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if n.endswith(("norm.weight", "o_proj.bias"))}


@pytest.mark.parametrize("world_size", (2, 4))
def test_sequence_parallel_model_replicated_grads(world_size, worlds):
    """LlamaModel tags the replicated parameters of a sequence-parallel forward (incl. the final
    norm) so that all_reduce_sequence_parallel_grads gives the single-device gradient."""
    from impl.communication import NullCommunicator

    class One:
        comm = NullCommunicator(1)

    ranks = worlds[world_size].run(model_replicated_grads)
    single = model_replicated_grads(One, torch.float32, False)
    exact = model_replicated_grads(One, torch.float64, False)
    assert sorted(ranks[0]) == sorted(single) and len(single) == 7
    for name in sorted(single):
        assert all(torch.equal(r[name], ranks[0][name]) for r in ranks), name
        row = compare(f"grad_{name}", ranks[0][name], single[name], exact[name], torch.float32, world_size)
        assert row["passed"], row
