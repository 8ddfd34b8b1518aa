"""Micro-benchmarks of the harness itself (figures for notes and reports, never asserted)."""
from __future__ import annotations

import time

from harness.runtime.orchestrator import MultiGPUOrchestrator

from .timing import percentile


def _entered(ctx) -> float:
    return time.perf_counter()  # CLOCK_MONOTONIC on Linux: one clock for every process of the host


def _percentiles(values: list[float]) -> dict:
    return {"p50": percentile(values, 0.50), "p90": percentile(values, 0.90), "p99": percentile(values, 0.99), "max": max(values)}


def dispatch_overhead(world_size: int = 4, calls: int = 500, device: str = "cpu", warmup: int = 20) -> dict:
    """Dispatch cost of a call that does nothing, in microseconds, over `calls` calls.

    overhead     DispatchRecord.overhead_s: driver-observed time minus the slowest rank's own time
                 (p50_us, p90_us, p99_us, max_us)
    request_us   run() called -> the last rank inside fn: pickling, the channel, waking the
                 ranks, unpickling (percentiles as a dict)
    reply_us     the last rank inside fn -> run() returned: pickling the results, the pipes,
                 waking the driver, unpickling, bookkeeping
    The split is measured from outside run() (fn returns when it was entered), so it adds the
    caller's own two clock reads to each half; the overhead figure is the orchestrator's own.
    """
    with MultiGPUOrchestrator(world_size, device=device) as world:
        for _ in range(warmup):
            world.run(_entered)
        first = len(world.dispatch)
        request, reply = [], []
        for _ in range(calls):
            called = time.perf_counter()
            entered = max(world.run(_entered))
            returned = time.perf_counter()
            request.append((entered - called) * 1e6)
            reply.append((returned - entered) * 1e6)
        overhead = _percentiles([r.overhead_s * 1e6 for r in world.dispatch[first:]])
    return {"world_size": world_size, "device": device, "calls": calls, **{f"{k}_us": v for k, v in overhead.items()},
            "request_us": _percentiles(request), "reply_us": _percentiles(reply)}


# --------------------------------------------------------------------------- loader memory


def write_synthetic_checkpoint(directory, layers: int = 12, hidden: int = 2048, intermediate: int = 5632, heads: int = 16, kv_heads: int = 8,
                               vocab: int = 32000) -> int:
    """A Llama-shaped float32 checkpoint, one safetensors file per layer plus an index. Returns its bytes."""
    import json
    from pathlib import Path

    import torch
    from safetensors.torch import save_file

    from impl.architecture import ModelConfig
    from impl.model import block_shapes

    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    config = ModelConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate, num_layers=layers, num_heads=heads, num_kv_heads=kv_heads)
    hf = {"model_type": "llama", "vocab_size": vocab, "hidden_size": hidden, "intermediate_size": intermediate, "num_hidden_layers": layers,
          "num_attention_heads": heads, "num_key_value_heads": kv_heads, "max_position_embeddings": 2048, "rms_norm_eps": 1e-5}
    (d / "config.json").write_text(json.dumps(hf))
    g = torch.Generator().manual_seed(0)
    weight_map, total = {}, 0
    files = {"model-embed.safetensors": {"model.embed_tokens.weight": (vocab, hidden), "lm_head.weight": (vocab, hidden), "model.norm.weight": (hidden,)}}
    for i in range(layers):
        files[f"model-layer{i:03d}.safetensors"] = {f"model.layers.{i}.{n}": s for n, s in block_shapes(config).items()}
    for file, shapes in files.items():
        tensors = {n: torch.randn(s, generator=g) * 0.02 for n, s in shapes.items()}
        save_file(tensors, d / file)
        total += sum(t.numel() * 4 for t in tensors.values())
        weight_map.update({n: file for n in tensors})
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}))
    return total


class _MemorySampler:
    """Peak anonymous and file-backed resident memory of this process, sampled every 2 ms.

    Anonymous memory is what loading allocates; file-backed pages are the kernel's page cache
    of the mmapped safetensors files (shared, reclaimable), reported separately."""

    def __init__(self):
        import threading

        self.peak_anon = self.peak_file = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    @staticmethod
    def read() -> tuple[int, int]:
        values = {}
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(("RssAnon:", "RssFile:")):
                    key, kib = line.split()[:2]
                    values[key] = int(kib) * 1024
        return values["RssAnon:"], values["RssFile:"]

    def _run(self):
        while not self._stop.wait(0.002):
            anon, file = self.read()
            self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)

    def __enter__(self):
        self.baseline_anon, _ = self.read()
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        anon, file = self.read()
        self.peak_anon, self.peak_file = max(self.peak_anon, anon), max(self.peak_file, file)


def _load_and_measure(ctx, directory: str, naive: bool) -> dict:
    import gc

    import torch

    from impl.model import LlamaModel
    from impl.model_loader import DistributedCheckpointLoader, HFCheckpoint, read_config

    gc.collect()
    with _MemorySampler() as mem:
        if naive:  # whole tensors on every rank (copied out of the mmap), then slice
            source = HFCheckpoint(directory)
            full = {n: source[n][:].clone() for n in source}
            model = LlamaModel.from_tensors(full, read_config(directory), ctx.comm)
            del full
        else:
            model = DistributedCheckpointLoader(directory, ctx.comm).load(torch.float32)
    shard = sum(p.numel() * p.element_size() for p in model.parameters())
    return {"rank": ctx.rank, "load_anon": mem.peak_anon - mem.baseline_anon, "peak_file": mem.peak_file, "shard": shard}


def check_loader_memory(directory: str, tp: int):
    """Everything `loader_memory` needs, checked before it starts any rank: a checkpoint
    directory with weights and a readable config.json (else CheckpointError naming the
    directory or file), and a model that can be sharded `tp` ways (else TPConfigError naming
    --tp). Returns the checkpoint, opened lazily (no tensor is read)."""
    from impl.architecture import TPConfigError, require
    from impl.model_loader import HFCheckpoint, read_config

    require(isinstance(tp, int) and not isinstance(tp, bool) and tp >= 1, "--tp", tp, "must be an integer >= 1")
    source = HFCheckpoint(directory)  # first: a missing directory is named as such, not as a missing config.json
    try:
        read_config(directory).check_tp(tp)
    except TPConfigError as e:
        raise TPConfigError("--tp", tp, f"the checkpoint in {directory} cannot be sharded {tp} ways ({e})") from None
    return source


def loader_memory(directory: str, tp: int = 4) -> list[dict]:
    """Peak resident memory per rank while loading, sharded vs naive (fresh processes each).
    Bad input is refused by check_loader_memory before any rank starts."""
    source = check_loader_memory(directory, tp)
    largest = max(math_prod(source[n].get_shape()) * 4 for n in source)
    rows = []
    for naive in (False, True):
        with MultiGPUOrchestrator(tp, timeout_s=900) as world:
            for r in world.run(_load_and_measure, directory, naive):
                rows.append({**r, "mode": "naive (whole tensors)" if naive else "sharded (lazy slices)", "largest_tensor": largest})
    return rows


def math_prod(shape) -> int:
    out = 1
    for s in shape:
        out *= s
    return out
