"""`tpgate verify CHECKPOINT_DIR`: does this checkpoint give the same logits and tokens at every TP degree?

For each TP degree the checkpoint is loaded shard by shard (DistributedCheckpointLoader) in
a persistent world of that size; one fixed random prompt batch is run (prompt logits, then a
greedy continuation). References, all single-device:
  exact   tpgate's model at TP=1 in float64 on the CPU (y* of harness/tolerance.py);
  single  Hugging Face transformers' own model class in the working dtype (when installed);
  hf64    transformers in float64: its prompt logits must match `exact` to 1e-5 relative
          (transformers evaluates rotary tables in float32 even for a float64 model, ~1e-7; a
          semantic difference is O(1)), and its greedy tokens must equal `exact`'s up to a near-tie.
The bound's E1 is single's own error, max|single - hf64|: two runs of the independent
reference, never the gap between transformers and tpgate's model (which a tpgate bug would
widen, turning the bug into tolerance). hf64's float32 rotary tables are bitwise those of
`single` (same float32 computation), so that error cancels in E1 and E1 is the working
dtype's arithmetic error alone; tpgate's TP result carries its own float32 tables, whose effect
on the logits (measured as the semantic gap: ~2u of float32 at 30 to 3000 positions on the
suites' checkpoints) lies within the bound's rounding term (tp+1)*sqrt(tp)*u*max|y*| >= 2u*max|y*|.
Without transformers, single is tpgate's TP=1 in the working dtype, E1 = max|single - exact|:
the bound is then calibrated on tpgate itself and no semantic check runs; the result says so
("reference", "calibration").
A TP degree passes when its prompt logits are within the tolerance policy's bound of `exact`
and its greedy tokens equal the exact ones, or first differ at a step where the exact top-2
logit margin is below twice the bound (a near-tie the dtype cannot resolve), and every rank
holds bitwise the same prompt logits and greedy tokens as rank 0 (ADR-9).
At tp > 1 every rank must also hold fewer parameters than the whole checkpoint
(harness.implementations.sharding_evidence, ADR-27): a stack that computes the full model on
every rank is a FAIL row naming its per-rank count, never a pass. Each row carries the full
count ("full_parameters") and every rank's count ("local_parameters"; None where a rank's model
is not an nn.Module and cannot be counted).
With `diagnose`, a row the diagnostics classify as a bug fails, even when its logits are
within their bound (a sub-layer over its own bound that float32 collectives do not bring back:
fail_diagnosed_bug). On every shipped family's reference the worst sub-layer sits at <= 0.5 of
its bound in float32 and bfloat16 at TP 1/2/4, so the rule has a 2x margin against rounding.
Beside the verdict, never part of it (harness/diagnose.py): each row's next-token KL against
`exact` ("kl_mean", "kl_max" over the prompt positions) and whether each rank's logits() repeated
on the same inputs gave the same bits ("deterministic", "nondeterministic_ranks"); with
`diagnose` (--diagnose) also "diagnostics": the error/bound profile over the model's sub-layers,
the first sub-layer over its bound, a rerun with float32 collectives and the rounding-or-bug
classification, or "not available" with the reason for a stack whose model is not tpgate's.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import torch

from impl.architecture import TPConfigError, parse_dtype, require
from impl.communication import NullCommunicator
from impl.model import checkpoint_shapes
from impl.model_loader import DistributedCheckpointLoader, read_config

from .implementations import Unsupported, build_on_rank, checked_logits, checked_tokens, load_implementations, sharding_evidence
from .tolerance import compare

SEMANTIC_RTOL = 1e-5


@dataclass(frozen=True)
class VerifyRequest:
    directory: str
    tps: tuple[int, ...]
    device: str = "cpu"
    dtype: str = "float32"
    batch: int = 2
    prompt_len: int = 16
    new_tokens: int = 8
    seed: int = 0
    json_path: str | None = None  # --json: where the results are written (checked by check_request)
    save_logits: str | None = None  # --save-logits: where the prompt logits are written (checked by check_request)
    implementations: tuple[str, ...] = ("reference",)  # --impl: protocol specs (harness.implementations), judged one after another
    diagnose: bool = False  # --diagnose: sub-layer profile and float32-collectives rerun per row (harness.diagnose)
    html_path: str | None = None  # --html: where the report page is written (checked by check_request)


def prompt(req: VerifyRequest, vocab: int) -> torch.Tensor:
    return torch.randint(0, vocab, (req.batch, req.prompt_len), generator=torch.Generator().manual_seed(req.seed))


def greedy_with_margins(step_logits) -> tuple[torch.Tensor, torch.Tensor]:
    top2 = step_logits.topk(2, dim=-1).values if step_logits.shape[-1] > 1 else torch.cat([step_logits, step_logits], -1)
    return step_logits.argmax(-1), top2[..., 0] - top2[..., 1]


def run_model(model, ids: torch.Tensor, new_tokens: int) -> dict:
    """Prompt logits (batch, prompt, vocab) float32 CPU, greedy tokens and exact-path margins."""
    with torch.no_grad():
        logits = model(ids).float()
        model.allocate_kv_cache(ids.shape[0], ids.shape[1] + new_tokens - 1)
        step = model(ids, 0, use_cache=True, last_only=True)[:, -1].float()
        tokens, margins = [], []
        for i in range(new_tokens):
            token, margin = greedy_with_margins(step)
            tokens.append(token)
            margins.append(margin)
            if i + 1 < new_tokens:
                step = model(token[:, None], ids.shape[1] + i, use_cache=True)[:, -1].float()
    return {"logits": logits.cpu(), "tokens": torch.stack(tokens, 1).cpu(), "margins": torch.stack(margins, 1).cpu()}


def first_divergence(tokens: torch.Tensor, ref_tokens: torch.Tensor, margins: torch.Tensor, tie: float) -> tuple[int | None, bool]:
    """(first step where any row of `tokens` (batch, steps) leaves `ref_tokens`, or None; whether
    every diverging row first differs where the reference's top-2 margin is <= `tie`, a near-tie
    the comparison's precision cannot resolve)."""
    differs = tokens != ref_tokens
    firsts = {b: int(differs[b].nonzero()[0]) for b in range(differs.shape[0]) if differs[b].any()}
    near_tie = bool(firsts) and all(float(margins[b, t]) <= tie for b, t in firsts.items())
    return (min(firsts.values()) if firsts else None), near_tie


def logits_digest(logits: torch.Tensor) -> str:
    """SHA-256 of the logits' bytes: equal digests <=> bitwise-identical logits (same shape and dtype)."""
    import hashlib

    t = logits.detach().cpu().contiguous()
    digest = hashlib.sha256(f"{tuple(t.shape)}{t.dtype}".encode())
    digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())  # via uint8: numpy has no bfloat16
    return digest.hexdigest()


def full_parameter_count(config) -> int:
    """Parameter elements of the whole model of `config`: every tensor its checkpoint holds (a tied
    LM head is the embedding, counted once)."""
    return sum(math.prod(shape) for shape in checkpoint_shapes(config).values())


def run_on_rank(ctx, req: VerifyRequest, ids: torch.Tensor, spec: str = "reference") -> dict:
    """Implementation `spec` on this rank: rank 0 of the TP group returns {"logits" (batch, prompt,
    vocab) float32 CPU, "tokens" (batch, new_tokens) or None when the stack has no greedy,
    "logits_digest", "repeat_equal" (a second logits() on the same inputs gave bitwise this rank's
    first logits), "local_parameters", "diagnostics" (with req.diagnose: harness.diagnose's
    sub-layer outputs and float32-collectives run, else None)}; other ranks all but "logits"
    (their logits would be copies of rank 0's: ADR-9 promises every rank holds the same bytes,
    which rank_disagreements checks). A contract breach raises ImplementationError naming `spec`,
    and so does a rank that holds the whole model at tp > 1 (sharding_evidence), before any
    forward runs."""
    impl, model = build_on_rank(spec, req.directory, ctx, parse_dtype(req.dtype))
    config = read_config(req.directory)
    local_parameters = sharding_evidence(spec, model, full_parameter_count(config), ctx.comm.world_size)
    ids = ids.to(ctx.device)
    vocab = config.vocab_size
    logits = checked_logits(spec, impl.logits(model, ids), ids, vocab).float().cpu().clone()  # a copy: the repeat may reuse the stack's buffer
    digest = logits_digest(logits)
    repeat_equal = logits_digest(checked_logits(spec, impl.logits(model, ids), ids, vocab).float().cpu()) == digest
    tokens = None
    if "greedy" in impl.capabilities:
        tokens = checked_tokens(spec, impl.greedy(model, ids, req.new_tokens), ids, req.new_tokens, vocab).cpu()
    diagnostics = None
    if req.diagnose:
        from .diagnose import fp32_collectives_on_rank, sublayers_on_rank

        diagnostics = {"sublayers": sublayers_on_rank(impl, model, ids, ctx.comm.rank)}
        del model  # the float32-collectives copy is loaded next: never two models on a rank
        unavailable = diagnostics["sublayers"].get("unavailable")
        diagnostics["fp32"] = {"unavailable": unavailable} if unavailable else fp32_collectives_on_rank(ctx, spec, req.directory, parse_dtype(req.dtype), ids)
    out = {"logits": logits, "tokens": tokens, "logits_digest": digest, "repeat_equal": repeat_equal, "local_parameters": local_parameters,
           "diagnostics": diagnostics}
    return out if ctx.comm.rank == 0 else {k: v for k, v in out.items() if k != "logits"}


def rank_disagreements(per_rank: list[dict]) -> list[dict]:
    """Ranks whose greedy tokens or prompt logits are not bitwise those of rank 0, as
    [{"rank": r, "differs_in": ["tokens" and/or "logits"]}]; empty when every rank agrees.

    `per_rank[r]` is run_on_rank's result of rank r (each holds "tokens" and "logits_digest")."""
    first = per_rank[0]
    out = []
    for rank, got in enumerate(per_rank[1:], 1):
        same_tokens = (got["tokens"] is None and first["tokens"] is None) or (
            got["tokens"] is not None and first["tokens"] is not None and torch.equal(got["tokens"], first["tokens"]))
        differs = ([] if same_tokens else ["tokens"]) + \
                  ([] if got["logits_digest"] == first["logits_digest"] else ["logits"])
        if differs:
            out.append({"rank": rank, "differs_in": differs})
    return out


def hf_run(req: VerifyRequest, ids: torch.Tensor, dtype: torch.dtype, device: str) -> dict | None:
    try:
        from transformers import AutoModelForCausalLM
    except ImportError:
        return None
    # eager experts: transformers' default MoE kernel (grouped_mm) has no float64, and one
    # implementation in every dtype keeps E1 (working dtype vs float64) a measure of rounding alone
    model = AutoModelForCausalLM.from_pretrained(req.directory, dtype=dtype, experts_implementation="eager").to(device).eval()
    ids = ids.to(device)
    with torch.no_grad():
        logits = model(ids).logits.float()
        seq, tokens = ids, []
        for _ in range(req.new_tokens):  # full recompute: simple and independent of HF's cache API
            token = model(seq).logits[:, -1].argmax(-1)
            tokens.append(token)
            seq = torch.cat([seq, token[:, None]], 1)
    return {"logits": logits.cpu(), "tokens": torch.stack(tokens, 1).cpu()}


def error_as_of(single: torch.Tensor, single64: torch.Tensor, exact: torch.Tensor) -> torch.Tensor:
    """exact + (single - single64), float64: a stand-in for `single` whose error against `exact`
    is `single`'s error against its own float64 run, so that compare(..., stand-in, exact, ...)
    calibrates E1 on the reference alone. All three: the same shape (batch, prompt, vocab)."""
    return exact.double() + (single.double() - single64.double())


def check_output_path(argument: str, path: str | None) -> None:
    """An output file `tpgate verify` will write once every TP degree has run: refused now,
    rather than after the run, unless its parent is an existing, writable directory and the
    path itself is not a directory. None (not asked for) passes."""
    import os

    if path is None:
        return
    target = Path(path)
    parent = target.parent
    require(not target.is_dir(), argument, str(path), "must name a file, not a directory")
    require(parent.is_dir(), argument, str(path), f"its directory {str(parent)!r} does not exist")
    require(os.access(parent, os.W_OK | os.X_OK), argument, str(path), f"its directory {str(parent)!r} is not writable")
    require(not target.exists() or os.access(target, os.W_OK), argument, str(path), "exists and is not writable")


def check_request(req: VerifyRequest) -> dict:
    """Every bad input named before any process starts; returns the implementations to judge
    ({spec: implementation}, in --impl order)."""
    config = read_config(req.directory)
    parse_dtype(req.dtype, "--dtype")
    for name in ("batch", "prompt_len", "new_tokens"):
        require(getattr(req, name) >= 1, f"--{name.replace('_', '-')}", getattr(req, name), "must be >= 1")
    # the last generated token is never fed back: prompt + new - 1 positions are computed
    require(req.prompt_len + req.new_tokens - 1 <= config.max_seq_len, "--prompt-len + --new-tokens", req.prompt_len + req.new_tokens,
            f"must be <= max_position_embeddings + 1 = {config.max_seq_len + 1}")
    require(req.device in ("cpu", "cuda"), "--device", req.device, "must be cpu or cuda")
    require(req.device == "cpu" or torch.cuda.is_available(), "--device", req.device, "no CUDA device is visible")
    require(len(req.tps) >= 1, "--tp", req.tps, "no TP degree left to verify")
    require(isinstance(req.diagnose, bool), "--diagnose", req.diagnose, "must be True or False")
    for tp in req.tps:
        try:
            config.check_tp(tp)
        except TPConfigError as e:
            raise TPConfigError("--tp", tp, f"this checkpoint cannot be sharded {tp} ways ({e})") from None
    impls = load_implementations(req.implementations, "--impl")
    check_output_path("--json", req.json_path)
    check_output_path("--save-logits", req.save_logits)
    check_output_path("--html", req.html_path)
    outputs = {}  # each output file named once: one would overwrite another
    for argument, path in (("--json", req.json_path), ("--save-logits", req.save_logits), ("--html", req.html_path)):
        if path is not None:
            resolved = Path(path).resolve()
            require(resolved not in outputs, argument, path, f"must differ from {outputs.get(resolved)} (one would overwrite the other)")
            outputs[resolved] = argument
    return impls


def default_tps(directory: str) -> tuple[int, ...]:
    config = read_config(directory)
    ok = []
    for tp in (1, 2, 4):
        try:
            config.check_tp(tp)
            ok.append(tp)
        except TPConfigError:
            pass
    return tuple(ok)


def verify(req: VerifyRequest, worlds_factory, progress=None) -> dict:
    """Run every TP degree; returns {"rows": [...], "passed": bool, ...}. `worlds_factory(n)` gives a world of n ranks."""
    impls = check_request(req)
    config = read_config(req.directory)
    dtype = parse_dtype(req.dtype)
    ids = prompt(req, config.vocab_size)
    exact_model = DistributedCheckpointLoader(req.directory, NullCommunicator(1)).load(torch.float64)
    exact = run_model(exact_model, ids, req.new_tokens)
    refs = None
    if req.diagnose:
        from .diagnose import references

        refs = references(exact_model, DistributedCheckpointLoader(req.directory, NullCommunicator(1)).load(dtype, req.device), ids)
    del exact_model
    hf = hf_run(req, ids, dtype, req.device)
    semantic = hf64 = None
    if hf is not None:
        single = hf
        hf64 = hf_run(req, ids, torch.float64, "cpu")
        calibrated = error_as_of(hf["logits"], hf64["logits"], exact["logits"])
        calibration = f"transformers {req.dtype} vs transformers float64"
        scale = exact["logits"].abs().max().item()
        semantic = {"max_abs": (hf64["logits"].double() - exact["logits"].double()).abs().max().item(), "scale": scale}
        # the greedy continuation too: a bug on the generation path alone (last-token selection,
        # the cache) leaves the prompt logits untouched
        first, near_tie = first_divergence(hf64["tokens"], exact["tokens"], exact["margins"], 2 * SEMANTIC_RTOL * scale)
        semantic.update(first_diverging_token=first, divergence_at_near_tie=near_tie if first is not None else None)
        semantic["passed"] = semantic["max_abs"] <= SEMANTIC_RTOL * scale and (first is None or near_tie)
    else:
        single = run_model(DistributedCheckpointLoader(req.directory, NullCommunicator(1)).load(dtype, req.device), ids, req.new_tokens)
        calibrated = single["logits"]
        calibration = f"tpgate TP=1 {req.dtype} vs tpgate float64 (transformers not installed: calibrated on tpgate itself, no semantic check)"
    rows, logits_by_tp, full_parameters = [], {}, full_parameter_count(config)
    for spec, impl in impls.items():
        for tp in req.tps:
            if progress:
                progress(f"{spec} TP={tp}: loading and running on {tp} rank(s)")
            base = {"implementation": spec, "tp": tp, "dtype": req.dtype, "full_parameters": full_parameters}
            try:
                impl.check(config, tp)
                per_rank = worlds_factory(tp).run(run_on_rank, req, ids, spec)
            except Unsupported as e:
                rows.append(failed_row(base, f"unsupported: {e.reason}"))
                continue
            except RuntimeError as e:  # the world's RankError: the stack raised on its ranks (ImplementationError or its own)
                if not hasattr(e, "tracebacks"):
                    raise
                rows.append(failed_row(base, f"raised on rank(s) {sorted(e.tracebacks)}: {last_line(e.tracebacks[min(e.tracebacks)])}"))
                continue
            logits_by_tp.setdefault(spec, {})[tp] = per_rank[0]["logits"]
            rows.append(judge(base, per_rank, calibrated, single, exact, dtype, logits_by_tp[spec].get(1)))
            if refs is not None:
                from .diagnose import diagnose_row

                rows[-1]["diagnostics"] = diagnose_row(rows[-1], per_rank, refs, exact["logits"], dtype)
                fail_diagnosed_bug(rows[-1])
    passed = all(r["passed"] for r in rows) and (semantic is None or semantic["passed"])
    return {"request": req.__dict__ | {"tps": list(req.tps), "implementations": list(req.implementations)},
            "reference": "transformers" if hf is not None else "tpgate TP=1",
            "calibration": calibration, "semantic_check": semantic, "rows": rows, "passed": passed, "input_ids": ids,
            "logits": logits_by_tp.get(req.implementations[0], {}), "logits_by_implementation": logits_by_tp,
            "transformers_logits": None if hf is None else {"working": hf["logits"], "float64": hf64["logits"]}}


def fail_diagnosed_bug(row: dict) -> None:
    """A row whose diagnostics call it a bug fails, naming the sub-layer: a difference the error
    model cannot explain is evidence against the stack whether or not later layers dilute it
    below the logits' bound."""
    from .diagnose import BUG

    verdict = ((row.get("diagnostics") or {}).get("classification") or {})
    if verdict.get("class") == BUG and row["passed"]:
        row["passed"] = False
        row["error"] = f"diagnosed as a bug: {verdict['reason']}"


def last_line(traceback_text: str) -> str:
    lines = [line for line in traceback_text.strip().splitlines() if line.strip()]
    return lines[-1].strip() if lines else "(no traceback)"


def failed_row(base: dict, error: str) -> dict:
    """The row of a (implementation, tp) that did not produce logits: failed, with why."""
    return {**base, "max_abs_vs_exact": None, "bound": None, "rel_vs_exact": None, "max_abs_vs_single": None, "max_abs_vs_tp1": None,
            "top1_agreement": None, "first_diverging_token": None, "divergence_at_near_tie": None, "ranks_agree": None,
            "disagreeing_ranks": [], "local_parameters": None, "kl_mean": None, "kl_max": None, "deterministic": None,
            "nondeterministic_ranks": [], "diagnostics": None, "error": error, "passed": False}


def judge(base: dict, per_rank: list[dict], calibrated, single: dict, exact: dict, dtype: torch.dtype, tp1_logits) -> dict:
    """One (implementation, tp) row: prompt logits against `exact` within the policy's bound
    (calibrated on `calibrated`), greedy tokens against the exact ones up to a near-tie (when the
    stack decodes), and every rank bitwise equal to rank 0. Reported beside the verdict, not part
    of it: the next-token KL against `exact` (harness.diagnose.kl_summary) and whether every
    rank's repeated logits() was bitwise its first ("deterministic", "nondeterministic_ranks")."""
    from .diagnose import kl_summary

    got = per_rank[0]
    row = compare("logits", got["logits"], calibrated, exact["logits"], dtype, base["tp"])
    if got["tokens"] is None:
        first, near_tie = None, False
    else:
        first, near_tie = first_divergence(got["tokens"], exact["tokens"], exact["margins"], 2 * row["bound"])
    disagreeing = rank_disagreements(per_rank)
    return {**base, "max_abs_vs_exact": row["err_tp"], "bound": row["bound"],
            "rel_vs_exact": row["err_tp"] / max(exact["logits"].abs().max().item(), 1e-30),
            "max_abs_vs_single": (got["logits"] - single["logits"]).abs().max().item(),
            "max_abs_vs_tp1": (got["logits"] - tp1_logits).abs().max().item() if tp1_logits is not None else None,
            "top1_agreement": float((got["logits"].argmax(-1) == exact["logits"].argmax(-1)).float().mean()),
            "first_diverging_token": first, "divergence_at_near_tie": near_tie if first is not None else None, "ranks_agree": not disagreeing,
            "disagreeing_ranks": disagreeing, "tokens_checked": got["tokens"] is not None,
            "local_parameters": [r.get("local_parameters") for r in per_rank], "error": "",
            **kl_summary(exact["logits"], got["logits"]), "deterministic": all(r["repeat_equal"] for r in per_rank),
            "nondeterministic_ranks": [rank for rank, r in enumerate(per_rank) if not r["repeat_equal"]], "diagnostics": None,
            "passed": bool(row["passed"] and not disagreeing and (first is None or near_tie))}


def save_logits(result: dict, path: str | Path) -> None:
    """input_ids (batch, prompt) and tp1, tp2, ... prompt logits (batch, prompt, vocab) float32."""
    from safetensors.torch import save

    from .atomic import write_bytes_atomic

    tensors = {"input_ids": result["input_ids"].contiguous(), **{f"tp{tp}": t.float().contiguous() for tp, t in result["logits"].items()}}
    write_bytes_atomic(path, save(tensors))


def write_json(result: dict, path: str | Path) -> None:
    from .atomic import write_text_atomic

    public = {k: v for k, v in result.items() if k not in ("input_ids", "logits", "transformers_logits")}
    write_text_atomic(path, json.dumps(public, indent=2, default=str))
