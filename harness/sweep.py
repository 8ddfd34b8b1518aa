"""Scaling sweeps: sweep definition -> points -> world -> results table.

A point is (implementation, preset, phase, world size). Built into the sweep: `reference`
(tpgate's impl/ layers) and `dtensor` (PyTorch's parallelize_module over a plain model,
impl/dtensor_peer.py); any other stack named through the implementation protocol (hf-tp, an
entry point, module:object) is measured from outside, as harness/protocol_sweep.py says.
Each measured point runs on a world of that many ranks twice: with real collectives (T_tp) and
without any (T_null: the same shard shapes, no data moved — the NullCommunicator for the
reference, a plain model of one rank's shard shapes for the peer), so exposed communication =
(T_tp - T_null) / T_tp. Where the machine has fewer devices than a world size needs (GPU runs),
the point is *projected*: one rank's shard runs alone on one device without collectives and the
collectives it would issue (counted per step; listed from the plan for the peer) are priced by a
cost model (harness.perf_model). `compare_projection` also projects the world sizes it measured, so the report can
state the projection's error. Projected points are labelled as such everywhere and never count
towards a GO.

Timing: harness.timing (CUDA events on GPU, a monotonic clock on CPU); warm-up, then `repeats`
timed runs, median and p90 (nearest rank) per rank; the slowest rank's median is the point's latency. Dispatch overhead
is one orchestrator call's overhead over one step's latency (see `_summarise`).
"""
from __future__ import annotations

import os
import statistics
from dataclasses import asdict, dataclass, replace

import torch

from impl.architecture import ModelConfig, TPConfigError, parse_dtype, require
from impl.communication import CountingCommunicator, NullCommunicator
from impl.low_latency import LowLatencyCommunicator
from impl.decoding import StaticDecoder
from impl.dtensor_peer import check_dtensor_tp, parallelize, peer_collectives, random_plain_model, shard_config, tp_mesh
from impl.model import random_model

from .perf_model import ALL_REDUCE_PRICINGS, DEFAULTS, CostModel, projection_columns
from .implementations import known, load_implementations
from .protocol_sweep import BUILT_IN, declared_collectives, measure_protocol_on_rank, refusal
from .timing import peak_memory_bytes, percentile, time_calls

# Named model shapes (random weights). tiny: CPU; llama3-8b and llama2-13b: GPU shapes (13b fits one H100 in bf16).
LLAMA = {"model_type": "llama", "sliding_window": None}  # what a protocol stack's check() reads of a checkpoint's config
PRESETS = {
    "tiny": ModelConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_layers=4, num_heads=8, num_kv_heads=4, max_seq_len=1024, extra=dict(LLAMA)),
    "llama3-8b": ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                             rope_theta=500000.0, max_seq_len=8192, extra=dict(LLAMA)),
    "llama2-13b": ModelConfig(vocab_size=32000, hidden_size=5120, intermediate_size=13824, num_layers=40, num_heads=40, num_kv_heads=40, max_seq_len=4096, extra=dict(LLAMA)),
}
PHASES = ("prefill", "decode")

@dataclass(frozen=True)
class Phase:
    kind: str  # prefill | decode
    batch: int
    prompt: int
    steps: int = 0  # decode steps timed after the prompt

    def tokens(self) -> int:
        return self.batch * (self.prompt if self.kind == "prefill" else self.steps)


# How the reference decodes (impl/decoding.py). compiled+cuda-graph is the fastest (harness/fastpath.py)
# but compiles each point's model for one to two minutes on an 8B shape; cuda-graph captures the
# eager step in a second. The peer always decodes eagerly (its cache grows by concatenation).
DECODE_PATHS = ("auto", "eager", "cuda-graph", "compiled+cuda-graph")


def resolve_decode_path(path: str, implementation: str, device: str) -> str:
    if implementation not in BUILT_IN:
        return "own"  # a protocol stack decodes its own way (greedy)
    if implementation != "reference":
        return "eager"
    return ("cuda-graph" if device == "cuda" else "eager") if path == "auto" else path


# How the reference prefills: "compiled" runs the prefill through torch.compile (one compile per
# point; ~1-3 min on an 8B shape), "eager" does not; auto: compiled on CUDA, eager on CPU (where a
# compile costs more than the tiny preset's whole sweep). The peer always prefills eagerly.
PREFILL_PATHS = ("auto", "eager", "compiled")


def resolve_prefill_path(path: str, implementation: str, device: str) -> str:
    if implementation not in BUILT_IN:
        return "own"
    if implementation != "reference":
        return "eager"
    return ("compiled" if device == "cuda" else "eager") if path == "auto" else path


@dataclass
class SweepConfig:
    """A sweep definition: every (implementation, preset, phase, world size) point to run.

    Sequences are tuples (a TOML array loads as a list; load_config converts); `validate()`
    checks types, values and this machine's GPUs and raises TPConfigError naming the field."""

    world_sizes: tuple[int, ...] = (1, 2, 4)
    presets: tuple[str, ...] = ("tiny",)
    phases: tuple[Phase, ...] = (Phase("prefill", 2, 64), Phase("decode", 1, 16, 16))
    dtype: str = "float32"
    implementations: tuple[str, ...] = ("reference",)
    device: str = "cpu"
    warmup: int = 2
    repeats: int = 5
    project: bool = False  # allow world sizes beyond the devices present (projected)
    compare_projection: bool = False  # also project the measured world sizes > 1 (projection-error table)
    decode_path: str = "auto"  # reference decode: see DECODE_PATHS (auto: cuda-graph on CUDA, eager on CPU)
    prefill_path: str = "auto"  # reference prefill: see PREFILL_PATHS (auto: compiled on CUDA, eager on CPU)
    sequence_parallel: bool = True  # reference prefill with sequence parallelism (norms, residuals on sequence shards)
    decode_all_reduce: str = "nccl"  # projected decode all-reduces priced as: see perf_model.ALL_REDUCE_PRICINGS (low-latency: impl/low_latency.py)
    # reference SP prefill: each collective pipelined with its matmul in this many token chunks (impl/overlap.py); 1: not chunked
    prefill_overlap_chunks: int = 1

    def validate(self) -> "SweepConfig":
        """Types first (so no check below meets a value it cannot compare), then values, then
        whether this machine has the GPUs the world sizes need. Returns self."""
        for key in ("world_sizes", "presets", "implementations", "phases"):
            value = getattr(self, key)
            require(isinstance(value, (tuple, list)), key, value, "must be an array")
            require(len(value) == len(set(map(repr, value))), key, list(value), "must not repeat a value (it would measure the same points twice)")
        for ws in self.world_sizes:
            require(_is_int(ws) and ws >= 1, "world_sizes", ws, "must be integers >= 1")
        for key in ("presets", "implementations"):
            for name in getattr(self, key):
                require(isinstance(name, str), key, name, "must be strings")
        for p in self.presets:
            require(p in PRESETS, "presets", p, f"must be one of {sorted(PRESETS)}")
        require(len(self.implementations) >= 1, "implementations", list(self.implementations), f"must name at least one of {sorted(known())}")
        load_implementations(self.implementations, "implementations")  # a name that resolves to nothing: TPConfigError naming what is known
        require(len(self.phases) >= 1, "phases", list(self.phases), "must hold at least one phase")
        for ph in self.phases:
            _check_phase(ph)
        for key in ("dtype", "device", "decode_path", "prefill_path", "decode_all_reduce"):
            require(isinstance(getattr(self, key), str), key, getattr(self, key), "must be a string")
        parse_dtype(self.dtype)
        require(self.device in ("cpu", "cuda"), "device", self.device, "must be cpu or cuda")
        require(_is_int(self.warmup) and self.warmup >= 0, "warmup", self.warmup, "must be an integer >= 0")
        require(_is_int(self.repeats) and self.repeats >= 1, "repeats", self.repeats, "must be an integer >= 1")
        require(_is_int(self.prefill_overlap_chunks) and self.prefill_overlap_chunks >= 1, "prefill_overlap_chunks", self.prefill_overlap_chunks, "must be an integer >= 1")
        for key in ("project", "compare_projection", "sequence_parallel"):
            require(isinstance(getattr(self, key), bool), key, getattr(self, key), "must be true or false")
        for preset in self.presets:
            for ws in self.world_sizes:
                try:
                    PRESETS[preset].check_tp(ws)
                except TPConfigError as e:
                    raise TPConfigError("world_sizes", ws, f"preset {preset} cannot be sharded {ws} ways ({e})") from None
                if "dtensor" in self.implementations:
                    try:
                        check_dtensor_tp(PRESETS[preset], ws)
                    except TPConfigError as e:
                        raise TPConfigError("world_sizes", ws, f"the dtensor implementation cannot shard preset {preset} {ws} ways ({e})") from None
        require(self.decode_path in DECODE_PATHS, "decode_path", self.decode_path, f"must be one of {DECODE_PATHS}")
        require(self.decode_path in ("auto", "eager") or self.device == "cuda", "decode_path", self.decode_path, "needs device = cuda (CUDA graphs)")
        require(self.prefill_path in PREFILL_PATHS, "prefill_path", self.prefill_path, f"must be one of {PREFILL_PATHS}")
        require(self.decode_all_reduce in ALL_REDUCE_PRICINGS, "decode_all_reduce", self.decode_all_reduce, f"must be one of {ALL_REDUCE_PRICINGS}")
        self._check_overlap_chunks()
        if self.device == "cuda":
            self._check_gpus(torch.cuda.device_count())
        return self

    def _check_overlap_chunks(self) -> None:
        """Every reference prefill that runs sequence-parallel (prompt a multiple of the world
        size > 1) must cut its seq/tp tokens into prefill_overlap_chunks equal chunks."""
        if not (self.sequence_parallel and "reference" in self.implementations):
            return
        c = self.prefill_overlap_chunks
        for ph in self.phases:
            for ws in self.world_sizes:
                if ph.kind == "prefill" and ws > 1 and ph.prompt % ws == 0:
                    require(ph.prompt // ws % c == 0, "prefill_overlap_chunks", c,
                            f"must divide prompt/world_size = {ph.prompt}/{ws} (the prefill phase's sequence shard at world size {ws})")

    def _check_gpus(self, gpus: int) -> None:
        """A CUDA sweep needs one GPU per rank of its largest world, unless the world sizes
        beyond the GPUs present are to be projected; refused here, before any world starts,
        rather than as failed rows after the smaller world sizes have run."""
        require(gpus >= 1, "device", self.device, "no CUDA device is visible")
        largest = max(self.world_sizes)
        require(self.project or largest <= gpus, "world_sizes", list(self.world_sizes),
                f"world size {largest} needs {largest} GPUs, {gpus} visible; pass --project (project = true) to project "
                "the world sizes beyond them, or drop those world sizes")


def _is_int(value) -> bool:
    """An integer that is not a bool (TOML's true would otherwise pass as 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_phase(ph) -> None:
    require(isinstance(ph, Phase), "phases", ph, "each phase is a table {kind, batch, prompt, steps}")
    require(isinstance(ph.kind, str) and ph.kind in PHASES, "phases.kind", ph.kind, f"must be one of {PHASES}")
    for key in ("batch", "prompt", "steps"):
        require(_is_int(getattr(ph, key)), f"phases.{key}", getattr(ph, key), "must be an integer")
    require(ph.batch >= 1 and ph.prompt >= 1, "phases", asdict(ph), "batch and prompt must be >= 1")
    require(ph.steps >= 0, "phases.steps", ph.steps, "must be >= 0")
    require(ph.kind == "prefill" or ph.steps >= 1, "phases.steps", ph.steps, "decode needs steps >= 1")


SEQUENCE_KEYS = ("world_sizes", "presets", "implementations", "phases")


def load_config(table: dict, overrides: dict | None = None) -> SweepConfig:
    """SweepConfig from a [tool.tpgate.scaling] table (keys as SweepConfig's fields), validated.

    `overrides` (command-line values; None = not given) replace the table's. Arrays must be
    arrays: a string such as "1,2" is refused, not split into characters."""
    require(isinstance(table, dict), "[tool.tpgate.scaling]", table, "must be a table")
    data = {**table, **{k: v for k, v in (overrides or {}).items() if v is not None}}
    known = set(SweepConfig.__dataclass_fields__)
    unknown = sorted(set(data) - known)
    require(not unknown, "[tool.tpgate.scaling]", unknown, f"unknown keys; allowed: {sorted(known)}")
    for key in SEQUENCE_KEYS:
        if key in data:
            require(isinstance(data[key], (list, tuple)), key, data[key], "must be an array, e.g. [1, 2, 4]" if key == "world_sizes"
                    else "must be an array of tables {kind, batch, prompt, steps}" if key == "phases" else "must be an array of names")
            data[key] = tuple(data[key])
    if "phases" in data:
        phases = []
        for p in data["phases"]:
            require(isinstance(p, (dict, Phase)), "phases", p, "each phase is a table {kind, batch, prompt, steps}")
            try:
                phases.append(Phase(**p) if isinstance(p, dict) else p)
            except TypeError as e:
                raise TPConfigError("phases", p, f"each phase is {{kind, batch, prompt, steps}} ({e})") from None
        data["phases"] = tuple(phases)
    return replace(SweepConfig(), **data).validate()


# --------------------------------------------------------------------------- rank side


@dataclass
class BuiltModel:
    """One rank's model for a sweep point and how to list the collectives of one timed run.

    `vocab`: token ids are drawn below it (a shard-shaped peer model holds vocab/tp rows).
    `records(phase)`: collectives since the last `reset()`, as dicts {"kind", "nbytes", ...}."""

    model: torch.nn.Module
    vocab: int
    reset: object
    records: object


MODES = ("tp", "null", "projected")


LOW_LATENCY_COMM = "sweep.low_latency_comm"  # RankContext.state key: one symmetric buffer per rank, built once


def tp_communicator(ctx, all_reduce: str):
    """The communicator a measured point's collectives run on: the rank's TP group as it is, or
    (all_reduce = "low-latency") impl.low_latency's, built once per rank (its construction is a
    collective over the group: every rank of a point builds it together) and kept."""
    if all_reduce != "low-latency":
        return ctx.comm
    if LOW_LATENCY_COMM not in ctx.state:
        ctx.state[LOW_LATENCY_COMM] = LowLatencyCommunicator(ctx.tp_group, device=ctx.device)
    return ctx.state[LOW_LATENCY_COMM]


def build_model(ctx, implementation: str, preset: str, dtype: str, mode: str, world: int, sequence_parallel: bool = False,
                overlap_chunks: int = 1, all_reduce: str = "nccl") -> BuiltModel:
    """This rank's model for one point. mode: "tp" (its part of the world's TP model, real
    collectives), "null" (the same shard shapes, no collectives: T_null), "projected" (rank 0's
    shard of a `world`-way model alone on this device, no collectives). `sequence_parallel`:
    the reference's prompts run with sequence parallelism (impl/model.py), each collective
    pipelined with its matmul in `overlap_chunks` token chunks (impl/overlap.py). `all_reduce`:
    a "tp" model's all-reduces on NCCL or on the low-latency communicator (tp_communicator)."""
    config, torch_dtype = PRESETS[preset], parse_dtype(dtype)
    if implementation == "reference":
        rank = ctx.comm.rank if mode == "null" else 0  # its rank inside the TP group, not in the world
        comm = CountingCommunicator(tp_communicator(ctx, all_reduce) if mode == "tp" else NullCommunicator(world, rank))
        model = random_model(config, comm, torch_dtype, ctx.device, sequence_parallel=sequence_parallel, overlap_chunks=overlap_chunks).eval()
        return BuiltModel(model, config.vocab_size, comm.reset, lambda phase: [asdict(r) for r in comm.records])
    # the peer: DTensor's collectives are invisible to a Communicator, so they are listed from its plan
    if mode == "tp" and world > 1:
        model = parallelize(random_plain_model(config, torch_dtype, ctx.device), tp_mesh(ctx)).eval()
        vocab = config.vocab_size
    else:  # one rank's shard shapes, no collectives (at world 1 this is the whole model)
        model = random_plain_model(shard_config(config, world), torch_dtype, ctx.device).eval()
        vocab = config.vocab_size // world
    collective = mode == "tp" and world > 1

    def records(phase: "Phase") -> list[dict]:
        if not collective:
            return []
        if phase.kind == "prefill":
            return peer_collectives(config, phase.batch, phase.prompt, world, torch_dtype, last_only=True)
        return peer_collectives(config, phase.batch, 1, world, torch_dtype, last_only=False) * phase.steps

    return BuiltModel(model, vocab, lambda: None, records)


# The two timed workloads. Each returns (setup, run): `setup` runs untimed before every timed
# `run`. A faster decode path (e.g. CUDA graphs) replaces decode_step / make_decode only.


def greedy_next(model, ids, position: int = 0, use_cache: bool = False):
    """The greedy next token (batch,) after ids (batch, seq): the reference selects it on its
    vocabulary shards (LlamaModel.greedy); the peer's argmax consumes its gathered logits, so
    DTensor's asynchronous last all-gather cannot still be in flight when the clock stops."""
    if hasattr(model, "greedy"):
        return model.greedy(ids, position, use_cache=use_cache)
    return model(ids, position, use_cache=use_cache, last_only=True)[:, -1].argmax(-1)


def make_prefill(model, ids, path: str = "eager"):
    """A last-token prefill of ids to the greedy token. path "compiled": through torch.compile,
    compiled here (untimed). The first call is eager on either path: it fixes the model's
    sequence-parallel mode and its collectives are the ones a counting communicator sees."""
    with torch.no_grad():
        greedy_next(model, ids)
    step = greedy_next
    if path == "compiled":
        torch._dynamo.reset()  # each point compiles its own model; stay clear of dynamo's recompile limit
        step = torch.compile(greedy_next, dynamic=False)
        with torch.no_grad():
            step(model, ids)

    @torch.no_grad()
    def run():
        step(model, ids)

    return (lambda: None), run


def decode_step(model, token, position: int):
    """One decode step: the next token (batch, 1) from `token` at `position` (KV cache in the model)."""
    return greedy_next(model, token, position, use_cache=True)[:, None]


def make_decode(model, ids, steps: int, path: str = "eager", count_step=None):
    """Prefill the prompt into the KV cache once (untimed); each run decodes `steps` tokens after it.

    path "cuda-graph" / "compiled+cuda-graph": the reference's StaticDecoder replays one captured
    step per token. Replays are invisible to a Communicator, so `count_step()` — the collectives
    of one eager step, counted before capture — is returned for the caller to scale by `steps`
    (third item; None on the eager path, whose runs the communicator counts itself). The fourth item,
    `step(i)`, decodes one token at position prompt + i % steps and returns it on the host (a
    serving loop's unit of work: the driver's per-step dispatch is timed around it)."""
    prompt = ids.shape[1]
    if path != "eager":
        max_seq = -(-(prompt + steps) // 16) * 16
        step_records = count_step(ids, max_seq) if count_step else None
        torch._dynamo.reset()  # each point compiles its own model; stay clear of dynamo's recompile limit
        decoder = StaticDecoder(model, ids.shape[0], max_seq, compile="inductor" if path.startswith("compiled") else None, cuda_graph=True, output="tokens")
        decoder.warm_up()
        with torch.no_grad():
            greedy_next(model, ids, 0, use_cache=True)

        def replay_run():
            token = ids[:, -1:]
            for step in range(steps):
                token = decoder.replay(token, prompt + step)

        def replay_step(i: int) -> list:
            return decoder.replay(ids[:, -1:], prompt + i % steps).tolist()

        return (lambda: None), replay_run, step_records, replay_step
    if hasattr(model, "allocate_kv_cache"):  # tpgate: preallocated cache, rewritten in place by every run
        model.allocate_kv_cache(ids.shape[0], prompt + steps)
    with torch.no_grad():
        greedy_next(model, ids, 0, use_cache=True)
    # the peer's cache grows by concatenation: cut it back to the prompt before every run
    setup = (lambda: model.truncate_cache(prompt)) if hasattr(model, "truncate_cache") else (lambda: None)

    @torch.no_grad()
    def run():
        token = ids[:, -1:]
        for step in range(steps):
            token = decode_step(model, token, prompt + step)

    @torch.no_grad()
    def one_step(i: int) -> list:
        if hasattr(model, "truncate_cache"):
            model.truncate_cache(prompt + i % steps)
        return decode_step(model, ids[:, -1:], prompt + i % steps).tolist()

    return setup, run, None, one_step


def _step_counter(built: BuiltModel):
    """count(ids, max_seq) -> the collectives of one eager decode step of built.model after `ids`."""
    def count(ids, max_seq):
        built.model.allocate_kv_cache(ids.shape[0], max_seq)
        with torch.no_grad():
            greedy_next(built.model, ids, 0, use_cache=True)
            built.reset()
            decode_step(built.model, ids[:, -1:], ids.shape[1])
        return built.records(Phase("decode", ids.shape[0], ids.shape[1], 1))

    return count


class PointOutOfMemory(RuntimeError):
    """A rank ran out of device memory during a sweep point; the message names the rank and the bytes."""


def describe_out_of_memory(rank: int, error: BaseException, free_bytes: int, total_bytes: int) -> str:
    """One line for a CUDA out-of-memory on `rank`: the allocation that failed (as torch's message
    states it, in bytes) and the device's free and total bytes when it failed."""
    import re

    units = {"B": 1, "KiB": 2**10, "MiB": 2**20, "GiB": 2**30, "TiB": 2**40}
    match = re.search(r"Tried to allocate ([\d.]+) (B|KiB|MiB|GiB|TiB)", str(error))
    requested = f"{round(float(match[1]) * units[match[2]])} bytes" if match else "an unknown number of bytes"
    return f"rank {rank}: CUDA out of memory: requested {requested}, {free_bytes} bytes free of {total_bytes}"


def point_error(e: BaseException) -> str:
    """A failed point's error text. For a rank's exception, each failing rank's own last line (the
    exception it raised), not the head of its traceback: 2,000 characters of traceback would cut it off."""
    from harness.runtime.orchestrator import RankError

    if isinstance(e, RankError):
        lines = [f"rank {r}: {tb.strip().splitlines()[-1]}" for r, tb in sorted(e.tracebacks.items()) if tb.strip()]
        return ("RankError: " + "; ".join(lines))[:2000]
    return f"{type(e).__name__}: {e}"[:2000]


def measure_on_rank(ctx, implementation: str, preset: str, phase: Phase, dtype: str, warmup: int, repeats: int, mode: str,
                    world: int | None = None, decode_path: str = "eager", prefill_path: str = "eager", sequence_parallel: bool = False,
                    overlap_chunks: int = 1, all_reduce: str = "nccl") -> dict:
    """Time one phase on this rank (see build_model for `mode`, `sequence_parallel`, `overlap_chunks` and `all_reduce`; `world`
    defaults to the rank's world; `decode_path` / `prefill_path` as resolved by
    resolve_decode_path / resolve_prefill_path). A CUDA out-of-memory raises PointOutOfMemory naming
    this rank, the bytes requested and the bytes free: the point fails, the sweep goes on."""
    require(mode in MODES, "mode", mode, f"must be one of {MODES}")
    world = world or ctx.comm.world_size  # the TP group's size
    try:
        return _measure(ctx, implementation, preset, phase, dtype, warmup, repeats, mode, world, decode_path, prefill_path, sequence_parallel, overlap_chunks,
                        all_reduce)
    except torch.OutOfMemoryError as e:
        free, total = torch.cuda.mem_get_info(ctx.device) if ctx.device.type == "cuda" else (0, 0)
        raise PointOutOfMemory(describe_out_of_memory(ctx.rank, e, free, total)) from None


KEPT_STEP = "sweep.decode_step"  # RankContext.state key of the last measured decode point's one-step function
DISPATCH_STEPS = 32  # single-step calls per measured decode point


def run_kept_step(ctx, i: int) -> list:
    """One decode step of the point measure_on_rank measured last on this rank: the token ids (batch, 1)."""
    return ctx.state[KEPT_STEP](i)


def release_kept_step(ctx) -> None:
    ctx.state.pop(KEPT_STEP, None)


def _measure(ctx, implementation, preset, phase, dtype, warmup, repeats, mode, world, decode_path, prefill_path, sequence_parallel, overlap_chunks,
             all_reduce) -> dict:
    ctx.state.pop(KEPT_STEP, None)  # a previous point's model must not outlive it
    threads = torch.get_num_threads()
    if mode == "projected" and ctx.device.type == "cpu":
        # a CPU rank of a `world`-rank sweep gets cores // world threads (orchestrator); the projection plays such a rank
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // world))
    try:
        built = build_model(ctx, implementation, preset, dtype, mode, world, sequence_parallel, overlap_chunks, all_reduce)
        ids = torch.randint(0, built.vocab, (phase.batch, phase.prompt), device=ctx.device)
        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        if phase.kind == "prefill":
            built.reset()
            setup, run = make_prefill(built.model, ids, prefill_path)
            # a compiled run is invisible to the communicator: make_prefill's first, eager call was counted
            run_records = built.records(phase) if prefill_path == "compiled" else None
        else:
            setup, run, step_records, one_step = make_decode(built.model, ids, phase.steps, decode_path, count_step=_step_counter(built))
            run_records = None if step_records is None else step_records * phase.steps
            if mode == "tp":  # kept for run_kept_step: the driver then issues single steps (dispatch per step)
                ctx.state[KEPT_STEP] = one_step
        for _ in range(warmup):
            setup()
            run()
        times = []
        for _ in range(repeats):
            setup()
            if mode == "tp":
                ctx.comm.barrier()  # ranks start each repeat together
            built.reset()
            times.append(time_calls(run, 1, ctx.device)[0])
        collectives = built.records(phase) if run_records is None else run_records  # one repeat's worth
    finally:
        torch.set_num_threads(threads)
    per_step = phase.steps if phase.kind == "decode" else 1
    low_latency = ctx.state.get(LOW_LATENCY_COMM) if all_reduce == "low-latency" and mode == "tp" else None
    return {"rank": ctx.rank, "median_s": statistics.median(times), "p90_s": percentile(times, 0.90),
            "times": times, "peak_memory": peak_memory_bytes(ctx.device), "collectives": collectives, "steps": per_step,
            "all_reduce_fallback": getattr(low_latency, "fallback_reason", None)}


# --------------------------------------------------------------------------- driver


def sweep_tasks(cfg: SweepConfig, gpus: int) -> list[tuple]:
    """(implementation, preset, phase, world size, projected) in sweep order: a measured point,
    then (with compare_projection) its projection; beyond the GPUs present, the projection only."""
    tasks = []
    for impl in cfg.implementations:
        for preset in cfg.presets:
            for phase in cfg.phases:
                for ws in cfg.world_sizes:
                    beyond = cfg.device == "cuda" and ws > gpus
                    if not beyond:
                        tasks.append((impl, preset, phase, ws, False))
                    # a protocol stack cannot be projected (harness/protocol_sweep.py): only where nothing else can run it
                    if beyond or (cfg.compare_projection and ws > 1 and impl in BUILT_IN):
                        tasks.append((impl, preset, phase, ws, True))
    return tasks


def run_sweep(cfg: SweepConfig, world_for, cost_model: CostModel | None = None, progress=None) -> "pd.DataFrame":
    """Measure (or project) every point: the results table, one row per point, before analysis
    (speedups: harness.scaling_analysis.add_speedups). A failed point is a row with status
    'failed' and its error. Projected points are priced by `cost_model` (DEFAULTS when None)."""
    import pandas as pd  # pandas stays out of the ranks, which import this module

    gpus = torch.cuda.device_count() if cfg.device == "cuda" else 0
    cost_model = cost_model or DEFAULTS
    rows = []
    tasks = sweep_tasks(cfg, gpus)
    for n, (impl, preset, phase, ws, projected) in enumerate(tasks, 1):
        row = {"implementation": impl, "preset": preset, "phase": phase.kind, "batch": phase.batch, "prompt": phase.prompt, "steps": phase.steps,
               "world_size": ws, "device": cfg.device, "dtype": cfg.dtype, "projected": projected, "status": "ok", "error": ""}
        if progress:
            progress(n, len(tasks), f"{impl} {preset} {phase.kind} ws={ws}{' (projected)' if projected else ''}")
        decode = phase.kind == "decode"
        row["decode_path"] = resolve_decode_path(cfg.decode_path, impl, cfg.device) if decode else ""
        row["prefill_path"] = "" if decode else resolve_prefill_path(cfg.prefill_path, impl, cfg.device)
        row["sequence_parallel"] = not decode and impl == "reference" and cfg.sequence_parallel and ws > 1
        # the chunks the prefill ran with; 1 wherever it was not chunked (decode, no SP, a prompt not a multiple of ws)
        row["overlap_chunks"] = cfg.prefill_overlap_chunks if row["sequence_parallel"] and phase.prompt % ws == 0 else 1
        try:
            args = (impl, preset, phase, cfg.dtype, cfg.warmup, cfg.repeats)
            # the reference's measured decode all-reduces run as cfg.decode_all_reduce says (the dtensor peer's are DTensor's own)
            kw = {"decode_path": row["decode_path"], "all_reduce": cfg.decode_all_reduce if impl == "reference" else "nccl"} if decode else {"prefill_path": row["prefill_path"], "sequence_parallel": row["sequence_parallel"],
                                                                      "overlap_chunks": row["overlap_chunks"]}
            if impl not in BUILT_IN:
                row.update(_protocol_point(impl, preset, phase, ws, projected, cfg, world_for))
            elif projected:
                if ws > gpus and cfg.device == "cuda" and not cfg.project:
                    raise TPConfigError("world_sizes", ws, f"needs {ws} GPUs, {gpus} present; pass --project to project it")
                alone = world_for(1).run(measure_on_rank, *args, "projected", ws, **kw)[0]
                issued = _would_issue(alone, impl, preset, phase, ws, cfg)
                # decode points' all-reduces priced as cfg.decode_all_reduce says; prefill's on NCCL
                tp_s, pricing = projection_columns(alone["median_s"], issued, ws, cost_model, cfg.decode_all_reduce if decode else "nccl",
                                                   cfg.device, cfg.dtype, phase.steps if decode else 1)
                row.update(_summarise([alone], [alone], tp_s, phase, ws, dispatch=None), **pricing)
                row["collectives_per_step"], row["comm_bytes_per_step"] = _comm_per_step(issued, phase)
                row["cost_model"] = cost_model.source or "measured"
            else:
                world = world_for(ws)
                real = world.run(measure_on_rank, *args, "tp", **kw)
                real_call = world.dispatch[-1]
                steps = _single_step_dispatch(world) if decode else None
                null = world.run(measure_on_rank, *args, "null", **kw)
                row.update(_summarise(real, null, None, phase, ws, dispatch=[real_call, world.dispatch[-1]], step_dispatch=steps))
                row["backend"] = getattr(world, "backend", "")
                if decode and kw["all_reduce"] == "low-latency":  # what ran: symmetric memory, or the plain collective and why
                    fallback = real[0].get("all_reduce_fallback")
                    row["all_reduce_measured"] = f"{row['backend']} all-reduce (fallback: {fallback})" if fallback else "low-latency"
        except Exception as e:  # noqa: BLE001 - a failed point is data, the sweep goes on
            row.update(status="failed", error=point_error(e))
        rows.append(row)
    return pd.DataFrame(rows)


class PointRefused(Exception):
    """A protocol stack cannot run this point (Unsupported, a missing capability, a projection)."""


def _protocol_point(spec: str, preset: str, phase: Phase, ws: int, projected: bool, cfg: SweepConfig, world_for) -> dict:
    """One measured point of a protocol stack (harness/protocol_sweep.py): no T_null, so exposed
    communication is NaN; collectives from the stack's declaration, if any."""
    config = PRESETS[preset]
    reason = refusal(spec, config, phase, ws, projected)
    if reason:
        raise PointRefused(reason)
    world = world_for(ws)
    real = world.run(measure_protocol_on_rank, spec, config, phase, cfg.dtype, cfg.warmup, cfg.repeats)
    out = _summarise(real, None, None, phase, ws, dispatch=[world.dispatch[-1]])
    issued = declared_collectives(spec, config, phase, ws)
    out["collectives_per_step"], out["comm_bytes_per_step"] = (float("nan"), float("nan")) if issued is None else _comm_per_step(issued, phase)
    out["backend"] = getattr(world, "backend", "")
    return out


def _would_issue(alone: dict, impl: str, preset: str, phase: Phase, ws: int, cfg: SweepConfig) -> list[dict]:
    """The collectives a `ws`-way run of this point issues per timed run: the reference's
    NullCommunicator counted them on the rank; the peer's are listed from its plan."""
    if impl == "reference":
        return alone["collectives"]
    config, dtype = PRESETS[preset], parse_dtype(cfg.dtype)
    if phase.kind == "prefill":
        return peer_collectives(config, phase.batch, phase.prompt, ws, dtype, last_only=True)
    return peer_collectives(config, phase.batch, 1, ws, dtype, last_only=False) * phase.steps


def _comm_per_step(records: list[dict], phase: Phase) -> tuple[float, float]:
    per = phase.steps if phase.kind == "decode" else 1
    return len(records) / per, sum(r["nbytes"] for r in records) / per


def _single_step_dispatch(world) -> list:
    """The driver issues DISPATCH_STEPS decode steps one call each, as a serving loop does; their
    DispatchRecords. The kept model is released after, before the point's next call builds another."""
    try:
        for i in range(DISPATCH_STEPS):
            world.run(run_kept_step, i)
        return world.dispatch[-DISPATCH_STEPS:]
    finally:
        world.run(release_kept_step)


def _summarise(real: list[dict], null: list[dict], projected_s: float | None, phase: Phase, ws: int, dispatch: list | None,
               step_dispatch: list | None = None) -> dict:
    """One row's figures from the ranks' measure_on_rank results. Latencies are per step: per
    decode step (a timed run decodes `phase.steps` tokens), per call for prefill.

    Dispatch (measured points; `dispatch` holds the DispatchRecords of the point's two calls,
    with and without collectives; None for a projected point):
      dispatch_us_per_call  the orchestrator's overhead on one call: driver-observed time minus
                            the slowest rank's own time (queueing, pickling, result collection),
                            the smaller of the two calls' (a world's first call also pays one-off
                            costs, e.g. the ranks importing the called function's module);
      dispatch_us_per_step  the overhead a unit of work pays when the driver dispatches each unit
                            as its own call: for decode, the median over `step_dispatch`, the
                            DispatchRecords of single-step calls the driver issued one by one (each
                            returning the token ids), with their p99 as dispatch_us_per_step_p99; for
                            prefill (one call is the unit), the point's call overhead;
      dispatch_fraction     dispatch_us_per_step / the step's measured latency (latency_s): the
                            gate's "dispatch overhead" criterion.
    A prefill point's calls also return its timings and collective records, so its overhead
    overstates that of a call returning only tokens: the fraction errs towards NO-GO. It
    is never divided by the measured call's own duration, which spans building the model,
    warm-up and every repeat and would make any overhead look negligible."""
    slowest = max(real, key=lambda r: r["median_s"])
    per = phase.steps if phase.kind == "decode" else 1
    tp_s = projected_s if projected_s is not None else slowest["median_s"]
    null_s = max(r["median_s"] for r in null) if null is not None else float("nan")  # None: not measurable (a protocol stack)
    out = {
        "latency_s": tp_s / per, "latency_p90_s": (slowest["p90_s"] if projected_s is None else tp_s) / per, "null_latency_s": null_s / per,
        "exposed_comm": max(0.0, (tp_s - null_s) / tp_s) if tp_s > 0 and null is not None else float("nan"),
        "tokens_per_s": phase.tokens() / tp_s if tp_s > 0 else float("nan"),
        "peak_memory_bytes": max(r["peak_memory"] for r in real),
        "rank_latency_s": [round(r["median_s"] / per, 9) for r in real],
    }
    out["collectives_per_step"], out["comm_bytes_per_step"] = _comm_per_step(slowest["collectives"], phase)
    if dispatch:
        overhead_s = min(record.overhead_s for record in dispatch)
        out["dispatch_us_per_call"] = out["dispatch_us_per_step"] = overhead_s * 1e6
        if step_dispatch:
            per_step = [record.overhead_s for record in step_dispatch]
            overhead_s = percentile(per_step, 0.5)
            out["dispatch_us_per_step"], out["dispatch_us_per_step_p99"] = overhead_s * 1e6, percentile(per_step, 0.99) * 1e6
        out["dispatch_fraction"] = overhead_s / out["latency_s"] if out["latency_s"] > 0 else float("nan")
    return out
