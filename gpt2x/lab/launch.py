"""`hydra/launcher=torchrun`: each job of a sweep as its own `torchrun` launch.

    python -m gpt2x.train -m +sweep=batch_size hydra/launcher=torchrun \
        hydra.launcher.nproc_per_node=2 parallel=ddp

Hydra's own torchrun launcher was never released, and the bundled launchers run a job in one
Python process (sequential, joblib) or one task per job (submitit), which cannot host a
multi-process DDP job. This launcher runs, for every job and one after the other,

    python -m torch.distributed.run --standalone --nproc_per_node=N -m gpt2x.train \
        <the job's overrides> hydra.run.dir=<the job's folder in the sweep>

waits for it, tees its output to `<job folder>/torchrun.log`, and reads the job's result from
the run record the trainer wrote (record.json: status, summary.val_loss). A job that fails or
dies (non-zero exit, a signal, a timeout) gets a failed record with the reason (gpt2x.sweep)
and returns gpt2x.lab.sweep.FAILED, so the sweep goes on; with nproc_per_node=1 this is also a
sequential launcher that isolates each job in a fresh process (a crash or a CPU out-of-memory
kill ends that job only).

Hydra only instantiates launchers from the `hydra_plugins` namespace: the class is exposed as
`hydra_plugins.gpt2x_launchers.torchrun_launcher.TorchrunLauncher` (conf/hydra/launcher/
torchrun.yaml). This module imports no torch (Hydra imports every plugin module at start-up).
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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

from gpt2x.config import resolved_config, run_id
from gpt2x.record.folder import read_record, write_failed_record

log = logging.getLogger("gpt2x.lab.launch")

FAILED = float("inf")  # == gpt2x.training.multirun.FAILED (not imported here: it would import torch)


def quote_override_value(value: str) -> str:
    """A value for a Hydra command-line override, single-quoted so `=`, `,` and spaces in a
    folder name are taken literally (Hydra's grammar: `\\'` and `\\\\` inside quotes)."""
    return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"


def torchrun_command(
    overrides: Sequence[str],
    job_dir: str | Path,
    nproc_per_node: int = 1,
    module: str = "gpt2x.train",
    torchrun: Sequence[str] | None = None,
    extra_args: Sequence[str] = (),
) -> list[str]:
    """The argv that runs one job: torchrun, the module, the job's overrides, its folder."""
    launcher = list(torchrun) if torchrun else [sys.executable, "-m", "torch.distributed.run"]
    return [
        *launcher,
        "--standalone",
        f"--nproc_per_node={int(nproc_per_node)}",
        *extra_args,
        "-m",
        module,
        *overrides,
        f"hydra.run.dir={quote_override_value(str(job_dir))}",
    ]


def failure_from_log(text: str, returncode: int) -> str:
    """The one-line reason a torchrun launch failed, from its output and exit status."""
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    # the trainer's own one-line errors (expected problems: bad setting, bad data, ...)
    for line in reversed(lines):
        if line.startswith("error: "):
            return line.removeprefix("error: ")
    # a Python exception: the last "SomeError: message" line of a traceback
    for line in reversed(lines):
        if re.match(r"^[\w.]+(Error|Exception|Interrupt)\b.*:", line) and "torchrun" not in line:
            return line
    m = re.search(r"Signal (\d+) \((SIG\w+)\) received", text)
    if m:
        return f"killed by {m.group(2)} (signal {m.group(1)})"
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"killed by {name}"
    return f"torchrun exited with status {returncode}"


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
        log_path = job_dir / "torchrun.log"
        t0 = time.monotonic()
        with open(log_path, "w", encoding="utf-8", errors="replace") as log_file:
            log_file.write("$ " + " ".join(cmd) + "\n")
            log_file.flush()
            rc, timed_out = self._tee(cmd, env, log_file)
        text = log_path.read_text(encoding="utf-8", errors="replace")
        record = read_record(job_dir)
        log.info("job %s: exit %s after %.1f s", job_dir.name, rc, time.monotonic() - t0)

        if rc == 0 and record is not None and record.get("status") == "completed":
            val = (record.get("summary") or {}).get("val_loss")
            try:
                return float(val)
            except (TypeError, ValueError):
                return FAILED

        # the job failed: make its record say so, with a reason
        if timed_out:
            reason = f"timed out after {self.timeout_s} s (hydra.launcher.timeout_s)"
        elif record is not None and record.get("status") == "failed" and record.get("error"):
            reason = str(record["error"])
        else:
            reason = failure_from_log(text, rc)
        if "out of memory" in reason.lower() and "at micro_batch_size=" not in reason:
            b = OmegaConf.select(task_cfg, "trainer.micro_batch_size", default=None)
            kind = "CUDA" if "cuda" in reason.lower() else "CPU"
            reason = f"{kind} out of memory at micro_batch_size={b} ({reason})"
        write_failed_record(job_dir, reason, resolved_config(task_cfg), overrides)
        log.error("job %s failed, the sweep goes on: %s", job_dir.name, reason)
        return FAILED

    def _tee(self, cmd: list[str], env: dict, log_file: Any) -> tuple[int, bool]:
        """Run cmd in its own process group, copying its output to the console and the log."""
        proc = subprocess.Popen(
            cmd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            errors="replace",
            start_new_session=True,
        )

        def copy() -> None:
            assert proc.stdout is not None
            for line in proc.stdout:
                log_file.write(line)
                log_file.flush()
                sys.stdout.write(line)
                sys.stdout.flush()

        reader = threading.Thread(target=copy, daemon=True)
        reader.start()
        timed_out = False
        try:
            proc.wait(timeout=self.timeout_s)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
        except BaseException:
            _kill_group(proc)  # Ctrl-C or an error here: do not leave ranks running
            raise
        finally:
            reader.join(timeout=10)
        return proc.wait(), timed_out


def _kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the job's process group (torchrun forwards it to the ranks), then SIGKILL."""
    stop_process_group(proc, ((signal.SIGTERM, 30.0), (signal.SIGKILL, 5.0)))


def stop_process_group(
    proc: subprocess.Popen,
    steps: Sequence[tuple[int, float]],
    interrupts: tuple[type[BaseException], ...] = (KeyboardInterrupt,),
) -> None:
    """Send each (signal, seconds to wait) of `steps` in turn to the process group led by `proc`
    (started with start_new_session=True) until it has exited. An interrupt while waiting
    moves on to the next signal at once (a second Ctrl-C escalates)."""
    for sig, wait_s in steps:
        if proc.poll() is not None:
            return
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            return
        try:
            proc.wait(timeout=wait_s)
            return
        except subprocess.TimeoutExpired:
            continue
        except interrupts:
            continue

