"""One job of a Hydra multirun, from the job's side: what `gpt2x.train.main` does differently
when it runs as one job of a sweep (docs/sweeps.md).

A failed job (bad setting, out of memory, NaN loss, a bug) is recorded in its own run folder
(record.json status "failed" + a one-line reason) and returns `FAILED` (+inf) to the sweeper
instead of raising, so the other jobs still run and Optuna sees a trial worse than any real one.
Jobs of the sequential launcher share one process, so each job starts from a clean slate:
dynamo's compile cache (else job 2 recompiles with a dynamic batch dimension and the later
jobs measure dynamic-shape kernels with no compile time) and CUDA's peak-memory counters.
"""

from __future__ import annotations

import gc
import logging
from typing import Any

import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import OmegaConf

from gpt2x.config import resolved_config
from gpt2x.record.failure import FAILED, error_line, is_oom, oom_reason, write_failed_record
from gpt2x.record.folder import read_record

log = logging.getLogger("gpt2x.sweep")


def in_multirun() -> bool:
    """True inside a Hydra multirun job (any launcher that runs `main` through run_job)."""
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def begin_job() -> None:
    """Per-job reset in a multirun process (see the module docstring)."""
    torch._dynamo.reset()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or is_oom(e)


def failure_reason(cfg: Any, e: BaseException) -> str:
    """The one-line reason recorded for a failed job; out-of-memory names the micro batch."""
    b = OmegaConf.select(cfg, "trainer.micro_batch_size", default=None)
    return oom_reason(error_line(e), b)


def record_failure(cfg: Any, e: BaseException) -> str:
    """In a multirun job: record why it failed, in its run folder. Returns the reason."""
    reason = failure_reason(cfg, e)
    run_dir = OmegaConf.select(cfg, "paths.run_dir", default=None)
    if not run_dir and HydraConfig.initialized():
        run_dir = HydraConfig.get().runtime.output_dir
    log.error("job failed, the sweep goes on: %s", reason)
    if run_dir:
        record = read_record(run_dir)
        keep = record is not None and record.get("status") == "failed" and not _is_oom(e)
        overrides = list(HydraConfig.get().overrides.task) if HydraConfig.initialized() else []
        try:
            if not keep:
                write_failed_record(run_dir, reason, resolved_config(cfg), overrides)
        except Exception:  # noqa: BLE001 - the sweep must go on even if the record cannot be written
            log.exception("could not write the failed record in %s", run_dir)
    return reason


def failed_job_result() -> float:
    """Called by `main` after a multirun job failed and its exception is gone: release what the
    job held (CUDA memory above all, for the next job in this process); returns FAILED."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return FAILED
