"""What a checkpoint holds and how it goes back into a live run. A `Checkpointer` collects a
training run's stateful parts: model and optimizer (full state dicts, gathered under
DDP/FSDP2), GradScaler, train-loader position, RNG states per rank and the `TrainState` (the
trainer's own progress), and hands the files to gpt2x.checkpoint.store; `save` / `restore` do
the same for parts without a run around them, and `load_model` builds a model for inference
(sample, evaluate, export).
"""

from __future__ import annotations

import contextlib
import copy
import errno
import random
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as torch_dist
from safetensors import SafetensorError
from safetensors.torch import load_file

from gpt2x.checkpoint.store import (
    CONFIG_FILE,
    FORMAT,
    MODEL_FILE,
    OPTIM_FILE,
    TRAINER_FILE,
    VERSION,
    CheckpointError,
    broadcast,
    checkpoints_dir,
    is_main,
    prune,
    read_config,
    read_meta,
    resolve,
    save_json,
    save_safetensors,
    save_torch,
    step_dir_name,
    torch_load,
    verify,
    write_checkpoint,
)
from gpt2x.model import GPT, GPTConfig

# wrapper prefixes that must never reach a file: torch.compile and DDP
_WRAPPER_PREFIXES = ("_orig_mod.", "module.")
LOSS_HISTORY = 50  # recent losses kept for the spike check (training.checkpointing.check_loss)
HISTORY = {"history": True}  # TrainState field metadata: a rollback keeps the field's value


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


def _dcp():
    """torch.distributed.checkpoint's state-dict API, imported when a checkpoint is written or
    read: it loads DTensor and sympy, half a second of every process's start-up otherwise."""
    import torch.distributed.checkpoint.state_dict as dcp

    return dcp


def _state_options(**kw: Any):
    return _dcp().StateDictOptions(full_state_dict=True, **kw)


def gather_model_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full model state dict on CPU (a collective under FSDP: every rank must call it)."""
    state = _dcp().get_model_state_dict(model, options=_state_options(cpu_offload=True))
    return clean_keys(state)


def gather_optimizer_state(model: torch.nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """The full optimizer state dict keyed by parameter name, on CPU (a collective)."""
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
    state = _dcp().get_optimizer_state_dict(model, optimizer, options=_state_options(cpu_offload=True))
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


def load_model_state(path: str | Path, meta: dict | None = None) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint (CPU), tied aliases filled back in, clean names."""
    path = Path(path)
    meta = meta or read_meta(path)
    f = path / MODEL_FILE
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


# ---------------------------------------------------------------------------------------------
# a training run's state and its checkpointer


@dataclass
class TrainState:
    """The trainer's own progress: what the loop reads and advances, saved at the top level of
    trainer.pt. `state_dict` / `load_state_dict` go over the fields, so a field declared here is
    saved, restored, and given its default when an older checkpoint lacks it."""

    step: int = 0  # optimization steps done: the index of the next step
    tokens_seen: int = 0
    loss_history: list[float] = field(default_factory=list)  # the last LOSS_HISTORY losses
    # the run's history: a rollback adds to it instead of going back in it (`keeping_history`)
    skip_batches: dict[int, int] = field(default_factory=dict, metadata=HISTORY)  # step -> times
    rollbacks: list[dict] = field(default_factory=list, metadata=HISTORY)  # {step, to_step, error}

    def state_dict(self) -> dict[str, Any]:
        return {f.name: copy.deepcopy(getattr(self, f.name)) for f in fields(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        default = type(self)()
        for f in fields(self):
            setattr(self, f.name, copy.deepcopy(state.get(f.name, getattr(default, f.name))))

    def record_loss(self, loss: float) -> None:
        self.loss_history.append(loss)
        del self.loss_history[:-LOSS_HISTORY]

    @contextlib.contextmanager
    def keeping_history(self) -> Iterator[None]:
        """Load an older checkpoint (a rollback) but keep the fields marked HISTORY as they are."""
        kept = {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("history")}
        yield
        for name, value in kept.items():
            setattr(self, name, value)


class RNGState:
    """Every rank's RNG states as one stateful part: saved as a list in rank order (gathered on
    rank 0, a collective), loaded as this rank's own, or rank 0's if the world size changed."""

    def __init__(self, dist: Any = None):
        self.dist = dist

    def state_dict(self) -> list[dict]:
        mine = rng_state()
        if self.dist is None or not self.dist.is_distributed:
            return [mine]
        out: list[Any] = [None] * self.dist.world_size
        torch_dist.all_gather_object(out, mine)
        return out

    def load_state_dict(self, rngs: list[dict]) -> None:
        rank, world_size = (0, 1) if self.dist is None else (self.dist.rank, self.dist.world_size)
        set_rng_state(rngs[rank] if len(rngs) == world_size else rngs[0])


class Checkpointer:
    """One training run's checkpoints: every stateful part saved together into one folder and
    loaded back together, each by its own state_dict / load_state_dict.

    model.safetensors and optimizer.pt hold the model and the optimizer (full state dicts,
    gathered across ranks under DDP/FSDP2, plain parameter names); trainer.pt holds the
    `TrainState`'s fields at its top level and each other part under its name. A part that is
    None, or whose saved state is empty or missing, is left as it is on load. `model` is the
    module whose parameters the optimizer holds (plain, DDP or FSDP2; compile wrappers are
    stripped). All ranks call `save` and `load`: rank 0 writes, every rank reads.
    """

    def __init__(
        self,
        run_dir: str | Path,
        model: torch.nn.Module,
        optimizer: torch.optim.Optimizer | None,
        state: TrainState | None = None,
        *,
        scaler: torch.amp.GradScaler | None = None,
        loader: Any = None,
        rng: bool = True,
        dist: Any = None,
        config: dict | None = None,
        keep_last: int = 0,
    ):
        self.run_dir, self.model, self.optimizer = Path(run_dir), model, optimizer
        self.state = state if state is not None else TrainState()
        self.parts: dict[str, Any] = {
            "loader": loader,
            "scaler": scaler,
            "rng": RNGState(dist) if rng else None,
        }
        self.dist, self.config, self.keep_last = dist, config, keep_last
        self.last: Path | None = None  # the newest checkpoint saved or loaded

    def save(self, info: dict | None = None) -> Path:
        """Checkpoint `state.step` completed steps into `<run_dir>/checkpoints/step_NNNNNN/`.
        info: written into trainer.pt for reference, never read back. keep_last > 0 prunes all
        but the newest keep_last after the new one is complete. A failed write raises
        CheckpointError on every rank and leaves the previous checkpoints untouched."""
        model_state = gather_model_state(self.model)
        optim_state = gather_optimizer_state(self.model, self.optimizer)
        parts = {k: None if p is None else p.state_dict() for k, p in self.parts.items()}
        step, tokens_seen = int(self.state.step), int(self.state.tokens_seen)
        world_size = self.dist.world_size if self.dist is not None else 1
        root = checkpoints_dir(self.run_dir)
        final = root / step_dir_name(step)
        error = None
        if is_main(self.dist):
            aliases = tied_aliases(self.model)
            tensors = {
                k: v.detach().to("cpu").contiguous()
                for k, v in model_state.items()
                if k not in aliases
            }
            trainer = {
                **self.state.state_dict(),
                **parts,
                "world_size": world_size,
                **(info or {}),
            }
            meta = {
                "format": FORMAT,
                "version": VERSION,
                "step": step,
                "tokens_seen": tokens_seen,
                "created_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
                "world_size": world_size,
                "tied": aliases,
                "torch": torch.__version__,
            }
            files = [
                (MODEL_FILE, save_safetensors, tensors),
                (OPTIM_FILE, save_torch, optim_state),
                (TRAINER_FILE, save_torch, trainer),
                (CONFIG_FILE, save_json, self.config or {}),
            ]
            try:
                write_checkpoint(root, final, files, meta)
            except OSError as e:
                why = e.strerror or str(e)
                if e.errno == errno.ENOSPC:
                    why += "; free space or point paths.output_dir / hydra.run.dir elsewhere"
                error = (
                    f"could not write checkpoint {final} ({why}); the previous checkpoints are "
                    "intact"
                )
            if error is None and self.keep_last > 0:
                prune(root, self.keep_last)
        error = broadcast(error, self.dist)
        if error is not None:
            raise CheckpointError(error)
        self.last = final
        return final

    def load(self, path: str | Path, full_verify: bool = True) -> None:
        """Put a checkpoint back into every part (the model re-sharded under FSDP2). Files are
        checked against meta.json first (their sha256 too with full_verify, on rank 0)."""
        path = Path(path)
        meta = verify(path, full=full_verify and is_main(self.dist))
        try:
            _dcp().set_model_state_dict(
                self.model, load_model_state(path, meta), options=_state_options(strict=True)
            )
        except (RuntimeError, KeyError, ValueError) as e:
            why = " ".join(str(e).split())[:300]
            raise CheckpointError(f"checkpoint {path} does not fit this model ({why})") from None
        if self.optimizer is not None:
            load_optimizer_state(path, self.model, self.optimizer)
        trainer = torch_load(path / TRAINER_FILE)
        for name, part in self.parts.items():
            if part is not None and trainer.get(name):
                part.load_state_dict(trainer[name])
        self.state.load_state_dict(trainer)
        self.last = path


def load_optimizer_state(
    path: Path, model: torch.nn.Module, optimizer: torch.optim.Optimizer
) -> None:
    optim_state = torch_load(path / OPTIM_FILE)
    try:
        if optim_state.get("state"):
            _dcp().set_optimizer_state_dict(
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
    keep_last: int = 0,
    dist: Any = None,
) -> Path:
    """One checkpoint of `step` completed steps without a run around it (`Checkpointer.save`)."""
    state = TrainState(step=step, tokens_seen=tokens_seen)
    return Checkpointer(
        run_dir,
        model,
        optimizer,
        state,
        scaler=scaler,
        loader=loader,
        dist=dist,
        config=config,
        keep_last=keep_last,
    ).save()


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
) -> TrainState:
    """Load a checkpoint into the given parts (`Checkpointer.load`); returns its TrainState."""
    path = Path(path)
    parent = path.parent.parent  # the run folder (a checkpointer that only loads never saves)
    ckpt = Checkpointer(
        parent, model, optimizer, scaler=scaler, loader=loader, rng=restore_rng, dist=dist
    )
    ckpt.load(path, full_verify)
    return ckpt.state


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


def inference_attention(impl: str, device: torch.device, dtype: str) -> str:
    """The attention a checkpoint runs with for inference: its own, except that flash becomes
    sdpa unless it is CUDA with bf16/fp16 (the flash kernel has no fp32 CUDA version, e.g.
    `gpt2x.evaluate precision=fp32` of a flash run on a GPU). sdpa computes the same function,
    so every rung's checkpoint loads on every device."""
    if impl == "flash" and not (device.type == "cuda" and dtype in ("bf16", "fp16")):
        return "sdpa"
    return impl


def load_model(
    path: str | Path,
    device: str | torch.device = "cpu",
    attn: str | None = None,
    dtype: str = "fp32",
):
    """(GPT, meta, config) from a checkpoint, run folder or checkpoints folder; verified.
    attn: override the attention implementation ("" / None: the checkpoint's, adjusted by
    `inference_attention` for the device and the autocast dtype the caller runs it in)."""
    ckpt = resolve(path)
    meta = verify(ckpt)
    config = read_config(ckpt)
    m = config.get("model", {})
    device = torch.device(device)
    impl = attn or inference_attention(config.get("attn", {}).get("impl", "naive"), device, dtype)
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
