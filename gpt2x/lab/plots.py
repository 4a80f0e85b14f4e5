"""Plots for reports. Torch-free (the report layer runs without torch); matplotlib is imported
inside each function because it is slow to import. Object API on an Agg canvas: no pyplot, no
GUI backend, safe in threads."""

from __future__ import annotations

import math
import re
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2x.lab.summary import Curve, finite
from gpt2x.measure import CATEGORIES

# fixed colours, so one category (gpt2x.measure.CATEGORIES) looks the same in every report
BREAKDOWN_COLORS = {
    "matmul": "#1f77b4",
    "attention": "#ff7f0e",
    "loss": "#d62728",
    "elementwise+norm": "#2ca02c",
    "fused kernels": "#9467bd",
    "optimizer": "#8c564b",
    "communication": "#e377c2",
    "data/host": "#17becf",
    "other": "#c7c7c7",
}


def wrap_label(text: str, width: int = 22, max_lines: int = 3) -> str:
    """A tick label in lines of about `width` characters, broken after `,` or `/` (a sweep
    job's overrides, a rung's path; a longer part after `.` `_` `=`, else anywhere); past
    max_lines it ends in "..." (the table has the whole name)."""
    lines: list[str] = []
    for part in re.split(r"(?<=[,/])", str(text)):
        for piece in [part] if len(part) <= width else _pieces(part, width):
            if lines and len(lines[-1]) + len(piece) <= width:
                lines[-1] += piece
            else:
                lines.append(piece)
    if len(lines) > max_lines:
        lines = [*lines[: max_lines - 1], lines[max_lines - 1][: width - 3] + "..."]
    return "\n".join(lines)


def _pieces(part: str, width: int) -> list[str]:
    """A part longer than a line: split after `.` `_` `=`, packed, anything longer cut."""
    out: list[str] = []
    for word in re.split(r"(?<=[._=])", part):
        for cut in (word[i : i + width] for i in range(0, len(word), width)):
            if out and len(out[-1]) + len(cut) <= width:
                out[-1] += cut
            else:
                out.append(cut)
    return out


def labelled_axes(fig, labels: Sequence[str], fontsize: float = 8):
    """x tick labels that never squeeze the plot: wrapped, horizontal, one slot per label."""
    ax = fig.axes[0]
    ax.set_xticks(range(len(labels)))
    ax.set_xticklabels([wrap_label(label) for label in labels], fontsize=fontsize)
    return ax


def slots_figure(n: int, labels: Sequence[str], height: float = 4.5):
    """A figure wide enough for n labelled slots (its width follows the longest wrapped line)
    and tall enough for their lines."""
    wrapped = [wrap_label(label) for label in labels]
    chars = max((len(line) for w in wrapped for line in w.splitlines()), default=8)
    lines = max((w.count("\n") + 1 for w in wrapped), default=1)
    slot = max(0.9, 0.075 * chars + 0.25)  # inches per slot at fontsize 8
    return figure(max(6.0, slot * n + 1.5), height + 0.15 * (lines - 1))


def breakdown_figure(rows: Sequence[dict]):
    """The stacked-bar Figure of `plot_breakdown` (returned so tests can read the bars back).

    rows: [{"name": rung name, "breakdown": Breakdown.to_dict() or None}, ...]."""
    names = [str(row["name"]) for row in rows]
    fig = slots_figure(len(rows), names, 4.8)
    fig.set_figwidth(fig.get_figwidth() + 2.0)  # the legend, right of the bars
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    stacks = [_stack(row.get("breakdown")) for row in rows]
    bottom = [0.0] * len(rows)
    for cat in CATEGORIES:
        heights = [s[cat] if s else 0.0 for s in stacks]
        ax.bar(x, heights, bottom=bottom, color=BREAKDOWN_COLORS[cat], label=cat, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    top = max(bottom, default=0.0) or 1.0
    for i, (row, s) in enumerate(zip(rows, stacks)):
        label = f"{row['breakdown']['step_ms']:.1f} ms" if s else "no profile"
        ax.text(i, bottom[i] + 0.01 * top, label, ha="center", va="bottom", fontsize=8)
    labelled_axes(fig, names)
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.1 * top)
    ax.set_ylabel("ms per step")
    ax.set_title("Where one step's time goes\n(torch.profiler self time)", fontsize=11)
    # legend top-to-bottom in the stack's visual order
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_breakdown(rows: Sequence[dict], path: str | Path) -> Path:
    """One stacked bar per rung (segments: categories in gpt2x.measure's order, y: ms per
    step); a rung without a breakdown gets an empty slot labelled "no profile". Writes a PNG."""
    path = Path(path)
    breakdown_figure(rows).savefig(path, format="png")
    return path


def _stack(breakdown: dict | None) -> dict[str, float] | None:
    """ms per category; a category this file does not know is counted as "other"."""
    if not breakdown:
        return None
    cats = breakdown["categories"]
    stack = {c: float(cats.get(c, 0.0)) for c in CATEGORIES}
    stack["other"] += sum(float(v) for k, v in cats.items() if k not in stack)
    return stack


# --------------------------------------------------------------------------------------------
# tables' plots: loss curves (repeats as a band), tokens/s bars (error bars), sweeps


def figure(width: float = 8.0, height: float = 4.5):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def save(fig, path: str | Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, format="png")
    return Path(path)


def mark_best(ax, x: float, y: float, label: str) -> None:
    """The best point of a sweep plot: a large red star, named in the legend."""
    ax.plot([x], [y], marker="*", markersize=16, color="C3", linestyle="none", label=label)
    ax.legend(fontsize=8)


def _median_and_range(columns: list[list[float]]) -> tuple[list[float], list[float], list[float]]:
    mid, lo, hi = [], [], []
    for values in zip(*columns):
        vals = sorted(v for v in values if math.isfinite(v))
        if not vals:
            mid.append(math.nan)
            lo.append(math.nan)
            hi.append(math.nan)
            continue
        n = len(vals)
        mid.append(vals[n // 2] if n % 2 else 0.5 * (vals[n // 2 - 1] + vals[n // 2]))
        lo.append(vals[0])
        hi.append(vals[-1])
    return mid, lo, hi


def loss_figure(curves: Sequence[Curve]):
    """Training loss vs step: one line per configuration (the median of its repeats), the
    repeats' min..max as a band (dashed: did not complete)."""
    fig = figure()
    ax = fig.add_subplot(1, 1, 1)
    for i, c in enumerate(curves):
        mid, lo, hi = _median_and_range(c.repeats)
        color = f"C{i % 10}"
        ax.plot(c.x, mid, label=c.label, linestyle="--" if c.dashed else "-", lw=1.2, color=color)
        if len(c.repeats) > 1:
            ax.fill_between(c.x, lo, hi, alpha=0.2, color=color, linewidth=0)
    if curves and max(len(c.label) for c in curves) > 24:  # long names: a legend beside it
        handles, labels = ax.get_legend_handles_labels()
        wrapped = [wrap_label(label, width=30) for label in labels]
        ax.legend(handles, wrapped, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
        fig.set_figwidth(fig.get_figwidth() + 2.5)
    elif curves:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no metrics", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("step")
    ax.set_ylabel("train loss")
    ax.set_title("Training loss (band: min..max over repeats)")
    ax.grid(alpha=0.3)
    return fig


def plot_loss(curves: Sequence[Curve], path: str | Path) -> Path:
    return save(loss_figure(curves), path)


def tokens_per_s_figure(rows: Sequence[dict]):
    """Bars of tokens/s per row with the repeats' 95% interval as error bars (only a reported
    interval: gpt2x.stats.MIN_REPEATS repeats; rows that did not complete: an empty, labelled
    slot); labels: the speed-up vs the baseline and vs the previous row, marked (noise) where
    that one's paired interval includes 1.00x."""
    names = [str(r["name"]) for r in rows]
    fig = slots_figure(len(rows), names)
    ax = fig.add_subplot(1, 1, 1)
    values = [r["tokens_per_s"] or 0.0 for r in rows]
    err_lo, err_hi = [], []
    for r, v in zip(rows, values):
        ci = r.get("tokens_per_s_ci")
        ok = ci is not None and getattr(ci, "reported", False) and v
        # the interval is around the repeats' geometric mean; drawn around the bar's own value
        err_lo.append(v * (1 - ci.lo / ci.center) if ok else 0.0)
        err_hi.append(v * (ci.hi / ci.center - 1) if ok else 0.0)
    colors = ["C0" if r["median_ms"] else "0.7" for r in rows]
    bars = ax.bar(range(len(rows)), values, color=colors)
    with_ci = [i for i, e in enumerate(err_hi) if e > 0]  # no bar for an unreported interval
    if with_ci:
        ax.errorbar(
            with_ci,
            [values[i] for i in with_ci],
            yerr=[[err_lo[i] for i in with_ci], [err_hi[i] for i in with_ci]],
            fmt="none",
            ecolor="black",
            capsize=4,
        )
    for bar, row, above in zip(bars, rows, err_hi):
        label = f"{row['speedup_vs_baseline']:.2f}x" if row["speedup_vs_baseline"] else ""
        prev = row.get("speedup_vs_prev")
        if prev and row.get("speedup_vs_prev_ci") is not None:
            # the noise verdict belongs to the speed-up over the previous row
            label += f"\nprev {prev:.2f}x" + (" (noise)" if row.get("noise") else "")
        if not row["median_ms"]:
            label = row["status"]
        ax.annotate(
            label,
            (bar.get_x() + bar.get_width() / 2, bar.get_height() + above),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    tops = [v + e for v, e in zip(values, err_hi)]
    if max(tops, default=0.0) > 0:
        ax.set_ylim(0, 1.15 * max(tops))  # room for the two-line labels above the error bars
    labelled_axes(fig, names)
    ax.set_ylabel("tokens / s (median step)")
    cis = [r.get("tokens_per_s_ci") for r in rows]
    few = any(ci is not None and not ci.reported for ci in cis)
    note = (
        "error bars: 95% interval over repeats"
        + (" (none with fewer than 3)" if few else "")
        + "; labels: vs baseline, vs previous"
    )
    # ~11 characters per inch at this size: the note wraps instead of running off the figure
    note = textwrap.fill(note, width=int(11 * fig.get_figwidth()))
    ax.set_title(f"Throughput\n{note}", fontsize=10)
    ax.grid(axis="y", alpha=0.3)
    return fig


def plot_tokens_per_s(rows: Sequence[dict], path: str | Path) -> Path:
    return save(tokens_per_s_figure(rows), path)


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def plot_sweep(rows: Sequence[dict], x: str, path: str | Path) -> Path:
    """tokens/s and peak memory vs the swept key; the best run is marked with a star."""
    fig = figure(10.0, 4.5)
    ax_t = fig.add_subplot(1, 2, 1)
    ax_m = fig.add_subplot(1, 2, 2)
    good = [r for r in rows if r["median_ms"]]
    numeric = bool(good) and all(_is_number(r.get(x)) for r in good)
    if numeric:
        good = sorted(good, key=lambda r: r[x])
        xs = [r[x] for r in good]
    else:
        xs = list(range(len(good)))
        for ax in (ax_t, ax_m):
            ax.set_xticks(xs)
            ax.set_xticklabels([str(r.get(x)) for r in good], rotation=30, ha="right")
    best_i = next((i for i, r in enumerate(good) if r.get("best")), None)
    for ax, col, label in (
        (ax_t, "tokens_per_s", "tokens / s"),
        (ax_m, "peak_mem_gb", "peak memory (GB)"),
    ):
        pts = [(xv, r[col]) for xv, r in zip(xs, good) if r[col] is not None]
        if pts:
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o")
            if best_i is not None and good[best_i][col] is not None:
                mark_best(ax, xs[best_i], good[best_i][col], f"best ({x}={good[best_i].get(x)})")
        else:
            ax.text(
                0.5,
                0.5,
                "not recorded" if good else "no completed runs",
                ha="center",
                va="center",
                transform=ax.transAxes,
            )
        ax.set_xlabel(x)
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    ax_t.set_title("Throughput")
    ax_m.set_title("Peak memory")
    return save(fig, path)


def plot_val_loss(rows: Sequence[dict], x: str, path: str | Path) -> Path:
    """Validation loss vs the swept key (log axis for positive numbers spanning >10x), best
    starred."""
    pts = [
        (r[x], r["val_loss"], bool(r.get("best")))
        for r in rows
        if r["median_ms"] and finite(r.get("val_loss")) and finite(r.get(x))
    ]
    pts.sort()
    fig = figure(6.0, 4.5)
    ax = fig.add_subplot(1, 1, 1)
    if pts:
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", linestyle="-")
        best = [p for p in pts if p[2]]
        if best:
            mark_best(ax, best[0][0], best[0][1], f"best ({x}={best[0][0]:.3g})")
        xs = [p[0] for p in pts]
        if min(xs) > 0 and max(xs) > 10 * min(xs):
            ax.set_xscale("log")
    else:
        ax.text(0.5, 0.5, "no completed runs", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel(x)
    ax.set_ylabel("validation loss")
    ax.set_title(f"Validation loss vs {x}")
    ax.grid(alpha=0.3)
    return save(fig, path)
