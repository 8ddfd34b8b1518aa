"""tinystack: a small tensor-parallel Llama-family decoder on plain torch.distributed.

Someone's own TP stack, written without tpgate (no tpgate import, no DTensor); tpgate judges it
through its adapter, tinystack_tpgate.py. Megatron-style sharding over the `tp` ranks of `group`:

  embedding        replicated, (vocab, hidden) on every rank
  q, k, v          column-parallel: rank r holds heads [r*h/tp, (r+1)*h/tp) (rows of the weight)
  o                row-parallel: the columns of those heads; partial sums all_reduce'd
  gate, up         column-parallel: rows [r*i/tp, (r+1)*i/tp) of the intermediate size i
  down             row-parallel: the matching columns; partial sums all_reduce'd
  lm head          vocab-parallel: rows [r*p, (r+1)*p), p = ceil(vocab/tp), zero-padded; all_gather'd

Between blocks the activations (batch, seq, hidden) are replicated, so every rank ends with the
same full logits. Plain (default) rotary only; kv heads are sharded, never replicated, so
num_key_value_heads and intermediate_size must be multiples of tp (ValueError otherwise).
"""
import json
import os

import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open


class Checkpoint:
    """The tensors of a Hugging Face safetensors directory (one file or an index), read a slice at a time."""

    def __init__(self, directory):
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.files = {name: os.path.join(directory, file) for name, file in json.load(f)["weight_map"].items()}
        else:
            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as f:
                self.files = {name: os.path.join(directory, "model.safetensors") for name in f.keys()}

    def shape(self, name):
        with safe_open(self.files[name], "pt") as f:
            return f.get_slice(name).get_shape()

    def read(self, name, dim=None, start=0, stop=None):
        """Tensor `name`, or only its rows (dim 0) / columns (dim 1) [start, stop): nothing else is read."""
        with safe_open(self.files[name], "pt") as f:
            t = f.get_slice(name)
            return t[:] if dim is None else t[start:stop] if dim == 0 else t[:, start:stop]


def rms_norm(x, weight, eps):
    h = x.float()  # the statistics in float32 whatever the working dtype, as transformers does
    return weight * (h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def rotate(x, cos, sin):
    """Rotary on x (batch, heads, seq, head_dim): the two halves of each head are rotated as pairs."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat([-x[..., half:], x[..., :half]], -1) * sin


class TinyLlama:
    """This rank's shard of the decoder in `directory`, sharded over the process group `group`."""

    def __init__(self, directory, group, dtype=torch.float32, device="cpu"):
        with open(os.path.join(directory, "config.json")) as f:
            c = json.load(f)
        self.group, self.rank, self.tp = group, dist.get_rank(group), dist.get_world_size(group)
        rope = c.get("rope_parameters") or c.get("rope_scaling") or {}  # transformers 5 writes rope_parameters
        if rope.get("rope_type", rope.get("type", "default")) != "default":
            raise ValueError(f"tinystack: rope type {rope.get('rope_type', rope.get('type'))!r} is not implemented")
        for key in ("num_key_value_heads", "intermediate_size"):
            if c[key] % self.tp:
                raise ValueError(f"tinystack: {key}={c[key]} must be a multiple of tp={self.tp}")
        self.vocab, self.eps = c["vocab_size"], c["rms_norm_eps"]
        self.head_dim = c.get("head_dim") or c["hidden_size"] // c["num_attention_heads"]
        theta = rope.get("rope_theta", c.get("rope_theta", 10000.0))
        self.inv_freq = 1.0 / theta ** (torch.arange(0, self.head_dim, 2, dtype=torch.float32) / self.head_dim)
        self.dtype, self.device, ckpt = dtype, device, Checkpoint(directory)

        def get(name, dim=None):  # whole, or this rank's block of tp equal blocks of rows (dim 0) / columns (dim 1)
            size = 0 if dim is None else ckpt.shape(name)[dim] // self.tp
            return self._to(ckpt.read(name, dim, self.rank * size, (self.rank + 1) * size))

        self.embed, self.norm = get("model.embed_tokens.weight"), get("model.norm.weight")
        self.layers = []
        for i in range(c["num_hidden_layers"]):
            p = f"model.layers.{i}."
            layer = {"input_norm": get(p + "input_layernorm.weight"), "post_norm": get(p + "post_attention_layernorm.weight")}
            for key, name, dim in (("q", "self_attn.q_proj", 0), ("k", "self_attn.k_proj", 0), ("v", "self_attn.v_proj", 0),
                                   ("o", "self_attn.o_proj", 1), ("gate", "mlp.gate_proj", 0), ("up", "mlp.up_proj", 0),
                                   ("down", "mlp.down_proj", 1)):
                layer[key] = get(p + name + ".weight", dim)
                bias = p + name + ".bias"  # where the checkpoint has one: split like the rows, or whole for a row-parallel layer
                layer[key + "_bias"] = get(bias, 0 if dim == 0 else None) if bias in ckpt.files else None
            self.layers.append(layer)
        head = "lm_head.weight" if "lm_head.weight" in ckpt.files else "model.embed_tokens.weight"  # tied embeddings
        self.per = -(-self.vocab // self.tp)
        lo, hi = min(self.rank * self.per, self.vocab), min((self.rank + 1) * self.per, self.vocab)
        rows = self._to(ckpt.read(head, 0, lo, hi))
        self.head = F.pad(rows, (0, 0, 0, self.per - rows.shape[0]))  # (per, hidden): zero rows past the vocabulary

    def _to(self, t):
        return t.to(dtype=self.dtype, device=self.device)

    def row_parallel(self, x, layer, key):
        """x (batch, seq, in/tp) times this rank's columns of `key`: each rank holds a partial sum
        over its shard of the input, summed in place across the group; the bias after the sum."""
        out = F.linear(x, layer[key])
        dist.all_reduce(out, group=self.group)
        return out if layer[key + "_bias"] is None else out + layer[key + "_bias"]  # added once, not tp times

    def attention(self, x, layer, cos, sin, cache, i):
        b, s, _ = x.shape
        q, k, v = (F.linear(x, layer[n], layer[n + "_bias"]).view(b, s, -1, self.head_dim).transpose(1, 2) for n in "qkv")
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # q (b, heads/tp, s, d); k, v (b, kv_heads/tp, s, d)
        if cache is not None:
            if i in cache:
                k, v = torch.cat([cache[i][0], k], 2), torch.cat([cache[i][1], v], 2)
            cache[i] = (k, v)
        groups = q.shape[1] // k.shape[1]  # this rank's q heads share its kv heads, as in the full model
        out = F.scaled_dot_product_attention(q, k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1), is_causal=s > 1)
        return self.row_parallel(out.transpose(1, 2).reshape(b, s, -1), layer, "o")

    def mlp(self, x, layer):
        h = F.silu(F.linear(x, layer["gate"], layer["gate_bias"])) * F.linear(x, layer["up"], layer["up_bias"])  # (b, s, intermediate/tp)
        return self.row_parallel(h, layer, "down")

    @torch.no_grad()
    def forward(self, ids, cache=None):
        """ids (batch, seq) int64 -> logits (batch, seq, vocab), the same full logits on every rank.

        `cache` (a dict, empty at first) keeps this rank's keys and values for decoding: the first
        call on it is the prompt, each later one must be a single new position."""
        start = cache[0][0].shape[2] if cache else 0
        angles = torch.arange(start, start + ids.shape[1], dtype=torch.float32)[:, None] * self.inv_freq
        angles = torch.cat([angles, angles], -1).to(self.device)
        cos, sin = angles.cos().to(self.dtype), angles.sin().to(self.dtype)
        x = self.embed[ids]
        for i, layer in enumerate(self.layers):
            x = x + self.attention(rms_norm(x, layer["input_norm"], self.eps), layer, cos, sin, cache, i)
            x = x + self.mlp(rms_norm(x, layer["post_norm"], self.eps), layer)
        local = F.linear(rms_norm(x, self.norm, self.eps), self.head)  # (batch, seq, per): this rank's vocabulary rows
        parts = [torch.empty_like(local) for _ in range(self.tp)]
        dist.all_gather(parts, local.contiguous(), group=self.group)
        return torch.cat(parts, -1)[..., :self.vocab]

    @torch.no_grad()
    def generate(self, ids, new_tokens):
        """Greedy decoding with the KV cache: ids (batch, prompt) -> (batch, new_tokens) int64, the
        same on every rank (each takes the argmax of the same gathered logits)."""
        cache, tokens = {}, []
        logits = self.forward(ids, cache)
        for step in range(new_tokens):
            tokens.append(logits[:, -1].argmax(-1, keepdim=True))
            if step + 1 < new_tokens:
                logits = self.forward(tokens[-1], cache)
        return torch.cat(tokens, 1)
