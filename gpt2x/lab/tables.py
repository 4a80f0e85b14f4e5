"""The tables of a report, formatted (docs/report.md): each cell of a row (gpt2x.lab.summary)
as the markdown table shows it and as the CSV keeps it, which columns the markdown shows, the
step-time breakdown table and the header lines. Torch-free; nothing here computes a number.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2x import stats
from gpt2x.lab.summary import COLUMNS, Row
from gpt2x.measure import CATEGORIES

# in the markdown table, columns holding one value in every row are said once above it
CONSTANT_COLUMNS = ("status", "repeats", "steps", "world_size")
# a sweep's markdown table: what a sweep compares (the CSV keeps every column)
SWEEP_MD_COLUMNS = (
    "name",
    "status",
    "error",
    "repeats",
    "steps",
    "median_ms",
    "tokens_per_s",
    "tokens_per_s_ci",
    "speedup_vs_baseline",
    "speedup_vs_baseline_ci",
    "peak_mem_gb",
    "loss",
    "val_loss",
    "world_size",
    "best",
)


def sweep_key(rows: Sequence[Row]) -> str | None:
    """The swept config key of a sweep's rows (the column that is not one of COLUMNS)."""
    if rows and "best" in rows[0]:
        return next((k for k in rows[0] if k not in COLUMNS and k != "best"), None)
    return None


def columns_of(rows: Sequence[Row], x: str | None = None) -> list[str]:
    """The table's columns: COLUMNS, with the swept key after `name` and `best` in a sweep
    (found in the rows when x is not given)."""
    if x is None:
        x = sweep_key(rows)
    if x is None:
        return list(COLUMNS)
    return ["name", x, *COLUMNS[1:], "best"]


# --------------------------------------------------------------------------------------------
# Cells


def cell(col: str, value: Any) -> str:
    """A cell for the markdown table."""
    if value is None:
        return ""
    if col == "best":
        return "★" if value else ""
    if col == "noise":
        return "within noise" if value else ""
    if isinstance(value, stats.Interval):
        if value.lo is None or value.hi is None:
            return ""
        if not value.reported:
            return f"too few repeats ({value.n})"
        if col == "tokens_per_s_ci":
            return f"±{value.half_width_pct:.1f}%"
        return f"{value.lo:.2f}-{value.hi:.2f}x"
    if isinstance(value, bool):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if col in ("median_ms", "p10_ms", "p90_ms", "compile_s"):
        return f"{value:.1f}"
    if col in ("tokens_per_s", "wall_tokens_per_s"):
        return f"{value:,.0f}"
    if col in ("mfu", "mfu_measured"):
        return f"{100 * value:.1f}%"
    if col.startswith("speedup"):
        return f"{value:.2f}x"
    if col == "peak_mem_gb":
        return f"{value:.2f}"
    if col in ("loss", "val_loss"):
        return f"{value:.4f}"
    if col in ("loss_vs_baseline", "loss_vs_prev"):
        return f"{value:+.4f}"
    if col == "s_to_target":
        return f"{value:.1f}"
    text = str(value)
    return text.replace("|", "\\|").replace("\n", " ")


def csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, stats.Interval):  # "lo..hi" (empty without a reported interval)
        return f"{value.lo!r}..{value.hi!r}" if value.reported else ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def shown_columns(rows: Sequence[Row], columns: Sequence[str]) -> tuple[list[str], dict]:
    """What the markdown table shows (the CSV keeps every column): the columns with a value in
    some row, without the config hash (each row's is under "Runs"), in a sweep only what a
    sweep compares (SWEEP_MD_COLUMNS and the swept key; no `name` where it only repeats the
    swept value), and without the CONSTANT_COLUMNS that hold one value in every row, returned
    apart ({column: cell}) to be said once."""
    x = sweep_key(rows)
    if x is not None:
        columns = [c for c in columns if c in SWEEP_MD_COLUMNS or c == x]
        if all(row["name"] == f"{x}={row.get(x)}" for row in rows):
            columns.remove("name")
    cells = {c: [cell(c, row.get(c)) for row in rows] for c in columns}
    keep = [c for c in columns if c == "best" or c != "config_hash" and any(cells[c])]
    constant = {
        c: cells[c][0]
        for c in keep
        if c in CONSTANT_COLUMNS and len(rows) > 1 and len(set(cells[c])) == 1
    }
    return [c for c in keep if c not in constant], constant


def markdown_table(rows: Sequence[Row], columns: Sequence[str] | None = None) -> str:
    """The rows as a markdown table (default: every column of columns_of); the best row of a
    sweep in bold."""
    columns = columns_of(rows) if columns is None else columns
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [cell(c, row.get(c)) for c in columns]
        if row.get("best"):
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def write_csv(path: Path, rows: Sequence[Row], columns: Sequence[str]) -> Path:
    """Every column of every row, numbers in full precision (repr)."""
    with open(path, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(columns)
        for row in rows:
            writer.writerow([csv_cell(row.get(c)) for c in columns])
    return path


# --------------------------------------------------------------------------------------------
# Around the table


def header_lines(header: dict) -> list[str]:
    """The header's facts as a markdown list (a fact with several values, one per line)."""
    md = []
    for key, value in header.items():
        if isinstance(value, (list, tuple)):
            if len(value) == 1:
                md.append(f"- **{key}**: {value[0]}")
            else:
                md.append(f"- **{key}**:")
                md.extend(f"  - {v}" for v in value)
        else:
            md.append(f"- **{key}**: {value}")
    return md


def breakdown_table(breakdowns: Sequence[dict]) -> list[str]:
    """Markdown lines: each row's step time split by category (ms per step, share)."""
    rows = [b for b in breakdowns if b["breakdown"]]
    if not rows:
        return []
    cats = list(CATEGORIES)
    lines = [
        "## Where the step time goes (ms per profiled step, gpt2x.training.profiling)",
        "",
        "| name | step ms | " + " | ".join(cats) + " |",
        "|" + "---|" * (len(cats) + 2),
    ]
    for b in rows:
        bd = b["breakdown"]
        cells = [
            f"{bd['categories'].get(c, 0.0):.1f} ({100 * bd['categories'].get(c, 0.0) / bd['step_ms']:.0f}%)"
            if bd["step_ms"]
            else ""
            for c in cats
        ]
        lines.append(f"| {b['name']} | {bd['step_ms']:.1f} | " + " | ".join(cells) + " |")
    return [*lines, ""]
