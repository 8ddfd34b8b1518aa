"""The `tpgate` command."""
from __future__ import annotations

import argparse
import sys

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
    c.add_argument("--out", default="reports/correctness", help="report directory (default: %(default)s)")
    c.add_argument("-k", dest="keyword", default=None, help="only tests matching this pytest -k expression")
    d = sub.add_parser("dispatch", help="measure the orchestrator's dispatch overhead for a no-op call (p50/p90/p99)")
    d.add_argument("--world-size", type=_positive_int, default=4)
    d.add_argument("--calls", type=_positive_int, default=500)
    d.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    sub.add_parser("env", help="print the environment the reports record")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "correctness":
            from harness.runner import run_correctness

            summary = run_correctness(args.out, args.examples, args.device, ["-k", args.keyword] if args.keyword else None)
            print(f"tpgate correctness: {summary['verdict']} — {summary['n_tests']} tests, {summary['n_failed']} failed, "
                  f"{summary['n_examples']} examples; report: {summary['index']}")
            return 0 if summary["verdict"] == "PASS" else 1
        if args.command == "dispatch":
            from harness.bench import dispatch_overhead

            r = dispatch_overhead(args.world_size, args.calls, args.device)
            print(f"dispatch overhead, no-op call, {r['world_size']} {r['device']} ranks, {r['calls']} calls: "
                  f"p50 {r['p50_us']:.0f} us, p90 {r['p90_us']:.0f} us, p99 {r['p99_us']:.0f} us, max {r['max_us']:.0f} us")
            return 0
        if args.command == "env":
            import json

            from harness.environment import collect_environment

            print(json.dumps(collect_environment("gloo", "cpu"), indent=2))
            return 0
    except TPConfigError as e:
        print(f"tpgate: error: {e}", file=sys.stderr)
        return 2
    return 2


if __name__ == "__main__":
    sys.exit(main())
