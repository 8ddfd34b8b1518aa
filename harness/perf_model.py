"""The collective cost model: one object, its defaults, its fit, one pricing rule.

A collective of nccl-tests size `n` bytes on `w` ranks takes

    t(n, w) = max(0, alpha) + n * factor(op, w) / busbw       (t in us, alpha in us, busbw in GB/s = 1e3 bytes/us)

and nothing on a world of one (no bus). `factor` is nccl-tests' bus-bandwidth factor
(PERFORMANCE.md there): all_reduce 2(w-1)/w, all_gather and reduce_scatter (w-1)/w, so that
busbw = algbw * factor is comparable across ops and world sizes. nccl-tests sizes: all_reduce
the tensor each rank reduces, all_gather the gathered *output*, reduce_scatter the *input*.
A least-squares alpha may come out negative (noise at small sizes); a priced collective never
takes negative time, hence max(0, alpha) (the fit's diagnostic plot uses the same rule).

`CostModel` holds per-op (alpha, busbw), optionally each world size's own parameters (preferred
when pricing that world size), its `source` (the citation of the defaults, or the benchmark it
was fitted to) and `reason` (why this model prices the projections), and the benchmark's `fit`
when one was made, used or not. `to_dict()` is the JSON form results.json stores:
{op: {latency_us, busbw_GBps[, by_world_size: {w: {latency_us, busbw_GBps}}]}, "source", "reason", "fit"[, "tables"]}.

Latency tables. Where the model holds a `LatencyTable` for (op, algorithm, world size) — points
(nccl-tests bytes -> us), measured by harness.collectives.bench_collectives (fit_cost_model makes
them) or published (DEFAULT_TABLES, each with its source) — that table prices the collective:
log-log linear between points, flat below the smallest (a smaller message is never slower than
the latency floor), alpha-beta beyond the largest (the line through the two largest points; one
point: that point plus the op's bandwidth term). Without a table the alpha-beta form above prices it.
Algorithms: "nccl" for every op; the all-reduce also "one_shot" and "two_shot", the low-latency
communicator's (impl/low_latency.py's choose_all_reduce picks one by message size: the one
definition). `price_collectives(..., all_reduce="low-latency")` prices each all-reduce with the
algorithm chosen for its size, and as NCCL where the model has no table of that algorithm at that
world size (the pricing records it).

Overlap. A record's `overlap_flops` (missing: 0) counts the matmul FLOPs this rank computes while
the transfer is in flight (a pipelined all-gather -> matmul or matmul -> reduce-scatter chunk); it
costs max(0, t_transfer - overlap_flops / rate), so an overlapped pair costs max(compute,
transfer) (the compute is already in the shard's own time), and a pipeline's fill and drain
chunks, recorded with 0, are exposed whole. `rate` is MATMUL_FLOP_S's rate for the device and
dtype: the fastest a matmul runs there, so the compute that hides a transfer is never overstated
and the estimate errs towards more exposed communication.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from impl.architecture import TPConfigError, require
from impl.low_latency import ALGORITHMS, choose_all_reduce

OPS = ("all_reduce", "all_gather", "reduce_scatter")
ALL_REDUCE_PRICINGS = ("nccl", "low-latency")  # SweepConfig.decode_all_reduce's values


def busbw_factor(op: str, world_size: int) -> float:
    """nccl-tests' bus-bandwidth factor: busbw = algbw * factor. 0 for a world of one."""
    require(op in OPS, "op", op, f"must be one of {OPS}")
    require(isinstance(world_size, int) and not isinstance(world_size, bool) and world_size >= 1, "world_size", world_size,
            "must be an integer >= 1")
    n = world_size
    return (2 * (n - 1) / n) if op == "all_reduce" else ((n - 1) / n)


def nccl_tests_bytes(op: str, input_bytes: int, world_size: int) -> int:
    """nccl-tests size of a collective whose per-rank *input* is `input_bytes` (what the
    communicator records): the gathered output for all_gather, the input otherwise."""
    return input_bytes * world_size if op == "all_gather" else input_bytes


@dataclass(frozen=True)
class OpCost:
    latency_us: float  # alpha
    busbw_GBps: float  # inf: size costs nothing (a non-positive fitted slope)

    def to_dict(self) -> dict:
        return {"latency_us": self.latency_us, "busbw_GBps": self.busbw_GBps}


@dataclass(frozen=True)
class LatencyTable:
    """Latency by message size for one (op, algorithm, world size): `points` ((nccl-tests bytes,
    us), ...) with bytes strictly increasing and us non-decreasing, and where the figures come from.
    `us(n)` interpolates as the module doc says; `beyond_us_per_byte` is the slope used beyond the
    largest point when the table has only one."""

    points: tuple[tuple[int, float], ...]
    source: str = ""

    def __post_init__(self):
        require(isinstance(self.points, tuple) and len(self.points) >= 1, "points", self.points, "must be a non-empty tuple of (bytes, us)")
        for i, (b, us) in enumerate(self.points):
            require(isinstance(b, int) and not isinstance(b, bool) and b > 0 and math.isfinite(us) and us >= 0, f"points[{i}]", (b, us),
                    "must be (bytes > 0, us >= 0)")
            if i:
                require(b > self.points[i - 1][0] and us >= self.points[i - 1][1], f"points[{i}]", (b, us),
                        f"must grow in bytes and not fall in us after {self.points[i - 1]} (LatencyTable.measured makes a table monotone)")

    @classmethod
    def measured(cls, points, source: str) -> LatencyTable:
        """A table of (bytes, us) figures as measured or published, made monotone: sorted by bytes,
        repeated sizes keep their slowest figure, and each figure is raised to the largest one at a
        smaller size (noise never makes a larger message cheaper; raising errs towards more communication)."""
        by_size: dict[int, float] = {}
        for b, us in points:
            by_size[int(b)] = max(float(us), by_size.get(int(b), 0.0))
        out, floor = [], 0.0
        for b in sorted(by_size):
            floor = max(floor, by_size[b])
            out.append((b, floor))
        return cls(tuple(out), source)

    def us(self, nbytes: int, beyond_us_per_byte: float = 0.0) -> float:
        pts = self.points
        if nbytes <= pts[0][0]:
            return pts[0][1]
        if nbytes >= pts[-1][0]:
            if len(pts) >= 2:
                (b0, t0), (b1, t1) = pts[-2], pts[-1]
                beyond_us_per_byte = (t1 - t0) / (b1 - b0)
            return pts[-1][1] + (nbytes - pts[-1][0]) * beyond_us_per_byte
        i = next(k for k in range(1, len(pts)) if pts[k][0] >= nbytes)
        (b0, t0), (b1, t1) = pts[i - 1], pts[i]
        if t0 == 0.0:  # log of zero: linear between the points
            return t0 + (t1 - t0) * (nbytes - b0) / (b1 - b0)
        w = math.log(nbytes / b0) / math.log(b1 / b0)
        return math.exp(math.log(t0) + w * math.log(t1 / t0))

    def to_dict(self) -> dict:
        return {"points": [[b, us] for b, us in self.points], "source": self.source}

    @classmethod
    def from_dict(cls, data: dict) -> LatencyTable:
        require(isinstance(data, dict) and isinstance(data.get("points"), list), "table", data, "must be {points: [[bytes, us], ...], source}")
        return cls(tuple((int(b), float(us)) for b, us in data["points"]), str(data.get("source") or ""))


Tables = dict  # {op: {algorithm: {world_size: LatencyTable}}}


@dataclass(frozen=True)
class CostModel:
    ops: dict[str, OpCost]
    by_world_size: dict[str, dict[int, OpCost]] = field(default_factory=dict)
    source: str = ""
    reason: str = ""
    fit: CostModel | None = None
    tables: Tables = field(default_factory=dict)

    def params(self, op: str, world_size: int) -> OpCost | None:
        """This world size's own parameters where there are some, else the op's; None for an op the model lacks."""
        own = self.by_world_size.get(op, {}).get(world_size)
        return own if own is not None else self.ops.get(op)

    def table(self, op: str, algorithm: str, world_size: int) -> LatencyTable | None:
        return self.tables.get(op, {}).get(algorithm, {}).get(world_size)

    def collective_us(self, op: str, nbytes: int, world_size: int, algorithm: str = "nccl") -> float:
        """t(nbytes, world_size) in microseconds (see the module doc); `nbytes` in nccl-tests' convention.
        From the (op, algorithm, world size) table where there is one, else alpha-beta (any algorithm
        without a table is priced as NCCL: price_collectives says where that happened)."""
        require(op in self.ops, "op", op, f"not in the cost model (has {sorted(self.ops)})")
        require(algorithm in ALGORITHMS, "algorithm", algorithm, f"must be one of {ALGORITHMS}")
        if world_size == 1:
            return 0.0
        p = self.params(op, world_size)
        per_byte = busbw_factor(op, world_size) / (p.busbw_GBps * 1e3)
        table = self.table(op, algorithm, world_size)
        if table is not None:
            return table.us(nbytes, per_byte)
        return max(0.0, p.latency_us) + nbytes * per_byte

    def with_source(self, source: str, reason: str = "", fit: CostModel | None = None) -> CostModel:
        return CostModel(self.ops, self.by_world_size, source, reason, fit, self.tables)

    def to_dict(self) -> dict:
        out: dict = {}
        for op, p in self.ops.items():
            out[op] = p.to_dict()
            if self.by_world_size.get(op):
                out[op]["by_world_size"] = {ws: q.to_dict() for ws, q in sorted(self.by_world_size[op].items())}
        if self.source:
            out["source"] = self.source
        if self.reason:
            out["reason"] = self.reason
        if self.source or self.reason:  # a priced model states its fit (None when none was made); a bare fit does not nest one
            out["fit"] = self.fit.to_dict() if self.fit is not None else None
        if self.tables:
            out["tables"] = {op: {algo: {ws: t.to_dict() for ws, t in sorted(by_ws.items())} for algo, by_ws in algos.items()}
                             for op, algos in self.tables.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        """The inverse of to_dict (world-size keys may be strings, as JSON writes them). A stored
        model without "tables" (results.json written before latency tables existed) loads as alpha-beta only."""
        require(isinstance(data, dict), "cost_model", data, "must be a mapping {op: {latency_us, busbw_GBps}, ...}")
        ops, by_ws = {}, {}
        for op, p in data.items():
            if op in ("source", "reason", "fit", "tables"):
                continue
            require(isinstance(p, dict) and {"latency_us", "busbw_GBps"} <= p.keys(), f"cost_model.{op}", p, "must hold latency_us and busbw_GBps")
            ops[op] = OpCost(float(p["latency_us"]), float(p["busbw_GBps"]))
            if p.get("by_world_size"):
                by_ws[op] = {int(ws): OpCost(float(q["latency_us"]), float(q["busbw_GBps"])) for ws, q in p["by_world_size"].items()}
        tables = {op: {algo: {int(ws): LatencyTable.from_dict(t) for ws, t in by.items()} for algo, by in algos.items()}
                  for op, algos in (data.get("tables") or {}).items()}
        fit = data.get("fit")
        return cls(ops, by_ws, str(data.get("source") or ""), str(data.get("reason") or ""), cls.from_dict(fit) if fit else None, tables)

    def sources(self) -> list[dict]:
        """One entry per table: {op, algorithm, world_size, points, source} (the report's assumptions table)."""
        return [{"op": op, "algorithm": algo, "world_size": ws, "points": t.points, "source": t.source}
                for op, algos in self.tables.items() for algo, by_ws in algos.items() for ws, t in sorted(by_ws.items())]


# NCCL (the alpha-beta defaults; no table). NVLink 4 (H100 SXM) ring all-reduce: ~450 GB/s bus
# bandwidth at large messages in NVIDIA's published nccl-tests results for 8-GPU DGX H100;
# small-message latency ~10-20 us per all-reduce (NCCL tuning docs / nccl-tests at 8 B). 4-GPU
# subsets of an NVSwitch host keep the per-GPU NVLink bandwidth. H200 has the same NVLink 4.
# Cross-check, not used: vLLM PR #24532's TP=4 table (benchmarks/kernels/benchmark_device_communicators.py,
# bf16 (n, 8192) tensors) has pynccl at 21 us for 512 KiB and 39 us for 4 MiB; this model gives 17 and 32
# us, so NCCL-priced projections may be optimistic by a few us per all-reduce. Assumptions, stated in
# every projected row.
DEFAULT_OPS = {"all_reduce": OpCost(15.0, 360.0), "all_gather": OpCost(12.0, 360.0), "reduce_scatter": OpCost(12.0, 360.0)}

KIB, MIB = 1 << 10, 1 << 20
# One-shot and two-shot all-reduce over peer buffers (no NVLink multicast), H100 NVLink 4, bf16/fp32,
# microseconds by bytes of the reduced tensor. Published figures, made monotone (LatencyTable.measured).
SGLANG_2904 = ("sglang PR #2904 (H100, sgl-kernel custom all-reduce, TRT-LLM one-shot kernel, 5000 back-to-back "
               "launches without a CUDA graph; test sizes are fp32 elements, converted to bytes)")
VLLM_24532 = ("vLLM PR #24532, TP=4 table (benchmarks/kernels/benchmark_device_communicators.py, bf16 (n, 8192); the GPU is not "
              "named beside that table, PR #24111 ran the same benchmark on H100)")
DEFAULT_TABLES: Tables = {"all_reduce": {
    "one_shot": {
        # 2 KiB / 16 KiB / 128 KiB / 1 MiB at TP 2, 4, 8: 3.7/3.9/4.5/7.9, 4.8/3.7/4.8/13.9, 5.9/5.7/7.8/16.7 us
        2: LatencyTable.measured([(2 * KIB, 3.7), (16 * KIB, 3.9), (128 * KIB, 4.5), (MIB, 7.9)], SGLANG_2904),
        # <= 128 KiB from sglang #2904; 512 KiB-4 MiB: vLLM #24532's ca_1stage (one-shot) 10, 14, 23, 38 us
        4: LatencyTable.measured([(2 * KIB, 4.8), (16 * KIB, 3.7), (128 * KIB, 4.8), (512 * KIB, 10.0), (MIB, 14.0), (2 * MIB, 23.0),
                                  (4 * MIB, 38.0)], f"{SGLANG_2904} up to 128 KiB; {VLLM_24532} ca_1stage from 512 KiB"),
        8: LatencyTable.measured([(2 * KIB, 5.9), (16 * KIB, 5.7), (128 * KIB, 7.8), (MIB, 16.7)], SGLANG_2904),
    },
    # vLLM #24532's ca_2stage (two-shot) at TP=4: 512 KiB 17, 1 MiB 18, 1.5 MiB 25, 2 MiB 26, 3 MiB 35, 4 MiB 42 us
    "two_shot": {4: LatencyTable.measured([(512 * KIB, 17.0), (MIB, 18.0), (3 * MIB // 2, 25.0), (2 * MIB, 26.0), (3 * MIB, 35.0),
                                           (4 * MIB, 42.0)], f"{VLLM_24532} ca_2stage")},
}}
DEFAULTS = CostModel(ops=DEFAULT_OPS, source="defaults (published NVLink/NCCL figures), not measured", tables=DEFAULT_TABLES)

# Matmul rates (FLOP/s) that price the compute hiding an overlapped transfer: the fastest a matmul
# runs on the device, so the time a transfer hides behind is never overstated and the exposed
# communication errs high. CUDA bf16/fp16: 790 TFLOP/s, the 8192^3 bf16 product on random data
# measured on the H200s lent here (769-798 TFLOP/s, device tool KINDS.md; the datasheet peak is
# 989). A prefill chunk's GEMM (thousands of rows, N <= 14336/tp, K = 4096) is smaller and runs
# slower, so it hides at least this much. fp32: the TF32 peak, 495 TFLOP/s (NVIDIA H100/H200
# datasheets; fp32 matmuls run as TF32 when torch allows, else slower). CPU: 2 TFLOP/s, above what
# the CI's few x86 cores reach (one AVX-512 core with two FMA units: ~0.2 TFLOP/s fp32 at 3 GHz).
MATMUL_FLOP_S = {("cuda", "bfloat16"): 790e12, ("cuda", "float16"): 790e12, ("cuda", "float32"): 495e12,
                 ("cpu", "bfloat16"): 2e12, ("cpu", "float16"): 2e12, ("cpu", "float32"): 2e12}


def matmul_flop_s(device: str, dtype: str) -> float:
    """MATMUL_FLOP_S for (device kind, dtype name); TPConfigError for a pair it lacks."""
    key = (str(device).split(":")[0], str(dtype).replace("torch.", ""))
    require(key in MATMUL_FLOP_S, "device, dtype", key, f"no documented matmul rate; known: {sorted(MATMUL_FLOP_S)}")
    return MATMUL_FLOP_S[key]


@dataclass(frozen=True)
class CommPricing:
    """What `records` cost on one rank: `transfer_s` every transfer one after another (no overlap),
    `exposed_s` what stays on the critical path with overlap (see the module doc); `all_reduce` the
    pricing asked for, `algorithms` {algorithm: all-reduces priced with it} (a low-latency
    all-reduce without a table at this world size counts under "nccl (no table)"), `sources` the
    latency tables used."""

    transfer_s: float
    exposed_s: float
    all_reduce: str
    algorithms: dict
    sources: tuple[str, ...]


def exposed_transfer_s(transfer_s: float, overlap_flops: float, flop_s: float) -> float:
    """The part of a `transfer_s` transfer that `overlap_flops` of matmul at `flop_s` do not hide:
    with the compute counted in the shard's own time, the pair then costs max(compute, transfer)."""
    return max(0.0, transfer_s - overlap_flops / flop_s)


def price_collectives(records: list[dict], world_size: int, model: CostModel, all_reduce: str = "nccl",
                      flop_s: float = MATMUL_FLOP_S[("cuda", "bfloat16")]) -> CommPricing:
    """Price `records` ({"kind", "nbytes"[, "overlap_flops"]}) on `world_size` ranks: each all-reduce
    with NCCL or (all_reduce="low-latency") the algorithm impl.low_latency.choose_all_reduce picks for
    its size; each record costs max(0, t_transfer - overlap_flops / flop_s)."""
    require(all_reduce in ALL_REDUCE_PRICINGS, "all_reduce", all_reduce, f"must be one of {ALL_REDUCE_PRICINGS}")
    require(flop_s > 0, "flop_s", flop_s, "must be > 0")
    transfer, exposed, algorithms, sources = [], [], {}, {}
    for r in records:
        if world_size == 1 or r["kind"] not in model.ops:
            continue
        nbytes = nccl_tests_bytes(r["kind"], r["nbytes"], world_size)
        algorithm = "nccl"
        if r["kind"] == "all_reduce":
            if all_reduce == "low-latency":
                algorithm = choose_all_reduce(int(r["nbytes"]), world_size)
            label = algorithm
            if algorithm != "nccl" and model.table("all_reduce", algorithm, world_size) is None:
                algorithm, label = "nccl", "nccl (no table)"
            algorithms[label] = algorithms.get(label, 0) + 1
        table = model.table(r["kind"], algorithm, world_size)
        sources.setdefault(table.source if table is not None else f"alpha-beta ({model.source or 'fitted'})", None)
        t = 1e-6 * model.collective_us(r["kind"], nbytes, world_size, algorithm)
        transfer.append(t)
        exposed.append(exposed_transfer_s(t, float(r.get("overlap_flops") or 0), flop_s))
    return CommPricing(math.fsum(transfer), math.fsum(exposed), all_reduce, algorithms, tuple(sources))


def projection_columns(alone_s: float, records: list[dict], world_size: int, model: CostModel, all_reduce: str, device: str, dtype: str,
                       per: int) -> tuple[float, dict]:
    """A projected point: (seconds of one timed run = `alone_s` (one rank's shard, no collectives) +
    the exposed communication priced with `all_reduce`, the row's pricing columns, per step of `per`):
      comm_exposed_s, comm_no_overlap_s   communication with overlap / every transfer in sequence
      latency_no_overlap_s, exposed_comm_no_overlap   the point's latency and comm share without overlap
      latency_nccl_s, latency_low_latency_s   the latency with overlap under each all-reduce pricing
      all_reduce_pricing, all_reduce_algorithms, latency_figures   what priced it (table sources)
      all_reduce_bytes   the largest all-reduce message (nccl-tests bytes), 0 without one."""
    flop_s = matmul_flop_s(device, dtype)
    both = {name: price_collectives(records, world_size, model, name, flop_s) for name in ALL_REDUCE_PRICINGS}
    chosen = both[all_reduce]
    sequential_s = alone_s + chosen.transfer_s
    return alone_s + chosen.exposed_s, {
        "comm_exposed_s": chosen.exposed_s / per, "comm_no_overlap_s": chosen.transfer_s / per,
        "latency_no_overlap_s": sequential_s / per, "exposed_comm_no_overlap": chosen.transfer_s / sequential_s if sequential_s > 0 else float("nan"),
        "latency_nccl_s": (alone_s + both["nccl"].exposed_s) / per, "latency_low_latency_s": (alone_s + both["low-latency"].exposed_s) / per,
        "all_reduce_pricing": all_reduce, "all_reduce_algorithms": ", ".join(f"{a} x{n}" for a, n in sorted(chosen.algorithms.items())),
        "latency_figures": "; ".join(chosen.sources),
        "all_reduce_bytes": max((int(r["nbytes"]) for r in records if r["kind"] == "all_reduce"), default=0),
    }


def _fit_ops(rows: list[dict]) -> dict[str, OpCost]:
    """Least squares per op on t = alpha + x / busbw with x = bytes * factor(op, world_size)."""
    require(isinstance(rows, (list, tuple)) and len(rows) > 0, "rows", rows, "must be a non-empty list of bench_collectives rows")
    points: dict[str, list[tuple[float, float]]] = {}
    for i, row in enumerate(rows):
        for key in ("op", "bytes", "world_size", "latency_us"):
            require(key in row, f"rows[{i}]", row, f"lacks {key!r}")
        if row["world_size"] > 1:
            points.setdefault(row["op"], []).append((row["bytes"] * busbw_factor(row["op"], row["world_size"]), float(row["latency_us"])))
    require(bool(points), "rows", f"{len(rows)} rows", "need rows with world_size > 1 to fit a bandwidth")
    model = {}
    for op, pts in points.items():
        xs = [x for x, _ in pts]
        require(len(set(xs)) >= 2, "rows", op, "need at least two distinct message sizes per op to fit alpha and busbw")
        mx = math.fsum(xs) / len(xs)
        my = math.fsum(y for _, y in pts) / len(pts)
        sxx = math.fsum((x - mx) ** 2 for x in xs)
        sxy = math.fsum((x - mx) * (y - my) for x, y in pts)
        slope = sxy / sxx  # us per (factor-weighted) byte
        busbw = 1e6 / slope / 1e9 if slope > 0 else float("inf")  # bytes/us -> GB/s
        model[op] = OpCost(my - slope * mx, busbw)
    return model


def fit_cost_model(rows: list[dict], per_world_size: bool = False) -> CostModel:
    """The alpha-beta model fitted to harness.collectives.bench_collectives rows.

    The regressor is bytes * factor, so rows of several world sizes share one (pooled) fit;
    world-size-1 rows (no bus) are ignored. An op needs rows at >= 2 distinct regressor values.
    A non-positive slope (latency not growing with size, e.g. noise at tiny sizes) gives
    busbw_GBps = inf. With `per_world_size`, each measured world size also gets its own fit
    where its rows allow one (latency grows with the number of ranks: ring steps; on CPU, ranks
    contending for cores). The alpha-beta form is NCCL's: rows of other all-reduce algorithms
    (a row's "algorithm", missing: nccl) only make their own latency tables. Raises TPConfigError
    (argument "rows" / "rows[i]") when nothing can be fitted."""
    nccl_rows = [r for r in rows if (r.get("algorithm") or "nccl") == "nccl"]
    pooled = _fit_ops(nccl_rows)  # validates the rows before measured_tables reads them
    tables = measured_tables(rows)
    by_ws: dict[str, dict[int, OpCost]] = {}
    if per_world_size:
        for ws in sorted({r["world_size"] for r in nccl_rows if r["world_size"] > 1}):
            try:
                own = _fit_ops([r for r in nccl_rows if r["world_size"] == ws])
            except TPConfigError:
                continue
            for op, p in own.items():
                by_ws.setdefault(op, {})[ws] = p
    return CostModel(pooled, by_ws, tables=tables)


def measured_tables(rows: list[dict]) -> Tables:
    """A LatencyTable per (op, algorithm, world size > 1) of bench_collectives rows: their
    (bytes, latency_us), made monotone. A row's "algorithm" (missing: "nccl") names what it timed."""
    points: dict[tuple[str, str, int], list] = {}
    for row in rows:
        if row["world_size"] > 1:
            points.setdefault((row["op"], row.get("algorithm") or "nccl", int(row["world_size"])), []).append((int(row["bytes"]), float(row["latency_us"])))
    tables: Tables = {}
    for (op, algorithm, ws), pts in sorted(points.items()):
        backend = next((str(r.get("backend")) for r in rows if r["op"] == op and r["world_size"] == ws and r.get("backend")), "")
        tables.setdefault(op, {}).setdefault(algorithm, {})[ws] = LatencyTable.measured(
            pts, f"measured: bench_collectives{' on ' + backend if backend else ''}, world size {ws}")
    return tables


def merge_tables(base: Tables, over: Tables) -> Tables:
    """`base` with each (op, algorithm, world size) table of `over` replacing base's."""
    out = {op: {algo: dict(by_ws) for algo, by_ws in algos.items()} for op, algos in base.items()}
    for op, algos in over.items():
        for algo, by_ws in algos.items():
            out.setdefault(op, {}).setdefault(algo, {}).update(by_ws)
    return out


__all__ = ["ALL_REDUCE_PRICINGS", "DEFAULTS", "DEFAULT_TABLES", "MATMUL_FLOP_S", "OPS", "CommPricing", "CostModel", "LatencyTable", "OpCost",
           "busbw_factor", "fit_cost_model", "matmul_flop_s", "measured_tables", "merge_tables", "nccl_tests_bytes",
           "price_collectives", "projection_columns"]
