"""What ran, for a report's header: hardware, versions, git commits, commands, dates (the
distinct values over the runs); for an ablation also its ladder, how it measured, each rung's
config hash and how it was interrupted (from ablation.json). Torch-free.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from typing import Any

from gpt2x.lab.runs import Run, config_value, distinct, number
from gpt2x.lab.summary import Row


def _measured_peak(peaks: Any) -> str:
    """`mfu_measured`'s denominator and when it was probed: a probe on a busy machine reads low
    (MFU high), so two runs' MFU compare only against the same probe."""
    measured = number(peaks.get("measured")) if isinstance(peaks, dict) else None
    if not measured:
        return ""
    when = peaks.get("probed_at") if isinstance(peaks.get("probed_at"), dict) else {}
    dates = sorted({str(t) for t in when.values() if t}) or ["at an unknown time"]
    return f"; measured peak {measured / 1e12:.2f} TFLOP/s (probed {' / '.join(dates)})"


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
        if h.get("cpu_isa_limits"):  # the CPU's kernels were capped to an older instruction set
            line += "; " + ", ".join(f"{k}={v}" for k, v in h["cpu_isa_limits"].items())
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

    starts = sorted(distinct(r.record.get("started_at") for r in runs))
    failed = sum(not r.ok for r in runs)
    header = {
        "date": dt.datetime.now().astimezone().isoformat(timespec="seconds"),
        "runs": f"{len(runs)} ({failed} not completed)" if failed else str(len(runs)),
        "started": f"{starts[0]} .. {starts[-1]}" if starts else None,
        "hardware": distinct(hw(r) for r in runs),
        "versions": distinct(ver(r) for r in runs),
        "git": distinct(git(r) for r in runs),
        "commands": _capped(distinct(r.record.get("command") for r in runs)),
        "baseline": baseline,
    }
    return {k: v for k, v in header.items() if v not in (None, "", [])}


def ablation_header(runs: Sequence[Run], rows: Sequence[Row], manifest: dict) -> dict:
    """The ablation's own lines (ladder, exact command, measurement, seeds, config hashes,
    interruption) followed by the report's (date, hardware, versions, git, commands)."""
    rungs = manifest.get("rungs") or []
    ladder = manifest.get("ladder")
    overridden = bool(manifest.get("overrides"))
    if ladder:
        ladder_line = f"{ladder} ({manifest.get('ladder_file')})"
        if manifest.get("description") and not overridden:
            ladder_line += f": {manifest['description']}"
    else:
        ladder_line = "rungs given on the command line"
    # what ran, from the records: the ladder's description names its own shape, which the
    # overrides for every rung may have changed
    shape = ", ".join(distinct(_shape(r) for r in runs)) or None
    if shape and overridden and ladder and manifest.get("description"):
        shape += f" (set by the overrides for every rung; the ladder's: {manifest['description']})"
    repeated = (manifest.get("repeats") or 1) > 1
    seeds = sorted({str(config_value(r.config, "trainer.seed")) for r in runs if r.config})
    header: dict[str, Any] = {
        "ablation": manifest.get("name"),
        "ladder": ladder_line,
        "ablate command": f"`{manifest['command']}`",
        "measured": (
            f"{manifest['steps']} optimizer steps per rung after {manifest['warmup']} warm-up "
            "steps (trainer.warmup_steps_for_timing), "
            f"{manifest.get('repeats', 1)} interleaved repeat(s) per rung "
            + (
                "(interleave=steps: per repeat, the single-process rungs ran together, each its own "
                "process, taking turns step by step, and a speed-up pairs their steps; ddp/fsdp "
                "rungs ran alone)"
                if manifest.get("interleave") == "steps"
                else "as fresh processes"
            )
            + "; compile time is compile_s, outside the measured steps"
        ),
        "shape": shape,
        "seeds": ", ".join(seeds) if seeds else None,
        "overrides for every rung": " ".join(manifest["overrides"]) or "none",
        "config hashes": [
            f"{r['index']:02d} {r['short']}"
            + (f" repeat {r.get('repeat', 0)}" if repeated else "")
            + f": {r.get('config_hash') or 'n/a'} ({r['status']})"
            for r in rungs
            if r["status"] != "not run"
        ],
    }
    not_run = [r["short"] for r in rungs if r["status"] == "not run"]
    stopped = [r["short"] for r in rungs if r["status"] == "interrupted"]
    if manifest.get("interrupted"):
        header["interrupted"] = (
            f"by {manifest['interrupted']}"
            + (f" during {', '.join(stopped)}" if stopped else "")
            + (f"; not run: {', '.join(not_run)}" if not_run else "")
        )
    multi = [r for r in rows if (r.get("world_size") or 1) > 1 and r.get("median_ms")]
    if multi:
        header["note"] = (
            f"{', '.join(r['name'] for r in multi)}: every rank runs the base rung's B x T, so "
            "a step holds world_size times the tokens of a 1-process step (the speed-up columns "
            "are tokens/s ratios, so they count that)"
        )
    baseline = next((r["name"] for r in rows if r["median_ms"]), None)
    header.update(build_header(runs, baseline))
    return {k: v for k, v in header.items() if v not in (None, "", [])}


def _shape(run: Run) -> str | None:
    """The model and batch a run trained: `2 layers x 64 wide, 2 heads, T=32, B=4`."""
    model, trainer = run.config.get("model"), run.config.get("trainer")
    if not isinstance(model, dict) or not isinstance(trainer, dict) or "n_layer" not in model:
        return None
    return (
        f"{model['n_layer']} layers x {model.get('n_embd')} wide, {model.get('n_head')} heads, "
        f"T={trainer.get('seq_len')}, B={trainer.get('micro_batch_size')}"
    )
