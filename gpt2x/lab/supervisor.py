"""One supervisor for child processes: the ablation runner's rungs, the torchrun launcher's sweep
jobs and the GPU check's sections (benchmarks/gpu/check.py). Imports no torch and no Hydra.

A `Child` runs in a session of its own (the terminal's Ctrl-C reaches this process only), its
output copied line by line, as it comes, to its log (`LogFile`: the file, and the console when
echoed). `watch` waits for children and winds them down however the wait ends: past the timeout
with SIGTERM, on an interrupt of this process (Ctrl-C, or a signal that `signals_raise` turned
into `Interrupted`) with the signal the caller names (the trainer records itself as interrupted
on SIGINT), on any other error with SIGKILL; a child that outlives its grace gets SIGTERM, then
SIGKILL. `exit_reason` says in one line why a child failed.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpt2x.record.failure import is_oom, oom_reason

INTERRUPT_GRACE_S = 60.0  # after Ctrl-C, how long a child may take to record how it ended
TIMEOUT_GRACE_S = 30.0  # past its timeout, how long a child may take to stop on SIGTERM


class Interrupted(Exception):
    """SIGINT/SIGTERM reached this process (see `signals_raise`)."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def signals_raise() -> Iterator[None]:
    """Inside: SIGINT and SIGTERM raise Interrupted (in the main thread), so a runner winds its
    children down and writes what it has before it stops."""
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)


class LogFile:
    """A child's log: its command line first, then its output; echoed to the console, each
    line after `echo`, unless echo is None."""

    def __init__(self, path: str | Path, cmd: Sequence[str], echo: str | None = None):
        self.path = Path(path)
        self.echo = echo
        self.file = open(self.path, "w", encoding="utf-8", errors="replace")  # noqa: SIM115
        self.file.write("$ " + shlex.join(cmd) + "\n")
        self.file.flush()

    def __call__(self, line: str) -> None:
        self.file.write(line)
        self.file.flush()
        if self.echo is not None:
            sys.stdout.write(self.echo + line)
            sys.stdout.flush()

    def close(self) -> None:
        self.file.close()

    def text(self) -> str:
        return self.path.read_text(encoding="utf-8", errors="replace")


class Child:
    """A child process in a session of its own, every line of its output (stdout and stderr)
    handed to `output` as it comes, from a thread of its own."""

    def __init__(
        self,
        cmd: Sequence[str],
        output: Callable[[str], None],
        *,
        env: dict | None = None,
        cwd: str | Path | None = None,
        pass_fds: Sequence[int] = (),
    ):
        self.cmd = list(cmd)
        self.output = output
        self.proc = subprocess.Popen(
            self.cmd,
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
            pass_fds=tuple(pass_fds),
        )
        self.reader = threading.Thread(target=self._copy, daemon=True)
        self.reader.start()

    def _copy(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output(line)

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def wait(self, timeout: float | None = None) -> int:
        return self.proc.wait(timeout=timeout)

    def stop(self, first: int = signal.SIGTERM, grace_s: float = TIMEOUT_GRACE_S) -> None:
        """`first` to the child's process group, then SIGTERM, then SIGKILL, each after the
        previous one's grace; another interrupt while waiting moves on to the next at once."""
        steps = [(first, grace_s)]
        if first not in (signal.SIGTERM, signal.SIGKILL):
            steps.append((signal.SIGTERM, 20.0))
        if first != signal.SIGKILL:
            steps.append((signal.SIGKILL, 5.0))
        stop_process_group(self.proc, steps, interrupts=(Interrupted, KeyboardInterrupt))

    def close(self) -> int:
        """Wait for the child, then for the last of its output (its log is closed)."""
        self.proc.wait()
        self.reader.join(timeout=10)
        close = getattr(self.output, "close", None)
        if close is not None:
            close()
        return self.proc.returncode


def start(
    cmd: Sequence[str],
    log_path: str | Path,
    *,
    echo: str | None = None,
    env: dict | None = None,
    pass_fds: Sequence[int] = (),
) -> Child:
    """A child logged to `log_path` (see LogFile)."""
    log = LogFile(log_path, cmd, echo)
    try:
        return Child(cmd, log, env=env, pass_fds=pass_fds)
    except BaseException:
        log.close()
        raise


@dataclass
class Ended:
    """How a `watch` ended: normally, past the timeout, or by an interrupt of this process."""

    timed_out: bool = False
    interrupted: Interrupted | None = None
    seconds: float = 0.0


def watch(
    children: list[Child],
    wait: Callable[[], object],
    *,
    on_interrupt: int = signal.SIGINT,
    interrupt_grace_s: float = INTERRUPT_GRACE_S,
) -> Ended:
    """Run `wait()` (it returns once the children are done; past their time it raises
    subprocess.TimeoutExpired or TimeoutError; it may start them, appending to `children`),
    then wind down every child however it ended (see the module docstring). Every child has
    exited and its log is closed when this returns; an error other than a timeout or an
    interrupt is raised again after that."""
    ended = Ended()
    t0 = time.monotonic()
    try:
        wait()
    except (subprocess.TimeoutExpired, TimeoutError):
        ended.timed_out = True
        for child in children:
            child.stop(signal.SIGTERM, TIMEOUT_GRACE_S)
    except (Interrupted, KeyboardInterrupt) as e:
        ended.interrupted = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        for child in children:
            child.stop(on_interrupt, interrupt_grace_s)
    except BaseException:
        for child in children:
            child.stop(signal.SIGKILL, 5.0)
        raise
    finally:
        for child in children:
            child.close()
    ended.seconds = round(time.monotonic() - t0, 2)
    return ended


def stop_process_group(
    proc: subprocess.Popen,
    steps: Sequence[tuple[int, float]],
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> None:
    """Send each (signal, seconds to wait) of `steps` in turn to the process group led by `proc`
    (started with start_new_session=True) until it has exited. An interrupt while waiting
    moves on to the next signal at once (a second Ctrl-C escalates)."""
    for sig, wait_s in steps:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except interrupts:
            continue


# --------------------------------------------------------------------------------------------
# why a child failed, in one line


def timeout_reason(seconds: float, option: str) -> str:
    return f"timed out after {seconds:g} s ({option})"


def failure_from_log(text: str, returncode: int) -> str:
    """The one-line reason a child failed, from its output and exit status: the trainer's own
    `error:` line, else the last exception line of a traceback, else the signal."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the trainer's own one-line errors (expected problems: bad setting, bad data, ...)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    # a Python exception: the last "SomeError: message" line of a traceback
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line) and "torchrun" not in line:
            return line
    m = re.search(r"Signal (\d+) \((SIG\w+)\) received", text)
    if m:
        return f"killed by {m.group(2)} (signal {m.group(1)})"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"torchrun exited with status {returncode}"


def exit_reason(text: str, returncode: int, micro_batch_size: Any = None) -> str:
    """failure_from_log, with what running out of memory looks like from outside: an
    out-of-memory error names the micro batch (when given), a SIGKILL says it may be the
    kernel's OOM killer."""
    reason = failure_from_log(text, returncode)
    if is_oom(reason):
        return reason if micro_batch_size is None else oom_reason(reason, micro_batch_size)
    if "SIGKILL" in reason and "memory" not in reason.lower():
        reason += " (out of memory? the kernel's OOM killer sends SIGKILL)"
    return reason
