"""Layer equivalence cases: one spec, built identically on every rank and on the driver.

A `LayerCase` names a layer kind, its dimensions, a dtype and a seed. From the seed every
process regenerates the same full weights, input and output-gradient (nothing large is
pickled). `run_on_rank` runs rank `ctx.rank`'s shard forward and backward; `run_single`
runs the unsharded layer on one device (world size 1, NullCommunicator) in any dtype —
the float64 run is the "exact" reference the tolerance policy measures both against.

How a rank's outputs and gradients map to the full ones is not re-derived here: each result
carries the ShardSpec every parameter declares (impl/sharding.py) and, for a column-parallel
layer's local output, its weight's, and the gathering below only reads them.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field

import torch

from impl.architecture import Communicator, ModelConfig, parse_dtype
from impl.communication import CountingCommunicator, NullCommunicator
from impl.model import TransformerBlock, random_block_tensors
from impl.sharding import ShardLayoutError, shard, spec_of, unshard
from impl.tensor_parallel import (ColumnParallelLinear, MergedColumnParallelLinear, ParallelAttention, ParallelLMHead, ParallelMLP,
                                  QKVParallelLinear, RMSNorm, RowParallelLinear, VocabParallelEmbedding)

KINDS = ("column", "row", "merged_column", "qkv", "embedding", "lm_head", "rmsnorm", "attention", "mlp", "block")


@dataclass(frozen=True)
class LayerCase:
    kind: str
    dtype: str = "float32"
    seed: int = 0
    batch: int = 2
    seq: int = 3
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        dims = ",".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.kind}[{self.dtype} seed={self.seed} b={self.batch} s={self.seq} {dims}]"

    def as_row(self) -> dict:
        return {"layer": self.kind, "dtype": self.dtype, "seed": self.seed, "batch": self.batch, "seq": self.seq, "params": repr(self.params)}


def _randn(g, *shape, scale=1.0):
    return scale * torch.randn(*shape, generator=g)


def full_tensors(case: LayerCase) -> dict[str, torch.Tensor]:
    """The layer's full weights (float32), deterministic in case.seed."""
    g = torch.Generator().manual_seed(case.seed)
    p = case.params
    if case.kind in ("column", "row"):
        t = {"weight": _randn(g, p["out"], p["in"], scale=p["in"] ** -0.5)}
        if p.get("bias"):
            t["bias"] = _randn(g, p["out"], scale=0.1)
        return t
    if case.kind == "merged_column":
        t = {f"weight{i}": _randn(g, s, p["in"], scale=p["in"] ** -0.5) for i, s in enumerate(p["segments"])}
        if p.get("bias"):
            t.update({f"bias{i}": _randn(g, s, scale=0.1) for i, s in enumerate(p["segments"])})
        return t
    if case.kind in ("qkv", "attention"):
        h, d = p["hidden"], p["head_dim"]
        t = {"q": _randn(g, p["heads"] * d, h, scale=h ** -0.5), "k": _randn(g, p["kv_heads"] * d, h, scale=h ** -0.5), "v": _randn(g, p["kv_heads"] * d, h, scale=h ** -0.5)}
        if p.get("bias"):
            t.update({"q_bias": _randn(g, p["heads"] * d, scale=0.1), "k_bias": _randn(g, p["kv_heads"] * d, scale=0.1), "v_bias": _randn(g, p["kv_heads"] * d, scale=0.1)})
        if case.kind == "attention":
            t["o"] = _randn(g, h, p["heads"] * d, scale=(p["heads"] * d) ** -0.5)
        return t
    if case.kind in ("embedding", "lm_head"):
        return {"weight": _randn(g, p["vocab"], p["hidden"], scale=1.0 if case.kind == "embedding" else p["hidden"] ** -0.5)}
    if case.kind == "rmsnorm":
        return {"weight": 1.0 + _randn(g, p["hidden"], scale=0.1)}
    if case.kind == "mlp":
        h, i = p["hidden"], p["inter"]
        return {"gate": _randn(g, i, h, scale=h ** -0.5), "up": _randn(g, i, h, scale=h ** -0.5), "down": _randn(g, h, i, scale=i ** -0.5)}
    if case.kind == "block":
        return random_block_tensors(block_config(case), g, std=p["hidden"] ** -0.5)
    raise ValueError(f"kind={case.kind!r}: must be one of {KINDS}")


def block_config(case: LayerCase) -> ModelConfig:
    p = case.params
    return ModelConfig(vocab_size=16, hidden_size=p["hidden"], intermediate_size=p["inter"], num_layers=1, num_heads=p["heads"],
                       num_kv_heads=p["kv_heads"], head_dim=p["head_dim"], qkv_bias=bool(p.get("bias")))


def build_layer(case: LayerCase, comm: Communicator, dtype: torch.dtype):
    """Rank comm.rank's shard of the case's layer, through the layers' own from_full."""
    t = {k: v.to(parse_dtype(case.dtype)) for k, v in full_tensors(case).items()}  # quantise once, like a checkpoint
    p, kw = case.params, dict(dtype=dtype)
    if case.kind == "column":
        return ColumnParallelLinear.from_full(t["weight"], comm, bias=t.get("bias"), gather_output=p.get("gather", False), **kw)
    if case.kind == "row":
        return RowParallelLinear.from_full(t["weight"], comm, bias=t.get("bias"), input_is_parallel=False, **kw)
    if case.kind == "merged_column":
        n = len(p["segments"])
        biases = [t[f"bias{i}"] for i in range(n)] if p.get("bias") else None
        return MergedColumnParallelLinear.from_full([t[f"weight{i}"] for i in range(n)], comm, biases=biases, **kw)
    if case.kind == "qkv":
        return QKVParallelLinear.from_full(t["q"], t["k"], t["v"], comm, p["head_dim"], t.get("q_bias"), t.get("k_bias"), t.get("v_bias"), **kw)
    if case.kind == "attention":
        return ParallelAttention.from_full(t["q"], t["k"], t["v"], t["o"], comm, p["head_dim"], t.get("q_bias"), t.get("k_bias"), t.get("v_bias"), **kw)
    if case.kind == "embedding":
        return VocabParallelEmbedding.from_full(t["weight"], comm, **kw)
    if case.kind == "lm_head":
        return ParallelLMHead.from_full(t["weight"], comm, **kw)
    if case.kind == "rmsnorm":
        return RMSNorm.from_full(t["weight"], **kw)
    if case.kind == "mlp":
        return ParallelMLP.from_full(t["gate"], t["up"], t["down"], comm, **kw)
    if case.kind == "block":
        return TransformerBlock.from_full(t, block_config(case), comm, **kw)
    raise ValueError(f"kind={case.kind!r}: must be one of {KINDS}")


def inputs(case: LayerCase) -> torch.Tensor:
    """The layer input (float32 values, quantised to the case's dtype)."""
    g = torch.Generator().manual_seed(case.seed + 1)
    p = case.params
    if case.kind == "embedding":
        return torch.randint(0, p["vocab"], (case.batch, case.seq), generator=g)
    width = {"column": "in", "row": "in", "merged_column": "in"}.get(case.kind, "hidden")
    return _randn(g, case.batch, case.seq, p[width]).to(parse_dtype(case.dtype)).float()


def output_grad(case: LayerCase, out_shape) -> torch.Tensor:
    g = torch.Generator().manual_seed(case.seed + 2)
    return _randn(g, *out_shape).to(parse_dtype(case.dtype)).float()


def forward_backward(layer, case: LayerCase, dtype: torch.dtype, comm: Communicator, absolute: bool = False):
    """Forward, then backward of sum(out * grad_out). Returns CPU tensors: out, input grad, local param grads.

    `absolute`: inputs and output gradient replaced by their absolute values (see run_single)."""
    device = next(layer.parameters()).device
    x = inputs(case).to(device)
    x = x.abs() if absolute and case.kind != "embedding" else x
    x = x if case.kind == "embedding" else x.to(dtype).requires_grad_(True)
    out = layer(x)
    forward_collectives = len(getattr(comm, "records", ()))
    sharded_out = case.kind in ("column", "merged_column", "qkv") and not case.params.get("gather", False)
    if sharded_out:
        # the full output gradient cut like the output: a replicated kv head's reaches one holder
        # (the others' q heads add theirs downstream), so replicas other than the first get zeros
        spec = layer.output_spec()
        full = output_grad(case, (*out.shape[:-1], spec.full_size())).movedim(-1, 0)
        grad = shard(list(torch.split(full, [s.size for s in spec.segments], 0)), spec, comm.rank, comm.world_size, duplicates="zero").movedim(0, -1)
    else:
        grad = output_grad(case, out.shape)
    out.backward((grad.abs() if absolute else grad).to(device, dtype))
    return {"out": out.detach().cpu(), "grad_in": None if case.kind == "embedding" else x.grad.detach().cpu(), **parameter_grads(layer),
            "out_spec": layer.output_spec() if sharded_out else None, "forward_collectives": forward_collectives}


def parameter_grads(layer) -> dict:
    """{"grads": {name: this rank's local gradient}, "shards": {name: the parameter's declared ShardSpec}}."""
    named = [(n, p) for n, p in layer.named_parameters() if p.grad is not None]
    return {"grads": {n: p.grad.detach().cpu().clone() for n, p in named}, "shards": {n: spec_of(p) for n, p in named}}


def gather_outputs(case: LayerCase, results: list[dict]) -> torch.Tensor:
    """Full output from every rank's result: a column-parallel layer's local outputs joined as its
    declared output spec says (the first holder of a replicated kv head); else rank 0's."""
    spec = results[0]["out_spec"]
    if len(results) == 1 or spec is None:
        return results[0]["out"]
    return joined([r["out"].movedim(-1, 0) for r in results], spec).movedim(0, -1)


def gather_grads(results: list[dict]) -> dict[str, torch.Tensor]:
    """Full parameter gradients from every rank's result ("grads" and "shards", rank order), keyed
    like the 1-rank layer's: each joined as its parameter declares, replicated kv heads summed over
    their holders (each saw a share of the query heads); replicated parameters from rank 0."""
    shards = results[0]["shards"]
    return {n: joined([r["grads"][n] for r in results], shards[n], sum_replicas=True) for n in results[0]["grads"]}


def joined(locals_: list[torch.Tensor], spec, sum_replicas: bool = False) -> torch.Tensor:
    """unshard's segments end to end; locals that do not fit the spec (a rank that sharded another
    way: a bug under test) give NaN of the spec's full shape, which no comparison passes."""
    try:
        return torch.cat(unshard(locals_, spec, sum_replicas), spec.dim or 0)
    except ShardLayoutError:
        shape = list(locals_[0].shape)
        shape[spec.dim] = spec.full_size()
        return torch.full(shape, float("nan"), dtype=locals_[0].dtype)


def replicated_grad_names(result: dict) -> list[str]:
    """Names of the parameters every rank holds in full (norm weights, row-parallel biases), as
    declared: gather_grads takes their gradient from rank 0, so every rank's copy must agree."""
    return [n for n, spec in result["shards"].items() if spec.dim is None]


def replicated_grads_agree(results: list[dict]) -> bool:
    """Every rank's gradient of each replicated parameter is bitwise identical to rank 0's."""
    return all(torch.equal(r["grads"][n], results[0]["grads"][n]) for n in replicated_grad_names(results[0]) for r in results)


# --------------------------------------------------------------------------- entry points


def run_on_rank(ctx, case: LayerCase) -> dict:
    """Rank side: build the shard, run forward/backward, count collectives of the forward."""
    dtype = parse_dtype(case.dtype)
    counting = CountingCommunicator(ctx.comm)
    layer = build_layer(case, counting, dtype).to(ctx.device)
    result = forward_backward(layer, case, dtype, counting)
    n = result.pop("forward_collectives")
    result["collectives"] = [{**asdict(r), "phase": "forward" if i < n else "backward"} for i, r in enumerate(counting.records)]
    # inference (no autograd) takes communication.py's direct-collective branches: count them too
    counting.reset()
    x = inputs(case).to(ctx.device)
    with torch.no_grad():
        result["inference_out"] = layer(x if case.kind == "embedding" else x.to(dtype)).cpu()
    result["collectives"] += [{**asdict(r), "phase": "inference"} for r in counting.records]
    return result


def run_single(case: LayerCase, dtype: torch.dtype, absolute: bool = False, *, device: str) -> dict:
    """The unsharded layer on one `device` ("cpu" or "cuda": the ranks' device kind, so E1
    reflects the same kernels), in `dtype` (float64 gives the exact reference).

    `absolute=True` evaluates it with |weights|, |inputs| and |output gradient|: for every
    reduction (matmul, sum over vocab) that gives the sum of the absolute values of the terms,
    the magnitude the rounding of any partial sum is proportional to (harness/tolerance.py)."""
    comm = NullCommunicator(1)
    layer = build_layer(case, comm, dtype).to(device)
    if absolute:
        with torch.no_grad():
            for p in layer.parameters():
                p.abs_()
    result = forward_backward(layer, case, dtype, comm, absolute)
    result.pop("forward_collectives")
    return result
