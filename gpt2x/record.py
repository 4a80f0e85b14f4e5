"""The local run record (see docs/run-record.md): written by rank 0, independent of W&B.

record.json is replaced atomically (tmp file + rename) so a killed run never leaves it half
written; metrics.jsonl is appended and flushed row by row so a killed run keeps every step.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import json
import math
import os
import platform
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import torch

from gpt2x import REPO_ROOT, __version__


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


def _clean(value: Any) -> Any:
    """JSON-safe: NaN/inf become strings so the file stays valid JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


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
    import hydra
    import omegaconf

    out = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "hydra": hydra.__version__,
        "omegaconf": omegaconf.__version__,
        "gpt2x": __version__,
    }
    for name in ("transformers", "tiktoken", "wandb", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def hardware(device: torch.device, peak_flops: float | None) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
    return {
        "device": device.type,
        "device_name": name or platform.machine(),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "hostname": socket.gethostname(),
        "peak_flops": peak_flops,
    }


def now() -> str:
    return dt.datetime.now().astimezone().isoformat(timespec="seconds")


class RunRecord:
    """record.json + metrics.jsonl + eval.jsonl in one run folder."""

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
            "schema": 1,
            "status": "running",
            "error": None,
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]]),
            "started_at": now(),
            "ended_at": None,
            **fields,
        }
        if "config" in fields:
            self.data["config_hash"] = config_hash(fields["config"])
        self._flush()
        # append mode: a resumed run continues the same files
        self._metrics = open(self.dir / "metrics.jsonl", "a")  # noqa: SIM115 - open for the run
        self._eval = open(self.dir / "eval.jsonl", "a")  # noqa: SIM115

    def update(self, **fields: Any) -> None:
        if self.enabled:
            self.data.update(fields)
            self._flush()

    def log_step(self, row: dict) -> None:
        if self._metrics is not None:
            self._metrics.write(json.dumps(_clean(row)) + "\n")
            self._metrics.flush()

    def log_eval(self, row: dict) -> None:
        if self._eval is not None:
            self._eval.write(json.dumps(_clean(row)) + "\n")
            self._eval.flush()

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
        atomic_write_text(self.dir / "record.json", json.dumps(_clean(self.data), indent=2) + "\n")


def read_jsonl(path: str | Path) -> list[dict]:
    """Rows of a JSONL file; a truncated last line (a killed run) is skipped."""
    rows = []
    try:
        with open(path) as f:
            for line in f:
                line = line.strip()
                if not line:
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:
                    break
    except FileNotFoundError:
        pass
    return rows
