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
process, and take turns step by step: gpt2x.training.turns): it is recorded as failed with a
one-line reason and the next rung runs. At the end (or after Ctrl-C, with the finished rungs)
the runner writes into the ablation folder, through gpt2x.report:
`ablation.md` (header + table + per-rung re-run commands), `ablation.csv`, `loss.png`,
`tokens_per_s.png`, and `ablation.json` (the manifest: ladder, rungs, exact commands, status).
`python -m gpt2x.report <folder>` rebuilds the same table from the run records.

Exit status: 0 every rung completed; 1 some rung failed (the table says which and why); 2 bad
input (unknown ladder or rung, an override Hydra rejects); 130 interrupted by Ctrl-C (143 by
SIGTERM) after writing the partial table. See docs/ladder.md.

This module is the command line (usage, options); gpt2x.lab.ladder plans the rungs and
gpt2x.lab.runner runs them.
"""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf, open_dict

from gpt2x import CONF_DIR
from gpt2x.config import AblateConfig, register_configs
from gpt2x.lab.ladder import AblationError, default_out, plan, prepare
from gpt2x.lab.launch import quote_override_value
from gpt2x.lab.runner import BASENAME, run_ablation
from gpt2x.record.folder import git_info, now

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
# CLI


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
        print_commands(units)
        return 0
    return run_ablation(
        units, settings, out, timeout=opts.timeout, echo=not opts.quiet, wandb=opts.wandb
    )


def print_commands(units: list) -> None:
    """dry_run: each rung's command (and which rungs would take turns), nothing run."""
    for unit in units:
        if len(unit) > 1:
            names = ", ".join(r.short for r in unit)
            print(f"# {unit[0].index:02d}-{unit[-1].index:02d} {names} (together, step by step)")
        for rung in unit:
            na = f" n/a: {rung.error}" if rung.status == "n/a" else ""
            print(f"# {rung.index:02d} {rung.short} ({rung.launcher}, nproc={rung.nproc}){na}")
            print(shlex.join(rung.command))


if __name__ == "__main__":
    sys.exit(main())
