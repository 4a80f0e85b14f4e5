"""Process groups and model wrapping for parallel=single|ddp|fsdp, on PyTorch's own stack.

Who is who: torchrun sets RANK / LOCAL_RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. Without
torchrun, a task started by SLURM (`srun`, or hydra/launcher=submitit_slurm which runs its tasks
with srun) or by hydra/launcher=submitit_local gets the same variables derived from the
scheduler's own (`scheduler_env`). nccl on CUDA, gloo on CPU. Everything else in gpt2x asks
`Dist` who it is and never touches env vars.

Wrapping: DDP, or FSDP2 (`fully_shard` per transformer block, then the root) with a
MixedPrecisionPolicy from the `precision` group. `no_sync` skips gradient communication for
the micro-steps of gradient accumulation under both. `compile_model` applies torch.compile in
the way that suits the wrapping (whole model, or per block under FSDP). See docs/distributed.md.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.distributed as dist

from gpt2x.config import ConfigError, Dtype, ParallelKind

log = logging.getLogger(__name__)

# test-only fault injection, read in `fail_for_test` and nowhere else
TEST_FAIL_RANK_ENV = "GPT2X_TEST_FAIL_RANK"  # this rank raises at optimization step 1


@dataclass
class Dist:
    kind: ParallelKind
    rank: int
    local_rank: int
    world_size: int
    device: torch.device
    # FSDP2 settings (from the parallel group)
    reshard_after_forward: bool = True
    reduce_dtype: str = "auto"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_distributed(self) -> bool:
        return is_distributed(self.world_size)

    @property
    def is_sharded(self) -> bool:
        """FSDP: every forward is a collective, so all ranks must run the same forwards
        (sampling included), not rank 0 alone."""
        return self.kind is ParallelKind.fsdp


def has_process_group() -> bool:
    return dist.is_available() and dist.is_initialized()


def is_distributed(world_size: int) -> bool:
    """Whether this process works with others: more than one process, joined by a process group.
    gpt2x's one test of "distributed" (`Dist.is_distributed` asks it): collectives and broadcasts
    happen only then. A ddp/fsdp world of one has a process group but no peers, and takes the
    single-process paths."""
    return world_size > 1 and has_process_group()


# ----------------------------------------------------------------------------- ranks from env


def _first_host(nodelist: str) -> str:
    """The first host of a SLURM node list: 'gpu-[003-004,010],cpu1' -> 'gpu-003'."""
    first = re.match(r"[^,\[]*(\[[^\]]*\])?[^,]*", nodelist.strip()).group(0)
    m = re.match(r"([^\[]*)\[([^\],\-]+)[^\]]*\](.*)", first)
    return f"{m.group(1)}{m.group(2)}{m.group(3)}" if m else first


def _port_from(job_id: str) -> str:
    """A port every task of one job derives alike (20000-39999), from the job id's digits."""
    digits = re.sub(r"\D", "", job_id) or "0"
    return str(20000 + int(digits[-9:]) % 20000)


def scheduler_env(environ: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """torch.distributed's env:// variables for a task started by a scheduler, or None.

    - submitit's local executor (hydra/launcher=submitit_local): SUBMITIT_LOCAL_GLOBALID,
      SUBMITIT_LOCAL_LOCALID, SUBMITIT_LOCAL_NTASKS; master is this machine.
    - a SLURM job step (srun; submitit_slurm runs its tasks with srun): SLURM_PROCID,
      SLURM_LOCALID, SLURM_NTASKS; master is the first node of the step. Only inside a step
      (SLURM_STEP_NUM_TASKS is set): the batch script itself also has SLURM_PROCID=0 and
      SLURM_NTASKS=N, but only one process runs there.
    MASTER_PORT is derived from the job id, so all tasks agree without talking.
    """
    env = os.environ if environ is None else environ
    if "SUBMITIT_LOCAL_GLOBALID" in env:
        ntasks = env.get("SUBMITIT_LOCAL_NTASKS", "1")
        return {
            "RANK": env["SUBMITIT_LOCAL_GLOBALID"],
            "LOCAL_RANK": env.get("SUBMITIT_LOCAL_LOCALID", env["SUBMITIT_LOCAL_GLOBALID"]),
            "WORLD_SIZE": ntasks,
            "LOCAL_WORLD_SIZE": ntasks,
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": _port_from(env.get("SUBMITIT_LOCAL_JOB_ID", "0")),
        }
    if "SLURM_PROCID" in env and "SLURM_STEP_NUM_TASKS" in env:
        world = env.get("SLURM_NTASKS") or env["SLURM_STEP_NUM_TASKS"]
        nodelist = env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST") or "127.0.0.1"
        job = env.get("SLURM_JOB_ID", "0")
        out = {
            "RANK": env["SLURM_PROCID"],
            "LOCAL_RANK": env.get("SLURM_LOCALID", "0"),
            "WORLD_SIZE": world,
            "MASTER_ADDR": _first_host(nodelist),
            "MASTER_PORT": _port_from(job),
            # one run folder for all tasks of a plain `srun python -m gpt2x.train` (see
            # gpt2x.config.run_id); submitit's tasks get theirs from the submitting process
            "GPT2X_RUN_ID": f"slurm-{job}.{env.get('SLURM_STEP_ID', '0')}",
        }
        nodes = env.get("SLURM_STEP_NUM_NODES") or env.get("SLURM_JOB_NUM_NODES")
        if nodes and int(world) % int(nodes) == 0:
            out["LOCAL_WORLD_SIZE"] = str(int(world) // int(nodes))
        return out
    return None


def export_scheduler_env() -> bool:
    """Put `scheduler_env()` into os.environ when RANK is unset and the scheduler started more
    than one task. Returns whether it did. MASTER_ADDR/PORT and GPT2X_RUN_ID set by the user win.

    Called when this module is imported, i.e. before Hydra resolves the output folder: the
    resolvers that keep non-zero ranks from writing .hydra/ (gpt2x.config) read RANK.
    """
    if "RANK" in os.environ:
        return False
    env = scheduler_env()
    if env is None or int(env["WORLD_SIZE"]) <= 1:
        return False
    for key, value in env.items():
        if key in ("MASTER_ADDR", "MASTER_PORT", "GPT2X_RUN_ID"):
            os.environ.setdefault(key, value)
        else:
            os.environ[key] = value
    return True


_FROM_SCHEDULER = export_scheduler_env()


# ----------------------------------------------------------------------------- setup / teardown


def pick_device(device: str, local_rank: int, world_size: int = 1) -> torch.device:
    """This rank's device for trainer.device. `cuda` (no index) and `auto` give each rank
    cuda:LOCAL_RANK; an explicit `cuda:N` is only valid for a world of one (every rank on one
    GPU is NCCL's "Duplicate GPU detected" error at the first collective)."""
    if device == "auto":
        if torch.cuda.is_available():
            return _rank_gpu(local_rank)
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
            return _rank_gpu(local_rank)
        if world_size > 1:
            raise ConfigError(
                f"trainer.device={device} puts all {world_size} ranks on one GPU; use "
                "trainer.device=cuda (each rank takes cuda:LOCAL_RANK)"
            )
        if dev.index >= torch.cuda.device_count():
            raise ConfigError(
                f"trainer.device={device} but only {torch.cuda.device_count()} CUDA device(s) "
                "are visible; use trainer.device=cuda"
            )
    return dev


def _rank_gpu(local_rank: int) -> torch.device:
    """cuda:LOCAL_RANK, modulo the visible GPUs: a scheduler that binds one GPU per task
    (CUDA_VISIBLE_DEVICES) leaves each task one device, cuda:0. More ranks on this node than
    visible GPUs (when there are several) would put two ranks on one GPU: refuse that."""
    count = torch.cuda.device_count()
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))  # torchrun's; unset under srun
    if count > 1 and local_world > count:
        raise ConfigError(
            f"{local_world} ranks on this node but {count} visible GPUs; start at most {count} "
            "processes per node (torchrun --nproc_per_node)"
        )
    return torch.device("cuda", local_rank % count)


def setup(parallel_cfg, device: str) -> Dist:
    """Initialise the process group (ddp/fsdp) and choose this rank's device."""
    kind = ParallelKind(parallel_cfg.kind)
    export_scheduler_env()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if kind is ParallelKind.single:
        if world_size > 1:
            raise ConfigError(
                f"parallel=single was launched with WORLD_SIZE={world_size}; "
                "use parallel=ddp (or parallel=fsdp) under torchrun"
            )
        dev = pick_device(device, 0)
        if dev.type == "cuda":
            # cuda:N for N > 0: kernels, caches and NCCL/cuBLAS handles follow the current device
            torch.cuda.set_device(dev)
        return Dist(kind, 0, 0, 1, dev)
    if "RANK" not in os.environ:
        # a plain `python -m gpt2x.train parallel=ddp` is a world of one: run it as such
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    dev = pick_device(device, local_rank, world_size)
    backend = parallel_cfg.backend
    if backend == "auto":
        backend = "nccl" if dev.type == "cuda" else "gloo"
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        # a dead peer ends the job with an error instead of hanging forever
        timeout = datetime.timedelta(minutes=float(getattr(parallel_cfg, "timeout_minutes", 10.0)))
        store = _restart_safe_store(timeout)
        dist.init_process_group(
            backend=backend,
            timeout=timeout,
            device_id=dev if dev.type == "cuda" else None,
            **(
                {}
                if store is None
                else dict(store=store, rank=int(os.environ["RANK"]), world_size=world_size)
            ),
        )
    rank = dist.get_rank()
    if rank != 0:
        # rank 0 speaks for the job; the others only report problems
        logging.getLogger().setLevel(logging.WARNING)
    log.info(
        "%s: rank %d/%d (local %d) on %s, backend %s%s",
        kind.value,
        rank,
        dist.get_world_size(),
        local_rank,
        dev,
        backend,
        " (ranks from the scheduler's environment)" if _FROM_SCHEDULER else "",
    )
    return Dist(
        kind,
        rank,
        local_rank,
        dist.get_world_size(),
        dev,
        reshard_after_forward=bool(getattr(parallel_cfg, "reshard_after_forward", True)),
        reduce_dtype=str(getattr(parallel_cfg, "reduce_dtype", "auto")),
    )


def _restart_safe_store(timeout: datetime.timedelta) -> dist.Store | None:
    """The store for `init_process_group` after an in-place `torchrun --max-restarts` restart.

    torchrun's workers share its agent's TCPStore, which outlives a failed attempt, and every
    attempt writes the process group's keys under the same names; a restarted worker can then
    read the dead attempt's addresses ("Gloo connectFullMesh failed ... Connection refused",
    pytorch/pytorch#167288). Prefixing the keys with the attempt number keeps attempts apart.
    Only on one node: there one agent numbers the attempts for all ranks, while agents on
    different nodes may count restarts differently. None means torch's default env:// store."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
        return None
    if (
        os.environ.get("GROUP_WORLD_SIZE", "1") != "1"
        or "TORCHELASTIC_RESTART_COUNT" not in os.environ
    ):
        return None
    agent_store = dist.TCPStore(
        os.environ["MASTER_ADDR"],
        int(os.environ["MASTER_PORT"]),
        is_master=False,
        timeout=timeout,
    )
    return dist.PrefixStore(
        f"gpt2x/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", agent_store
    )


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teardown(wait_for_peers: bool = False) -> None:
    """Destroy the process group; safe to call on any path (normal exit or error).

    wait_for_peers (a run that ended normally): first a barrier with a short timeout, so no rank
    tears down while a peer still has a collective in flight (a gloo group freed under a
    pending operation can block its owner's exit)."""
    if has_process_group():
        if wait_for_peers and is_distributed(dist.get_world_size()):
            with contextlib.suppress(Exception):
                if dist.get_backend() == "gloo":
                    dist.monitored_barrier(timeout=datetime.timedelta(seconds=60))
                else:
                    dist.barrier()
        with contextlib.suppress(Exception):
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- wrapping


def mixed_precision_policy(precision_cfg, reduce_dtype: str = "auto"):
    """FSDP2's MixedPrecisionPolicy for the `precision` group; None for fp32 (and tf32).

    bf16: parameters all-gathered and gradients reduce-scattered in bf16 (reduce_dtype=auto) or
    fp32 (parallel.reduce_dtype=fp32). fp16: parameters in fp16, gradients reduced in fp32 by
    default (scaled fp16 gradients can overflow in a sum over ranks). Sharded parameters,
    gradients and optimizer state stay fp32 either way.
    """
    from torch.distributed.fsdp import MixedPrecisionPolicy

    from gpt2x.training.precision import torch_dtype

    if precision_cfg is None:
        return None
    dtype = Dtype(precision_cfg.dtype)
    if dtype is Dtype.fp32:
        return None
    param = torch_dtype(dtype)
    if reduce_dtype == "auto":
        reduce = torch.float32 if dtype is Dtype.fp16 else param
    elif reduce_dtype in ("fp32", "bf16", "fp16"):
        reduce = torch_dtype(reduce_dtype)
    else:
        raise ConfigError(
            f"parallel.reduce_dtype={reduce_dtype!r} must be auto, fp32, bf16 or fp16"
        )
    return MixedPrecisionPolicy(param_dtype=param, reduce_dtype=reduce)


def wrap_model(model: torch.nn.Module, d: Dist, precision_cfg=None) -> torch.nn.Module:
    """DDP or FSDP2 around the model; the model itself is returned for parallel=single.

    Call before building the optimizer: FSDP2 replaces the parameters with sharded DTensors.
    """
    if d.kind is ParallelKind.ddp:
        from torch.nn.parallel import DistributedDataParallel as DDP

        ids = [d.device.index] if d.device.type == "cuda" else None
        # gradients live in DDP's all-reduce buckets: no copy into/out of them per step
        return DDP(model, device_ids=ids, gradient_as_bucket_view=True)
    if d.kind is ParallelKind.fsdp:
        from torch.distributed.fsdp import fully_shard

        kwargs: dict = {"reshard_after_forward": d.reshard_after_forward}
        mp = mixed_precision_policy(precision_cfg, d.reduce_dtype)
        if mp is not None:
            kwargs["mp_policy"] = mp
        blocks = getattr(getattr(model, "transformer", None), "h", None)
        if blocks is None:
            raise ConfigError(f"parallel=fsdp expects a GPT (transformer.h), got {type(model)}")
        for block in blocks:
            fully_shard(block, **kwargs)
        # the root holds what is left: embeddings, final LayerNorm and the LM head. wte and
        # lm_head share one Parameter; both live in the root group, so the tie survives.
        # No reshard_after_forward here: FSDP2's root default keeps these gathered from forward
        # to backward, which needs them at once (resharding would gather wte again).
        fully_shard(model, **({"mp_policy": mp} if mp is not None else {}))
        return model
    return model


COMPILE_SCOPES = ("model", "block")


def compile_model(
    model: torch.nn.Module,
    kind: ParallelKind,
    mode: str | None = None,
    scope: str = "model",
    backend: str | Callable = "inductor",
) -> torch.nn.Module:
    """torch.compile the (wrapped) model; call after `wrap_model` and `build_optimizer`.

    scope="model", single: `torch.compile(model)`, one graph for the whole forward. ddp: the
    module inside DDP is compiled in place (`module.compile()`), as torch advises for DDP
    ("apply torch.compile to the inner module passed to the wrapper"), never the wrapper; dynamo
    still sees the active DDP module and splits the graph at its bucket boundaries
    (DDPOptimizer), so all-reduces overlap the backward. Under fsdp, or scope="block": each
    transformer block is compiled in place (`Block.compile`), plus `GPT.head_and_loss` where the
    model has it. Compiling the FSDP root instead compiles only the blocks: FSDP2's hooks are
    hidden from dynamo, so GPT.forward itself (embeddings, ln_f, LM head, loss) runs eagerly.
    In place, so parameter names (state_dict, checkpoints) stay free of `_orig_mod.`.
    mode: torch.compile's mode ("default" or None, "reduce-overhead", "max-autotune", ...).
    backend: torch.compile's backend (tests pass a recording one).
    """
    if scope not in COMPILE_SCOPES:
        raise ConfigError(f"compile scope={scope!r} is unknown; use model or block")
    mode = None if mode == "default" else mode
    if scope == "model" and kind is not ParallelKind.fsdp:
        if isinstance(model, torch.nn.parallel.DistributedDataParallel):
            model.module.compile(mode=mode, backend=backend)
            return model
        return torch.compile(model, mode=mode, backend=backend)
    gpt = unwrap(model)
    blocks = getattr(getattr(gpt, "transformer", None), "h", None)
    if blocks is None:
        raise ConfigError(f"per-block compile expects a GPT (transformer.h), got {type(gpt)}")
    for block in blocks:
        block.compile(mode=mode, backend=backend)
    head = getattr(gpt, "head_and_loss", None)
    if head is not None:
        # an instance attribute shadowing the method: GPT.forward's self.head_and_loss(...)
        # now calls the compiled one, and it holds no parameters of its own
        gpt.head_and_loss = torch.compile(head, mode=mode, backend=backend)
    return model


def _strip_compile(model: torch.nn.Module) -> torch.nn.Module:
    return getattr(model, "_orig_mod", model)


def _is_fsdp(model: torch.nn.Module) -> bool:
    from torch.distributed.fsdp import FSDPModule

    return isinstance(_strip_compile(model), FSDPModule)


@contextlib.contextmanager
def _fsdp_sync(model, sync: bool):
    model.set_requires_gradient_sync(sync)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def no_sync(model: torch.nn.Module, sync: bool) -> contextlib.AbstractContextManager:
    """Skip gradient communication for a whole micro-step (forward AND backward) unless `sync`.

    DDP: `model.no_sync()`. DDP decides during forward whether backward will all-reduce, so the
    context must wrap both; wrapping only backward (as the lecture did) still syncs every
    micro-step. FSDP2: `set_requires_gradient_sync(False)` (gradients accumulate unsharded and
    are reduce-scattered in the last micro-step's backward), restored to True on exit.
    """
    if sync:
        return contextlib.nullcontext()
    if _is_fsdp(model):
        return _fsdp_sync(_strip_compile(model), False)
    if hasattr(model, "no_sync"):
        return model.no_sync()
    return contextlib.nullcontext()


# ----------------------------------------------------------------------------- collectives


def all_reduce_sum(value: torch.Tensor, d: Dist) -> torch.Tensor:
    if d.is_distributed:
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
    return value


def all_reduce_mean(value: torch.Tensor, d: Dist) -> torch.Tensor:
    return all_reduce_sum(value, d) / d.world_size


def barrier(d: Dist) -> None:
    if d.is_distributed:
        dist.barrier()


def _full(t: torch.Tensor) -> torch.Tensor:
    """A plain tensor from a (possibly sharded) DTensor; collective for sharded ones."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def to_float(value: torch.Tensor | float) -> float:
    """A plain float from a tensor or DTensor (FSDP2's clip_grad_norm_ returns a DTensor)."""
    if isinstance(value, torch.Tensor):
        return float(_full(value.detach()).item())
    return float(value)


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    """The plain GPT under DDP and torch.compile wrappers (for sampling, export, checkpoints).

    FSDP2 shards in place: the module is the GPT itself, with DTensor parameters.
    """
    while True:
        if hasattr(model, "_orig_mod"):
            model = model._orig_mod
        elif hasattr(model, "module") and isinstance(
            model, torch.nn.parallel.DistributedDataParallel
        ):
            model = model.module
        else:
            return model


# ----------------------------------------------------------------------------- test hooks


def fail_for_test(d: Dist, step: int) -> None:
    """Fault injection for tests/test_distributed.py: with GPT2X_TEST_FAIL_RANK=r, rank r
    raises at optimization step 1 (after step 0's collectives), the others carry on into it."""
    target = os.environ.get(TEST_FAIL_RANK_ENV, "")
    if target and step == 1 and int(target) == d.rank:
        raise RuntimeError(
            f"{TEST_FAIL_RANK_ENV}={target}: injected failure on rank {d.rank} at step {step}"
        )
