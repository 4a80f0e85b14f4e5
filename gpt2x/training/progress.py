"""What a person watching a run sees: a live bar on a terminal, plain log lines otherwise.

The bar (rich) shows step/max, elapsed, ETA, tokens/s and the latest loss; plain lines come every
`trainer.log_every` steps (always when the output is not a terminal, e.g. a SLURM log). While
the bar is live, log lines meant for the terminal go through the bar's console (a RichHandler
in place of the terminal's stream handler), so they print above the one live bar instead of
over it; the log file keeps its plain lines. After the first measured steps the projected wall
time of the whole run is logged once.
"""

from __future__ import annotations

import logging
import statistics
import sys
import time

from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)

log = logging.getLogger("gpt2x.train")


def use_bar(mode: str, is_main: bool) -> bool:
    """trainer.progress: auto = a bar when stderr is a terminal; bar | log force one or the other."""
    return is_main and (mode == "bar" or (mode == "auto" and sys.stderr.isatty()))


def format_duration(seconds: float) -> str:
    seconds = int(round(seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h {m:02d}m {s:02d}s" if h else f"{m}m {s:02d}s"


def projected_seconds(step_ms: list[float], done: int, total: int, elapsed_s: float) -> float:
    """Elapsed time plus the remaining steps at the median of the measured steps."""
    return elapsed_s + (total - done) * statistics.median(step_ms) / 1000.0


class RunProgress:
    """The bar, or nothing (the trainer's own log lines then carry the progress)."""

    def __init__(self, enabled: bool, max_steps: int, start_step: int):
        self.max_steps, self.start = max_steps, start_step
        self.t0 = time.perf_counter()
        self.projected = False
        self.bar: Progress | None = None
        if enabled:
            self.bar = Progress(
                TextColumn("[bold]step"),
                MofNCompleteColumn(),
                BarColumn(),
                TimeElapsedColumn(),
                TextColumn("eta"),
                TimeRemainingColumn(),
                TextColumn("{task.fields[stats]}"),
                transient=False,
                console=Console(stderr=True),
                # print() to stdout shows above the bar too, unless stdout goes to a file
                redirect_stdout=sys.stdout.isatty(),
            )
            self.task = self.bar.add_task("train", total=max_steps, completed=start_step, stats="")
            self._swapped = route_terminal_logs(self.bar.console)
            self.bar.start()

    def update(self, row: dict) -> None:
        if self.bar is not None:
            stats = f"{row['tokens_per_s']:,.0f} tok/s | loss {row['loss']:.4f}"
            self.bar.update(self.task, completed=row["step"] + 1, stats=stats)

    def project(self, measured_ms: list[float], done: int) -> None:
        """Log the whole run's projected wall time once, from the first measured steps."""
        if self.projected or not measured_ms:
            return
        self.projected = True
        total = projected_seconds(
            measured_ms, done, self.max_steps, time.perf_counter() - self.t0
        )
        log.info(
            "projected wall time: %s for %d steps (%.0f ms/step measured so far)",
            format_duration(total),
            self.max_steps - self.start,
            statistics.median(measured_ms),
        )

    def close(self) -> None:
        if self.bar is not None:
            self.bar.stop()
            restore_handlers(self._swapped)
            self.bar = None


def _to_terminal(handler: logging.Handler) -> bool:
    """A stream handler writing to a terminal (Hydra's console handler), not a log file."""
    stream = getattr(handler, "stream", None)
    return (
        type(handler) is logging.StreamHandler
        and stream is not None
        and hasattr(stream, "isatty")
        and stream.isatty()
    )


def route_terminal_logs(console: Console) -> list[tuple[logging.Handler, logging.Handler]]:
    """Replace the root logger's terminal handlers with RichHandlers on `console` (the bar's):
    rich prints their lines above the live bar. Returns the (old, new) pairs to restore."""
    root = logging.getLogger()
    swapped = []
    for old in [h for h in root.handlers if _to_terminal(h)]:
        new = RichHandler(
            console=console,
            level=old.level,
            show_path=False,
            markup=False,
            log_time_format="[%Y-%m-%d %H:%M:%S]",
        )
        new.setFormatter(logging.Formatter("%(message)s"))
        root.removeHandler(old)
        root.addHandler(new)
        swapped.append((old, new))
    return swapped


def restore_handlers(swapped: list[tuple[logging.Handler, logging.Handler]]) -> None:
    root = logging.getLogger()
    for old, new in swapped:
        root.removeHandler(new)
        root.addHandler(old)
