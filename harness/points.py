"""The schema of a sweep point: which columns identify it, and how frames of points are joined.

A point (a row of harness.sweep.run_sweep's frame, of a results.csv, or of a baseline) is
identified by POINT_KEY: implementation, preset, phase, the workload (batch, prompt, steps),
world_size, device and dtype. Two rows are the same point only if all of these agree: a
latency measured in another dtype or on another device is another experiment, never a
regression or a projection error of this one. A key column a frame lacks (an older or a
hand-written results file) reads as unknown ("" / NaN) and matches no known value, so such rows
are left unmatched rather than compared across what may be different dtypes (two unknowns do
match: both frames then lack the column alike).

`projected` is not part of the key: it says how a point's latency was obtained. Each
comparison picks its sides by it (a speedup's base and a regression's sides are measured
points; a projection error joins a projected row with the measured row of the same key).
SHAPE_KEY is POINT_KEY without world_size: the points a speedup divides by each other.
"""
from __future__ import annotations

import math

import pandas as pd

POINT_KEY = ["implementation", "preset", "phase", "batch", "prompt", "steps", "world_size", "device", "dtype"]
NUMERIC_KEY = ("batch", "prompt", "steps", "world_size")


def shape_key() -> list[str]:
    return [k for k in POINT_KEY if k != "world_size"]


def _text(v) -> str:
    return "" if v is None or (isinstance(v, float) and math.isnan(v)) else str(v)


def key_frame(frame: pd.DataFrame, keys: list[str] | None = None) -> pd.DataFrame:
    """A copy of `frame` whose key columns are comparable across frames read from anywhere:
    numeric ones as float (NaN where missing or unparsable), text ones as str ("" where missing)."""
    f = frame.copy()
    for k in POINT_KEY if keys is None else keys:
        if k in NUMERIC_KEY:
            f[k] = pd.to_numeric(f[k], errors="coerce").astype(float) if k in f else math.nan
        else:
            f[k] = f[k].map(_text).astype(object) if k in f else ""
    return f


def join_points(left: pd.DataFrame, right: pd.DataFrame, suffixes=("", "_base"), keys: list[str] | None = None) -> pd.DataFrame:
    """Inner join of two frames of points on POINT_KEY (or `keys`), after key_frame: a column
    unknown on one side ("" / NaN) matches no known value on the other."""
    keys = POINT_KEY if keys is None else keys
    return key_frame(left, keys).merge(key_frame(right, keys), on=keys, how="inner", suffixes=suffixes)


__all__ = ["NUMERIC_KEY", "POINT_KEY", "join_points", "key_frame", "shape_key"]
