"""How a failure is told, in one place for the trainer, the sweep launchers and the ablation
runner: in one line (`one_line`, `error_line`), an out-of-memory one naming the micro batch that
ran out (`oom_reason`), in the run folder (`write_failed_record`, the record of a run that ended
without finishing its own) and to a sweeper (`FAILED`). Imports no torch.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from gpt2x.record.folder import (
    RECORD,
    SCHEMA,
    command_line,
    config_hash,
    git_info,
    now,
    read_record,
    versions,
    write_json,
)

# what a failed job of a Hydra multirun returns to the sweeper: Optuna minimizes the validation
# loss, and +inf is worse than any trial that ran
FAILED = float("inf")
# what an allocator says when it runs out (CUDA's "CUDA out of memory", the CPU allocator's
# "DefaultCPUAllocator: can't allocate memory")
OUT_OF_MEMORY = ("out of memory", "can't allocate memory")


def one_line(text: object) -> str:
    """The first non-empty line of a message (an exception's, a log's), stripped; "" if none."""
    return next((line.strip() for line in str(text).splitlines() if line.strip()), "")


def error_line(e: BaseException) -> str:
    """An exception as a one-line reason: `TypeName: the first line of its message`."""
    return f"{type(e).__name__}: {one_line(e)}"


def is_oom(text: object) -> bool:
    return any(words in str(text).lower() for words in OUT_OF_MEMORY)


def oom_reason(reason: str, micro_batch_size: Any) -> str:
    """An out-of-memory reason names the micro batch that ran out (what a user changes); any
    other reason stays as it is."""
    if not is_oom(reason) or "at micro_batch_size=" in reason:
        return reason
    kind = "CUDA" if "cuda" in reason.lower() else "CPU"
    return f"{kind} out of memory at micro_batch_size={micro_batch_size} ({reason})"


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
    status: str = "failed",
    **fields: Any,
) -> dict:
    """Make `run_dir/record.json` say how a run ended that did not complete: `status` ("failed";
    the ablation runner's "n/a" and "interrupted" too) with the one-line `error` (rank 0 only).

    A record the trainer wrote keeps everything and only gets status/error replaced; a missing
    one (a bad config, a child process that died before starting its record) gets the
    `failed_record` skeleton, with `fields` added. Returns the record written."""
    run_dir = Path(run_dir)
    if os.environ.get("RANK", "0") != "0":
        return {}
    run_dir.mkdir(parents=True, exist_ok=True)
    record = read_record(run_dir)
    if record is None:
        record = failed_record(run_dir, error, config=config, overrides=overrides, **fields)
    record.update(status=status, error=error, ended_at=now())
    write_json(run_dir / RECORD, record)
    return record
