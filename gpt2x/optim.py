"""AdamW with weight decay on 2-D parameters only, and the warmup + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch


def build_optimizer(model: torch.nn.Module, optim_cfg) -> torch.optim.AdamW:
    """AdamW over two groups: matmul weights and embeddings decay; biases and LayerNorm don't.

    `optim.fused=true` runs the update as one fused kernel per group (the ladder's "fused" rung).
    """
    params = [p for p in model.parameters() if p.requires_grad]  # tied weights appear once
    decay = [p for p in params if p.dim() >= 2]
    no_decay = [p for p in params if p.dim() < 2]
    groups = [
        {"params": decay, "weight_decay": optim_cfg.weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]
    return torch.optim.AdamW(
        groups,
        lr=optim_cfg.lr,
        betas=(optim_cfg.beta1, optim_cfg.beta2),
        eps=optim_cfg.eps,
        fused=bool(optim_cfg.fused),
    )


def lr_at(step: int, optim_cfg, max_steps: int) -> float:
    """Linear warmup to optim.lr over warmup_steps, then cosine decay to lr*min_lr_ratio."""
    max_lr = optim_cfg.lr
    min_lr = max_lr * optim_cfg.min_lr_ratio
    warmup = optim_cfg.warmup_steps
    decay_steps = optim_cfg.decay_steps or max_steps
    if step < warmup:
        return max_lr * (step + 1) / warmup
    if step >= decay_steps:
        return min_lr
    progress = (step - warmup) / max(1, decay_steps - warmup)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
