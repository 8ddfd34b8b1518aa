"""The correctness report: metrics + test outcomes -> results.csv, results.json, index.html.

`write_correctness_report(metrics, tests, environment, out_dir, tolerance_doc)`:
  metrics: one row per compared tensor (columns of harness.equivalence rows plus `test`, the
    pytest node id). A `collectives` column, if present, is dropped: it is per-example detail
    the report does not use. Missing columns are tolerated (filled with NaN), except
    `implementation` (the harness.implementations spec the row judged, written by
    suites/model/test_implementations.py): a row without one is tpgate's own stack, "reference"
    (DEFAULT_IMPLEMENTATION). The matrix, the worst-tensor table and the summary's
    "implementations" are per implementation.
  tests: one row per pytest test: nodeid, outcome ("passed"/"failed"/"skipped"/"error"),
    duration_s, message.
  Verdict: PASS iff there is at least one test, every outcome is passed or skipped, at least
    one passed, and every metrics row passed (a row whose `passed` is missing counts as failed).
    An empty metrics frame does not fail the verdict by itself; the summary says so.
  run: what was run, for the gate to judge what the verdict is evidence of (harness.runner's
    run record: selection, examples, device, git commit, dirty flag and source digest); stored as results.json's
    "run", and a partial selection or reduced example count is noted on the page.
  Output: out_dir is replaced as a whole (built in a sibling staging directory, then
    published with publish_dir_atomic), so anything else in out_dir is removed and a reader
    sees either the old report or the new one, never a mix. results.json carries "kind":
    "correctness" (REPORT_KIND), which harness.atomic.check_report_out recognises.
  index.html is self-contained (inline CSS, plots as base64 PNG data URIs) and rendered from
  templates/correctness.html.j2 with autoescape on; tables come from DataFrame.to_html
  (escaped by pandas) and are inserted with |safe.
"""
from __future__ import annotations

import base64
import io
import json
import math
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # headless: the report is built on CI boxes and GPU nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402

from .atomic import publish_report  # noqa: E402
from .tolerance import UNIT_ROUNDOFF  # noqa: E402

TEMPLATE_DIR = Path(__file__).parent / "templates"
METRIC_COLUMNS = ["implementation", "layer", "dtype", "seed", "batch", "seq", "params", "world_size", "case", "tensor", "max_abs", "max_rel",
                  "ulp", "err_single", "err_tp", "bound", "budget_used", "passed", "ranks_consistent", "test"]
TEST_COLUMNS = ["nodeid", "outcome", "duration_s", "message"]
DTYPE_ORDER = ["float32", "bfloat16", "float16"]
BOUND_FORMULA = "2*E1 + (tp+1)*u*max S  (S: the computation on absolute values; model rows: S = sqrt(tp)*max|y*|)"
BUDGET_FLOOR = 1e-4  # budget_used below this (including exact 0) is drawn at the floor on the log axis
OK_OUTCOMES = {"passed", "skipped"}
MAX_MESSAGE = 4000  # hypothesis failure messages can be very long; the full text stays in results.json
REPORT_KIND = "correctness"
DEFAULT_IMPLEMENTATION = "reference"  # the layer and model suites judge tpgate's own impl/


def _normalise(metrics: pd.DataFrame, tests: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    m = metrics.drop(columns=["collectives"], errors="ignore").copy()
    for col in METRIC_COLUMNS:
        if col not in m:
            m[col] = np.nan
    m = m[METRIC_COLUMNS + [c for c in m.columns if c not in METRIC_COLUMNS]]
    m["implementation"] = m["implementation"].where(m["implementation"].notna(), DEFAULT_IMPLEMENTATION).astype(str)
    # NaN / missing `passed` must never read as a pass
    m["passed"] = m["passed"].map(lambda v: v is True or v is np.True_ or str(v).lower() in ("true", "1", "1.0"))
    for col in ["max_abs", "max_rel", "ulp", "err_single", "err_tp", "bound", "budget_used", "world_size"]:
        m[col] = pd.to_numeric(m[col], errors="coerce")
    t = tests.copy()
    for col in TEST_COLUMNS:
        if col not in t:
            t[col] = np.nan
    t["message"] = t["message"].fillna("").astype(str)
    return m, t


def _dtype_order(values) -> list[str]:
    present = {str(v) for v in values if pd.notna(v)}
    return [d for d in DTYPE_ORDER if d in present] + sorted(present - set(DTYPE_ORDER))


def _examples(m: pd.DataFrame) -> pd.DataFrame:
    """One row per example (distinct test, case): passed iff all its tensors passed."""
    if m.empty:
        return pd.DataFrame(columns=["test", "case", "implementation", "layer", "world_size", "dtype", "passed"])
    keys = m[["test", "case"]].fillna("?")
    return (m.assign(test=keys["test"], case=keys["case"])
             .groupby(["test", "case", "implementation"], sort=False)
             .agg(layer=("layer", "first"), world_size=("world_size", "first"), dtype=("dtype", "first"), passed=("passed", "all"))
             .reset_index())


def _summary(m: pd.DataFrame, t: pd.DataFrame, ex: pd.DataFrame) -> dict:
    outcomes = t["outcome"].fillna("missing").astype(str)
    n_passed = int((outcomes == "passed").sum())
    n_failed = int((~outcomes.isin(OK_OUTCOMES)).sum())
    pass_ = len(t) > 0 and n_failed == 0 and n_passed > 0 and bool(m["passed"].all())
    budget = m["budget_used"].replace([np.inf, -np.inf], np.nan)
    notes = []
    if len(t) == 0:
        notes.append("No tests were recorded.")
    elif n_passed == 0:
        notes.append("No test passed (all skipped?).")
    if m.empty:
        notes.append("No metric rows were recorded: the verdict rests on test outcomes alone.")
    if not np.isfinite(m["budget_used"]).all():
        notes.append("Some rows have no finite budget (shape mismatch or zero bound); they count as failed.")
    return {
        "verdict": "PASS" if pass_ else "FAIL",
        "n_tests": len(t), "n_passed": n_passed, "n_failed": n_failed,
        "n_skipped": int((outcomes == "skipped").sum()),
        "n_examples": len(ex), "n_examples_failed": int((~ex["passed"]).sum()) if len(ex) else 0,
        "n_rows": len(m), "n_rows_failed": int((~m["passed"]).sum()),
        "max_budget_used": None if budget.dropna().empty else float(budget.max()),  # over finite values only
        "n_budget_nonfinite": int((~np.isfinite(m["budget_used"])).sum()),
        "implementations": _per_implementation(m, ex),
        "notes": notes,
    }


def _per_implementation(m: pd.DataFrame, ex: pd.DataFrame) -> dict:
    """{implementation: its examples, tensors and tests, and how many of each failed}, in the order first met."""
    out = {}
    for impl in dict.fromkeys(m["implementation"]):
        rows, examples = m[m["implementation"] == impl], ex[ex["implementation"] == impl]
        tests = rows.groupby(rows["test"].fillna("?"), sort=False)["passed"].all()
        out[impl] = {"n_examples": len(examples), "n_examples_failed": int((~examples["passed"]).sum()),
                     "n_rows": len(rows), "n_rows_failed": int((~rows["passed"]).sum()),
                     "n_tests": len(tests), "n_tests_failed": int((~tests).sum())}
    return out


def _matrix(ex: pd.DataFrame) -> dict:
    """(implementation, layer) x (world_size, dtype) grid of passed/total examples, as plain data for the template."""
    sizes = sorted(int(w) for w in ex["world_size"].dropna().unique())
    dtypes = _dtype_order(ex["dtype"])
    layer = ex["layer"].fillna("?").astype(str)
    keys = list(dict.fromkeys(zip(ex["implementation"].astype(str), layer)))
    keys.sort(key=lambda k: k[0] != DEFAULT_IMPLEMENTATION)  # tpgate's own stack first, the others in the order run (stable)
    rows = []
    for impl, name in keys:
        cells = []
        for ws in sizes:
            for dt in dtypes:
                sel = ex[(ex["implementation"] == impl) & (layer == name) & (ex["world_size"] == ws) & (ex["dtype"] == dt)]
                n, ok = len(sel), int(sel["passed"].sum())
                cells.append({"text": f"{ok}/{n}" if n else "–", "cls": "none" if not n else ("ok" if ok == n else "bad")})
        rows.append({"implementation": impl, "layer": name, "cells": cells})
    return {"sizes": sizes, "dtypes": dtypes, "rows": rows}


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _budget_plot(m: pd.DataFrame) -> str | None:
    """Strip plot of budget_used per world size, one panel per dtype, acceptance line at 1."""
    if m.empty:
        return None
    dtypes = _dtype_order(m["dtype"])
    sizes = sorted(int(w) for w in m["world_size"].dropna().unique())
    finite = m["budget_used"][np.isfinite(m["budget_used"])]
    top = max(10.0, float(finite.max()) * 2 if len(finite) else 10.0)  # non-finite budgets are drawn at the top
    rng = np.random.default_rng(0)  # fixed jitter: the same data gives the same picture
    fig, axes = plt.subplots(1, len(dtypes), figsize=(4.2 * len(dtypes), 3.6), sharey=True, squeeze=False)
    for ax, dt in zip(axes[0], dtypes):
        d = m[m["dtype"] == dt]
        for i, ws in enumerate(sizes):
            s = d[d["world_size"] == ws]
            y = s["budget_used"].clip(lower=BUDGET_FLOOR).where(np.isfinite(s["budget_used"]), top).to_numpy()
            x = i + rng.uniform(-0.28, 0.28, len(y))
            ok = s["passed"].to_numpy()
            ax.scatter(x[ok], y[ok], s=9, alpha=0.45, color="#2b8a3e", linewidths=0)
            ax.scatter(x[~ok], y[~ok], s=30, marker="x", color="#c92a2a")
        ax.axhline(1.0, color="#c92a2a", lw=1.2, ls="--")
        ax.text(len(sizes) - 0.5, 1.0, " bound", color="#c92a2a", va="bottom", ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_ylim(BUDGET_FLOOR / 2, top * 1.5)
        ax.set_xticks(range(len(sizes)), [f"tp={w}" for w in sizes])
        ax.set_xlim(-0.6, len(sizes) - 0.4)
        ax.set_title(f"{dt}  ({len(d)} tensors)", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both", lw=0.5)
    axes[0][0].set_ylabel(f"budget used = err_tp / bound\n(values < {BUDGET_FLOOR:g} drawn at floor)")
    fig.tight_layout()
    return _png(fig)


def _ulp_plot(m: pd.DataFrame) -> str | None:
    """Grouped bars: max ULP distance (TP vs single-device) per layer and dtype."""
    d = m[m["ulp"] >= 0]  # -1 marks a shape mismatch: no distance exists
    if d.empty:
        return None
    table = d.pivot_table(index="layer", columns="dtype", values="ulp", aggfunc="max", sort=False)
    table = table[_dtype_order(table.columns)]
    colours = {"float32": "#1c7ed6", "bfloat16": "#f08c00", "float16": "#7048e8"}
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(table) + 2), 3.4))
    width = 0.8 / len(table.columns)
    x = np.arange(len(table))
    for j, dt in enumerate(table.columns):
        vals = table[dt].to_numpy(dtype=float)
        bars = ax.bar(x + (j - (len(table.columns) - 1) / 2) * width, np.nan_to_num(vals), width, label=dt, color=colours.get(dt))
        for b, v in zip(bars, vals):
            if not math.isnan(v):
                ax.annotate(f"{int(v)}" if v < 1e5 else f"{v:.2g}", (b.get_x() + b.get_width() / 2, max(v, 0)), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("symlog", linthresh=1)  # 0 ULP (bitwise equal) must stay visible next to large distances
    ax.set_xticks(x, table.index)
    ax.set_ylabel("max ULP distance")
    ax.set_ylim(0, max(2.0, float(np.nanmax(table.to_numpy(dtype=float)))) * 3)
    ax.legend(fontsize=8, frameon=False, ncols=len(table.columns), loc="upper left")
    ax.grid(axis="y", alpha=0.3, lw=0.5)
    fig.tight_layout()
    return _png(fig)


def _tolerance_table(m: pd.DataFrame) -> str:
    sizes = sorted(int(w) for w in m["world_size"].dropna().unique()) or [1, 2, 4]
    rows = []
    for name in _dtype_order(list(m["dtype"].dropna().unique()) + DTYPE_ORDER):
        u = next((v for k, v in UNIT_ROUNDOFF.items() if str(k).removeprefix("torch.") == name), None)
        row = {"dtype": name, "unit roundoff u": f"2^{round(math.log2(u))} = {u:.3g}" if u else "?", "bound": BOUND_FORMULA}
        for tp in sizes:
            row[f"rounding term / max S at tp={tp}"] = f"{(tp + 1) * u:.3g}" if u else "?"
        rows.append(row)
    return pd.DataFrame(rows).to_html(index=False, classes="data", border=0)


def _fmt(v) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def _worst_table(m: pd.DataFrame, n: int = 20) -> str | None:
    if m.empty:
        return None
    # failed rows first (a rank-inconsistent row can fail with a small budget), then by budget; NaN counts as worst
    key = m["budget_used"].fillna(np.inf)
    order = pd.DataFrame({"f": ~m["passed"], "k": key}).sort_values(["f", "k"], ascending=False).index[:n]
    # layer and dtype are the head of `case` ("row[bfloat16 seed=..."), so they get no columns of their own
    cols = ["implementation", "world_size", "tensor", "budget_used", "err_tp", "bound", "err_single", "max_abs", "max_rel",
            "ulp", "ranks_consistent", "passed", "case"]
    w = m.loc[order, cols].copy()
    w["passed"] = w["passed"].map({True: "PASS", False: "FAIL"})
    w = w.rename(columns={"implementation": "impl", "world_size": "tp", "ranks_consistent": "ranks agree"})  # narrow headers leave room for `case`
    return w.to_html(index=False, classes="data worst", border=0, float_format=_fmt, na_rep="—")


def _failed_tests_table(t: pd.DataFrame) -> str | None:
    bad = t[~t["outcome"].isin(OK_OUTCOMES)]
    if bad.empty:
        return None
    bad = bad[TEST_COLUMNS].assign(message=bad["message"].map(lambda s: s if len(s) <= MAX_MESSAGE else s[:MAX_MESSAGE] + "\n… (truncated; full text in results.json)"))
    # a formatter bypasses pandas' escaping of "\n" as a literal backslash-n (HTML escaping still applies)
    return bad.to_html(index=False, classes="data failed", border=0, float_format=_fmt, na_rep="—", formatters={"message": str})


def _env_table(environment: dict) -> str:
    env = pd.DataFrame([(k, "—" if v is None else str(v)) for k, v in environment.items()], columns=["key", "value"])
    return env.to_html(index=False, header=False, classes="data env", border=0)


def _json_safe(v):
    # results.json is strict JSON: NaN/inf become null, numpy arrays and scalars become Python ones
    if isinstance(v, np.ndarray):
        v = v.tolist()
    if isinstance(v, np.generic):
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    if isinstance(v, dict):
        return {str(k): _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    return v


def _run_notes(run: dict) -> list[str]:
    """Page notes for a run that is not the full release check (the gate treats it as no evidence)."""
    notes = []
    if run.get("pytest_args"):
        notes.append(f"Partial selection: pytest {' '.join(run['pytest_args'])} — a subset of the suites, not evidence for the gate.")
    if run.get("examples") is not None and run.get("examples_required") is not None and run["examples"] < run["examples_required"]:
        notes.append(f"Reduced run: {run['examples']} examples per property, the gate needs {run['examples_required']}.")
    return notes


def write_correctness_report(metrics: pd.DataFrame, tests: pd.DataFrame, environment: dict, out_dir: str | Path,
                             tolerance_doc: str, run: dict | None = None) -> dict:
    out_dir = Path(out_dir).resolve()
    m, t = _normalise(metrics, tests)
    ex = _examples(m)
    summary = _summary(m, t, ex)
    summary["notes"] += _run_notes(run or {})
    tpl_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = tpl_env.get_template("correctness.html.j2").render(
        summary=summary, matrix=_matrix(ex), budget_plot=_budget_plot(m), ulp_plot=_ulp_plot(m),
        tolerance_table=_tolerance_table(m), tolerance_doc=tolerance_doc or "", bound_formula=BOUND_FORMULA,
        worst_table=_worst_table(m), failed_tests_table=_failed_tests_table(t), env_table=_env_table(environment),
        implementations=(run or {}).get("implementations") or list(summary["implementations"]),
        budget_floor=BUDGET_FLOOR)
    payload = {"kind": REPORT_KIND, "verdict": summary["verdict"], "summary": summary, "run": run or {}, "environment": environment,
               "tests": t.to_dict(orient="records"), "metrics": m.to_dict(orient="records")}

    publish_report(out_dir, {"results.csv": m.to_csv(index=False),
                             "results.json": json.dumps(_json_safe(payload), indent=1, default=str, allow_nan=False),
                             "index.html": html.encode("utf-8")})
    return {"verdict": summary["verdict"], "n_tests": summary["n_tests"], "n_failed": summary["n_failed"],
            "n_examples": summary["n_examples"], "out_dir": str(out_dir), "index": str(out_dir / "index.html")}
