"""Hydra multirun sweeps: failed jobs recorded (not fatal), job folder names, the summary.

    python -m gpt2x.train -m +sweep=batch_size                  # sweeps/batch_size.yaml
    python -m gpt2x.sweep outputs/multirun/<sweep_id>           # rebuild summary.md/.csv/plots

Policy (docs/sweeps.md): in multirun mode a job that fails (bad setting, out of memory, NaN
loss, a bug) is recorded in its own run folder (record.json status "failed" + a one-line
reason) and returns `FAILED` (+inf) to the sweeper instead of raising, so the other jobs still
run and Optuna sees a trial that is worse than any real one. At the end `SweepSummary` (a Hydra
callback named in every sweeps/*.yaml) writes the summary into the sweep folder and ends the
process with exit status 1 if no job completed (0 otherwise). Nothing here runs outside
multirun mode: a single run keeps the trainer's own error handling (exit 2, tracebacks).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gpt2x.config import run_id
from gpt2x.lab.plots import plot_val_loss
from gpt2x.lab.report import write_report
from gpt2x.lab.runs import ReportError, Run, load_runs
from gpt2x.lab.summary import OBJECTIVES, summarize

log = logging.getLogger("gpt2x.sweep")

RUN_ID_ENV = "GPT2X_RUN_ID"


# --------------------------------------------------------------------------------------------
# Summary


@dataclass
class SweepResult:
    """What `write_summary` found: job counts, the best row (or None) and the files written."""

    completed: int
    failed: int
    best: dict | None
    paths: dict[str, Path]
    optuna: dict | None


def optuna_results(sweep_dir: Path) -> dict | None:
    """The Optuna sweeper's optimization_results.yaml ({name, best_params, best_value})."""
    path = Path(sweep_dir) / "optimization_results.yaml"
    if not path.is_file():
        return None
    data = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    return data if isinstance(data, dict) else None


def swept_key(sweep_dir: Path) -> str | None:
    """The one key the sweep varied: from multirun.yaml (the basic sweeper's: its params and
    command-line sweeps), else from a job's .hydra/hydra.yaml (sweeper params; the Optuna sweeper
    writes no multirun.yaml). None if there is not exactly one."""
    sweep_dir = Path(sweep_dir)
    path = sweep_dir / "multirun.yaml"
    if not path.is_file():
        path = next(iter(sorted(sweep_dir.glob("*/.hydra/hydra.yaml"))), None)
        if path is None:
            return None
    cfg = OmegaConf.load(path)
    keys = list((OmegaConf.select(cfg, "hydra.sweeper.params") or {}).keys())
    if path.name == "multirun.yaml":
        for line in OmegaConf.select(cfg, "hydra.overrides.task") or []:
            key, _, value = str(line).partition("=")
            key = key.lstrip("+~")
            if ("," in value or "(" in value) and key not in keys:
                keys.append(key)
    return keys[0] if len(keys) == 1 else None


def _loss_spread(runs: Sequence[Run]) -> float | None:
    """Largest |train loss difference| at equal steps between the completed runs (None if < 2)."""
    curves = []
    for r in runs:
        if r.ok and r.metrics:
            curves.append({m.get("step"): m.get("loss") for m in r.metrics})
    if len(curves) < 2:
        return None
    spread = 0.0
    for step, ref in curves[0].items():
        for c in curves[1:]:
            v = c.get(step)
            if isinstance(ref, (int, float)) and isinstance(v, (int, float)):
                spread = max(spread, abs(v - ref))
    return spread


def write_summary(
    sweep_dir: str | Path,
    x: str | None = None,
    objective: str = "tokens_per_s",
    basename: str = "summary",
    title: str | None = None,
) -> SweepResult:
    """summary.md, summary.csv, loss.png, tokens_per_s.png, sweep.png (x given; + val_loss.png for
    objective=val_loss) in sweep_dir,
    from the job folders' run records, via gpt2x.report. `best` marks the completed job with the
    highest tokens/s (objective=tokens_per_s) or the lowest validation loss (val_loss)."""
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
    sweep_dir = Path(sweep_dir)
    runs = load_runs(sweep_dir)
    rows = summarize(runs, x=x, objective=objective)
    best_row = next((r for r in rows if r.get("best")), None)
    optuna = optuna_results(sweep_dir)
    paths = write_report(rows, runs, sweep_dir, basename=basename, x=x, title=title)
    if x is not None and objective == "val_loss":
        paths["val_loss"] = plot_val_loss(rows, x, sweep_dir / "val_loss.png")

    completed = sum(1 for r in runs if r.ok)
    extra = ["", "## Sweep", ""]
    extra.append(
        f"- jobs: {len(runs)}, completed: {completed}, not completed: {len(runs) - completed}"
    )
    for row in rows:
        if row["status"] != "completed" or row.get("error"):
            extra.append(f"  - {row['name']}: {row['status']} ({row.get('error') or 'no reason'})")
    if best_row is not None and objective == "val_loss":
        extra.append(
            f"- best by validation loss: {best_row['name']} ({x}={best_row.get(x)}), "
            f"val loss {best_row['val_loss']:.4f}"
        )
    spread = _loss_spread(runs)
    if spread is not None and objective == "tokens_per_s":
        extra.append(
            f"- train-loss curves of the completed jobs differ by at most {spread:.2e} at equal "
            "steps (same total batch per step: the same optimization, only speed and memory differ)"
        )
    if optuna is not None:
        extra += ["", "## Optuna", ""]
        if "best_params" in optuna:
            params = ", ".join(f"{k}={v}" for k, v in (optuna.get("best_params") or {}).items())
            extra.append(f"- best value (validation loss): {optuna.get('best_value')}")
            extra.append(f"- best params: {params}")
        else:
            extra.append(f"- Pareto solutions: {optuna.get('solutions')}")
        extra.append("- from `optimization_results.yaml` (written by the Optuna sweeper)")
    with open(paths["md"], "a", encoding="utf-8") as f:
        f.write("\n".join(extra) + "\n")
    return SweepResult(completed, len(runs) - completed, best_row, paths, optuna)


def plain_optuna_logs() -> None:
    """optuna logs through a handler of its own whose colorlog formatter colours every line
    whatever the stream (it is given none): tell the formatter its stream, so a terminal keeps
    the colours and a file or a pipe (a SLURM log, `2> sweep.log`) gets plain lines."""
    try:
        import optuna
    except ImportError:  # no Optuna sweeper installed: nothing logs through optuna
        return
    for handler in optuna.logging.get_logger("optuna").handlers:
        stream = getattr(handler, "stream", None)
        if stream is not None and hasattr(handler.formatter, "stream"):
            handler.formatter.stream = stream


class SweepSummary(Callback):
    """Hydra callback (sweeps/*.yaml, `hydra.callbacks`): one sweep id for all processes, and
    the summary in the sweep folder when the multirun ends.

    x: the swept config key (default: found in multirun.yaml). objective: what `best` means,
    "tokens_per_s" (highest) or "val_loss" (lowest). fail_if_none_completed: exit status 1 when
    no job completed (after writing the summary).
    """

    def __init__(
        self,
        x: str | None = None,
        objective: str = "tokens_per_s",
        basename: str = "summary",
        fail_if_none_completed: bool = True,
    ):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {OBJECTIVES}, not {objective!r}")
        self.x = x
        self.objective = objective
        self.basename = basename
        self.fail_if_none_completed = fail_if_none_completed

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # worker processes (joblib, submitit, torchrun children) must resolve the same sweep id
        os.environ.setdefault(RUN_ID_ENV, run_id())
        plain_optuna_logs()

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        x = self.x or swept_key(sweep_dir)
        try:
            result = write_summary(sweep_dir, x=x, objective=self.objective, basename=self.basename)
        except ReportError as e:
            log.error("sweep summary: %s", e)
            result = None
        else:
            log.info(
                "sweep summary: %d completed, %d not completed; %s",
                result.completed,
                result.failed,
                result.paths["md"],
            )
            if result.best is not None:
                log.info("best: %s (%s=%s)", result.best["name"], x, result.best.get(x))
        if self.fail_if_none_completed and (result is None or result.completed == 0):
            log.error("no job of the sweep completed (see the job folders' record.json)")
            sys.exit(1)


# --------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gpt2x.sweep",
        description="Rebuild a sweep's summary (summary.md/.csv, plots) from its job folders.",
    )
    p.add_argument("sweep_dir", help="the sweep folder (outputs/multirun/<sweep_id>)")
    p.add_argument("--x", help="the swept config key (default: from multirun.yaml)")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="what `best` means (default: val_loss for an Optuna sweep, else tokens_per_s)",
    )
    p.add_argument("--basename", default="summary")
    args = p.parse_args(argv)
    sweep_dir = Path(args.sweep_dir)
    objective = args.objective or (
        "val_loss" if (sweep_dir / "optimization_results.yaml").is_file() else "tokens_per_s"
    )
    try:
        result = write_summary(
            sweep_dir,
            x=args.x or swept_key(sweep_dir),
            objective=objective,
            basename=args.basename,
        )
    except ReportError as e:
        print(f"gpt2x.sweep: error: {e}", file=sys.stderr)
        return 2
    print(Path(result.paths["md"]).read_text())
    print("wrote " + ", ".join(str(p) for p in result.paths.values()))
    return 0 if result.completed else 1


if __name__ == "__main__":
    sys.exit(main())
