"""Weights & Biases for a training run: one W&B run per run folder, rank 0 only. Imports no torch
(wandb itself is imported only when a run really logs to W&B)."""

from __future__ import annotations

import logging
import os

from gpt2x.record.failure import one_line

log = logging.getLogger(__name__)


def wandb_api_key_configured() -> bool:
    """True if W&B could authenticate without prompting: WANDB_API_KEY or a netrc entry."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        import netrc

        path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
        hosts = netrc.netrc(path).hosts if os.path.exists(path) else {}
    except (OSError, netrc.NetrcParseError):
        return False
    return any("wandb" in host for host in hosts)


def resolve_wandb_mode(mode: str) -> str:
    """auto -> online with an API key, offline without one (never a login prompt)."""
    if mode == "auto":
        env_mode = os.environ.get("WANDB_MODE", "")
        if env_mode in ("online", "offline", "disabled"):
            return env_mode
        return "online" if wandb_api_key_configured() else "offline"
    return mode


class WandbLogger:
    """One W&B run per training run, rank 0 only; never prompts, hangs long, or crashes a run."""

    def __init__(self, logger_cfg, run_dir: str, config: dict, run_name: str):
        # an exported-but-empty WANDB_MODE (or similar) makes wandb itself crash at init
        for key in [k for k, v in os.environ.items() if k.startswith("WANDB_") and v == ""]:
            del os.environ[key]
        import wandb

        self.mode = resolve_wandb_mode(
            str(logger_cfg.mode.value if hasattr(logger_cfg.mode, "value") else logger_cfg.mode)
        )
        self.run = None
        if self.mode == "disabled":
            return
        kwargs = dict(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            name=logger_cfg.name or run_name,
            group=logger_cfg.group,
            job_type=logger_cfg.job_type,
            tags=list(logger_cfg.tags) or None,
            config=config,
            dir=run_dir,
        )
        settings = wandb.Settings(console="off", init_timeout=60, silent=True)
        try:
            self.run = wandb.init(mode=self.mode, settings=settings, **kwargs)
        except Exception as e:  # noqa: BLE001 - any failure to reach W&B must not end the run
            if self.mode != "online":
                raise
            log.warning(
                "W&B online init failed (%s); logging offline instead", one_line(e)
            )
            self.mode = "offline"
            self.run = wandb.init(mode="offline", settings=settings, **kwargs)
        # plot everything against tokens seen as well as against step
        self.run.define_metric("tokens_seen")
        for prefix in ("train/*", "perf/*", "val/*"):
            self.run.define_metric(prefix, step_metric="tokens_seen")
        log.info("W&B %s run: %s", self.mode, self.run.dir)

    def log_step(self, row: dict) -> None:
        if self.run is None:
            return
        data = {
            "train/loss": row["loss"],
            "train/lr": row["lr"],
            "train/grad_norm": row["grad_norm"],
            "perf/ms": row["ms"],
            "perf/tokens_per_s": row["tokens_per_s"],
            "tokens_seen": row["tokens_seen"],
        }
        if row.get("mfu") is not None:
            data["perf/mfu"] = row["mfu"]
        if row.get("mem_gb") is not None:
            data["perf/mem_gb"] = row["mem_gb"]
        self.run.log(data, step=row["step"])

    def log_eval(self, row: dict) -> None:
        if self.run is None:
            return
        data = {
            f"val/{k.removeprefix('val_')}": v
            for k, v in row.items()
            if k not in ("step", "tokens_seen")
        }
        data["tokens_seen"] = row["tokens_seen"]
        self.run.log(data, step=row["step"])

    def info(self) -> dict | None:
        if self.run is None:
            return None
        url = None
        if self.mode == "online":
            url = self.run.url
        return {
            "mode": self.mode,
            "dir": self.run.dir,
            "id": self.run.id,
            "url": url,
            "group": self.run.group,
            "project": self.run.project,
        }

    def finish(self, exit_code: int = 0, summary: dict | None = None) -> None:
        """End the W&B run (a no-op when W&B is disabled: there is no run)."""
        if self.run is None:
            return
        if summary:
            self.run.summary.update({k: v for k, v in summary.items() if v is not None})
        self.run.finish(exit_code=exit_code)
        self.run = None
