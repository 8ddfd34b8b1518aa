"""Scaling sweeps: sweep definition -> points -> world -> results table.

A point is (implementation, preset, phase, world size). Each measured point runs on a world
of that many ranks twice: with the real communicator (T_tp) and with the NullCommunicator
(T_null: the same shards, no data moved), so exposed communication = (T_tp - T_null) / T_tp.
Where the machine has fewer devices than a world size needs (GPU runs), the point is
*projected*: one rank's shard runs alone on one device with the NullCommunicator and the
collectives it would issue (counted per step) are priced by a cost model. Projected points
are labelled as such everywhere and never count towards a GO.

Timing: CUDA events on GPU, a monotonic clock on CPU; warm-up, then `repeats` timed runs,
median and p90 per rank; the slowest rank's median is the point's latency.
"""
from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass, field, replace

import torch

from impl.architecture import ModelConfig, TPConfigError, parse_dtype, require
from impl.communication import CountingCommunicator, NullCommunicator
from impl.model import random_model

# Named model shapes (random weights). tiny: CPU; llama3-8b and llama2-13b: GPU shapes (13b fits one H100 in bf16).
PRESETS = {
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, max_seq_len=1024),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                             rope_theta=500000.0, max_seq_len=8192),
    "llama2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, max_seq_len=4096),
}
IMPLEMENTATIONS = ("reference",)  # the dtensor peer joins once it has a random-weight builder
PHASES = ("prefill", "decode")

# Cost-model defaults when no collective benchmark of this machine exists (projection only).
# NVLink 4 (H100 SXM) ring all-reduce: ~450 GB/s bus bandwidth at large messages in NVIDIA's
# published nccl-tests results for 8-GPU DGX H100; small-message latency ~10-20 us per
# all-reduce (NCCL tuning docs / nccl-tests at 8 B). 4-GPU subsets of an NVSwitch host keep
# the per-GPU NVLink bandwidth. These are assumptions, stated in every projected row.
DEFAULT_COST_MODEL = {"all_reduce": {"latency_us": 15.0, "busbw_GBps": 360.0}, "all_gather": {"latency_us": 12.0, "busbw_GBps": 360.0},
                      "reduce_scatter": {"latency_us": 12.0, "busbw_GBps": 360.0}, "source": "defaults (published NVLink/NCCL figures), not measured"}
BUSBW_FACTOR = {"all_reduce": lambda n: 2 * (n - 1) / n, "all_gather": lambda n: (n - 1) / n, "reduce_scatter": lambda n: (n - 1) / n, "broadcast": lambda n: 1.0}


@dataclass(frozen=True)
class Phase:
    kind: str  # prefill | decode
    batch: int
    prompt: int
    steps: int = 0  # decode steps timed after the prompt

    def tokens(self) -> int:
        return self.batch * (self.prompt if self.kind == "prefill" else self.steps)


@dataclass
class SweepConfig:
    world_sizes: tuple[int, ...] = (1, 2, 4)
    presets: tuple[str, ...] = ("tiny",)
    phases: tuple[Phase, ...] = (Phase("prefill", 2, 64), Phase("decode", 1, 16, 16))
    dtype: str = "float32"
    implementations: tuple[str, ...] = ("reference",)
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    project: bool = False  # allow world sizes beyond the devices present (projected)
    gate_workload: dict = field(default_factory=lambda: {"preset": "llama3-8b", "phase": "prefill"})

    def validate(self) -> "SweepConfig":
        for p in self.presets:
            require(p in PRESETS, "presets", p, f"must be one of {sorted(PRESETS)}")
        for i in self.implementations:
            require(i in IMPLEMENTATIONS, "implementations", i, f"must be one of {IMPLEMENTATIONS}")
        for ws in self.world_sizes:
            require(isinstance(ws, int) and ws >= 1, "world_sizes", ws, "must be integers >= 1")
        for ph in self.phases:
            require(ph.kind in PHASES, "phases.kind", ph.kind, f"must be one of {PHASES}")
            require(ph.batch >= 1 and ph.prompt >= 1, "phases", asdict(ph), "batch and prompt must be >= 1")
            require(ph.kind == "prefill" or ph.steps >= 1, "phases.steps", ph.steps, "decode needs steps >= 1")
        parse_dtype(self.dtype)
        require(self.device in ("cpu", "cuda"), "device", self.device, "must be cpu or cuda")
        require(self.warmup >= 0 and self.repeats >= 1, "repeats", self.repeats, "warmup >= 0 and repeats >= 1")
        for preset in self.presets:
            for ws in self.world_sizes:
                try:
                    PRESETS[preset].check_tp(ws)
                except TPConfigError as e:
                    raise TPConfigError("world_sizes", ws, f"preset {preset} cannot be sharded {ws} ways ({e})") from None
        return self


def load_config(table: dict, overrides: dict | None = None) -> SweepConfig:
    """SweepConfig from a [tool.tpgate.scaling] table (keys as SweepConfig's fields)."""
    data = {**table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    require(not unknown, "[tool.tpgate.scaling]", unknown, f"unknown keys; allowed: {sorted(known)}")
    if "phases" in data:
        try:
            data["phases"] = tuple(Phase(**p) if isinstance(p, dict) else p for p in data["phases"])
        except TypeError as e:
            raise TPConfigError("phases", data["phases"], f"each phase is {{kind, batch, prompt, steps}} ({e})") from None
    for key in ("world_sizes", "presets", "implementations"):
        if key in data:
            data[key] = tuple(data[key])
    return replace(SweepConfig(), **data).validate()


# --------------------------------------------------------------------------- rank side


def _clock(device):
    if device.type == "cuda":
        def timed(fn):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(fn):
            t = time.perf_counter()
            fn()
            return time.perf_counter() - t
    return timed


def _peak_memory(device) -> int:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device)
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_on_rank(ctx, preset: str, phase: Phase, dtype: str, warmup: int, repeats: int, null: bool, projected_world: int | None = None) -> dict:
    """Time one phase on this rank. `null`: NullCommunicator (T_null). `projected_world`: this
    single rank plays rank 0 of a world of that size (projection)."""
    config = PRESETS[preset]
    world = projected_world or ctx.world_size
    base = NullCommunicator(world, 0 if projected_world else ctx.rank) if (null or projected_world) else ctx.comm
    comm = CountingCommunicator(base)
    model = random_model(config, comm, parse_dtype(dtype), ctx.device).eval()
    ids = torch.randint(0, config.vocab_size, (phase.batch, phase.prompt), device=ctx.device)
    timed = _clock(ctx.device)
    if ctx.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(ctx.device)

    @torch.no_grad()
    def prefill():
        model(ids, last_only=True)

    @torch.no_grad()
    def decode():
        token = ids[:, -1:]
        for step in range(phase.steps):
            token = model(token, phase.prompt + step, use_cache=True)[:, -1].argmax(-1, keepdim=True)

    if phase.kind == "decode":
        model.allocate_kv_cache(phase.batch, phase.prompt + phase.steps)
        with torch.no_grad():
            model(ids, 0, use_cache=True, last_only=True)
    run = prefill if phase.kind == "prefill" else decode
    for _ in range(warmup):
        run()
    times = []
    for _ in range(repeats):
        if not (null or projected_world):
            ctx.comm.barrier()  # ranks start each repeat together
        comm.reset()
        times.append(timed(run))
    collectives = [asdict(r) for r in comm.records]  # one repeat's worth
    per_step = phase.steps if phase.kind == "decode" else 1
    return {"rank": ctx.rank, "median_s": statistics.median(times), "p90_s": sorted(times)[min(len(times) - 1, int(0.9 * len(times)))],
            "times": times, "peak_memory": _peak_memory(ctx.device), "collectives": collectives, "steps": per_step}


# --------------------------------------------------------------------------- projection


def collective_time_s(records: list[dict], world: int, cost_model: dict) -> float:
    """Seconds the collectives in `records` would take: latency + size * factor / busbw."""
    total = 0.0
    for r in records:
        params = cost_model.get(r["kind"])
        if params is None or world == 1:
            continue
        # nccl-tests sizes: all-reduce the tensor, all-gather the output, reduce-scatter the input
        size = r["nbytes"] * (world if r["kind"] == "all_gather" else 1)
        total += params["latency_us"] * 1e-6 + size * BUSBW_FACTOR[r["kind"]](world) / (params["busbw_GBps"] * 1e9)
    return total


# --------------------------------------------------------------------------- driver


def _points(cfg: SweepConfig):
    for impl in cfg.implementations:
        for preset in cfg.presets:
            for phase in cfg.phases:
                for ws in cfg.world_sizes:
                    yield impl, preset, phase, ws


def run_sweep(cfg: SweepConfig, world_for, cost_model: dict | None = None, progress=None) -> "pd.DataFrame":
    """Measure (or project) every point; a failed point is a row with status 'failed' and its error."""
    import pandas as pd

    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    cost_model = cost_model or DEFAULT_COST_MODEL
    rows = []
    points = list(_points(cfg))
    for n, (impl, preset, phase, ws) in enumerate(points, 1):
        projected = cfg.device == "cuda" and ws > gpus
        row = {"implementation": impl, "preset": preset, "phase": phase.kind, "batch": phase.batch, "prompt": phase.prompt, "steps": phase.steps,
               "world_size": ws, "device": cfg.device, "dtype": cfg.dtype, "projected": projected, "status": "ok", "error": ""}
        if progress:
            progress(n, len(points), f"{impl} {preset} {phase.kind} ws={ws}{' (projected)' if projected else ''}")
        try:
            if projected and not cfg.project:
                raise TPConfigError("world_sizes", ws, f"needs {ws} GPUs, {gpus} present; pass --project to project it")
            args = (preset, phase, cfg.dtype, cfg.warmup, cfg.repeats)
            if projected:
                null = world_for(1).run(measure_on_rank, *args, True, ws)[0]
                tp_s = null["median_s"] + collective_time_s(null["collectives"], ws, cost_model)
                row.update(_summarise([null], [null], tp_s, phase, ws, dispatch=None))
                row["cost_model"] = cost_model.get("source", "measured")
            else:
                world = world_for(ws)
                real = world.run(measure_on_rank, *args, False)
                record = world.dispatch[-1]
                null = world.run(measure_on_rank, *args, True)
                row.update(_summarise(real, null, None, phase, ws, dispatch=record))
                row["backend"] = getattr(world, "backend", "")
        except Exception as e:  # noqa: BLE001 - a failed point is data, the sweep goes on
            row.update(status="failed", error=f"{type(e).__name__}: {e}"[:2000])
        rows.append(row)
    frame = pd.DataFrame(rows)
    return add_speedups(frame)


def _summarise(real: list[dict], null: list[dict], projected_s: float | None, phase: Phase, ws: int, dispatch) -> dict:
    slowest = max(real, key=lambda r: r["median_s"])
    per = phase.steps if phase.kind == "decode" else 1
    tp_s = projected_s if projected_s is not None else slowest["median_s"]
    null_s = max(r["median_s"] for r in null)
    out = {
        "latency_s": tp_s / per, "latency_p90_s": (slowest["p90_s"] if projected_s is None else tp_s) / per, "null_latency_s": null_s / per,
        "exposed_comm": max(0.0, (tp_s - null_s) / tp_s) if tp_s > 0 else float("nan"),
        "tokens_per_s": phase.tokens() / tp_s if tp_s > 0 else float("nan"),
        "peak_memory_bytes": max(r["peak_memory"] for r in real),
        "collectives_per_step": len(slowest["collectives"]) / per,
        "comm_bytes_per_step": sum(c["nbytes"] for c in slowest["collectives"]) / per,
        "rank_latency_s": [round(r["median_s"] / per, 9) for r in real],
    }
    if dispatch is not None:
        work = dispatch.worker_s
        out["dispatch_us_per_call"] = dispatch.overhead_s * 1e6
        out["dispatch_fraction"] = dispatch.overhead_s / dispatch.driver_s if dispatch.driver_s > 0 else float("nan")
        out["dispatch_us_per_step"] = dispatch.overhead_s * 1e6 / (per * max(1, len(real[0]["times"])))
        del work
    return out


def add_speedups(frame):
    """speedup = latency(world size 1) / latency(n) for the same implementation, preset and phase; efficiency = speedup / n."""
    if frame.empty or "latency_s" not in frame:
        return frame
    keys = ["implementation", "preset", "phase", "batch", "prompt", "steps"]
    ok = frame[frame["status"] == "ok"]
    base = ok[ok["world_size"] == 1].set_index(keys)["latency_s"]
    frame["speedup"] = [base.get(tuple(r[k] for k in keys), float("nan")) / r["latency_s"] if r["status"] == "ok" else float("nan")
                        for _, r in frame.iterrows()]
    frame["efficiency"] = frame["speedup"] / frame["world_size"]
    return frame
