"""Sweep points of a stack known only through the implementation protocol (harness.implementations).

`reference` and `dtensor` are built into the sweep (harness/sweep.py): it can run their shards
without collectives (T_null) and alone on one device (projected points). Any other stack named in
`implementations` (hf-tp, an entry point, module:object) is measured from outside, with what the
protocol gives:

  model      `random(config, ctx, dtype, seed)` on every rank of a world of `ws` ranks;
  prefill    one `logits(model, ids)` on the prompt (batch, prompt), then the last token's argmax,
             so an asynchronous last collective cannot still be in flight when the clock stops;
  decode     `greedy(model, ids, steps)` and `greedy(model, ids, 1)` timed back to back in each
             repeat: (T(steps) - T(1)) * steps / (steps - 1) is `steps` decode steps with the
             prompt's prefill and the first token cancelled out (the stack's own KV cache);
  collectives per step  from `collectives(config, tp, batch, seq, phase)` when the stack declares
             it, else unknown (NaN).

What cannot be measured from outside is reported as such, never estimated: T_null, hence exposed
communication (NaN: the stack's collectives cannot be switched off), per-step dispatch (a stack
has no kept single step; the call's overhead is reported), and projected points (a point's
failure naming why: the protocol has no way to run one rank's shard alone). Whatever the stack
cannot do (`check` raising Unsupported, a missing capability) is that point's failure with the
reason; what it raises on its ranks is the point's failure naming the stack (ImplementationError).
"""
from __future__ import annotations

import statistics

import torch

from impl.architecture import parse_dtype

from .implementations import ImplementationError, Unsupported, checked_logits, checked_tokens, load_implementation
from .timing import peak_memory_bytes, percentile, time_calls

BUILT_IN = ("reference", "dtensor")  # the sweep builds these itself (null and projected modes)


def refusal(spec: str, config, phase, ws: int, projected: bool) -> str | None:
    """Why this point of `spec` cannot run (checked in the driver, before any rank), or None."""
    impl = load_implementation(spec, "implementations")
    missing = "random" not in impl.capabilities or (phase.kind == "decode" and "greedy" not in impl.capabilities)
    if missing:
        need = "random" if "random" not in impl.capabilities else "greedy"
        return f"unsupported: {spec} does not declare the {need!r} capability a {phase.kind} sweep point needs"
    try:
        impl.check(config, ws)
    except Unsupported as e:
        return f"unsupported: {e.reason}"
    if phase.kind == "decode" and phase.steps < 2:
        return f"unsupported: phases.steps={phase.steps}: a protocol stack's decode step is timed as T(steps) - T(1), so it needs steps >= 2"
    if projected:
        return (f"not projectable: {spec} is known only through the protocol, which cannot run one rank's shard alone "
                "without collectives; measure it on as many devices as ranks")
    return None


def declared_collectives(spec: str, config, phase, ws: int) -> list[dict] | None:
    """One timed run's collectives as the sweep's records ({"kind", "nbytes"}), or None if undeclared."""
    impl = load_implementation(spec, "implementations")
    if "collectives" not in impl.capabilities or ws == 1:
        return [] if ws == 1 else None
    seq = phase.prompt if phase.kind == "prefill" else 1
    per_forward = [{"kind": c["op"], "nbytes": int(c["bytes"])} for c in impl.collectives(config, ws, phase.batch, seq, phase.kind)]
    return per_forward * (phase.steps if phase.kind == "decode" else 1)


def measure_protocol_on_rank(ctx, spec: str, config, phase, dtype: str, warmup: int, repeats: int) -> dict:
    """Time one phase of `spec` on this rank of a world (see the module docstring); the same
    fields as harness.sweep.measure_on_rank's result, with no collective records."""
    impl = load_implementation(spec, "implementations")
    try:
        model = impl.random(config, ctx, parse_dtype(dtype), 0)
    except Exception as e:
        raise ImplementationError(spec, f"random() raised {type(e).__name__}: {e}") from e
    ids = torch.randint(0, config.vocab_size, (phase.batch, phase.prompt), generator=torch.Generator().manual_seed(0)).to(ctx.device)
    if phase.kind == "prefill":
        checked_logits(spec, impl.logits(model, ids), ids, config.vocab_size)

        def run():
            with torch.no_grad():
                impl.logits(model, ids)[:, -1].argmax(-1)
    else:
        checked_tokens(spec, impl.greedy(model, ids, phase.steps), ids, phase.steps, config.vocab_size)

        def run():
            return time_calls(lambda: impl.greedy(model, ids, phase.steps), 1, ctx.device)[0] - time_calls(lambda: impl.greedy(model, ids, 1), 1, ctx.device)[0]
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        ctx.comm.barrier()  # ranks start each repeat together
        if phase.kind == "prefill":
            times.append(time_calls(run, 1, ctx.device)[0])
        else:
            times.append(max(0.0, run()) * phase.steps / (phase.steps - 1))
    return {"rank": ctx.rank, "median_s": statistics.median(times), "p90_s": percentile(times, 0.90), "times": times,
            "peak_memory": peak_memory_bytes(ctx.device), "collectives": [], "steps": phase.steps if phase.kind == "decode" else 1}


__all__ = ["BUILT_IN", "declared_collectives", "measure_protocol_on_rank", "refusal"]
