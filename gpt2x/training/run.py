"""One training run's parts, built by `setup`: every check of the settings first
(`preflight_checks`), then the data loaders, the model (wrapped, compiled), the optimizer, the
run record and W&B. gpt2x.train runs the loop over a `Run`.
"""

from __future__ import annotations

import contextlib
import logging
import random
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.experimental.callback import Callback
from omegaconf import DictConfig

from gpt2x import checkpoint
from gpt2x.checkpoint import Checkpointer, TrainState
from gpt2x.config import (
    AttnImpl,
    ConfigError,
    Dtype,
    grad_accum_steps,
    is_rank_zero,
    to_container,
    validate,
)
from gpt2x.data import ShardLoader, ensure_prepared
from gpt2x.model import GPT, GPTConfig, check_attention, pretrained_shape
from gpt2x.record import folder as runfolder
from gpt2x.record.failure import one_line
from gpt2x.record.folder import RunRecord, git_info, versions
from gpt2x.record.wandb_logger import WandbLogger
from gpt2x.training import distributed
from gpt2x.training.allocator import check_huge_pages, keep_freed_memory, request_huge_pages
from gpt2x.training.float8 import check_float8, convert_to_float8
from gpt2x.training.hellaswag import HellaSwagError, hellaswag_path, load_examples
from gpt2x.training.metrics import hardware
from gpt2x.training.optim import build_optimizer
from gpt2x.training.peak import measured_peak, peak_record
from gpt2x.training.precision import (
    faster_dtype,
    grad_scaler,
    setup_precision,
    slow_bf16_hint,
    torch_dtype,
)
from gpt2x.training.preemption import StopSignals
from gpt2x.training.turns import Turns
from gpt2x.training.validation import val_reader

log = logging.getLogger("gpt2x.train")


@dataclass
class Run:
    """What one training run holds; built by `setup`, used by `train`."""

    cfg: DictConfig
    dist: distributed.Dist
    model: torch.nn.Module  # possibly DDP- and compile-wrapped: use for forward/backward
    raw_model: GPT  # the plain module: sampling, export, checkpoints
    optimizer: torch.optim.Optimizer
    scaler: torch.amp.GradScaler
    train_loader: ShardLoader
    val_loader: ShardLoader
    # every stateful part above, saved and loaded together; its `state` is the loop's own
    checkpointer: Checkpointer
    record: RunRecord
    wandb: WandbLogger | None
    turns: Turns  # interleave=steps: whose step it is
    grad_accum: int
    tokens_per_step: int
    flops_per_token: float
    # {"spec": dense bf16 FLOP/s or None, "measured": the better probed matmul peak, ...}
    peaks: dict
    resume_from: Path | None = None  # trainer.resume's checkpoint (resolved and verified)
    hellaswag_file: Path | None = None
    stop: StopSignals = field(default_factory=StopSignals)
    stopped_by: int | None = None  # the signal number that ended the run early

    @property
    def state(self) -> TrainState:
        """Step, tokens seen, recent losses, rollbacks: what the loop reads and advances."""
        return self.checkpointer.state


# ============================================================================================
# setup: every check first, then build


def setup(cfg: DictConfig, turns: Turns | None = None) -> Run:
    """The run of `cfg`; `turns`: this run's side of `ablate interleave=steps` (its first turn,
    the setup, already begun), none when it runs on its own."""
    turns = turns if turns is not None else Turns()
    request_huge_pages(cfg.trainer.cpu_huge_pages)  # before this process's first allocation
    d = distributed.setup(cfg.parallel, cfg.trainer.device)
    kept = keep_freed_memory(cfg.trainer.cpu_keep_freed_memory and d.device.type == "cpu")
    claim_run_folder(cfg, d)
    adopt_pretrained_shape(cfg, d)
    # the checkpoint trainer.resume names, verified before anything is written or read
    resume_from = checkpoint.resolve_resume(cfg.trainer.resume, cfg.paths.run_dir, d)
    resolve_auto_precision(cfg, d, resume_from)  # before anything reads the precision
    preflight_checks(cfg, d)
    seed_everything(cfg.trainer.seed)
    t = cfg.trainer

    # data: rank 0 prepares small corpora on first use while the others wait
    if d.is_main:
        data_dir = ensure_prepared(cfg.data)
    distributed.barrier(d)
    if not d.is_main:
        data_dir = ensure_prepared(cfg.data)
    train_loader = ShardLoader(
        data_dir,
        "train",
        batch_size=t.micro_batch_size,
        seq_len=t.seq_len,
        rank=d.rank,
        world_size=d.world_size,
        seed=t.seed,
        shuffle=cfg.data.shuffle,
        pin_memory=d.device.type == "cuda",
    )
    if t.overfit_one_batch:
        train_loader = RepeatFirstBatch(train_loader)
    # validation reads fixed windows by position (see gpt2x.training.validation)
    val_loader = val_reader(data_dir, t.seq_len)
    val_loader.validation_windows(t.eval_tokens)  # a too-small val split fails before training

    raw_model = build_model(cfg, d.device)
    model = distributed.wrap_model(raw_model, d, cfg.precision)
    optimizer = build_optimizer(model, cfg.optim)
    if cfg.compile:
        model = distributed.compile_model(
            model, d.kind, mode=cfg.compile_mode, scope=cfg.compile_scope.value
        )

    accum = grad_accum_steps(cfg, d.world_size)
    tokens_per_step = t.micro_batch_size * t.seq_len * accum * d.world_size
    flops_per_token = raw_model.flops_per_token(t.seq_len)
    # the matmul probe, once per machine (cached): MFU on every device. The denominator is the
    # better of the bf16 and fp32 peaks: bf16 on GPUs, but a CPU without bf16 matrix units runs
    # fp32 matmuls faster, and MFU against the slower peak would read over 100%
    probed = peak_record(d.device)
    peaks = {
        "spec": t.peak_flops or probed["spec_bf16"],
        "measured": max(probed["measured_bf16"], probed["measured_fp32"]),
        **probed,
    }
    if hint := slow_bf16_hint(cfg.precision, d.device, probed):
        log.warning(hint)

    run_dir = Path(cfg.paths.run_dir)
    hellaswag_file = find_hellaswag(cfg, d)
    config = to_container(cfg)
    record = RunRecord(run_dir, enabled=d.is_main)
    record.start(
        run_id=run_dir.name,
        run_dir=str(run_dir),
        experiment=cfg.experiment,
        overrides=_task_overrides(),
        config=config,
        git=git_info(),
        versions={**versions(), "cuda": torch.version.cuda},
        hardware=hardware(d.device, peaks),
        world_size=d.world_size,
        grad_accum_steps=accum,
        tokens_per_step=tokens_per_step,
        n_params=raw_model.num_params(non_embedding=False),
        flops_per_token=flops_per_token,
        paths_taken=paths_taken(cfg, d, kept_freed_memory=kept),
        compile_seconds=None,
        summary=None,
        wandb=None,
        **({"lockstep": turns.info()} if turns.active else {}),
    )
    wandb_logger = None
    if d.is_main and cfg.logger.kind.value == "wandb":
        try:
            wandb_logger = WandbLogger(cfg.logger, str(run_dir), config, run_dir.name)
        except Exception as e:
            record.finish("failed", error=f"W&B init failed: {one_line(e)}")
            raise
        record.update(wandb=wandb_logger.info())

    log.info(
        "model %s: %.2fM params | %s | attn=%s | loss=%s | compile=%s | %s x%d | B=%d T=%d "
        "accum=%d -> %d tokens/step | data %s",
        cfg.model.name,
        raw_model.num_params(non_embedding=False) / 1e6,
        # precision=auto says what it became
        cfg.precision.name
        + (f" ({Dtype(cfg.precision.dtype).value})" if cfg.precision.name == "auto" else ""),
        cfg.attn.impl.value,
        cfg.loss.impl.value,
        cfg.compile,
        d.device,
        d.world_size,
        t.micro_batch_size,
        t.seq_len,
        accum,
        tokens_per_step,
        data_dir,
    )
    scaler = grad_scaler(cfg.precision, d.device)
    checkpointer = Checkpointer(
        run_dir,
        raw_model,
        optimizer,
        scaler=scaler,
        loader=train_loader,
        dist=d,
        config=config,
        keep_last=t.keep_last,
    )
    return Run(
        cfg=cfg,
        dist=d,
        model=model,
        raw_model=raw_model,
        optimizer=optimizer,
        scaler=scaler,
        train_loader=train_loader,
        val_loader=val_loader,
        checkpointer=checkpointer,
        record=record,
        wandb=wandb_logger,
        turns=turns,
        grad_accum=accum,
        tokens_per_step=tokens_per_step,
        flops_per_token=flops_per_token,
        peaks=peaks,
        resume_from=resume_from,
        hellaswag_file=hellaswag_file,
    )


def claim_run_folder(cfg: DictConfig, d: distributed.Dist) -> None:
    """One run per folder, one process at a time (gpt2x.record.folder.claim_run_folder): rank 0
    claims it before anything is written there; every rank raises its RunFolderError. On the
    command line RunFolderCheck has claimed it already, before Hydra wrote anything."""
    error = moved = None
    if d.is_main:
        t = cfg.trainer
        try:
            moved = runfolder.claim_run_folder(cfg.paths.run_dir, t.resume, t.move_aside)
        except runfolder.RunFolderError as e:
            error = str(e)
    error = checkpoint.store.broadcast(error, d)
    if error:
        raise runfolder.RunFolderError(error)
    if moved:
        log.warning(moved)


class RunFolderCheck(Callback):
    """`python -m gpt2x.train`: claim the run folder (rank 0) before Hydra writes .hydra/ and
    the log into it, so a refused start changes nothing in an existing run's folder."""

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        # gpt2x.prepare composes the same config but trains nothing: no run folder to claim
        if not is_rank_zero() or config.hydra.job.name != "train":
            return
        HydraConfig.instance().set_config(config)  # as run_job will: the run dir may read it
        run_dir = config.hydra.run.dir
        t = config.trainer
        try:
            moved = runfolder.claim_run_folder(run_dir, t.resume, t.move_aside)
        except runfolder.RunFolderError as e:
            print(f"error: {e}", file=sys.stderr)
            sys.exit(2)
        if moved:
            print(moved, file=sys.stderr)


def resolve_auto_precision(cfg: DictConfig, d: distributed.Dist, resume_from: Path | None) -> None:
    """precision=auto becomes bf16 or fp32: the resumed checkpoint's (a run keeps its precision
    when it continues, on any machine), else gpt2x.training.precision.faster_dtype of this
    device's measured matmul peaks (probed once per machine, cached). Rank 0 decides, every rank
    takes its choice; the trainer, the record and checkpoints see only the result."""
    if Dtype(cfg.precision.dtype) is not Dtype.auto:
        return
    choice = None
    if d.is_main:
        resumed = resume_from and checkpoint.read_config(resume_from).get("precision", {})
        if resumed and resumed.get("dtype") in (Dtype.bf16.value, Dtype.fp32.value):
            choice = resumed["dtype"]
            log.info("precision=auto: %s, the resumed checkpoint's", choice)
        else:
            bf16 = measured_peak(d.device, torch.bfloat16)
            fp32 = measured_peak(d.device, torch.float32)
            choice = faster_dtype(bf16, fp32).value
            log.info(
                "precision=auto: %s (measured matmul peaks: bf16 %.2f, fp32 %.2f TFLOP/s)",
                choice,
                bf16 / 1e12,
                fp32 / 1e12,
            )
    cfg.precision.dtype = checkpoint.store.broadcast(choice, d)


def preflight_checks(cfg: DictConfig, d: distributed.Dist) -> None:
    """Every check of the settings, before any data is read or compute runs: the config's own
    cross-field rules (gpt2x.config.validate), then what depends on this device and torch
    (precision, attention kernel, loss and float8 paths), then the run folder. Each failure is
    one ConfigError naming the setting to change."""
    validate(cfg, d.world_size)
    setup_precision(cfg.precision, d.device)
    try:
        check_attention(
            AttnImpl(cfg.attn.impl).value,
            d.device,
            torch_dtype(cfg.precision.dtype),
            head_dim=cfg.model.n_embd // cfg.model.n_head,
            dropout=cfg.model.dropout,
        )
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if cfg.precision.float8:
        try:
            check_float8(d.device)
        except ValueError as e:  # Float8Unavailable: "precision=fp8 is not available on ..."
            raise ConfigError(str(e)) from None
    m, t = cfg.model, cfg.trainer
    n_params = m.vocab_size * m.n_embd + m.n_layer * 12 * m.n_embd**2  # for the disk-space check
    # an unwritable or too full output folder is a one-line error here, before any compute
    checkpoint.preflight(Path(cfg.paths.run_dir), n_params, checkpoints_at_once(t), dist=d)


def checkpoints_at_once(t) -> int:
    """The most checkpoints the run folder holds at one time: keep_last plus the one being
    written before the oldest is pruned (every planned one when keep_last=0)."""
    planned = (t.max_steps // t.checkpoint_every if t.checkpoint_every > 0 else 0) + int(
        t.save_final
    )
    planned += int(t.on_bad_loss == "rollback")  # the one saved at the start to roll back to
    return min(planned, t.keep_last + 1) if t.keep_last > 0 else planned


SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size")


def adopt_pretrained_shape(cfg: DictConfig, d: distributed.Dist) -> None:
    """model.init_from=<Hub name or HF folder>: the model's shape is the checkpoint's, written
    into cfg.model before anything reads it (so the record, seq_len's default and every check
    see it). A shape key the user set on the command line to another value is a ConfigError
    naming both; model.vocab_size may only pad the checkpoint's vocabulary."""
    m = cfg.model
    if m.init_from == "scratch":
        return
    if d.is_main:  # a Hub name downloads into the shared cache once
        shape = read_pretrained_shape(m.init_from)
    distributed.barrier(d)
    if not d.is_main:
        shape = read_pretrained_shape(m.init_from)
    explicit = command_line_values("model.")
    for key in SHAPE_KEYS:
        if key in explicit and int(explicit[key]) != shape[key]:
            raise ConfigError(
                f"model.{key}={explicit[key]} conflicts with model.init_from={m.init_from}, "
                f"whose {key} is {shape[key]}; drop model.{key} (the shape comes from the "
                "checkpoint)"
            )
        m[key] = shape[key]
    m.name = Path(m.init_from).name  # what the log and the record call the model
    if m.vocab_size < shape["vocab_size"]:
        if "vocab_size" in explicit:
            raise ConfigError(
                f"model.vocab_size={m.vocab_size} is smaller than model.init_from="
                f"{m.init_from}'s {shape['vocab_size']}; drop model.vocab_size or pad it "
                f"(>= {shape['vocab_size']})"
            )
        m.vocab_size = shape["vocab_size"]


def read_pretrained_shape(name_or_dir: str) -> dict:
    """The GPT-2 shape of a Hub name or a local Hugging Face folder (its config.json only);
    ConfigError naming the fix for a missing folder, a folder that is no HF GPT-2, no network."""
    from transformers import AutoConfig

    key = f"model.init_from={name_or_dir}"
    path = Path(name_or_dir).expanduser()
    if path.exists() or name_or_dir.startswith((".", "/", "~")):  # a folder, not a Hub name
        if not path.exists():
            raise ConfigError(f"{key}: no such folder; give a Hub name (gpt2) or an HF folder")
        gpt2x_run = checkpoint.list_checkpoints(checkpoint.checkpoints_dir(path))
        if gpt2x_run or (path / checkpoint.META_FILE).is_file():
            raise ConfigError(
                f"{key} is a gpt2x run or checkpoint, not a Hugging Face folder; continue it "
                f"with trainer.resume={name_or_dir}, or export it first (python -m "
                f"gpt2x.export checkpoint={name_or_dir} out=<hf folder>) and start from that"
            )
        if not (path / "config.json").is_file():
            raise ConfigError(
                f"{key}: {path} has no config.json, so it is not a Hugging Face model folder "
                "(save_pretrained or python -m gpt2x.export writes one)"
            )
    try:
        hf_config = AutoConfig.from_pretrained(name_or_dir)
    except OSError as e:  # no network and nothing cached, or an unknown name
        raise ConfigError(
            f"{key} cannot be loaded ({one_line(e)}); with no network, download it "
            "where there is one (huggingface-cli download gpt2) and set "
            "model.init_from=/path/to/that/folder"
        ) from None
    except ValueError as e:  # a config.json transformers cannot read
        raise ConfigError(f"{key}: {one_line(e)}") from None
    if hf_config.model_type != "gpt2":
        raise ConfigError(
            f"{key} is a {hf_config.model_type!r} model; gpt2x trains GPT-2 (model_type gpt2)"
        )
    try:
        return pretrained_shape(hf_config, name_or_dir)
    except ValueError as e:
        raise ConfigError(f"{key}: {e}") from None


def command_line_values(prefix: str) -> dict[str, str]:
    """{key without prefix: value} of the command line's `prefix...=value` overrides (what the
    user set explicitly, as opposed to a config group's defaults)."""
    if not HydraConfig.initialized():
        return {}
    parsed = OverridesParser.create().parse_overrides(list(HydraConfig.get().overrides.task))
    return {
        o.key_or_group.removeprefix(prefix): o.value()
        for o in parsed
        if o.key_or_group.startswith(prefix) and not o.is_delete()
    }


def paths_taken(cfg: DictConfig, d: distributed.Dist, kept_freed_memory: bool) -> dict:
    """Which code path each rung-like choice really ran (never a silent fallback)."""
    return {
        "attention": AttnImpl(cfg.attn.impl).value,
        "loss": cfg.loss.impl.value,
        "float8": bool(cfg.precision.float8),
        "compile": f"{cfg.compile_scope.value}/{cfg.compile_mode}" if cfg.compile else None,
        "optimizer": f"{cfg.optim.name.value}{' (fused)' if cfg.optim.fused else ''}",
        "activation_checkpointing": bool(cfg.model.activation_checkpointing),
        "tf32": bool(cfg.precision.tf32) and d.device.type == "cuda",
        "cpu_huge_pages": check_huge_pages(cfg.trainer.cpu_huge_pages),
        "cpu_keep_freed_memory": kept_freed_memory,
    }


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: DictConfig, device: torch.device) -> GPT:
    m = cfg.model
    options = dict(
        attn=AttnImpl(cfg.attn.impl).value,
        loss=cfg.loss.impl.value,
        loss_chunk_size=cfg.loss.chunk_size,
        loss_kernel=cfg.loss.kernel.value,
        activation_checkpointing=m.activation_checkpointing,
    )
    try:
        if m.init_from == "scratch":
            gpt_cfg = GPTConfig(
                block_size=m.block_size,
                vocab_size=m.vocab_size,
                n_layer=m.n_layer,
                n_head=m.n_head,
                n_embd=m.n_embd,
                dropout=m.dropout,
                bias=m.bias,
                **options,
            )
            model = GPT(gpt_cfg)
        else:
            # the shape is the checkpoint's (adopt_pretrained_shape wrote it into cfg.model)
            model = GPT.from_pretrained(
                m.init_from, vocab_size=m.vocab_size, dropout=m.dropout, **options
            )
    except ValueError as e:  # an option this torch lacks (loss=chunked): one line
        raise ConfigError(str(e)) from None
    except OSError as e:  # from_pretrained: the weights file is missing or unreadable
        raise ConfigError(
            f"model.init_from={m.init_from}: its weights cannot be loaded "
            f"({one_line(e)})"
        ) from None
    model = model.to(device)
    if cfg.precision.float8:
        try:
            model = convert_to_float8(model, device)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    return model


class RepeatFirstBatch:
    """debug=overfit_batch: the first batch forever; a working model drives its loss to ~0."""

    def __init__(self, loader: ShardLoader):
        self.loader = loader
        self.batch = loader.next_batch()

    def next_batch(self):
        return self.batch

    def state_dict(self) -> dict:
        return self.loader.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.loader.load_state_dict(state)


def find_hellaswag(cfg: DictConfig, d: distributed.Dist) -> Path | None:
    """The HellaSwag file for trainer.hellaswag_every > 0 (rank 0 downloads the val split once);
    a missing or malformed file is a ConfigError before training."""
    t = cfg.trainer
    if t.hellaswag_every <= 0:
        return None

    def find() -> Path:
        path = (
            Path(t.hellaswag_path).expanduser()
            if t.hellaswag_path
            else hellaswag_path("val", option="trainer.hellaswag_path")
        )
        load_examples(path, limit=1)
        return path

    if d.is_main:  # downloads the val split once; errors are raised by every rank below
        with contextlib.suppress(HellaSwagError):
            find()
    distributed.barrier(d)
    try:
        return find()
    except HellaSwagError as e:
        raise ConfigError(f"trainer.hellaswag_every={t.hellaswag_every}: {e}") from None


def _task_overrides() -> list[str]:
    if HydraConfig.initialized():
        return list(HydraConfig.get().overrides.task)
    return []
