"""Small random Hugging Face checkpoints written with transformers' own save_pretrained
(safetensors), one per architecture variant. Never a hub download."""
from __future__ import annotations

from pathlib import Path

import torch

ROPE_LLAMA3 = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 16}
BASE = dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8, max_position_embeddings=64, rms_norm_eps=1e-5)

GEMMA_INIT, GEMMA2_ATTN_SOFTCAP, GEMMA2_FINAL_SOFTCAP, GEMMA3_FINAL_SOFTCAP = 0.1, 2.0, 4.0, 4.0

VARIANTS = {
    # name: (config class name, kwargs)
    "llama-gqa": ("LlamaConfig", dict(BASE, vocab_size=101, num_key_value_heads=2)),
    "llama3-rope-scaling": ("LlamaConfig", dict(BASE, vocab_size=128, num_key_value_heads=4, rope_scaling=ROPE_LLAMA3, rope_theta=500000.0)),
    "llama-mqa-tied": ("LlamaConfig", dict(BASE, vocab_size=77, num_key_value_heads=1, tie_word_embeddings=True)),
    "llama-attention-bias": ("LlamaConfig", dict(BASE, vocab_size=96, num_key_value_heads=8, attention_bias=True)),
    "mistral": ("MistralConfig", dict(BASE, vocab_size=99, num_key_value_heads=2, sliding_window=32)),
    "qwen2": ("Qwen2Config", dict(BASE, vocab_size=103, num_key_value_heads=2)),
    # head_dim 16 != hidden / heads = 8
    "qwen3": ("Qwen3Config", dict(BASE, vocab_size=107, num_key_value_heads=2, head_dim=16)),
    # a window of 5 that the suites' prompts (12 tokens + 6 generated) cross on the sliding layer;
    # soft-caps near the scores' and logits' own scale, so that the cap bends them
    "gemma2": ("Gemma2Config", dict(BASE, vocab_size=93, num_key_value_heads=4, head_dim=16, query_pre_attn_scalar=24, sliding_window=5,
                                    layer_types=["sliding_attention", "full_attention"], attn_logit_softcapping=GEMMA2_ATTN_SOFTCAP,
                                    final_logit_softcapping=GEMMA2_FINAL_SOFTCAP, initializer_range=GEMMA_INIT)),
    # one kv head: replicated at TP 2 and 4; local and global rope bases differ, the global layers scaled
    "gemma3": ("Gemma3TextConfig", dict(BASE, vocab_size=90, num_key_value_heads=1, head_dim=16, query_pre_attn_scalar=16, sliding_window=4,
                                        layer_types=["full_attention", "sliding_attention"], final_logit_softcapping=GEMMA3_FINAL_SOFTCAP,
                                        rope_parameters={"sliding_attention": {"rope_type": "default", "rope_theta": 10.0},
                                                         "full_attention": {"rope_type": "linear", "factor": 4.0, "rope_theta": 10000.0}},
                                        initializer_range=GEMMA_INIT)),
    # fused qkv_proj / gate_up_proj; 2 kv heads (replicated at tp 4); rotates half of each head
    "phi3": ("Phi3Config", dict(BASE, vocab_size=97, num_key_value_heads=2, partial_rotary_factor=0.5, sliding_window=32,
                                pad_token_id=0, bos_token_id=1, eos_token_id=2)),
    # 4 experts, top-2; 2 kv heads
    "mixtral": ("MixtralConfig", dict(BASE, vocab_size=89, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2)),
}


def write_checkpoint(name: str, directory: Path, max_shard_size: str | None = None) -> Path:
    import transformers

    config_cls, kwargs = VARIANTS[name]
    config = getattr(transformers, config_cls)(**kwargs)
    torch.manual_seed(sum(map(ord, name)))
    model = transformers.AutoModelForCausalLM.from_config(config)
    with torch.no_grad():  # norms at exactly 1 and zero biases would hide layout bugs
        for pname, p in model.named_parameters():
            if pname.endswith("norm.weight") or pname.endswith(".bias"):
                p.add_(0.1 * torch.randn_like(p))
    kw = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(directory, safe_serialization=True, **kw)
    return directory
