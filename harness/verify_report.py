"""`tpgate verify --html PATH`: one self-contained page of a verify result.

`write_verify_html(result, path)`: the rows (error, bound, KL, determinism, diagnosis), and the
plots of harness.diagnose's results, as base64 PNG data URIs (harness.report's `_png`) in
templates/verify.html.j2 rendered with autoescape on:
  profile  error / bound per sub-layer of the model, in execution order, one line per TP degree
           (dashed: the same TP degree with float32 collectives), one panel per implementation
           with diagnostics; the bound (1) drawn across;
  logits   the logits error against float64 per TP degree: working-dtype collectives, float32
           collectives, TP=1's own error in the working dtype, and the row's bound.
The page is rendered to a string first and written with write_text_atomic: a reader sees the
old page or the new one, never part of one.
"""
from __future__ import annotations

from pathlib import Path

import jinja2

from .atomic import write_text_atomic
from .diagnose import location
from .report import TEMPLATE_DIR, _png, plt

RATIO_FLOOR = 1e-4  # error / bound below this (an exact 0 included) is drawn at the floor of the log axis


def _diagnosed(rows: list[dict]) -> dict[str, list[dict]]:
    by_impl: dict[str, list[dict]] = {}
    for r in rows:
        if (r.get("diagnostics") or {}).get("available"):
            by_impl.setdefault(r["implementation"], []).append(r)
    return by_impl


def profile_plot(rows: list[dict]) -> str | None:
    """error / bound per sub-layer, per TP degree (a panel per implementation); None without diagnostics."""
    by_impl = _diagnosed(rows)
    if not by_impl:
        return None
    fig, axes = plt.subplots(len(by_impl), 1, figsize=(11, 3.4 * len(by_impl)), squeeze=False)
    for ax, (impl, impl_rows) in zip(axes[:, 0], by_impl.items()):
        names = [p["name"] for p in impl_rows[0]["diagnostics"]["profile"]]
        for r in impl_rows:
            d = r["diagnostics"]
            line = ax.plot(range(len(names)), _ratios(d["profile"]), marker="o", ms=3, lw=1.2, label=f"tp={r['tp']}")[0]
            fp32 = d["fp32_collectives"]
            if "profile" in fp32:
                ax.plot(range(len(names)), _ratios(fp32["profile"]), ls="--", lw=1, color=line.get_color(), label=f"tp={r['tp']}, float32 collectives")
        ax.axhline(1.0, color="#c92a2a", lw=1.2, ls="--")
        ax.set_yscale("log")
        ax.set_xticks(range(len(names)), names, rotation=70, fontsize=7, ha="right")
        ax.set_ylabel("max|tp - float64| / bound")
        ax.set_title(f"{impl}: error / bound per sub-layer ({impl_rows[0]['dtype']})", fontsize=10)
        ax.grid(axis="y", alpha=0.3, which="both", lw=0.5)
        ax.legend(fontsize=7, ncols=2)
    fig.tight_layout()
    return _png(fig)


def _ratios(profile: list[dict]) -> list[float]:
    return [max(p["ratio"], RATIO_FLOOR) if p["comparable"] else float("nan") for p in profile]


def logits_plot(rows: list[dict]) -> str | None:
    """Logits error vs float64 per (implementation, TP degree) with diagnostics: working-dtype and
    float32 collectives, TP=1's own error, the bound; None without diagnostics."""
    diagnosed = [r for impl_rows in _diagnosed(rows).values() for r in impl_rows]
    if not diagnosed:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.5 * len(diagnosed) + 2), 3.4))
    x = range(len(diagnosed))
    width = 0.27
    fp32 = [r["diagnostics"]["fp32_collectives"].get("max_abs_vs_exact") for r in diagnosed]
    ax.bar([i - width for i in x], [r["max_abs_vs_exact"] for r in diagnosed], width, label="working-dtype collectives", color="#1864ab")
    ax.bar(list(x), [float("nan") if v is None else v for v in fp32], width, label="float32 collectives", color="#74c0fc")
    ax.bar([i + width for i in x], [r["diagnostics"]["tp1_error"] for r in diagnosed], width, label="TP=1 in the working dtype", color="#adb5bd")
    ax.scatter(list(x), [r["bound"] for r in diagnosed], marker="_", s=900, color="#c92a2a", label="bound", zorder=3)
    ax.set_xticks(list(x), [f"{r['implementation'].rsplit(':', 1)[-1][:20]}\ntp={r['tp']}" for r in diagnosed], fontsize=7)  # module:object -> object
    ax.set_yscale("log")
    ax.set_ylabel("max |logits - float64|")
    ax.legend(fontsize=7)
    ax.grid(axis="y", alpha=0.3, which="both", lw=0.5)
    fig.tight_layout()
    return _png(fig)


def _row_view(r: dict) -> dict:
    d = r.get("diagnostics")
    fmt = lambda v: "—" if v is None else f"{v:.3g}"  # noqa: E731
    return {"implementation": r["implementation"], "tp": r["tp"], "dtype": r["dtype"], "passed": r["passed"], "error": r.get("error") or "",
            "max_abs": fmt(r["max_abs_vs_exact"]), "bound": fmt(r["bound"]), "top1": "—" if r["top1_agreement"] is None else f"{r['top1_agreement']:.1%}",
            "kl_mean": fmt(r["kl_mean"]), "kl_max": fmt(r["kl_max"]),
            "deterministic": "—" if r["deterministic"] is None else ("bitwise" if r["deterministic"] else f"differs on ranks {r['nondeterministic_ranks']}"),
            "location": location(d), "diagnosis": "" if not d else (d["classification"]["class"] if d["available"] else d["reason"]),
            "reason": "" if not d or not d["available"] else d["classification"]["reason"]}


def write_verify_html(result: dict, path: str | Path) -> None:
    env = jinja2.Environment(loader=jinja2.FileSystemLoader(TEMPLATE_DIR), autoescape=True, undefined=jinja2.StrictUndefined,
                             trim_blocks=True, lstrip_blocks=True)
    html = env.get_template("verify.html.j2").render(
        verdict="PASS" if result["passed"] else "FAIL", request=result["request"], reference=result["reference"],
        calibration=result["calibration"], rows=[_row_view(r) for r in result["rows"]],
        diagnosed=bool(result["request"].get("diagnose")), profile_plot=profile_plot(result["rows"]), logits_plot=logits_plot(result["rows"]))
    write_text_atomic(path, html)
