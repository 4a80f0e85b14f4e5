"""The numbers of a comparison: run folders loaded, repeats grouped, one row per configuration
(docs/report.md). Torch-free: gpt2x.report writes these rows as files and plots, gpt2x.sweep and
gpt2x.ablate summarize their jobs and rungs through it.
"""

from __future__ import annotations

import datetime as dt
import json
import math
import re
import shlex
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from gpt2x import stats
from gpt2x.lab import plots
from gpt2x.record.folder import config_hash, read_jsonl

DEFAULT_WARMUP = 3
TRAIN_MODULE = "gpt2x.train"


# the table's columns, in order (a sweep adds the swept key after `name`, and `best`);
# docs/report.md defines each
COLUMNS = [
    "name",
    "status",
    "error",
    "repeats",
    "steps",
    "median_ms",
    "p10_ms",
    "p90_ms",
    "tokens_per_s",
    "tokens_per_s_ci",
    "wall_tokens_per_s",
    "mfu",
    "mfu_measured",
    "speedup_vs_prev",
    "speedup_vs_prev_ci",
    "speedup_vs_baseline",
    "speedup_vs_baseline_ci",
    "noise",
    "peak_mem_gb",
    "loss",
    "loss_vs_prev",
    "loss_vs_baseline",
    "s_to_target",
    "val_loss",
    "compile_s",
    "world_size",
    "config_hash",
]
# speed-up intervals: the confidence level of the paired t-interval (gpt2x.stats)
CONFIDENCE = 0.95
# s_to_target: a run reaches the target loss when its training loss comes within this fraction
# above it (rungs that compute the same thing end a few 1e-5 apart in loss; 1% is far more than
# that and far less than what a real difference in the optimization moves)
TARGET_TOLERANCE = 0.01
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


REPEAT_IN_NAME = re.compile(r"(?<=[_,])repeat=\d+,?")


class ReportError(RuntimeError):
    """A problem with the input (missing folder, no records); the message is one line."""


# --------------------------------------------------------------------------------------------
# Loading


@dataclass
class Run:
    """One run folder: its record.json, metrics rows, eval rows and a display name."""

    path: Path
    record: dict
    metrics: list[dict] = field(default_factory=list)
    evals: list[dict] = field(default_factory=list)
    name: str = ""
    named_by_folder: bool = False  # no `experiment`: the name is the folder's (a sweep job's)

    @property
    def status(self) -> str:
        return str(self.record.get("status") or "unknown")

    @property
    def error(self) -> str | None:
        err = self.record.get("error")
        return _one_line(str(err)) if err else None

    @property
    def ok(self) -> bool:
        """Finished normally: the only runs whose numbers are compared."""
        return self.status == "completed" and not self.error

    @property
    def config(self) -> dict:
        cfg = self.record.get("config")
        return cfg if isinstance(cfg, dict) else {}

    @property
    def repeat(self) -> int:
        r = self.config.get("repeat")
        return r if isinstance(r, int) and not isinstance(r, bool) else 0

    @property
    def group(self) -> tuple[str, str]:
        """Runs that differ only in `repeat` are repeats of one configuration: one table row."""
        if not self.config:
            return (self.name, str(self.path))
        return (self.name, config_hash({k: v for k, v in self.config.items() if k != "repeat"}))


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def _by_step(rows: list[dict]) -> list[dict]:
    """One row per step in step order; a resumed run's repeated steps keep their last row."""
    if not rows or not all(isinstance(r.get("step"), int) for r in rows):
        return rows
    last: dict[int, dict] = {}
    for r in rows:
        last[r["step"]] = r
    return [last[s] for s in sorted(last)]


def _natural_key(text: str) -> list:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", text)]


def load_run(folder: str | Path) -> Run:
    folder = Path(folder)
    record_path = folder / "record.json"
    try:
        record = json.loads(record_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ReportError(f"no record.json in {folder}") from None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"cannot read {record_path}: {_one_line(str(e))}") from None
    if not isinstance(record, dict):
        raise ReportError(f"cannot read {record_path}: not a JSON object")
    experiment = str(record.get("experiment") or "")
    return Run(
        path=folder,
        record=record,
        metrics=_by_step(read_jsonl(folder / "metrics.jsonl")),
        evals=read_jsonl(folder / "eval.jsonl"),
        name=experiment or _config_name(folder.name),
        named_by_folder=not experiment,
    )


def _config_name(folder: str) -> str:
    """A sweep job's folder (`<job num>_<overrides>`) without its job number and `repeat=N`,
    so the repeats of one configuration share a name (one row)."""
    if not REPEAT_IN_NAME.search(folder):
        return folder
    return re.sub(r"^\d+_", "", REPEAT_IN_NAME.sub("", folder)).rstrip(",") or folder


def load_runs(paths: str | Path | Iterable[str | Path]) -> list[Run]:
    """Every run under the given folders (recursively), in the order the folders are given.

    Within one folder, runs are ordered by start time (then by path, numbers compared as
    numbers). Failed runs are kept. Display names that collide get their folder name appended.
    """
    if isinstance(paths, (str, Path)):
        paths = [paths]
    runs: list[Run] = []
    seen: set[Path] = set()
    for p in paths:
        folder = Path(p)
        if not folder.exists():
            raise ReportError(f"no such folder: {folder}")
        if folder.is_file():
            if folder.name != "record.json":
                raise ReportError(f"not a folder: {folder}")
            found = [folder]
        else:
            found = list(folder.rglob("record.json"))
        if not found:
            raise ReportError(f"no record.json found under {folder}")
        here = [load_run(f.parent) for f in found if f.parent.resolve() not in seen]
        seen.update(r.path.resolve() for r in here)
        here.sort(key=lambda r: (str(r.record.get("started_at") or ""), _natural_key(str(r.path))))
        runs.extend(here)
    _what_varies(runs)
    _disambiguate(runs)
    return runs


def _what_varies(runs: list[Run]) -> None:
    """Runs without an experiment name (sweep jobs) are named by their overrides (the record's,
    else the folder's `key=value,...`), which repeat every override of the command line:
    overrides that every such run has are left out, so a name shows what varies
    (`trainer.micro_batch_size=4`). Runs that differ in nothing else keep their folder's name."""
    named = [r for r in runs if r.named_by_folder]
    if len(named) < 2:
        return
    items = [_name_items(r) for r in named]
    common = set(items[0]).intersection(*items[1:])
    for run, parts in zip(named, items):
        run.name = ",".join(p for p in parts if p not in common) or run.name


def _name_items(run: Run) -> list[str]:
    overrides = run.record.get("overrides")
    if isinstance(overrides, list) and overrides:  # `repeat` never names a row (one row)
        return [str(o) for o in overrides if not str(o).lstrip("+").startswith("repeat=")]
    return run.name.split(",")


def _disambiguate(runs: list[Run]) -> None:
    """Runs of different configurations that share a name get their folder name appended
    (repeats of one configuration keep the name: they are one row)."""
    groups: dict[str, set] = {}
    for r in runs:
        groups.setdefault(r.name, set()).add(r.group)
    for r in runs:
        if len(groups[r.name]) > 1 and r.name != r.path.name:
            r.name = f"{r.name} [{r.path.name}]"


# --------------------------------------------------------------------------------------------
# Summary rows


def _num(value: Any) -> float | None:
    """A float from a JSON value (the record writes NaN/inf as strings); None if not a number."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, (int, float)):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    return None


def config_value(config: dict, key: str) -> Any:
    """`a.b.c` looked up in a nested config dict; None where absent."""
    node: Any = config
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def _warmup_for(run: Run, warmup: int | None) -> int:
    if warmup is not None:
        return max(0, int(warmup))
    w = config_value(run.config, "trainer.warmup_steps_for_timing")
    return int(w) if isinstance(w, int) and not isinstance(w, bool) and w >= 0 else DEFAULT_WARMUP


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _measured_rows(run: Run, warmup: int) -> list[dict]:
    """The metrics rows that count for timing: the trainer's rule skips `warmup` steps but
    always keeps at least one, and never counts a profiled step (the breakdown's, last)."""
    timed = [r for r in run.metrics if not r.get("profiled")]
    return timed[min(warmup, max(0, len(timed) - 1)) :]


def _values(rows: Sequence[dict], key: str) -> list[float]:
    return [v for v in (_num(r.get(key)) for r in rows) if v is not None and math.isfinite(v)]


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
        if isinstance(r.get("step"), int) and (_num(r.get("tokens_per_s")) or 0) > 0
    }
    if ms:
        out["median_ms"] = stats.median(ms)
    else:  # no per-step rows: fall back to the record's own summary
        out["median_ms"] = _num(summary.get("median_ms"))
    tokens_per_step = _num(rec.get("tokens_per_step"))
    out["tokens_per_step"] = tokens_per_step
    if tokens_per_step and out["median_ms"]:
        out["tokens_per_s"] = tokens_per_step / (out["median_ms"] / 1000.0)
    else:
        tps = _values(measured, "tokens_per_s")
        out["tokens_per_s"] = stats.median(tps) if tps else _num(summary.get("tokens_per_s"))
    wall = _values(measured, "wall_tokens_per_s")
    out["wall_tokens_per_s"] = stats.median(wall) if wall else None
    for key in ("mfu", "mfu_measured"):
        vals = _values(measured, key)
        out[key] = stats.median(vals) if vals else (None if rows else _num(summary.get(key)))
    mems = _values(rows, "mem_gb") or _values(rows, "rss_gb")
    out["peak_mem_gb"] = max(mems) if mems else _num(summary.get("peak_mem_gb"))
    out["loss"] = _num(rows[-1].get("loss")) if rows else _num(summary.get("final_loss"))
    vals = _values(run.evals, "val_loss")
    out["val_loss"] = vals[-1] if vals else _num(summary.get("val_loss"))
    return out


def seconds_to_loss(
    run: Run, target: float, tolerance: float = TARGET_TOLERANCE
) -> float | None:
    """Summed step time (s) until the training loss first comes within `tolerance` (a
    fraction) above `target` (None: never)."""
    reach = target * (1.0 + tolerance) if target > 0 else target * (1.0 - tolerance)
    total = 0.0
    for r in run.metrics:
        ms, loss = _num(r.get("ms")), _num(r.get("loss"))
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


def group_runs(runs: Sequence[Run]) -> list[list[Run]]:
    """Runs grouped into configurations (repeats together), in first-seen order."""
    groups: dict[tuple[str, str], list[Run]] = {}
    for run in runs:
        groups.setdefault(run.group, []).append(run)
    return [sorted(g, key=lambda r: r.repeat) for g in groups.values()]


def summarize(
    runs: Sequence[Run],
    baseline: str | None = None,
    warmup: int | None = None,
    order: Sequence[str] | None = None,
    x: str | None = None,
    target_loss: float | None = None,
) -> list[dict]:
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
    (highest tokens/s). Intervals from fewer than stats.MIN_REPEATS repeats are kept (their `n`
    says so) but not reported, and give no noise verdict.
    """
    groups = _order_groups(group_runs(runs), order)
    rows = []
    per_repeat: list[dict[int, float]] = []  # row -> {repeat: tokens/s}
    # row -> {repeat: (the group of rungs it took turns with or None, {step: tokens/s})}
    per_step: list[dict[int, tuple[str | None, dict[int, float]]]] = []
    for group in groups:
        first = group[0]
        row: dict[str, Any] = dict.fromkeys(COLUMNS)
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
            row["compile_s"] = _num(measured[0][0].record.get("compile_seconds"))
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
        best = max((rows[i] for i in good), key=lambda r: r["tokens_per_s"] or 0.0, default=None)
        for row in rows:
            row["best"] = row is best
    return rows


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


def _sweep_key(rows: Sequence[dict]) -> str | None:
    if rows and "best" in rows[0]:
        return next((k for k in rows[0] if k not in COLUMNS and k != "best"), None)
    return None


def columns_of(rows: Sequence[dict], x: str | None = None) -> list[str]:
    """The table's columns: COLUMNS, with the swept key after `name` and `best` in a sweep
    (found in the rows when x is not given)."""
    if x is None:
        x = _sweep_key(rows)
    if x is None:
        return list(COLUMNS)
    return ["name", x, *COLUMNS[1:], "best"]


# --------------------------------------------------------------------------------------------
# Header and re-run commands


def rerun_command(run: Run) -> str:
    """The command that reproduces a run: the trainer with the run's recorded overrides."""
    overrides = run.record.get("overrides") or []
    ws = run.record.get("world_size") or 1
    launch = (
        f"torchrun --standalone --nproc_per_node={ws} -m {TRAIN_MODULE}"
        if isinstance(ws, int) and ws > 1
        else f"python -m {TRAIN_MODULE}"
    )
    return " ".join([launch, *(shlex.quote(str(o)) for o in overrides)])


def _measured_peak(peaks: Any) -> str:
    """`mfu_measured`'s denominator and when it was probed: a probe on a busy machine reads low
    (MFU high), so two runs' MFU compare only against the same probe."""
    measured = _num(peaks.get("measured")) if isinstance(peaks, dict) else None
    if not measured:
        return ""
    when = peaks.get("probed_at") if isinstance(peaks.get("probed_at"), dict) else {}
    dates = sorted({str(t) for t in when.values() if t}) or ["at an unknown time"]
    return f"; measured peak {measured / 1e12:.2f} TFLOP/s (probed {' / '.join(dates)})"


def _distinct(values: Iterable[Any]) -> list[str]:
    out: list[str] = []
    for v in values:
        if v not in (None, "") and str(v) not in out:
            out.append(str(v))
    return out


def _capped(values: list[str], limit: int = 5) -> list[str]:
    if len(values) <= limit:
        return values
    return [*values[:limit], f"... and {len(values) - limit} more (re-run commands: see Runs)"]


def build_header(runs: Sequence[Run], baseline: str | None = None) -> dict:
    """What the runs ran on: hardware, versions, git commits, commands, date (distinct values)."""

    def hw(r: Run) -> str | None:
        h = r.record.get("hardware") or {}
        if not h:
            return None
        dev = f"{h.get('device_name') or h.get('device')}"
        if (h.get("device_count") or 1) > 1:
            dev += f" x{h['device_count']}"
        line = f"{dev} ({h.get('device')}); CPU {h.get('cpu')} x{h.get('cpu_count')}; host {h.get('hostname')}"
        return line + _measured_peak(h.get("peak_flops"))

    def ver(r: Run) -> str | None:
        v = r.record.get("versions") or {}
        if not v:
            return None
        return f"torch {v.get('torch')}, CUDA {v.get('cuda')}, python {v.get('python')}"

    def git(r: Run) -> str | None:
        g = r.record.get("git") or {}
        if not g.get("commit"):
            return None
        return g["commit"] + (" (dirty)" if g.get("dirty") else "")

    starts = sorted(_distinct(r.record.get("started_at") for r in runs))
    failed = sum(not r.ok for r in runs)
    header = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs": f"{len(runs)} ({failed} not completed)" if failed else str(len(runs)),
        "started": f"{starts[0]} .. {starts[-1]}" if starts else None,
        "hardware": _distinct(hw(r) for r in runs),
        "versions": _distinct(ver(r) for r in runs),
        "git": _distinct(git(r) for r in runs),
        "commands": _capped(_distinct(r.record.get("command") for r in runs)),
        "baseline": baseline,
    }
    return {k: v for k, v in header.items() if v not in (None, "", [])}


# --------------------------------------------------------------------------------------------
# What the plots get from the runs (the drawing itself is gpt2x.lab.plots: torch-free, data in)


def loss_curves(runs: Sequence[Run], rows: Sequence[dict]) -> list[plots.Curve]:
    """Training loss vs step per row (one line per configuration: its repeats as a band)."""
    groups = {g[0].name: g for g in group_runs(runs)}
    curves = []
    for row in rows:
        group = groups.get(row["name"], [])
        per_repeat = []
        for run in group:
            pts = {r.get("step"): _num(r.get("loss")) for r in run.metrics}
            pts = {s: v for s, v in pts.items() if isinstance(s, int) and v is not None}
            if pts and math.isfinite(sum(pts.values())):
                per_repeat.append(pts)
        if not per_repeat:
            continue
        steps = sorted(set().union(*per_repeat))
        ok = bool(row["median_ms"])
        curves.append(
            plots.Curve(
                label=row["name"] if ok else f"{row['name']} ({row['status']})",
                x=steps,
                repeats=[[c.get(s, math.nan) for s in steps] for c in per_repeat],
                dashed=not ok,
            )
        )
    return curves


def breakdown_table(breakdowns: Sequence[dict]) -> list[str]:
    """Markdown lines: each row's step time split by category (ms per step, share)."""
    rows = [b for b in breakdowns if b["breakdown"]]
    if not rows:
        return []
    cats = list(plots.BREAKDOWN_CATEGORIES)
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


def mean_breakdown(group: Sequence[Run]) -> dict | None:
    """The step-time breakdown a row's completed repeats recorded: each category's mean, the
    median step time."""
    found = [
        r.record["breakdown"] for r in group if r.ok and isinstance(r.record.get("breakdown"), dict)
    ]
    if not found:
        return None
    keys = [k for k in found[0]["categories"]]
    return {
        "step_ms": stats.median([b["step_ms"] for b in found]),
        "categories": {
            k: sum(b["categories"].get(k, 0.0) for b in found) / len(found) for k in keys
        },
        "steps": sum(b.get("steps", 1) for b in found),
        "device": found[0].get("device"),
    }


# --------------------------------------------------------------------------------------------
# Cells


def _fmt(col: str, value: Any) -> str:
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


def _csv_cell(value: Any) -> Any:
    if value is None:
        return ""
    if isinstance(value, stats.Interval):  # "lo..hi" (empty without a reported interval)
        return f"{value.lo!r}..{value.hi!r}" if value.reported else ""
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, (dict, list)):
        return json.dumps(value)
    return value


def shown_columns(rows: Sequence[dict], columns: Sequence[str]) -> tuple[list[str], dict]:
    """What the markdown table shows (the CSV keeps every column): the columns with a value in
    some row, without the config hash (each row's is under "Runs"), in a sweep only what a
    sweep compares (SWEEP_MD_COLUMNS and the swept key; no `name` where it only repeats the
    swept value), and without the CONSTANT_COLUMNS that hold one value in every row, returned
    apart ({column: cell}) to be said once."""
    x = _sweep_key(rows)
    if x is not None:
        columns = [c for c in columns if c in SWEEP_MD_COLUMNS or c == x]
        if all(row["name"] == f"{x}={row.get(x)}" for row in rows):
            columns.remove("name")
    cells = {c: [_fmt(c, row.get(c)) for row in rows] for c in columns}
    keep = [c for c in columns if c == "best" or c != "config_hash" and any(cells[c])]
    constant = {
        c: cells[c][0]
        for c in keep
        if c in CONSTANT_COLUMNS and len(rows) > 1 and len(set(cells[c])) == 1
    }
    return [c for c in keep if c not in constant], constant


def markdown_table(rows: Sequence[dict], columns: Sequence[str]) -> str:
    lines = [
        "| " + " | ".join(columns) + " |",
        "|" + "|".join("---" for _ in columns) + "|",
    ]
    for row in rows:
        cells = [_fmt(c, row.get(c)) for c in columns]
        if row.get("best"):
            cells[0] = f"**{cells[0]}**"
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
