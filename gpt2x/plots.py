"""Plots for reports. Torch-free (the report layer runs without torch); matplotlib is imported
inside each function because it is slow to import. Object API on an Agg canvas: no pyplot, no
GUI backend, safe in threads."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

# == gpt2x.profiling.CATEGORIES (a test keeps them equal): bottom-to-top order of the stacks
BREAKDOWN_CATEGORIES = (
    "matmul",
    "attention",
    "loss",
    "elementwise+norm",
    "fused kernels",
    "optimizer",
    "communication",
    "data/host",
    "other",
)
# fixed colours, so one category looks the same in every report
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


def breakdown_figure(rows: Sequence[dict]):
    """The stacked-bar Figure of `plot_breakdown` (returned so tests can read the bars back).

    rows: [{"name": rung name, "breakdown": Breakdown.to_dict() or None}, ...]."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(max(6.0, 1.2 * len(rows) + 3.5), 4.8), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    x = list(range(len(rows)))
    stacks = [_stack(row.get("breakdown")) for row in rows]
    bottom = [0.0] * len(rows)
    for cat in BREAKDOWN_CATEGORIES:
        heights = [s[cat] if s else 0.0 for s in stacks]
        ax.bar(x, heights, bottom=bottom, color=BREAKDOWN_COLORS[cat], label=cat, width=0.7)
        bottom = [b + h for b, h in zip(bottom, heights)]
    top = max(bottom, default=0.0) or 1.0
    for i, (row, s) in enumerate(zip(rows, stacks)):
        label = f"{row['breakdown']['step_ms']:.1f} ms" if s else "no profile"
        ax.text(i, bottom[i] + 0.01 * top, label, ha="center", va="bottom", fontsize=8)
    ax.set_xticks(x, [str(row["name"]) for row in rows], rotation=20, ha="right")
    ax.set_xlim(-0.6, len(rows) - 0.4)
    ax.set_ylim(0, 1.1 * top)
    ax.set_ylabel("ms per step")
    ax.set_title("Where one optimization step's time goes (torch.profiler self time)")
    # legend top-to-bottom in the stack's visual order
    handles, labels = ax.get_legend_handles_labels()
    ax.legend(handles[::-1], labels[::-1], fontsize=8, loc="upper left", bbox_to_anchor=(1, 1))
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    return fig


def plot_breakdown(rows: Sequence[dict], path: str | Path) -> Path:
    """One stacked bar per rung (segments: categories in BREAKDOWN_CATEGORIES order, y: ms per
    step); a rung without a breakdown gets an empty slot labelled "no profile". Writes a PNG."""
    path = Path(path)
    breakdown_figure(rows).savefig(path, format="png")
    return path


def _stack(breakdown: dict | None) -> dict[str, float] | None:
    """ms per category; a category this file does not know is counted as "other"."""
    if not breakdown:
        return None
    cats = breakdown["categories"]
    stack = {c: float(cats.get(c, 0.0)) for c in BREAKDOWN_CATEGORIES}
    stack["other"] += sum(float(v) for k, v in cats.items() if k not in stack)
    return stack
