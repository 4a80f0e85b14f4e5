"""Per-step measurements: throughput, MFU, memory, and what the run ran on.

MFU follows the nanoGPT/PaLM convention: FLOPs per token = 6N + 12*L*H*Q*T (the model's
`flops_per_token`), divided by a peak FLOP/s. Two peaks, each its own column (gpt2x.training.peak):
`mfu` against the spec-sheet dense bf16 peak of the GPU (empty where none is known: CPUs,
unlisted GPUs, MIG slices; `trainer.peak_flops` sets it by hand), and `mfu_measured` against the
better of the bf16 and fp32 matmul peaks measured on this machine by a short probe (every
device; cached per machine).
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from gpt2x import stats
from gpt2x.measure import timed
from gpt2x.training.peak import cpu_isa_limits, cpu_model_name, default_cache_path, device_name

log = logging.getLogger(__name__)


def mfu(tokens_per_s: float, flops_per_token: float, peak_flops: float | None, world_size: int = 1):
    """Model FLOPs utilization per device, or None where the peak is unknown."""
    if not peak_flops:
        return None
    return tokens_per_s * flops_per_token / (peak_flops * world_size)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work so wall-clock step times are real (CUDA is asynchronous)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def reset_peak_memory(device: torch.device) -> None:
    """Start a new peak-memory window (before every step: each row holds its own step's peak)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    elif device.type == "cpu":
        # Linux: writing 5 to clear_refs resets the process' peak resident set size (VmHWM)
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")


def peak_memory(device: torch.device) -> dict:
    """The peak since `reset_peak_memory`: CUDA allocated + reserved GB, or the CPU peak RSS GB."""
    if device.type == "cuda":
        return {
            "mem_gb": torch.cuda.max_memory_allocated(device) / 1e9,
            "mem_reserved_gb": torch.cuda.max_memory_reserved(device) / 1e9,
        }
    if device.type == "cpu":
        with contextlib.suppress(OSError), open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return {"rss_gb": int(line.split()[1]) * 1024 / 1e9}
    return {}


@dataclass
class StepSummary:
    steps: int
    median_ms: float | None
    p10_ms: float | None
    p90_ms: float | None
    tokens_per_s: float | None
    mfu: float | None
    mfu_measured: float | None
    compile_seconds: float | None


def summarize_steps(
    step_ms: Sequence[float],
    tokens_per_step: int,
    flops_per_token: float,
    peaks: dict,
    world_size: int,
    warmup: int,
    compiled: bool,
) -> StepSummary:
    """Step-time statistics over the measured steps (gpt2x.measure.timed: the warm-up skipped,
    at least one step kept). peaks: {"spec": FLOP/s or None, "measured": FLOP/s or None}."""
    measured = timed(step_ms, warmup)
    if not measured:
        return StepSummary(0, None, None, None, None, None, None, None)
    median = stats.median(measured)
    tps = tokens_per_step / (median / 1000.0)
    compile_s = None
    if compiled and step_ms:
        # the first step carries the compilation; what it took beyond a normal step
        compile_s = max(0.0, (step_ms[0] - median) / 1000.0)
    mfu_measured = mfu(tps, flops_per_token, peaks.get("measured"), world_size)
    if mfu_measured is not None and mfu_measured > 1.0:
        # more than the matmul peak: the cached probe ran while the machine was busy
        log.warning(
            "mfu(measured) is %.0f%%: the cached matmul peak is too low (probed on a busy "
            "machine?); delete %s and run again on an idle machine",
            100 * mfu_measured,
            default_cache_path(),
        )
    return StepSummary(
        steps=len(step_ms),
        median_ms=median,
        p10_ms=stats.percentile(measured, 10),
        p90_ms=stats.percentile(measured, 90),
        tokens_per_s=tps,
        mfu=mfu(tps, flops_per_token, peaks.get("spec"), world_size),
        mfu_measured=mfu_measured,
        compile_seconds=compile_s,
    )


def format_step(row: dict, max_steps: int) -> str:
    """One console line per step. It counts steps done (the last is `max_steps/max_steps`, as
    the bar and the checkpoint `step_<max_steps>` do); the row's `step` is the 0-based index."""
    parts = [
        f"step {row['step'] + 1:>5}/{max_steps}",
        f"loss {row['loss']:.4f}",
        f"lr {row['lr']:.2e}",
        f"gnorm {row['grad_norm']:.3f}",
        f"{row['ms']:8.1f} ms",
        f"{row['tokens_per_s']:>10,.0f} tok/s",
    ]
    if row.get("mfu") is not None:
        parts.append(f"mfu {100 * row['mfu']:5.1f}%")
    if row.get("mfu_measured") is not None:
        parts.append(f"mfu(measured) {100 * row['mfu_measured']:5.1f}%")
    if row.get("mem_gb") is not None:
        parts.append(f"mem {row['mem_gb']:.1f}/{row.get('mem_reserved_gb', 0):.1f} GB")
    if row.get("rss_gb") is not None:
        parts.append(f"rss {row['rss_gb']:.2f} GB")
    return " | ".join(parts)


def hardware(device: torch.device, peaks: dict) -> dict:
    """What the run ran on, for the record: device and CPU model, threads, host, the peaks."""
    return {
        "device": device.type,
        "device_name": device_name(device),
        "device_count": torch.cuda.device_count() if device.type == "cuda" else 1,
        "cpu": cpu_model_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cpu_isa_limits": cpu_isa_limits(),  # e.g. ONEDNN_MAX_CPU_ISA: a CPU made to act older
        "hostname": socket.gethostname(),
        "cuda": torch.version.cuda,
        "peak_flops": peaks,
    }
