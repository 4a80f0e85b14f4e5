"""Planning an ablation (gpt2x.ablate), before anything runs: the ladder file read, its rungs
resolved to experiments, every rung's overrides and command, and which rungs take turns step by
step (interleave=steps). Pure but for reading the ladder and experiment files and composing each
rung's config in-process (Hydra's compose API): bad names and overrides stop here, in seconds.
The rungs' overrides are read as Hydra reads them (its override parser). Imports no torch.
"""

from __future__ import annotations

import contextlib
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra import compose, initialize_config_dir
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.override_parser.types import Override
from omegaconf import OmegaConf

from gpt2x import CONF_DIR, EXPERIMENTS_DIR, REPO_ROOT
from gpt2x.config import AblateConfig, Interleave, register_configs, to_container
from gpt2x.lab.launch import override, torchrun_command, train_command
from gpt2x.measure import DEFAULT_WARMUP
from gpt2x.record.failure import error_line, one_line

LADDER_DIR = EXPERIMENTS_DIR / "ladder"
LADDER_SUFFIX = ".yml"  # experiments/ladder/<ladder>.yml (not *.yaml: not a Hydra config)
DEFAULT_STEPS = 10
CPU_NPROC = 2  # gloo processes for a distributed rung on a machine without CUDA
# a distributed rung with one process measures only the wrapper's overhead, not data parallelism
ONE_PROCESS = (
    "parallel={kind} is not available on one process (nproc=1{why}): a world of one measures "
    "only {kind}'s overhead; run it with 2+ GPUs (nproc=N)"
)


class AblationError(ValueError):
    """Bad input (unknown ladder or rung, a bad option); the message is one line."""


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
        raise AblationError(f"cannot read {path}: {one_line(e)}") from None
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
# Overrides, read as Hydra reads them


def parse_overrides(overrides: list[str]) -> list[Override]:
    try:
        return OverridesParser.create().parse_overrides(list(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's OverrideParseException: one line
        raise AblationError(f"an override Hydra cannot read: {one_line(e)}") from None


def last_int(overrides: list[str], key: str) -> int | None:
    """The value of the last `key=<integer>` among the overrides, else None."""
    found = None
    for o in parse_overrides(overrides):
        value = None if o.is_delete() else o.value()
        if o.key_or_group == key and isinstance(value, int) and not isinstance(value, bool):
            found = value
    return found


def without_hydra(overrides: list[str]) -> list[str]:
    """The overrides of the trainer's config (not of Hydra's own: hydra.run.dir, ...)."""
    parsed = parse_overrides(overrides)
    return [o.input_line for o in parsed if not o.key_or_group.startswith("hydra.")]


# --------------------------------------------------------------------------------------------
# Composition (in-process, before anything runs)


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
    overrides = [f"+experiment={rung.experiment}", *without_hydra(rung.overrides)]
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=overrides)
        OmegaConf.update(cfg, "paths.run_dir", rung.dir or "/tmp", merge=False)
        ctx = _world_size_env(world_size) if world_size else contextlib.nullcontext()
        with ctx:
            return to_container(cfg)
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors: one line
        raise AblationError(
            f"rung {rung.name}: the config does not compose: {error_line(e)}"
        ) from None


def is_distributed(config: dict) -> bool:
    return str((config.get("parallel") or {}).get("kind", "single")) in ("ddp", "fsdp")


def cuda_devices() -> int:
    """The CUDA devices of this machine (0: none, or no usable torch). torch is imported here
    only, when a distributed rung asks: the lab never loads it otherwise."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except Exception:  # noqa: BLE001 - a broken torch install: no CUDA to use
        return 0


def default_nproc() -> int:
    """The number of CUDA devices, else CPU_NPROC gloo processes."""
    return cuda_devices() or CPU_NPROC


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
    given_warmup = last_int(common, "trainer.warmup_steps_for_timing")
    given_max = last_int(common, "trainer.max_steps")
    given_profiled = last_int(common, "trainer.breakdown_steps")
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
        parsed = parse_overrides(rung.overrides)
        key = (rung.experiment, *(o.input_line for o in parsed if o.key_or_group != "repeat"))
        if key not in composed:
            composed[key] = compose_rung(rung)
        config = composed[key]
        given = {o.key_or_group for o in parsed}
        extra = []
        if "logger.group" not in given:
            extra.append(override("logger.group", group))
        if not (config.get("logger") or {}).get("job_type") and "logger.job_type" not in given:
            extra.append(f"logger.job_type={rung.short}")
        rung.overrides = [*extra, *rung.overrides]
        overrides = [f"+experiment={rung.experiment}", *rung.overrides]
        if is_distributed(config):
            if nproc is None:
                nproc = settings["nproc"] = default_nproc()
            rung.launcher, rung.nproc = "torchrun", nproc
            rung.command = torchrun_command(overrides, rung.dir, nproc)
            if nproc < 2:  # settled here, never launched
                why = "" if chosen else ": this machine has one CUDA device"
                kind = (config.get("parallel") or {}).get("kind")
                rung.status, rung.error = "n/a", ONE_PROCESS.format(kind=kind, why=why)
        else:
            rung.command = train_command(overrides, rung.dir)
    if settings.get("interleave") != Interleave.steps.value:
        return [[rung] for rung in rungs]
    return turn_groups(rungs, out)


def turn_groups(rungs: list[Rung], out: Path) -> list[list[Rung]]:
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


