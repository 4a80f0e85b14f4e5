"""The training/evaluation loader: batches of (x, y) windows read from token shards."""

from __future__ import annotations

import math
from collections import OrderedDict
from pathlib import Path

import numpy as np
import torch

from gpt2x.data.shards import load_manifest
from gpt2x.data.sources import DataError
from gpt2x.data.tokenizer import N_VOCAB


class ShardLoader:
    """Batches of (x, y) windows from the shards of one split.

    Windows are seq_len+1 tokens at stride seq_len inside one shard. Train (shuffle=True):
    each epoch permutes the shard order and the windows inside each shard, from (seed, epoch).
    Val (or shuffle=False): manifest order, cycling. Global batch g of an epoch is the
    world_size*batch_size consecutive windows of the epoch order from g*world_size*batch_size;
    rank r takes the r-th batch_size of them, so ranks are disjoint and together read every
    window once per epoch, except the last (num_windows mod world_size*batch_size) windows of
    the epoch order, which are dropped.

    Batches are int32 token ids (half the bytes of int64 to copy to the device, which widens
    them for the embedding and the loss); with pin_memory=True (CUDA) they sit in pinned host
    memory, so `.to(device, non_blocking=True)` really overlaps the copy with compute.
    """

    MAX_OPEN = 4  # memory maps kept open at once

    def __init__(
        self,
        data_dir: str | Path,
        split: str,
        batch_size: int,
        seq_len: int,
        rank: int = 0,
        world_size: int = 1,
        seed: int = 0,
        shuffle: bool = True,
        pin_memory: bool = False,
    ):
        if split not in ("train", "val"):
            raise ValueError(f"split must be 'train' or 'val', not {split!r}")
        if batch_size <= 0 or seq_len <= 0:
            raise DataError(f"micro_batch_size={batch_size} and seq_len={seq_len} must be > 0")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is not in [0, world_size={world_size})")
        self.dir = Path(data_dir)
        self.split = split
        self.batch_size, self.seq_len = int(batch_size), int(seq_len)
        self.rank, self.world_size = int(rank), int(world_size)
        self.seed = int(seed)
        self.shuffle = bool(shuffle) and split == "train"
        self.pin_memory = bool(pin_memory)
        manifest = load_manifest(self.dir, verify="none")
        shards = [s for s in manifest["shards"] if s["split"] == split]
        if not shards:
            raise DataError(
                f"{self.dir} has no {split} shards; "
                + (
                    "raise data.val_fraction or data.val_tokens and prepare again"
                    if split == "val"
                    else "lower data.val_fraction or data.val_tokens and prepare again"
                )
            )
        self._files = [self.dir / s["file"] for s in shards]
        for f, s in zip(self._files, shards):
            if f.stat().st_size != 2 * s["tokens"]:
                raise DataError(f"shard {f} is truncated or corrupted; delete {self.dir}")
        tokens = np.array([s["tokens"] for s in shards], np.int64)
        self._windows = np.maximum((tokens - 1) // self.seq_len, 0)  # per shard
        self._total_windows = int(self._windows.sum())
        self._global = self.batch_size * self.world_size
        self._batches = self._total_windows // self._global
        if self._batches == 0:
            hint = (
                "; or raise data.val_fraction / data.val_tokens and prepare again"
                if split == "val"
                else ""
            )
            raise DataError(
                f"the {split} split of {self.dir} has {self._total_windows} windows of "
                f"seq_len+1={self.seq_len + 1} tokens, fewer than one global batch of "
                f"micro_batch_size*world_size={self.batch_size}*{self.world_size}; lower "
                f"trainer.micro_batch_size or trainer.seq_len{hint}"
            )
        self._offsets = np.arange(self.seq_len + 1, dtype=np.int64)
        self._maps: OrderedDict[int, np.ndarray] = OrderedDict()
        self._layout: tuple[int, np.ndarray, np.ndarray, np.ndarray] | None = None
        self._perms: OrderedDict[int, np.ndarray] = OrderedDict()
        self.epoch = 0
        self.batch = 0  # next global batch within the epoch

    # -- sizes
    @property
    def num_windows(self) -> int:
        """Windows this rank reads per epoch."""
        return self._batches * self.batch_size

    @property
    def tokens_per_epoch(self) -> int:
        """Input tokens this rank reads per epoch."""
        return self.num_windows * self.seq_len

    @property
    def batches_per_epoch(self) -> int:
        return self._batches

    @property
    def total_windows(self) -> int:
        """Windows of seq_len+1 tokens in the whole split (all ranks)."""
        return self._total_windows

    def validation_windows(self, eval_tokens: int) -> int:
        """How many windows the fixed validation set of `eval_tokens` tokens holds: the first
        eval_tokens // seq_len of the split. DataError if the split is smaller."""
        n = int(eval_tokens) // self.seq_len
        if n > self._total_windows:
            raise DataError(
                f"trainer.eval_tokens={eval_tokens} needs {n} windows of seq_len+1="
                f"{self.seq_len + 1} tokens but the {self.split} split of {self.dir} has "
                f"{self._total_windows}; set trainer.eval_tokens<="
                f"{self._total_windows * self.seq_len} or raise data.val_fraction / "
                "data.val_tokens and prepare again"
            )
        return n

    # -- order
    def _seed_words(self, *extra: int) -> list[int]:
        return [self.seed % (1 << 64), *extra]

    def _epoch_layout(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        if self._layout is None or self._layout[0] != self.epoch:
            n = len(self._files)
            if self.shuffle:
                order = np.random.default_rng(self._seed_words(self.epoch)).permutation(n)
            else:
                order = np.arange(n)
            counts = self._windows[order]
            self._layout = (self.epoch, order, counts, np.cumsum(counts))
            self._perms.clear()
        return self._layout[1:]

    def _window_order(self, shard: int) -> np.ndarray | None:
        if not self.shuffle:
            return None
        perm = self._perms.get(shard)
        if perm is None:
            rng = np.random.default_rng(self._seed_words(self.epoch, shard + 1))
            perm = rng.permutation(int(self._windows[shard]))
            self._perms[shard] = perm
            while len(self._perms) > self.MAX_OPEN:
                self._perms.popitem(last=False)
        return perm

    def _map(self, shard: int) -> np.ndarray:
        mm = self._maps.get(shard)
        if mm is None:
            mm = np.memmap(self._files[shard], dtype="<u2", mode="r").view(np.ndarray)
            self._maps[shard] = mm
            while len(self._maps) > self.MAX_OPEN:
                self._maps.popitem(last=False)
        else:
            self._maps.move_to_end(shard)
        return mm

    # -- reading
    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        first = self.batch * self._global + self.rank * self.batch_size
        x, y = self.read_windows(np.arange(first, first + self.batch_size))
        self.batch += 1
        if self.batch == self._batches:
            self.epoch += 1
            self.batch = 0
        return x, y

    def read_windows(self, pos: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """(x, y) of the windows at positions `pos` of this epoch's order (no position change);
        with shuffle=False position i is the i-th window of the split in manifest order."""
        order, counts, cum = self._epoch_layout()
        pos = np.asarray(pos, np.int64)
        k = np.searchsorted(cum, pos, side="right")
        local = pos - (cum[k] - counts[k])
        shard_ids = order[k]
        out = np.empty((len(pos), self.seq_len + 1), np.int32)
        for shard in np.unique(shard_ids):
            rows = np.flatnonzero(shard_ids == shard)
            windows = local[rows]
            perm = self._window_order(int(shard))
            if perm is not None:
                windows = perm[windows]
            idx = windows[:, None] * self.seq_len + self._offsets
            out[rows] = tokens = self._map(int(shard))[idx]
            if tokens.max(initial=0) >= N_VOCAB:  # a corrupted file of the right size
                raise DataError(
                    f"shard {self._files[int(shard)]} holds token id {int(tokens.max())}, beyond "
                    f"the tokenizer's {N_VOCAB} tokens: the file is corrupted; delete {self.dir} "
                    "to prepare it again (data.verify=sha256 checks every shard at start)"
                )
        t = torch.from_numpy(out)
        x, y = t[:, :-1].contiguous(), t[:, 1:].contiguous()
        if self.pin_memory:
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def reset(self) -> None:
        """Back to the first batch of epoch 0."""
        self.epoch = 0
        self.batch = 0

    # -- resume
    def state_dict(self) -> dict:
        return {
            "version": 1,
            "split": self.split,
            "epoch": self.epoch,
            "batch": self.batch,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "batch_size": self.batch_size,
            "seq_len": self.seq_len,
            "world_size": self.world_size,
            "total_windows": self._total_windows,
        }

    def load_state_dict(self, state: dict) -> None:
        """Continue exactly where `state` was taken. With a different global batch
        (micro_batch_size*world_size) the position is rounded up to the next global batch."""
        if state.get("split", self.split) != self.split:
            raise DataError(f"loader state is for the {state['split']} split, not {self.split}")
        if int(state["seq_len"]) != self.seq_len:
            raise DataError(
                f"the checkpoint's data position is for seq_len={state['seq_len']}; resume "
                f"with trainer.seq_len={state['seq_len']} (not {self.seq_len})"
            )
        if int(state.get("total_windows", self._total_windows)) != self._total_windows:
            raise DataError(
                f"the prepared data in {self.dir} changed since the checkpoint was saved "
                f"({state['total_windows']} windows then, {self._total_windows} now)"
            )
        self.seed = int(state["seed"])
        self.shuffle = bool(state.get("shuffle", self.shuffle))
        epoch, batch = int(state["epoch"]), int(state["batch"])
        old_global = int(state["batch_size"]) * int(state["world_size"])
        if old_global != self._global:
            batch = math.ceil(batch * old_global / self._global)
        if batch >= self._batches:
            epoch, batch = epoch + 1, 0
        self.epoch, self.batch = epoch, batch
        self._layout = None
