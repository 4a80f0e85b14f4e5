"""Comparison tables and plots rebuilt from run records, fully offline (see docs/report.md).

    python -m gpt2x.report outputs/runs/ladder --out reports/ladder
    python -m gpt2x.report outputs/multirun/<sweep> --x trainer.micro_batch_size --basename summary

Reads every `record.json` (+ `metrics.jsonl`, `eval.jsonl`) under the given folders, as
described in docs/run-record.md, and writes `<basename>.md`, `<basename>.csv`, `loss.png`,
`tokens_per_s.png` (and `sweep.png` with `--x`). With `--wandb` it also saves a W&B report that
compares the same runs online. Nothing here imports torch: the report runs on any machine.

This module composes the report: the runs are loaded by gpt2x.lab.runs, their numbers are
gpt2x.lab.summary's (the header's facts gpt2x.lab.header's), formatted by gpt2x.lab.tables and
drawn by gpt2x.lab.plots.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from gpt2x import stats
from gpt2x.lab import plots, wandb_report
from gpt2x.lab.figure import FigureError, plot_reproduction
from gpt2x.lab.header import ablation_header, build_header
from gpt2x.lab.runs import ReportError, Run, load_runs
from gpt2x.lab.summary import (
    CONFIDENCE,
    TARGET_TOLERANCE,
    Row,
    details,
    summarize,
)
from gpt2x.lab.tables import (
    breakdown_table,
    cell,
    columns_of,
    header_lines,
    markdown_table,
    shown_columns,
    sweep_key,
    write_csv,
)
from gpt2x.record.failure import one_line

# --------------------------------------------------------------------------------------------
# Writing


def write_report(
    rows: Sequence[Row],
    runs: Sequence[Run],
    out_dir: str | Path,
    header: dict | None = None,
    basename: str = "ablation",
    x: str | None = None,
    title: str | None = None,
    target_loss: float | None = None,
) -> dict[str, Path]:
    """Write `<basename>.md`, `<basename>.csv`, `loss.png`, `tokens_per_s.png` (+ `sweep.png`
    when `x` is a swept config key, `breakdown.png` when a row has a step-time breakdown) into
    out_dir; returns {kind: path}. rows: gpt2x.lab.summary.summarize's. target_loss: what
    summarize's s_to_target was measured against (default: the baseline row's final loss)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    about = details(runs, rows)  # the numbers and facts first, then their presentation
    header = build_header(runs) if header is None else header
    x = x or sweep_key(rows)
    breakdowns = [{"name": d.name, "breakdown": d.breakdown} for d in about]
    columns = columns_of(rows, x)
    paths: dict[str, Path] = {}

    # ---- markdown
    md = [f"# {title or ('Sweep over ' + x if x else 'Ablation')}", "", *header_lines(header)]
    shown, constant = shown_columns(rows, columns)
    if constant:
        md += ["", "All rows: " + ", ".join(f"{c} {v}" for c, v in constant.items()) + "."]
    md += ["", markdown_table(rows, shown), ""]
    best = next((r for r in rows if r.get("best")), None)
    if x is not None:
        if best is not None:
            named = f"{x}={best.get(x)}"
            which = named if best["name"] == named else f"{best['name']} ({named})"
            md.append(
                f"**Best**: {which}: "
                f"{cell('tokens_per_s', best['tokens_per_s'])} tokens/s, "
                f"{cell('median_ms', best['median_ms'])} ms/step."
            )
        else:
            md.append("**Best**: none (no run completed).")
        md.append("")
    md += [
        "Times are medians over the measured steps of every completed repeat (the first"
        " `trainer.warmup_steps_for_timing` steps skipped); speed-ups are tokens/s ratios."
        f" Intervals are {int(CONFIDENCE * 100)}% Student-t intervals on logs across repeats;"
        " a speed-up's interval is paired (repeat i against repeat i of the other row) and"
        " `within noise` marks one that includes 1.00x. An interval needs"
        f" {stats.MIN_REPEATS} repeats: with fewer the cell says `too few repeats` (2 repeats"
        " give a t quantile of 12.7, an interval that says nothing)."
        + _target_note(
            rows,
            header.get("baseline") or next((r["name"] for r in rows if r["median_ms"]), None),
            target_loss,
        )
        + " Columns left out are empty in every row (the CSV has them all). Column definitions:"
        " docs/report.md.",
        "",
    ]
    widths = [
        r["speedup_vs_prev_ci"].half_width_pct
        for r in rows
        if isinstance(r.get("speedup_vs_prev_ci"), stats.Interval)
        and r["speedup_vs_prev_ci"].reported
    ]
    if widths:
        md += [
            f"Precision reached: speed-up vs the previous row known to ±{stats.median(widths):.1f}%"
            f" (median half-width; widest ±{max(widths):.1f}%).",
            "",
        ]
    md += breakdown_table(breakdowns)
    md += ["## Runs", ""]
    for row, about_row in zip(rows, about):
        md.append(f"### {row['name']}")
        md.append("")
        md.append(f"- status: {row['status']}" + (f" ({row['error']})" if row["error"] else ""))
        if about_row.folders:
            md.append("- folder: " + ", ".join(f"`{f}`" for f in about_row.folders))
        md.append(f"- config hash: `{row.get('config_hash') or 'n/a'}`")
        if about_row.rerun is not None:
            md.append(f"- re-run: `{about_row.rerun}`")
        if about_row.wandb_url:
            md.append(f"- W&B: {about_row.wandb_url}")
        md.append("")
    paths["md"] = out / f"{basename}.md"
    paths["md"].write_text("\n".join(md), encoding="utf-8")
    paths["csv"] = write_csv(out / f"{basename}.csv", rows, columns)

    # ---- plots
    curves = [d.curve for d in about if d.curve is not None]
    paths["loss"] = plots.plot_loss(curves, out / "loss.png")
    paths["tokens_per_s"] = plots.plot_tokens_per_s(rows, out / "tokens_per_s.png")
    if x is not None:
        paths["sweep"] = plots.plot_sweep(rows, x, out / "sweep.png")
    if any(b["breakdown"] for b in breakdowns):
        paths["breakdown"] = plots.plot_breakdown(breakdowns, out / "breakdown.png")
    return paths


def _target_note(rows: Sequence[Row], baseline: str | None, target: float | None) -> str:
    """What s_to_target was measured against, and with which tolerance."""
    if target is None:
        target = next((r["loss"] for r in rows if r["name"] == baseline), None)
        what = f"the baseline's ({baseline}) final training loss"
    else:
        what = "--target-loss"
    if target is None:
        return ""
    return (
        f" `s_to_target`: step time until the training loss first comes within"
        f" {TARGET_TOLERANCE:.0%} of {target:.4f} ({what}), i.e. <= {target * (1 + TARGET_TOLERANCE):.4f}."
    )


# --------------------------------------------------------------------------------------------
# Ablations (gpt2x.ablate writes ablation.json; the report is rebuilt from it and the records)

ABLATION = "ablation"  # ablation.json (the manifest), ablation.md, ablation.csv


def is_ablation_folder(folder: Path) -> bool:
    return (Path(folder) / f"{ABLATION}.json").is_file()


def write_ablation(
    out: Path, manifest: dict, dest: Path | None = None
) -> tuple[list[Run], list[Row], dict[str, Path]]:
    """ablation.md/.csv + plots from the rung folders in `out` and the ablation's manifest
    (written to `dest`, default `out`), in the ladder's order."""
    runs = load_runs([out])
    expected = [
        r["name"] for r in manifest.get("rungs") or [] if r["status"] not in ("pending", "not run")
    ]
    names = [r.name for r in runs]
    order = None if names == expected else [n for n in expected if n in names] or None
    rows = summarize(runs, order=order)
    paths = write_report(
        rows,
        runs,
        dest or out,
        header=ablation_header(runs, rows, manifest),
        basename=ABLATION,
        title=f"Ablation: {Path(out).name}",
    )
    return runs, rows, paths


def rebuild_ablation(
    out: Path, dest: Path | None = None
) -> tuple[list[Run], list[Row], dict[str, Path]]:
    """The ablation's report again, from its manifest and the rung folders: the same table,
    header and plots the runner wrote (`python -m gpt2x.report <ablation folder>`)."""
    path = Path(out) / f"{ABLATION}.json"
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest.get("rungs"), list):
            raise KeyError("rungs")
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
        raise ReportError(f"{path} is unreadable: {e}") from None
    return write_ablation(Path(out), manifest, dest)


# --------------------------------------------------------------------------------------------
# CLI


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m gpt2x.report",
        description="Comparison table and plots from run records (record.json + metrics.jsonl).",
    )
    p.add_argument("folders", nargs="+", help="run folders, or folders holding run folders")
    p.add_argument(
        "--out",
        help="output folder (default: the folder given, or with several a new "
        "outputs/reports/<date>_<time> folder: never inside one of the runs)",
    )
    p.add_argument("--baseline", help="name of the reference run (default: the first row)")
    p.add_argument(
        "--x",
        dest="x",
        metavar="KEY",
        help="sweep mode: dotted config key to plot against (writes sweep.png)",
    )
    p.add_argument(
        "--basename", default="ablation", help="name of the .md/.csv files (default: ablation)"
    )
    p.add_argument("--order", help="comma-separated run names: the table order")
    p.add_argument(
        "--warmup",
        type=int,
        help="steps skipped before timing (default: trainer.warmup_steps_for_timing)",
    )
    p.add_argument("--title", help="title of the markdown / W&B report")
    p.add_argument(
        "--figure",
        action="store_true",
        help="the lecture's results figure of each run folder (loss and HellaSwag vs tokens, "
        "with the GPT-2/GPT-3 baselines) into <folder>/reproduction.png",
    )
    p.add_argument(
        "--target-loss",
        type=float,
        help="s_to_target: step time to reach this training loss (default: the baseline's last)",
    )
    p.add_argument("--wandb", action="store_true", help="also save a W&B report (needs network)")
    p.add_argument("--project", help="W&B project (default: from the records)")
    p.add_argument("--entity", help="W&B entity (default: from the records, else your default)")
    p.add_argument("--group", help="W&B group to compare (default: the runs' group)")
    return p.parse_args(argv)


def draw_figures(folders: Sequence[str], out: str | None) -> int:
    """`--figure`: gpt2x.lab.figure.plot_reproduction for every run folder given."""
    for folder in folders:
        dest = Path(out) / f"{Path(folder).name}.png" if out else Path(folder) / "reproduction.png"
        try:
            dest.parent.mkdir(parents=True, exist_ok=True)
            print(f"wrote {plot_reproduction(folder, dest)}")
        except (FigureError, OSError) as e:
            _err(one_line(e))
            return 2
    return 0


def default_out(folders: Sequence[str]) -> Path:
    """One folder (an ablation, a sweep, a run): the report goes beside its runs. Several: a
    new folder of its own, so comparing runs A and B never writes into run A."""
    if len(folders) == 1:
        return Path(folders[0])
    return Path("outputs") / "reports" / time.strftime("%Y-%m-%d_%H-%M-%S")


def _err(msg: str) -> None:
    print(f"gpt2x.report: error: {msg}", file=sys.stderr)


def _is_plain_ablation_rebuild(args: argparse.Namespace) -> bool:
    """One ablation folder (gpt2x.ablate's ablation.json) and no option that changes the table."""
    changed = (args.x, args.order, args.baseline, args.warmup, args.title)
    return (
        len(args.folders) == 1
        and is_ablation_folder(Path(args.folders[0]))
        and args.basename == ABLATION
        and not any(v is not None for v in changed)
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.figure:
        return draw_figures(args.folders, args.out)
    try:
        out = Path(args.out) if args.out else default_out(args.folders)
        if _is_plain_ablation_rebuild(args):
            # an ablation folder: its own header, order and title, from ablation.json
            runs, rows, paths = rebuild_ablation(Path(args.folders[0]), out)
        else:
            runs = load_runs(args.folders)
            order = [s.strip() for s in args.order.split(",") if s.strip()] if args.order else None
            rows = summarize(
                runs,
                baseline=args.baseline,
                warmup=args.warmup,
                order=order,
                x=args.x,
                target_loss=args.target_loss,
            )
            baseline = args.baseline or next((r["name"] for r in rows if r["median_ms"]), None)
            paths = write_report(
                rows,
                runs,
                out,
                header=build_header(runs, baseline),
                basename=args.basename,
                x=args.x,
                title=args.title,
                target_loss=args.target_loss,
            )
    except ReportError as e:
        _err(str(e))
        return 2
    except OSError as e:
        _err(one_line(e))
        return 2
    print(markdown_table(rows, shown_columns(rows, columns_of(rows, args.x))[0]))
    print("wrote " + ", ".join(str(p) for p in paths.values()))
    if not args.wandb:
        return 0

    reason = wandb_report.offline_reason()
    if reason:
        _err(f"W&B report not saved: {reason}; the local report is complete")
        return 1
    try:
        url = wandb_report.save(
            runs,
            project=args.project,
            entity=args.entity,
            group=args.group,
            title=args.title,
            rows=rows,
        )
    except ReportError as e:
        _err(str(e))
        return 1
    print(f"W&B report: {url}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
