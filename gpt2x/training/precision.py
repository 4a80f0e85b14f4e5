"""The precision rungs of the ladder: fp32 -> tf32 -> bf16 (autocast) -> fp16 (autocast + GradScaler).

Parameters, gradients and optimizer state always stay fp32; only the forward pass and loss run
in the lower precision under `torch.autocast`.
"""

from __future__ import annotations

import contextlib
import logging

import torch

from gpt2x.config import ConfigError, Dtype

log = logging.getLogger(__name__)

TORCH_DTYPES = {Dtype.fp32: torch.float32, Dtype.bf16: torch.bfloat16, Dtype.fp16: torch.float16}


def torch_dtype(dtype: Dtype | str) -> torch.dtype:
    return TORCH_DTYPES[Dtype(dtype)]


def setup_precision(precision_cfg, device: torch.device) -> None:
    """Set global matmul precision; fail early for combinations that cannot run."""
    dtype = Dtype(precision_cfg.dtype)
    if dtype is Dtype.fp16 and device.type != "cuda":
        raise ConfigError(
            f"precision=fp16 needs CUDA (GradScaler), this run is on {device.type}; "
            "use precision=bf16 or precision=fp32"
        )
    if precision_cfg.tf32:
        if device.type == "cuda":
            # "high" lets fp32 matmuls use TF32 tensor cores (10-bit mantissa inputs)
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
            torch.set_float32_matmul_precision("high")
        elif dtype is Dtype.fp32 and precision_cfg.name != "auto":
            # said only where TF32 is what was asked for (precision=tf32); bf16/fp16 keep the
            # flag for the few fp32 matmuls outside autocast, and precision=auto for its fp32
            # choice on a GPU: nobody asked about them here
            log.warning(
                "precision.tf32=true is a no-op on %s (TF32 is a CUDA feature)", device.type
            )
    elif device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.set_float32_matmul_precision("highest")


def faster_dtype(bf16_flops: float | None, fp32_flops: float | None) -> Dtype:
    """precision=auto's rule: bf16 unless this machine's measured bf16 matmul peak is clearly
    (over 10%) below its fp32 one, as on a CPU without bf16 matrix units (no AMX). Within 10%
    bf16 stays: probe noise alone would flip the choice, and bf16 halves activation memory."""
    if bf16_flops and fp32_flops and bf16_flops < 0.9 * fp32_flops:
        return Dtype.fp32
    return Dtype.bf16


def slow_bf16_hint(precision_cfg, device: torch.device, peaks: dict) -> str | None:
    """One line when a CPU run asked for bf16 where precision=auto would take fp32: the
    measured bf16 matmuls are clearly slower than the fp32 ones, and fp32 steps likely
    faster."""
    bf16, fp32 = peaks.get("measured_bf16"), peaks.get("measured_fp32")
    if device.type != "cpu" or Dtype(precision_cfg.dtype) is not Dtype.bf16:
        return None
    if faster_dtype(bf16, fp32) is Dtype.bf16:
        return None
    return (
        f"bf16 matmuls on this CPU reach {bf16 / 1e12:.2f} TFLOP/s, fp32 ones "
        f"{fp32 / 1e12:.2f} (measured): precision=fp32 is likely faster here"
    )


def autocast(precision_cfg, device: torch.device) -> contextlib.AbstractContextManager:
    """The context for forward + loss: autocast for bf16/fp16, nothing for fp32."""
    dtype = Dtype(precision_cfg.dtype)
    if dtype is Dtype.fp32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=torch_dtype(dtype))


def grad_scaler(precision_cfg, device: torch.device) -> torch.amp.GradScaler:
    """A GradScaler that is active for fp16 only (fp16 gradients underflow without it)."""
    enabled = Dtype(precision_cfg.dtype) is Dtype.fp16
    return torch.amp.GradScaler(device.type, enabled=enabled)
