"""tpgate's adapter for tinystack: the implementation protocol (harness.implementations) around
a TP stack that knows nothing of tpgate. Put this file and tinystack.py on PYTHONPATH, then

    tpgate verify CHECKPOINT_DIR --tp 1,2,4 --impl tinystack_tpgate:IMPL
    tpgate correctness --impl tinystack_tpgate:IMPL --checkpoints llama-attention-bias
    tpgate scaling --implementations reference,tinystack_tpgate:IMPL
"""
import os
import shutil
import tempfile

import torch
import torch.distributed as dist

import tinystack
from harness.implementations import Unsupported


class TinyStackAdapter:
    name = "tinystack"
    capabilities = frozenset({"greedy", "random"})  # it decodes with its own KV cache; no "collectives"

    def check(self, config, tp):
        """In the driver, before any process starts: Unsupported, with the reason, for what tinystack
        does not implement. `config` is tpgate's ModelConfig of the checkpoint (full sizes); tpgate
        itself has already refused a tp the heads or the intermediate size cannot be split by."""
        kind = config.extra.get("model_type")
        if kind not in ("llama", "mistral"):
            raise Unsupported(self.name, f"model_type={kind!r}: tinystack implements llama and mistral only")
        if config.num_kv_heads % tp:
            raise Unsupported(self.name, f"num_kv_heads={config.num_kv_heads} is not a multiple of tp={tp} "
                                         "(tinystack shards kv heads and never replicates them)")
        if config.rope_scaling is not None:
            raise Unsupported(self.name, f"rope_scaling of type {config.rope_scaling['rope_type']!r}: tinystack has plain rotary only")
        window = config.extra.get("sliding_window")
        if window is not None and window < config.max_seq_len:
            raise Unsupported(self.name, f"sliding_window={window} < max_position_embeddings={config.max_seq_len}: "
                                         "tinystack has no sliding-window attention")

    def load(self, directory, ctx, dtype):
        """On each rank: this rank's shard, read from the Hugging Face `directory`. The stack shards
        over ctx.tp_group, the TP group's torch.distributed ProcessGroup (the world may be larger)."""
        return tinystack.TinyLlama(directory, ctx.tp_group, dtype, ctx.device)

    def logits(self, model, ids):
        """ids (batch, seq) int64 -> (batch, seq, vocab) logits, gathered: the same on every rank."""
        return model.forward(ids)

    def greedy(self, model, ids, new_tokens):
        """ids (batch, prompt) -> (batch, new_tokens) int64 greedy tokens, the same on every rank."""
        return model.generate(ids, new_tokens)


    def random(self, config, ctx, dtype, seed=0):
        """Random weights of a sweep preset's shape (`config`: tpgate's ModelConfig): rank 0 saves
        them once as a checkpoint (renamed into place whole), then every rank loads its shard."""
        from transformers import LlamaConfig, LlamaForCausalLM

        shape = (config.vocab_size, config.hidden_size, config.intermediate_size, config.num_layers, config.num_heads, config.num_kv_heads)
        directory = os.path.join(tempfile.gettempdir(), "tinystack-random-" + "-".join(map(str, (*shape, seed))))
        if ctx.comm.rank == 0 and not os.path.isdir(directory):
            torch.manual_seed(seed)
            hf = LlamaConfig(vocab_size=shape[0], hidden_size=shape[1], intermediate_size=shape[2], num_hidden_layers=shape[3],
                             num_attention_heads=shape[4], num_key_value_heads=shape[5], max_position_embeddings=config.max_seq_len,
                             rope_theta=config.rope_theta, tie_word_embeddings=False)
            partial = tempfile.mkdtemp(dir=os.path.dirname(directory))
            LlamaForCausalLM(hf).save_pretrained(partial)
            try:
                os.replace(partial, directory)  # another rank or run sees no directory or a whole one
            except OSError:  # another run renamed its whole copy into place first
                shutil.rmtree(partial)
        dist.barrier(group=ctx.tp_group)
        return self.load(directory, ctx, dtype)


IMPL = TinyStackAdapter()
