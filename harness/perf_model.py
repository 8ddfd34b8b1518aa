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
{op: {latency_us, busbw_GBps[, by_world_size: {w: {latency_us, busbw_GBps}}]}, "source", "reason", "fit"}.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

from impl.architecture import TPConfigError, require

OPS = ("all_reduce", "all_gather", "reduce_scatter")


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
class CostModel:
    ops: dict[str, OpCost]
    by_world_size: dict[str, dict[int, OpCost]] = field(default_factory=dict)
    source: str = ""
    reason: str = ""
    fit: CostModel | None = None

    def params(self, op: str, world_size: int) -> OpCost | None:
        """This world size's own parameters where there are some, else the op's; None for an op the model lacks."""
        own = self.by_world_size.get(op, {}).get(world_size)
        return own if own is not None else self.ops.get(op)

    def collective_us(self, op: str, nbytes: int, world_size: int) -> float:
        """t(nbytes, world_size) in microseconds (see the module doc); `nbytes` in nccl-tests' convention."""
        require(op in self.ops, "op", op, f"not in the cost model (has {sorted(self.ops)})")
        if world_size == 1:
            return 0.0
        p = self.params(op, world_size)
        return max(0.0, p.latency_us) + nbytes * busbw_factor(op, world_size) / (p.busbw_GBps * 1e3)

    def with_source(self, source: str, reason: str = "", fit: CostModel | None = None) -> CostModel:
        return CostModel(self.ops, self.by_world_size, source, reason, fit)

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
        return out

    @classmethod
    def from_dict(cls, data: dict) -> CostModel:
        """The inverse of to_dict (world-size keys may be strings, as JSON writes them)."""
        require(isinstance(data, dict), "cost_model", data, "must be a mapping {op: {latency_us, busbw_GBps}, ...}")
        ops, by_ws = {}, {}
        for op, p in data.items():
            if op in ("source", "reason", "fit"):
                continue
            require(isinstance(p, dict) and {"latency_us", "busbw_GBps"} <= p.keys(), f"cost_model.{op}", p, "must hold latency_us and busbw_GBps")
            ops[op] = OpCost(float(p["latency_us"]), float(p["busbw_GBps"]))
            if p.get("by_world_size"):
                by_ws[op] = {int(ws): OpCost(float(q["latency_us"]), float(q["busbw_GBps"])) for ws, q in p["by_world_size"].items()}
        fit = data.get("fit")
        return cls(ops, by_ws, str(data.get("source") or ""), str(data.get("reason") or ""), cls.from_dict(fit) if fit else None)


# NVLink 4 (H100 SXM) ring all-reduce: ~450 GB/s bus bandwidth at large messages in NVIDIA's
# published nccl-tests results for 8-GPU DGX H100; small-message latency ~10-20 us per
# all-reduce (NCCL tuning docs / nccl-tests at 8 B). 4-GPU subsets of an NVSwitch host keep
# the per-GPU NVLink bandwidth. These are assumptions, stated in every projected row.
DEFAULTS = CostModel(
    ops={"all_reduce": OpCost(15.0, 360.0), "all_gather": OpCost(12.0, 360.0), "reduce_scatter": OpCost(12.0, 360.0)},
    source="defaults (published NVLink/NCCL figures), not measured")


def collective_time_s(records: list[dict], world_size: int, model: CostModel) -> float:
    """Seconds the collectives in `records` ({"kind", "nbytes": per-rank input bytes}, as the
    communicator records them) take under `model`; kinds the model does not price cost nothing."""
    if world_size == 1:
        return 0.0
    return 1e-6 * math.fsum(model.collective_us(r["kind"], nccl_tests_bytes(r["kind"], r["nbytes"], world_size), world_size)
                            for r in records if r["kind"] in model.ops)


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
    contending for cores). Raises TPConfigError (argument "rows" / "rows[i]") when nothing can be fitted."""
    pooled = _fit_ops(rows)
    by_ws: dict[str, dict[int, OpCost]] = {}
    if per_world_size:
        for ws in sorted({r["world_size"] for r in rows if r["world_size"] > 1}):
            try:
                own = _fit_ops([r for r in rows if r["world_size"] == ws])
            except TPConfigError:
                continue
            for op, p in own.items():
                by_ws.setdefault(op, {})[ws] = p
    return CostModel(pooled, by_ws)


__all__ = ["DEFAULTS", "OPS", "CostModel", "OpCost", "busbw_factor", "collective_time_s", "fit_cost_model", "nccl_tests_bytes"]
