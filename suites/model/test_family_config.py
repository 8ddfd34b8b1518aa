"""Qwen3 / Gemma 2 / Gemma 3 config.json dicts: what tpgate reads of them, and bad values refused
with a TPConfigError naming the field, its value and the constraint — before any process starts
(ModelConfig.from_hf runs in the driver: read_config, check_request)."""
from __future__ import annotations

import math

import pytest
import torch

from harness.implementations import Unsupported
from harness.implementations.dtensor import DTENSOR
from impl.architecture import HF_MODEL_TYPES, ModelConfig, TPConfigError
from impl.communication import NullCommunicator
from impl.model_loader import DistributedCheckpointLoader
from impl.tensor_parallel import decode_attention, softcapped_attention

SIZES = dict(vocab_size=90, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, num_key_value_heads=2, head_dim=16,
             max_position_embeddings=64)
GEMMA2 = dict(SIZES, model_type="gemma2", layer_types=["sliding_attention", "full_attention"], sliding_window=5, query_pre_attn_scalar=24,
              attn_logit_softcapping=50.0, final_logit_softcapping=30.0, hidden_activation="gelu_pytorch_tanh")
GEMMA3 = dict(SIZES, model_type="gemma3_text", layer_types=["sliding_attention", "full_attention"], sliding_window=4, query_pre_attn_scalar=16,
              rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                               "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}})
QWEN3 = dict(SIZES, model_type="qwen3")


def test_family_configs_read_as_transformers_reads_them():
    g2 = ModelConfig.from_hf(GEMMA2)
    assert (g2.layer_window(0), g2.layer_window(1), g2.query_pre_attn_scalar, g2.attn_logit_softcapping, g2.final_logit_softcapping) == (5, None, 24.0, 50.0, 30.0)
    assert g2.norm_unit_offset and g2.sandwich_norms and g2.scale_embeddings and g2.tie_word_embeddings and not g2.qk_norm
    # fields left out take transformers' Gemma2Config defaults: softcaps 50 / 30, every other layer sliding from the first
    bare = ModelConfig.from_hf({k: v for k, v in GEMMA2.items() if k not in ("layer_types", "attn_logit_softcapping", "final_logit_softcapping")})
    assert (bare.layer_types, bare.attn_logit_softcapping, bare.final_logit_softcapping) == (("sliding_attention", "full_attention"), 50.0, 30.0)
    g3 = ModelConfig.from_hf(GEMMA3)
    assert g3.layer_rope(0) == (10.0, None) and g3.layer_rope(1) == (10000.0, {"rope_type": "linear", "factor": 4.0})
    assert g3.qk_norm and g3.attn_logit_softcapping is None and g3.final_logit_softcapping is None
    # transformers 4.x form: rope_theta / rope_scaling for the global layers, rope_local_base_freq for the local ones
    old = {k: v for k, v in GEMMA3.items() if k not in ("rope_parameters", "layer_types")} | {
        "rope_theta": 10000.0, "rope_scaling": {"rope_type": "linear", "factor": 4.0}, "rope_local_base_freq": 10.0, "sliding_window_pattern": 2}
    assert ModelConfig.from_hf(old) == g3
    q3 = ModelConfig.from_hf(QWEN3)
    assert q3.qk_norm and q3.head_dim == 16 and q3.layer_types is None and q3.non_llama_features() == ["qk_norm"]


@pytest.mark.parametrize("base,edit,argument,value", [
    (GEMMA2, {"model_type": "gemma"}, "model_type", "gemma"),
    (GEMMA2, {"hidden_activation": "gelu"}, "hidden_activation", "gelu"),
    (QWEN3, {"hidden_act": "gelu"}, "hidden_act", "gelu"),
    (GEMMA2, {"layer_types": ["sliding_attention", "chunked_attention"]}, "layer_types[1]", "chunked_attention"),
    (GEMMA2, {"layer_types": ["full_attention"] * 3}, "layer_types", ("full_attention",) * 3),
    (GEMMA2, {"attn_logit_softcapping": 0.0}, "attn_logit_softcapping", 0.0),
    (GEMMA2, {"final_logit_softcapping": -30.0}, "final_logit_softcapping", -30.0),
    (GEMMA2, {"final_logit_softcapping": math.inf}, "final_logit_softcapping", math.inf),
    (GEMMA2, {"query_pre_attn_scalar": 0}, "query_pre_attn_scalar", 0),
    (GEMMA2, {"query_pre_attn_scalar": None}, "query_pre_attn_scalar", None),
    (GEMMA2, {"sliding_window": 0}, "sliding_window", 0),
    (GEMMA2, {"sliding_window": None}, "sliding_window", None),  # layer 0 slides
    (GEMMA3, {"attn_logit_softcapping": 50.0}, "attn_logit_softcapping", 50.0),
    (GEMMA3, {"use_bidirectional_attention": True}, "use_bidirectional_attention", True),
    (GEMMA3, {"rope_parameters": {"sliding_attention": {"rope_type": "default", "rope_theta": -1.0}}}, "local_rope_theta", -1.0),
    (GEMMA3, {"rope_parameters": {"sliding_attention": {"rope_type": "longrope", "rope_theta": 10.0}}}, "rope_scaling.rope_type", "longrope"),
    (GEMMA2, {"rope_parameters": GEMMA3["rope_parameters"]}, "rope_parameters", GEMMA3["rope_parameters"]),
])
def test_bad_family_config_names_field_value_constraint(base, edit, argument, value):
    with pytest.raises(TPConfigError) as info:
        ModelConfig.from_hf({**base, **edit})
    err = info.value
    assert err.argument == argument and (err.value == value or (isinstance(value, tuple) and tuple(err.value) == value)), (err.argument, err.value)
    assert argument in str(err) and err.constraint in str(err)
    if argument == "model_type":
        assert all(kind in err.constraint for kind in ("qwen3", "gemma2", "gemma3_text")) and set(HF_MODEL_TYPES) >= {"qwen3", "gemma2", "gemma3_text"}


@pytest.mark.parametrize("hf", (GEMMA2, GEMMA3, QWEN3), ids=lambda hf: hf["model_type"])
def test_dtensor_peer_refuses_the_new_families(hf):
    with pytest.raises(Unsupported, match="Llama family"):
        DTENSOR.check(ModelConfig.from_hf(hf), 1)


def test_fused_decode_kernel_is_refused_for_features_it_lacks(checkpoint):
    """The fused Triton step computes none of Gemma's attention features: StaticDecoder refuses
    attention_kernel="triton" naming them (before the GPU checks), and so does a layer switched to it."""
    from impl.decoding import StaticDecoder

    model = DistributedCheckpointLoader(checkpoint("gemma2"), NullCommunicator(1)).load()
    with pytest.raises(TPConfigError, match="attention_kernel.*sliding_window"):
        StaticDecoder(model, 1, 8, compile=None, attention_kernel="triton")
    model.allocate_kv_cache(1, 8)
    for layer in model.layers:
        layer.attention.decode_kernel = "triton"
    with pytest.raises(TPConfigError, match="decode_kernel.*attn_logit_softcapping"):
        model(torch.zeros(1, 1, dtype=torch.long), torch.tensor(0), use_cache=True)


def test_compiled_decode_attention_computes_the_features():
    """decode_attention (the compiled decode step's attention) with a scale, soft-capping and a
    windowed mask equals softcapped_attention, the eager path, on one decode query; dropping its
    softcap argument (the bug of a kernel that ignores it) does not."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(shape, generator=g, dtype=torch.float64) * 3 for shape in ((2, 4, 1, 8), (2, 2, 7, 8), (2, 2, 7, 8)))
    mask = torch.tensor([[False, False, True, True, True, False, False]])  # window 3 ending at position 4
    eager = softcapped_attention(q, k, v, mask, 0.3, 2.0)
    assert (decode_attention(q, k, v, mask, 0.3, 2.0).double() - eager).abs().max() <= 1e-6  # decode_attention computes in float32
    assert (decode_attention(q, k, v, mask, 0.3).double() - eager).abs().max() > 1e-2


def _static_step_logits(model, ids, tokens, compile) -> torch.Tensor:
    """(batch, steps, vocab): StaticDecoder steps (tensor positions) after an eager prefill of ids, fed `tokens` (batch, steps)."""
    from impl.decoding import StaticDecoder

    torch._dynamo.reset()  # trace afresh: a mutant of decode_attention must reach the graph
    decoder = StaticDecoder(model, ids.shape[0], ids.shape[1] + tokens.shape[1], compile=compile)
    decoder.warm_up()
    with torch.no_grad():
        model(ids, 0, use_cache=True, last_only=True)
    return torch.stack([decoder.replay(tokens[:, i, None], ids.shape[1] + i).clone() for i in range(tokens.shape[1])], 1)


def test_compiled_decode_step_computes_gemma_attention(checkpoint, monkeypatch):
    """Traced by dynamo (aot_eager: the compiled step's graph, without code generation), the
    static decode step runs decode_attention, which must compute Gemma 2's scale, soft-cap and
    window as the eager step does: 8 steps past the window of 5, in float32. Both are float32
    computations of the same function in a different order, ~1e-7 relative apart; 1e-5 is 100
    times that and 1000 times below the effect of dropping the soft-cap, the mutant that must fail."""
    from impl import tensor_parallel

    model = DistributedCheckpointLoader(checkpoint("gemma2"), NullCommunicator(1)).load()
    g = torch.Generator().manual_seed(2)
    ids, tokens = torch.randint(0, model.config.vocab_size, (2, 4), generator=g), torch.randint(0, model.config.vocab_size, (2, 8), generator=g)
    eager = _static_step_logits(model, ids, tokens, None)
    scale = eager.abs().max().item()
    assert (_static_step_logits(model, ids, tokens, "aot_eager") - eager).abs().max().item() <= 1e-5 * scale
    real = tensor_parallel.decode_attention
    monkeypatch.setattr(tensor_parallel, "decode_attention", lambda q, k, v, mask, scale=None, softcap=None: real(q, k, v, mask, scale))
    assert (_static_step_logits(model, ids, tokens, "aot_eager") - eager).abs().max().item() > 1e-2 * scale
