"""Checkpoint storage: atomic write, verification, finding the checkpoint to load.

Layout and atomicity are described in gpt2x/checkpoint/__init__.py. Only rank 0 writes; every
function here that decides something for a distributed job decides on rank 0 and broadcasts.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.distributed as torch_dist

from gpt2x.config import ConfigError
from gpt2x.record.failure import one_line
from gpt2x.record.folder import fsync_dir, kill_for_test

log = logging.getLogger("gpt2x.checkpoint")

FORMAT = "gpt2x-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; one line naming the folder/file and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# the ranks of a job: `d` is its gpt2x.training.distributed.Dist, or None for one process


def is_main(d: Any) -> bool:
    return d is None or d.is_main


def broadcast(obj: Any, d: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if d is None or not d.is_distributed:
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# writing


def _hash_file(path: Path) -> tuple[int, str]:
    h = hashlib.sha256()
    size = 0
    with open(path, "rb") as f:
        while chunk := f.read(1 << 22):
            h.update(chunk)
            size += len(chunk)
    return size, h.hexdigest()


def _fsync_file(path: Path) -> None:
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


def save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _write_file(path: Path, writer: Callable[[Any, Path], None], obj: Any) -> dict:
    """Write one file, fsync it, return its size and sha256 (read back from disk). Whatever
    a writer raises for a failed write (safetensors' own error, torch.save's RuntimeError "...
    unexpected pos" on a full disk) becomes an OSError with the reason."""
    try:
        writer(obj, path)
        _fsync_file(path)
    except OSError:
        raise
    except Exception as e:  # noqa: BLE001 - the libraries' own error types for a failed write
        text = " ".join(str(e).split())
        full = "No space left" in text or "StorageFull" in text or _disk_full(path.parent)
        if full:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)) from None
        raise OSError(errno.EIO, f"{type(e).__name__}: {text[:200]}") from None
    size, digest = _hash_file(path)
    return {"bytes": size, "sha256": digest}


def _disk_full(folder: Path) -> bool:
    try:
        return shutil.disk_usage(folder).free < (1 << 20)
    except OSError:
        return False


def estimate_bytes(n_params: int) -> int:
    """One checkpoint of an fp32 model trained with AdamW: weights + 2 moments, plus slack."""
    return 12 * int(n_params) + (1 << 20)




def write_checkpoint(root: Path, final: Path, files: list, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step_*.tmp"):  # left by a killed or failed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{final.name}.tmp"
    tmp.mkdir()
    try:
        meta["files"] = {}
        for name, writer, obj in files:
            meta["files"][name] = _write_file(tmp / name, writer, obj)
            kill_for_test("in_checkpoint", meta["step"])  # GPT2X_TEST_KILL (tests only)
        # meta.json last: its presence (after the rename) is what makes the folder a checkpoint
        _write_file(tmp / META_FILE, save_json, meta)
        fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed at the very end)
            old = root / f"{final.name}.old.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        fsync_dir(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def list_checkpoints(root: str | Path) -> list[tuple[int, Path]]:
    """(step, folder) of every folder that looks like a checkpoint (has meta.json), by step."""
    root = Path(root)
    out = []
    if root.is_dir():
        for p in root.iterdir():
            m = _STEP_DIR.match(p.name)
            if m and p.is_dir() and (p / META_FILE).is_file():
                out.append((int(m.group(1)), p))
    return sorted(out)


def prune(root: Path, keep_last: int) -> None:
    """Delete all but the newest keep_last checkpoints (meta.json first: never half-valid)."""
    found = list_checkpoints(root)
    for _, path in found[: max(0, len(found) - keep_last)]:
        with contextlib.suppress(OSError):
            (path / META_FILE).unlink()
        shutil.rmtree(path, ignore_errors=True)
        log.info("removed old checkpoint %s (trainer.keep_last=%d)", path, keep_last)


# ---------------------------------------------------------------------------------------------
# reading and verifying


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    meta_file = path / META_FILE
    if not path.is_dir():
        raise CheckpointError(f"no checkpoint at {path} (no such folder)")
    if not meta_file.is_file():
        raise CheckpointError(
            f"{path} is not a complete checkpoint (no {META_FILE}: an interrupted save?); "
            "use an older checkpoint"
        )
    try:
        meta = json.loads(meta_file.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {meta_file} is unreadable ({e})") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT or "files" not in meta:
        raise CheckpointError(f"{meta_file} is not a gpt2x checkpoint description")
    if int(meta.get("version", 0)) > VERSION:
        raise CheckpointError(
            f"{path} has checkpoint format version {meta['version']}; this gpt2x reads up to "
            f"{VERSION}: upgrade gpt2x"
        )
    return meta


def verify(path: str | Path, meta: dict | None = None, full: bool = True) -> dict:
    """Check every file listed in meta.json: present, same size, and (full) same sha256."""
    path = Path(path)
    meta = meta or read_meta(path)
    for name, info in meta["files"].items():
        f = path / name
        if not f.is_file():
            raise CheckpointError(f"checkpoint file {f} is missing; use an older checkpoint")
        size = f.stat().st_size
        if size != info["bytes"]:
            raise CheckpointError(
                f"checkpoint file {f} is truncated or corrupted ({size} bytes, meta.json says "
                f"{info['bytes']}); use an older checkpoint"
            )
        if full:
            _, digest = _hash_file(f)
            if digest != info["sha256"]:
                raise CheckpointError(
                    f"checkpoint file {f} is corrupted (sha256 {digest[:12]}... differs from "
                    f"meta.json's {info['sha256'][:12]}...); use an older checkpoint"
                )
    return meta


def set_aside_newer(run_dir: str | Path, step: int) -> Path | None:
    """Move the run folder's checkpoints of steps after `step` (and step folders without a
    meta.json) into `checkpoints/abandoned-<time>/`: a run resumed from `step` continues one
    history, and neither `latest` nor `keep_last` sees the abandoned branch again. Returns that
    folder, or None when there was nothing to move."""
    root = checkpoints_dir(run_dir)
    newer = [
        p
        for p in (root.iterdir() if root.is_dir() else [])
        if (m := _STEP_DIR.match(p.name)) and p.is_dir() and int(m.group(1)) > step
    ]
    if not newer:
        return None
    aside = root / f"abandoned-{time.strftime('%Y%m%d-%H%M%S')}-after-{step_dir_name(step)}"
    aside.mkdir()
    for p in newer:
        os.replace(p, aside / p.name)
    fsync_dir(root)
    return aside


def latest(run_dir: str | Path, full: bool = True) -> Path | None:
    """The newest checkpoint of a run folder that verifies; broken ones are skipped (warned)."""
    root = checkpoints_dir(run_dir)
    for p in sorted(root.glob("step_*")) if root.is_dir() else []:
        if _STEP_DIR.match(p.name) and p.is_dir() and not (p / META_FILE).is_file():
            log.warning("skipping checkpoint %s: it has no %s (an interrupted save?)", p, META_FILE)
    for _, path in reversed(list_checkpoints(root)):
        try:
            verify(path, full=full)
            return path
        except CheckpointError as e:
            log.warning("skipping checkpoint: %s", e)
    return None


def resolve(path: str | Path) -> Path:
    """A checkpoint folder from a checkpoint folder, a `checkpoints/` folder or a run folder."""
    p = Path(path).expanduser()
    if p.name.endswith(".tmp"):
        raise CheckpointError(f"{p} is an unfinished checkpoint (a save was interrupted)")
    if (p / META_FILE).is_file() or _STEP_DIR.match(p.name):
        return p
    for root in (p, checkpoints_dir(p)):
        found = list_checkpoints(root)
        if found:
            for _, ckpt in reversed(found):
                try:
                    verify(ckpt, full=False)
                    return ckpt
                except CheckpointError as e:
                    log.warning("skipping checkpoint: %s", e)
            raise CheckpointError(f"no intact checkpoint in {root}")
    if not p.exists():
        raise CheckpointError(f"no checkpoint at {p} (no such file or folder)")
    raise CheckpointError(
        f"no checkpoint at {p} (expected a step_NNNNNN folder with {META_FILE}, or a run "
        "folder with checkpoints/)"
    )


def resolve_resume(resume: str, run_dir: str | Path, dist: Any = None) -> Path | None:
    """trainer.resume -> the checkpoint to load, or None for a fresh start (rank 0 decides).

    "" starts fresh; "auto" takes the newest intact checkpoint of this run folder, or starts
    fresh if there is none yet (a first launch under `torchrun --max-restarts`); anything
    else is a checkpoint folder or a run folder (its newest checkpoint).
    """
    resume = (resume or "").strip()
    if not resume:
        if is_main(dist) and list_checkpoints(checkpoints_dir(run_dir)):
            log.warning(
                "%s already has checkpoints; this run starts fresh and its checkpoints replace "
                "or mix with them (trainer.resume=auto would continue instead)",
                run_dir,
            )
        return None
    found: str | None = None
    error: str | None = None
    if is_main(dist):
        try:
            if resume == "auto":
                p = latest(run_dir)
                found = str(p) if p is not None else None
                if p is None:
                    log.info(
                        "trainer.resume=auto: no checkpoint in %s yet, starting fresh",
                        checkpoints_dir(run_dir),
                    )
            else:
                p = resolve(resume)
                verify(p)
                found = str(p)
        except CheckpointError as e:
            error = f"trainer.resume={resume}: {e}"
    found, error = broadcast((found, error), dist)
    if error:
        raise CheckpointError(error)
    return Path(found) if found else None


def torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means a bad file
        why = one_line(e) or type(e).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read ({why})") from None


def read_config(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {f} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {f} is unreadable ({e})") from None



# ---------------------------------------------------------------------------------------------
# preflight: an unusable output folder is a one-line error before any compute


def preflight(run_dir: str | Path, n_params: int, checkpoints: int, dist: Any = None) -> None:
    """Fail early (ConfigError, on every rank) if the run folder is unwritable or has no room
    for `checkpoints` checkpoints at once (the most the run will hold: keep_last + the one being
    written). Rank 0 checks (it is the one that writes)."""
    error = None
    if is_main(dist):
        try:
            _preflight(Path(run_dir), n_params, checkpoints)
        except ConfigError as e:
            error = str(e)
    error = broadcast(error, dist)
    if error:
        raise ConfigError(error)


def _preflight(run_dir: Path, n_params: int, checkpoints: int) -> None:
    fix = "set paths.output_dir=... (or hydra.run.dir=...) to a writable folder with free space"
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        probe = run_dir / f".write_test.{os.getpid()}"
        with open(probe, "wb") as f:
            f.write(b"ok")
            f.flush()
            os.fsync(f.fileno())
        probe.unlink()
    except OSError as e:
        raise ConfigError(
            f"cannot write to the run folder {run_dir} ({e.strerror or e}); {fix}"
        ) from None
    if not checkpoints:
        return
    # checkpoints the folder already holds (a resumed run) are part of the peak already
    held = len(list_checkpoints(checkpoints_dir(run_dir)))
    need = (checkpoints - min(held, checkpoints - 1)) * estimate_bytes(n_params)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"the run folder {run_dir} has {free / 1e9:.2f} GB free, but {checkpoints} "
            f"checkpoint{'s' if checkpoints > 1 else ''} of this {n_params / 1e6:.1f}M-parameter "
            f"model at once (trainer.keep_last + the one being written) need ~{need / 1e9:.2f} "
            f"GB; {fix} (or lower trainer.keep_last, or trainer.checkpoint_every=0 "
            "trainer.save_final=false to save none)"
        )
