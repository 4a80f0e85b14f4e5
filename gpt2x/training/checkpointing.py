"""A run's checkpoints as the loop uses them: resume (trainer.resume), save between steps, stop
at a step boundary on a signal, and the bad-loss check with its rollback
(trainer.on_bad_loss). Saving and loading go through the run's Checkpointer
(gpt2x.checkpoint.state), which takes every stateful part at once; the TrainState it loads is
the one the loop reads, so nothing here copies step, tokens or losses back by hand.
"""

from __future__ import annotations

import logging
import math
import time
from pathlib import Path

from gpt2x import checkpoint
from gpt2x.checkpoint.store import set_aside_newer, step_dir_name
from gpt2x.training.optim import lr_at
from gpt2x.training.run import Run

log = logging.getLogger("gpt2x.train")


class TrainingError(RuntimeError):
    """The run cannot go on (NaN loss, ...); the message says at which step and what to change."""


# ============================================================================================
# resume


def resume_if_asked(run: Run) -> None:
    """trainer.resume: a checkpoint path, `auto` (the run folder's latest) or none. A run that
    starts at step 0 (nothing to resume from) keeps no rows of an earlier attempt."""
    if run.resume_from is not None:
        resume(run, run.resume_from)
        return
    if run.dist.is_main and run.cfg.trainer.resume == "auto":
        set_aside_newer_checkpoints(run, -1)  # none of them could be read: keep, but apart
    dropped = run.record.truncate(0)
    if dropped and run.dist.is_main:
        log.warning(
            "no checkpoint to resume from in %s: starting at step 0, without the %d rows an "
            "earlier attempt logged",
            run.cfg.paths.run_dir,
            dropped,
        )


def resume(run: Run, path: Path) -> None:
    """Continue exactly where a checkpoint left off."""
    checkpoint.check_architecture(checkpoint.read_config(path), run.cfg.model, path)
    go_back_to(run, path)
    state, max_steps = run.state, run.cfg.trainer.max_steps
    if run.dist.is_main:
        log.info(
            "resumed from %s: continuing at step %d (%d tokens seen)",
            path,
            state.step,
            state.tokens_seen,
        )
        set_aside_newer_checkpoints(run, state.step)
        if state.step >= max_steps:
            log.warning(
                "the checkpoint is at step %d of trainer.max_steps=%d: nothing left to train "
                "(raise trainer.max_steps to continue)",
                state.step,
                max_steps,
            )
    run.record.update(
        resumed_from={"checkpoint": str(path), "step": state.step, "tokens_seen": state.tokens_seen},
        rollbacks=list(state.rollbacks),  # the history's, up to the checkpoint
    )


def go_back_to(run: Run, path: Path) -> None:
    """Resume's and rollback's one way back: every stateful part loaded from the checkpoint,
    and the record's rows logged past it dropped."""
    run.checkpointer.load(path, full_verify=False)  # resolve_resume or the save verified it
    run.record.truncate(run.state.step)


def set_aside_newer_checkpoints(run: Run, step: int) -> None:
    """One history per run folder: checkpoints past the step this run continues from belong to
    an abandoned branch (or are broken); they move out of the way, said in one line."""
    aside = set_aside_newer(run.cfg.paths.run_dir, step)
    if aside is not None:
        log.warning(
            "continuing from step %d: the run folder's later checkpoints moved to %s", step, aside
        )


# ============================================================================================
# saving


def save_checkpoint(run: Run) -> None:
    """The steps done so far -> <run_dir>/checkpoints/step_NNNNNN/ (all ranks call, rank 0
    writes)."""
    t0 = time.perf_counter()
    cfg, step = run.cfg, run.state.step
    # the schedule is a function of the step; recorded for reference
    schedule = {
        "next_step": step,
        "max_steps": cfg.trainer.max_steps,
        "next_lr": lr_at(step, cfg.optim, cfg.trainer.max_steps),
    }
    path = run.checkpointer.save(info={"lr_schedule": schedule})
    if run.dist.is_main:
        log.info("checkpoint %s (%.2fs)", path, time.perf_counter() - t0)


def stop_at_boundary(run: Run) -> None:
    """A stop signal came: checkpoint the steps done (unless that checkpoint was just saved);
    `conclude` then ends the run as interrupted."""
    last = run.checkpointer.last
    if last is None or last.name != step_dir_name(run.state.step):
        save_checkpoint(run)
    run.stopped_by = run.stop.signum
    if run.dist.is_main:
        log.warning(
            "%s received: stopped after step %d/%d, checkpoint %s",
            run.stop.name,
            run.state.step,
            run.cfg.trainer.max_steps,
            run.checkpointer.last,
        )


# ============================================================================================
# a bad loss: stop, or roll back (trainer.on_bad_loss)


def check_loss(
    loss: float, history: list[float], step: int, spike_factor: float, fp32: bool = False
) -> None:
    """TrainingError for a NaN/inf loss, or one above spike_factor x the recent median."""
    if not math.isfinite(loss):
        fix = "lower optim.lr or check the data" + ("" if fp32 else ", or try precision=fp32")
        raise TrainingError(f"loss is {loss} at step {step}; {fix}")
    if spike_factor > 0 and len(history) >= 10:
        recent = sorted(history[-checkpoint.LOSS_HISTORY :])
        median = recent[len(recent) // 2]
        if loss > spike_factor * median:
            raise TrainingError(
                f"loss spiked to {loss:.4f} at step {step} (> {spike_factor} x recent median "
                f"{median:.4f}); lower optim.lr or raise trainer.spike_factor"
            )


def rollback(run: Run, step: int, error: TrainingError) -> None:
    """trainer.on_bad_loss=rollback: back to the last checkpoint, and the bad step's batches
    are skipped when the run gets there again (`skip_bad_batches`)."""
    t, state, last = run.cfg.trainer, run.state, run.checkpointer.last
    done = sum(state.skip_batches.values())
    if last is None or done >= t.max_rollbacks:
        raise TrainingError(
            f"{error} (stopped after {done} rollbacks; trainer.max_rollbacks={t.max_rollbacks})"
        ) from None
    with state.keeping_history():  # the checkpoint's skips and rollbacks are older than ours
        go_back_to(run, last)
    state.skip_batches[step] = state.skip_batches.get(step, 0) + 1
    state.rollbacks.append({"step": step, "to_step": state.step, "error": str(error)})
    if run.dist.is_main:
        log.warning(
            "%s -> rolled back to %s and skipping the batches of step %d (rollback %d of at "
            "most trainer.max_rollbacks=%d)",
            error,
            last.name,
            step,
            done + 1,
            t.max_rollbacks,
        )
    run.record.update(rollbacks=list(state.rollbacks))


def skip_bad_batches(run: Run, step: int) -> None:
    """After a rollback: the batches of a step whose loss went bad are read and dropped."""
    for _ in range(run.state.skip_batches.get(step, 0) * run.grad_accum):
        run.train_loader.next_batch()
