"""Process groups and model wrapping for parallel=single|ddp|fsdp, on PyTorch's own stack.

torchrun sets RANK / LOCAL_RANK / WORLD_SIZE; we read them, pick nccl on CUDA and gloo on CPU,
and wrap the model. Everything else in gpt2x asks `Dist` who it is and never touches env vars.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2x.config import ConfigError, ParallelKind

log = logging.getLogger(__name__)


@dataclass
class Dist:
    kind: ParallelKind
    rank: int
    local_rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return self.kind is not ParallelKind.single


def pick_device(device: str, local_rank: int) -> torch.device:
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank)
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(
                f"trainer.device={device} but CUDA is not available; use trainer.device=cpu"
            )
        if dev.index is None:
            dev = torch.device("cuda", local_rank)
    return dev


def setup(parallel_cfg, device: str) -> Dist:
    """Initialise the process group (ddp/fsdp) and choose this rank's device."""
    kind = ParallelKind(parallel_cfg.kind)
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind is ParallelKind.single:
        if world_size > 1:
            raise ConfigError(
                f"parallel=single was launched with WORLD_SIZE={world_size}; "
                "use parallel=ddp (or parallel=fsdp) under torchrun"
            )
        return Dist(kind, 0, 0, 1, pick_device(device, 0))
    if "RANK" not in os.environ:
        # a plain `python -m gpt2x.train parallel=ddp` is a world of one: run it as such
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dev = pick_device(device, local_rank)
    backend = parallel_cfg.backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend,
            # a dead peer ends the job with an error instead of hanging forever
            timeout=datetime.timedelta(minutes=10),
            device_id=dev if dev.type == "cuda" else None,
        )
    return Dist(kind, dist.get_rank(), local_rank, dist.get_world_size(), dev)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown() -> None:
    """Destroy the process group; safe to call on any path (normal exit or error)."""
    if dist.is_available() and dist.is_initialized():
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


def wrap_model(model: torch.nn.Module, d: Dist, precision_cfg=None) -> torch.nn.Module:
    """DDP or FSDP2 around the model; the model itself is returned for parallel=single."""
    if d.kind is ParallelKind.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        return DDP(model, device_ids=ids)
    if d.kind is ParallelKind.fsdp:
        raise ConfigError("parallel=fsdp is not implemented yet; use parallel=ddp")
    return model


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip DDP's gradient all-reduce for a whole micro-step (forward AND backward).

    DDP decides during forward whether backward will all-reduce, so the context must wrap both;
    wrapping only backward (as the lecture did) still syncs every micro-step.
    """
    if sync or not hasattr(model, "no_sync"):
        return contextlib.nullcontext()
    return model.no_sync()


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.is_distributed and d.world_size > 1:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= d.world_size
    return value


def barrier(d: Dist) -> None:
    if d.is_distributed and d.world_size > 1:
        dist.barrier()


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT under DDP and torch.compile wrappers (for sampling, export, checkpoints)."""
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(
            model, torch.nn.parallel.DistributedDataParallel
        ):
            model = model.module
        else:
            return model
