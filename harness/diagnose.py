"""`tpgate verify` diagnostics: where TP logits leave the float64 reference, whether that is rounding
or a bug, whether a run repeats bitwise, and how far the next-token distributions move.

Cheap, on for every row (computed from what verify has anyway, or one more prompt forward):
  next_token_kl   KL(p* || p_tp) per prompt position, p = softmax(logits) in float64, p* the
                  exact reference's (mean and max over the batch's positions);
  determinism     the implementation's logits() called twice on the same inputs, each rank's two
                  results compared bit for bit (run_on_rank's second call).
Behind `--diagnose` (two more forwards and one more load per TP degree):
  sub-layer profile  forward hooks (HiddenStates) record the output of every sub-layer of the
                  model, in execution order: each top-level child (embedding, final norm, LM
                  head), and for each block of a ModuleList every named child (attention, MLP or
                  MoE, whatever norms the family has) and the block's own output. No sub-layer
                  is named here: the structure is read from the model, so any family built from
                  impl/ is covered. Without sequence parallelism (verify runs without it) each
                  of these outputs is replicated on every rank after its all-reduce, so rank 0's
                  is compared against the float64 TP=1 model's at the same point, on the same
                  inputs, with the tolerance policy's `compare` (harness/tolerance.py):
                      bound_s = 2 * E1_s + (tp + 1) * sqrt(tp) * u * max|y*_s|,
                      E1_s    = max|y1_s - y*_s|,
                  y*_s the float64 TP=1 model's output at sub-layer s and y1_s tpgate's TP=1
                  model's in the working dtype (the only single-device run that has the same
                  sub-layers; the row's logits verdict keeps its own calibration, transformers'
                  where installed). E1_s is the accumulated error of everything up to s, so the
                  bound follows the error through the layers the way the logits bound does at
                  the end. The first sub-layer over its bound is where the TP run leaves the
                  function; ranks whose recorded outputs are not bitwise rank 0's are named too
                  (a replicated state that differs across ranks is a partial or a bug).
  float32 collectives  the same TP degree loaded again with ctx.comm wrapped in
                  impl.communication.ReduceInDtypeCommunicator(float32) and run once more;
                  its logits error against float64 decides rounding or bug (classify).
Both need the rank model to be tpgate's (an nn.Module holding a tpgate Communicator as `.comm`,
reducing through ctx.comm); for any other stack (dtensor, hf-tp, a protocol stack on plain
torch.distributed) they report "not available" with the reason.
"""
from __future__ import annotations

import dataclasses

import torch
from torch import nn

from impl.architecture import Communicator
from impl.communication import ReduceInDtypeCommunicator

from .tolerance import compare

ROUNDING, REDUCTION_ROUNDING, BUG, UNDETERMINED = "rounding", "reduction rounding", "bug", "undetermined"


# --------------------------------------------------------------------------- distributions


def next_token_kl(exact_logits: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """KL(p* || p) per position, float64, shape (batch, seq): p* = softmax(exact_logits),
    p = softmax(logits), both (batch, seq, vocab), softmax over the vocabulary in float64.
    Terms where p* = 0 contribute 0 (x log x -> 0); KL >= 0, so the float64 rounding of two
    equal distributions (a few 1e-17 below zero) is clamped to 0."""
    log_p = exact_logits.double().log_softmax(-1)
    log_q = logits.double().log_softmax(-1)
    p = log_p.exp()
    terms = torch.where(p > 0, p * (log_p - log_q), torch.zeros_like(p))
    return terms.sum(-1).clamp_min(0.0)


def kl_summary(exact_logits: torch.Tensor, logits: torch.Tensor) -> dict:
    kl = next_token_kl(exact_logits, logits)
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max())}


# --------------------------------------------------------------------------- hidden states


def probe_points(model: nn.Module) -> list[tuple[str, int | None, str, nn.Module]]:
    """(name, layer index or None, sub-layer, module) of every recorded output: each top-level
    child of `model`, and for each block of a top-level nn.ModuleList its named children and
    the block itself (sub-layer "output")."""
    points = []
    for child_name, child in model.named_children():
        if isinstance(child, nn.ModuleList):
            for i, block in enumerate(child):
                points += [(f"{child_name}.{i}.{name}", i, name, sub) for name, sub in block.named_children()]
                points.append((f"{child_name}.{i}.output", i, "output", block))
        else:
            points.append((child_name, None, child_name, child))
    return points


class HiddenStates:
    """with HiddenStates(model) as h: run a forward; h.states = {name: output on the CPU} in
    execution order, h.meta = {name: (layer, sub-layer)}. A module's output that is a tuple is
    recorded by its first tensor; a module run twice in one forward is recorded again as
    "name#2". Hooks read outputs (detached copies) and are removed on exit."""

    def __init__(self, model: nn.Module):
        self.points = probe_points(model)
        self.states: dict[str, torch.Tensor] = {}
        self.meta: dict[str, tuple[int | None, str]] = {}
        self._handles = []

    def _hook(self, name: str, layer, sublayer):
        def record(module, args, output):
            out = output[0] if isinstance(output, (tuple, list)) and output else output
            if not isinstance(out, torch.Tensor):
                return
            key, n = name, 1
            while key in self.states:
                n += 1
                key = f"{name}#{n}"
            self.states[key] = out.detach().to("cpu", copy=True)
            self.meta[key] = (layer, sublayer)
        return record

    def __enter__(self):
        self._handles = [module.register_forward_hook(self._hook(name, layer, sub)) for name, layer, sub, module in self.points]
        return self

    def __exit__(self, *exc):
        for handle in self._handles:
            handle.remove()
        self._handles = []


def hidden_states(model: nn.Module, forward) -> tuple[dict, dict, torch.Tensor]:
    """(states, meta, logits) of `forward()` run under no_grad with HiddenStates on `model`."""
    with torch.no_grad(), HiddenStates(model) as h:
        logits = forward()
    return h.states, h.meta, logits


def not_tpgate_model(model) -> str | None:
    """None when the sub-layer diagnostics apply to `model` (tpgate's: an nn.Module reducing
    through the tpgate Communicator it holds as `.comm`), else why not."""
    if not isinstance(model, nn.Module):
        return f"the rank model is a {type(model).__name__}, not an nn.Module: no sub-layers to hook"
    if not isinstance(getattr(model, "comm", None), Communicator):
        return (f"the rank model ({type(model).__name__}) is not tpgate's (it holds no tpgate Communicator): its sub-layer outputs "
                f"are not known to be replicated and its collectives do not go through ctx.comm")
    return None


# --------------------------------------------------------------------------- rank side


def states_digests(states: dict) -> dict[str, str]:
    from .verify import logits_digest

    return {name: logits_digest(t) for name, t in states.items()}


def sublayers_on_rank(impl, model, ids: torch.Tensor, rank: int) -> dict:
    """The recorded sub-layer outputs of `impl.logits(model, ids)` on this rank: rank 0 returns
    them ("states"), every rank their digests ("digests"); {"unavailable": reason} for a model
    that is not tpgate's."""
    reason = not_tpgate_model(model)
    if reason:
        return {"unavailable": reason}
    states, _, _ = hidden_states(model, lambda: impl.logits(model, ids))
    return {"states": states if rank == 0 else None, "digests": states_digests(states)}


def fp32_collectives_on_rank(ctx, spec: str, directory: str, dtype: torch.dtype, ids: torch.Tensor) -> dict:
    """`spec` loaded again on this rank with ctx.comm wrapped in ReduceInDtypeCommunicator(float32),
    run on `ids`: rank 0 returns {"logits" float32 CPU, "states", "reductions"}, other ranks
    {"reductions"}; {"unavailable": reason} at tp = 1 (no collectives), for a model that is not
    tpgate's, or when no reduction went through the wrapped communicator."""
    from .implementations import build_on_rank, checked_logits

    if ctx.comm.world_size == 1:
        return {"unavailable": "tp=1: no collectives to reduce in float32"}
    wrapped = ReduceInDtypeCommunicator(ctx.comm, torch.float32)
    impl, model = build_on_rank(spec, directory, dataclasses.replace(ctx, comm=wrapped), dtype)
    reason = not_tpgate_model(model)
    if reason:
        return {"unavailable": reason}
    states, _, logits = hidden_states(model, lambda: impl.logits(model, ids))
    if wrapped.reductions == 0:
        return {"unavailable": "no reduction of its forward went through ctx.comm: the float32 option cannot reach its collectives"}
    logits = checked_logits(spec, logits, ids, logits.shape[-1]).float().cpu()
    return {"logits": logits, "states": states, "reductions": wrapped.reductions} if ctx.comm.rank == 0 else {"reductions": wrapped.reductions}


# --------------------------------------------------------------------------- driver side


def references(exact_model, single_model, ids: torch.Tensor) -> dict:
    """The float64 TP=1 model's and tpgate's TP=1 working-dtype model's sub-layer outputs on
    `ids` (driver side, once per verify), and the latter's own logits error against float64
    (TP=1's error in the working dtype)."""
    exact, meta, exact_logits = hidden_states(exact_model, lambda: exact_model(ids))
    single, _, single_logits = hidden_states(single_model, lambda: single_model(ids.to(next(single_model.parameters()).device)))
    return {"exact": exact, "single": single, "meta": meta,
            "tp1_error": float((single_logits.double().cpu() - exact_logits.double()).abs().max())}


def profile(states: dict, refs: dict, dtype: torch.dtype, tp: int) -> list[dict]:
    """One entry per sub-layer of the float64 reference, in its execution order: err (max |tp -
    float64|), e1 (max |TP=1 working dtype - float64|), bound, ratio = err / bound and passed (the
    policy's compare); a sub-layer the TP run did not record, or recorded with another shape, is
    "comparable": False with a note."""
    rows = []
    for name, exact in refs["exact"].items():
        layer, sublayer = refs["meta"][name]
        got, single = states.get(name), refs["single"].get(name)
        base = {"name": name, "layer": layer, "sublayer": sublayer}
        if got is None or single is None or tuple(got.shape) != tuple(exact.shape):
            note = "not recorded" if got is None or single is None else f"shape {tuple(got.shape)} != {tuple(exact.shape)}"
            rows.append({**base, "comparable": False, "note": note, "err": None, "e1": None, "bound": None, "ratio": None, "passed": None})
            continue
        c = compare(name, got, single, exact, dtype, tp)
        rows.append({**base, "comparable": True, "note": "", "err": c["err_tp"], "e1": c["err_single"], "bound": c["bound"],
                     "ratio": c["budget_used"], "passed": bool(c["passed"])})
    return rows


def first_exceeding(rows: list[dict]) -> dict | None:
    """The first comparable sub-layer over its bound, as {"name", "layer", "sublayer", "ratio"}; None: none."""
    for r in rows:
        if r["comparable"] and not r["passed"]:
            return {k: r[k] for k in ("name", "layer", "sublayer", "ratio")}
    return None


def classify(err: float, bound: float, err_fp32: float | None, unavailable: str | None = None) -> dict:
    """Rounding or bug, from a TP run's logits error `err` against float64, the row's `bound`,
    and `err_fp32`, the error of the same TP degree with its collectives reduced in float32
    (None where that run is not available, `unavailable` saying why).

    Error model (harness/tolerance.py): y_tp - y* = A + P + C (+ D), where A is the accumulation
    error of each rank's local sums in the working dtype (the same kind as TP=1's own, which the
    bound allows twice: 2*E1), P the rounding of each rank's partial result to the working dtype,
    C the rounding of the collective's tp - 1 additions in the working dtype, and D whatever a
    bug adds (a wrong shard, a missing or doubled reduction: independent of the reduction's
    precision). The bound B = 2*E1 + (tp+1)*sqrt(tp)*u*max|y*| covers A + P + C. Reducing in
    float32 leaves A and P as they are and replaces C by one final rounding (float32 additions
    of bfloat16/float16 partials are exact or within u32 << u), so:
      err <= B                  -> "rounding": what TP's reordering and extra roundings can
                                   cause (a D smaller than B cannot be told from rounding: B
                                   is the diagnostic's resolution);
      err > B, err_fp32 <= B    -> "reduction rounding": the excess left with C alone, so it
                                   was the collective's own rounding (it rounds more often or
                                   in a narrower dtype than the model's tp - 1 additions); not
                                   a layout bug, and reducing in float32 is the fix;
      err > B, err_fp32 > B     -> "bug": without C the error still exceeds all A + P can
                                   reach, so D != 0 (it does not shrink into the bound);
      err > B, no float32 run   -> "undetermined", with the reason.
    In float32 the collectives already reduce in float32 (the wrapper passes them through, so
    err_fp32 == err) and the rule is the bound alone. The same rule applies to one sub-layer's
    error and bound (diagnose_row does, where the logits are within their bound but a sub-layer
    is not: a bug diluted by the later layers). Returns {"class", "reason"}."""
    if err <= bound:
        return {"class": ROUNDING, "reason": f"max-abs {err:.3g} <= bound {bound:.3g}: within what reordered sums and TP's extra roundings cause"}
    if err_fp32 is None:
        return {"class": UNDETERMINED, "reason": f"max-abs {err:.3g} > bound {bound:.3g}; float32 collectives not available: {unavailable}"}
    if err_fp32 <= bound:
        return {"class": REDUCTION_ROUNDING, "reason": f"max-abs {err:.3g} > bound {bound:.3g}, but {err_fp32:.3g} <= bound with float32 "
                                                       f"collectives: the collectives' own rounding exceeds the model's"}
    return {"class": BUG, "reason": f"max-abs {err:.3g} > bound {bound:.3g}, and still {err_fp32:.3g} with float32 collectives "
                                    f"({err_fp32 / err:.0%} of it): not rounding"}


def diagnose_row(row: dict, per_rank: list[dict], refs: dict, exact_logits: torch.Tensor, dtype: torch.dtype) -> dict:
    """The row's "diagnostics" from run_on_rank's per-rank "diagnostics" and the driver's `refs`:
    {"available", "reason", "profile", "first_exceeding", "ranks_differ_at" ({rank: [sub-layers]}),
    "tp1_error", "fp32_collectives" ({"max_abs_vs_exact", "profile", "first_exceeding",
    "reductions"} or {"unavailable"}), "classification"}."""
    tp = row["tp"]
    mine = per_rank[0]["diagnostics"]
    if "unavailable" in mine["sublayers"]:
        return {"available": False, "reason": mine["sublayers"]["unavailable"]}
    rows = profile(mine["sublayers"]["states"], refs, dtype, tp)
    first_digests = mine["sublayers"]["digests"]
    differ = {}
    for rank, got in enumerate(per_rank[1:], 1):
        names = [n for n, d in got["diagnostics"]["sublayers"]["digests"].items() if first_digests.get(n) != d]
        if names:
            differ[rank] = names
    fp32 = mine["fp32"]
    if "unavailable" in fp32:
        fp32_out, err_fp32 = {"unavailable": fp32["unavailable"]}, None
    else:
        err_fp32 = float((fp32["logits"].double() - exact_logits.double()).abs().max())
        fp32_rows = profile(fp32["states"], refs, dtype, tp)
        fp32_out = {"max_abs_vs_exact": err_fp32, "reductions": fp32["reductions"], "profile": fp32_rows, "first_exceeding": first_exceeding(fp32_rows)}
    first = first_exceeding(rows)
    verdict = classify(row["max_abs_vs_exact"], row["bound"], err_fp32, fp32_out.get("unavailable"))
    if verdict["class"] == ROUNDING and first is not None:
        # the error model holds at every sub-layer: one over its own bound refutes rounding there,
        # however much the later layers dilute the difference before the logits
        at = next(r for r in rows if r["name"] == first["name"])
        at32 = next((r for r in fp32_out.get("profile", []) if r["name"] == first["name"] and r["comparable"]), None)
        verdict = classify(at["err"], at["bound"], None if at32 is None else at32["err"], fp32_out.get("unavailable"))
        verdict["reason"] = f"logits within their bound, but {first['name']} is {first['ratio']:.3g}x over its own: {verdict['reason']}"
    return {"available": True, "reason": "", "profile": rows, "first_exceeding": first, "ranks_differ_at": differ,
            "tp1_error": refs["tp1_error"], "fp32_collectives": fp32_out, "classification": verdict}


def location(diagnostics: dict | None) -> str:
    """Where a row leaves the reference, in words (for the table)."""
    if not diagnostics:
        return "-"
    if not diagnostics["available"]:
        return "not available"
    first = diagnostics["first_exceeding"]
    if first is None:
        return "no sub-layer over its bound"
    return f"layer {first['layer']} {first['sublayer']}" if first["layer"] is not None else first["sublayer"]
