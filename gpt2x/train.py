"""`python -m gpt2x.train [group=option ...]`: one GPT-2 training run, composed by Hydra.

Read it top to bottom: `main` runs `run_training`, which sets up (`setup`: every check first,
then data, model, optimizer, record, and the checkpointer that holds every stateful part),
resumes if asked, runs the loop (`train`: for each optimization step the micro-steps of
gradient accumulation, clip, step, log; evaluation, HellaSwag, samples and checkpoints between
steps, never inside the timed step) and finishes the record on every exit path. The loop reads
and advances `run.state` (step, tokens seen, recent losses); saving, resuming and rolling back
are gpt2x.training.checkpointing, evaluation and samples gpt2x.training.evaluation.
"""

from __future__ import annotations

import gc
import logging
import os
import sys
import time
from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig

from gpt2x import CONF_DIR
from gpt2x.checkpoint import CheckpointError
from gpt2x.config import ConfigError, Dtype, is_rank_zero, register_configs
from gpt2x.data import DataError
from gpt2x.record.failure import error_line
from gpt2x.record.folder import (
    RunFolderError,
    kill_for_test,
    note_rank_failure,
    rank_failures,
    release_reserve,
    release_run_folder,
)
from gpt2x.training import distributed, multirun
from gpt2x.training.checkpointing import (
    TrainingError,
    check_loss,
    resume_if_asked,
    rollback,
    save_checkpoint,
    skip_bad_batches,
    stop_at_boundary,
)
from gpt2x.training.evaluation import evaluate_and_log, write_sample
from gpt2x.training.metrics import (
    format_step,
    mfu,
    peak_memory,
    reset_peak_memory,
    summarize_steps,
    synchronize,
)
from gpt2x.training.optim import lr_at, set_lr
from gpt2x.training.precision import autocast
from gpt2x.training.preemption import StopWaiting, continue_command, exit_code
from gpt2x.training.profiling import ProfilingUnavailable, mean_breakdown, profile_steps
from gpt2x.training.progress import RunProgress, use_bar
from gpt2x.training.run import Run, setup
from gpt2x.training.turns import Turns

log = logging.getLogger("gpt2x.train")


class TrainingInterrupted(Exception):
    """Ctrl-C/SIGTERM/SIGUSR1 stopped the run cleanly at a step boundary after saving a
    checkpoint.

    The CLI exits with `exit_code` (128 + the signal number, see docs/checkpoints.md)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code


# ============================================================================================
# the entry point and the run's outer story


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> float | None:
    # multirun (-m): a failed job is recorded and returns multirun.FAILED (+inf) so the other
    # jobs run and the sweep ends with its summary (docs/sweeps.md); a single run exits as below
    in_sweep = multirun.in_multirun()
    if in_sweep:
        multirun.begin_job()
    try:
        return run_training(cfg)
    except TrainingInterrupted as e:
        # Ctrl-C or preempted (SIGTERM/SIGUSR1): a checkpoint is saved; exit 128 + signal number
        if is_rank_zero():
            print(f"interrupted: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        # Ctrl-C before training started, or a second Ctrl-C during it: nothing more is saved
        if is_rank_zero():
            print("interrupted (Ctrl-C): stopped at once, nothing saved", file=sys.stderr)
        sys.exit(130)
    except (ConfigError, DataError, TrainingError, CheckpointError, RunFolderError) as e:
        # expected problems: one line naming the fix, no traceback; on the console once (rank
        # 0 of a torchrun launch), in every rank's log file
        log_to_files(f"error: {e}")
        if is_rank_zero():
            print(f"error: {e}", file=sys.stderr)
        if not in_sweep:
            sys.exit(2)
        if not isinstance(e, RunFolderError):  # that folder is another run's: leave it be
            multirun.record_failure(cfg, e)
    except Exception as e:
        if not in_sweep:
            raise
        log.exception("job failed")
        multirun.record_failure(cfg, e)
    return multirun.failed_job_result()  # outside `except`: the job's tensors can be freed now


def log_to_files(message: str) -> None:
    """An error line for the run's log files only (Hydra's file handlers): the console gets it
    once, from main's own print."""
    record = log.makeRecord(log.name, logging.ERROR, __file__, 0, message, (), None)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)


def run_training(cfg: DictConfig) -> float | None:
    """Set up, train, sample; keep the record truthful on every exit path."""
    run = None
    completed = False
    turns = Turns.from_env()  # interleave=steps: runs take turns, step by step (gpt2x.training.turns)
    try:
        turns.next()  # the first turn is the setup
        run = setup(cfg, turns)
        resume_if_asked(run)
        with run.stop:  # SIGTERM/SIGUSR1 handlers (main thread only) while training
            summary = train(run)
        val_loss = conclude(run, summary)
        completed = True
        return val_loss
    except TrainingInterrupted:
        raise  # the record is already finished as "interrupted"
    except BaseException as e:
        if not is_rank_zero() and not isinstance(e, KeyboardInterrupt):
            note_rank_failure(cfg.paths.run_dir, int(os.environ["RANK"]), error_line(e))
        if run is not None:
            record_end(run, e)
        raise
    finally:
        turns.finish()
        if is_rank_zero():
            release_reserve(Path(cfg.paths.run_dir))
            release_run_folder(cfg.paths.run_dir)
        # the DDP/FSDP model goes before its process group does (a gloo group freed inside the
        # reducer's destructor, after destroy_process_group, could block the process's exit),
        # and the model's memory before a sweep's next job in this process. A full collection
        # costs ~0.2 s in a process that has imported much: only where it matters.
        run = None
        if distributed.has_process_group() or multirun.in_multirun() or torch.cuda.is_available():
            gc.collect()
        distributed.teardown(wait_for_peers=completed)


def conclude(run: Run, summary: dict) -> float | None:
    """The end of a loop that ran: stopped by a signal -> the record says interrupted and
    TrainingInterrupted is raised; else the final sample, the record completed, W&B finished.
    Returns the final validation loss."""
    if run.stopped_by:
        message = (
            f"stopped by {run.stop.name}; checkpoint {run.checkpointer.last} saved; continue "
            f"with: {continue_with(run)}"
        )
        run.record.finish(
            "interrupted",
            error=message,
            summary=summary,
            compile_seconds=summary["compile_seconds"],
        )
        if run.wandb:
            run.wandb.finish(exit_code=1)
        raise TrainingInterrupted(message, exit_code(run.stopped_by))
    if run.cfg.trainer.sample_tokens > 0:
        write_sample(run, run.cfg.trainer.max_steps, final=True)
    run.record.finish("completed", summary=summary, compile_seconds=summary["compile_seconds"])
    if run.wandb:
        run.wandb.finish(summary=summary)
    return summary["val_loss"]


def continue_with(run: Run) -> str:
    """The command that continues this run from its newest checkpoint (gpt2x.training.preemption)."""
    return continue_command(
        run.record.data.get("overrides") or [],
        run.cfg.paths.run_dir,
        run.cfg.paths.output_dir,
        run.dist.world_size,
        int(os.environ.get("LOCAL_WORLD_SIZE", run.dist.world_size)),
    )


def record_end(run: Run, e: BaseException) -> None:
    """The record (and W&B) of a run that an exception ended: Ctrl-C is "interrupted", anything
    else "failed" with the exception as one line."""
    if isinstance(e, KeyboardInterrupt):
        last = run.checkpointer.last
        saved = f"; {last} is the newest checkpoint" if last else ""
        run.record.finish("interrupted", error=f"aborted by the user (Ctrl-C){saved}")
        code = 130
    else:
        error = error_line(e)
        peers = rank_failures(run.cfg.paths.run_dir) if run.dist.is_distributed else {}
        if peers:  # the rank that failed first, not what rank 0 saw of it
            rank, reason = next(iter(peers.items()))
            error = f"rank {rank} failed: {reason} (rank 0: {error})"
        run.record.finish("failed", error=error)
        code = 1
    if run.wandb:
        run.wandb.finish(exit_code=code)


# ============================================================================================
# the loop


def train(run: Run) -> dict:
    """The loop: from the run's state (step 0, or where a checkpoint left off) to
    trainer.max_steps, unless a signal stops it at a step boundary. Returns the summary."""
    cfg, d, t, state = run.cfg, run.dist, run.cfg.trainer, run.state
    step_ms: list[float] = []
    val_loss = None
    warmup = t.warmup_steps_for_timing
    run.model.train()
    profiler = start_profiler(run) if t.profile_steps > 0 else None
    progress = RunProgress(use_bar(t.progress, d.is_main), t.max_steps, state.step)
    # the step-time breakdown: the run's last trainer.breakdown_steps steps, one profile each
    # (gpt2x.training.profiling), after every timed step and left out of the step-time statistics
    breakdown_at = breakdown_steps_at(state.step, t.max_steps, warmup, t.breakdown_steps)
    breakdowns: list = []
    steps_run = 0
    peak_mem: dict[str, float] = {}  # the run's peak of each per-step memory figure
    if t.on_bad_loss == "rollback" and run.checkpointer.last is None:
        save_checkpoint(run)  # something to roll back to
    carried_ms = 0.0  # a checkpoint's save time, counted in the next step's wall-clock time
    try:
        while state.step < t.max_steps:
            try:  # a stop signal while waiting for the turn stops the run here, at once
                with run.stop.waiting(run.turns.active):
                    run.turns.next()  # interleave=steps: wait for this step's turn (gpt2x.training.turns)
            except StopWaiting:
                stop_at_boundary(run)
                break
            step = state.step  # this step's index
            skip_bad_batches(run, step)
            distributed.fail_for_test(d, step)  # GPT2X_TEST_FAIL_RANK (tests only)
            reset_peak_memory(d.device)
            synchronize(d.device)
            t0 = time.perf_counter()
            profiled = step in breakdown_at
            row = profiled_step(run, step, breakdowns) if profiled else train_step(run, step)
            synchronize(d.device)
            ms = (time.perf_counter() - t0) * 1000.0
            state.tokens_seen += run.tokens_per_step
            tps = run.tokens_per_step / (ms / 1000.0)
            row = {
                "step": step,
                **row,
                "ms": ms,
                "tokens_per_s": tps,
                "mfu": mfu(tps, run.flops_per_token, run.peaks["spec"], d.world_size),
                "mfu_measured": mfu(tps, run.flops_per_token, run.peaks["measured"], d.world_size),
                **peak_memory(d.device),
                "tokens_seen": state.tokens_seen,
                **({"profiled": True} if profiled else {}),
            }
            steps_run += 1
            if not profiled:  # a profiled step's time holds the profiler's own cost
                step_ms.append(ms)
            for key in ("mem_gb", "mem_reserved_gb", "rss_gb"):
                if key in row:
                    peak_mem[key] = max(row[key], peak_mem.get(key, 0.0))
            if profiler is not None:
                profiler.step()
            try:
                check_loss(row["loss"], state.loss_history, step, t.spike_factor, is_fp32(cfg))
            except TrainingError as e:
                if t.on_bad_loss != "rollback":
                    log_row(run, row, progress, t0)
                    raise
                rollback(run, step, e)  # the state is the checkpoint's again
                continue
            state.record_loss(row["loss"])
            if len(step_ms) == warmup + 1 and d.is_main:
                progress.project(step_ms[warmup:], step + 1)
            if breakdowns and step == breakdown_at[-1]:
                record_breakdown(run, breakdowns)

            last = step == t.max_steps - 1
            hs_due = t.hellaswag_every > 0 and (last or every(t.hellaswag_every, step))
            if last or every(t.eval_every, step) or hs_due:
                val_loss = evaluate_and_log(run, step, hs_due)
            if every(t.sample_every, step) and not last and t.sample_tokens > 0:
                write_sample(run, step, final=False)

            state.step += 1  # steps done
            done = state.step
            saved = (t.checkpoint_every > 0 and done % t.checkpoint_every == 0) or (
                done == t.max_steps and t.save_final
            )
            # the row before the checkpoint: a checkpoint never runs ahead of the rows it covers
            log_row(run, row, progress, t0, carried_ms)
            carried_ms = 0.0
            kill_for_test("before_checkpoint", done)  # GPT2X_TEST_KILL (tests only)
            if saved:
                t_save = time.perf_counter()
                save_checkpoint(run)
                carried_ms = (time.perf_counter() - t_save) * 1000.0  # in the next row's wall_ms
            # Ctrl-C, SIGTERM/SIGUSR1 (preemption): checkpoint at this step boundary, then stop
            if run.stop.requested(d) and done < t.max_steps:
                stop_at_boundary(run)
                break
    finally:
        progress.close()
        if profiler is not None:
            profiler.stop()
    s = summarize_steps(
        step_ms,
        run.tokens_per_step,
        run.flops_per_token,
        run.peaks,
        d.world_size,
        warmup=warmup,
        compiled=cfg.compile,
    )
    return {
        "steps": steps_run,
        "final_loss": state.loss_history[-1] if state.loss_history else None,
        "val_loss": val_loss,
        "median_ms": s.median_ms,
        "p10_ms": s.p10_ms,
        "p90_ms": s.p90_ms,
        "tokens_per_s": s.tokens_per_s,
        "mfu": s.mfu,
        "mfu_measured": s.mfu_measured,
        **{f"peak_{k}": v for k, v in peak_mem.items()},
        "compile_seconds": s.compile_seconds,
    }


def train_step(run: Run, step: int) -> dict:
    """One optimization step: grad_accum micro-steps, clip, optimizer step. Returns its metrics."""
    cfg, d, model = run.cfg, run.dist, run.model
    lr = lr_at(step, cfg.optim, cfg.trainer.max_steps)
    set_lr(run.optimizer, lr)
    run.optimizer.zero_grad(set_to_none=True)
    loss_sum = torch.zeros((), device=d.device)
    for micro in range(run.grad_accum):
        x, y = run.train_loader.next_batch()
        # int32 ids from pinned memory (on CUDA): copied asynchronously, widened on the device
        x = x.to(d.device, non_blocking=True).long()
        y = y.to(d.device, non_blocking=True).long()
        with distributed.no_sync(model, sync=micro == run.grad_accum - 1):
            with autocast(cfg.precision, d.device):
                _, loss = model(x, y, return_logits=False)
            # the mean over micro-steps, so the gradient equals one big batch's
            loss = loss / run.grad_accum
            loss_sum += loss.detach()
            run.scaler.scale(loss).backward()
    run.scaler.unscale_(run.optimizer)
    clip = cfg.optim.grad_clip if cfg.optim.grad_clip > 0 else float("inf")
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
    run.scaler.step(run.optimizer)
    run.scaler.update()
    loss_mean = distributed.all_reduce_mean(loss_sum, d)
    # FSDP2: clip_grad_norm_ returns a DTensor; log a plain float
    return {"loss": loss_mean.item(), "lr": lr, "grad_norm": distributed.to_float(grad_norm)}


def breakdown_steps_at(start: int, max_steps: int, warmup: int, n: int) -> range:
    """The steps profiled for the step-time breakdown: the run's last `n`, after every timed
    step. A profiler can keep slowing its process after it stops (on CUDA, CUPTI stays attached:
    pytorch issue 144455), so no timed step may follow a profiled one in the same process. Never
    the first step (it compiles) nor a warm-up step, and at least one step stays timed."""
    if n <= 0:
        return range(0)
    return range(max(max_steps - n, start + warmup + 1), max_steps)


def profiled_step(run: Run, step: int, breakdowns: list) -> dict:
    """train_step under torch.profiler (every rank: the step holds collectives); a profiler
    that cannot run here, or a breakdown that fails, is reported once, never fatal (the step
    runs, profiled or not); the step's own failure stays the step's."""
    out: dict = {}

    def one_step() -> None:
        out["started"] = True
        out["row"] = train_step(run, step)

    try:
        breakdowns.append(profile_steps(one_step, 1, run.dist.device))
    except Exception as e:  # noqa: BLE001 - a breakdown that fails must not fail the run
        if "started" in out and "row" not in out:
            raise  # the step itself failed (out of memory, NaN, ...): not the profiler's
        if isinstance(e, ProfilingUnavailable):
            reason = str(e)
        else:
            reason = f"the step-time breakdown failed: {error_line(e)}"
        if run.dist.is_main and not run.record.data.get("breakdown_error"):
            log.warning("no step-time breakdown: %s", reason)
            run.record.update(breakdown_error=reason)
    return out["row"] if "row" in out else train_step(run, step)


def record_breakdown(run: Run, breakdowns: list) -> None:
    bd = mean_breakdown(breakdowns)
    if run.dist.is_main:
        run.record.update(breakdown=bd.to_dict())
        log.info("step-time breakdown: %s", bd.summary())


def log_row(
    run: Run, row: dict, progress: RunProgress, t0: float, carried_ms: float = 0.0
) -> None:
    """The step's row, to the record, W&B and the console. wall_ms runs from the step's start to
    now (evaluation, sampling and logging included) plus carried_ms (the checkpoint saved after
    the previous row): tokens/s as a user's clock sees it."""
    t = run.cfg.trainer
    row["wall_ms"] = (time.perf_counter() - t0) * 1000.0 + carried_ms
    row["wall_tokens_per_s"] = run.tokens_per_step / (row["wall_ms"] / 1000.0)
    run.record.log_step(row)
    if run.wandb:
        run.wandb.log_step(row)
    if run.dist.is_main:
        progress.update(row)
        if row["step"] % t.log_every == 0 or row["step"] == t.max_steps - 1:
            log.info(format_step(row, t.max_steps))


def every(n: int, step: int) -> bool:
    """An every-N-steps event (evaluation, HellaSwag, samples): steps N, 2N, ...; 0 is never."""
    return n > 0 and step > 0 and step % n == 0


def is_fp32(cfg: DictConfig) -> bool:
    return cfg.precision.dtype == Dtype.fp32 and not cfg.precision.float8


def start_profiler(run: Run) -> torch.profiler.profile:
    """torch.profiler over trainer.profile_steps steps after 2 warm-up steps (debug=profiler)."""
    out = Path(run.cfg.paths.run_dir) / "profile"
    activities = [torch.profiler.ProfilerActivity.CPU]
    if run.dist.device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)

    def save(prof: torch.profiler.profile) -> None:
        if run.dist.is_main:
            out.mkdir(parents=True, exist_ok=True)
            prof.export_chrome_trace(str(out / f"trace_step{prof.step_num}.json"))
            log.info("profiler trace written to %s", out)

    prof = torch.profiler.profile(
        activities=activities,
        schedule=torch.profiler.schedule(
            wait=0, warmup=2, active=run.cfg.trainer.profile_steps, repeat=1
        ),
        on_trace_ready=save,
    )
    prof.start()
    return prof


register_configs()

if __name__ == "__main__":
    main()
