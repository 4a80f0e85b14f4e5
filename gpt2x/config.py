"""Typed config schemas, registered in Hydra's ConfigStore, and cross-field validation.

Each dataclass is the schema of one config group in `conf/`; the YAML files there only choose
values. Enums (not Literal: omegaconf 2.3 does not support it) give Hydra's own error for an
unknown value. Cross-field problems that Hydra cannot see are caught by `validate` before any
compute, with one line naming the setting to change.
"""

from __future__ import annotations

import hashlib
import math
import os
import secrets
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

from hydra.core.config_store import ConfigStore
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import MISSING, OmegaConf

from gpt2x.measure import DEFAULT_WARMUP

GPT2_TOKENIZER_VOCAB = 50257  # tiktoken "gpt2": 50256 BPE merges + <|endoftext|>


class ConfigError(ValueError):
    """A setting that cannot work; the message names the setting to change."""


class Dtype(str, Enum):
    fp32 = "fp32"
    bf16 = "bf16"
    fp16 = "fp16"
    # precision=auto: bf16 or fp32, whichever this machine's measured matmuls run faster; set
    # to one of them when the run starts (gpt2x.training.run.resolve_auto_precision), so the
    # trainer, the record and checkpoints see only the result
    auto = "auto"


class AttnImpl(str, Enum):
    naive = "naive"  # explicit masked softmax, materializes the (T, T) matrix
    sdpa = "sdpa"  # F.scaled_dot_product_attention, any backend
    flash = "flash"  # SDPA restricted to the flash kernel


class ParallelKind(str, Enum):
    single = "single"
    ddp = "ddp"
    fsdp = "fsdp"


# torch.compile's modes, in torch's own spelling ("reduce-overhead": CUDA graphs)
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


class CompileScope(str, Enum):
    model = "model"  # torch.compile(model): one graph (FSDP always compiles per block)
    block = "block"  # each transformer block (and the head + loss) compiled on its own


class LossImpl(str, Enum):
    plain = "plain"  # LM head -> (B*T, V) logits -> cross-entropy
    chunked = "chunked"  # LM head + cross-entropy in row chunks: never the full logits


class LossKernel(str, Enum):  # loss=chunked's kernel
    gpt2x = "gpt2x"  # gpt2x/chunked_loss.py: compiled chunks, any torch
    torch = "torch"  # torch.nn.functional.linear_cross_entropy (torch >= 2.13)


class OptimName(str, Enum):
    adamw = "adamw"
    muon = "muon"  # Muon on the blocks' 2-D matrices, AdamW on everything else


class LoggerKind(str, Enum):
    wandb = "wandb"
    none = "none"


class Interleave(str, Enum):
    """How gpt2x.ablate interleaves the repeats of its rungs (docs/ladder.md)."""

    runs = "runs"  # every rung a fresh process: every rung, then every rung again, ...
    steps = "steps"  # the single-process rungs of a repeat run together, taking turns by step


class WandbMode(str, Enum):
    auto = "auto"  # online if an API key is configured, else offline
    online = "online"
    offline = "offline"
    disabled = "disabled"


@dataclass
class ModelConfig:
    name: str = "nano"
    n_layer: int = 4
    n_head: int = 4
    n_embd: int = 256
    block_size: int = 256  # maximum context length (learned positional embeddings)
    vocab_size: int = GPT2_TOKENIZER_VOCAB  # 50304 pads it to a multiple of 128
    dropout: float = 0.0
    bias: bool = True
    # recompute each block's activations in backward (memory for compute)
    activation_checkpointing: bool = False
    # "scratch", a Hugging Face model name ("gpt2") or a local Hugging Face directory
    init_from: str = "scratch"


@dataclass
class DataConfig:
    name: str = "shakespeare"
    # what `name` reads: a glob for `text`, a URL for `tinyshakespeare`, a HF dataset path
    # or local files for `hf`; empty means the corpus' built-in source
    source: str = ""
    hf_config: str = ""  # HF dataset config name (e.g. "sample-10BT")
    hf_split: str = "train"
    hf_revision: str = ""
    text_field: str = "text"
    sha256: str = ""  # expected checksum of a downloaded source file
    # prepared token shards live here (manifest.json + *.bin)
    dir: str = "${paths.data_dir}/${data.name}"
    val_fraction: float = 0.1  # for small corpora: the first tokens of the corpus go to val
    val_tokens: int = 0  # if > 0: fixed validation size in tokens (overrides val_fraction)
    shard_tokens: int = 100_000_000
    num_workers: int = 1  # tokenizer worker processes for preparation
    shuffle: bool = True
    verify: str = "size"  # "size" (fast) or "sha256" (reads every shard once at start)


@dataclass
class PrecisionConfig:
    name: str = "fp32"
    dtype: Dtype = Dtype.fp32  # autocast dtype for forward + loss; params stay fp32
    tf32: bool = False  # TF32 matmuls on CUDA (no-op on CPU)
    # float8 matmuls for the blocks' Linear layers (torchao; H100-class GPUs only)
    float8: bool = False


@dataclass
class AttnConfig:
    impl: AttnImpl = AttnImpl.naive


@dataclass
class LossConfig:
    impl: LossImpl = LossImpl.plain
    chunk_size: int = 512  # rows (tokens) per chunk of loss=chunked
    kernel: LossKernel = LossKernel.gpt2x


@dataclass
class OptimConfig:
    name: OptimName = OptimName.adamw
    lr: float = 6e-4
    min_lr_ratio: float = 0.1  # cosine decays to lr * min_lr_ratio
    warmup_steps: int = 10
    # steps of the cosine schedule; null means trainer.max_steps
    decay_steps: int | None = None
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1  # applied to 2-D params (matmuls, embeddings) only
    fused: bool = False
    grad_clip: float = 1.0  # 0 disables clipping
    # optim=muon: Muon for the blocks' 2-D weights (its own lr), AdamW (the fields above) for
    # embeddings, head, gains and biases
    muon_lr: float = 0.02
    muon_momentum: float = 0.95
    muon_weight_decay: float = 0.01


@dataclass
class ParallelConfig:
    kind: ParallelKind = ParallelKind.single
    backend: str = "auto"  # nccl on CUDA, gloo on CPU
    # FSDP2: reshard parameters after forward (saves memory, costs an all-gather in backward)
    reshard_after_forward: bool = True
    # FSDP2 gradient reduce-scatter dtype: auto = the precision dtype (bf16 -> bf16; fp16 ->
    # fp32; fp32 -> fp32) | fp32 | bf16 | fp16
    reduce_dtype: str = "auto"
    # a collective that waits longer than this fails (a dead or stuck peer ends the job)
    timeout_minutes: float = 10.0


@dataclass
class TrainerConfig:
    max_steps: int = 100
    micro_batch_size: int = 8  # B: sequences per forward/backward on one rank
    seq_len: int = "${model.block_size}"  # type: ignore[assignment]  # T
    # tokens per optimization step over all ranks; grad accumulation = total / (B*T*world)
    total_batch_tokens: int = "${eval:'${trainer.micro_batch_size} * ${trainer.seq_len}'}"  # type: ignore[assignment]
    seed: int = 1337
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    eval_every: int = 50  # 0: only at the end
    # the fixed validation set: the first eval_tokens // seq_len windows of the val split, the
    # same for every micro batch size and world size (so val losses compare across runs)
    eval_tokens: int = 20480
    sample_tokens: int = 48  # length of the text sample at the end; 0 disables
    sample_every: int = 0  # also a sample every N steps (0: only at the end)
    sample_prompt: str = "\n"
    log_every: int = 1
    # stop with a message if loss is NaN/inf; a finite loss above spike_factor x the running
    # median counts as a spike (0 disables)
    spike_factor: float = 0.0
    # checkpointing / resume (see gpt2x/checkpoint/)
    checkpoint_every: int = 0  # 0: only at the end
    keep_last: int = 2
    save_final: bool = True
    resume: str = ""  # "" | auto | path to a checkpoint directory
    # a fresh run (resume="") into a folder that holds a run: true renames the old run to
    # <folder>-old-<time> first; false (default) refuses to start
    move_aside: bool = False
    # a NaN/inf loss or a spike: "stop" with a message, or "rollback" to the last checkpoint and
    # skip the offending step's batches (at most max_rollbacks times per run)
    on_bad_loss: str = "stop"  # stop | rollback
    max_rollbacks: int = 3
    # HellaSwag during training (gpt2x/training/hellaswag.py): every N steps and at the end; 0 disables
    hellaswag_every: int = 0
    hellaswag_path: str = ""  # a hellaswag jsonl; "" = the cached (downloaded once) val split
    hellaswag_limit: int = 0  # score only the first N examples; 0 = all
    # measurement: the first warmup_steps steps are excluded from summary step-time stats
    warmup_steps_for_timing: int = DEFAULT_WARMUP
    peak_flops: float | None = None  # override the per-device peak table (FLOP/s) for MFU
    # transparent huge pages for CPU buffers >= 2 MB (gpt2x/training/allocator.py): measured
    # 1.10x faster bf16 steps on top of kept freed memory; must be set before the process's
    # first allocation; the environment's THP_MEM_ALLOC_ENABLE wins
    cpu_huge_pages: bool = False
    # CPU runs: glibc keeps freed memory for reuse instead of page-faulting every step's large
    # buffers afresh (gpt2x/training/allocator.py): the default run 1.4x faster; memory stays
    # at its peak
    cpu_keep_freed_memory: bool = True
    # debugging
    overfit_one_batch: bool = False  # train on the first batch over and over (must reach ~0 loss)
    profile_steps: int = 0  # > 0: torch.profiler trace of that many steps -> run_dir/profile/
    # time breakdown (matmul, attention, loss, ...) of the run's last this-many steps, in the
    # record's "breakdown" (gpt2x.training.profiling), left out of the step-time stats; 0 disables
    breakdown_steps: int = 0
    progress: str = "auto"  # auto (a live bar on a terminal) | bar | log


@dataclass
class LoggerConfig:
    kind: LoggerKind = LoggerKind.wandb
    mode: WandbMode = WandbMode.auto
    project: str = "gpt2x"
    entity: str | None = None
    name: str | None = None  # default: the run folder's name
    group: str | None = None  # ablation / sweep name
    job_type: str | None = None  # ladder rung
    tags: list[str] = field(default_factory=list)


@dataclass
class PathsConfig:
    root: str = "${oc.env:GPT2X_HOME,.}"
    output_dir: str = "${paths.root}/outputs"
    data_dir: str = "${oc.env:GPT2X_DATA,${oc.env:HOME,.}/.cache/gpt2x/data}"
    run_dir: str = "${hydra:runtime.output_dir}"


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    attn: AttnConfig = field(default_factory=AttnConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    parallel: ParallelConfig = field(default_factory=ParallelConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    loss: LossConfig = field(default_factory=LossConfig)
    compile: bool = False  # torch.compile the model
    compile_mode: str = "default"  # one of COMPILE_MODES (torch.compile's `mode`)
    compile_scope: CompileScope = CompileScope.model
    experiment: str = ""  # name of the experiment / ladder rung, recorded in the run record
    # the repeat index of a repeated measurement (gpt2x.ablate repeats=N sets it; a sweep:
    # `-m repeat=0,1,2 ...`); runs that differ only in it are one row of a report
    repeat: int = 0
    defaults: list[Any] = field(default_factory=list)


MAX_JOB_NAME = 80  # characters of overrides in a job folder's name before it is shortened


def job_dirname() -> str:
    """`<job num>_<overrides>` for the running multirun job: deterministic, short, one folder.

    Like Hydra's `${hydra.job.num}_${hydra.job.override_dirname}` (same exclude_keys, kv/item
    separators), but the keys the sweeper sweeps (`hydra.sweeper.params`) come first, `/` in a
    value becomes `-` (no nested folders), and more than MAX_JOB_NAME characters of overrides are
    cut and end in 8 hex digits of a hash of the full list (a file name has at most 255 bytes).
    """
    hc = HydraConfig.get()
    conf = hc.job.config.override_dirname
    exclude = set(conf.exclude_keys or [])
    swept = list((OmegaConf.select(hc, "sweeper.params") or {}).keys())
    lines = []
    for o in OverridesParser.create().parse_overrides(list(hc.overrides.task)):
        key = o.key_or_group
        if key in exclude:
            continue
        first = swept.index(key) if key in swept else len(swept)
        lines.append((first, o.input_line.replace("=", conf.kv_sep, 1)))
    lines.sort()
    name = _folder_name(conf.item_sep.join(line for _, line in lines))
    return f"{hc.job.num}_{name}" if name else str(hc.job.num)


def _folder_name(full: str) -> str:
    """Overrides as one folder name: `/` becomes `-`, long lists are cut and end in a hash."""
    name = full.replace("/", "-").replace(os.sep, "-")
    if len(name) > MAX_JOB_NAME:
        digest = hashlib.sha1(full.encode()).hexdigest()[:8]
        name = f"{name[: MAX_JOB_NAME - 9]}-{digest}"
    return name


# not part of a run's name: where it writes, how it logs, and trainer.resume itself
_NOT_IN_RUN_NAME = ("hydra.", "paths.", "logger", "trainer.resume")


def stable_run_name(overrides: list[str] | tuple[str, ...]) -> str:
    """The run folder's name when trainer.resume=auto: the command line's overrides (sorted,
    `key=value,...`), so launching the same command again (a requeue, a new `torchrun
    --standalone` launch with a new rendezvous id) finds the same folder and continues it."""
    keep = sorted(o.lstrip("+") for o in overrides)
    keep = [o for o in keep if not o.lstrip("~").startswith(_NOT_IN_RUN_NAME)]
    return _folder_name(",".join(keep)) or "default"


def run_dir_name(resume: str) -> str:
    """hydra.run.dir's last part: with trainer.resume=auto the overrides' stable name (unless
    GPT2X_RUN_ID names the run), else one id per launch (`run_id`)."""
    if str(resume) == "auto" and not os.environ.get("GPT2X_RUN_ID") and HydraConfig.initialized():
        return stable_run_name(list(HydraConfig.get().overrides.task))
    return run_id()


# ---- the checkpoint tools: python -m gpt2x.sample | export | evaluate (conf/<tool>.yaml)


@dataclass
class SampleConfig:
    checkpoint: str = MISSING  # a checkpoint folder, a run folder or its checkpoints/ folder
    prompt: str = "\n"
    max_new_tokens: int = 100
    temperature: float = 1.0  # 0 = greedy
    top_k: int = 50  # 0 = all tokens
    seed: int = 1337
    num_samples: int = 1
    device: str = "auto"  # auto | cpu | cuda | cuda:N | mps
    precision: str = ""  # fp32 | bf16 | fp16; "" = the run's autocast dtype


@dataclass
class ExportConfig:
    checkpoint: str = MISSING
    out: str = MISSING  # the Hugging Face folder to write
    vocab_size: int = GPT2_TOKENIZER_VOCAB  # embedding rows kept (drops a padded vocab's rows)


@dataclass
class EvaluateConfig:
    # what to evaluate: a gpt2x checkpoint, or a Hugging Face GPT-2 (a Hub name such as gpt2 or
    # gpt2-xl, or a local folder) for the published baselines
    checkpoint: str = ""
    hf_model: str = ""
    val: bool = True  # the validation loss on the fixed val set
    data_dir: str = ""  # prepared data folder; "" = the checkpoint run's data.dir
    # 0 = the run's trainer.eval_tokens; for hf_model the reproduce recipes' set: 20 batches of
    # 64 x 1024 tokens on 8 ranks = 10,485,760 (gpt2x.evaluate.HF_EVAL_TOKENS)
    eval_tokens: int = 0
    micro_batch_size: int = 0  # 0 = the run's (for hf_model: 16)
    hellaswag: bool = False
    hellaswag_path: str = ""  # "" = the run's trainer.hellaswag_path, else the cached val split
    hellaswag_limit: int = 0  # 0 = all examples
    hellaswag_batch: int = 16  # examples per forward
    precision: str = ""  # fp32 | bf16 | fp16; "" = the run's autocast dtype (hf_model: fp32)
    device: str = "auto"


@dataclass
class AblateConfig:
    """`python -m gpt2x.ablate key=value ... [-- rung overrides]` (docs/ladder.md)."""

    ladder: str | None = None  # experiments/ladder/<name>.yml (nano_cpu, gpt2_124m, ...) or a file
    rungs: list[str] = field(default_factory=list)  # experiments to run instead of the ladder's
    steps: int | None = None  # measured steps per rung (default: the ladder's, else 10)
    warmup: int | None = None  # untimed warm-up steps per rung (default: the ladder's, else 3)
    # fresh processes per rung, interleaved (every rung once, then every rung again, ...);
    # default: the ladder's, else 1
    repeats: int | None = None
    # runs: each rung a fresh process; steps: a repeat's single-process rungs take turns step
    # by step, each its own process (gpt2x.training.turns), paired step by step; default: the ladder's,
    # else runs
    interleave: Interleave | None = None
    nproc: int | None = None  # processes of a ddp/fsdp rung (default: CUDA devices, else 2)
    out: str | None = None  # the ablation folder (default: outputs/ablations/<ladder>_<time>)
    overrides: list[str] = field(default_factory=list)  # for every rung (also after `--`)
    profile: bool = True  # a step-time breakdown of one extra step after the measured ones
    wandb: bool = False  # also save a W&B report of the rungs at the end
    timeout: float | None = None  # seconds a rung may run before it is stopped (failed)
    quiet: bool = False  # do not echo the rungs' output (always in <rung folder>/rung.log)
    dry_run: bool = False  # print the rung commands and exit


_RUN_ID: str | None = None


def run_id() -> str:
    """One id per launch, identical on every rank.

    torchrun gives all ranks of one launch the same TORCHELASTIC_RUN_ID, so ranks agree on one
    output folder without talking to each other (a `${now:}` timestamp can differ per rank).
    """
    global _RUN_ID
    if _RUN_ID is None:
        explicit = os.environ.get("GPT2X_RUN_ID")
        elastic = os.environ.get("TORCHELASTIC_RUN_ID", "")
        if explicit:
            _RUN_ID = explicit
        elif elastic and elastic != "none" and "RANK" in os.environ:
            # no timestamp: ranks starting either side of a minute would disagree
            _RUN_ID = "torchrun-" + elastic
        else:
            _RUN_ID = time.strftime("%Y-%m-%d_%H-%M-%S_") + secrets.token_hex(2)
    return _RUN_ID


def is_rank_zero() -> bool:
    return os.environ.get("RANK", "0") == "0"


def register_configs() -> None:
    """Register schemas and resolvers; idempotent."""
    resolvers = {
        "eval": lambda expr: eval(expr, {"__builtins__": {}}, {}),  # arithmetic in YAML only
        "gpt2x_run_id": run_id,
        "gpt2x_run_dir_name": run_dir_name,  # hydra.run.dir (conf/hydra/default.yaml)
        # only rank 0 writes Hydra's .hydra/ folder: other ranks would race on the same files
        "gpt2x_hydra_subdir": lambda: ".hydra" if is_rank_zero() else None,
        "gpt2x_rank_suffix": lambda: "" if is_rank_zero() else f"_rank{os.environ['RANK']}",
        # a short stable name for a folder of prepared data derived from a source path
        "gpt2x_path_hash": lambda src: hashlib.sha256(str(src).encode()).hexdigest()[:10],
        # multirun job folders (conf/hydra/default.yaml: hydra.sweep.subdir)
        "gpt2x_job_dir": job_dirname,
        # a file shipped with the package (gpt2x/assets/), e.g. the rehearsal's HellaSwag sample
        "gpt2x_asset": lambda name: str(Path(__file__).resolve().parent / "assets" / str(name)),
    }
    for name, fn in resolvers.items():
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(
                name, fn, use_cache=name not in ("eval", "gpt2x_job_dir", "gpt2x_run_dir_name")
            )
    cs = ConfigStore.instance()
    cs.store(name="config_schema", node=Config)
    for name, schema in [
        ("sample", SampleConfig),
        ("export", ExportConfig),
        ("evaluate", EvaluateConfig),
        ("ablate", AblateConfig),
    ]:
        cs.store(name=f"{name}_schema", node=schema)
    for group, schema in [
        ("model", ModelConfig),
        ("data", DataConfig),
        ("precision", PrecisionConfig),
        ("attn", AttnConfig),
        ("optim", OptimConfig),
        ("parallel", ParallelConfig),
        ("logger", LoggerConfig),
        ("trainer", TrainerConfig),
        ("loss", LossConfig),
    ]:
        # a root-level config, not an option of the group: `--help` lists only real choices;
        # each YAML of the group puts it under its own package (`/model_schema@_here_`)
        cs.store(name=f"{group}_schema", node=schema)


def grad_accum_steps(cfg: Any, world_size: int) -> int:
    """Micro-steps per optimization step, derived from the fixed global batch in tokens."""
    b, t = cfg.trainer.micro_batch_size, cfg.trainer.seq_len
    tokens_per_micro_step = b * t * world_size
    total = cfg.trainer.total_batch_tokens
    if total <= 0 or total % tokens_per_micro_step:
        # the largest micro batch up to B that divides the step (tokens per step stay fixed)
        fits = next(
            (k for k in range(b, 0, -1) if total > 0 and total % (k * t * world_size) == 0), None
        )
        fix = (
            f"set trainer.micro_batch_size={fits} (accumulation makes up the rest) or "
            if fits
            else ""
        )
        raise ConfigError(
            f"trainer.total_batch_tokens={total} is not a positive multiple of "
            f"micro_batch_size*seq_len*world_size = {b}*{t}*{world_size} = "
            f"{tokens_per_micro_step}; {fix}set trainer.total_batch_tokens to a multiple of "
            f"{tokens_per_micro_step}"
        )
    return total // tokens_per_micro_step


def validate(cfg: Any, world_size: int = 1) -> None:
    """Cross-field checks that Hydra's schema cannot express. Raises ConfigError."""
    m, t, o = cfg.model, cfg.trainer, cfg.optim
    if m.n_embd % m.n_head:
        raise ConfigError(
            f"model.n_embd={m.n_embd} is not divisible by model.n_head={m.n_head}; "
            "change one of them"
        )
    if m.vocab_size < GPT2_TOKENIZER_VOCAB:
        raise ConfigError(
            f"model.vocab_size={m.vocab_size} is smaller than the GPT-2 tokenizer's "
            f"{GPT2_TOKENIZER_VOCAB} tokens; set model.vocab_size>={GPT2_TOKENIZER_VOCAB} "
            "(50304 pads it to a multiple of 128)"
        )
    if t.seq_len > m.block_size:
        raise ConfigError(
            f"trainer.seq_len={t.seq_len} exceeds model.block_size={m.block_size}; "
            f"set trainer.seq_len<={m.block_size}"
        )
    for key in ("max_steps", "micro_batch_size", "seq_len"):
        if t[key] <= 0:
            raise ConfigError(f"trainer.{key}={t[key]} must be positive")
    if t.eval_tokens < t.seq_len:
        raise ConfigError(
            f"trainer.eval_tokens={t.eval_tokens} is less than one sequence; set "
            f"trainer.eval_tokens>={t.seq_len} (trainer.seq_len)"
        )
    if o.lr <= 0 or not math.isfinite(o.lr):
        raise ConfigError(f"optim.lr={o.lr} must be a positive number")
    if not 0.0 <= o.min_lr_ratio <= 1.0:
        raise ConfigError(f"optim.min_lr_ratio={o.min_lr_ratio} must be in [0, 1]")
    if o.warmup_steps < 0:
        raise ConfigError(f"optim.warmup_steps={o.warmup_steps} must be >= 0")
    if t.on_bad_loss not in ("stop", "rollback"):
        raise ConfigError(f"trainer.on_bad_loss={t.on_bad_loss!r} must be 'stop' or 'rollback'")
    for key in (
        "checkpoint_every",
        "keep_last",
        "max_rollbacks",
        "hellaswag_every",
        "hellaswag_limit",
        "sample_every",
        "breakdown_steps",
        "eval_every",
    ):
        if t[key] < 0:
            raise ConfigError(f"trainer.{key}={t[key]} must be >= 0")
    if cfg.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"compile_mode={cfg.compile_mode!r} is not a torch.compile mode; use one of "
            f"{', '.join(COMPILE_MODES)}"
        )
    if t.progress not in ("auto", "bar", "log"):
        raise ConfigError(f"trainer.progress={t.progress!r} must be auto, bar or log")
    if cfg.loss.chunk_size <= 0:
        raise ConfigError(f"loss.chunk_size={cfg.loss.chunk_size} must be positive")
    if cfg.data.verify not in ("size", "sha256"):
        raise ConfigError(f"data.verify={cfg.data.verify!r} must be 'size' or 'sha256'")
    grad_accum_steps(cfg, world_size)


def parse_bool(value: str) -> bool:
    """true/false (also 1/0, yes/no, on/off) from a command-line value; ValueError otherwise."""
    low = value.strip().lower()
    if low in ("1", "true", "yes", "on"):
        return True
    if low in ("0", "false", "no", "off"):
        return False
    raise ValueError(f"{value!r}: expected true or false")


def to_container(cfg: Any) -> dict:
    """The resolved config as plain Python types (enums as their names), for records and W&B."""
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)  # type: ignore[return-value]


def resolved_config(cfg: Any) -> dict | None:
    """`to_container`, or the unresolved values where an interpolation is broken (a failed
    job's record still shows what was asked for); None if not even that works."""
    try:
        return to_container(cfg)
    except Exception:  # noqa: BLE001 - any resolver error
        try:
            return OmegaConf.to_container(cfg, resolve=False, enum_to_str=True)  # type: ignore[return-value]
        except Exception:  # noqa: BLE001
            return None


__all__ = [
    "MISSING",
    "AttnImpl",
    "Config",
    "ConfigError",
    "Dtype",
    "LoggerKind",
    "ParallelKind",
    "WandbMode",
    "grad_accum_steps",
    "parse_bool",
    "register_configs",
    "run_id",
    "to_container",
    "validate",
]
