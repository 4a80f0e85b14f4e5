"""The run folder's files and their one owner (see docs/run-record.md). Imports no torch.

A run folder holds `record.json` (what ran, how it ended, its summary), `metrics.jsonl` (one row
per optimization step) and `eval.jsonl` (one row per evaluation). Everything that writes or
reads them goes through here: the trainer (`RunRecord`), the sweep and ablation runners
(`write_failed_record` when a job dies before or without finishing its record), resume
(`truncate_jsonl`) and the report (`read_record`, `read_jsonl`).

record.json is replaced atomically (tmp file + rename) so a killed run never leaves it half
written; the jsonl files are appended and flushed row by row so a killed run keeps every step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import subprocess
import sys
from collections.abc import Sequence
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt2x import REPO_ROOT, __version__

RECORD = "record.json"
METRICS = "metrics.jsonl"
EVAL = "eval.jsonl"
SAMPLES = "samples.jsonl"  # the periodic samples (trainer.sample_every), one row per sample
SCHEMA = 1


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
    """Write to a per-process tmp file, fsync, rename: readers see the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
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
    """Hash of what determines a run's result (paths and logging excluded)."""
    relevant = {k: v for k, v in config.items() if k not in ("paths", "logger")}
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
# writing


class RunRecord:
    """record.json + metrics.jsonl + eval.jsonl of one run folder (rank 0 writes)."""

    def __init__(self, run_dir: str | Path, enabled: bool = True):
        self.dir = Path(run_dir)
        self.enabled = enabled
        self.data: dict[str, Any] = {}
        self._metrics = None
        self._eval = None

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
        # append mode: a resumed run continues the same files
        self._metrics = open(self.dir / METRICS, "a")  # noqa: SIM115 - open for the run
        self._eval = open(self.dir / EVAL, "a")  # noqa: SIM115

    def update(self, **fields: Any) -> None:
        if self.enabled:
            self.data.update(fields)
            self._flush()

    def log_step(self, row: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(json_safe(row)) + "\n")
            self._metrics.flush()

    def log_eval(self, row: dict) -> None:
        if self._eval is not None:
            self._eval.write(json.dumps(json_safe(row)) + "\n")
            self._eval.flush()

    def log_sample(self, step: int, text: str) -> None:
        if self.enabled:
            with open(self.dir / SAMPLES, "a", encoding="utf-8") as f:
                f.write(json.dumps({"step": step, "text": text}) + "\n")

    def truncate(self, step: int) -> None:
        """A resumed or rolled-back run logs steps >= `step` again: drop the old rows."""
        if self.enabled:
            for name in (METRICS, EVAL, SAMPLES):
                truncate_jsonl(self.dir / name, step)

    def finish(self, status: str, error: str | None = None, **fields: Any) -> None:
        if not self.enabled:
            return
        self.data.update(status=status, error=error, ended_at=now(), **fields)
        self._flush()
        for f in (self._metrics, self._eval):
            if f is not None:
                f.close()
        self._metrics = self._eval = None

    def _flush(self) -> None:
        write_json(self.dir / RECORD, self.data)


def failed_record(
    run_dir: Path,
    error: str,
    *,
    config: dict | None,
    overrides: Sequence[str],
    command: str | None = None,
    experiment: str | None = None,
    world_size: int | None = None,
    started_at: str | None = None,
    **extra: Any,
) -> dict:
    """The record of a run that failed before (or without) the trainer writing its own: the
    fields a report needs to show it, with every measurement empty."""
    return {
        "schema": SCHEMA,
        "run_id": run_dir.name,
        "run_dir": str(run_dir),
        "experiment": experiment if experiment is not None else (config or {}).get("experiment", ""),
        "status": "failed",
        "error": error,
        "command": command or command_line(),
        "overrides": list(overrides),
        "config": config,
        "config_hash": config_hash(config) if config else None,
        "git": git_info(),
        "versions": versions(),
        "hardware": None,
        "world_size": world_size,
        "grad_accum_steps": None,
        "tokens_per_step": None,
        "started_at": started_at or now(),
        "ended_at": None,
        "compile_seconds": None,
        "summary": None,
        "wandb": None,
        **extra,
    }


def write_failed_record(
    run_dir: str | Path,
    error: str,
    config: dict | None = None,
    overrides: Sequence[str] = (),
    **fields: Any,
) -> dict:
    """Make `run_dir/record.json` say status "failed" with `error` (rank 0 only).

    A record the trainer wrote keeps everything and only gets status/error replaced; a missing
    one (a bad config, a child process that died before starting its record) gets the
    `failed_record` skeleton. Returns the record written."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    record = read_record(run_dir)
    if record is None:
        record = failed_record(run_dir, error, config=config, overrides=overrides, **fields)
    record.update(status="failed", error=error, ended_at=now())
    write_json(run_dir / RECORD, record)
    return record


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
    """Keep only the leading rows with row["step"] < step (in place: open append handles stay
    valid). A killed run may have logged steps beyond its last checkpoint; the resumed run logs
    them again. Returns the number of rows removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep = 0
    removed = 0
    data = path.read_bytes()
    offset = 0
    for line in data.splitlines(keepends=True):
        try:
            row = json.loads(line)
            ok = line.endswith(b"\n") and int(row["step"]) < step
        except (ValueError, KeyError, TypeError):
            ok = not line.strip() and line.endswith(b"\n")  # blank lines are harmless
        if not ok:
            removed = sum(1 for x in data[offset:].splitlines() if x.strip())
            break
        offset += len(line)
        keep = offset
    if keep < len(data):
        os.truncate(path, keep)
    return removed
