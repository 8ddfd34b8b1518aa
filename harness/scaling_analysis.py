"""The scaling report's analysis: pure functions over a sweep's results frame (no plotting, no
files). harness.scaling_report renders what these compute; harness.gate judges it.

  normalise(results)          the results frame with every COLUMNS column, numeric ones as float,
                              text ones as str, `projected` as bool (true only for a literal true)
                              and `status` ok/failed (a row without one is ok iff it has a latency).
  add_speedups(frame)         speedup = latency at world size 1 / latency(n) of the same point
                              (harness.points.shape_key), efficiency = speedup / n; in place.
  summary(r, verdict)         counts of points (measured, projected, failed), world sizes, devices.
  latency_breakdown(ok)       per row, seconds of compute (the no-collective run), exposed
                              communication (latency - that) and dispatch, for the stacked bars.
  baseline_comparison(r, b)   this run's successful points joined with the baseline's on
                              POINT_KEY (where the baseline both measured and projected a point,
                              its measurement), with `ratio` = now / baseline.
  projection_errors(r, b)     each projection (this run's, the baseline's) against this run's
                              measurement of the same point: error = projected / measured - 1.
  projection_variants(r)      projected points priced with and without overlap, and (decode) with NCCL
                              and with the low-latency all-reduce: speedups and exposed communication.
  latency_assumptions(cm)     the latency figures (tables and alpha-beta) a stored cost model prices with, with sources.
  regressions(now, b, thr)    measured points of both runs joined on POINT_KEY, with `ratio` and
                              `allowed` (the larger of thr and 3x the runs' p90/median spreads).
"""
from __future__ import annotations

import math

import numpy as np
import pandas as pd

from .points import POINT_KEY, join_points, key_frame, shape_key
from .protocol_sweep import BUILT_IN

COLUMNS = [*POINT_KEY, "projected", "status",
           "error", "latency_s", "latency_p90_s", "null_latency_s", "exposed_comm", "tokens_per_s", "peak_memory_bytes",
           "collectives_per_step", "comm_bytes_per_step", "rank_latency_s", "dispatch_us_per_call", "dispatch_fraction",
           "dispatch_us_per_step", "speedup", "efficiency", "backend", "cost_model",
           # projected rows' pricing (harness.perf_model.projection_columns); NaN / "" on measured rows and older files
           "comm_exposed_s", "comm_no_overlap_s", "latency_no_overlap_s", "exposed_comm_no_overlap", "latency_nccl_s", "latency_low_latency_s",
           "all_reduce_bytes", "all_reduce_pricing", "all_reduce_algorithms", "latency_figures"]
NUMERIC = ["batch", "prompt", "steps", "world_size", "latency_s", "latency_p90_s", "null_latency_s", "exposed_comm", "tokens_per_s",
           "peak_memory_bytes", "collectives_per_step", "comm_bytes_per_step", "dispatch_us_per_call", "dispatch_fraction",
           "dispatch_us_per_step", "speedup", "efficiency", "comm_exposed_s", "comm_no_overlap_s", "latency_no_overlap_s",
           "exposed_comm_no_overlap", "latency_nccl_s", "latency_low_latency_s", "all_reduce_bytes"]
TEXT = ["implementation", "preset", "phase", "device", "dtype", "backend", "cost_model", "all_reduce_pricing", "all_reduce_algorithms",
        "latency_figures"]


def truthy(v) -> bool:
    return v is True or v is np.True_ or str(v).strip().lower() in ("true", "1", "1.0")


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def normalise(results: pd.DataFrame | None) -> pd.DataFrame:
    r = (results if results is not None else pd.DataFrame()).copy().reset_index(drop=True)
    for col in COLUMNS:
        if col not in r:
            r[col] = np.nan
    r = r[COLUMNS + [c for c in r.columns if c not in COLUMNS]]
    for col in NUMERIC:
        r[col] = pd.to_numeric(r[col], errors="coerce").astype(float)
    for col in TEXT:
        r[col] = r[col].map(_text).astype(object)
    r["projected"] = r["projected"].map(truthy).astype(bool)
    # a row without a status is ok only if it carries a latency
    status = r["status"].map(lambda v: str(v).strip().lower() if isinstance(v, str) else "")
    r["status"] = [s if s in ("ok", "failed") else ("ok" if np.isfinite(lat) else "failed") for s, lat in zip(status, r["latency_s"])]
    r["error"] = r["error"].map(_text).astype(object)
    return r


def ok_points(r: pd.DataFrame) -> pd.DataFrame:
    return r[(r["status"] == "ok") & np.isfinite(r["world_size"])]


def add_speedups(frame):
    """speedup = latency of the same point (harness.points.shape_key: all of POINT_KEY but the
    world size) measured at world size 1 / latency(n); efficiency = speedup / n."""
    if frame.empty or "latency_s" not in frame:
        return frame
    keys = shape_key()
    k = key_frame(frame, keys)
    ok = k[k["status"] == "ok"]
    base = ok[(ok["world_size"] == 1) & ~ok["projected"].astype(bool)].set_index(keys)["latency_s"]
    frame["speedup"] = [base.get(tuple(r[c] for c in keys), float("nan")) / r["latency_s"] if r["status"] == "ok" else float("nan")
                        for _, r in k.iterrows()]
    frame["efficiency"] = frame["speedup"] / frame["world_size"]
    return frame


def summary(r: pd.DataFrame, verdict: str) -> dict:
    ok = r[r["status"] == "ok"]
    return {
        "verdict": verdict,
        "n_points": len(r), "n_ok": len(ok), "n_measured": int((~ok["projected"]).sum()), "n_projected": int(ok["projected"].sum()),
        "n_failed": int((r["status"] == "failed").sum()),
        "world_sizes": sorted(int(w) for w in r["world_size"].dropna().unique()),
        "devices": [d for d in dict.fromkeys(r["device"]) if d],
        "implementations": [i for i in dict.fromkeys(r["implementation"]) if i],
        # stacks known only through the protocol: their exposed communication cannot be measured (harness/protocol_sweep.py)
        "outside_implementations": [i for i in dict.fromkeys(r["implementation"]) if i and i not in BUILT_IN],
    }


def latency_breakdown(ok: pd.DataFrame) -> pd.DataFrame:
    lat, null = ok["latency_s"], ok["null_latency_s"]
    # without a null-communicator time the latency cannot be split: all of it is compute
    compute = null.where(np.isfinite(null), lat).clip(lower=0)
    comm = (lat - null).clip(lower=0).where(np.isfinite(null), 0.0)
    dispatch = (ok["dispatch_us_per_step"] * 1e-6).where(np.isfinite(ok["dispatch_us_per_step"]), 0.0).clip(lower=0)
    return pd.DataFrame({"compute": compute, "exposed comm": comm, "dispatch": dispatch}, index=ok.index).fillna(0.0)


def _with_latency(f: pd.DataFrame) -> pd.DataFrame:
    f = f.copy()
    f["latency_s"] = pd.to_numeric(f["latency_s"], errors="coerce").astype(float) if "latency_s" in f else np.nan
    return f


def _successful(frame: pd.DataFrame) -> pd.DataFrame:
    return frame[frame["status"].astype(str).str.lower() == "ok"] if "status" in frame else frame


def baseline_comparison(r: pd.DataFrame, baseline: pd.DataFrame) -> tuple[pd.DataFrame, dict]:
    """(joined rows with latency_s, latency_s_base, projected, projected_base, ratio; counts
    {"n_now", "n_base", "n_joined", "keys"}) for a normalised `r`."""
    base = _successful(_with_latency(key_frame(baseline)))
    base = base.assign(projected=base["projected"].map(truthy).astype(bool) if "projected" in base else False)
    # one baseline row per point; where a point was both measured and projected, the measurement
    base = base[np.isfinite(base["latency_s"])].sort_values("projected", ascending=False, kind="stable").drop_duplicates(POINT_KEY, keep="last")
    now = _with_latency(r[r["status"] == "ok"])
    now = now[np.isfinite(now["latency_s"])]
    j = join_points(now, base[POINT_KEY + ["latency_s", "projected"]])
    j = j.assign(ratio=j["latency_s"] / j["latency_s_base"])
    return j, {"n_now": len(now), "n_base": len(base), "n_joined": len(j), "keys": POINT_KEY}


def projection_errors(r: pd.DataFrame, baseline: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per (projection, measurement) of the same point (harness.points.POINT_KEY): this run's
    projections and, when given, the baseline's, against this run's measurements.
    error = projected latency / measured latency - 1 (positive: the projection was too slow)."""
    measured = _with_latency(r[(r["status"] == "ok") & ~r["projected"]])
    sources = [("this run", r[(r["status"] == "ok") & r["projected"]])]
    if baseline is not None and "projected" in baseline:
        sources.append(("baseline", _successful(baseline[baseline["projected"].map(truthy)])))
    cols = POINT_KEY + ["latency_s", "exposed_comm", "cost_model"]
    out = []
    for name, proj in sources:
        proj = _with_latency(key_frame(proj))
        for c in ("exposed_comm", "cost_model"):
            if c not in proj:
                proj[c] = np.nan
        j = join_points(measured[cols], proj[cols], suffixes=("_measured", "_projected"))
        j = j[np.isfinite(j["latency_s_measured"]) & np.isfinite(j["latency_s_projected"])]
        out.append(j.assign(projection=name, error=j["latency_s_projected"] / j["latency_s_measured"] - 1))
    return pd.concat(out, ignore_index=True) if out else pd.DataFrame()


def regressions(results: pd.DataFrame, baseline: pd.DataFrame, threshold: float) -> pd.DataFrame:
    """Measured points of `results` joined with the same measured points of `baseline`, with
    ratio = latency now / baseline and allowed = max(threshold, 3x the summed p90/median spreads
    of both runs): a slowdown within the noise is not a regression."""
    now = results[(results["status"] == "ok") & ~results["projected"].astype(bool)]
    base = baseline[(baseline["status"] == "ok") & ~baseline["projected"].astype(bool)]
    j = join_points(now, base)
    p90 = lambda side: j.get(f"latency_p90_s{side}", j[f"latency_s{side}"])  # noqa: E731  (no p90 recorded: no spread known)
    spread = (p90("") / j["latency_s"] - 1).clip(lower=0) + (p90("_base") / j["latency_s_base"] - 1).clip(lower=0)
    return j.assign(ratio=j["latency_s"] / j["latency_s_base"], allowed=(3 * spread).clip(lower=threshold))


def projection_variants(r: pd.DataFrame) -> pd.DataFrame:
    """Projected points priced each way: with overlap (the row's latency) and without (every
    transfer in sequence), and, for decode, with NCCL and with the low-latency all-reduce. Speedups
    divide the same measured world-size-1 latency as add_speedups; one row per projected point with
    speedup, speedup_no_overlap, exposed_comm, exposed_comm_no_overlap, speedup_nccl, speedup_low_latency
    (the last two NaN for prefill, where all-reduces are always priced on NCCL)."""
    keys = shape_key()
    k = key_frame(r, keys)
    ok = k[(k["status"] == "ok")]
    base = ok[(ok["world_size"] == 1) & ~ok["projected"]].set_index(keys)["latency_s"]
    proj = ok[ok["projected"] & np.isfinite(ok["latency_no_overlap_s"])]
    if proj.empty:
        return pd.DataFrame()
    one = np.array([base.get(tuple(row[c] for c in keys), np.nan) for _, row in proj.iterrows()], dtype=float)
    decode = (proj["phase"] == "decode").to_numpy()
    out = proj[[*POINT_KEY, "all_reduce_pricing", "all_reduce_algorithms", "latency_figures", "exposed_comm", "exposed_comm_no_overlap",
                "comm_exposed_s", "comm_no_overlap_s"]].copy()
    out["speedup"] = one / proj["latency_s"].to_numpy(float)
    out["speedup_no_overlap"] = one / proj["latency_no_overlap_s"].to_numpy(float)
    out["speedup_nccl"] = np.where(decode, one / proj["latency_nccl_s"].to_numpy(float), np.nan)
    out["speedup_low_latency"] = np.where(decode, one / proj["latency_low_latency_s"].to_numpy(float), np.nan)
    return out.reset_index(drop=True)


def latency_assumptions(cost_model: dict | None) -> pd.DataFrame:
    """The latency figures a stored cost model (CostModel.to_dict) prices with: one row per table
    (op, algorithm, world_size, points, source) and one per alpha-beta op (points "alpha-beta")."""
    from .perf_model import CostModel

    if not cost_model:
        return pd.DataFrame()
    model = CostModel.from_dict(cost_model)
    rows = [{**t, "points": "; ".join(f"{b:,} B: {us:.3g} us" for b, us in t["points"])} for t in model.sources()]
    rows += [{"op": op, "algorithm": "nccl", "world_size": "any without a table", "points": f"alpha-beta: {p.latency_us:.3g} us + bytes x factor / {p.busbw_GBps:.4g} GB/s",
              "source": model.source or "fitted"} for op, p in model.ops.items()]
    return pd.DataFrame(rows)


def collectives_frame(collectives: dict | None) -> pd.DataFrame:
    return pd.DataFrame((collectives or {}).get("rows") or [])


__all__ = ["COLUMNS", "NUMERIC", "TEXT", "add_speedups", "baseline_comparison", "collectives_frame", "latency_assumptions", "latency_breakdown",
           "normalise", "ok_points", "projection_errors", "projection_variants", "regressions", "summary", "truthy"]
