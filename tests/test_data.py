"""ShardLoader: windows, deterministic shuffling, ranks, exact resume, val cycling."""

from __future__ import annotations

import json
import random

import numpy as np
import pytest
import torch
from omegaconf import OmegaConf

from gpt2x.config import DataConfig
from gpt2x.data import DataError, ShardLoader, load_manifest, prepare

T = 16
B = 4


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A text corpus of ~40k tokens in shards of 1000 (val: the first 20%)."""
    root = tmp_path_factory.mktemp("corpus")
    rng = random.Random(0)
    words = [f"w{i}" for i in range(400)] + ["the", "and", ",", ".", "\n"]
    for i in range(40):
        text = " ".join(rng.choice(words) for _ in range(rng.randint(200, 600)))
        (root / f"doc{i:03d}.txt").write_text(text)
    cfg = OmegaConf.structured(
        DataConfig(
            name="text",
            source=str(root / "*.txt"),
            dir=str(root / "prepared"),
            shard_tokens=1000,
            val_fraction=0.2,
        )
    )
    return prepare(cfg, progress=False)


def all_windows(d, split: str) -> dict[bytes, tuple[str, int]]:
    """Every (T+1)-token window of a split, keyed by its content."""
    out = {}
    for s in load_manifest(d)["shards"]:
        if s["split"] != split:
            continue
        tok = np.fromfile(d / s["file"], dtype="<u2").astype(np.int64)
        for w in range((len(tok) - 1) // T):
            key = tok[w * T : w * T + T + 1].tobytes()
            assert key not in out  # windows are distinguishable by content in this corpus
            out[key] = (s["file"], w)
    return out


def window_keys(x: torch.Tensor, y: torch.Tensor) -> list[bytes]:
    full = torch.cat([x, y[:, -1:]], dim=1).numpy().astype(np.int64)
    return [row.tobytes() for row in full]


def read(loader: ShardLoader, n: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    return [loader.next_batch() for _ in range(n)]


def same(a, b) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x1, x2) and torch.equal(y1, y2) for (x1, y1), (x2, y2) in zip(a, b)
    )


def test_batches_are_shifted_windows(data_dir):
    windows = all_windows(data_dir, "train")
    loader = ShardLoader(data_dir, "train", B, T, seed=1)
    for x, y in read(loader, 20):
        assert x.shape == y.shape == (B, T)
        assert x.dtype == y.dtype == torch.int32 and x.device.type == "cpu"
        assert x.is_contiguous() and y.is_contiguous()
        assert torch.equal(x[:, 1:], y[:, :-1])
        for key in window_keys(x, y):
            assert key in windows


def test_sizes(data_dir):
    windows = all_windows(data_dir, "train")
    loader = ShardLoader(data_dir, "train", B, T, world_size=2, rank=1)
    assert loader.batches_per_epoch == len(windows) // (2 * B)
    assert loader.num_windows == loader.batches_per_epoch * B
    assert loader.tokens_per_epoch == loader.num_windows * T


def test_seed_determines_order(data_dir):
    a = read(ShardLoader(data_dir, "train", B, T, seed=3), 10)
    b = read(ShardLoader(data_dir, "train", B, T, seed=3), 10)
    c = read(ShardLoader(data_dir, "train", B, T, seed=4), 10)
    assert same(a, b)
    assert not same(a, c)


def epoch_keys(loader: ShardLoader) -> list[bytes]:
    keys = []
    for x, y in read(loader, loader.batches_per_epoch):
        keys += window_keys(x, y)
    return keys


def test_epochs_reshuffle_and_cover(data_dir):
    windows = all_windows(data_dir, "train")
    loader = ShardLoader(data_dir, "train", B, T, seed=0)
    e0 = epoch_keys(loader)
    assert loader.epoch == 1 and loader.batch == 0
    e1 = epoch_keys(loader)
    assert e0 != e1  # re-shuffled
    for keys in (e0, e1):
        assert len(set(keys)) == len(keys) == loader.batches_per_epoch * B
        assert len(windows) - len(keys) == len(windows) % B  # only the remainder is dropped
    # shard order is permuted, not just the windows inside each shard
    first_shards = [windows[k][0] for k in e0[: loader.batches_per_epoch * B : 60]]
    assert first_shards != sorted(first_shards)


def test_two_ranks_disjoint_and_cover(data_dir):
    windows = all_windows(data_dir, "train")
    r0 = ShardLoader(data_dir, "train", B, T, rank=0, world_size=2, seed=5)
    r1 = ShardLoader(data_dir, "train", B, T, rank=1, world_size=2, seed=5)
    k0, k1 = epoch_keys(r0), epoch_keys(r1)
    assert not set(k0) & set(k1)
    assert len(set(k0) | set(k1)) == len(windows) - len(windows) % (2 * B)
    # rank r of world 2 reads the r-th half of the single-rank global batch of 2B
    single = ShardLoader(data_dir, "train", 2 * B, T, seed=5)
    x, y = single.next_batch()
    keys = window_keys(x, y)
    assert keys[:B] == k0[:B] and keys[B:] == k1[:B]


def test_resume_is_exact(data_dir):
    ref = ShardLoader(data_dir, "train", B, T, seed=7)
    n = ref.batches_per_epoch + 3  # resume inside the second epoch
    read(ref, n)
    state = json.loads(json.dumps(ref.state_dict()))  # JSON-serialisable
    assert state["epoch"] == 1 and state["batch"] == 3
    expected = read(ref, ref.batches_per_epoch)  # crosses into the third epoch

    resumed = ShardLoader(data_dir, "train", B, T, seed=999)  # the state's seed wins
    resumed.load_state_dict(state)
    assert same(read(resumed, len(expected)), expected)


def test_resume_with_other_world_size(data_dir):
    ref = ShardLoader(data_dir, "train", B, T, seed=7)
    read(ref, 4)  # 16 windows consumed
    r = ShardLoader(data_dir, "train", B, T, rank=1, world_size=2, seed=7)
    r.load_state_dict(ref.state_dict())
    assert (r.epoch, r.batch) == (0, 2)  # 16 windows = 2 global batches of 8
    with pytest.raises(DataError, match="trainer.seq_len=16"):
        ShardLoader(data_dir, "train", B, 8).load_state_dict(ref.state_dict())


def test_val_fixed_order_reset_and_cycle(data_dir):
    m = load_manifest(data_dir)
    val0 = np.fromfile(data_dir / m["shards"][0]["file"], dtype="<u2").astype(np.int64)
    loader = ShardLoader(data_dir, "val", B, T, seed=1, shuffle=True)  # val never shuffles
    first = read(loader, 3)
    x, y = first[0]
    assert torch.equal(x[0], torch.from_numpy(val0[:T]))
    assert torch.equal(x[1], torch.from_numpy(val0[T : 2 * T]))
    loader.reset()
    assert same(read(loader, 3), first)
    other_seed = ShardLoader(data_dir, "val", B, T, seed=2)
    assert same(read(other_seed, 3), first)
    # cycling: after a full pass the same batches come again
    loader.reset()
    one_pass = read(loader, loader.batches_per_epoch)
    assert same(read(loader, loader.batches_per_epoch), one_pass)
    # ranks split val too
    v0 = ShardLoader(data_dir, "val", B, T, rank=0, world_size=2)
    v1 = ShardLoader(data_dir, "val", B, T, rank=1, world_size=2)
    assert not set(epoch_keys(v0)) & set(epoch_keys(v1))


def test_too_few_windows(data_dir):
    with pytest.raises(DataError, match="micro_batch_size"):
        ShardLoader(data_dir, "val", 512, T)
    with pytest.raises(DataError, match="seq_len"):
        ShardLoader(data_dir, "train", 2, 4000)


def test_not_prepared(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        ShardLoader(tmp_path, "train", B, T)


def test_opens_few_maps(data_dir):
    loader = ShardLoader(data_dir, "train", B, T, seed=0)
    read(loader, loader.batches_per_epoch)
    assert len(loader._maps) <= ShardLoader.MAX_OPEN


# ---------------------------------------------------------------------------------------------
# the fixed validation set (gpt2x.training.validation.validation_loss_sum)


def test_validation_set_is_the_same_for_any_batch_and_world_size(data_dir):
    import contextlib

    from gpt2x.model import GPT, GPTConfig
    from gpt2x.training.validation import validation_loss_sum

    torch.manual_seed(0)
    model = GPT(GPTConfig(block_size=T, n_layer=1, n_head=2, n_embd=16)).eval()
    reader = ShardLoader(data_dir, "val", batch_size=1, seq_len=T, shuffle=False)
    n = 70  # windows: crosses a shard boundary (a 1000-token shard holds 62 windows of 16)
    eval_tokens = n * T + T - 1  # a partial window is not part of the set
    assert reader.validation_windows(eval_tokens) == n
    # the set is the first n windows of the val split, in manifest order
    x, y = reader.read_windows(np.arange(n))
    in_order = list(all_windows(data_dir, "val"))  # manifest order, then window order
    assert window_keys(x, y) == in_order[:n]
    with torch.no_grad():
        reference = model(x.long(), y.long())[1].item()

    for batch_size, world_size in [(4, 1), (3, 1), (1, 1), (70, 1), (4, 2), (6, 3), (8, 5)]:
        total = torch.zeros(2, dtype=torch.float64)
        shapes = []
        for rank in range(world_size):

            def counted(xb, yb, calls=shapes, rank=rank):
                calls.append((rank, tuple(xb.shape)))
                return model(xb, yb)

            total += validation_loss_sum(
                counted,
                reader,
                eval_tokens,
                batch_size,
                rank,
                world_size,
                torch.device("cpu"),
                contextlib.nullcontext,
            )
        assert total[1].item() == n * T
        assert (total[0] / total[1]).item() == pytest.approx(reference, rel=1e-6)
        # every rank makes the same number of forwards (FSDP all-gathers in each), all full-size
        per_rank = [sum(r == k for r, _ in shapes) for k in range(world_size)]
        assert len(set(per_rank)) == 1 and per_rank[0] >= 1
        assert {s for _, s in shapes} == {(batch_size, T)}


def test_validation_set_larger_than_the_split_names_the_limit(data_dir):
    reader = ShardLoader(data_dir, "val", batch_size=1, seq_len=T, shuffle=False)
    limit = reader.total_windows * T
    assert reader.validation_windows(limit) == reader.total_windows
    with pytest.raises(DataError, match=f"set trainer.eval_tokens<={limit} or raise"):
        reader.validation_windows(limit + T)


def test_a_corrupted_shard_of_the_right_size_is_a_data_error(data_dir, tmp_path):
    """Garbage of the right size passes the size check; a token id beyond the vocabulary
    is caught on reading, with the shard named, instead of an IndexError in the embedding."""
    import shutil

    copy = tmp_path / "prepared"
    shutil.copytree(data_dir, copy)
    shard = next(p for p in sorted(copy.glob("*.bin")) if "train" in p.name)
    shard.write_bytes(b"\xff" * shard.stat().st_size)  # token id 65535 everywhere
    loader = ShardLoader(copy, "train", batch_size=4, seq_len=32, seed=0)
    with pytest.raises(DataError, match=f"shard .*{shard.name} holds token id 65535, beyond"):
        for _ in range(loader.batches_per_epoch):
            loader.next_batch()
