"""Taking turns with other runs, step by step (`gpt2x.ablate interleave=steps`): both ends of
the protocol. Imports no torch (the ablation runner, in gpt2x.lab, holds the other end).

The ablation runner starts the single-process rungs of one repeat together, each as its own
`python -m gpt2x.train` process, and hands out turns (`take_turns`): one rung's step, then
another's, ... in a shuffled order each round. A run waits for its turn at every step boundary
(`Turns.next`; the first turn is its setup) and says when the turn is over; so step j of every
rung runs within seconds of step j of the others, while each run keeps its own process, memory
and caches exactly as a run on its own does. The runner passes two pipe ends in GPT2X_TURN_FDS
("go,done", `Seat.env`): the run reads one byte from `go` to start a turn and writes one byte
to `done` to end it: "." for a step, "!" for its last turn, after which the runner waits for the
process to exit (its teardown would otherwise slow the next rung's step). Without the variable
every call of the run's end is a no-op.
"""

from __future__ import annotations

import contextlib
import os
import random
import select
import time
from collections.abc import Callable, Sequence

ENV_FDS = "GPT2X_TURN_FDS"
ENV_GROUP = "GPT2X_TURN_GROUP"  # the id the report pairs steps by (runs sharing the turns)
GO = b"g"  # what the runner writes to `go`: a turn starts
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
        if os.read(self.go_fd, 1) != GO:
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


# --------------------------------------------------------------------------------------------
# the runner's end


class Seat:
    """The runner's end of one run's turns: it writes `go` to start a turn and reads `done`."""

    def __init__(self, group: str = ""):
        go_r, self.go = os.pipe()
        self.done, done_w = os.pipe()
        # the run's ends: passed to its process (pass_fds), let go of here once it has started
        self.run_fds: tuple[int, ...] = (go_r, done_w)
        self.env = {ENV_FDS: f"{go_r},{done_w}", ENV_GROUP: group}

    def started(self) -> None:
        """The run's process holds its ends now."""
        for fd in self.run_fds:
            os.close(fd)
        self.run_fds = ()

    def turn(self, timeout: float | None) -> bytes:
        """Give the run one turn and wait until it says the turn is over: STEP, LAST, or b""
        when it is gone (it ended or crashed). TimeoutError past `timeout` seconds."""
        try:
            os.write(self.go, GO)
        except OSError:  # the run closed its end: it has ended
            return b""
        ready, _, _ = select.select([self.done], [], [], timeout)
        if not ready:
            raise TimeoutError(f"a run's turn took longer than {timeout:g} s")
        return os.read(self.done, 1)

    def no_more_turns(self) -> None:
        """A run waiting for a turn reads end-of-file and stops (TurnsClosed)."""
        if self.go >= 0:
            with contextlib.suppress(OSError):
                os.close(self.go)
            self.go = -1

    def close(self) -> None:
        self.no_more_turns()
        for fd in (self.done, *self.run_fds):
            with contextlib.suppress(OSError):
                os.close(fd)
        self.done, self.run_fds = -1, ()


def take_turns(
    seats: Sequence[Seat],
    seed: object,
    timeout: float | None = None,
    on_last: Callable[[int], None] | None = None,
) -> None:
    """Hand out turns until every run has ended: each round, every run still going gets one
    turn, in an order shuffled afresh (seeded by `seed` and the round), so no run always
    follows the same other one. on_last(i): run i said its turn was its last. Past `timeout`
    seconds in all: no more turns for anyone, and TimeoutError."""
    t0 = time.monotonic()
    going = list(range(len(seats)))
    rounds = 0
    try:
        while going:
            order = list(going)
            random.Random(f"{seed}:{rounds}").shuffle(order)
            rounds += 1
            for i in order:
                left = None if timeout is None else timeout - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    raise TimeoutError(f"the runs took longer than {timeout:g} s")
                said = seats[i].turn(left)
                if said != STEP:
                    going.remove(i)
                    if said == LAST and on_last is not None:
                        on_last(i)
    except TimeoutError:
        for seat in seats:
            seat.no_more_turns()
        raise
