"""Equivalence of alternative execution paths at TP: KV-cache decode vs full forward,
sequence parallelism vs plain TP, and vocab-parallel argmax. Rank functions return CPU
tensors; the driver compares them against the float64 single-device reference with the
same policy as the layer cases (harness/tolerance.py)."""
from __future__ import annotations

import torch

from impl.architecture import parse_dtype
from impl.communication import CountingCommunicator, NullCommunicator, all_reduce_sequence_parallel_grads

from .cases import LayerCase, block_config, build_layer, full_tensors, inputs, parameter_grads
from impl.model import O_BIAS, TransformerBlock


def cached_decode(ctx, case: LayerCase, prefill: int) -> torch.Tensor:
    """Block output for the case's sequence, computed as prefill of `prefill` tokens into the
    KV cache followed by one-token decode steps."""
    dtype = parse_dtype(case.dtype)
    layer = build_layer(case, ctx.comm, dtype).to(ctx.device)
    layer.attention.allocate_kv_cache(case.batch, case.seq + 2)
    x = inputs(case).to(ctx.device, dtype)
    with torch.no_grad():
        outs = [layer(x[:, :prefill], 0, use_cache=True)]
        outs += [layer(x[:, t:t + 1], t, use_cache=True) for t in range(prefill, case.seq)]
    return torch.cat(outs, 1).float().cpu()


def sp_block_tensors(case: LayerCase, dtype) -> dict[str, torch.Tensor]:
    """The block case's tensors plus an o_proj bias: a replicated parameter added after the
    sequence-parallel reduce-scatter, whose gradient is a per-rank partial under SP."""
    t = full_tensors(case)
    g = torch.Generator().manual_seed(case.seed + 3)
    t[O_BIAS] = 0.1 * torch.randn(case.params["hidden"], generator=g)
    return {k: v.to(dtype) for k, v in t.items()}


def sequence_parallel_block(ctx, case: LayerCase, reduce_grads: bool = True) -> dict:
    """Forward/backward of the block with sequence parallelism; returns the gathered output and
    input grad, and this rank's local parameter grads after all_reduce_sequence_parallel_grads
    (`reduce_grads=False` skips it, to show the test catches the missing reduction)."""
    dtype = parse_dtype(case.dtype)
    counting = CountingCommunicator(ctx.comm)
    layer = TransformerBlock.from_full(sp_block_tensors(case, dtype), block_config(case), counting, dtype=dtype, device=ctx.device, sequence_parallel=True)
    x = ctx.comm.shard(inputs(case), 1).to(ctx.device, dtype).requires_grad_(True)
    out = layer(x)
    forward = [(r.kind, r.nbytes, r.dtype) for r in counting.records]
    counting.reset()
    with torch.no_grad():  # communication.py's direct (inference) branches of the SP regions
        inference_equal = torch.equal(layer(x.detach()), out)
    inference = [(r.kind, r.nbytes, r.dtype) for r in counting.records]
    g = torch.Generator().manual_seed(case.seed + 2)
    grad = torch.randn(case.batch, case.seq, case.params["hidden"], generator=g).to(dtype)
    out.backward(ctx.comm.shard(grad, 1).to(ctx.device))
    if reduce_grads:
        all_reduce_sequence_parallel_grads(layer, ctx.comm)
    gather = lambda t: ctx.comm.all_gather(t.contiguous(), 1).float().cpu()  # noqa: E731
    tagged = sorted(n for n, p in layer.named_parameters() if getattr(p, "sequence_parallel_grad", False))
    return {"out": gather(out.detach()), "grad_in": gather(x.grad), "grad": grad.float(), **parameter_grads(layer), "tagged": tagged,
            "forward_collectives": forward, "inference_collectives": inference, "inference_equal": inference_equal}


def block_reference(case: LayerCase, dtype, grad: torch.Tensor | None = None, o_bias: bool = False, absolute: bool = False, *, device: str) -> dict:
    """The unsharded block on one `device` (the ranks' device kind); `o_bias` adds sp_block_tensors' o_proj bias.
    `absolute=True`: |weights|, |input|, |output gradient| — the magnitude S of the tolerance
    policy (harness/tolerance.py), as cases.run_single computes it for the layer suites."""
    if o_bias:
        layer = TransformerBlock.from_full(sp_block_tensors(case, parse_dtype(case.dtype)), block_config(case), NullCommunicator(1), dtype=dtype, device=device)
    else:
        layer = build_layer(case, NullCommunicator(1), dtype).to(device)
    if absolute:
        with torch.no_grad():
            for p in layer.parameters():
                p.abs_()
    x = inputs(case).to(device, dtype)
    x = (x.abs() if absolute else x).requires_grad_(True)
    out = layer(x)
    if grad is not None:
        out.backward((grad.abs() if absolute else grad).to(device, dtype))
    out = out.detach().cpu()
    grads = {n: p.grad.detach().cpu() for n, p in layer.named_parameters() if p.grad is not None}
    return {"out": out.float() if dtype != torch.float64 else out, "grad_in": None if grad is None else x.grad.cpu(), "grads": grads}


def lm_head_argmax(ctx, case: LayerCase) -> dict:
    """Greedy pick over vocab-parallel logits, with every real logit negative so an unmasked
    zero-weight padding row (logit 0) would win."""
    layer = build_layer(case, ctx.comm, parse_dtype(case.dtype)).to(ctx.device)
    x = inputs(case).abs().to(ctx.device, parse_dtype(case.dtype)) + 0.1
    with torch.no_grad():
        layer.weight.copy_(-layer.weight.abs() - 0.01)
        local = layer.local_logits(x)
        full = layer(x)
    # which local columns are padding follows from vocab and tp alone (not the layer's own num_padding):
    # rank r holds global columns [r*rows, (r+1)*rows) of the table padded to tp*rows, rows = ceil(vocab/tp)
    vocab, tp = case.params["vocab"], ctx.comm.world_size
    rows = -(-vocab // tp)
    is_pad = torch.arange(rows, device=local.device) + ctx.comm.rank * rows >= vocab
    return {"argmax": full.argmax(-1).cpu(), "logits": full.float().cpu(), "local_width": local.shape[-1],
            "pad_is_neg_inf": bool(torch.isneginf(local[..., is_pad]).all()), "real_are_finite": bool(torch.isfinite(local[..., ~is_pad]).all()),
            "num_padding": int(is_pad.sum())}
