"""The `tpgate` command."""
from __future__ import annotations

import argparse
import sys

from harness.perf_model import ALL_REDUCE_PRICINGS
from impl.architecture import TPConfigError


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be >= 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tpgate", description="Prove a tensor-parallel inference stack equals its single-device baseline, and gate its release.")
    sub = parser.add_subparsers(dest="command", required=True)
    c = sub.add_parser("correctness", help="run the TP-equivalence suites at world sizes 1/2/4 and write reports/correctness/")
    c.add_argument("--examples", type=_positive_int, default=None, help="hypothesis examples per property (default: [tool.tpgate.correctness].examples in pyproject.toml)")
    c.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="where ranks compute (cuda: ranks share GPUs via gloo when fewer GPUs than ranks)")
    c.add_argument("--out", default="reports/correctness", help="report directory, replaced as a whole: new, empty or an earlier correctness report's (default: %(default)s)")
    c.add_argument("-k", dest="keyword", default=None, help="only tests matching this pytest -k expression")
    c.add_argument("--impl", type=_name_list, default=None, metavar="NAME[,NAME]",
                   help="implementations the model suite (suites/model/test_implementations.py) judges, the first as the candidate "
                        "(the verdict and exit status are its), the rest as peers shown beside it: built-in (reference, dtensor, hf-tp), "
                        "a tpgate.implementations entry point, or module:object (default: [tool.tpgate.correctness].implementations)")
    c.add_argument("--checkpoints", type=_name_list, default=None, metavar="NAME[,NAME]",
                   help="model-suite checkpoints (suites/model/checkpoints.py) the candidate is judged on, peers on the first "
                        "(default: llama-gqa,qwen2; a run without both is no evidence for the gate)")
    d = sub.add_parser("dispatch", help="measure the orchestrator's dispatch overhead for a no-op call (p50/p90/p99)")
    d.add_argument("--world-size", type=_positive_int, default=4)
    d.add_argument("--calls", type=_positive_int, default=500)
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sub.add_parser("env", help="print the environment the reports record")
    sc = sub.add_parser("scaling", help="sweep world sizes, evaluate the gate and write reports/scaling/ (config: [tool.tpgate.scaling])")
    sc.add_argument("--config", default=None, help="TOML file with [tool.tpgate.scaling] / [tool.tpgate.gate] (default: pyproject.toml)")
    sc.add_argument("--world-sizes", type=_tp_list, default=None, help="e.g. 1,2,4")
    sc.add_argument("--presets", type=_name_list, default=None, help="comma-separated preset names")
    sc.add_argument("--implementations", type=_name_list, default=None, metavar="NAME[,NAME]",
                    help="comma-separated: built-in (reference, dtensor, hf-tp), a tpgate.implementations entry point, or module:object")
    sc.add_argument("--device", choices=("cpu", "cuda"), default=None)
    sc.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default=None)
    sc.add_argument("--repeats", type=_positive_int, default=None)
    sc.add_argument("--prefill-overlap-chunks", type=_positive_int, default=None, metavar="C",
                    help="reference sequence-parallel prefill: pipeline each collective with its matmul in C token chunks (1: not chunked)")
    sc.add_argument("--project", action="store_true", default=None, help="project world sizes larger than the GPUs present (marked projected)")
    sc.add_argument("--compare-projection", action="store_true", default=None,
                    help="also project the measured world sizes > 1, so the report shows the projection's error")
    sc.add_argument("--decode-all-reduce", choices=ALL_REDUCE_PRICINGS, default=None,
                    help="price projected decode all-reduces with NCCL or the low-latency communicator's algorithms (impl/low_latency.py)")
    sc.add_argument("--baseline", default=None, help="a results.csv of an earlier run to compare against")
    sc.add_argument("--out", default="reports/scaling", help="report directory, replaced as a whole: new, empty or an earlier scaling report's (default: %(default)s)")
    g = sub.add_parser("gate", help="re-evaluate the Go/No-Go gate of the last scaling report from the reports as they are now; exit 0 only on GO")
    g.add_argument("--reports", default="reports")
    lm = sub.add_parser("loader-memory", help="peak memory per rank loading a checkpoint: sharded (lazy slices) vs naive (whole tensors)")
    lm.add_argument("checkpoint", metavar="CHECKPOINT_DIR", help="a Hugging Face safetensors checkpoint; created if --synthetic-layers is given and it is absent")
    lm.add_argument("--tp", type=_positive_int, default=4)
    lm.add_argument("--synthetic-layers", type=_positive_int, default=None, help="write a Llama-shaped float32 checkpoint with this many layers (12 -> 2.8 GB) first")
    v = sub.add_parser("verify", help="load a Hugging Face (safetensors) checkpoint at each TP degree and compare logits and greedy tokens")
    v.add_argument("checkpoint", metavar="CHECKPOINT_DIR")
    v.add_argument("--tp", type=_tp_list, default=None, help="comma-separated TP degrees, e.g. 1,2,4 (default: every degree of 1,2,4 the model allows)")
    v.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    v.add_argument("--dtype", choices=("float32", "bfloat16", "float16"), default="float32")
    v.add_argument("--batch", type=_positive_int, default=2)
    v.add_argument("--prompt-len", type=_positive_int, default=16)
    v.add_argument("--new-tokens", type=_positive_int, default=8)
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--impl", type=_name_list, default=("reference",), metavar="NAME[,NAME]",
                   help="implementations to judge: built-in (reference, dtensor, hf-tp), a tpgate.implementations entry point, or module:object (default: reference)")
    v.add_argument("--json", dest="json_path", default=None, metavar="FILE", help="write the results as JSON")
    v.add_argument("--save-logits", default=None, metavar="FILE", help="safetensors file: input_ids and the prompt logits per TP degree (tp1, tp2, ...)")
    v.add_argument("--diagnose", action="store_true", help="per row: the first sub-layer over its bound (error/bound profile) and a rerun with "
                                                           "float32 collectives, classifying a mismatch as rounding or bug (tpgate-model stacks)")
    v.add_argument("--html", dest="html_path", default=None, metavar="FILE", help="write a self-contained report page with the plots")
    return parser


def _loader_memory(args) -> int:
    from impl.model_loader import CheckpointError

    try:
        return _print_loader_memory(args)
    except CheckpointError as e:  # no such checkpoint, or not a safetensors one
        print(f"tpgate loader-memory: error: {e}", file=sys.stderr)
        return 2


def _print_loader_memory(args) -> int:
    from pathlib import Path

    from harness.bench import loader_memory, write_synthetic_checkpoint

    if args.synthetic_layers and not (Path(args.checkpoint) / "config.json").exists():
        size = write_synthetic_checkpoint(args.checkpoint, layers=args.synthetic_layers)
        print(f"wrote a synthetic checkpoint of {size / 1e9:.2f} GB to {args.checkpoint}")
    gb = 1e9
    for r in loader_memory(args.checkpoint, args.tp):
        goal = r["shard"] + r["largest_tensor"] + 0.5e9
        print(f"{r['mode']:22s} rank {r['rank']}: peak +{r['load_anon'] / gb:.2f} GB allocated (goal <= shard {r['shard'] / gb:.2f} + largest tensor "
              f"{r['largest_tensor'] / gb:.2f} + 0.5 = {goal / gb:.2f} GB), page cache of the mmapped files {r['peak_file'] / gb:.2f} GB")
    return 0


def _name_list(text: str) -> tuple[str, ...]:
    values = tuple(t.strip() for t in text.split(",") if t.strip())
    if not values:
        raise argparse.ArgumentTypeError(f"{text!r} names nothing")
    return values


def _scaling(args) -> int:
    from harness.atomic import check_report_out
    from harness.gate import GateConfig
    from harness.scaling import REPO, read_baseline, read_tables, run_scaling
    from harness.sweep import load_config

    check_report_out(args.out, "scaling", REPO)
    table, gate_table = read_tables(args.config)
    overrides = {"world_sizes": args.world_sizes, "presets": args.presets, "implementations": args.implementations, "device": args.device,
                 "dtype": args.dtype, "repeats": args.repeats, "project": args.project, "compare_projection": args.compare_projection,
                 "decode_all_reduce": args.decode_all_reduce,
                 "prefill_overlap_chunks": args.prefill_overlap_chunks}
    cfg = load_config(table, overrides)
    if cfg.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise TPConfigError("--device", "cuda", "no CUDA device is visible")
    summary = run_scaling(cfg, GateConfig.from_table(gate_table), args.out, read_baseline(args.baseline, cfg))
    _print_gate(summary["gate"])
    print(f"report: {summary['index']}")
    return 0


def _print_gate(gate: dict) -> None:
    for c in gate["criteria"]:
        value = "-" if c["measured"] is None else (f"{c['measured']:.3g}" if isinstance(c["measured"], float) else str(c["measured"]))
        print(f"  {c['status']:10s} {c['name']}: {value} (threshold {c['threshold']}){'  — ' + c['note'] if c['note'] else ''}")
    print(f"gate: {gate['verdict']}")


def _gate(args) -> int:
    from harness.gate import evaluate_reports

    gate, recorded = evaluate_reports(args.reports)
    _print_gate(gate)
    if recorded.get("verdict") != gate["verdict"]:
        print(f"(the scaling report recorded {recorded.get('verdict')}; the verdict above is from the reports as they are now)")
    return 0 if gate["verdict"] == "GO" else 1


def _tp_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of integers") from None
    if not values or any(v < 1 for v in values):
        raise argparse.ArgumentTypeError(f"{text!r}: every TP degree must be >= 1")
    return tuple(dict.fromkeys(values))


def _verify(args) -> int:
    from harness.verify import VerifyRequest, default_tps, save_logits, verify, write_json
    from impl.model_loader import CheckpointError
    from harness.runtime.orchestrator import MultiGPUOrchestrator

    try:
        tps = args.tp or default_tps(args.checkpoint)
    except CheckpointError as e:
        print(f"tpgate verify: error: {e}", file=sys.stderr)
        return 2
    req = VerifyRequest(args.checkpoint, tps, args.device, args.dtype, args.batch, args.prompt_len, args.new_tokens, args.seed,
                        json_path=args.json_path, save_logits=args.save_logits, implementations=tuple(args.impl), diagnose=args.diagnose,
                        html_path=args.html_path)
    worlds = {}

    def world(n):
        if n not in worlds or not worlds[n].alive:  # a stack that crashed its ranks leaves a world to replace
            if n in worlds:
                worlds[n].shutdown()
            worlds[n] = MultiGPUOrchestrator(n, device=args.device, timeout_s=600)
        return worlds[n]

    try:
        result = verify(req, world, progress=lambda msg: print(f"tpgate verify: {msg}", file=sys.stderr))
    except CheckpointError as e:
        print(f"tpgate verify: error: {e}", file=sys.stderr)
        return 2
    finally:
        for w in worlds.values():
            w.shutdown()
    _print_verify(result)
    if args.json_path:
        write_json(result, args.json_path)
    if args.save_logits:
        save_logits(result, args.save_logits)
    if args.html_path:
        from harness.verify_report import write_verify_html

        write_verify_html(result, args.html_path)
    return 0 if result["passed"] else 1


def _print_verify(result: dict) -> None:
    sem = result["semantic_check"]
    print(f"reference: float64 tpgate TP=1 (exact); single-device run: {result['reference']}; bound calibrated on {result['calibration']}")
    if sem:
        div = sem.get("first_diverging_token")
        tokens = "greedy tokens equal" if div is None else f"greedy tokens differ from step {div}{' (near-tie)' if sem.get('divergence_at_near_tie') else ''}"
        print(f"transformers float64 vs tpgate float64: max-abs {sem['max_abs']:.3g} (limit {sem['scale'] * 1e-5:.3g}), {tokens}: {'ok' if sem['passed'] else 'MISMATCH'}")
    w = max([14] + [len(r["implementation"]) for r in result["rows"]])  # a module:object spec can be long
    head = (f"{'implementation':>{w}} {'tp':>3} {'dtype':>9} {'max-abs':>10} {'rel':>10} {'bound':>10} {'top-1':>7} {'diverges at':>12} "
            f"{'KL mean':>9} {'KL max':>9} {'repeat':>8}  verdict")
    print(head)
    for r in result["rows"]:
        if r.get("error") and r["max_abs_vs_exact"] is None:  # no logits came back
            print(f"{r['implementation']:>{w}} {r['tp']:>3} {r['dtype']:>9} {'-':>10} {'-':>10} {'-':>10} {'-':>7} {'-':>12} {'-':>9} {'-':>9} {'-':>8}  "
                  f"FAIL: {r['error']}")
            continue
        div = "-" if r["first_diverging_token"] is None else f"{r['first_diverging_token']}{' (tie)' if r['divergence_at_near_tie'] else ''}"
        if not r.get("tokens_checked", True):
            div = "not checked"  # the stack declares no greedy
        repeat = "bitwise" if r["deterministic"] else "differs"
        print(f"{r['implementation']:>{w}} {r['tp']:>3} {r['dtype']:>9} {r['max_abs_vs_exact']:>10.3g} {r['rel_vs_exact']:>10.3g} {r['bound']:>10.3g} {r['top1_agreement']:>7.1%} {div:>12} "
              f"{r['kl_mean']:>9.2g} {r['kl_max']:>9.2g} {repeat:>8}  {'PASS' if r['passed'] else 'FAIL'}" + (f": {r['error']}" if r.get("error") else ""))
        for d in r.get("disagreeing_ranks") or []:
            print(f"    rank {d['rank']} differs from rank 0 in {' and '.join(d['differs_in'])} (ranks must hold identical logits, ADR-9)")
    if result["request"].get("diagnose"):
        _print_diagnostics(result["rows"])
    print("verdict:", "PASS" if result["passed"] else "FAIL")


def _print_diagnostics(rows: list[dict]) -> None:
    from harness.diagnose import location

    print("diagnostics (--diagnose; harness/diagnose.py):")
    for r in rows:
        d = r.get("diagnostics")
        if not d:
            continue
        name = f"  {r['implementation']} tp={r['tp']}"
        if not d["available"]:
            print(f"{name}: not available: {d['reason']}")
            continue
        fp32 = d["fp32_collectives"]
        fp32_text = f"{fp32['max_abs_vs_exact']:.3g} ({fp32['reductions']} reductions)" if "max_abs_vs_exact" in fp32 else f"not available ({fp32['unavailable']})"
        worst = max((p for p in d["profile"] if p["comparable"]), key=lambda p: p["ratio"], default=None)
        print(f"{name}: {d['classification']['class'].upper()}; first over its bound: {location(d)}"
              + (f" (error/bound {d['first_exceeding']['ratio']:.3g})" if d["first_exceeding"] else "")
              + (f"; worst sub-layer {worst['name']} at {worst['ratio']:.3g} of its bound" if worst else ""))
        print(f"      max-abs vs float64: {r['max_abs_vs_exact']:.3g} as run; with collectives reduced in float32: {fp32_text}; "
              f"TP=1 {r['dtype']}: {d['tp1_error']:.3g}; bound {r['bound']:.3g}"
              + ("" if r["max_abs_vs_tp1"] is None else f"; max-abs vs TP=1 as run: {r['max_abs_vs_tp1']:.3g}"))
        print(f"      {d['classification']['reason']}")
        for rank, names in d["ranks_differ_at"].items():
            print(f"      rank {rank} differs from rank 0 at {', '.join(names[:4])}{' ...' if len(names) > 4 else ''}")


# errors that mean bad input (a configuration, an --out, a report or a pytest selection the command
# cannot use), each naming what is wrong; anything else is a bug and keeps its traceback
INPUT_ERRORS = (("impl.architecture", "TPConfigError"), ("harness.gate", "ReportError"), ("harness.runner", "SuiteRunError"),
                ("harness.implementations", "ImplementationError"))


def _input_errors() -> tuple[type[Exception], ...]:
    # only modules already imported: one not imported raised nothing, and importing it now would be slow
    return tuple(getattr(sys.modules[module], name) for module, name in INPUT_ERRORS if module in sys.modules)


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "correctness":
            from harness.runner import run_correctness

            summary = run_correctness(args.out, args.examples, args.device, ["-k", args.keyword] if args.keyword else None,
                                      implementations=args.impl, checkpoints=args.checkpoints)
            print(f"tpgate correctness: {summary['verdict']} — {summary['n_tests']} tests, {summary['n_failed']} failed, "
                  f"{summary['n_examples']} examples; report: {summary['index']}")
            if summary["peers"]:  # shown beside the candidate, never its verdict
                print("  peers (not counted): " + ", ".join(f"{impl} {verdict}" for impl, verdict in summary["peers"].items()))
            return 0 if summary["verdict"] == "PASS" else 1
        if args.command == "scaling":
            return _scaling(args)
        if args.command == "gate":
            return _gate(args)
        if args.command == "loader-memory":
            return _loader_memory(args)
        if args.command == "verify":
            return _verify(args)
        if args.command == "dispatch":
            from harness.bench import dispatch_overhead

            r = dispatch_overhead(args.world_size, args.calls, args.device)
            print(f"dispatch overhead, no-op call, {r['world_size']} {r['device']} ranks, {r['calls']} calls: "
                  f"p50 {r['p50_us']:.0f} us, p90 {r['p90_us']:.0f} us, p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us")
            for part, label in (("request_us", "call -> last rank in fn"), ("reply_us", "last rank in fn -> return")):
                print(f"  {label}: " + ", ".join(f"{q} {v:.0f} us" for q, v in r[part].items()))
            return 0
        if args.command == "env":
            import json

            from harness.environment import collect_environment

            import torch

            from harness.runtime.orchestrator import choose_backend

            gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
            device = "cuda" if gpus else "cpu"
            print(json.dumps(collect_environment(choose_backend(device, max(gpus, 1), gpus), device), indent=2))
            return 0
    except KeyboardInterrupt:  # ranks are already torn down and reports untouched (atomic writes)
        print("tpgate: interrupted", file=sys.stderr)
        return 130
    except _input_errors() as e:  # bad input, named by the error: exit 2, never a traceback read as a failed gate (1)
        print(f"tpgate {args.command}: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
