"""The run folder's files and their one owner (see docs/run-record.md). Imports no torch.

A run folder holds `record.json` (what ran, how it ended, its summary), `metrics.jsonl` (one row
per optimization step) and `eval.jsonl` (one row per evaluation). Everything that writes or
reads them goes through here: the trainer (`RunRecord`), resume (`truncate_jsonl`) and the
report (`read_record`, `read_jsonl`); the record of a job that dies before or without finishing
its own is gpt2x.record.failure's.

record.json is replaced atomically (tmp file + rename) so a killed run never leaves it half
written; the jsonl files are appended and flushed row by row so a killed run keeps every step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import errno
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt2x import REPO_ROOT, __version__

RECORD = "record.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
SAMPLES = "samples.jsonl"  # the periodic samples (trainer.sample_every), one row per sample
LOCK = ".lock"  # held (flock) by the process that runs in the folder
# a little disk space held back, freed to write the failed record when the disk fills up
RESERVE = ".space_reserve"
RESERVE_BYTES = 1 << 20
SCHEMA = 1


class RunFolderError(RuntimeError):
    """The run folder cannot be used as asked (in use, or it holds another run); the message
    is one line naming the fix. Raised before anything in the folder is changed."""


# --------------------------------------------------------------------------------------------
# atomic files


def fsync_dir(d: Path) -> None:
    """Make a rename inside `d` durable (a no-op where directories cannot be fsynced)."""
    with contextlib.suppress(OSError):
        fd = os.open(d, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a per-process tmp file, fsync, rename: readers see the old or the new file.
    A failed write (a full disk) removes its tmp file and leaves the old file as it was."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise
    fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode())


def write_json(path: Path, obj: Any) -> None:
    """JSON (NaN/inf as strings, so the file stays valid JSON), replaced atomically."""
    atomic_write_text(path, json.dumps(json_safe(obj), indent=2, default=str) + "\n")


def json_safe(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


# --------------------------------------------------------------------------------------------
# what a record says about where it ran


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


def config_hash(config: dict) -> str:
    """Hash of what determines a run's result (paths and logging excluded). precision=auto's
    dtype is left out: the config asked for "auto", whatever a machine made of it (a repeat
    that failed before choosing is the same configuration as those that chose)."""
    relevant = {k: v for k, v in config.items() if k not in ("paths", "logger")}
    precision = relevant.get("precision")
    if isinstance(precision, dict) and precision.get("name") == "auto":
        relevant["precision"] = {k: v for k, v in precision.items() if k != "dtype"}
    canonical = json.dumps(relevant, sort_keys=True, default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def git_info(root: Path = REPO_ROOT) -> dict:
    def git(*args: str) -> str | None:
        try:
            out = subprocess.run(
                ["git", *args], cwd=root, capture_output=True, text=True, timeout=10
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
        return out.stdout.strip() if out.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": bool(status) if status is not None else None}


def versions() -> dict:
    """Package versions from their metadata (no import: this layer never loads torch)."""

    def version(name: str) -> str | None:
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None

    out = {"python": platform.python_version(), "gpt2x": __version__}
    for name in ("torch", "hydra-core", "omegaconf", "transformers", "tiktoken", "wandb", "numpy"):
        out[name.removesuffix("-core")] = version(name)
    return out


def command_line() -> str:
    return " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])


# --------------------------------------------------------------------------------------------
# claiming a run folder: one run per folder, one process at a time

_held: dict[str, int] = {}  # run folders whose lock this process holds: resolved path -> fd


def describe_run(run_dir: str | Path) -> str | None:
    """"a completed run of 8 logged steps" if the folder holds a run (logged steps or
    checkpoints), else None. Hydra's .hydra/, the log, and the record of a start that failed
    before its first step hold nothing a new run could lose."""
    run_dir = Path(run_dir)
    record = read_record(run_dir)
    steps = len(read_jsonl(run_dir / METRICS))
    ckpts = (run_dir / "checkpoints").is_dir() and any(
        p.name.startswith("step_") for p in (run_dir / "checkpoints").iterdir()
    )
    if not steps and not ckpts:
        return None
    status = (record or {}).get("status") or "unrecorded"
    return f"a {status} run of {steps} logged step{'s' if steps != 1 else ''}" + (
        " with checkpoints" if ckpts else ""
    )


def lock_run_folder(run_dir: str | Path) -> None:
    """Hold <run_dir>/.lock (an exclusive flock) for as long as this process lives, or until
    `release_run_folder`: a second process is refused at once, and the lock of a killed process
    goes with it (nothing is left stuck). Idempotent within a process."""
    run_dir = Path(run_dir)
    key = str(run_dir.resolve())
    if key in _held:
        return
    try:
        import fcntl
    except ImportError:  # not POSIX: no lock
        return
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as e:
        raise RunFolderError(
            f"cannot write to the run folder {run_dir} ({e.strerror or e}); set "
            "paths.output_dir=... (or hydra.run.dir=...) to a writable folder with free space"
        ) from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        holder = os.read(fd, 200).decode(errors="replace").strip() or "another process"
        os.close(fd)
        raise RunFolderError(
            f"the run folder {run_dir} is in use by {holder}; wait for that run to end, or "
            "choose another folder (hydra.run.dir=...)"
        ) from None
    os.ftruncate(fd, 0)
    os.write(fd, f"process {os.getpid()} on {socket.gethostname()} since {now()}".encode())
    _held[key] = fd


def release_run_folder(run_dir: str | Path) -> None:
    fd = _held.pop(str(Path(run_dir).resolve()), None)
    if fd is not None:
        os.close(fd)  # closing the descriptor drops the flock


def claim_run_folder(run_dir: str | Path, resume: str, move_aside: bool = False) -> str | None:
    """Take the run folder for a run, before anything in it is written (rank 0 calls it).

    A folder in use by a live process is refused. A folder that holds a run is continued only
    with trainer.resume (auto, or one of its own checkpoints); a fresh start there is refused,
    or with move_aside the old run is renamed to `<folder>-old-<time>` first. Raises
    RunFolderError (one line); returns a line to log when a run was moved aside."""
    run_dir = Path(run_dir)
    if run_dir.exists():
        lock_run_folder(run_dir)  # in use -> RunFolderError before anything else
    held = describe_run(run_dir) if run_dir.exists() else None
    resume = (resume or "").strip()
    moved = None
    if held and resume and resume != "auto":
        theirs = Path(resume).expanduser().resolve()
        if run_dir.resolve() not in (theirs, *theirs.parents):
            release_run_folder(run_dir)
            raise RunFolderError(
                f"{run_dir} holds {held}, and trainer.resume={resume} is another run's "
                "checkpoint; resume into a new folder (hydra.run.dir=...) to keep both runs"
            )
    elif held and not resume:
        if not move_aside:
            release_run_folder(run_dir)
            raise RunFolderError(
                f"{run_dir} already holds {held}; continue it with trainer.resume=auto, choose "
                "another folder (hydra.run.dir=...), or move the old run aside with "
                "trainer.move_aside=true"
            )
        aside = run_dir.with_name(f"{run_dir.name}-old-{dt.datetime.now():%Y%m%d-%H%M%S}")
        os.replace(run_dir, aside)
        release_run_folder(run_dir)  # the old lock went with the old run
        moved = f"moved {held} aside: {run_dir} -> {aside}"
    lock_run_folder(run_dir)
    reserve_space(run_dir)
    return moved


def reserve_space(run_dir: Path) -> None:
    """Hold RESERVE_BYTES in the folder, so that a full disk can still get its failed record."""
    path = run_dir / RESERVE
    with contextlib.suppress(OSError):
        if not path.is_file() or path.stat().st_size < RESERVE_BYTES:
            with open(path, "wb") as f:
                f.write(b"\0" * RESERVE_BYTES)


def release_reserve(run_dir: Path) -> bool:
    """Free the reserved space (the disk is full); True if there was some."""
    try:
        (run_dir / RESERVE).unlink()
        return True
    except OSError:
        return False


# --------------------------------------------------------------------------------------------
# fault injection for the tests of what a kill leaves behind (tests/test_reliability.py)

TEST_KILL_ENV = "GPT2X_TEST_KILL"  # "<point>@<step>", e.g. "before_checkpoint@4"


def kill_for_test(point: str, step: int) -> None:
    """SIGKILL this process at a chosen point of step `step` when GPT2X_TEST_KILL names it:
    the way a test kills a run between two writes that must not be torn apart."""
    if os.environ.get(TEST_KILL_ENV) == f"{point}@{step}":
        os.kill(os.getpid(), 9)


# --------------------------------------------------------------------------------------------
# a failed rank's own reason (torchrun): rank 0's record names the rank that failed, not the
# "connection closed by peer" that rank 0 saw when that rank's process went away


def _launch() -> str:
    return f"{os.environ.get('TORCHELASTIC_RUN_ID', '')}:{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}"


def note_rank_failure(run_dir: str | Path, rank: int, error: str) -> None:
    """A non-zero rank's one-line reason, written before its process exits (and so before its
    peers see the connection go)."""
    with contextlib.suppress(OSError):
        path = Path(run_dir) / f".failed_rank{rank}.json"
        atomic_write_text(path, json.dumps({"launch": _launch(), "error": error}))


def rank_failures(run_dir: str | Path) -> dict[int, str]:
    """{rank: reason} noted by this launch's failed ranks."""
    out = {}
    for path in Path(run_dir).glob(".failed_rank*.json"):
        with contextlib.suppress(OSError, ValueError, KeyError):
            note = json.loads(path.read_text())
            if note["launch"] == _launch():
                out[int(path.stem.removeprefix(".failed_rank"))] = str(note["error"])
    return dict(sorted(out.items()))


# --------------------------------------------------------------------------------------------
# writing


class RunRecord:
    """record.json + metrics.jsonl + eval.jsonl of one run folder (rank 0 writes).

    A write that fails (a full disk) raises RunFolderError naming the file, after taking back
    a half-written row; `finish` frees the folder's reserved space to record the failure."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.data: dict[str, Any] = {}
        self._files: dict[str, Any] = {}  # METRICS / EVAL: open for appending

    def start(self, **fields: Any) -> None:
        if not self.enabled:
            return
        self.dir.mkdir(parents=True, exist_ok=True)
        self.data = {
            "schema": SCHEMA,
            "status": "running",
            "error": None,
            "command": command_line(),
            "started_at": now(),
            "ended_at": None,
            **fields,
        }
        if "config" in fields:
            self.data["config_hash"] = config_hash(fields["config"])
        self._flush()
        self._open()

    def _open(self) -> None:
        # append mode: a resumed run continues the same files (truncated to its step first)
        self._files = {name: open(self.dir / name, "a") for name in (METRICS, EVAL)}  # noqa: SIM115

    def update(self, **fields: Any) -> None:
        if self.enabled:
            self.data.update(fields)
            self._flush()

    def log_step(self, row: dict) -> None:
        self._append(METRICS, row)

    def log_eval(self, row: dict) -> None:
        self._append(EVAL, row)

    def log_sample(self, step: int, text: str) -> None:
        if self.enabled:
            with open(self.dir / SAMPLES, "a", encoding="utf-8") as f:
                self._write_row(f, SAMPLES, {"step": step, "text": text})

    def _append(self, name: str, row: dict) -> None:
        f = self._files.get(name)
        if f is not None:
            self._write_row(f, name, row)

    def _write_row(self, f: Any, name: str, row: dict) -> None:
        """One whole row or none: a failed write is cut back to where the row began."""
        start = f.tell()
        try:
            f.write(json.dumps(json_safe(row)) + "\n")
            f.flush()
        except OSError as e:
            with contextlib.suppress(OSError):
                f.truncate(start)
                f.seek(start)
            raise RunFolderError(_write_error(self.dir / name, e)) from None

    def truncate(self, step: int) -> int:
        """A resumed or rolled-back run logs steps >= `step` again: drop the old rows (and any
        unreadable line a killed run left). Returns the number of rows dropped."""
        if not self.enabled:
            return 0
        for f in self._files.values():
            f.close()
        dropped = sum(truncate_jsonl(self.dir / name, step) for name in (METRICS, EVAL, SAMPLES))
        if self._files:
            self._open()
        return dropped

    def finish(self, status: str, error: str | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        self.data.update(status=status, error=error, ended_at=now(), **fields)
        try:
            self._flush()
        except RunFolderError:
            # a full disk: the reserved space is what lets the record say how the run ended
            if not release_reserve(self.dir):
                raise
            self._flush()
        for f in self._files.values():
            with contextlib.suppress(OSError):
                f.close()
        self._files = {}

    def _flush(self) -> None:
        try:
            write_json(self.dir / RECORD, self.data)
        except OSError as e:
            raise RunFolderError(_write_error(self.dir / RECORD, e)) from None


def _write_error(path: Path, e: OSError) -> str:
    fix = (
        "free space (or point hydra.run.dir elsewhere), then continue with trainer.resume=auto"
        if e.errno in (errno.ENOSPC, errno.EDQUOT)
        else "check the folder's permissions, then continue with trainer.resume=auto"
    )
    return f"cannot write {path} ({e.strerror or e}); {fix}"


# --------------------------------------------------------------------------------------------
# reading


def read_record(run_dir: str | Path) -> dict | None:
    """A run folder's record.json, or None if it is missing or unreadable."""
    try:
        data = json.loads((Path(run_dir) / RECORD).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def read_jsonl(path: str | Path) -> list[dict]:
    """JSON rows of a file; a truncated or garbled line (a killed run) ends the read."""
    rows: list[dict] = []
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    break
                if isinstance(row, dict):
                    rows.append(row)
    except FileNotFoundError:
        pass
    return rows


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Keep the rows with row["step"] < step, in order, and drop the rest: rows a killed run
    logged past its last checkpoint (the resumed run logs them again) and lines that are not
    whole JSON rows (a write cut short). Returns the number of lines dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    kept: list[bytes] = []
    dropped = 0
    for line in path.read_bytes().splitlines(keepends=True):
        if not line.strip():
            continue
        try:
            ok = line.endswith(b"\n") and int(json.loads(line)["step"]) < step
        except (ValueError, KeyError, TypeError):
            ok = False
        if ok:
            kept.append(line)
        else:
            dropped += 1
    if dropped:
        atomic_write_bytes(path, b"".join(kept))
    return dropped
