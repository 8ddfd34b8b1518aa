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
    duration_s, message, implementation (the spec a test recorded judging, harness.runner;
    missing or None for every other test).
  Candidate and peers: run["implementations"] (--impl) names the candidate first, then its
    peers. A peer's tests are those recording a peer's name, its metric rows those naming one
    explicitly (rows without an implementation, the layer suites', are never a peer's, even
    when `reference` is a peer). The verdict and the top-level counts leave peers out; every
    implementation gets its own role, verdict, counts and findings (each failed row's or test's
    reason) in summary["implementations"] and the "Results per implementation" table.
  Verdict: PASS iff there is at least one (non-peer) test, every outcome is passed or skipped,
    at least one passed, and every (non-peer) metrics row passed (a row whose `passed` is
    missing counts as failed). An empty metrics frame does not fail the verdict by itself; the
    summary says so. A peer's verdict is the same rule over its own tests and rows.
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
TEST_COLUMNS = ["nodeid", "outcome", "duration_s", "message", "implementation"]
DTYPE_ORDER = ["float32", "bfloat16", "float16"]
BOUND_FORMULA = "2*E1 + (tp+1)*u*max S  (S: the computation on absolute values; model rows: S = sqrt(tp)*max|y*|)"
BUDGET_FLOOR = 1e-4  # budget_used below this (including exact 0) is drawn at the floor on the log axis
OK_OUTCOMES = {"passed", "skipped"}
MAX_MESSAGE = 4000  # hypothesis failure messages can be very long; the full text stays in results.json
REPORT_KIND = "correctness"
DEFAULT_IMPLEMENTATION = "reference"  # the layer and model suites judge tpgate's own impl/


def _normalise(metrics: pd.DataFrame, tests: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame, pd.Series]:
    """(metrics, tests) in the report's columns, and which metric rows named their implementation."""
    m = metrics.drop(columns=["collectives"], errors="ignore").copy()
    for col in METRIC_COLUMNS:
        if col not in m:
            m[col] = np.nan
    m = m[METRIC_COLUMNS + [c for c in m.columns if c not in METRIC_COLUMNS]]
    named = m["implementation"].notna()
    m["implementation"] = m["implementation"].where(named, DEFAULT_IMPLEMENTATION).astype(str)
    # NaN / missing `passed` must never read as a pass
    m["passed"] = m["passed"].map(lambda v: v is True or v is np.True_ or str(v).lower() in ("true", "1", "1.0"))
    for col in ["max_abs", "max_rel", "ulp", "err_single", "err_tp", "bound", "budget_used", "world_size"]:
        m[col] = pd.to_numeric(m[col], errors="coerce")
    t = tests.copy()
    for col in TEST_COLUMNS:
        if col not in t:
            t[col] = np.nan
    t["message"] = t["message"].fillna("").astype(str)
    t["implementation"] = t["implementation"].astype(object).where(t["implementation"].notna(), None)
    return m, t, named


def peer_masks(m: pd.DataFrame, t: pd.DataFrame, named: pd.Series, run: dict) -> tuple[pd.Series, pd.Series]:
    """(metric rows, tests) that are a peer's: rows naming a peer explicitly, tests recording one."""
    peers = list(run.get("implementations") or [])[1:]
    return named & m["implementation"].isin(peers), t["implementation"].isin(peers)


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


def _verdict(m: pd.DataFrame, t: pd.DataFrame) -> bool:
    outcomes = t["outcome"].fillna("missing").astype(str)
    return len(t) > 0 and bool(outcomes.isin(OK_OUTCOMES).all()) and bool((outcomes == "passed").any()) and bool(m["passed"].all())


def _summary(m: pd.DataFrame, t: pd.DataFrame, ex: pd.DataFrame, peer_rows: pd.Series, peer_tests: pd.Series, run: dict) -> dict:
    """The candidate's verdict and counts (peers' rows and tests left out), and per implementation
    its role, verdict, counts and findings."""
    mine_m, mine_t = m[~peer_rows], t[~peer_tests]
    mine_ex = ex[ex["test"].isin(set(mine_m["test"].fillna("?")))] if len(ex) else ex
    outcomes = mine_t["outcome"].fillna("missing").astype(str)
    n_passed = int((outcomes == "passed").sum())
    n_failed = int((~outcomes.isin(OK_OUTCOMES)).sum())
    budget = mine_m["budget_used"].replace([np.inf, -np.inf], np.nan)
    notes = []
    if len(mine_t) == 0:
        notes.append("No tests were recorded.")
    elif n_passed == 0:
        notes.append("No test passed (all skipped?).")
    if mine_m.empty:
        notes.append("No metric rows were recorded: the verdict rests on test outcomes alone.")
    if not np.isfinite(mine_m["budget_used"]).all():
        notes.append("Some rows have no finite budget (shape mismatch or zero bound); they count as failed.")
    implementations = list(run.get("implementations") or [])
    verdict = _verdict(mine_m, mine_t)
    return {
        "verdict": "PASS" if verdict else "FAIL",
        "candidate": implementations[0] if implementations else None, "peers": implementations[1:],
        "n_tests": len(mine_t), "n_passed": n_passed, "n_failed": n_failed,
        "n_skipped": int((outcomes == "skipped").sum()),
        "n_examples": len(mine_ex), "n_examples_failed": int((~mine_ex["passed"]).sum()) if len(mine_ex) else 0,
        "n_rows": len(mine_m), "n_rows_failed": int((~mine_m["passed"]).sum()),
        "max_budget_used": None if budget.dropna().empty else float(budget.max()),  # over finite values only
        "n_budget_nonfinite": int((~np.isfinite(mine_m["budget_used"])).sum()),
        "n_peer_tests": int(peer_tests.sum()), "n_peer_tests_failed": int((~t[peer_tests]["outcome"].isin(OK_OUTCOMES)).sum()),
        "implementations": _per_implementation(m, t, ex, peer_rows, peer_tests, implementations, verdict),
        "notes": notes,
    }


def _reason(row) -> str:
    """Why a failed metric row failed: the implementation's error (its Unsupported reason, what it
    raised), or the comparison that failed."""
    error = row.get("error")
    if isinstance(error, str) and error:
        return error
    if pd.notna(row["err_tp"]) and pd.notna(row["bound"]) and row["err_tp"] > row["bound"]:
        return f"{row['tensor']}: error {row['err_tp']:.3g} over its bound {row['bound']:.3g}"
    if row["ranks_consistent"] is False:
        return f"{row['tensor']}: ranks disagree"
    return f"{row['tensor']}: failed"


def _per_implementation(m: pd.DataFrame, t: pd.DataFrame, ex: pd.DataFrame, peer_rows: pd.Series, peer_tests: pd.Series,
                        implementations: list[str], verdict: bool) -> dict:
    """{implementation: role, verdict, its tests, examples and tensors and how many of each failed,
    and its findings [{test, tp, reason}]}, for the run's implementations in their order, then any
    other met in the rows. Roles: "candidate" (its verdict is the report's, over every test and
    row that is not a peer's), "peer" (its own tests and rows), "suites" (tpgate's own stack
    judged by the layer suites' unnamed rows when it is not named itself)."""
    peers = implementations[1:]
    out = {}
    for impl in dict.fromkeys([*implementations, *m["implementation"]]):
        is_peer = impl in peers
        rows = m[(m["implementation"] == impl) & (peer_rows if is_peer else ~peer_rows)]
        if is_peer:
            tests = t[t["implementation"] == impl]
        elif implementations and impl == implementations[0]:
            tests = t[~peer_tests]
        else:
            tests = t[~peer_tests & t["nodeid"].isin(set(rows["test"]))]
        examples = ex[(ex["implementation"] == impl) & ex["test"].isin(set(rows["test"].fillna("?")))] if len(ex) else ex
        failed_by_rows = set(rows.loc[~rows["passed"], "test"].fillna("?"))
        failed_tests = set(tests.loc[~tests["outcome"].isin(OK_OUTCOMES), "nodeid"]) | failed_by_rows
        findings = [{"test": str(r["test"]), "tp": None if pd.isna(r["world_size"]) else int(r["world_size"]), "reason": _reason(r)}
                    for _, r in rows[~rows["passed"]].iterrows()]
        findings += [{"test": str(r["nodeid"]), "tp": None, "reason": _last_line(r["message"])} for _, r in tests.iterrows()
                     if r["outcome"] not in OK_OUTCOMES and r["nodeid"] not in failed_by_rows]
        role = "peer" if is_peer else "candidate" if implementations and impl == implementations[0] else "suites"
        passed = verdict if role == "candidate" else (_verdict(rows, tests) if len(tests) else len(rows) > 0 and bool(rows["passed"].all()))
        out[impl] = {"role": role, "verdict": "PASS" if passed else "FAIL",
                     "n_tests": len(set(tests["nodeid"]) | set(rows["test"].fillna("?"))), "n_tests_failed": len(failed_tests),
                     "n_examples": len(examples), "n_examples_failed": int((~examples["passed"]).sum()) if len(examples) else 0,
                     "n_rows": len(rows), "n_rows_failed": int((~rows["passed"]).sum()), "findings": findings}
    return out


def _last_line(message: str) -> str:
    lines = [line for line in str(message).splitlines() if line.strip()]
    return lines[-1][:MAX_MESSAGE] if lines else "failed"


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
    missing = [c for c in run.get("checkpoints_required") or [] if c not in (run.get("checkpoints") or [])]
    if missing:
        notes.append(f"Candidate judged on checkpoints {', '.join(run['checkpoints'])}, without {', '.join(missing)}: not evidence for the gate.")
    return notes


def write_correctness_report(metrics: pd.DataFrame, tests: pd.DataFrame, environment: dict, out_dir: str | Path,
                             tolerance_doc: str, run: dict | None = None) -> dict:
    out_dir = Path(out_dir).resolve()
    m, t, named = _normalise(metrics, tests)
    ex = _examples(m)
    peer_rows, peer_tests = peer_masks(m, t, named, run or {})
    summary = _summary(m, t, ex, peer_rows, peer_tests, run or {})
    summary["notes"] += _run_notes(run or {})
    tpl_env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True,
                                 undefined=jinja2.StrictUndefined, trim_blocks=True, lstrip_blocks=True)
    html = tpl_env.get_template("correctness.html.j2").render(
        summary=summary, matrix=_matrix(ex), budget_plot=_budget_plot(m), ulp_plot=_ulp_plot(m),
        tolerance_table=_tolerance_table(m), tolerance_doc=tolerance_doc or "", bound_formula=BOUND_FORMULA,
        worst_table=_worst_table(m), failed_tests_table=_failed_tests_table(t), env_table=_env_table(environment),
        implementations=(run or {}).get("implementations") or list(summary["implementations"]),
        checkpoints=(run or {}).get("checkpoints") or [], peer_checkpoints=(run or {}).get("peer_checkpoints") or [],
        budget_floor=BUDGET_FLOOR)
    payload = {"kind": REPORT_KIND, "verdict": summary["verdict"], "summary": summary, "run": run or {}, "environment": environment,
               "tests": t.to_dict(orient="records"), "metrics": m.to_dict(orient="records")}

    publish_report(out_dir, {"results.csv": m.to_csv(index=False),
                             "results.json": json.dumps(_json_safe(payload), indent=1, default=str, allow_nan=False),
                             "index.html": html.encode("utf-8")})
    return {"verdict": summary["verdict"], "n_tests": summary["n_tests"], "n_failed": summary["n_failed"],
            "n_examples": summary["n_examples"], "out_dir": str(out_dir), "index": str(out_dir / "index.html"),
            "peers": {impl: summary["implementations"][impl]["verdict"] for impl in summary["peers"] if impl in summary["implementations"]}}
