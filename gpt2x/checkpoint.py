"""Checkpoints: atomic save, verified load, exact resume, preemption signals (docs/checkpoints.md).

One checkpoint is one folder `<run_dir>/checkpoints/step_000100/` (100 optimization steps done,
so a resumed run starts with step index 100):

    model.safetensors  the weights (tied aliases such as lm_head.weight stored once)
    optimizer.pt       AdamW state, keyed by parameter name (torch.save, weights_only-loadable)
    trainer.pt         step, tokens seen, GradScaler, train-loader position, RNG states per rank,
                       recent losses (spike check) and the batches skipped by rollbacks
    config.json        the resolved run config
    meta.json          format version, step, tokens_seen, size + sha256 of every file above;
                       written LAST: a folder without a readable meta.json is not a checkpoint

Atomicity: everything is written into `step_000100.tmp/`, each file fsync'ed, meta.json last,
then the folder is renamed to `step_000100/`. A kill or a failed write (ENOSPC, ...) leaves at
most a `*.tmp` folder, which is never considered a checkpoint and is removed by the next save;
older checkpoints are only pruned (`keep_last`) after a new one is complete.

State is gathered with `torch.distributed.checkpoint.state_dict.get_model_state_dict` /
`get_optimizer_state_dict` (full state dicts, offloaded to CPU), which work for a plain module,
DDP and FSDP2 alike; all ranks call `save`, rank 0 writes. A sharded FSDP path
(`torch.distributed.checkpoint.save` into the same folder layout) can be added inside
`save`/`restore` without changing their callers.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import random
import re
import shutil
import signal
import sys
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist

log = logging.getLogger("gpt2x.checkpoint")

FORMAT = "gpt2x-checkpoint"
VERSION = 1
MODEL_FILE = "model.safetensors"
OPTIM_FILE = "optimizer.pt"
TRAINER_FILE = "trainer.pt"
CONFIG_FILE = "config.json"
META_FILE = "meta.json"
_STEP_DIR = re.compile(r"^step_(\d{6,})$")
# wrapper prefixes that must never reach a file: torch.compile and DDP
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
LOSS_HISTORY = 50  # recent losses kept for the spike check (train.check_loss looks at 50)


class CheckpointError(RuntimeError):
    """A checkpoint cannot be written or read; one line naming the folder/file and the fix."""


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def checkpoints_dir(run_dir: str | Path) -> Path:
    return Path(run_dir) / "checkpoints"


# ---------------------------------------------------------------------------------------------
# distributed helpers (a world of one when torch.distributed is not initialised)


def _dist_on(d: Any) -> bool:
    return (
        d is not None
        and getattr(d, "world_size", 1) > 1
        and torch_dist.is_available()
        and torch_dist.is_initialized()
    )


def _is_main(d: Any) -> bool:
    return d is None or getattr(d, "is_main", True)


def _broadcast(obj: Any, d: Any) -> Any:
    """rank 0's `obj` on every rank."""
    if not _dist_on(d):
        return obj
    box = [obj]
    torch_dist.broadcast_object_list(box, src=0)
    return box[0]


# ---------------------------------------------------------------------------------------------
# state gathering


def _strip_wrappers(name: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if name.startswith(prefix):
                name, changed = name[len(prefix) :], True
        name = name.replace("._orig_mod.", ".")
    return name


def clean_keys(state: dict[str, Any]) -> dict[str, Any]:
    """Drop torch.compile (`_orig_mod.`) and DDP (`module.`) prefixes from parameter names."""
    return {_strip_wrappers(k): v for k, v in state.items()}


def tied_aliases(model: torch.nn.Module) -> dict[str, str]:
    """{alias: canonical} for parameters that appear under several names (lm_head -> wte)."""
    first: dict[int, str] = {}
    aliases: dict[str, str] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        name = _strip_wrappers(name)
        if id(p) in first:
            aliases[name] = first[id(p)]
        else:
            first[id(p)] = name
    return aliases


def _state_options(**kw: Any):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU (a collective under FSDP: every rank must call it)."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    state = get_model_state_dict(model, options=_state_options(cpu_offload=True))
    return clean_keys(state)


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state dict keyed by parameter name, on CPU (a collective)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:
        # no step taken yet: DCP would initialise the state with a zero-lr step (moments of 0
        # and step=1), which changes the rest of the run; there is nothing to gather anyway
        names = {id(p): _strip_wrappers(n) for n, p in model.named_parameters()}
        groups = [
            {
                **{k: v for k, v in g.items() if k != "params"},
                "params": [names[id(p)] for p in g["params"]],
            }
            for g in optimizer.param_groups
        ]
        return {"state": {}, "param_groups": groups}
    state = get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
    state["state"] = clean_keys(state.get("state", {}))
    for group in state.get("param_groups", []):
        group["params"] = [_strip_wrappers(p) for p in group["params"]]
    return state


def rng_state() -> dict:
    """Python, NumPy and torch (CPU + all CUDA devices) RNG states, weights_only-loadable."""
    np_state = np.random.get_state(legacy=False)
    state = {
        "python": random.getstate(),
        "numpy": {
            "bit_generator": np_state["bit_generator"],
            "key": torch.from_numpy(np.asarray(np_state["state"]["key"], np.int64)),
            "pos": int(np_state["state"]["pos"]),
            "has_gauss": int(np_state["has_gauss"]),
            "gauss": float(np_state["gauss"]),
        },
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else [],
    }
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(_as_tuple(state["python"]))
    n = state["numpy"]
    np.random.set_state(
        {
            "bit_generator": n["bit_generator"],
            "state": {"key": n["key"].numpy().astype(np.uint32), "pos": n["pos"]},
            "has_gauss": n["has_gauss"],
            "gauss": n["gauss"],
        }
    )
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available():
        cuda = list(state["cuda"])[: torch.cuda.device_count()]
        torch.cuda.set_rng_state_all(cuda)


def _as_tuple(x: Any) -> Any:
    return tuple(_as_tuple(v) for v in x) if isinstance(x, (list, tuple)) else x


def _gather_rng(d: Any) -> list[dict]:
    """Every rank's RNG state, in rank order, on rank 0 (all ranks call)."""
    mine = rng_state()
    if not _dist_on(d):
        return [mine]
    out: list[Any] = [None] * d.world_size
    torch_dist.all_gather_object(out, mine)
    return out


# ---------------------------------------------------------------------------------------------
# writing


def _fsync_dir(path: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be fsync'ed
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


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


def _save_safetensors(tensors: dict[str, torch.Tensor], path: Path) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(path), metadata={"format": "pt"})


def _save_torch(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)


def _save_json(obj: Any, path: Path) -> None:
    path.write_text(json.dumps(obj, indent=2, default=str) + "\n")


def _write_file(path: Path, writer: Callable[[Any, Path], None], obj: Any) -> dict:
    """Write one file, fsync it, return its size and sha256 (read back from disk)."""
    writer(obj, path)
    _fsync_file(path)
    size, digest = _hash_file(path)
    return {"bytes": size, "sha256": digest}


def estimate_bytes(n_params: int) -> int:
    """One checkpoint of an fp32 model trained with AdamW: weights + 2 moments, plus slack."""
    return 12 * int(n_params) + (1 << 20)


def save(
    run_dir: str | Path,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    *,
    scaler: torch.amp.GradScaler | None = None,
    loader: Any = None,
    tokens_seen: int = 0,
    config: dict | None = None,
    extra: dict | None = None,
    keep_last: int = 0,
    dist: Any = None,
) -> Path:
    """Save a checkpoint of `step` completed steps into `<run_dir>/checkpoints/step_NNNNNN/`.

    All ranks call it (gathering full state dicts is a collective under FSDP); rank 0 writes.
    `model` is the module whose parameters the optimizer holds (plain, DDP or FSDP2; compile
    wrappers are stripped). keep_last > 0 removes all but the newest keep_last checkpoints after
    the new one is complete. Raises CheckpointError on every rank if the write fails; the
    previous checkpoints are untouched then.
    """
    model_state = gather_model_state(model)
    optim_state = gather_optimizer_state(model, optimizer)
    rngs = _gather_rng(dist)
    root = checkpoints_dir(run_dir)
    final = root / step_dir_name(step)
    error = None
    if _is_main(dist):
        aliases = tied_aliases(model)
        tensors = {
            k: v.detach().to("cpu").contiguous() for k, v in model_state.items() if k not in aliases
        }
        trainer = {
            "step": int(step),
            "tokens_seen": int(tokens_seen),
            "loader": loader.state_dict() if loader is not None else None,
            "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rngs,
            "world_size": len(rngs),
            **(extra or {}),
        }
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "step": int(step),
            "tokens_seen": int(tokens_seen),
            "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "world_size": len(rngs),
            "tied": aliases,
            "torch": torch.__version__,
        }
        files = [
            (MODEL_FILE, _save_safetensors, tensors),
            (OPTIM_FILE, _save_torch, optim_state),
            (TRAINER_FILE, _save_torch, trainer),
            (CONFIG_FILE, _save_json, config or {}),
        ]
        try:
            _write_checkpoint(root, final, files, meta)
        except OSError as e:
            why = e.strerror or str(e)
            if e.errno == errno.ENOSPC:
                why += "; free space or point paths.output_dir / hydra.run.dir elsewhere"
            error = (
                f"could not write checkpoint {final} ({why}); the previous checkpoints are intact"
            )
        if error is None and keep_last > 0:
            prune(root, keep_last)
    error = _broadcast(error, dist)
    if error is not None:
        raise CheckpointError(error)
    return final


def _write_checkpoint(root: Path, final: Path, files: list, meta: dict) -> None:
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob("step_*.tmp"):  # left by a killed or failed save
        shutil.rmtree(stale, ignore_errors=True)
    tmp = root / f"{final.name}.tmp"
    tmp.mkdir()
    try:
        meta["files"] = {name: _write_file(tmp / name, writer, obj) for name, writer, obj in files}
        # meta.json last: its presence (after the rename) is what makes the folder a checkpoint
        _write_file(tmp / META_FILE, _save_json, meta)
        _fsync_dir(tmp)
        if final.exists():  # the same step saved again (e.g. resumed at the very end)
            old = root / f"{final.name}.old.tmp"
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(root)
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


def latest(run_dir: str | Path, full: bool = True) -> Path | None:
    """The newest checkpoint of a run folder that verifies; broken ones are skipped (warned)."""
    for _, path in reversed(list_checkpoints(checkpoints_dir(run_dir))):
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
        if _is_main(dist) and list_checkpoints(checkpoints_dir(run_dir)):
            log.warning(
                "%s already has checkpoints; this run starts fresh and its checkpoints replace "
                "or mix with them (trainer.resume=auto would continue instead)",
                run_dir,
            )
        return None
    found: str | None = None
    error: str | None = None
    if _is_main(dist):
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
    found, error = _broadcast((found, error), dist)
    if error:
        raise CheckpointError(error)
    return Path(found) if found else None


def _torch_load(path: Path) -> Any:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as e:  # noqa: BLE001 - any unpickling/zip error means a bad file
        why = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"checkpoint file {path} cannot be read ({why})") from None


def load_model_state(path: str | Path, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (CPU), tied aliases filled back in, clean names."""
    path = Path(path)
    meta = meta or read_meta(path)
    f = path / MODEL_FILE
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        state = load_file(str(f), device="cpu")
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {f} is missing") from None
    except (SafetensorError, OSError, ValueError) as e:
        why = " ".join(str(e).split())
        raise CheckpointError(
            f"checkpoint file {f} is not a valid safetensors file ({why})"
        ) from None
    state = clean_keys(state)
    for alias, target in meta.get("tied", {}).items():
        if target in state and alias not in state:
            state[alias] = state[target]
    return state


def read_config(path: str | Path) -> dict:
    f = Path(path) / CONFIG_FILE
    try:
        return json.loads(f.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {f} is missing") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"checkpoint file {f} is unreadable ({e})") from None


# ---------------------------------------------------------------------------------------------
# restoring a training run


@dataclass
class TrainerState:
    """What `restore` hands back to the trainer besides the loaded modules."""

    path: Path
    step: int  # optimization steps completed: the resumed run starts with this step index
    tokens_seen: int
    loss_history: list[float] = field(default_factory=list)
    skip_batches: dict[int, int] = field(default_factory=dict)  # step -> steps' worth skipped
    extra: dict = field(default_factory=dict)


_ARCH_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


def check_architecture(ckpt_config: dict, model_cfg: Any, path: Path) -> None:
    theirs = ckpt_config.get("model", {})
    diffs = [
        f"model.{k}={theirs[k]} there, {model_cfg[k]} here"
        for k in _ARCH_KEYS
        if k in theirs and theirs[k] != model_cfg[k]
    ]
    if diffs:
        raise CheckpointError(
            f"checkpoint {path} is for a different model ({'; '.join(diffs)}); resume with the "
            "checkpoint's model settings"
        )


def restore(
    path: str | Path,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None = None,
    *,
    scaler: torch.amp.GradScaler | None = None,
    loader: Any = None,
    dist: Any = None,
    full_verify: bool = True,
    restore_rng: bool = True,
) -> TrainerState:
    """Load a checkpoint into a live training setup (all ranks call; every rank reads).

    The model (plain, DDP or FSDP2; full state dicts are sharded as needed), the optimizer, the
    GradScaler, the train loader position and this rank's RNG states (rank 0's if the world
    size changed). Files are verified against meta.json first.
    """
    from torch.distributed.checkpoint.state_dict import (
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    path = Path(path)
    meta = verify(path, full=full_verify and _is_main(dist))
    model_state = load_model_state(path, meta)
    try:
        set_model_state_dict(model, model_state, options=_state_options(strict=True))
    except (RuntimeError, KeyError, ValueError) as e:
        why = " ".join(str(e).split())[:300]
        raise CheckpointError(f"checkpoint {path} does not fit this model ({why})") from None
    if optimizer is not None:
        optim_state = _torch_load(path / OPTIM_FILE)
        try:
            if optim_state.get("state"):
                set_optimizer_state_dict(
                    model, optimizer, optim_state, options=_state_options(strict=True)
                )
            else:  # saved before the first step (see gather_optimizer_state)
                optimizer.state.clear()
                for group, saved in zip(optimizer.param_groups, optim_state["param_groups"]):
                    group.update({k: v for k, v in saved.items() if k != "params"})
        except (RuntimeError, KeyError, ValueError) as e:
            why = " ".join(str(e).split())[:300]
            raise CheckpointError(
                f"checkpoint file {path / OPTIM_FILE} does not fit this optimizer ({why})"
            ) from None
        for group in optimizer.param_groups:  # a round trip turns tuples into lists
            if isinstance(group.get("betas"), list):
                group["betas"] = tuple(group["betas"])
    trainer = _torch_load(path / TRAINER_FILE)
    if scaler is not None and scaler.is_enabled() and trainer.get("scaler"):
        scaler.load_state_dict(trainer["scaler"])
    if loader is not None and trainer.get("loader") is not None:
        loader.load_state_dict(trainer["loader"])
    if restore_rng and trainer.get("rng"):
        rngs = trainer["rng"]
        rank = getattr(dist, "rank", 0) if dist is not None else 0
        set_rng_state(rngs[rank] if len(rngs) == getattr(dist, "world_size", 1) else rngs[0])
    known = {
        "step",
        "tokens_seen",
        "loader",
        "scaler",
        "rng",
        "world_size",
        "loss_history",
        "skip_batches",
    }
    return TrainerState(
        path=path,
        step=int(trainer["step"]),
        tokens_seen=int(trainer["tokens_seen"]),
        loss_history=[float(x) for x in trainer.get("loss_history", [])],
        skip_batches={int(k): int(v) for k, v in dict(trainer.get("skip_batches", {})).items()},
        extra={k: v for k, v in trainer.items() if k not in known},
    )


def truncate_jsonl(path: str | Path, step: int) -> int:
    """Keep only the leading rows with row["step"] < step (in place: open append handles stay
    valid). A killed run may have logged steps beyond its last checkpoint; the resumed run logs
    them again. Returns the number of rows removed."""
    path = Path(path)
    if not path.is_file():
        return 0
    keep = 0
    removed = 0
    with open(path, "rb") as f:
        data = f.read()
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


# ---------------------------------------------------------------------------------------------
# preflight: an unusable output folder is a one-line error before any compute


def validate_trainer(t: Any) -> None:
    """The checkpoint / fault-tolerance / HellaSwag settings of TrainerConfig. Raises ConfigError."""
    from gpt2x.config import ConfigError

    if t.on_bad_loss not in ("stop", "rollback"):
        raise ConfigError(f"trainer.on_bad_loss={t.on_bad_loss!r} must be 'stop' or 'rollback'")
    for key in (
        "checkpoint_every",
        "keep_last",
        "max_rollbacks",
        "hellaswag_every",
        "hellaswag_limit",
    ):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]} must be >= 0")


def preflight(run_dir: str | Path, n_params: int, checkpoints: bool, dist: Any = None) -> None:
    """Fail early (ConfigError, on every rank) if the run folder is unwritable or has no room
    for ~2 checkpoints. Rank 0 checks (it is the one that writes)."""
    from gpt2x.config import ConfigError

    error = None
    if _is_main(dist):
        try:
            _preflight(Path(run_dir), n_params, checkpoints)
        except ConfigError as e:
            error = str(e)
    error = _broadcast(error, dist)
    if error:
        raise ConfigError(error)


def _preflight(run_dir: Path, n_params: int, checkpoints: bool) -> None:
    from gpt2x.config import ConfigError

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
    need = 2 * estimate_bytes(n_params)
    free = shutil.disk_usage(run_dir).free
    if free < need:
        raise ConfigError(
            f"the run folder {run_dir} has {free / 1e9:.2f} GB free, but two checkpoints of this "
            f"{n_params / 1e6:.1f}M-parameter model need ~{need / 1e9:.2f} GB; {fix} (or "
            "trainer.checkpoint_every=0 trainer.save_final=false to save none)"
        )


# ---------------------------------------------------------------------------------------------
# preemption signals


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
        if _dist_on(d):
            flag = torch.tensor([self.signum or 0], dtype=torch.int64, device=d.device)
            torch_dist.all_reduce(flag, op=torch_dist.ReduceOp.MAX)
            self.signum = int(flag.item()) or None
        return self.signum is not None


def exit_code(signum: int) -> int:
    """The documented exit code of a run stopped cleanly by a signal: 128 + signal number."""
    return 128 + int(signum)


# ---------------------------------------------------------------------------------------------
# a small `key=value` command line, shared by gpt2x.sample / gpt2x.export / gpt2x.evaluate


def parse_kv(
    prog: str,
    argv: Iterable[str],
    options: dict[str, tuple[Any, str]],
    required: Iterable[str] = (),
) -> dict:
    """Parse `key=value` arguments against {key: (default, help)}; the default's type converts
    the value (None means string). Prints a one-line `error:` and exits 2 on bad input."""
    from gpt2x.config import parse_bool

    argv = list(argv)
    usage = f"usage: python -m {prog} " + " ".join(
        f"{k}=<{k}>" if k in required else f"[{k}={options[k][0]!r}]" for k in options
    )
    if any(a in ("-h", "--help", "help") for a in argv):
        print(usage)
        for k, (default, text) in options.items():
            print(f"  {k:<16} {text} (default: {default!r})")
        sys.exit(0)
    out = {k: default for k, (default, _) in options.items()}
    for arg in argv:
        key, sep, value = arg.partition("=")
        key = key.lstrip("+")
        if not sep or key not in options:
            fail(f"unknown argument {arg!r}; {usage.removeprefix('usage: ')}")
        default = options[key][0]
        try:
            if isinstance(default, bool):
                out[key] = parse_bool(value)
            elif isinstance(default, int):
                out[key] = int(value)
            elif isinstance(default, float):
                out[key] = float(value)
            else:
                out[key] = value
        except ValueError:
            fail(f"{key}={value!r} is not a valid {type(default).__name__}")
    missing = [k for k in required if out.get(k) in (None, "")]
    if missing:
        fail(f"missing {' '.join(f'{k}=...' for k in missing)}; {usage.removeprefix('usage: ')}")
    return out


def fail(message: str, code: int = 2) -> None:
    print(f"error: {' '.join(str(message).split())}", file=sys.stderr)
    sys.exit(code)


def load_model(path: str | Path, device: str | torch.device = "cpu", attn: str | None = None):
    """(GPT, meta, config) from a checkpoint, run folder or checkpoints folder; verified.
    attn: override the attention implementation ("" / None: the checkpoint's, with flash
    replaced by sdpa off CUDA)."""
    from gpt2x.model import GPT, GPTConfig

    ckpt = resolve(path)
    meta = verify(ckpt)
    config = read_config(ckpt)
    m = config.get("model", {})
    device = torch.device(device)
    impl = attn or config.get("attn", {}).get("impl", "naive")
    if impl == "flash" and device.type != "cuda":
        impl = "sdpa"
    try:
        gpt_cfg = GPTConfig(
            block_size=m["block_size"],
            vocab_size=m["vocab_size"],
            n_layer=m["n_layer"],
            n_head=m["n_head"],
            n_embd=m["n_embd"],
            dropout=0.0,
            bias=m.get("bias", True),
            attn=impl,
        )
    except (KeyError, ValueError) as e:
        raise CheckpointError(
            f"checkpoint file {ckpt / CONFIG_FILE} has no usable model config ({e})"
        ) from None
    model = GPT(gpt_cfg)
    state = load_model_state(ckpt, meta)
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint file {ckpt / MODEL_FILE} does not match its config.json "
            f"(missing {list(missing)[:3]}, unexpected {list(unexpected)[:3]})"
        )
    model.to(device).eval()
    return model, {**meta, "path": str(ckpt)}, config


def pick_device(device: str) -> torch.device:
    if device in ("", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)
