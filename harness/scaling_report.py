"""The scaling report: sweep results + gate -> results.csv, results.json, index.html; and the reports index.
Rendering only: the tables' figures (speedups, baseline ratios, projection errors, the latency
breakdown) come from harness.scaling_analysis; files are published with harness.atomic.publish_report.

`write_scaling_report(results, gate, environment, out_dir, baseline=None)`:
  results: the frame of harness.sweep.run_sweep (one row per point). Any column may be missing
    or NaN (missing ones are added as NaN); failed rows carry NaN metrics and an `error`.
    `projected` is true only for a literal true value (NaN / missing reads as measured).
  gate: harness.gate.evaluate_gate's dict ({"verdict", "criteria": [...]}); a missing verdict
    reads as INCOMPLETE.
  baseline: an earlier results frame (e.g. a committed results.csv). Successful rows of both are
    joined on harness.points.POINT_KEY (dtype and device included: latencies of different dtypes
    are not comparable; a baseline lacking a key column matches nothing) and shown as latency
    now / baseline.
  Output: out_dir is replaced as a whole (harness.atomic.publish_report),
    so a reader sees the old report or the new one, never a mix. results.json is strict JSON
    {"kind": "scaling", "gate", "environment", "rows", ...} (NaN -> null). index.html is self-contained: inline CSS,
    plots as base64 PNG data URIs, tables from DataFrame.to_html inserted with |safe, the rest
    autoescaped (templates/scaling.html.j2). Gate evidence is a link only when it is a relative
    reference (no scheme): anything else is shown as text, so the page never links off the disk.
  Projected points (a single rank's shard timed alone, collectives priced by a cost model) are
    drawn with hollow markers and dashed lines and never mixed with measured ones. Where a
    measured and a projected point share POINT_KEY (this run's projections, or the baseline's),
    the projection error (projected / measured - 1) is tabulated and stored in results.json.
  collectives: harness.scaling's {"rows": harness.collectives.bench_collectives rows, "world_sizes",
    "reason", "cost_model": the model projections used, with "source", "reason" and "fit"}; drawn as
    a table and latency/busbw plots, written as collectives.csv, stored in results.json.
  Layer benchmarks: a pytest-benchmark JSON named LAYER_BENCHMARKS in out_dir (written there by
    `nox -s benchmarks`) is carried into the new report directory and tabulated.

`write_index(reports_root)`: reports_root/index.html (atomic write) linking correctness/, scaling/
  and the gate (scaling/index.html#gate), each with the verdict read from that directory's
  results.json ("not run yet" when absent, "unreadable" when it cannot be parsed).
"""
from __future__ import annotations

import base64
import io
import json
import math
import re
from pathlib import Path

import jinja2
import matplotlib

matplotlib.use("Agg")  # headless: built on CI boxes and GPU nodes without a display
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import Patch  # noqa: E402
from matplotlib.ticker import FixedLocator, NullLocator  # noqa: E402

from .perf_model import DEFAULTS, CostModel  # noqa: E402
from .points import POINT_KEY  # noqa: E402
from .scaling_analysis import (baseline_comparison, collectives_frame, latency_assumptions, latency_breakdown, normalise, ok_points,  # noqa: E402
                               projection_errors, projection_variants, summary as summarise)
from .atomic import publish_report, write_text_atomic  # noqa: E402
from .report import _json_safe  # noqa: E402  (one strict-JSON converter for both reports)

TEMPLATE_DIR = Path(__file__).parent / "templates"
VERDICT_CLASS = {"GO": "GO", "NO-GO": "NOGO", "INCOMPLETE": "INCOMPLETE"}
CPU_WARNING = "CPU run (gloo, shared cores): not representative of GPUs"
MAX_ERROR = 2000
LAYER_BENCHMARKS = "layer-benchmarks.json"
PALETTE = ["#1c7ed6", "#e8590c", "#2b8a3e", "#7048e8", "#c2255c", "#0c8599", "#5c940d", "#495057"]
PARTS = [("compute", "#1c7ed6"), ("exposed comm", "#f08c00"), ("dispatch", "#7048e8")]


# --------------------------------------------------------------------------- data


def _fmt_num(v, spec=".3g", na="—") -> str:
    try:
        v = float(v)
    except (TypeError, ValueError):
        return na if v is None or v == "" else str(v)
    return na if not math.isfinite(v) else format(v, spec)


def _int(v) -> str:
    return _fmt_num(v, ".0f")


def _workload(row) -> str:
    """'batch 2 · prompt 64' (+ '· 16 steps' for decode)."""
    parts = [f"batch {_int(row['batch'])}", f"prompt {_int(row['prompt'])}"]
    if row["phase"] == "decode" and np.isfinite(row["steps"]):
        parts.append(f"{_int(row['steps'])} steps")
    return " · ".join(parts)


# --------------------------------------------------------------------------- plots


def _png(fig) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _panels(ok: pd.DataFrame) -> list[tuple[str, pd.DataFrame]]:
    """(title, rows) per (preset, phase), in first-seen order."""
    out = []
    for (preset, phase), d in ok.groupby(["preset", "phase"], sort=False):
        title = f"{preset or '?'} · {phase or '?'}"
        shapes = d.drop_duplicates(["batch", "prompt", "steps"])
        if len(shapes) == 1:
            title += f"\n{_workload(shapes.iloc[0])}"
        dtypes = [x for x in dict.fromkeys(d["dtype"]) if x]
        if len(dtypes) == 1:
            title += f" · {dtypes[0]}"
        out.append((title, d))
    return out


def _line_keys(d: pd.DataFrame) -> pd.Series:
    """Line label per row: the implementation, plus whatever else varies inside the panel."""
    label = d["implementation"].replace("", "?")
    for col, fmt in (("batch", "b={}"), ("prompt", "p={}"), ("steps", "s={}"), ("dtype", "{}"), ("device", "{}")):
        if d[col].nunique(dropna=False) > 1:
            label = label + " " + d[col].map(lambda v: fmt.format(_int(v) if isinstance(v, float) else v))
    return label


def _colours(r: pd.DataFrame) -> dict:
    impls = sorted({i or "?" for i in r["implementation"]})
    return {impl: PALETTE[i % len(PALETTE)] for i, impl in enumerate(impls)}


def _grid(n: int, width=4.3, height=3.3):
    cols = min(3, n)
    rows = math.ceil(n / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = axes.ravel()
    for ax in flat[n:]:
        ax.set_visible(False)
    return fig, flat[:n]


def _ws_axis(ax, sizes):
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_locator(FixedLocator(sizes))
    ax.xaxis.set_minor_locator(NullLocator())
    ax.set_xticklabels([str(s) for s in sizes])
    lo, hi = min(sizes), max(sizes)
    ax.set_xlim(lo / 1.35, hi * 1.35)
    ax.set_xlabel("world size")
    ax.grid(alpha=0.3, lw=0.5)


def _style_legend(fig, handles, ncols=None):
    fig.legend(handles=handles, loc="lower center", bbox_to_anchor=(0.5, 1.0), ncols=ncols or min(len(handles), 6), frameon=False, fontsize=9)


def _kind_handles(any_projected: bool) -> list:
    measured = Line2D([], [], color="#495057", ls="-", marker="o", ms=6, label="measured")
    if not any_projected:
        return [measured]
    return [measured, Line2D([], [], color="#495057", ls="--", marker="o", ms=6, markerfacecolor="white", label="projected")]


def _line_plot(r: pd.DataFrame, column: str, ylabel: str, scale: float = 1.0, ideal: bool = False, unity: bool = False,
               zero: bool = True) -> str | None:
    ok = ok_points(r)
    ok = ok[np.isfinite(ok[column])]
    if ok.empty:
        return None
    colours = _colours(r)
    panels = _panels(ok)
    fig, axes = _grid(len(panels))
    impls_seen = {}
    for ax, (title, d) in zip(axes, panels):
        d = d.assign(_line=_line_keys(d))
        sizes = sorted(int(w) for w in d["world_size"].unique())
        if ideal:
            xs = np.array([min(sizes), max(sizes)], dtype=float)
            ax.plot(xs, xs, color="#868e96", ls=":", lw=1.3, zorder=1)
        if unity:
            ax.axhline(1.0, color="#868e96", ls=":", lw=1.3, zorder=1)
        for line, g in d.groupby("_line", sort=False):
            impl = g["implementation"].iloc[0] or "?"
            colour = colours[impl]
            impls_seen.setdefault(impl, colour)
            g = g.sort_values("world_size")
            meas, proj = g[~g["projected"]], g[g["projected"]]
            y = lambda s: s[column].to_numpy(dtype=float) * scale  # noqa: E731
            if len(meas):
                ax.plot(meas["world_size"], y(meas), color=colour, ls="-", marker="o", ms=6, lw=1.8, zorder=3,
                        label=line if d["_line"].nunique() > 1 else None)
            if len(proj):
                # the dashed segment starts at the last measured point below the first projection
                anchor = meas[meas["world_size"] < proj["world_size"].min()].tail(1)
                px = np.concatenate([anchor["world_size"].to_numpy(float), proj["world_size"].to_numpy(float)])
                py = np.concatenate([y(anchor), y(proj)])
                ax.plot(px, py, color=colour, ls="--", lw=1.5, zorder=2)
                ax.plot(proj["world_size"], y(proj), ls="none", marker="o", ms=7, markerfacecolor="white",
                        markeredgecolor=colour, markeredgewidth=1.6, zorder=4)
        _ws_axis(ax, sizes)
        if ideal:
            ax.set_yscale("log", base=2)
            ticks = sorted({float(s) for s in sizes} | {1.0})
            ax.yaxis.set_major_locator(FixedLocator(ticks))
            ax.yaxis.set_minor_locator(NullLocator())
            ax.set_yticklabels([f"{t:g}" for t in ticks])
            vals = d[column].to_numpy(float) * scale
            lo = min(0.5, float(np.nanmin(vals)) / 1.3)
            hi = max(float(max(sizes)) * 1.3, float(np.nanmax(vals)) * 1.3)
            ax.set_ylim(lo, hi)
        elif zero:
            top = float(np.nanmax(d[column].to_numpy(float) * scale))
            ax.set_ylim(0, max(top * 1.15, 1.15 if unity else 0) or 1.0)
        ax.set_title(title, fontsize=9.5)
        if d["_line"].nunique() > 1:
            ax.legend(fontsize=7, frameon=False)
    for ax in axes[:: min(3, len(axes))]:
        ax.set_ylabel(ylabel)
    handles = [Line2D([], [], color=c, lw=2, label=i) for i, c in impls_seen.items()] + _kind_handles(bool(ok["projected"].any()))
    if ideal:
        handles.append(Line2D([], [], color="#868e96", ls=":", lw=1.3, label="ideal (y = x)"))
    if unity:
        handles.append(Line2D([], [], color="#868e96", ls=":", lw=1.3, label="ideal (1.0)"))
    fig.tight_layout()
    _style_legend(fig, handles)
    return _png(fig)


def _time_unit(seconds: float) -> tuple[str, float]:
    if seconds < 1e-3:
        return "µs", 1e6
    if seconds < 1.0:
        return "ms", 1e3
    return "s", 1.0


def _breakdown_plot(r: pd.DataFrame) -> str | None:
    ok = ok_points(r)
    ok = ok[np.isfinite(ok["latency_s"])]
    if ok.empty:
        return None
    parts = latency_breakdown(ok)
    unit, scale = _time_unit(float(parts.sum(axis=1).max()) or 1e-3)
    panels = _panels(ok)
    fig, axes = _grid(len(panels), width=4.5, height=3.5)
    for ax, (title, d) in zip(axes, panels):
        d = d.assign(_line=_line_keys(d))
        if d.duplicated(["_line", "world_size"]).any():  # a projection of a measured point: side by side, not stacked over it
            d["_line"] = d["_line"] + d["projected"].map({True: " (proj.)", False: ""})
        sizes = sorted(int(w) for w in d["world_size"].unique())
        lines = list(dict.fromkeys(d["_line"]))
        width = 0.8 / len(lines)
        top = 0.0
        for j, line in enumerate(lines):
            g = d[d["_line"] == line]
            for _, row in g.iterrows():
                x = sizes.index(int(row["world_size"])) + (j - (len(lines) - 1) / 2) * width
                bottom = 0.0
                for part, colour in PARTS:
                    h = float(parts.loc[row.name, part]) * scale
                    if h <= 0:
                        continue
                    if row["projected"]:
                        ax.bar(x, h, width * 0.92, bottom=bottom, facecolor="white", edgecolor=colour, hatch="///", lw=1.2, ls="--")
                    else:
                        ax.bar(x, h, width * 0.92, bottom=bottom, color=colour, edgecolor="white", lw=0.5)
                    bottom += h
                top = max(top, bottom)
                label = f"{bottom:.3g}" + ("\nproj." if row["projected"] else "")
                ax.annotate(label, (x, bottom), ha="center", va="bottom", fontsize=6.5, xytext=(0, 1), textcoords="offset points")
                if len(lines) > 1:
                    ax.annotate(line, (x, 0), ha="center", va="bottom", rotation=90, fontsize=6.5, color="#212529", xytext=(0, 2),
                                textcoords="offset points")
        ax.set_xticks(range(len(sizes)), [str(s) for s in sizes])
        ax.set_xlim(-0.6, len(sizes) - 0.4)
        ax.set_ylim(0, top * 1.22 or 1.0)
        ax.set_xlabel("world size")
        ax.set_title(title, fontsize=9.5)
        ax.grid(axis="y", alpha=0.3, lw=0.5)
    for ax in axes[:: min(3, len(axes))]:
        ax.set_ylabel(f"latency per step ({unit})")
    handles = [Patch(color=c, label=p) for p, c in PARTS]
    if ok["projected"].any():
        handles.append(Patch(facecolor="white", edgecolor="#495057", hatch="///", ls="--", label="projected"))
    fig.tight_layout()
    _style_legend(fig, handles)
    return _png(fig)


# --------------------------------------------------------------------------- tables


def _pct(v) -> str:
    return _fmt_num(v, ".1%")


def _results_table(r: pd.DataFrame) -> str | None:
    ok = r[r["status"] == "ok"]
    if ok.empty:
        return None
    unit, scale = _time_unit(float(np.nanmax(ok["latency_s"].to_numpy(float))) if np.isfinite(ok["latency_s"]).any() else 1e-3)
    t = pd.DataFrame({
        "impl": ok["implementation"], "preset": ok["preset"], "phase": ok["phase"], "workload": ok.apply(_workload, axis=1),
        "dtype": ok["dtype"], "device": ok["device"], "ws": ok["world_size"].map(_int),
        "point": ok["projected"].map({True: "projected", False: "measured"}),
        f"latency ({unit}/step)": (ok["latency_s"] * scale).map(_fmt_num),
        f"p90 ({unit})": (ok["latency_p90_s"] * scale).map(_fmt_num),
        "speedup": ok["speedup"].map(lambda v: _fmt_num(v, ".2f")),
        "efficiency": ok["efficiency"].map(_pct),
        "exposed comm": ok["exposed_comm"].map(_pct),
        "exposed comm, no overlap": ok["exposed_comm_no_overlap"].map(_pct),
        "all-reduce pricing": ok["all_reduce_pricing"],
        "dispatch (of a step)": ok["dispatch_fraction"].map(_pct),
        "tokens/s": ok["tokens_per_s"].map(lambda v: _fmt_num(v, ",.0f")),
        "peak mem (GB)": (ok["peak_memory_bytes"] / 1e9).map(lambda v: _fmt_num(v, ".2f")),
        "collectives/step": ok["collectives_per_step"].map(lambda v: _fmt_num(v, ".4g")),
        "comm MB/step": (ok["comm_bytes_per_step"] / 1e6).map(_fmt_num),
    })
    # a column that holds one value everywhere is stated once (device banner, panel titles) rather than on every row
    t = t.drop(columns=[c for c in ("dtype", "device") if t[c].nunique() <= 1])
    return t.to_html(index=False, classes="data results", border=0, na_rep="—")


def _failed_table(r: pd.DataFrame) -> str | None:
    bad = r[r["status"] == "failed"]
    if bad.empty:
        return None
    t = bad[[*POINT_KEY, "projected", "error"]].copy()
    for col in ("batch", "prompt", "steps", "world_size"):
        t[col] = t[col].map(_int)
    t["projected"] = t["projected"].map({True: "yes", False: "no"})
    t["error"] = t["error"].map(lambda s: (s if len(s) <= MAX_ERROR else s[:MAX_ERROR] + " … (truncated)") or "(no error recorded)")
    t = t.rename(columns={"implementation": "impl", "world_size": "ws"})
    return t.to_html(index=False, classes="data failed", border=0, na_rep="—", formatters={"error": str})


def _baseline_table(r: pd.DataFrame, baseline: pd.DataFrame | None) -> dict | None:
    if baseline is None:
        return None
    j, info = baseline_comparison(r, baseline)
    info["table"] = None
    if j.empty:
        return info
    unit, scale = _time_unit(float(max(j["latency_s"].max(), j["latency_s_base"].max())))
    ratio = j["ratio"]
    t = pd.DataFrame({
        "impl": j["implementation"], "preset": j["preset"], "phase": j["phase"], "workload": j.apply(_workload, axis=1),
        "device": j["device"], "dtype": j["dtype"], "ws": j["world_size"].map(_int),
        "point (now / baseline)": [f"{'projected' if a else 'measured'} / {'projected' if b else 'measured'}"
                                   for a, b in zip(j["projected"], j["projected_base"])],
        f"latency now ({unit})": (j["latency_s"] * scale).map(_fmt_num),
        f"baseline ({unit})": (j["latency_s_base"] * scale).map(_fmt_num),
        "ratio now / baseline": ratio.map(lambda v: _fmt_num(v, ".3f")),
        "change": (ratio - 1).map(lambda v: _fmt_num(v, "+.1%")),
    })
    info["table"] = t.to_html(index=False, classes="data baseline", border=0, na_rep="—")
    return info


def _projection_table(errors: pd.DataFrame) -> str | None:
    if errors.empty:
        return None
    unit, scale = _time_unit(float(errors[["latency_s_measured", "latency_s_projected"]].max().max()))
    t = pd.DataFrame({
        "impl": errors["implementation"], "preset": errors["preset"], "phase": errors["phase"], "workload": errors.apply(_workload, axis=1),
        "device": errors["device"], "ws": errors["world_size"].map(_int), "projection": errors["projection"],
        f"measured ({unit}/step)": (errors["latency_s_measured"] * scale).map(_fmt_num),
        f"projected ({unit}/step)": (errors["latency_s_projected"] * scale).map(_fmt_num),
        "error": errors["error"].map(lambda v: _fmt_num(v, "+.1%")),
        "exposed comm measured / projected": [f"{_pct(a)} / {_pct(b)}" for a, b in zip(errors["exposed_comm_measured"], errors["exposed_comm_projected"])],
        "cost model": errors["cost_model_projected"].map(lambda v: "" if not isinstance(v, str) else v),
    })
    return t.to_html(index=False, classes="data projection", border=0, na_rep="—")


def _collectives_table(c: pd.DataFrame) -> str | None:
    if c.empty:
        return None
    t = pd.DataFrame({
        "op": c["op"], "ws": c["world_size"].map(_int), "backend": c["backend"], "dtype": c["dtype"], "bytes": c["bytes"].map(lambda v: f"{int(v):,}"),
        "latency (µs)": c["latency_us"].map(lambda v: _fmt_num(v, ".4g")), "p90 (µs)": c["latency_p90_us"].map(lambda v: _fmt_num(v, ".4g")),
        "algbw (GB/s)": c["algbw_GBps"].map(lambda v: _fmt_num(v, ".3g")), "busbw (GB/s)": c["busbw_GBps"].map(lambda v: _fmt_num(v, ".3g")),
    })
    return t.to_html(index=False, classes="data collectives", border=0, na_rep="—")


def _collectives_plot(c: pd.DataFrame, fit: dict | None) -> str | None:
    """Latency vs message size per op (one line per world size, the fitted model dotted) and busbw."""
    if c.empty:
        return None
    model = CostModel.from_dict(fit) if fit else None
    ops = list(dict.fromkeys(c["op"]))
    fig, axes = plt.subplots(2, len(ops), figsize=(4.3 * len(ops), 6.4), squeeze=False)
    sizes = sorted(int(w) for w in c["world_size"].unique())
    colours = {ws: PALETTE[i % len(PALETTE)] for i, ws in enumerate(sizes)}
    for j, op in enumerate(ops):
        d = c[c["op"] == op]
        for ws, g in d.groupby("world_size"):
            g = g.sort_values("bytes")
            axes[0, j].plot(g["bytes"], g["latency_us"], marker="o", ms=4, color=colours[int(ws)], label=f"ws={int(ws)}")
            axes[1, j].plot(g["bytes"], g["busbw_GBps"], marker="o", ms=4, color=colours[int(ws)])
            if model and op in model.ops and ws > 1:  # priced with this world size's own fit where there is one
                xs = np.geomspace(float(g["bytes"].min()), float(g["bytes"].max()), 40)
                axes[0, j].plot(xs, [model.collective_us(op, int(x), int(ws)) for x in xs], ls=":", color=colours[int(ws)], lw=1.3)
        for ax in axes[:, j]:
            ax.set_xscale("log", base=2)
            ax.grid(alpha=0.3, lw=0.5)
            ax.set_xlabel("message size (bytes, nccl-tests convention)")
        axes[0, j].set_yscale("log")
        axes[0, j].set_title(op, fontsize=10)
    axes[0, 0].set_ylabel("latency (µs, slowest rank's median)")
    axes[1, 0].set_ylabel("busbw (GB/s)")
    handles = [Line2D([], [], color=colours[ws], marker="o", label=f"world size {ws}") for ws in sizes]
    if fit:
        handles.append(Line2D([], [], color="#495057", ls=":", label="fitted alpha-beta model"))
    fig.tight_layout()
    _style_legend(fig, handles)
    return _png(fig)


def _variants_table(r: pd.DataFrame) -> str | None:
    v = projection_variants(r)
    if v.empty:
        return None
    unit, scale = _time_unit(float(np.nanmax(v[["comm_exposed_s", "comm_no_overlap_s"]].to_numpy(float))) or 1e-3)
    t = pd.DataFrame({
        "impl": v["implementation"], "preset": v["preset"], "phase": v["phase"], "workload": v.apply(_workload, axis=1), "ws": v["world_size"].map(_int),
        "speedup with overlap": v["speedup"].map(lambda x: _fmt_num(x, ".2f")), "speedup without": v["speedup_no_overlap"].map(lambda x: _fmt_num(x, ".2f")),
        "exposed comm with / without overlap": [f"{_pct(a)} / {_pct(b)}" for a, b in zip(v["exposed_comm"], v["exposed_comm_no_overlap"])],
        f"comm with / without ({unit}/step)": [f"{_fmt_num(a * scale)} / {_fmt_num(b * scale)}" for a, b in zip(v["comm_exposed_s"], v["comm_no_overlap_s"])],
        "decode speedup NCCL / low-latency": [f"{_fmt_num(a, '.2f')} / {_fmt_num(b, '.2f')}" if np.isfinite(a) else "—"
                                              for a, b in zip(v["speedup_nccl"], v["speedup_low_latency"])],
        "row's pricing": v["all_reduce_pricing"], "all-reduce algorithms": v["all_reduce_algorithms"], "latency figures": v["latency_figures"],
    })
    return t.to_html(index=False, classes="data variants", border=0, na_rep="—")


def _assumptions_table(cost_model: dict | None) -> str | None:
    a = latency_assumptions(cost_model)
    if a.empty:
        return None
    return a.rename(columns={"world_size": "world size"}).to_html(index=False, classes="data assumptions", border=0)


def _latency_table_plot(cost_model: dict | None, r: pd.DataFrame) -> str | None:
    """Latency vs message size per all-reduce algorithm (log-log), one panel per world size with a
    table, the alpha-beta NCCL line beside it; the projected decode and prefill all-reduce sizes marked."""
    if not cost_model or not cost_model.get("tables"):
        return None
    model = CostModel.from_dict(cost_model)
    sizes = sorted({ws for algos in model.tables.values() for by in algos.values() for ws in by})
    fig, axes = _grid(len(sizes), width=4.6, height=3.4)
    xs = np.geomspace(1 << 10, 1 << 28, 80)
    proj = ok_points(r)
    proj = proj[proj["projected"] & (proj["all_reduce_bytes"] > 0)]
    for ax, ws in zip(axes, sizes):
        for i, algo in enumerate(("nccl", "one_shot", "two_shot")):
            if algo == "nccl" or model.table("all_reduce", algo, ws):
                ax.plot(xs, [model.collective_us("all_reduce", int(x), ws, algo) for x in xs], color=PALETTE[i], lw=1.6,
                        ls="-" if model.table("all_reduce", algo, ws) else ":", label=algo + ("" if model.table("all_reduce", algo, ws) else " (alpha-beta)"))
            t = model.table("all_reduce", algo, ws)
            if t:
                ax.plot([b for b, _ in t.points], [u for _, u in t.points], ls="none", marker="o", ms=4, color=PALETTE[i])
        for phase, colour in (("decode", "#c2255c"), ("prefill", "#2b8a3e")):
            for b in sorted(set(proj.loc[(proj["phase"] == phase) & (proj["world_size"] == ws), "all_reduce_bytes"].astype(int))):
                ax.axvline(b, color=colour, ls="--", lw=1.0)
                ax.annotate(f"{phase} {b:,} B", (b, ax.get_ylim()[0]), rotation=90, fontsize=6.5, color=colour, va="bottom", ha="right")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("all-reduce message (bytes)")
        ax.set_ylabel("latency (µs)")
        ax.set_title(f"world size {ws}", fontsize=9.5)
        ax.grid(alpha=0.3, lw=0.5)
        ax.legend(fontsize=7, frameon=False)
    fig.tight_layout()
    return _png(fig)


def _cost_model_info(collectives: dict | None, r: pd.DataFrame) -> dict | None:
    model = (collectives or {}).get("cost_model")
    if not model:
        return None

    def table(m: dict) -> str:
        rows = []
        for op in ("all_reduce", "all_gather", "reduce_scatter"):
            if not isinstance(m.get(op), dict):
                continue
            rows.append((op, "any (pooled fit)" if m[op].get("by_world_size") else "any", m[op]))
            rows += [(op, str(ws), p) for ws, p in sorted((m[op].get("by_world_size") or {}).items(), key=lambda kv: int(kv[0]))]
        t = pd.DataFrame({"op": [r[0] for r in rows], "world size": [r[1] for r in rows],
                          "latency α (µs)": [_fmt_num(r[2]["latency_us"], ".4g") for r in rows],
                          "busbw (GB/s)": [_fmt_num(r[2]["busbw_GBps"], ".4g") for r in rows]})
        return t.to_html(index=False, classes="data cost", border=0)

    fit = model.get("fit")
    return {"source": str(model.get("source") or ""), "reason": str(model.get("reason") or ""), "table": table(model),
            "fit_table": table(fit) if fit else None, "used_fit": bool(fit) and model.get("source") != _default_source(),
            "n_projected": int((r["projected"] & (r["status"] == "ok")).sum())}


def _default_source() -> str:
    return DEFAULTS.source


def _layer_benchmarks(path: Path) -> tuple[bytes | None, str | None]:
    """(the file's bytes, a table of it) for a pytest-benchmark JSON; (None, None) when absent."""
    if not path.is_file():
        return None, None
    raw = path.read_bytes()
    try:
        data = json.loads(raw)
        rows = [{"benchmark": b.get("name", "?"), "median (ms/round)": _fmt_num(b["stats"]["median"] * 1e3, ".4g"),
                 "iqr (ms)": _fmt_num(b["stats"]["iqr"] * 1e3, ".3g"), "rounds": b["stats"]["rounds"],
                 "slowest rank µs/forward": _fmt_num((b.get("extra_info") or {}).get("slowest_rank_us_per_forward"), ".4g")}
                for b in data.get("benchmarks", [])]
    except (ValueError, KeyError, TypeError, AttributeError):
        return raw, None
    when = str(data.get("datetime") or "")
    table = pd.DataFrame(rows).to_html(index=False, classes="data bench", border=0) if rows else None
    return raw, (f"<p class=\"hint\">pytest-benchmark run of {when}</p>" if when else "") + table if table else None


_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*:")


def _evidence(text) -> dict:
    """A relative reference (no scheme, no spaces) becomes a link; anything else is shown as text."""
    s = "" if text is None or (isinstance(text, float) and math.isnan(text)) else str(text).strip()
    is_link = bool(s) and not _SCHEME.match(s) and not s.startswith("//") and not re.search(r"\s", s)
    return {"text": s or "—", "href": s if is_link else None}


def _gate(gate: dict | None) -> dict:
    gate = dict(gate or {})
    verdict = str(gate.get("verdict") or "INCOMPLETE")
    criteria = []
    for c in gate.get("criteria") or []:
        measured = c.get("measured")
        status = str(c.get("status") or "INCOMPLETE")
        criteria.append({
            "name": str(c.get("name", "?")),
            "measured": "—" if measured is None else (_fmt_num(measured, ".4g") if isinstance(measured, (int, float, np.number)) and not isinstance(measured, bool) else str(measured)),
            "threshold": "—" if c.get("threshold") in (None, "") else str(c.get("threshold")),
            "status": status, "cls": {"PASS": "ok", "FAIL": "bad"}.get(status, "warn"),
            "evidence": _evidence(c.get("evidence")), "note": str(c.get("note") or ""),
        })
    counts = {s: sum(c["status"] == s for c in criteria) for s in ("PASS", "FAIL", "INCOMPLETE")}
    return {"verdict": verdict, "cls": VERDICT_CLASS.get(verdict, "INCOMPLETE"), "criteria": criteria, "counts": counts}


def _env_table(environment: dict) -> str:
    env = pd.DataFrame([(k, "—" if v is None else str(v)) for k, v in (environment or {}).items()], columns=["key", "value"])
    return env.to_html(index=False, header=False, classes="data env", border=0)


def _device_banner(r: pd.DataFrame, environment: dict) -> dict:
    devices = [d for d in dict.fromkeys(r["device"]) if d] or ([str(environment["device"])] if environment.get("device") else [])
    parts = []
    for d in devices or ["unknown"]:
        text = d
        if d == "cuda" and environment.get("gpu_name"):
            n = environment.get("gpu_count")
            text += f" — {environment['gpu_name']}" + (f" × {n}" if n else "")
        parts.append(text)
    backends = [b for b in dict.fromkeys(r["backend"]) if b] or ([str(environment["backend"])] if environment.get("backend") else [])
    return {"text": ", ".join(parts), "backend": ", ".join(backends), "cpu": "cpu" in devices,
            "host": str(environment.get("hostname") or ""), "when": str(environment.get("timestamp_utc") or "")}




def _csv(r: pd.DataFrame) -> str:
    out = r.copy()
    # lists as JSON text, so the cell reads back unambiguously
    out["rank_latency_s"] = out["rank_latency_s"].map(lambda v: json.dumps(_json_safe(v)) if isinstance(v, (list, tuple, np.ndarray)) else v)
    return out.to_csv(index=False)


def _env() -> jinja2.Environment:
    return jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.StrictUndefined,
                              trim_blocks=True, lstrip_blocks=True)


# --------------------------------------------------------------------------- entry points


def write_scaling_report(results: pd.DataFrame, gate: dict, environment: dict, out_dir: str | Path,
                         baseline: pd.DataFrame | None = None, collectives: dict | None = None) -> dict:
    out_dir = Path(out_dir).resolve()
    bench_raw, bench_table = _layer_benchmarks(out_dir / LAYER_BENCHMARKS)
    environment = dict(environment or {})
    r = normalise(results)
    g = _gate(gate)
    summary = summarise(r, g["verdict"])
    cost_models = [c for c in dict.fromkeys(r.loc[r["projected"], "cost_model"]) if c]
    errors = projection_errors(r, baseline)
    coll = collectives_frame(collectives)
    plots = {
        "speedup": _line_plot(r, "speedup", "speedup vs world size 1", ideal=True),
        "efficiency": _line_plot(r, "efficiency", "efficiency = speedup / world size", unity=True),
        "breakdown": _breakdown_plot(r),
        "tokens": _line_plot(r, "tokens_per_s", "tokens / s"),
        "memory": _line_plot(r, "peak_memory_bytes", "peak memory per device (GB)", scale=1e-9),
    }
    html = _env().get_template("scaling.html.j2").render(
        summary=summary, gate=g, device=_device_banner(r, environment), cpu_warning=CPU_WARNING, plots=plots,
        cost_models=cost_models, results_table=_results_table(r), failed_table=_failed_table(r),
        baseline=_baseline_table(r, baseline), env_table=_env_table(environment),
        projection_table=_projection_table(errors), collectives_table=_collectives_table(coll),
        collectives_plot=_collectives_plot(coll, ((collectives or {}).get("cost_model") or {}).get("fit")),
        collectives_reason=str((collectives or {}).get("reason") or ""), cost_model=_cost_model_info(collectives, r), bench_table=bench_table,
        has_bench=bench_raw is not None, variants_table=_variants_table(r), assumptions_table=_assumptions_table((collectives or {}).get("cost_model")),
        latency_plot=_latency_table_plot((collectives or {}).get("cost_model"), r))
    # the stored gate always has a verdict and criteria (`tpgate gate` reads them back)
    payload = {"kind": "scaling", "gate": {**(gate or {}), "verdict": g["verdict"], "criteria": list((gate or {}).get("criteria") or [])},
               "environment": environment, "rows": r.to_dict(orient="records"),
               "projection_errors": errors.to_dict(orient="records"),
               "collectives": {k: v for k, v in (collectives or {}).items()}}

    files = {"results.csv": _csv(r), "results.json": json.dumps(_json_safe(payload), indent=1, default=str, allow_nan=False),
             "index.html": html.encode("utf-8")}
    if not coll.empty:
        files["collectives.csv"] = coll.to_csv(index=False)
    if bench_raw is not None:  # the layer benchmarks' JSON outlives the sweep's report directory
        files[LAYER_BENCHMARKS] = bench_raw
    publish_report(out_dir, files)
    return {"verdict": g["verdict"], "n_points": summary["n_points"], "n_measured": summary["n_measured"],
            "n_projected": summary["n_projected"], "n_failed": summary["n_failed"], "out_dir": str(out_dir),
            "index": str(out_dir / "index.html")}


def _read_json(path: Path):
    """(data, problem): problem is 'not run yet' / 'unreadable results.json' when data is None."""
    if not path.is_file():
        return None, "not run yet"
    try:
        return json.loads(path.read_text(encoding="utf-8")), ""
    except (OSError, ValueError):
        return None, "unreadable results.json"


def _entry(name: str, href: str, desc: str, present: bool) -> dict:
    return {"name": name, "href": href, "desc": desc, "present": present, "verdict": "not run yet", "cls": "none", "detail": "", "when": ""}


INDEX_MARK = "<title>tpgate reports</title>"  # in templates/index.html.j2


def write_index(reports_root: str | Path) -> Path | None:
    """reports_root/index.html, unless an index.html that tpgate did not write is there (a report
    written with --out into some other folder must not clobber its parent's page): then None."""
    root = Path(reports_root).resolve()
    root.mkdir(parents=True, exist_ok=True)
    existing = root / "index.html"
    if existing.is_file() and INDEX_MARK not in existing.read_text(encoding="utf-8", errors="replace"):
        return None
    entries = []

    corr = _entry("Correctness", "correctness/index.html", "TP layers and models vs the single-device baseline",
                  (root / "correctness" / "index.html").is_file())
    data, problem = _read_json(root / "correctness" / "results.json")
    if data is None:
        corr["verdict"] = problem
    else:
        v = str(data.get("verdict") or "unknown") if isinstance(data, dict) else "unknown"
        s = data.get("summary", {}) if isinstance(data, dict) else {}
        corr.update(verdict=v, cls={"PASS": "ok", "FAIL": "bad"}.get(v, "warn"),
                    detail=f"{s.get('n_failed', '?')} of {s.get('n_tests', '?')} tests failed" if isinstance(s, dict) and s else "",
                    when=str((data.get("environment") or {}).get("timestamp_utc") or ""))
    entries.append(corr)

    present = (root / "scaling" / "index.html").is_file()
    scal = _entry("Scaling", "scaling/index.html", "speedup, efficiency, latency breakdown, throughput, memory per world size", present)
    gate = _entry("Go/No-Go gate", "scaling/index.html#gate", "release criteria (lives in the scaling report)", present)
    data, problem = _read_json(root / "scaling" / "results.json")
    if data is None or not isinstance(data, dict):
        scal["verdict"] = gate["verdict"] = problem or "unreadable results.json"
    else:
        rows = [x for x in (data.get("rows") or []) if isinstance(x, dict)]
        failed = sum(x.get("status") != "ok" for x in rows)
        projected = sum(bool(x.get("projected")) and x.get("status") == "ok" for x in rows)
        devices = sorted({str(x.get("device")) for x in rows if x.get("device")})
        scal.update(verdict=f"{len(rows)} points, {failed} failed", cls="warn" if failed or not rows else "ok",
                    detail=f"{len(rows) - failed - projected} measured, {projected} projected" + (f" · {', '.join(devices)}" if devices else "")
                    + (" · CPU run: not representative of GPUs" if "cpu" in devices else ""),
                    when=str((data.get("environment") or {}).get("timestamp_utc") or ""))
        g = data.get("gate") if isinstance(data.get("gate"), dict) else {}
        v = str(g.get("verdict") or "INCOMPLETE")
        crit = [c for c in (g.get("criteria") or []) if isinstance(c, dict)]
        gate.update(verdict=v, cls={"GO": "ok", "NO-GO": "bad"}.get(v, "warn"), when=scal["when"],
                    detail=", ".join(f"{sum(c.get('status') == s for c in crit)} {s.lower()}" for s in ("PASS", "FAIL", "INCOMPLETE")) if crit else "")
    entries += [scal, gate]

    known = {"correctness", "scaling", "baselines"}
    others = sorted(p.name for p in root.iterdir() if p.is_dir() and p.name not in known and not p.name.startswith(".")
                    and (p / "index.html").is_file())
    html = _env().get_template("index.html.j2").render(entries=entries, others=others)
    path = root / "index.html"
    write_text_atomic(path, html)
    return path
