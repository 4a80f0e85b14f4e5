"""Taking turns with other runs, step by step (`gpt2x.ablate interleave=steps`).

The ablation runner starts the single-process rungs of one repeat together, each as its own
`python -m gpt2x.train` process, and hands out turns: one rung's step, then another's, ... in
a shuffled order each round. A run waits for its turn at every step boundary (the first turn
is its setup) and says when the turn is over; so step j of every rung runs within seconds of
step j of the others, while each run keeps its own process, memory and caches exactly as a
run on its own does. The runner passes two pipe ends in GPT2X_TURN_FDS ("go,done"): the run
reads one byte from `go` to start a turn and writes one byte to `done` to end it: "." for a
step, "!" for its last turn, after which the runner waits for the process to exit (its
teardown would otherwise slow the next rung's step). Without the variable every call is a no-op.
"""

from __future__ import annotations

import contextlib
import os

ENV_FDS = "GPT2X_TURN_FDS"
ENV_GROUP = "GPT2X_TURN_GROUP"  # the id the report pairs steps by (runs sharing the turns)
STEP, LAST = b".", b"!"  # what the run writes to `done` at the end of a turn / its last turn


class TurnsClosed(RuntimeError):
    """The runner handing out the turns is gone (it was stopped or crashed)."""


class Turns:
    """This run's side of the turns: `next()` at each step boundary, `finish()` at the end."""

    def __init__(self, go_fd: int | None = None, done_fd: int | None = None, group: str = ""):
        self.go_fd, self.done_fd, self.group = go_fd, done_fd, group
        self.in_turn = False

    @classmethod
    def from_env(cls) -> Turns:
        value = os.environ.get(ENV_FDS, "")
        if not value:
            return cls()
        try:
            go, done = (int(v) for v in value.split(","))
        except ValueError:
            raise ValueError(
                f"{ENV_FDS}={value!r}: expected two file descriptors 'go,done'"
            ) from None
        return cls(go, done, os.environ.get(ENV_GROUP, ""))

    @property
    def active(self) -> bool:
        return self.go_fd is not None

    def info(self) -> dict | None:
        """What the run record says: the runs of one group took turns step by step."""
        return {"id": self.group} if self.active else None

    def next(self) -> None:
        """End the current turn (if any) and wait for the next one."""
        if not self.active:
            return
        if self.in_turn:
            self._done()
        if os.read(self.go_fd, 1) != b"g":
            raise TurnsClosed("the ablation runner handing out turns is gone; the run stops here")
        self.in_turn = True

    def finish(self) -> None:
        """End the last turn ("the run is ending") and let go of the pipes (safe to call twice)."""
        if not self.active:
            return
        if self.in_turn:
            with contextlib.suppress(OSError):  # the runner is gone: nobody waits for this turn
                self._done(LAST)
        for fd in (self.go_fd, self.done_fd):
            with contextlib.suppress(OSError):
                os.close(fd)  # type: ignore[arg-type]
        self.go_fd = self.done_fd = None

    def _done(self, signal: bytes = STEP) -> None:
        self.in_turn = False
        os.write(self.done_fd, signal)  # type: ignore[arg-type]
