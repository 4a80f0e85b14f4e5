"""Preemption: SIGTERM / SIGUSR1 (what SLURM and cloud schedulers send before a kill) become a
flag the trainer checks at each step boundary, so it saves a checkpoint and stops cleanly."""

from __future__ import annotations

import signal
import threading
from typing import Any

import torch
import torch.distributed as torch_dist

from gpt2x.checkpoint.store import dist_on


class StopSignals:
    """SIGTERM / SIGUSR1 (what SLURM and cloud preemption send) only set a flag; the trainer
    checks `requested()` at each step boundary, saves a checkpoint and stops cleanly.

    Handlers are installed only in the main thread (Python allows no other) and the previous
    handlers are restored on exit, so in-process callers (tests, notebooks) are unaffected.
    """

    NAMES = ("SIGTERM", "SIGUSR1")

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, Any] = {}

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
        self.signum = self.signum or signum  # no logging here: a handler may interrupt a log call

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum else ""

    def requested(self, d: Any = None) -> bool:
        """True if any rank got a stop signal (ranks agree: one tiny all-reduce when distributed)."""
        if dist_on(d):
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=d.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped cleanly by a signal: 128 + signal number."""
    return 128 + int(signum)


