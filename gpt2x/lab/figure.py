"""The lecture's results figure for one run folder, from the run record alone. Torch-free.

Karpathy's "Let's reproduce GPT-2 (124M)" ends with a two-panel figure (build-nanogpt
play.ipynb, the log-plotting cell): train and val loss with the OpenAI GPT-2 checkpoint's val
loss as a dashed line, and HellaSwag accuracy with the GPT-2 and GPT-3 checkpoints' numbers. This
module draws the same figure from a gpt2x run folder (record.json, metrics.jsonl, eval.jsonl;
see gpt2x.record.folder), against tokens seen instead of steps so runs with different batch sizes
share an axis.

Baselines (gpt2x.lab.baselines) are drawn only where they apply:

* val loss: the OpenAI GPT-2 124M checkpoint's 3.2924 was measured on the FineWeb-Edu val
  shard, so the line is drawn for a 124M model trained on data=fineweb_edu only; otherwise the
  panel's title says why there is none;
* HellaSwag: the GPT-2 and GPT-3 lines of the run's model size (n_layer x n_embd of one of the
  four GPT-2 shapes). A model of another shape (nano, the rehearsal) gets no lines: a 124M line
  beside a 4-layer model would invite a comparison that means nothing. The title says so.

matplotlib is imported inside the functions (slow to import); the object API on an Agg canvas:
no pyplot, no GUI backend.

    from gpt2x.lab.figure import plot_reproduction
    plot_reproduction("outputs/runs/<run>", "outputs/runs/<run>/reproduction.png")
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2x.lab import baselines
from gpt2x.record.folder import EVAL, METRICS, read_jsonl, read_record


class FigureError(ValueError):
    """The folder cannot be drawn; the message names what to pass instead."""


@dataclass
class Series:
    """What the figure plots, read from one run folder (one row per step, step order)."""

    run_id: str
    experiment: str
    model_name: str | None
    size: str | None  # "124M" ... "1558M", or None for another shape
    data_name: str | None
    train_tokens: list[float] = field(default_factory=list)
    train_loss: list[float] = field(default_factory=list)
    val_tokens: list[float] = field(default_factory=list)
    val_loss: list[float] = field(default_factory=list)
    hellaswag_tokens: list[float] = field(default_factory=list)
    hellaswag_acc_norm: list[float] = field(default_factory=list)
    hellaswag_n: int | None = None  # examples scored in the last HellaSwag row

    @property
    def val_loss_baseline(self) -> float | None:
        return baselines.val_loss_baseline(self.size, self.data_name)


def _last_per_step(rows: list[dict]) -> list[dict]:
    """One row per step in step order: a resumed or rolled-back run logs steps again after its
    checkpoint, and the later row is the one the continued run used."""
    last: dict[int, dict] = {}
    for row in rows:
        step = row.get("step")
        if isinstance(step, int):
            last[step] = row
    return [last[s] for s in sorted(last)]


def _number(value: Any) -> float | None:
    """A finite float, or None (record values may be null or "nan" strings)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    value = float(value)
    return value if value == value and abs(value) != float("inf") else None


def load_series(run_dir: str | Path) -> Series:
    """The figure's data from a run folder; FigureError if it holds no record.json."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    if record is None:
        raise FigureError(
            f"{run_dir} has no readable record.json; pass a run folder written by gpt2x.train"
        )
    config = record.get("config") or {}
    model = config.get("model") or {}
    data = config.get("data") or {}
    series = Series(
        run_id=str(record.get("run_id") or run_dir.name),
        experiment=str(record.get("experiment") or config.get("experiment") or ""),
        model_name=model.get("name"),
        size=baselines.size_key(model),
        data_name=data.get("name"),
    )
    tokens_per_step = _number(record.get("tokens_per_step"))
    for row in _last_per_step(read_jsonl(run_dir / METRICS)):
        loss = _number(row.get("loss"))
        tokens = _number(row.get("tokens_seen"))
        if tokens is None and tokens_per_step is not None:  # rows of older records
            tokens = (row["step"] + 1) * tokens_per_step
        if loss is not None and tokens is not None:
            series.train_tokens.append(tokens)
            series.train_loss.append(loss)
    for row in _last_per_step(read_jsonl(run_dir / EVAL)):
        tokens = _number(row.get("tokens_seen"))
        if tokens is None:
            continue
        val = _number(row.get("val_loss"))
        if val is not None:
            series.val_tokens.append(tokens)
            series.val_loss.append(val)
        acc = _number(row.get("hellaswag_acc_norm"))
        if acc is not None:
            series.hellaswag_tokens.append(tokens)
            series.hellaswag_acc_norm.append(acc)
            n = row.get("hellaswag_n")
            series.hellaswag_n = n if isinstance(n, int) else series.hellaswag_n
    return series


def reproduction_figure(run_dir: str | Path):
    """The two-panel Figure (loss | HellaSwag vs tokens seen) of one run folder.

    Returned, not saved, so tests can read the plotted lines back: each Line2D has a gid
    ("train", "val", "gpt2_val", "hellaswag", "gpt2_hellaswag", "gpt3_hellaswag")."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import EngFormatter, FuncFormatter

    s = load_series(run_dir)
    fig = Figure(figsize=(14.0, 5.5), dpi=100)
    FigureCanvasAgg(fig)
    ax_loss, ax_hs = fig.subplots(1, 2)
    size = s.size or f"{s.model_name or 'this model'}"

    # left: losses (the notebook's panel 1)
    if s.train_tokens:
        ax_loss.plot(s.train_tokens, s.train_loss, lw=1.0, label=f"{size} train loss", gid="train")
    if s.val_tokens:
        ax_loss.plot(
            s.val_tokens, s.val_loss, marker=".", lw=1.5, label=f"{size} val loss", gid="val"
        )
    baseline = s.val_loss_baseline
    if baseline is not None:
        ax_loss.axhline(
            baseline,
            color="r",
            ls="--",
            label=f"OpenAI GPT-2 ({s.size}) checkpoint val loss {baseline:.4f}",
            gid="gpt2_val",
        )
        ax_loss.set_title("Loss")
    else:
        ax_loss.set_title(f"Loss ({_no_val_baseline(s)})", fontsize=10)
    if s.train_tokens or s.val_tokens:
        losses = s.train_loss + s.val_loss
        ax_loss.set_yscale("log")  # as the notebook: the late, small improvements stay visible
        plain = FuncFormatter(lambda v, _: f"{v:g}")  # 9.6, not 9.6 x 10^0
        ax_loss.yaxis.set_major_formatter(plain)
        ax_loss.yaxis.set_minor_formatter(plain)
        if min(losses) < 4.0 < max(losses):
            # the notebook's zoom (plt.ylim(top=4.0)): the first steps' ~11 would flatten the rest
            ax_loss.set_ylim(top=4.0)
        ax_loss.legend(loc="upper right", fontsize=9)
    else:
        _say(ax_loss, "no steps logged in metrics.jsonl")
    ax_loss.set_xlabel("tokens seen")
    ax_loss.set_ylabel("loss")
    ax_loss.xaxis.set_major_formatter(EngFormatter())
    ax_loss.grid(alpha=0.3)

    # right: HellaSwag acc_norm (the notebook's panel 2)
    if s.hellaswag_tokens:
        n = f", n={s.hellaswag_n}" if s.hellaswag_n is not None else ""
        ax_hs.plot(
            s.hellaswag_tokens,
            s.hellaswag_acc_norm,
            marker=".",
            label=f"{size} (this run{n})",
            gid="hellaswag",
        )
        if s.size in baselines.GPT2_HELLASWAG:
            gpt2 = baselines.GPT2_HELLASWAG[s.size]
            gpt3 = baselines.GPT3_HELLASWAG[s.size]
            ax_hs.axhline(
                gpt2,
                color="r",
                ls="--",
                label=f"OpenAI GPT-2 ({s.size}) checkpoint {gpt2:.4f}",
                gid="gpt2_hellaswag",
            )
            ax_hs.axhline(
                gpt3,
                color="g",
                ls="--",
                label=f"OpenAI {baselines.GPT3_NAME[s.size]} (paper) {gpt3:.3f}",
                gid="gpt3_hellaswag",
            )
            ax_hs.set_title("HellaSwag acc_norm")
        else:
            ax_hs.set_title(
                f"HellaSwag acc_norm (no published baseline for a {s.model_name} model: "
                "not a GPT-2 shape)",
                fontsize=10,
            )
        ax_hs.legend(loc="best", fontsize=9)
    else:
        ax_hs.set_title("HellaSwag acc_norm")
        _say(ax_hs, "no HellaSwag evaluations in this run\n(trainer.hellaswag_every=0)")
    ax_hs.set_xlabel("tokens seen")
    ax_hs.set_ylabel("accuracy (acc_norm)")
    ax_hs.xaxis.set_major_formatter(EngFormatter())
    ax_hs.grid(alpha=0.3)

    title = s.experiment or s.run_id
    fig.suptitle(f"{title}: {s.model_name} on {s.data_name} ({s.run_id})")
    fig.tight_layout()
    return fig


def plot_reproduction(run_dir: str | Path, path: str | Path) -> Path:
    """Draw `reproduction_figure(run_dir)` into `path` (PNG, or any format by suffix)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig = reproduction_figure(run_dir)
    fig.savefig(path)
    return path


def _no_val_baseline(s: Series) -> str:
    """Why the loss panel has no OpenAI line (the panel title says it)."""
    if s.data_name != baselines.VAL_LOSS_DATA:
        return (
            f"no GPT-2 baseline for data={s.data_name}: the OpenAI val loss was measured on "
            f"{baselines.VAL_LOSS_DATA}"
        )
    if s.size is None:
        return f"no GPT-2 baseline for a {s.model_name} model: not a GPT-2 shape"
    return f"no published OpenAI GPT-2 {s.size} val loss on {baselines.VAL_LOSS_DATA}"


def _say(ax, text: str) -> None:
    ax.text(0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, gid="message")


__all__ = ["FigureError", "Series", "load_series", "plot_reproduction", "reproduction_figure"]
