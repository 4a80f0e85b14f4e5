"""Stopping cleanly: Ctrl-C (SIGINT), SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send
before a kill) become a flag the trainer checks at each step boundary, so it saves a checkpoint
and stops; a second Ctrl-C aborts at once. `continue_command` is the one line that says how to
go on from the saved checkpoint."""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from gpt2x.config import is_rank_zero, stable_run_name

log = logging.getLogger("gpt2x.train")


class StopWaiting(Exception):
    """A stop signal came while the run waited at a step boundary (`StopSignals.waiting`)."""


class StopSignals:
    """SIGINT / SIGTERM / SIGUSR1 only set a flag; the trainer checks `requested()` at each
    step boundary, saves a checkpoint and stops cleanly. A second SIGINT (Ctrl-C pressed again)
    raises KeyboardInterrupt at once: the user chose not to wait for the save.

    Handlers are installed only in the main thread (Python allows no other) and the previous
    handlers are restored on exit, so in-process callers (tests, notebooks) are unaffected.
    """

    NAMES = ("SIGINT", "SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}
        self._waiting = False
        self.announcer: threading.Thread | None = None

    def __enter__(self) -> StopSignals:
        if threading.current_thread() is threading.main_thread():
            for name in self.NAMES:
                sig = getattr(signal, name, None)  # SIGUSR1 does not exist on Windows
                if sig is not None:
                    self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: Any) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame: Any) -> None:
        if signum == signal.SIGINT and self.signum is not None:
            raise KeyboardInterrupt  # Ctrl-C again: abort now, without the checkpoint
        first = self.signum is None
        self.signum = self.signum or signum
        if first and signum == signal.SIGINT and is_rank_zero():
            # no logging in a handler (it may have interrupted a write to the same stream): a
            # thread logs once the main thread lets go of the stream's lock
            self.announcer = threading.Thread(target=_announce_ctrl_c, daemon=True)
            self.announcer.start()
        if self._waiting:
            raise StopWaiting  # the run was idle at a step boundary: stop there now

    @contextlib.contextmanager
    def waiting(self, active: bool = True) -> Iterator[None]:
        """A wait at a step boundary (the next turn of `ablate interleave=steps`, a run of one
        process): a stop signal ends it with StopWaiting instead of after the wait. Not
        active: nothing (ranks of a distributed run must agree when to stop: `requested`)."""
        if not active:
            yield
            return
        if self.signum is not None:
            raise StopWaiting
        self._waiting = True
        try:
            yield
        finally:
            self._waiting = False

    @property
    def name(self) -> str:
        if self.signum == signal.SIGINT:
            return "Ctrl-C (SIGINT)"
        return signal.Signals(self.signum).name if self.signum else ""

    def requested(self, d: Any = None) -> bool:
        """True if any rank got a stop signal (ranks agree: one tiny all-reduce when distributed)."""
        if d is not None and d.is_distributed:
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=d.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None


def _announce_ctrl_c() -> None:
    log.warning(
        "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: abort now, "
        "without saving)"
    )


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped cleanly by a signal: 128 + signal number."""
    return 128 + int(signum)


# --------------------------------------------------------------------------------------------
# how to continue


def continue_command(
    overrides: Sequence[str],
    run_dir: str | Path,
    output_dir: str | Path,
    world_size: int = 1,
    local_world_size: int | None = None,
) -> str:
    """The exact command that continues this run from its newest checkpoint: the same launch
    and overrides with `trainer.resume=auto`, plus `hydra.run.dir=<run folder>` unless that
    command finds the folder by itself (with trainer.resume=auto the run folder is named
    after the overrides: gpt2x.config.stable_run_name)."""
    kept = [o for o in overrides if _key(o) not in ("trainer.resume", "hydra.run.dir")]
    args = [*kept, "trainer.resume=auto"]
    found = Path(output_dir) / "runs" / stable_run_name(args)
    if Path(found).resolve() != Path(run_dir).resolve():
        args.append(f"hydra.run.dir={run_dir}")
    if world_size > 1:
        one_node = local_world_size in (None, world_size)
        launch = (
            f"torchrun --standalone --nproc_per_node={world_size}"
            if one_node
            else "torchrun <the same launch options>"
        )
        launch += " -m gpt2x.train"
    else:
        launch = "python -m gpt2x.train"
    return " ".join([launch, *(shlex.quote(str(a)) for a in args)])


def _key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~")
