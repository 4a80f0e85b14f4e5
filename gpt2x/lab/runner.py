"""Running an ablation (gpt2x.ablate) that gpt2x.lab.ladder planned: each rung its own trainer
process (gpt2x.lab.supervisor), alone or, with interleave=steps, taking turns step by step with
the other single-process rungs of its repeat (gpt2x.training.turns). A rung that fails, times
out or runs out of memory fails alone: it is settled from its record and log, its record made
to say how it ended (gpt2x.record.failure), and the next rung runs. ablation.json (the manifest)
says at every moment what ran and how; at the end (or after Ctrl-C, with the finished rungs) the
report is written through gpt2x.lab.report.
"""

from __future__ import annotations

import contextlib
import os
import re
import shlex
import signal
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

from gpt2x.lab import report, wandb_report
from gpt2x.lab.ladder import AblationError, Rung, compose_rung, cuda_devices
from gpt2x.lab.runs import ReportError, Run
from gpt2x.lab.supervisor import (
    INTERRUPT_GRACE_S,
    Child,
    Ended,
    Interrupted,
    exit_reason,
    signals_raise,
    start,
    timeout_reason,
    watch,
)
from gpt2x.lab.tables import markdown_table
from gpt2x.record.failure import one_line, write_failed_record
from gpt2x.record.folder import RECORD, now, read_record, write_json
from gpt2x.training.turns import Seat, take_turns

BASENAME = report.ABLATION  # ablation.md / ablation.csv / ablation.json
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


# --------------------------------------------------------------------------------------------
# One rung, or the rungs taking turns


def child_env(rung: Rung) -> dict:
    """The runner's environment without launcher variables; unbuffered output; on a machine
    without CUDA, torchrun's ranks share the cores (OMP_NUM_THREADS, unless already set)."""
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_ENV}
    env["PYTHONUNBUFFERED"] = "1"
    # an exported-but-empty WANDB_* variable breaks wandb (docs: never export an empty one)
    for key in [k for k, v in env.items() if k.startswith("WANDB_") and v == ""]:
        del env[key]
    if rung.launcher == "torchrun" and "OMP_NUM_THREADS" not in env and not cuda_devices():
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // max(1, rung.nproc)))
    return env


def _start(rung: Rung, echo: bool, env: dict, pass_fds: tuple[int, ...] = ()) -> Child:
    Path(rung.dir).mkdir(parents=True, exist_ok=True)
    prefix = f"[{rung.index:02d} {rung.short}] " if echo else None
    return start(rung.command, Path(rung.dir) / "rung.log", echo=prefix, env=env, pass_fds=pass_fds)


def run_rung(rung: Rung, timeout: float | None, echo: bool) -> None:
    """Run the rung's command, its output in <dir>/rung.log, then make its record tell how it
    ended. Re-raises Interrupted after the rung has wound down."""
    rung.started_at = now()
    child = _start(rung, echo, child_env(rung))
    ended = watch([child], lambda: child.wait(timeout))
    rung.seconds, rung.returncode = ended.seconds, child.returncode
    _settle(rung, ended, timeout)
    if ended.interrupted is not None:
        raise ended.interrupted


def run_taking_turns(unit: list[Rung], timeout: float | None, echo: bool) -> None:
    """interleave=steps: start the unit's rungs together, each its own `gpt2x.train` process,
    and hand out turns (gpt2x.training.turns.take_turns: every round in a freshly shuffled
    order, one rung at a time) until every rung has ended; then settle each from its own record
    and log, as run_rung does. Re-raises Interrupted after they wound down."""
    started = now()
    limit = timeout * len(unit) if timeout is not None else None
    seats: list[Seat] = []
    children: list[Child] = []

    def last_turn(i: int) -> None:  # its teardown would slow the next rung's step
        with contextlib.suppress(subprocess.TimeoutExpired):
            children[i].wait(INTERRUPT_GRACE_S)

    def wait() -> None:
        for rung in unit:
            seats.append(Seat(rung.lockstep or ""))
            env = {**child_env(rung), **seats[-1].env}
            children.append(_start(rung, echo, env, pass_fds=seats[-1].run_fds))
            seats[-1].started()
        take_turns(seats, seed=unit[0].lockstep, timeout=limit, on_last=last_turn)

    try:
        ended = watch(children, wait)
    finally:
        for seat in seats:
            seat.close()
    for rung, child in zip(unit, children):
        rung.started_at, rung.seconds, rung.returncode = started, ended.seconds, child.returncode
        _settle(rung, ended, limit)
    if ended.interrupted is not None:
        raise ended.interrupted


def _settle(rung: Rung, ended: Ended, timeout: float | None) -> None:
    text = (Path(rung.dir) / "rung.log").read_text(encoding="utf-8", errors="replace")
    interrupted = ended.interrupted is not None
    settle(rung, text, timed_out=ended.timed_out, timeout=timeout, interrupted=interrupted)


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
        seconds = timeout or 0
        status, reason = "failed", timeout_reason(seconds, f"ablate timeout={seconds:g}")
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
        status, reason = "failed", exit_reason(text, rung.returncode or 0)
    if status == "failed" and NOT_AVAILABLE.search(reason or ""):
        status = "n/a"  # e.g. precision=fp8 off an H100-class GPU: not a failure of the rung
    rung.status, rung.error = status, (one_line(reason) if reason else None)
    renamed = record is not None and record.get("experiment") != rung.name
    if renamed or (status != "completed" and (rec_status != status or rec_error != rung.error)):
        record = write_record(rung, record)
    rung.config_hash = (record or {}).get("config_hash")


def write_record(rung: Rung, record: dict | None) -> dict:
    """The rung's record.json with its final status, reason and name. Not completed: written
    through gpt2x.record.failure (a missing record gets the fields a report needs: experiment,
    overrides, command, config). A rung named in the ladder file (`name:`) is that name in the
    table; the experiment it was composed from stays in `experiment_config`."""
    if rung.status != "completed" and (
        record is None or record.get("status") != rung.status or record.get("error") != rung.error
    ):
        config = None
        if record is None:
            with contextlib.suppress(AblationError):
                config = compose_rung(rung, rung.nproc if rung.launcher == "torchrun" else None)
        named = {"experiment_config": rung.experiment} if rung.name != rung.experiment else {}
        record = write_failed_record(
            rung.dir,
            rung.error or "",
            config,
            [f"+experiment={rung.experiment}", *rung.overrides],
            status=rung.status,
            command=shlex.join(rung.command),
            experiment=rung.name,
            world_size=rung.nproc,
            started_at=rung.started_at,
            written_by="gpt2x.ablate (the trainer wrote no record)",
            **named,
        )
    if record.get("experiment") != rung.name:
        record["experiment_config"] = record.get("experiment")
        record["experiment"] = rung.name
        write_json(Path(rung.dir) / RECORD, record)
    return record


# --------------------------------------------------------------------------------------------
# The ablation: every unit in order, then the report


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


def run_units(
    units: list[list[Rung]], settings: dict, out: Path, timeout: float | None, echo: bool
) -> int | None:
    """Every unit in order (a rung alone, or rungs taking turns), a line before and after each;
    ablation.json rewritten after each. Returns the signal that stopped the ablation, or None;
    the rungs it stopped before are "not run"."""
    rungs = [rung for unit in units for rung in unit]
    n_rungs = len(rungs) // settings["repeats"]
    stopped_by: int | None = None
    with signals_raise():
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
                print(_announce(unit, n_rungs, again), flush=True)
                try:
                    if first.status == "n/a":  # settled before it ran (prepare): its record only
                        Path(first.dir).mkdir(parents=True, exist_ok=True)
                        write_record(first, None)
                    elif len(unit) > 1:
                        run_taking_turns(unit, timeout, echo)
                    else:
                        run_rung(first, timeout, echo)
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
    return stopped_by


def _announce(unit: list[Rung], n_rungs: int, again: str) -> str:
    """The line before a unit runs: where it is in the ladder, what runs, the command."""
    first = unit[0]
    if first.status == "n/a":  # settled before it ran (prepare)
        return f"==> [{first.index}/{n_rungs}{again}] {first.name} (not run: n/a here)"
    if len(unit) > 1:
        names = ", ".join(r.name for r in unit)
        where = f"{first.index}-{unit[-1].index}/{n_rungs}{again}"
        return f"==> [{where}] {names} (together, taking turns step by step)"
    launcher = f", {first.nproc} processes)" if first.launcher == "torchrun" else ")"
    what = f"{first.name} ({first.launcher}{launcher}"
    return f"==> [{first.index}/{n_rungs}{again}] {what}: {shlex.join(first.command)}"


def run_ablation(
    units: list[list[Rung]],
    settings: dict,
    out: Path,
    *,
    timeout: float | None = None,
    echo: bool = True,
    wandb: bool = False,
) -> int:
    """Run the planned ablation into `out` and write its report; the exit status: 0 every rung
    completed (or is n/a), 1 some rung failed, 128 + the signal when interrupted."""
    rungs = [rung for unit in units for rung in unit]
    out.mkdir(parents=True, exist_ok=True)
    print(
        f"gpt2x.ablate: {len(rungs) // settings['repeats']} rungs x {settings['repeats']} "
        f"repeats (interleave={settings['interleave']}) -> {out}"
    )
    write_manifest(out, rungs, settings, "running")
    stopped_by = run_units(units, settings, out, timeout, echo)
    if stopped_by is not None:
        settings["interrupted"] = signal.Signals(stopped_by).name
    failed = [r for r in rungs if r.status == "failed"]
    status = "interrupted" if stopped_by is not None else ("failed" if failed else "completed")
    settings["ended_at"] = now()
    write_manifest(out, rungs, settings, status)
    runs: list[Run] = []
    rows: list[dict] = []
    if any(read_record(r.dir) is not None for r in rungs if r.dir and Path(r.dir).exists()):
        try:
            runs, rows, paths = report.write_ablation(out, manifest_of(out, rungs, settings, "done"))
        except (ReportError, OSError) as e:
            print(f"gpt2x.ablate: error: the report could not be written: {e}", file=sys.stderr)
            return 1
        print(markdown_table(rows))
        print("wrote " + ", ".join(str(p) for p in [*paths.values(), out / f"{BASENAME}.json"]))
        print(f"rebuild: python -m gpt2x.report {shlex.quote(str(out))}")
    if wandb and runs:
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


def save_wandb_report(out: Path, runs: list[Run], rows: list[dict]) -> None:
    """The W&B report of the ablation's group, or one line saying why not."""
    logged = [r for r in runs if isinstance(r.record.get("wandb"), dict)]
    if not logged:
        print(
            "gpt2x.ablate: W&B report not saved: no rung logged to W&B (logger=none or "
            "logger.mode=disabled); the local report is complete"
        )
        return
    offline_reason = wandb_report.offline_reason()
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
        url = wandb_report.save(runs, group=out.name, title=f"gpt2x ablation: {out.name}", rows=rows)
        print(f"W&B report: {url}")
    except ReportError as e:
        print(f"gpt2x.ablate: {e}")
