"""The fixed held-out set's loss, shared by the trainer and `python -m gpt2x.evaluate`.

The validation set is the first `eval_tokens // seq_len` windows of the prepared val split, the
same set for every micro batch size and world size, so val losses compare across runs.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import AbstractContextManager

import numpy as np
import torch

from gpt2x.data import ShardLoader


@torch.no_grad()
def validation_loss_sum(
    model: torch.nn.Module,
    reader: ShardLoader,
    eval_tokens: int,
    batch_size: int,
    rank: int,
    world_size: int,
    device: torch.device,
    autocast_ctx: Callable[[], AbstractContextManager],
) -> torch.Tensor:
    """[sum of per-token losses, tokens] over this rank's share of the fixed validation set
    (window i belongs to rank i % world_size). Every rank runs the same number of full
    (batch_size, seq_len) batches, padded with ignored targets, so a compiled model never sees a
    new shape and FSDP's collectives line up; summed over ranks the result does not depend on
    batch or world size."""
    n = reader.validation_windows(eval_tokens)
    mine = np.arange(rank, n, world_size)
    steps = math.ceil(math.ceil(n / world_size) / batch_size)
    # float64 sums where the device has it (MPS does not)
    totals = torch.zeros(
        2, dtype=torch.float32 if device.type == "mps" else torch.float64, device=device
    )
    T = reader.seq_len
    for i in range(steps):
        pos = mine[i * batch_size : (i + 1) * batch_size]
        x = torch.zeros(batch_size, T, dtype=torch.long)
        y = torch.full((batch_size, T), -1, dtype=torch.long)  # -1: ignored by the loss
        if len(pos):
            x[: len(pos)], y[: len(pos)] = reader.read_windows(pos)
        with autocast_ctx():
            _, loss = model(x.to(device), y.to(device))
        if len(pos):  # the model's loss is the mean over the real (unpadded) tokens
            tokens = len(pos) * T
            totals[0] += loss.to(totals.dtype) * tokens
            totals[1] += tokens
    return totals


def val_reader(data_dir, seq_len: int) -> ShardLoader:
    """The reader of the validation windows (by position, no shuffling)."""
    return ShardLoader(data_dir, "val", batch_size=1, seq_len=seq_len, shuffle=False)
