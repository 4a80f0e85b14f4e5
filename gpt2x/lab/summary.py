"""The numbers of a comparison (docs/report.md): one row per configuration from the loaded runs
(gpt2x.lab.runs), repeats pooled, intervals and paired speed-ups (gpt2x.stats); and what else a
report shows of a row: its folders, its step-time breakdown, its loss curve. Torch-free; the
tables are gpt2x.lab.tables', the plots gpt2x.lab.plots', the files gpt2x.lab.report's.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypedDict

from gpt2x import measure, stats
from gpt2x.lab.runs import ReportError, Run, config_value, group_runs, number, rerun_command
from gpt2x.measure import DEFAULT_WARMUP


class Row(TypedDict):
    """One row of the table: one configuration, its repeats pooled (docs/report.md defines each
    column). None where a value is unknown or does not apply (a failed row's numbers)."""

    name: str
    status: str
    error: str | None
    repeats: str  # completed / all, e.g. "3/4"
    steps: int | None
    median_ms: float | None
    p10_ms: float | None
    p90_ms: float | None
    tokens_per_s: float | None
    tokens_per_s_ci: stats.Interval | None
    wall_tokens_per_s: float | None
    mfu: float | None
    mfu_measured: float | None
    speedup_vs_prev: float | None
    speedup_vs_prev_ci: stats.Interval | None
    speedup_vs_baseline: float | None
    speedup_vs_baseline_ci: stats.Interval | None
    noise: bool | None
    peak_mem_gb: float | None
    loss: float | None
    loss_vs_prev: float | None
    loss_vs_baseline: float | None
    s_to_target: float | None
    val_loss: float | None
    compile_s: float | None
    world_size: int | None
    config_hash: str | None


# the table's columns, in order (a sweep adds the swept key after `name`, and `best`)
COLUMNS = list(Row.__annotations__)
# what `best` means in a sweep: the highest tokens/s, or the lowest validation loss
OBJECTIVES = ("tokens_per_s", "val_loss")
# speed-up intervals: the confidence level of the paired t-interval (gpt2x.stats)
CONFIDENCE = 0.95
# s_to_target: a run reaches the target loss when its training loss comes within this fraction
# above it (rungs that compute the same thing end a few 1e-5 apart in loss; 1% is far more than
# that and far less than what a real difference in the optimization moves)
TARGET_TOLERANCE = 0.01


# --------------------------------------------------------------------------------------------
# Rows


def _warmup_for(run: Run, warmup: int | None) -> int:
    if warmup is not None:
        return max(0, int(warmup))
    w = config_value(run.config, "trainer.warmup_steps_for_timing")
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w >= 0 else DEFAULT_WARMUP


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _measured_rows(run: Run, warmup: int) -> list[dict]:
    """The metrics rows that count for timing, as the trainer counts them (gpt2x.measure.timed),
    never a profiled step (the breakdown's, last)."""
    return measure.timed([r for r in run.metrics if not r.get("profiled")], warmup)


def _values(rows: Sequence[dict], key: str) -> list[float]:
    return [v for v in (number(r.get(key)) for r in rows) if v is not None and math.isfinite(v)]


def _measure(run: Run, warmup: int) -> dict:
    """Step-time, throughput, memory and loss numbers of one run (None where unknown)."""
    rec = run.record
    summary = rec.get("summary") if isinstance(rec.get("summary"), dict) else {}
    rows = run.metrics
    steps = summary.get("steps") if not rows else None
    out: dict[str, Any] = {"steps": steps if isinstance(steps, int) else len(rows)}
    measured = _measured_rows(run, warmup)
    ms = _values(measured, "ms")
    out["ms"] = ms
    # step -> tokens/s: pairs the steps of rungs that took turns (gpt2x.training.turns)
    out["by_step"] = {
        int(r["step"]): float(r["tokens_per_s"])
        for r in measured
        if isinstance(r.get("step"), int) and (number(r.get("tokens_per_s")) or 0) > 0
    }
    if ms:
        out["median_ms"] = stats.median(ms)
    else:  # no per-step rows: fall back to the record's own summary
        out["median_ms"] = number(summary.get("median_ms"))
    tokens_per_step = number(rec.get("tokens_per_step"))
    out["tokens_per_step"] = tokens_per_step
    if tokens_per_step and out["median_ms"]:
        out["tokens_per_s"] = tokens_per_step / (out["median_ms"] / 1000.0)
    else:
        tps = _values(measured, "tokens_per_s")
        out["tokens_per_s"] = stats.median(tps) if tps else number(summary.get("tokens_per_s"))
    wall = _values(measured, "wall_tokens_per_s")
    out["wall_tokens_per_s"] = stats.median(wall) if wall else None
    for key in ("mfu", "mfu_measured"):
        vals = _values(measured, key)
        out[key] = stats.median(vals) if vals else (None if rows else number(summary.get(key)))
    mems = _values(rows, "mem_gb") or _values(rows, "rss_gb")
    out["peak_mem_gb"] = max(mems) if mems else number(summary.get("peak_mem_gb"))
    out["loss"] = number(rows[-1].get("loss")) if rows else number(summary.get("final_loss"))
    vals = _values(run.evals, "val_loss")
    out["val_loss"] = vals[-1] if vals else number(summary.get("val_loss"))
    return out


def seconds_to_loss(
    run: Run, target: float, tolerance: float = TARGET_TOLERANCE
) -> float | None:
    """Summed step time (s) until the training loss first comes within `tolerance` (a
    fraction) above `target` (None: never)."""
    reach = target * (1.0 + tolerance) if target > 0 else target * (1.0 - tolerance)
    total = 0.0
    for r in run.metrics:
        ms, loss = number(r.get("ms")), number(r.get("loss"))
        total += (ms or 0.0) / 1000.0
        if loss is not None and loss <= reach:
            return total
    return None


def _order_groups(groups: list[list[Run]], order: Sequence[str] | None) -> list[list[Run]]:
    if not order:
        return groups
    rank = {name: i for i, name in enumerate(order)}
    missing = [n for n in order if n not in {g[0].name for g in groups}]
    if missing:
        raise ReportError(f"--order names no run called {missing[0]!r}")
    return sorted(groups, key=lambda g: rank.get(g[0].name, len(rank)))  # stable


def summarize(
    runs: Sequence[Run],
    baseline: str | None = None,
    warmup: int | None = None,
    order: Sequence[str] | None = None,
    x: str | None = None,
    target_loss: float | None = None,
    objective: str = "tokens_per_s",
) -> list[Row]:
    """One row per configuration (columns: COLUMNS); the repeats of a configuration (runs that
    differ only in `repeat`) are one row, in the order of `runs` or of the names in `order`.

    Per row: the median step time over all measured steps of all completed repeats, tokens/s
    from it, a 95% t-interval of tokens/s across repeats (on logs), and speed-ups vs the
    previous completed row and vs the baseline with paired intervals (repeat i against repeat
    i, gpt2x.stats.paired_ratio); `noise` marks a speed-up whose interval includes 1.00x.
    baseline: the reference row's name (default: the first completed row). warmup: steps
    skipped before timing (default: each run's trainer.warmup_steps_for_timing, else 3).
    target_loss: `s_to_target` is the step time to come within TARGET_TOLERANCE of it (default:
    the baseline's final loss). x: a dotted config key for sweeps: adds that column and `best`
    (by `objective`: the highest tokens/s, or the lowest val_loss). Intervals from fewer than stats.MIN_REPEATS repeats are kept (their `n`
    says so) but not reported, and give no noise verdict.
    """
    groups = _order_groups(group_runs(runs), order)
    rows = []
    per_repeat: list[dict[int, float]] = []  # row -> {repeat: tokens/s}
    # row -> {repeat: (the group of rungs it took turns with or None, {step: tokens/s})}
    per_step: list[dict[int, tuple[str | None, dict[int, float]]]] = []
    for group in groups:
        first = group[0]
        row: Row = dict.fromkeys(COLUMNS)  # type: ignore[assignment]
        done = [r for r in group if r.ok]
        shown = done[0] if done else next((r for r in group if r.status != "completed"), first)
        row.update(name=first.name, status=shown.status, error=shown.error)
        if done and len(done) < len(group):  # some repeats failed: say so, use the others
            bad = next(r for r in group if not r.ok)
            row["error"] = f"{len(group) - len(done)} of {len(group)} repeats: {bad.error}"
        row["repeats"] = f"{len(done)}/{len(group)}"
        row["config_hash"] = first.record.get("config_hash")
        row["world_size"] = first.record.get("world_size")
        measured = [(r, _measure(r, _warmup_for(r, warmup))) for r in done]
        measured = [(r, m) for r, m in measured if m["median_ms"]]
        tps = {r.repeat: m["tokens_per_s"] for r, m in measured if m["tokens_per_s"]}
        per_repeat.append(tps)
        per_step.append({r.repeat: (_lockstep_id(r), m["by_step"]) for r, m in measured})
        if measured:
            pooled = [ms for _, m in measured for ms in m["ms"]]
            one = measured[0][1]
            row["steps"] = one["steps"]
            row["median_ms"] = stats.median(pooled) if pooled else one["median_ms"]
            row["p10_ms"] = stats.percentile(pooled, 10) if pooled else None
            row["p90_ms"] = stats.percentile(pooled, 90) if pooled else None
            tokens = one["tokens_per_step"]
            row["tokens_per_s"] = (
                tokens / (row["median_ms"] / 1000.0) if tokens else one["tokens_per_s"]
            )
            if len(tps) > 1:
                row["tokens_per_s_ci"] = stats.log_t_interval(list(tps.values()), CONFIDENCE)
            for key in ("wall_tokens_per_s", "mfu", "mfu_measured", "loss", "val_loss"):
                vals = [m[key] for _, m in measured if m[key] is not None]
                row[key] = stats.median(vals) if vals else None
            mems = [m["peak_mem_gb"] for _, m in measured if m["peak_mem_gb"] is not None]
            row["peak_mem_gb"] = max(mems) if mems else None
            row["compile_s"] = number(measured[0][0].record.get("compile_seconds"))
        else:
            row["steps"] = _measure(shown, _warmup_for(shown, warmup))["steps"]
            if done:  # completed but nothing measured: cannot be compared
                row["error"] = row["error"] or "no step timings in the record"
        if x is not None:
            row[x] = config_value(first.config, x)
        rows.append(row)

    good = [i for i, r in enumerate(rows) if r["median_ms"]]
    if baseline is not None:
        names = [r["name"] for r in rows]
        if baseline not in names:
            raise ReportError(f"--baseline {baseline!r} is not one of the runs: {', '.join(names)}")
        base = names.index(baseline)
        base = base if rows[base]["median_ms"] else None  # a failed baseline: nothing to compare
    else:
        base = good[0] if good else None
    if target_loss is None and base is not None:
        target_loss = rows[base]["loss"]

    prev = None
    for i, row in enumerate(rows):
        if not row["median_ms"]:
            continue
        # throughput ratios, not step-time ratios: a DDP rung's step holds N times the tokens
        if prev is None:
            row["speedup_vs_prev"] = 1.0
        else:
            row["speedup_vs_prev"] = _ratio(row["tokens_per_s"], rows[prev]["tokens_per_s"])
            row["speedup_vs_prev_ci"] = _paired(i, prev, per_repeat, per_step)
            if row["loss"] is not None and rows[prev]["loss"] is not None:
                row["loss_vs_prev"] = row["loss"] - rows[prev]["loss"]
        if base is not None:
            row["speedup_vs_baseline"] = _ratio(row["tokens_per_s"], rows[base]["tokens_per_s"])
            if i != base:
                row["speedup_vs_baseline_ci"] = _paired(i, base, per_repeat, per_step)
            if row["loss"] is not None and rows[base]["loss"] is not None:
                row["loss_vs_baseline"] = row["loss"] - rows[base]["loss"]
        ci = row["speedup_vs_prev_ci"]
        row["noise"] = stats.within_noise(ci) if ci is not None else None
        if target_loss is not None:
            times = [seconds_to_loss(r, target_loss) for r in groups[i] if r.ok]
            times = [t for t in times if t is not None]
            row["s_to_target"] = stats.median(times) if times else None
        prev = i

    if x is not None:
        done = [rows[i] for i in good]
        if objective == "val_loss":
            scored = [r for r in done if finite(r["val_loss"])]
            best = min(scored, key=lambda r: r["val_loss"], default=None)
        else:
            best = max(done, key=lambda r: r["tokens_per_s"] or 0.0, default=None)
        for row in rows:
            row["best"] = row is best  # type: ignore[typeddict-unknown-key]
    return rows


def finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and math.isfinite(v)


def _lockstep_id(run: Run) -> str | None:
    lockstep = run.record.get("lockstep")
    return str(lockstep.get("id")) if isinstance(lockstep, dict) and lockstep.get("id") else None


def _paired(
    i: int,
    j: int,
    per_repeat: list[dict[int, float]],
    per_step: list[dict[int, tuple[str | None, dict[int, float]]]],
) -> stats.Interval | None:
    """Row i against row j over the repeats both have (None with fewer than 2): per repeat the
    ratio of the repeats' tokens/s, or, where both took turns in one group (gpt2x.training.turns), the median
    of their step-by-step ratios (gpt2x.stats)."""
    common = sorted(set(per_repeat[i]) & set(per_repeat[j]))
    if len(common) < 2:
        return None
    ratios = []
    for k in common:
        (own, a), (other, b) = per_step[i].get(k, (None, {})), per_step[j].get(k, (None, {}))
        if own is not None and own == other and set(a) & set(b):
            ratios.append(stats.step_paired_ratio(a, b))
        else:
            ratios.append(per_repeat[i][k] / per_repeat[j][k])
    return stats.log_t_interval(ratios, CONFIDENCE)


# --------------------------------------------------------------------------------------------
# What else a report shows of a row


@dataclass
class Curve:
    """One line of the loss plot: a configuration's loss per step, one list per repeat."""

    label: str
    x: list[int]
    repeats: list[list[float]]  # NaN where a repeat has no row at that step
    dashed: bool = False  # did not complete


@dataclass
class Detail:
    """A row's runs: their folders, how to re-run the first, its W&B run, the step-time
    breakdown of the completed repeats (gpt2x.measure.mean_breakdown), the loss curve."""

    name: str
    folders: list[Path]
    rerun: str | None = None
    wandb_url: str | None = None
    breakdown: dict | None = None
    curve: Curve | None = None


def details(runs: Sequence[Run], rows: Sequence[Row]) -> list[Detail]:
    """A Detail per row, in the rows' order."""
    groups = {g[0].name: g for g in group_runs(runs)}
    out = []
    for row in rows:
        group = groups.get(row["name"], [])
        detail = Detail(row["name"], [r.path for r in group])
        if group:
            wandb = group[0].record.get("wandb") or {}
            detail.rerun = rerun_command(group[0])
            detail.wandb_url = wandb.get("url") if isinstance(wandb, dict) else None
        found = [r.record["breakdown"] for r in group if r.ok and isinstance(r.record.get("breakdown"), dict)]
        detail.breakdown = measure.mean_breakdown(found) if found else None
        detail.curve = _loss_curve(row, group)
        out.append(detail)
    return out


def _loss_curve(row: Row, group: Sequence[Run]) -> Curve | None:
    """Training loss vs step (one line per configuration: its repeats as a band)."""
    per_repeat = []
    for run in group:
        pts = {r.get("step"): number(r.get("loss")) for r in run.metrics}
        pts = {s: v for s, v in pts.items() if isinstance(s, int) and v is not None}
        if pts and math.isfinite(sum(pts.values())):
            per_repeat.append(pts)
    if not per_repeat:
        return None
    steps = sorted(set().union(*per_repeat))
    ok = bool(row["median_ms"])
    return Curve(
        label=row["name"] if ok else f"{row['name']} ({row['status']})",
        x=steps,
        repeats=[[c.get(s, math.nan) for s in steps] for c in per_repeat],
        dashed=not ok,
    )
