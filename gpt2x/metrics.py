"""Throughput, MFU and where metrics go: the console, the local run record, and W&B.

MFU follows the nanoGPT/PaLM convention: FLOPs per token = 6N + 12*L*H*Q*T (the model's
`flops_per_token`), divided by the device's peak dense bf16 tensor FLOP/s from the table below.
Where the peak is unknown (CPU, an unlisted GPU) MFU is left empty rather than guessed;
`trainer.peak_flops` supplies it by hand.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)

# Peak dense bf16 tensor-core FLOP/s per device, matched against torch.cuda.get_device_name().
# Order matters: the first substring that matches wins ("H100 PCIe" before "H100").
PEAK_FLOPS_BF16: list[tuple[str, float]] = [
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM (e.g. "NVIDIA H100 80GB HBM3")
    ("H200", 989e12),
    ("GH200", 989e12),
    ("A100", 312e12),
    ("A10G", 125e12),
    ("L4", 121e12),
    ("4090", 165e12),
    ("3090", 71e12),
    ("V100", 125e12),  # fp16 tensor cores (V100 has no bf16)
]


def device_peak_flops(device: torch.device) -> float | None:
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, flops in PEAK_FLOPS_BF16:
        if key in name:
            return flops
    return None


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, world_size: int = 1):
    """Model FLOPs utilization per device, or None where the peak is unknown."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * world_size)


def peak_memory_gb(device: torch.device) -> float | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 1e9
    return None


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock step times are real (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    if not ordered:
        return math.nan
    pos = (len(ordered) - 1) * q
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class StepSummary:
    steps: int
    median_ms: float | None
    p10_ms: float | None
    p90_ms: float | None
    tokens_per_s: float | None
    mfu: float | None
    compile_seconds: float | None


def summarize_steps(
    step_ms: Sequence[float],
    tokens_per_step: int,
    flops_per_token: float,
    peak_flops: float | None,
    world_size: int,
    warmup: int,
    compiled: bool,
) -> StepSummary:
    """Step-time statistics over the measured steps (warm-up steps excluded)."""
    measured = list(step_ms[warmup:]) if len(step_ms) > warmup else list(step_ms)
    if not measured:
        return StepSummary(0, None, None, None, None, None, None)
    median = statistics.median(measured)
    tps = tokens_per_step / (median / 1000.0)
    compile_s = None
    if compiled and step_ms:
        # the first step carries the compilation; what it took beyond a normal step
        compile_s = max(0.0, (step_ms[0] - median) / 1000.0)
    return StepSummary(
        steps=len(step_ms),
        median_ms=median,
        p10_ms=percentile(measured, 0.1),
        p90_ms=percentile(measured, 0.9),
        tokens_per_s=tps,
        mfu=mfu(tps, flops_per_token, peak_flops, world_size),
        compile_seconds=compile_s,
    )


def format_step(row: dict, max_steps: int) -> str:
    parts = [
        f"step {row['step']:>5}/{max_steps}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        f"gnorm {row['grad_norm']:.3f}",
        f"{row['ms']:8.1f} ms",
        f"{row['tokens_per_s']:>10,.0f} tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:5.1f}%")
    if row.get("mem_gb") is not None:
        parts.append(f"mem {row['mem_gb']:.1f} GB")
    return " | ".join(parts)


# --------------------------------------------------------------------------------------------
# Weights & Biases


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
                "W&B online init failed (%s); logging offline instead", str(e).splitlines()[0]
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
