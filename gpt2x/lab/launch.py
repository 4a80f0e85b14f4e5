"""`hydra/launcher=torchrun`: each job of a sweep as its own `torchrun` launch.

    python -m gpt2x.train -m +sweep=batch_size hydra/launcher=torchrun \
        hydra.launcher.nproc_per_node=2 parallel=ddp

Hydra's own torchrun launcher was never released, and the bundled launchers run a job in one
Python process (sequential, joblib) or one task per job (submitit), which cannot host a
multi-process DDP job. This launcher runs, for every job and one after the other,

    python -m torch.distributed.run --standalone --nproc_per_node=N -m gpt2x.train \
        <the job's overrides> hydra.run.dir=<the job's folder in the sweep>

waits for it (gpt2x.lab.supervisor), tees its output to `<job folder>/torchrun.log`, and reads
the job's result from the run record the trainer wrote (record.json: status, summary.val_loss).
A job that fails or dies (non-zero exit, a signal, a timeout) gets a failed record with the
reason (gpt2x.record.failure) and returns FAILED, so the sweep goes on; with nproc_per_node=1 this is also a
sequential launcher that isolates each job in a fresh process (a crash or a CPU out-of-memory
kill ends that job only).

Hydra only instantiates launchers from the `hydra_plugins` namespace: the class is exposed as
`hydra_plugins.gpt2x_launchers.torchrun_launcher.TorchrunLauncher` (conf/hydra/launcher/
torchrun.yaml). This module imports no torch (Hydra imports every plugin module at start-up).
"""

from __future__ import annotations

import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from hydra.core.hydra_config import HydraConfig
from hydra.core.utils import (
    JobReturn,
    JobStatus,
    configure_log,
    filter_overrides,
    setup_globals,
)
from hydra.plugins.launcher import Launcher
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from gpt2x import TRAIN_MODULE
from gpt2x.config import resolved_config, run_id
from gpt2x.lab.supervisor import exit_reason, start, timeout_reason, watch
from gpt2x.record.failure import FAILED, oom_reason, write_failed_record
from gpt2x.record.folder import read_record

log = logging.getLogger("gpt2x.lab.launch")


def quote_override_value(value: str) -> str:
    """A value for a Hydra command-line override, single-quoted so `=`, `,` and spaces in a
    folder name are taken literally (Hydra's grammar: `\\'` and `\\\\` inside quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def override(key: str, value: str) -> str:
    """key=value, the value single-quoted for Hydra only where it needs it (spaces, commas...)."""
    plain = all(c.isalnum() or c in "/._-+@:" for c in value)
    return f"{key}={value if plain else quote_override_value(value)}"


def train_command(
    overrides: Sequence[str], job_dir: str | Path, module: str = TRAIN_MODULE
) -> list[str]:
    """The argv that runs one job in this Python: the module, its overrides, its folder."""
    return [sys.executable, "-m", module, *overrides, override("hydra.run.dir", str(job_dir))]


def torchrun_command(
    overrides: Sequence[str],
    job_dir: str | Path,
    nproc_per_node: int = 1,
    module: str = TRAIN_MODULE,
    torchrun: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv that runs one job under torchrun: torchrun, the module, the job's overrides,
    its folder."""
    launcher = list(torchrun) if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    run = ["--standalone", f"--nproc_per_node={int(nproc_per_node)}", *extra_args]
    return [*launcher, *run, *train_command(overrides, job_dir, module)[1:]]


class TorchrunLauncher(Launcher):
    """Runs each job as `torchrun --standalone --nproc_per_node=N -m <module> ...`, in turn.

    nproc_per_node: processes per job (ranks; use parallel=ddp for more than one).
    module: the training module. torchrun: the launcher argv (default: this Python's
    `-m torch.distributed.run`). extra_args: more torchrun arguments. env: extra environment
    variables for the job. timeout_s: a job running longer is killed and recorded as failed.
    """

    def __init__(
        self,
        nproc_per_node: int = 1,
        module: str = "gpt2x.train",
        torchrun: Sequence[str] | None = None,
        extra_args: Sequence[str] = (),
        env: dict | None = None,
        timeout_s: float | None = None,
    ) -> None:
        super().__init__()
        self.nproc_per_node = int(nproc_per_node)
        self.module = module
        self.torchrun = list(torchrun) if torchrun else None
        self.extra_args = [str(a) for a in extra_args or ()]
        self.env = {str(k): str(v) for k, v in (env or {}).items()}
        self.timeout_s = timeout_s
        self.config: DictConfig | None = None
        self.hydra_context: HydraContext | None = None
        self.task_function: TaskFunction | None = None

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.hydra_context = hydra_context
        self.task_function = task_function

    def launch(
        self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int
    ) -> Sequence[JobReturn]:
        setup_globals()
        assert self.config is not None and self.hydra_context is not None
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(
            "Launching %d jobs with torchrun (nproc_per_node=%d), one after the other",
            len(job_overrides),
            self.nproc_per_node,
        )
        runs = []
        for i, overrides in enumerate(job_overrides):
            idx = initial_job_idx + i
            log.info("\t#%d : %s", idx, " ".join(filter_overrides(overrides)))
            sweep_config = self.hydra_context.config_loader.load_sweep_config(
                self.config, list(overrides)
            )
            with open_dict(sweep_config):
                sweep_config.hydra.job.id = idx
                sweep_config.hydra.job.num = idx
            runs.append(self._run_job(sweep_config, list(overrides)))
            configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        return runs

    # ----------------------------------------------------------------------------------------

    def _run_job(self, sweep_config: DictConfig, overrides: list[str]) -> JobReturn:
        assert self.hydra_context is not None
        saved = HydraConfig.instance().cfg
        HydraConfig.instance().set_config(sweep_config)
        try:
            job_dir = Path(str(sweep_config.hydra.sweep.dir)) / str(sweep_config.hydra.sweep.subdir)
            job_dir = job_dir.absolute()
            with read_write(sweep_config.hydra.runtime), open_dict(sweep_config.hydra.runtime):
                sweep_config.hydra.runtime.output_dir = str(job_dir)
            HydraConfig.instance().set_config(sweep_config)
            job_dir.mkdir(parents=True, exist_ok=True)
            task_cfg = OmegaConf.masked_copy(
                sweep_config, [k for k in sweep_config if k != "hydra"]
            )
            ret = JobReturn(
                overrides=overrides,
                cfg=task_cfg,
                hydra_cfg=sweep_config,
                working_dir=os.getcwd(),
                task_name=str(sweep_config.hydra.job.name),
            )
            self.hydra_context.callbacks.on_job_start(
                config=sweep_config, task_function=self.task_function
            )
            ret.return_value = self._run_torchrun(task_cfg, overrides, job_dir)
            ret.status = JobStatus.COMPLETED
            self.hydra_context.callbacks.on_job_end(config=sweep_config, job_return=ret)
            return ret
        finally:
            HydraConfig.instance().cfg = saved

    def _run_torchrun(self, task_cfg: DictConfig, overrides: list[str], job_dir: Path) -> float:
        cmd = torchrun_command(
            overrides, job_dir, self.nproc_per_node, self.module, self.torchrun, self.extra_args
        )
        env = {**os.environ, **self.env}
        env.setdefault("GPT2X_RUN_ID", run_id())  # one sweep id for every job (W&B group, folders)
        children = [start(cmd, job_dir / "torchrun.log", echo="", env=env)]
        # Ctrl-C: torchrun forwards SIGTERM to the ranks, then the sweep stops
        ended = watch(
            children, lambda: children[0].wait(self.timeout_s), on_interrupt=signal.SIGTERM
        )
        if ended.interrupted is not None:
            raise KeyboardInterrupt
        rc = children[0].returncode
        record = read_record(job_dir)
        log.info("job %s: exit %s after %.1f s", job_dir.name, rc, ended.seconds)

        if rc == 0 and record is not None and record.get("status") == "completed":
            val = (record.get("summary") or {}).get("val_loss")
            try:
                return float(val)
            except (TypeError, ValueError):
                return FAILED

        # the job failed: make its record say so, with a reason
        b = OmegaConf.select(task_cfg, "trainer.micro_batch_size", default=None)
        if ended.timed_out:
            reason = timeout_reason(self.timeout_s or 0, "hydra.launcher.timeout_s")
        elif record is not None and record.get("status") == "failed" and record.get("error"):
            reason = oom_reason(str(record["error"]), b)
        else:
            text = (job_dir / "torchrun.log").read_text(encoding="utf-8", errors="replace")
            reason = exit_reason(text, rc or 0, micro_batch_size=b)
        write_failed_record(job_dir, reason, resolved_config(task_cfg), overrides)
        log.error("job %s failed, the sweep goes on: %s", job_dir.name, reason)
        return FAILED
