"""A W&B report comparing runs (wandb-workspaces' Report API): built offline from the run
records, saved only on request (`python -m gpt2x.report <folders> --wandb`)."""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from gpt2x.lab.header import build_header
from gpt2x.lab.runs import ReportError, Run, config_value, distinct
from gpt2x.lab.summary import Row
from gpt2x.lab.tables import markdown_table
from gpt2x.record.failure import error_line, one_line
from gpt2x.record.wandb_logger import wandb_api_key_configured

# W&B metric keys logged by the trainer (gpt2x.record.wandb_logger.WandbLogger)
WANDB_LOSS = "train/loss"
WANDB_TOKENS_PER_S = "perf/tokens_per_s"
WANDB_MFU = "perf/mfu"
WANDB_VAL_LOSS = "val/loss"
WANDB_TOKENS_SEEN = "tokens_seen"


# --------------------------------------------------------------------------------------------
# W&B report


def _wandb_info(run: Run) -> dict:
    info = run.record.get("wandb")
    return info if isinstance(info, dict) else {}


def wandb_groups(runs: Sequence[Run]) -> list[str]:
    """The W&B groups of the runs: record["wandb"]["group"], else config logger.group."""
    return distinct(
        _wandb_info(r).get("group") or config_value(r.config, "logger.group") for r in runs
    )


def _wandb_project(runs: Sequence[Run]) -> str | None:
    found = distinct(
        _wandb_info(r).get("project") or config_value(r.config, "logger.project") for r in runs
    )
    return found[0] if found else None


def _wandb_entity(runs: Sequence[Run]) -> str | None:
    """From config logger.entity, else from an online run's URL (https://host/ENTITY/PROJECT/...)."""
    for r in runs:
        entity = config_value(r.config, "logger.entity")
        if entity:
            return str(entity)
        url = _wandb_info(r).get("url")
        if url:
            m = re.match(r"https?://[^/]+/([^/]+)/([^/]+)/runs/", str(url))
            if m:
                return m.group(1)
    return None


def build_wandb_report(
    runs: Sequence[Run],
    project: str | None = None,
    entity: str | None = None,
    group: str | None = None,
    title: str | None = None,
    rows: Sequence[Row] | None = None,
):
    """A `wandb_workspaces.reports.v2.Report` comparing the runs (nothing is saved or sent).

    The runset selects the runs' W&B group(s) (`group` overrides), or their W&B run ids when
    they have no group. Panels: train loss vs step and vs tokens seen, val loss, tokens/s, MFU
    (line plots), tokens/s per run (bar plot) and a run comparer; `rows` (from `summarize`)
    adds the local table as markdown. project/entity default to what the records say; an
    entity that is still unknown is left to W&B's default entity (resolved on save, online).
    """
    try:
        import wandb_workspaces.reports.v2 as wr
        from wandb_workspaces import expr
    except ImportError as e:
        raise ReportError(
            f"W&B reports need wandb-workspaces (pip install 'gpt2x[report]'): {one_line(e)}"
        ) from None

    project = project or _wandb_project(runs) or "gpt2x"
    entity = entity or _wandb_entity(runs)
    groups = [group] if group else wandb_groups(runs)
    if len(groups) == 1:
        filters = [expr.Metric("Group") == groups[0]]
        label = groups[0]
    elif groups:
        filters = [expr.Metric("Group").isin(groups)]
        label = ", ".join(groups)
    else:
        ids = distinct(_wandb_info(r).get("id") for r in runs)
        if not ids:
            raise ReportError(
                "the runs have no W&B group and no W&B run id (logger=none?); pass --group"
            )
        filters = [expr.Metric("ID").isin(ids)]
        label = f"{len(ids)} runs"
    title = (title or f"gpt2x: {label}")[:128]

    runset = wr.Runset(
        entity=entity or "",
        project=project,
        name=label,
        filters=filters,
        order=[wr.OrderBy(name="CreatedTimestamp", ascending=True)],  # ladder order
    )

    def at(i: int, w: int = 12, h: int = 8):
        return wr.Layout(x=(i % 2) * 12, y=(i // 2) * 8, w=w, h=h)

    # one line / bar per configuration (a ladder rung): its repeats as a band / an error bar
    by_rung = dict(groupby=wr.Config("experiment"), groupby_aggfunc="median")

    def line(title: str, x: str, y: str, i: int):
        return wr.LinePlot(
            title=title, x=x, y=[y], groupby_rangefunc="minmax", layout=at(i), **by_rung
        )

    panels = [
        line("Train loss vs step", "Step", WANDB_LOSS, 0),
        line("Train loss vs tokens seen", WANDB_TOKENS_SEEN, WANDB_LOSS, 1),
        line("Tokens/s", "Step", WANDB_TOKENS_PER_S, 2),
        line("MFU", "Step", WANDB_MFU, 3),
        line("Validation loss", "Step", WANDB_VAL_LOSS, 4),
        wr.BarPlot(
            title="Tokens/s per rung (error bars: min..max over repeats)",
            metrics=[WANDB_TOKENS_PER_S],
            orientation="h",
            groupby_rangefunc="minmax",
            layout=at(5),
            **by_rung,
        ),
        wr.RunComparer(diff_only="split", layout=wr.Layout(x=0, y=24, w=24, h=12)),
    ]
    header = build_header(runs)
    context = [
        f"{key}: {'; '.join(v) if isinstance(v, list) else v}"
        for key, v in header.items()
        if key in ("hardware", "versions", "git", "commands")
    ]
    blocks = [
        wr.P(
            f"{len(runs)} runs compared by gpt2x.report from their local run records "
            f"(W&B group: {label}). Speed-ups below are tokens/s ratios over the measured "
            f"steps; the panels show what each run logged to W&B, one line per rung with its "
            f"repeats as a band."
        ),
        wr.MarkdownBlock(text="\n".join(f"- {c}" for c in context)),
    ]
    if rows:
        blocks += [
            wr.H2("Summary (local run records)"),
            wr.MarkdownBlock(text=markdown_table(rows)),
        ]
    blocks += [wr.H2("Runs"), wr.PanelGrid(runsets=[runset], panels=panels)]
    kwargs = {"entity": entity} if entity else {}
    return wr.Report(
        project=project, title=title, description=f"gpt2x runs: {label}", blocks=blocks, **kwargs
    )


def save(runs: Sequence[Run], **kwargs) -> str:
    """Build the report (build_wandb_report's arguments) and save it; returns its URL.
    ReportError, one line, where it cannot be saved (network, authentication, a package)."""
    try:
        report = build_wandb_report(runs, **kwargs)
        report.save()
        return str(report.url)
    except Exception as e:  # noqa: BLE001 - network/auth problems: one line, no traceback
        raise ReportError(f"W&B report not saved: {error_line(e)}") from None


def offline_reason() -> str | None:
    """Why a report cannot be saved here without trying the network, or None."""
    mode = os.environ.get("WANDB_MODE", "").strip().lower()
    if mode in ("offline", "disabled", "dryrun"):
        return f"WANDB_MODE={mode}"
    if wandb_api_key_configured():
        return None
    return "no W&B API key (set WANDB_API_KEY or run `wandb login`)"
