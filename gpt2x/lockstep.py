"""`python -m gpt2x.lockstep PLAN.json`: several single-process runs in one process, taking
turns step by step (run 1 step 0, run 2 step 0, ..., run 1 step 1, ...).

gpt2x.ablate uses it for `interleave=steps`: a machine's drift (clocks, other tenants, a busy
hypervisor) then hits every rung's step j alike, and step j of rung k is compared with step j of
rung k-1, a few seconds apart, instead of with a process that ran minutes earlier. The order of
the turns is shuffled every round (seeded by the plan), so no run always follows the same other
run: what one step leaves behind (caches, the allocator's state) is noise spread over all runs,
not a bias of one. Each run
keeps its own record, metrics and checkpoints in its own folder, exactly as `gpt2x.train`
writes them, and computes what it would compute alone: before each turn the run's own RNG
state and fp32 matmul setting (TF32) are put back. What is not its own: the process's peak
memory (RSS, CUDA allocated) counts every run in the process; compare memory with
`interleave=runs`.

PLAN.json: {"id": "...", "members": [{"name", "experiment", "overrides": [...], "run_dir"}]}.
A member whose setup or step fails is recorded as failed with one line; the others go on.
Exit status: 0 every member completed, 1 some failed, 130 Ctrl-C, 128 + N stopped by signal N.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import json
import logging
import random
import sys
from collections.abc import Generator, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig, OmegaConf

from gpt2x import CONF_DIR, checkpoint, distributed
from gpt2x.config import ConfigError, register_configs, to_container
from gpt2x.data import DataError
from gpt2x.precision import apply_matmul_precision
from gpt2x.preemption import StopSignals, exit_code
from gpt2x.run import Run, setup
from gpt2x.runfolder import failed_record, read_record, write_json
from gpt2x.train import (
    TrainingError,
    TrainingInterrupted,
    conclude,
    record_end,
    resume_if_asked,
    training_steps,
)

log = logging.getLogger("gpt2x.lockstep")
EXPECTED = (ConfigError, DataError, TrainingError, checkpoint.CheckpointError)


class LockstepError(ValueError):
    """A bad plan file; one line."""


@dataclass
class Member:
    """One run of the plan and where it stands."""

    name: str
    experiment: str
    overrides: list[str]
    run_dir: str
    run: Run | None = None
    steps: Generator[dict, None, dict] | None = None
    rng: dict = field(default_factory=dict)
    config: dict | None = None  # the composed config (for a record written on its behalf)
    status: str = "pending"  # pending | running | completed | failed | interrupted

    @property
    def launch_overrides(self) -> list[str]:
        """What the record says the run was launched with (as `gpt2x.train` would record)."""
        return [f"+experiment={self.experiment}", *self.overrides]


def read_plan(path: Path) -> tuple[str, list[Member]]:
    try:
        data = json.loads(path.read_text())
        members = [
            Member(
                str(m["name"]),
                str(m["experiment"]),
                [str(o) for o in m["overrides"]],
                str(m["run_dir"]),
            )
            for m in data["members"]
        ]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise LockstepError(
            f"cannot read the lockstep plan {path}: {type(e).__name__}: {e}"
        ) from None
    if not members:
        raise LockstepError(f"{path}: the plan has no members")
    return str(data.get("id") or path.stem), members


def compose_member(member: Member) -> DictConfig:
    """The member's config as `python -m gpt2x.train` composes it, run_dir set to its folder."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=member.launch_overrides)
    OmegaConf.update(cfg, "paths.run_dir", member.run_dir, merge=False)
    kind = getattr(cfg.parallel.kind, "value", cfg.parallel.kind)
    if kind != "single":
        raise ConfigError(
            f"{member.name}: parallel={kind} cannot share a process with other "
            "runs; run it on its own (gpt2x.ablate does: interleave=steps groups single runs only)"
        )
    return cfg


# ----------------------------------------------------------------------------- turns


def capture_rng() -> dict:
    state = {
        "torch": torch.get_rng_state(),
        "python": random.getstate(),
        "numpy": np.random.get_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state:
        torch.cuda.set_rng_state_all(state["cuda"])


@contextlib.contextmanager
def turn(member: Member) -> Iterator[None]:
    """The process-wide state of this member while it runs: its RNG, its matmul precision and
    its name on the log lines."""
    assert member.run is not None
    restore_rng(member.rng)
    apply_matmul_precision(member.run.cfg.precision, member.run.dist.device)
    CURRENT[0] = member.name
    try:
        yield
    finally:
        member.rng = capture_rng()
        CURRENT[0] = "lockstep"


def start(member: Member, stop: StopSignals) -> None:
    """Set the member up (its record starts), ready for its first step."""
    cfg = compose_member(member)
    member.config = to_container(cfg)
    CURRENT[0] = member.name
    member.run = setup(cfg, overrides=member.launch_overrides)
    member.run.stop = stop  # one set of signal handlers for the process: every member stops
    member.run.record.update(lockstep=LOCKSTEP[0])
    resume_if_asked(member.run)
    member.rng = capture_rng()  # the state right after setup, as a run on its own has it
    member.steps = training_steps(member.run)
    member.status = "running"


def take_turn(member: Member) -> None:
    """One step of the member; at its end, the record completed (or interrupted by a signal)."""
    assert member.run is not None and member.steps is not None
    with turn(member):
        try:
            next(member.steps)
        except StopIteration as done:
            member.steps = None
            conclude(member.run, done.value)  # raises TrainingInterrupted after a signal
            member.status = "completed"
            log.info("completed")


def fail(member: Member, e: BaseException) -> None:
    """Record the member's end by an exception (its own record, or a minimal one)."""
    member.status = (
        "interrupted" if isinstance(e, KeyboardInterrupt | TrainingInterrupted) else "failed"
    )
    if isinstance(e, TrainingInterrupted):
        pass  # conclude() already recorded it
    elif member.run is not None:
        with contextlib.suppress(Exception):
            record_end(member.run, e)
    elif read_record(member.run_dir) is None:
        error = (
            "interrupted by the user (Ctrl-C)" if isinstance(e, KeyboardInterrupt) else _one_line(e)
        )
        record = failed_record(
            Path(member.run_dir),
            error,
            config=member.config,
            overrides=member.launch_overrides,
            experiment=member.experiment,
            written_by="gpt2x.lockstep (the run wrote no record)",
        )
        record["status"] = member.status
        Path(member.run_dir).mkdir(parents=True, exist_ok=True)
        write_json(Path(member.run_dir) / "record.json", record)
    if member.status == "failed":
        level = logging.ERROR if not isinstance(e, EXPECTED) else logging.WARNING
        log.log(
            level, "%s failed: %s", member.name, _one_line(e), exc_info=not isinstance(e, EXPECTED)
        )
    member.run, member.steps = None, None


def run_plan(plan_id: str, members: list[Member]) -> int:
    """Set every member up, then one step of each in turn until all have ended."""
    register_configs()
    LOCKSTEP[0] = {"id": plan_id, "members": [m.name for m in members]}
    stop = StopSignals()
    interrupted = False
    try:
        with stop:
            for member in members:
                try:
                    start(member, stop)
                except Exception as e:  # noqa: BLE001 - this member fails alone
                    fail(member, e)
            rounds = 0
            while any(m.status == "running" for m in members):
                # a fresh order each round (seeded: the same plan takes the same turns): a
                # member never always follows the same other one, so whatever a step leaves
                # behind (caches, allocator state) spreads over all members as noise, not bias
                order = [m for m in members if m.status == "running"]
                random.Random(f"{plan_id}:{rounds}").shuffle(order)
                log.info("round %d: %s", rounds, ", ".join(m.name for m in order))
                rounds += 1
                for member in order:
                    try:
                        take_turn(member)
                    except Exception as e:  # noqa: BLE001 - a NaN loss, an OOM: this one ends
                        fail(member, e)
    except KeyboardInterrupt as e:
        interrupted = True
        for member in members:
            if member.status in ("pending", "running"):
                fail(member, e)
    finally:
        for member in members:
            member.run, member.steps = None, None
        gc.collect()
        distributed.teardown()
    if interrupted:
        return 130
    if stop.signum:
        return exit_code(stop.signum)
    return 0 if all(m.status == "completed" for m in members) else 1


# ----------------------------------------------------------------------------- logging and CLI

CURRENT = ["lockstep"]  # the member whose turn it is, on every log line
LOCKSTEP: list[dict] = [{}]  # what each member's record says of the process it shared


class _MemberName(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        record.member = CURRENT[0]
        return True


def configure_logging() -> None:
    handler = logging.StreamHandler(sys.stdout)
    handler.addFilter(_MemberName())
    handler.setFormatter(logging.Formatter("[%(asctime)s][%(member)s][%(levelname)s] %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(logging.INFO)


def _one_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m gpt2x.lockstep",
        description="Single-process runs in one process, one step each in turn (gpt2x.ablate "
        "interleave=steps).",
    )
    p.add_argument("plan", type=Path, help="the plan file gpt2x.ablate writes")
    args = p.parse_args(argv)
    configure_logging()
    try:
        plan_id, members = read_plan(args.plan)
    except LockstepError as e:
        print(f"gpt2x.lockstep: error: {e}", file=sys.stderr)
        return 2
    return run_plan(plan_id, members)


if __name__ == "__main__":
    sys.exit(main())
