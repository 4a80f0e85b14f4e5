"""`python -m gpt2x.ablate ladder=nano_cpu`: run an optimization ladder and compare its rungs.

    python -m gpt2x.ablate ladder=nano_cpu                      # experiments/ladder/nano_cpu.yml
    python -m gpt2x.ablate ladder=gpt2_124m -- trainer.micro_batch_size=32
    python -m gpt2x.ablate rungs=[fp32,bf16] steps=5 warmup=1
    python -m gpt2x.ablate ladder=nano_cpu dry_run=true         # print the rung commands only

A ladder is a small file, `experiments/ladder/<ladder>.yml`: its shape (`shape:`, the
`ladder_shape` config group: what every rung holds constant), the ordered rungs (each a named
experiment, `experiments/ladder/<rung>.yaml`, that includes the previous rung and changes one
thing), the measured and warm-up steps, the repeats, the processes for distributed rungs and
overrides for every rung. Each rung runs as its own subprocess, one after the other (with
repeats: every rung, then every rung again),

    python -m gpt2x.train +experiment=<rung> <overrides> hydra.run.dir=<out>/<NN>_<rung>

or, for a rung with parallel=ddp|fsdp, `torchrun --standalone --nproc_per_node=<nproc> -m
gpt2x.train ...`, so a rung that crashes or runs out of memory fails alone (with
`interleave=steps` the single-process rungs of a repeat run at the same time, each its own
process, and take turns step by step: see run_lockstep): it is recorded as
failed with a one-line reason and the next rung runs. At the end (or after Ctrl-C, with the
finished rungs) the runner writes into the ablation folder, through gpt2x.report:
`ablation.md` (header + table + per-rung re-run commands), `ablation.csv`, `loss.png`,
`tokens_per_s.png`, and `ablation.json` (the manifest: ladder, rungs, exact commands, status).
`python -m gpt2x.report <folder>` rebuilds the same table from the run records.

Exit status: 0 every rung completed; 1 some rung failed (the table says which and why); 2 bad
input (unknown ladder or rung, an override Hydra rejects); 130 interrupted by Ctrl-C (143 by
SIGTERM) after writing the partial table. See docs/ladder.md.
"""

from __future__ import annotations

import contextlib
import os
import random
import re
import select
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from gpt2x import CONF_DIR, EXPERIMENTS_DIR, REPO_ROOT
from gpt2x.config import AblateConfig, Interleave, register_configs, to_container
from gpt2x.lab import report
from gpt2x.lab.launch import failure_from_log, quote_override_value, stop_process_group
from gpt2x.record.folder import failed_record, git_info, now, read_record, write_json
from gpt2x.training.turns import ENV_FDS as TURN_FDS_ENV
from gpt2x.training.turns import ENV_GROUP as TURN_GROUP_ENV
from gpt2x.training.turns import LAST as TURN_LAST
from gpt2x.training.turns import STEP as TURN_STEP

LADDER_DIR = EXPERIMENTS_DIR / "ladder"
LADDER_SUFFIX = ".yml"  # experiments/ladder/<ladder>.yml (not *.yaml: not a Hydra config)
TRAIN_MODULE = "gpt2x.train"
BASENAME = report.ABLATION  # ablation.md / ablation.csv / ablation.json
DEFAULT_STEPS = 10
DEFAULT_WARMUP = 3
CPU_NPROC = 2  # gloo processes for a distributed rung on a machine without CUDA
# launcher variables a rung must not inherit from the runner's own environment
LAUNCH_ENV = (
    "RANK",
    "LOCAL_RANK",
    "WORLD_SIZE",
    "LOCAL_WORLD_SIZE",
    "GROUP_RANK",
    "MASTER_ADDR",
    "MASTER_PORT",
    "TORCHELASTIC_RUN_ID",
    "GPT2X_RUN_ID",
)
# a rung whose option this machine cannot have: "... is not available on <device> ...", a
# package this machine lacks (torchao for precision=fp8) or a newer torch ("... (torch >= 2.13)"):
# the table shows it as n/a on this machine, not as a failure
NOT_AVAILABLE = re.compile(r"\bis not available on\b|\bneeds torchao\b|\(torch >= \d+\.\d+\)")
# a distributed rung with one process measures only the wrapper's overhead, not data parallelism
ONE_PROCESS = (
    "parallel={kind} is not available on one process (nproc=1{why}): a world of one measures "
    "only {kind}'s overhead; run it with 2+ GPUs (nproc=N)"
)
INTERRUPT_GRACE_S = 60.0  # after Ctrl-C, how long a rung may take to finish its record

USAGE = """\
usage: python -m gpt2x.ablate [ladder=NAME|FILE] [rungs=[A,B,...]] [steps=N] [warmup=N]
                              [repeats=N] [interleave=runs|steps] [nproc=N] [out=DIR]
                              [overrides=[...]] [profile=BOOL] [wandb=BOOL|--wandb]
                              [timeout=SECONDS] [quiet=BOOL] [dry_run=BOOL|--dry-run]
                              [-- K=V ...]

Options are Hydra overrides of gpt2x.config.AblateConfig (conf/ablate.yaml); everything after
`--` is passed to every rung as Hydra overrides of the trainer's config.

  ladder     experiments/ladder/<NAME>.yml (nano_cpu, gpt2_124m, beyond_cpu, ...) or a .yml file
  rungs      experiments to run in order instead of (or without) a ladder's list; a name
             without '/' (or found under experiments/ladder/) is experiments/ladder/<name>.yaml
  steps      measured optimizer steps per rung (default: the ladder's, else 10)
  warmup     untimed steps before the measured ones, per rung (default: the ladder's, else 3)
  repeats    fresh processes per rung, interleaved: every rung, then every rung again, ...
             (default: the ladder's, else 1); the table reports 95% intervals over them
  interleave runs: each rung runs alone; steps: a repeat's single-process rungs run together,
             taking turns step by step (default: the ladder's, else runs)
  nproc      processes for parallel=ddp|fsdp rungs (torchrun); default: the ladder's, else the
             number of CUDA devices, else 2 gloo processes on CPU
  out        the ablation folder (default: outputs/ablations/<ladder>_<timestamp>)
  overrides  Hydra overrides for every rung (the same as the ones after `--`)
  profile    a step-time breakdown of one extra, untimed step after each rung's measured
             ones (default: true)
  wandb      at the end, also save a W&B report of the rungs (needs network and an API key)
  timeout    a rung running longer than this is stopped and recorded as failed
  quiet      do not echo the rungs' output (it is always in <rung folder>/rung.log)
  dry_run    print the rung commands and exit
"""


class AblationError(ValueError):
    """Bad input (unknown ladder or rung, a bad option); the message is one line."""


class Interrupted(Exception):
    """SIGINT/SIGTERM reached the runner."""

    def __init__(self, signum: int):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


# --------------------------------------------------------------------------------------------
# Options: Hydra overrides against gpt2x.config.AblateConfig (conf/ablate.yaml)


def parse_args(argv: list[str]) -> AblateConfig:
    """The command line as Hydra overrides of conf/ablate.yaml; the rung overrides after `--`
    are appended to `overrides`. Bad input is one AblationError line (Hydra's own message)."""
    if any(a in ("-h", "--help") for a in argv):
        print(USAGE)
        raise SystemExit(0)
    argv = [
        "wandb=true" if a == "--wandb" else "dry_run=true" if a == "--dry-run" else a for a in argv
    ]
    if "--" in argv:
        cut = argv.index("--")
        argv, extra = argv[:cut], argv[cut + 1 :]
        if extra:
            quoted = ",".join(quote_override_value(o) for o in extra)
            argv = [*argv, f"+overrides_after_dashes=[{quoted}]"]
    register_configs()
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("ablate", overrides=argv)
    except Exception as e:  # noqa: BLE001 - Hydra's override/validation errors: one line
        raise AblationError(_hydra_error(e)) from None
    with open_dict(cfg):
        after = list(cfg.pop("overrides_after_dashes", []))
    opts = AblateConfig(**OmegaConf.to_container(cfg, resolve=True))  # type: ignore[arg-type]
    opts.overrides = [*opts.overrides, *after]
    for key, minimum in (("steps", 1), ("warmup", 0), ("repeats", 1), ("nproc", 1)):
        value = getattr(opts, key)
        if value is not None and value < minimum:
            raise AblationError(f"{key}={value}: must be an integer >= {minimum}")
    if opts.ladder is None and not opts.rungs:
        raise AblationError("name a ladder (ladder=nano_cpu) or the rungs (rungs=[a,b,...])")
    return opts


def _hydra_error(e: Exception) -> str:
    """Hydra's message for a bad option, as one line ("unknown option 'stepz' ...")."""
    text = " ".join(str(e).split())
    unknown = re.search(r"Key '([^']+)' (?:is )?not in", text) or re.search(
        r"Could not override '([^']+)'\. To append", text
    )
    if unknown:
        return (
            f"unknown option {unknown.group(1)!r} (see --help); Hydra overrides for the rungs "
            "go after `--`"
        )
    return text.split(" full_key:")[0]


# --------------------------------------------------------------------------------------------
# Ladders and rungs


@dataclass
class Ladder:
    name: str
    file: Path | None
    rungs: list[Any]
    steps: int = DEFAULT_STEPS
    warmup: int = DEFAULT_WARMUP
    nproc: int | None = None
    overrides: list[str] = field(default_factory=list)
    description: str = ""
    repeats: int = 1
    interleave: str = "runs"


def ladder_names() -> list[str]:
    return sorted(p.name.removesuffix(LADDER_SUFFIX) for p in LADDER_DIR.glob(f"*{LADDER_SUFFIX}"))


def load_ladder(spec: str) -> Ladder:
    """A ladder by name (experiments/ladder/<name>.yml) or by path to its file."""
    path = Path(spec).expanduser()
    if not path.is_file():
        path = LADDER_DIR / f"{spec}{LADDER_SUFFIX}"
    if not path.is_file():
        raise AblationError(
            f"no ladder {spec!r}: expected {LADDER_DIR / spec}{LADDER_SUFFIX} or a ladder file; "
            f"ladders: {', '.join(ladder_names()) or 'none'}"
        )
    try:
        data = OmegaConf.to_container(OmegaConf.load(path), resolve=False)
    except Exception as e:  # noqa: BLE001 - a YAML syntax error: one line
        raise AblationError(f"cannot read {path}: {_one_line(str(e))}") from None
    if not isinstance(data, dict) or not isinstance(data.get("rungs"), list) or not data["rungs"]:
        raise AblationError(f"{path}: needs a non-empty `rungs:` list")
    keys = {"name", "description", "shape", "rungs", "steps", "warmup", "repeats", "nproc"}
    keys |= {"overrides", "interleave"}
    unknown = set(data) - keys
    if unknown:
        raise AblationError(f"{path}: unknown key(s) {', '.join(sorted(unknown))}")
    interleave = str(data.get("interleave") or Interleave.runs.value)
    if interleave not in {i.value for i in Interleave}:
        raise AblationError(f"{path}: interleave: {interleave!r} is not one of runs, steps")
    # the shape (conf/ladder_shape/<shape>.yaml) every rung of this ladder is composed with
    shape = [f"ladder_shape={data['shape']}"] if data.get("shape") else []
    return Ladder(
        name=str(data.get("name") or path.name.removesuffix(LADDER_SUFFIX)),
        file=path,
        rungs=list(data["rungs"]),
        steps=int(data.get("steps") or DEFAULT_STEPS),
        warmup=int(data["warmup"]) if data.get("warmup") is not None else DEFAULT_WARMUP,
        nproc=int(data["nproc"]) if data.get("nproc") else None,
        repeats=int(data.get("repeats") or 1),
        interleave=interleave,
        overrides=[*shape, *(str(o) for o in data.get("overrides") or [])],
        description=str(data.get("description") or ""),
    )


@dataclass
class Rung:
    """One rung of this ablation: what runs, where, and how it ended."""

    index: int  # 1-based position in the ladder
    name: str  # display name = the record's `experiment` (the table's `name` column)
    repeat: int  # which pass over the ladder (repeats run interleaved: every rung, then again)
    short: str  # folder suffix and W&B job_type
    experiment: str  # +experiment=<this>
    overrides: list[str]  # every override after +experiment=, in order
    dir: str = ""
    launcher: str = "python"  # python | torchrun
    nproc: int = 1
    command: list[str] = field(default_factory=list)
    status: str = "pending"  # pending | completed | failed | n/a | interrupted | not run
    error: str | None = None
    returncode: int | None = None
    seconds: float | None = None
    config_hash: str | None = None
    started_at: str | None = None
    # interleave=steps: the group of rung processes this one took turns with, step by step
    # (gpt2x.training.turns); None: it ran alone
    lockstep: str | None = None


def _entry(ladder: Ladder | None, item: Any) -> tuple[str, str | None, list[str]]:
    """(experiment, explicit name or None, extra overrides) of one `rungs` entry."""
    if isinstance(item, dict):
        unknown = set(item) - {"experiment", "name", "overrides"}
        if unknown or not item.get("experiment"):
            raise AblationError(
                f"rung {item!r}: a mapping needs `experiment:` (and optionally `name:`, "
                "`overrides:`)"
            )
        exp, name = str(item["experiment"]), item.get("name")
        extra = [str(o) for o in item.get("overrides") or []]
    else:
        exp, name, extra = str(item), None, []
    exp = exp.removesuffix(".yaml").removeprefix("+experiment=").removeprefix("experiment/")
    if "/" not in exp or (ladder and (LADDER_DIR / f"{exp}.yaml").is_file()):
        exp = f"ladder/{exp}"  # the ladder rungs: experiments/ladder/<rung>.yaml
    if not (EXPERIMENTS_DIR / f"{exp}.yaml").is_file():
        raise AblationError(f"no experiment {exp!r} (expected {EXPERIMENTS_DIR / exp}.yaml)")
    return exp, (str(name) if name else None), extra


def _safe(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text).strip("-") or "rung"


# --------------------------------------------------------------------------------------------
# Composition (in-process, before anything runs: bad names/overrides stop here, in seconds)


def _hydra_free(overrides: list[str]) -> list[str]:
    return [o for o in overrides if not o.lstrip("+~").startswith("hydra.")]


@contextlib.contextmanager
def _world_size_env(n: int):
    """WORLD_SIZE as torchrun will set it, while a distributed rung's config is resolved."""
    old = os.environ.get("WORLD_SIZE")
    os.environ["WORLD_SIZE"] = str(n)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("WORLD_SIZE", None)
        else:
            os.environ["WORLD_SIZE"] = old


def compose_rung(rung: Rung, world_size: int | None = None) -> dict:
    """The rung's resolved config, as the trainer will see it (paths.run_dir = its folder)."""

    register_configs()
    overrides = [f"+experiment={rung.experiment}", *_hydra_free(rung.overrides)]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        OmegaConf.update(cfg, "paths.run_dir", rung.dir or "/tmp", merge=False)
        ctx = _world_size_env(world_size) if world_size else contextlib.nullcontext()
        with ctx:
            return to_container(cfg)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one line
        raise AblationError(
            f"rung {rung.name}: the config does not compose: {type(e).__name__}: "
            f"{_one_line(str(e))}"
        ) from None


def _is_distributed(config: dict) -> bool:
    return str((config.get("parallel") or {}).get("kind", "single")) in ("ddp", "fsdp")


def default_nproc() -> int:
    """The number of CUDA devices, else CPU_NPROC gloo processes."""
    try:
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001
        n = 0
    return n if n > 0 else CPU_NPROC


def _has_key(overrides: list[str], key: str) -> bool:
    return any(o.lstrip("+~").split("=", 1)[0] == key for o in overrides)


def _int_value(overrides: list[str], key: str) -> int | None:
    """The last `key=<int>` among the overrides, else None."""
    found = None
    for o in overrides:
        k, _, v = o.lstrip("+~").partition("=")
        if k == key:
            with contextlib.suppress(ValueError):
                found = int(v)
    return found


def plan(opts: AblateConfig) -> tuple[Ladder | None, list[Rung], dict]:
    """The ladder, its rungs (composed and checked) and the ablation's settings."""
    ladder = load_ladder(opts.ladder) if opts.ladder else None
    items = opts.rungs if opts.rungs else (ladder.rungs if ladder else [])
    common = [*(ladder.overrides if ladder else []), *opts.overrides]
    steps = opts.steps or (ladder.steps if ladder else DEFAULT_STEPS)
    warmup = (
        opts.warmup if opts.warmup is not None else (ladder.warmup if ladder else DEFAULT_WARMUP)
    )
    # a rung override of the trainer's own keys wins over steps/warmup (and is reported as such)
    given_warmup = _int_value(common, "trainer.warmup_steps_for_timing")
    given_max = _int_value(common, "trainer.max_steps")
    given_profiled = _int_value(common, "trainer.breakdown_steps")
    measure = []
    if given_warmup is None:
        measure.append(f"trainer.warmup_steps_for_timing={warmup}")
    else:
        warmup = given_warmup
    # the step-time breakdown profiles one extra step after the measured ones (never before a
    # timed step: gpt2x.train.breakdown_steps_at), left out of the timing
    profiled = given_profiled if given_profiled is not None else int(opts.profile)
    if given_profiled is None and profiled:
        measure.append(f"trainer.breakdown_steps={profiled}")
    if given_max is None:
        measure.append(f"trainer.max_steps={warmup + steps + profiled}")
    else:
        steps = max(0, given_max - warmup - profiled)
    repeats = opts.repeats or (ladder.repeats if ladder else 1)
    entries = [_entry(ladder, item) for item in items]
    rungs: list[Rung] = []
    # interleaved: a drift of the machine hits every rung alike
    for repeat in range(repeats):
        for i, (exp, name, extra) in enumerate(entries, start=1):
            short = _safe(name or exp.rsplit("/", 1)[-1])
            # (`experiment=` would be read as the config group: the runner renames the record)
            own = [f"logger.job_type={short}"] if name else []
            rungs.append(
                Rung(
                    index=i,
                    name=name or exp,
                    repeat=repeat,
                    short=short,
                    experiment=exp,
                    overrides=[*measure, f"repeat={repeat}", *own, *extra, *common],
                )
            )
    settings = {
        "ladder": ladder.name if ladder else None,
        "ladder_file": _shown(ladder.file) if ladder and ladder.file else None,
        "description": ladder.description if ladder else "",
        "steps": steps,
        "warmup": warmup,
        "repeats": repeats,
        "interleave": Interleave(
            opts.interleave or (ladder.interleave if ladder else "runs")
        ).value,
        "nproc": opts.nproc or (ladder.nproc if ladder else None),
        "overrides": common,
    }
    return ladder, rungs, settings


def _shown(path: Path) -> str:
    """A path relative to the repository where it lies inside it."""
    try:
        return path.resolve().relative_to(REPO_ROOT.resolve()).as_posix()
    except ValueError:
        return str(path)


def default_out(ladder: Ladder | None) -> Path:
    root = Path(os.environ.get("GPT2X_HOME") or ".")
    stamp = time.strftime("%Y-%m-%d_%H-%M-%S")
    base = root / "outputs" / "ablations" / f"{ladder.name if ladder else 'rungs'}_{stamp}"
    out, n = base, 1
    while out.exists():
        n += 1
        out = base.with_name(f"{base.name}_{n}")
    return out


def _override(key: str, value: str) -> str:
    """key=value, the value single-quoted for Hydra only where it needs it (spaces, commas...)."""
    plain = all(c.isalnum() or c in "/._-+@:" for c in value)
    return f"{key}={value if plain else quote_override_value(value)}"


def prepare(rungs: list[Rung], settings: dict, out: Path) -> list[list[Rung]]:
    """Folders, launchers and exact commands; every rung's config composed once here. Returns
    what runs, in order: a rung alone, or (interleave=steps) the rungs that take turns."""
    group = out.name
    nproc = settings["nproc"]
    chosen = nproc is not None  # nproc=N given, rather than one process per CUDA device
    composed: dict[tuple, dict] = {}  # the repeats of a rung compose to the same config
    for rung in rungs:
        folder = out / f"{rung.index:02d}_{rung.short}"
        if settings["repeats"] > 1:
            folder = folder / f"repeat_{rung.repeat}"
        rung.dir = str(folder.absolute())
        key = (rung.experiment, *(o for o in rung.overrides if not o.startswith("repeat=")))
        if key not in composed:
            composed[key] = compose_rung(rung)
        config = composed[key]
        extra = []
        if not _has_key(rung.overrides, "logger.group"):
            extra.append(_override("logger.group", group))
        if not (config.get("logger") or {}).get("job_type") and not _has_key(
            rung.overrides, "logger.job_type"
        ):
            extra.append(f"logger.job_type={rung.short}")
        rung.overrides = [*extra, *rung.overrides]
        argv = [
            "-m",
            TRAIN_MODULE,
            f"+experiment={rung.experiment}",
            *rung.overrides,
            _override("hydra.run.dir", rung.dir),
        ]
        if _is_distributed(config):
            if nproc is None:
                nproc = settings["nproc"] = default_nproc()
            rung.launcher, rung.nproc = "torchrun", nproc
            torchrun = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"]
            rung.command = [sys.executable, *torchrun, *argv]
            if nproc < 2:  # settled here, never launched
                why = "" if chosen else ": this machine has one CUDA device"
                kind = (config.get("parallel") or {}).get("kind")
                rung.status, rung.error = "n/a", ONE_PROCESS.format(kind=kind, why=why)
        else:
            rung.command = [sys.executable, *argv]
    if settings.get("interleave") != Interleave.steps.value:
        return [[rung] for rung in rungs]
    return lockstep_units(rungs, out)


def lockstep_units(rungs: list[Rung], out: Path) -> list[list[Rung]]:
    """interleave=steps: the consecutive single-process rungs of one repeat run together and
    take turns step by step (gpt2x.training.turns); a ddp/fsdp rung runs alone between them."""
    units: list[list[Rung]] = []
    for rung in rungs:
        last = units[-1] if units else None
        if (
            last is not None
            and rung.launcher == "python"
            and last[-1].launcher == "python"
            and last[-1].repeat == rung.repeat
        ):
            last.append(rung)
        else:
            units.append([rung])
    n_in_repeat: dict[int, int] = {}
    for unit in units:
        if len(unit) < 2:
            continue
        repeat = unit[0].repeat
        k = n_in_repeat[repeat] = n_in_repeat.get(repeat, 0) + 1
        group = f"{out.absolute()}#repeat_{repeat}" + ("" if k == 1 else f"_{k}")
        for rung in unit:
            rung.lockstep = group
    return units


# --------------------------------------------------------------------------------------------
# Running one rung


def _one_line(text: str) -> str:
    lines = [line.strip() for line in str(text).strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


def child_env(rung: Rung) -> dict:
    """The runner's environment without launcher variables; unbuffered output; on a machine
    without CUDA, torchrun's ranks share the cores (OMP_NUM_THREADS, unless already set)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    # an exported-but-empty WANDB_* variable breaks wandb (docs: never export an empty one)
    for key in [k for k, v in env.items() if k.startswith("WANDB_") and v == ""]:
        del env[key]
    if rung.launcher == "torchrun" and "OMP_NUM_THREADS" not in env and default_nproc_is_cpu():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, rung.nproc)))
    return env


def default_nproc_is_cpu() -> bool:
    try:
        import torch

        return not torch.cuda.is_available()
    except Exception:  # noqa: BLE001
        return True


def stop_child(proc: subprocess.Popen, first: int, grace_s: float) -> None:
    """Signal the rung's process group with `first`, then SIGTERM, then SIGKILL, waiting for it
    in between; another Ctrl-C while waiting moves on to the next signal at once."""
    stop_process_group(
        proc,
        ((first, grace_s), (signal.SIGTERM, 20.0), (signal.SIGKILL, 5.0)),
        interrupts=(Interrupted, KeyboardInterrupt),
    )


def _tee(proc: subprocess.Popen, log_file: Any, echo: bool, prefix: str) -> threading.Thread:
    """Copy the process's output to its log (and the console when echo) as it comes."""

    def copy() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            log_file.write(line)
            log_file.flush()
            if echo:
                sys.stdout.write(prefix + line)
                sys.stdout.flush()

    reader = threading.Thread(target=copy, daemon=True)
    reader.start()
    return reader


def _start(rung: Rung, log_file: Any, env: dict, pass_fds: tuple = ()) -> subprocess.Popen:
    log_file.write("$ " + shlex.join(rung.command) + "\n")
    log_file.flush()
    return subprocess.Popen(
        rung.command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=True,  # the terminal's Ctrl-C reaches the runner only
        pass_fds=pass_fds,
    )


def run_rung(rung: Rung, timeout: float | None, echo: bool) -> None:
    """Run the rung's command in its own session, tee its output to <dir>/rung.log, then make
    its record tell how it ended. Re-raises Interrupted after the rung has wound down."""
    run_dir = Path(rung.dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    log_path = run_dir / "rung.log"
    rung.started_at = now()
    t0 = time.monotonic()
    timed_out = False
    interrupt: Interrupted | None = None
    with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
        proc = _start(rung, log_file, child_env(rung))
        reader = _tee(proc, log_file, echo, f"[{rung.index:02d} {rung.short}] ")
        try:
            proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            stop_child(proc, signal.SIGTERM, 30.0)
        except (Interrupted, KeyboardInterrupt) as e:
            interrupt = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
            # the trainer records itself as interrupted on SIGINT (and checkpoints on SIGTERM)
            stop_child(proc, signal.SIGINT, INTERRUPT_GRACE_S)
        except BaseException:
            stop_child(proc, signal.SIGKILL, 5.0)
            raise
        finally:
            proc.wait()
            reader.join(timeout=10)
    rung.returncode = proc.returncode
    rung.seconds = round(time.monotonic() - t0, 2)
    text = log_path.read_text(encoding="utf-8", errors="replace")
    settle(rung, text, timed_out=timed_out, timeout=timeout, interrupted=interrupt is not None)
    if interrupt is not None:
        raise interrupt


@dataclass
class _Turns:
    """The runner's side of one rung's turns: the pipe ends it writes `go` to and reads `done`
    from (gpt2x.training.turns has the rung's side)."""

    rung: Rung
    proc: subprocess.Popen
    go: int
    done: int
    log_file: Any
    reader: threading.Thread
    active: bool = True

    def close_go(self) -> None:
        """No more turns: a rung waiting for one reads end-of-file and stops."""
        if self.go >= 0:
            with contextlib.suppress(OSError):
                os.close(self.go)
            self.go = -1


def run_lockstep(unit: list[Rung], timeout: float | None, echo: bool) -> None:
    """interleave=steps: start the unit's rungs together, each its own `gpt2x.train` process,
    and hand out turns: every round (a rung's setup, then each of its steps) in a freshly
    shuffled order (seeded by the group), one rung at a time. Each rung is then settled from
    its own record and log, as run_rung does. Re-raises Interrupted after they wound down."""
    members: list[_Turns] = []
    started, t0 = now(), time.monotonic()
    limit = timeout * len(unit) if timeout is not None else None
    timed_out, interrupt = False, None
    try:
        for rung in unit:
            Path(rung.dir).mkdir(parents=True, exist_ok=True)
            go_r, go_w = os.pipe()
            done_r, done_w = os.pipe()
            env = {
                **child_env(rung),
                TURN_FDS_ENV: f"{go_r},{done_w}",
                TURN_GROUP_ENV: rung.lockstep or "",
            }
            log_file = open(Path(rung.dir) / "rung.log", "w", encoding="utf-8", errors="replace")  # noqa: SIM115
            proc = _start(rung, log_file, env, pass_fds=(go_r, done_w))
            os.close(go_r)
            os.close(done_w)
            reader = _tee(proc, log_file, echo, f"[{rung.index:02d} {rung.short}] ")
            members.append(_Turns(rung, proc, go_w, done_r, log_file, reader))
        rounds = 0
        while any(m.active for m in members):
            order = [m for m in members if m.active]
            # a fresh order every round: no rung always follows the same other one
            random.Random(f"{unit[0].lockstep}:{rounds}").shuffle(order)
            rounds += 1
            for m in order:
                left = None if limit is None else limit - (time.monotonic() - t0)
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired(m.rung.command, limit or 0)
                m.active = _one_turn(m, left)
    except subprocess.TimeoutExpired:
        timed_out = True
        for m in members:  # a rung waiting for a turn ends at once (gpt2x.training.turns.TurnsClosed)
            m.close_go()
        for m in members:
            stop_child(m.proc, signal.SIGTERM, 30.0)
    except (Interrupted, KeyboardInterrupt) as e:
        interrupt = e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)
        for m in members:
            stop_child(m.proc, signal.SIGINT, INTERRUPT_GRACE_S)
    except BaseException:
        for m in members:
            stop_child(m.proc, signal.SIGKILL, 5.0)
        raise
    finally:
        for m in members:
            m.close_go()
            with contextlib.suppress(OSError):
                os.close(m.done)
            m.proc.wait()
            m.reader.join(timeout=10)
            m.log_file.close()
    seconds = round(time.monotonic() - t0, 2)
    for m in members:
        rung = m.rung
        rung.started_at, rung.seconds, rung.returncode = started, seconds, m.proc.returncode
        text = (Path(rung.dir) / "rung.log").read_text(encoding="utf-8", errors="replace")
        settle(rung, text, timed_out=timed_out, timeout=limit, interrupted=interrupt is not None)
    if interrupt is not None:
        raise interrupt


def _one_turn(m: _Turns, timeout: float | None) -> bool:
    """Give the rung one turn and wait until it says the turn is over; False once the rung has
    ended: its last turn (then its process is waited for: its teardown would slow the next
    rung's step) or its pipes closed (it failed or crashed)."""
    try:
        os.write(m.go, b"g")
    except BrokenPipeError:
        return False
    ready, _, _ = select.select([m.done], [], [], timeout)
    if not ready:
        raise subprocess.TimeoutExpired(m.rung.command, timeout or 0)
    said = os.read(m.done, 1)
    if said == TURN_STEP:
        return True
    if said == TURN_LAST:
        with contextlib.suppress(subprocess.TimeoutExpired):
            m.proc.wait(timeout=INTERRUPT_GRACE_S)
    return False


def failure_reason(text: str, returncode: int) -> str:
    """One line: the trainer's `error:` line, else the last exception line, else the signal."""
    reason = failure_from_log(text, returncode)
    if "SIGKILL" in reason and "memory" not in reason.lower():
        reason += " (out of memory? the kernel's OOM killer sends SIGKILL)"
    return reason


def settle(
    rung: Rung, text: str, *, timed_out: bool, timeout: float | None, interrupted: bool
) -> None:
    """Set the rung's status and reason, and make its record.json agree (writing a minimal
    record where the trainer wrote none: a config error, a crash before the record started)."""
    record = read_record(rung.dir)
    rec_status = (record or {}).get("status")
    rec_error = (record or {}).get("error")
    finished = rung.returncode == 0 and rec_status == "completed"
    if interrupted and not finished:  # (a rung that ended just as Ctrl-C came stays completed)
        status = "interrupted"
        reason = rec_error if rec_status == "interrupted" and rec_error else None
        reason = reason or "interrupted by the user (Ctrl-C): the ablation stopped here"
    elif timed_out:
        status, reason = "failed", f"timed out after {timeout:g} s (ablate timeout={timeout:g})"
    elif finished:
        status, reason = "completed", None
    elif rec_status in ("failed", "interrupted") and rec_error:
        status, reason = "failed", str(rec_error)
    elif rung.returncode == 0:
        status, reason = (
            "failed",
            "the trainer exited 0 but its record.json says "
            + str(rec_status or "nothing (no record.json)"),
        )
    else:
        status, reason = "failed", failure_reason(text, rung.returncode or 0)
    if status == "failed" and NOT_AVAILABLE.search(reason or ""):
        status = "n/a"  # e.g. precision=fp8 off an H100-class GPU: not a failure of the rung
    rung.status, rung.error = status, (_one_line(reason) if reason else None)
    renamed = record is not None and record.get("experiment") != rung.name
    if renamed or (status != "completed" and (rec_status != status or rec_error != rung.error)):
        record = write_record(rung, record)
    rung.config_hash = (record or {}).get("config_hash")


def write_record(rung: Rung, record: dict | None) -> dict:
    """The rung's record.json with its final status, reason and name (atomic replace). A
    missing record gets the fields a report needs: experiment, overrides, command, config."""
    if record is None:
        config = None
        with contextlib.suppress(AblationError):
            config = compose_rung(rung, rung.nproc if rung.launcher == "torchrun" else None)
        record = failed_record(
            Path(rung.dir),
            rung.error or "",
            config=config,
            overrides=[f"+experiment={rung.experiment}", *rung.overrides],
            command=shlex.join(rung.command),
            experiment=rung.name,
            world_size=rung.nproc,
            started_at=rung.started_at,
            written_by="gpt2x.ablate (the trainer wrote no record)",
        )
        if rung.name != rung.experiment:
            record["experiment_config"] = rung.experiment
    if record.get("experiment") != rung.name:
        # a rung named in the ladder file (`name:`) is that name in the table; the experiment
        # it was composed from stays in `experiment_config`
        record["experiment_config"] = record.get("experiment")
        record["experiment"] = rung.name
    if record.get("status") != rung.status or record.get("error") != rung.error:
        record.update(status=rung.status, error=rung.error, ended_at=now())
    write_json(Path(rung.dir) / "record.json", record)
    return record


# --------------------------------------------------------------------------------------------
# Outputs


def manifest_of(out: Path, rungs: list[Rung], settings: dict, status: str) -> dict:
    """What ablation.json holds: the settings, every rung (exact command, status, reason) and
    how the report is rebuilt; gpt2x.report reads the same dict back."""
    return {
        "schema": 1,
        "name": out.name,
        "status": status,
        **settings,
        "git_commit": settings.get("git_commit"),
        "rungs": [
            {**asdict(r), "command": shlex.join(r.command), "argv": r.command} for r in rungs
        ],
        "report": {
            "basename": BASENAME,
            "order": [r.name for r in rungs if r.status not in ("pending", "not run")],
            "rebuild": f"python -m gpt2x.report {shlex.quote(str(out))}",
        },
        "updated_at": now(),
    }


def write_manifest(out: Path, rungs: list[Rung], settings: dict, status: str) -> Path:
    """ablation.json: what ran, in which order, with which exact commands, and how it ended."""
    path = out / f"{BASENAME}.json"
    write_json(path, manifest_of(out, rungs, settings, status))
    return path


def write_outputs(out: Path, rungs: list[Rung], settings: dict) -> tuple[list, list, dict]:
    """ablation.md/.csv + plots (gpt2x.report) from the rungs' run records in `out`."""
    return report.write_ablation(out, manifest_of(out, rungs, settings, "done"))


def save_wandb_report(out: Path, runs: list, rows: list[dict]) -> None:
    """The W&B report of the ablation's group, or one line saying why not."""
    logged = [r for r in runs if isinstance(r.record.get("wandb"), dict)]
    if not logged:
        print(
            "gpt2x.ablate: W&B report not saved: no rung logged to W&B (logger=none or "
            "logger.mode=disabled); the local report is complete"
        )
        return
    offline_reason = getattr(report, "_wandb_offline_reason", lambda: None)()
    offline = [r for r in logged if r.record["wandb"].get("mode") != "online"]
    if offline_reason or offline:
        why = offline_reason or f"{len(offline)} rung(s) logged offline"
        print(
            f"gpt2x.ablate: W&B report not saved: {why}; the local report is complete. Upload "
            f"with `wandb sync {out}/*/wandb/offline-run-*`, then "
            f"`python -m gpt2x.report {out} --wandb`"
        )
        return
    try:
        wr = report.build_wandb_report(
            runs, group=out.name, title=f"gpt2x ablation: {out.name}", rows=rows
        )
        wr.save()
        print(f"W&B report: {wr.url}")
    except Exception as e:  # noqa: BLE001 - network/auth problems: one line, no traceback
        print(f"gpt2x.ablate: W&B report not saved: {type(e).__name__}: {_one_line(str(e))}")


# --------------------------------------------------------------------------------------------
# CLI


def _raise_interrupted(signum: int, _frame: Any) -> None:
    raise Interrupted(signum)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        opts = parse_args(argv)
        ladder, rungs, settings = plan(opts)
        out = Path(opts.out).expanduser() if opts.out else default_out(ladder)
        if (out / f"{BASENAME}.json").exists():
            raise AblationError(f"{out} already holds an ablation; choose another out=")
        units = prepare(rungs, settings, out)
    except AblationError as e:
        print(f"gpt2x.ablate: error: {e}", file=sys.stderr)
        return 2
    settings.update(
        name=out.name,
        command="python -m gpt2x.ablate " + shlex.join(argv),
        cwd=os.getcwd(),
        out=str(out.absolute()),
        git_commit=git_info()["commit"],
        started_at=now(),
        interrupted=None,
    )
    if opts.dry_run:
        for unit in units:
            if len(unit) > 1:
                names = ", ".join(r.short for r in unit)
                print(
                    f"# {unit[0].index:02d}-{unit[-1].index:02d} {names} (together, step by step)"
                )
            for rung in unit:
                na = f" n/a: {rung.error}" if rung.status == "n/a" else ""
                print(f"# {rung.index:02d} {rung.short} ({rung.launcher}, nproc={rung.nproc}){na}")
                print(shlex.join(rung.command))
        return 0

    out.mkdir(parents=True, exist_ok=True)
    n_rungs = len(rungs) // settings["repeats"]
    print(
        f"gpt2x.ablate: {n_rungs} rungs x {settings['repeats']} repeats "
        f"(interleave={settings['interleave']}) -> {out}"
    )
    write_manifest(out, rungs, settings, "running")
    old = {s: signal.signal(s, _raise_interrupted) for s in (signal.SIGINT, signal.SIGTERM)}
    stopped_by: int | None = None
    try:
        for unit in units:
            if stopped_by is not None:
                for rung in unit:
                    rung.status = "not run"
                continue
            first = unit[0]
            again = (
                f", repeat {first.repeat + 1}/{settings['repeats']}"
                if settings["repeats"] > 1
                else ""
            )
            if first.status == "n/a":  # settled before it ran (prepare)
                where, command = f"{first.index}/{n_rungs}{again}", []
                what = f"{first.name} (not run: n/a here)"
            elif len(unit) > 1:
                where = f"{first.index}-{unit[-1].index}/{n_rungs}{again}"
                what = ", ".join(r.name for r in unit) + " (together, taking turns step by step)"
                command = []
            else:
                where = f"{first.index}/{n_rungs}{again}"
                what = f"{first.name} ({first.launcher}" + (
                    f", {first.nproc} processes)" if first.launcher == "torchrun" else ")"
                )
                command = first.command
            print(
                f"==> [{where}] {what}" + (f": {shlex.join(command)}" if command else ""),
                flush=True,
            )
            try:
                if first.status == "n/a":  # settled before it ran (prepare): its record only
                    Path(first.dir).mkdir(parents=True, exist_ok=True)
                    write_record(first, None)
                elif len(unit) > 1:
                    run_lockstep(unit, opts.timeout, echo=not opts.quiet)
                else:
                    run_rung(first, opts.timeout, echo=not opts.quiet)
            except Interrupted as e:
                stopped_by = e.signum
            for rung in unit:
                print(
                    f"<== [{rung.index}/{n_rungs}{again}] {rung.name}: {rung.status}"
                    + (f" ({rung.error})" if rung.error else "")
                    + (f" in {rung.seconds:.1f} s" if rung.seconds is not None else ""),
                    flush=True,
                )
            write_manifest(out, rungs, settings, "running")
    except Interrupted as e:  # between rungs
        stopped_by = e.signum
        for rung in rungs:
            if rung.status == "pending":
                rung.status = "not run"
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)

    if stopped_by is not None:
        settings["interrupted"] = signal.Signals(stopped_by).name
    failed = [r for r in rungs if r.status == "failed"]
    status = "interrupted" if stopped_by is not None else ("failed" if failed else "completed")
    settings["ended_at"] = now()
    write_manifest(out, rungs, settings, status)
    runs: list = []
    rows: list[dict] = []
    if any(read_record(r.dir) is not None for r in rungs if r.dir and Path(r.dir).exists()):
        try:
            runs, rows, paths = write_outputs(out, rungs, settings)
        except (report.ReportError, OSError) as e:
            print(f"gpt2x.ablate: error: the report could not be written: {e}", file=sys.stderr)
            return 1
        print(report.markdown_table(rows, report.columns_of(rows)))
        print("wrote " + ", ".join(str(p) for p in [*paths.values(), out / f"{BASENAME}.json"]))
        print(f"rebuild: python -m gpt2x.report {shlex.quote(str(out))}")
    if opts.wandb and runs:
        save_wandb_report(out, runs, rows)
    if stopped_by is not None:
        print(f"gpt2x.ablate: interrupted ({signal.Signals(stopped_by).name}); partial table above")
        return 128 + stopped_by
    if failed:
        print(
            f"gpt2x.ablate: {len(failed)} of {len(rungs)} rungs failed: "
            + "; ".join(f"{r.short}: {r.error}" for r in failed)
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
