"""How fast the reference model runs on one GPU, against that GPU's own measured ceilings.

    python3 -m harness.fastpath --preset llama3-8b --out DIR      (one CUDA device)

Measures, in one process: the device-to-device copy ceiling (bytes read + written per second)
and the bf16 matmul ceiling (8192^3); decode at batch 1 (5-token prompt, 200 steps, the
issue's anchor settings) for three variants of the same StaticDecoder — eager kernels, the
eager step captured as a CUDA graph, and the inductor-compiled step captured as a CUDA graph
— each timed twice to show the spread; the best variant at batch 16; prefill 8 x 2048 eager
and compiled; and a kernel profile of a few replays of the fastest decode step. Variants
beyond the default three (--variants): compiled-cublas (GEMV left to cuBLAS) and autotuned. Writes
fastpath.json (every figure and the environment) and prints a summary table last.

Bytes per decode step are the bytes the step must read: every parameter except the
embedding table (one row per sequence is read), plus the whole static KV cache (the masked
attention reads all of it). Step time is measured with CUDA events around the replays only,
after warm-up (compile and capture times are reported separately).
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from impl.communication import NullCommunicator
from impl.decoding import StaticDecoder
from impl.model import random_model

from .atomic import write_text_atomic
from .environment import collect_environment
from .sweep import PRESETS


def _event_time_s(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return times


def copy_ceiling(nbytes: int = 2 << 30, repeats: int = 20) -> dict:
    src = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    dst.copy_(src)
    t = statistics.median(_event_time_s(lambda: dst.copy_(src), repeats))
    return {"bytes": nbytes, "seconds": t, "bytes_per_s": 2 * nbytes / t}  # read + write


def matmul_ceiling(n: int = 8192, repeats: int = 20) -> dict:
    a = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(n, n, dtype=torch.bfloat16, device="cuda")
    for _ in range(3):
        a @ b
    t = statistics.median(_event_time_s(lambda: a @ b, repeats))
    return {"n": n, "seconds": t, "flops_per_s": 2 * n**3 / t}


def decode_bytes_per_step(model, batch: int) -> int:
    embed = model.embed.weight
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    # an untied table is read one row per sequence; a tied one is read whole by the LM head
    unread = 0 if model.config.tie_word_embeddings else (embed.shape[0] - batch) * embed.shape[1] * embed.element_size()
    cache = sum(layer.attention.k_cache.numel() * layer.attention.k_cache.element_size() * 2 for layer in model.layers)
    return params - unread + cache


def time_decode(decoder: StaticDecoder, ids: torch.Tensor, steps: int) -> tuple[float, torch.Tensor]:
    """(seconds per decode step, from the second step to the last; the generated tokens)."""
    events = [torch.cuda.Event(enable_timing=True) for _ in range(2)]

    def mark(step):
        if step == 0:
            events[0].record()
        elif step == steps - 1:
            events[1].record()

    tokens = decoder.generate(ids, steps, on_step=mark)
    events[1].synchronize()
    return events[0].elapsed_time(events[1]) / 1e3 / (steps - 1), tokens


# name -> (StaticDecoder arguments, torch._inductor.config overrides while compiling).
# coordinate_descent_tuning also makes inductor lower (1 x k) @ (k x n) products to fused
# reduction kernels instead of cuBLAS GEMV calls; "compiled-cublas" turns that off to compare.
CDT = {"coordinate_descent_tuning": True}
VARIANTS = {
    "eager": (dict(compile=None, cuda_graph=False), {}),
    "cuda-graph": (dict(compile=None, cuda_graph=True), {}),
    "compiled+cuda-graph": (dict(compile="inductor", cuda_graph=True), CDT),  # attention: the fused Triton kernel (impl/kernels.py)
    "compiled-torch-attention+cuda-graph": (dict(compile="inductor", cuda_graph=True, attention_kernel="torch"), CDT),
    "compiled-cublas+cuda-graph": (dict(compile="inductor", cuda_graph=True), {"coordinate_descent_tuning": False}),
    "autotuned+cuda-graph": (dict(compile="inductor", compile_mode="max-autotune-no-cudagraphs", cuda_graph=True), CDT),
    # horizontal fusion of independent small kernels (rotary, cache writes), and fusion past inductor's
    # memory-saving threshold: candidates for the ~0.5 ms of small kernels per step
    "combo+cuda-graph": (dict(compile="inductor", cuda_graph=True), {**CDT, "combo_kernels": True}),
    "aggressive+cuda-graph": (dict(compile="inductor", cuda_graph=True), {**CDT, "aggressive_fusion": True}),
}
DEFAULT_VARIANTS = ("eager", "cuda-graph", "compiled+cuda-graph")


def bench_decode(model, batch: int, prompt: int, steps: int, variants: list[str], repeats: int = 2, profile: dict | None = None) -> list[dict]:
    """One row per variant; with `profile` (a dict), the fastest variant's step is profiled into it."""
    max_seq = -(-(prompt + steps) // 16) * 16
    ids = torch.randint(0, model.config.vocab_size, (batch, prompt), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    rows, reference_tokens = [], None
    for name in variants:
        kwargs, inductor_config = VARIANTS[name]
        torch._dynamo.reset()  # inductor settings are not part of dynamo's guards: compile afresh
        decoder = StaticDecoder(model, batch, max_seq, output="tokens", **kwargs)  # greedy: selected on the vocabulary shards
        started = time.perf_counter()
        with torch._inductor.config.patch(inductor_config):
            decoder.warm_up()
        setup = time.perf_counter() - started
        timed = [time_decode(decoder, ids, steps) for _ in range(repeats)]
        step_s, tokens = [t for t, _ in timed], timed[-1][1]
        reference_tokens = tokens if reference_tokens is None else reference_tokens
        nbytes = decode_bytes_per_step(model, batch)
        median = statistics.median(step_s)
        rows.append({"variant": name, "batch": batch, "prompt": prompt, "steps": steps, "max_seq_len": max_seq, "step_s": step_s, "step_s_median": median,
                     "tokens_per_s_per_sequence": 1 / median, "tokens_per_s": batch / median, "bytes_per_step": nbytes, "bytes_per_s": nbytes / median,
                     "setup_s": setup, **decoder.setup_s, "token_agreement_with_eager": float((tokens == reference_tokens).float().mean())})
        if profile is not None and median <= min(r["step_s_median"] for r in rows):
            profile.clear()
            profile.update(profile_step(decoder, prompt), variant=name)
        del decoder
        torch.cuda.synchronize()
    return rows


def prefill_flops(config, batch: int, seq: int) -> float:
    """Matmul FLOPs of a last-only prefill: 2 per weight per token (LM head: last token only)
    plus causal attention's QK^T and PV (half of the full s^2 products)."""
    h, d, i = config.hidden_size, config.head_dim, config.intermediate_size
    per_layer_weights = h * (config.num_heads + 2 * config.num_kv_heads) * d + config.num_heads * d * h + 3 * h * i
    tokens = batch * seq
    attention = 2 * 2 * batch * seq * seq * config.num_heads * d / 2
    return config.num_layers * (2 * tokens * per_layer_weights + attention) + 2 * batch * h * config.vocab_size


def bench_prefill(model, batch: int, seq: int, repeats: int = 5) -> list[dict]:
    ids = torch.randint(0, model.config.vocab_size, (batch, seq), device="cuda")
    flops = prefill_flops(model.config, batch, seq)
    rows = []
    for name, fn in (("eager", model), ("compiled", torch.compile(model, fullgraph=True, dynamic=False))):
        started = time.perf_counter()
        with torch.no_grad():
            for _ in range(2):
                fn(ids, last_only=True)
        torch.cuda.synchronize()
        setup = time.perf_counter() - started
        with torch.no_grad():
            times = _event_time_s(lambda: fn(ids, last_only=True), repeats)
        median = statistics.median(times)
        rows.append({"variant": name, "batch": batch, "seq": seq, "seconds": times, "seconds_median": median, "flops": flops, "flops_per_s": flops / median, "setup_s": setup})
    return rows


def profile_step(decoder: StaticDecoder, position: int, replays: int = 20) -> dict:
    """Kernel time per step by kernel name (CUPTI through torch.profiler), over replays of the step."""
    from torch.profiler import ProfilerActivity, profile

    decoder.position.fill_(position)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(replays):
            decoder._run_step()
        torch.cuda.synchronize()
    kernels = []
    for entry in prof.key_averages():
        # kernels only (no CPU side was recorded); the µs field was renamed across torch versions
        total_us = getattr(entry, "device_time_total", None) or getattr(entry, "cuda_time_total", 0)
        if total_us:
            kernels.append({"kernel": entry.key[:120], "s_per_step": total_us / 1e6 / replays, "launches_per_step": entry.count / replays})
    kernels.sort(key=lambda r: -r["s_per_step"])
    # the last replay's kernels in launch order, with the idle gap before each: where a layer's time goes
    timeline = sorted((e.time_range.start, e.time_range.end, e.name) for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)
    per_step = round(sum(r["launches_per_step"] for r in kernels))
    last = timeline[-per_step:] if per_step else []
    sequence = [{"kernel": name[:100], "us": end - start, "gap_us": start - (last[i - 1][1] if i else start)} for i, (start, end, name) in enumerate(last)]
    return {"replays": replays, "kernel_s_per_step": sum(r["s_per_step"] for r in kernels), "launches_per_step": sum(r["launches_per_step"] for r in kernels), "top": kernels[:25],
            "step_sequence": sequence}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m harness.fastpath", description=__doc__.split("\n\n")[0])
    parser.add_argument("--preset", default="llama3-8b", choices=sorted(PRESETS))
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--prompt", type=int, default=5)
    parser.add_argument("--variants", default=",".join(DEFAULT_VARIANTS), help=f"comma-separated subset of {list(VARIANTS)}")
    parser.add_argument("--skip", default="", help="comma-separated parts to skip: batch16, prefill, profile")
    parser.add_argument("--shard-of", type=int, default=1, metavar="TP",
                        help="time rank 0's shard of a TP-way model alone (NullCommunicator: real kernels, no collectives)")
    args = parser.parse_args(argv)
    variants = [v for v in args.variants.split(",") if v]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {unknown}; allowed: {list(VARIANTS)}")
    if not torch.cuda.is_available():
        parser.error("needs a CUDA device (the figures are GPU figures)")
    skip = set(args.skip.split(","))
    result = {"environment": collect_environment("none", "cuda"), "preset": args.preset, "copy_ceiling": copy_ceiling(), "matmul_ceiling": matmul_ceiling()}
    args.out.mkdir(parents=True, exist_ok=True)

    def save():
        write_text_atomic(args.out / "fastpath.json", json.dumps(result, indent=1, default=str))

    save()
    if args.shard_of < 1:
        parser.error(f"--shard-of {args.shard_of}: must be >= 1")
    result["shard_of"] = args.shard_of
    model = random_model(PRESETS[args.preset], NullCommunicator(args.shard_of, 0), torch.bfloat16, "cuda").eval()
    profile = None if "profile" in skip else {}
    result["decode"] = bench_decode(model, 1, args.prompt, args.steps, variants, profile=profile)
    result["profile"] = profile
    save()
    if "batch16" not in skip:
        fastest = min(result["decode"], key=lambda r: r["step_s_median"])["variant"]
        result["decode"] += bench_decode(model, 16, args.prompt, args.steps, [fastest])
        save()
    if "prefill" not in skip:
        for layer in model.layers:  # prefill does not need the decode cache; free it
            layer.attention.k_cache = layer.attention.v_cache = None
        torch.cuda.empty_cache()
        result["prefill"] = bench_prefill(model, 8, 2048)
        save()
    print(summary(result))
    return 0


def summary(result: dict) -> str:
    copy_bw, mm = result["copy_ceiling"]["bytes_per_s"], result["matmul_ceiling"]["flops_per_s"]
    lines = [f"{result['environment'].get('gpu_name')}  copy ceiling {copy_bw / 1e12:.2f} TB/s  bf16 matmul ceiling {mm / 1e12:.0f} TFLOP/s"]
    for r in result.get("decode", []):
        spread = max(r["step_s"]) / min(r["step_s"]) - 1
        lines.append(f"decode b={r['batch']:<2} {r['variant']:<20} {r['tokens_per_s_per_sequence']:7.1f} tok/s/seq  {r['tokens_per_s']:8.1f} tok/s  "
                     f"{r['bytes_per_s'] / 1e12:.2f} TB/s = {r['bytes_per_s'] / copy_bw:5.1%} of copy ceiling  spread {spread:.1%}  "
                     f"setup {r['setup_s']:.0f}s  agree {r['token_agreement_with_eager']:.2f}")
    if result.get("profile"):
        p = result["profile"]
        lines.append(f"profile ({p['variant']}, b=1): {p['kernel_s_per_step'] * 1e3:.2f} ms of kernels per step in {p['launches_per_step']:.0f} launches")
        lines += [f"   {k['s_per_step'] * 1e6:8.1f} us x{k['launches_per_step']:<4.0f} {k['kernel'][:90]}" for k in p["top"][:8]]
    for r in result.get("prefill", []):
        lines.append(f"prefill {r['batch']}x{r['seq']} {r['variant']:<9} {r['seconds_median'] * 1e3:7.1f} ms  {r['flops_per_s'] / 1e12:5.0f} TFLOP/s = {r['flops_per_s'] / mm:5.1%} of matmul ceiling  setup {r['setup_s']:.0f}s")
    return "\n".join(lines)


if __name__ == "__main__":
    raise SystemExit(main())
