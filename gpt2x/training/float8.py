"""float8 training (precision=fp8) with torchao: the transformer blocks' Linear layers run their
matmuls in float8 (dynamic per-tensor scales: e4m3 forward, e5m2 gradients); everything else,
the tied LM head included, stays in the autocast dtype. Needs an NVIDIA GPU with float8 tensor
cores (compute capability 8.9+: L40S, RTX 4090, H100/H200 and newer); torchao expects
torch.compile for speed (it fuses the scaling and casting into the neighbouring kernels).
"""

from __future__ import annotations

import torch
import torch.nn as nn

FLOAT8_CAPABILITY = (8, 9)


class Float8Unavailable(ValueError):
    """precision=fp8 cannot run here; the message names the fix."""


def float8_module_filter(module: nn.Module, fqn: str) -> bool:
    """torchao's module_filter_fn: convert the nn.Linear layers inside the transformer blocks
    (fqn ...transformer.h.<i>...) whose dimensions are multiples of 16, as float8 matmuls need.
    The LM head is left alone: its weight is also the token embedding (tied), and its logits
    feed the softmax over the whole vocabulary."""
    parts = fqn.split(".")
    in_block = any(a == "transformer" and b == "h" for a, b in zip(parts, parts[1:]))
    return (
        isinstance(module, nn.Linear)
        and in_block
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


def check_float8(device: torch.device | str) -> None:
    """Raise Float8Unavailable (one line) unless float8 training can run on `device`."""
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.is_available():
        capability = torch.cuda.get_device_capability(device)
        if capability >= FLOAT8_CAPABILITY:
            try:
                import torchao.float8  # noqa: F401
            except ImportError:
                raise Float8Unavailable(
                    "precision=fp8 needs torchao: pip install torchao"
                ) from None
            return
        where = f"{torch.cuda.get_device_name(device)} (compute capability {capability[0]}."
        where += f"{capability[1]})"
    elif device.type == "cuda":
        where = "cuda (no CUDA device is visible)"
    else:
        where = device.type
    raise Float8Unavailable(
        f"precision=fp8 is not available on {where} (float8 training needs an NVIDIA GPU with "
        "compute capability 8.9+, e.g. H100/H200); use precision=bf16"
    )


def convert_to_float8(model: nn.Module, device: torch.device | str) -> nn.Module:
    """Swap the blocks' nn.Linear layers for torchao's Float8Linear, in place. Call it before
    torch.compile, DDP/FSDP wrapping and build_optimizer."""
    check_float8(device)
    from torchao.float8 import convert_to_float8_training

    return convert_to_float8_training(model, module_filter_fn=float8_module_filter)
