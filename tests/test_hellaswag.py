"""HellaSwag evaluation: data handling, rendering, scoring against independent references."""

from __future__ import annotations

import io
import json
import math
import os
import urllib.error
import urllib.request
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from gpt2x.training import hellaswag as hs
from gpt2x.training.hellaswag import (
    HellaSwagError,
    evaluate_hellaswag,
    hellaswag_path,
    load_examples,
    render_example,
    score_batch,
)

TINY = Path(__file__).parent / "data" / "hellaswag_tiny.jsonl"
STANDARD_KEYS = {
    "ind",
    "activity_label",
    "ctx_a",
    "ctx_b",
    "ctx",
    "split",
    "split_type",
    "label",
    "endings",
    "source_id",
}


def byte_encode(text: str) -> list[int]:
    """A tiny offline tokenizer: one token per UTF-8 byte, ids 1..256 (0 is left for padding)."""
    return [b + 1 for b in text.encode("utf-8")]


def gpt2_encoding():
    try:
        from gpt2x.data.tokenizer import get_tokenizer

        return get_tokenizer()
    except Exception as e:  # the tokenizer module is optional for these tests
        pytest.skip(f"gpt2x.data.tokenizer unavailable: {e}")


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


# ------------------------------------------------------------------------------- data file


def test_tiny_file_has_the_real_format():
    examples = load_examples(TINY)
    assert len(examples) == 6
    for ex in examples:
        assert set(ex) == STANDARD_KEYS
        assert len(ex["endings"]) == 4 and isinstance(ex["label"], int)
        assert ex["ctx"] == (f"{ex['ctx_a']} {ex['ctx_b']}" if ex["ctx_b"] else ex["ctx_a"])
    assert [ex["ind"] for ex in load_examples(TINY, limit=2)] == [7, 19]
    assert load_examples(TINY, limit=0) == []


# ------------------------------------------------------------------------------- rendering


def test_render_mask_padding_and_leading_space():
    ex = load_examples(TINY)[0]
    tokens, mask, label = render_example(ex, byte_encode)
    ctx = byte_encode(ex["ctx"])
    ends = [byte_encode(" " + e) for e in ex["endings"]]
    width = len(ctx) + max(len(e) for e in ends)
    assert label == ex["label"] == 2
    assert tokens.shape == mask.shape == (4, width)
    assert tokens.dtype == mask.dtype == torch.long
    for i, end in enumerate(ends):
        n = len(ctx) + len(end)
        assert tokens[i, : len(ctx)].tolist() == ctx
        assert tokens[i, len(ctx) : n].tolist() == end
        assert tokens[i, n:].tolist() == [0] * (width - n)  # right padding with 0
        assert mask[i].tolist() == [0] * len(ctx) + [1] * len(end) + [0] * (width - n)
        # the separating space is the ending's first token, not the context's last
        assert tokens[i, len(ctx)].item() == byte_encode(" ")[0]
        assert tokens[i, len(ctx) - 1].item() == byte_encode(ex["ctx"][-1])[0]


def test_render_gpt2_bpe_space_belongs_to_the_ending():
    enc = gpt2_encoding()
    ex = load_examples(TINY)[1]  # ctx ends in "the man", endings start with a word
    tokens, mask, _ = render_example(ex, enc.encode_ordinary)
    ctx = enc.encode_ordinary(ex["ctx"])
    for i, ending in enumerate(ex["endings"]):
        row = tokens[i][: len(ctx) + int(mask[i].sum())].tolist()
        assert row[: len(ctx)] == ctx
        assert enc.decode(row) == ex["ctx"] + " " + ending
        ending_tokens = tokens[i][mask[i].bool()].tolist()
        assert ending_tokens == enc.encode_ordinary(" " + ending)
        first = enc.decode([ending_tokens[0]])  # e.g. " opens", " un" (of " unplugs")
        assert first.startswith(" ") and (" " + ending).startswith(first)


def test_render_left_truncates_long_contexts():
    ex = load_examples(TINY)[3]
    full, full_mask, _ = render_example(ex, byte_encode)
    ctx_len = len(byte_encode(ex["ctx"]))
    max_len = 90
    assert full.shape[1] > max_len
    tokens, mask, _ = render_example(ex, byte_encode, max_len=max_len)
    assert tokens.shape[1] <= max_len
    for i in range(4):
        n_end = int(full_mask[i].sum())
        row_len = min(ctx_len + n_end, max_len)
        want = full[i, : ctx_len + n_end][-row_len:]
        assert tokens[i, :row_len].tolist() == want.tolist()  # oldest context tokens cut
        assert int(mask[i].sum()) == n_end  # the whole ending is kept
        assert mask[i, row_len - n_end : row_len].tolist() == [1] * n_end
    with pytest.raises(HellaSwagError, match="max_len"):
        render_example(ex, byte_encode, max_len=1)


# ------------------------------------------------------------------------------- scoring by hand

# word-level toy vocabulary; 0 is padding, "z" soaks up the leftover probability mass
VOCAB = {w: i for i, w in enumerate(["<pad>", "a", "b", "c", "d", "e", "f", "g", "z"])}


def word_encode(text: str) -> list[int]:
    return [VOCAB[w] for w in text.split()]


def bigram_logits_fn():
    """logits[t] = log p(. | token t): the loss of each next token is exactly -log p."""
    v = len(VOCAB)
    probs = torch.full((v, v), 0.0, dtype=torch.float64)
    nll = {  # (previous, next): cross-entropy in nats
        ("a", "b"): 2.0,
        ("a", "c"): 1.0,
        ("a", "e"): 3.0,
        ("a", "g"): 5.0,
        ("c", "d"): 1.0,
        ("d", "d"): 1.0,
        ("e", "f"): 3.0,
    }
    for (prev, nxt), loss in nll.items():
        probs[VOCAB[prev], VOCAB[nxt]] = math.exp(-loss)
    probs[:, VOCAB["z"]] += 1.0 - probs.sum(dim=1)  # every row a proper distribution
    table = probs.log().clamp_min(-1e4).float()
    return lambda tokens: table[tokens]


# ctx "a"; ending sums 2, 4, 6, 5 and means 2, 1, 3, 5 -> acc picks 0, acc_norm picks 1
TOY_ENDINGS = ["b", "c d d d", "e f", "g"]


def test_score_batch_hand_computed():
    ex = {"ctx": "a", "endings": TOY_ENDINGS, "label": 1}
    tokens, mask, _ = render_example(ex, word_encode)
    assert tokens.tolist() == [[1, 2, 0, 0, 0], [1, 3, 4, 4, 4], [1, 5, 6, 0, 0], [1, 7, 0, 0, 0]]
    logits_fn = bigram_logits_fn()
    total, mean = hs.ending_losses(logits_fn, tokens, mask)
    assert total.tolist() == pytest.approx([2.0, 4.0, 6.0, 5.0], abs=1e-5)
    assert mean.tolist() == pytest.approx([2.0, 1.0, 3.0, 5.0], abs=1e-5)
    assert score_batch(logits_fn, tokens, mask) == (0, 1)
    # a (logits, loss) tuple such as gpt2x's GPT.forward returns is accepted as well
    assert score_batch(lambda t: (logits_fn(t), None), tokens, mask) == (0, 1)


def test_evaluate_hand_computed(tmp_path):
    rows = [
        {"ctx": "a", "endings": TOY_ENDINGS, "label": 1},  # acc wrong, acc_norm right
        {"ctx": "a", "endings": TOY_ENDINGS[::-1], "label": 2},  # mean-best "c d d d" -> right
        {"ctx": "a", "endings": TOY_ENDINGS, "label": 0},  # acc right, acc_norm wrong
    ]
    path = write_jsonl(tmp_path / "toy.jsonl", rows)
    res = evaluate_hellaswag(bigram_logits_fn(), word_encode, path)
    assert (res["n"], res["correct"], res["correct_norm"]) == (3, 1, 2)
    assert res["acc"] == pytest.approx(1 / 3) and res["acc_norm"] == pytest.approx(2 / 3)
    assert (res["rank_n"], res["rank_correct"], res["rank_correct_norm"]) == (3, 1, 2)
    # autocast context and fixed-width padding do not change the result
    res2 = evaluate_hellaswag(
        bigram_logits_fn(),
        word_encode,
        path,
        autocast_ctx=torch.autocast("cpu", dtype=torch.bfloat16, enabled=False),
        max_len=16,
        pad_to_max_len=True,
    )
    assert (res2["correct"], res2["correct_norm"], res2["n"]) == (1, 2, 3)


# ------------------------------------------------------------------------------- real tiny model


@pytest.fixture(scope="module")
def tiny_gpt2():
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(
        vocab_size=257,
        n_positions=256,
        n_embd=32,
        n_layer=2,
        n_head=2,
        bos_token_id=1,
        eos_token_id=1,
    )
    return GPT2LMHeadModel(cfg).eval()


def reference_predictions(model, examples, max_len=None):
    """Straightforward loop: one unpadded forward per (example, ending)."""
    preds = []
    for ex in examples:
        ctx = byte_encode(ex["ctx"])
        sums, means = [], []
        for ending in ex["endings"]:
            end = byte_encode(" " + ending)
            ids = ctx + end
            n_end = len(end)
            if max_len is not None and len(ids) > max_len:
                ids = ids[-max_len:]
                n_end = min(n_end, max_len - 1)
            x = torch.tensor([ids])
            with torch.no_grad():
                logits = model(x).logits[0]
            losses = F.cross_entropy(logits[-n_end - 1 : -1], x[0, -n_end:], reduction="none")
            sums.append(losses.sum().item())
            means.append(losses.mean().item())
        preds.append((min(range(4), key=sums.__getitem__), min(range(4), key=means.__getitem__)))
    return preds


@pytest.mark.parametrize("max_len", [None, 60])
def test_tiny_gpt2_matches_reference_loop(tiny_gpt2, max_len):
    examples = load_examples(TINY)
    if max_len is not None:  # make sure truncation is really exercised
        assert any(len(byte_encode(ex["ctx"])) > max_len for ex in examples)
    ref = reference_predictions(tiny_gpt2, examples, max_len=max_len)

    def logits_fn(t):
        return tiny_gpt2(t).logits

    for ex, want in zip(examples, ref):
        tokens, mask, _ = render_example(ex, byte_encode, max_len=max_len)
        assert score_batch(logits_fn, tokens, mask) == want
    res = evaluate_hellaswag(logits_fn, byte_encode, TINY, max_len=max_len)
    labels = [ex["label"] for ex in examples]
    assert res["n"] == 6
    assert res["correct"] == sum(p == y for (p, _), y in zip(ref, labels))
    assert res["correct_norm"] == sum(p == y for (_, p), y in zip(ref, labels))
    assert res["acc"] == res["correct"] / 6 and res["acc_norm"] == res["correct_norm"] / 6


def test_rank_split_counts_sum_to_single_process(tiny_gpt2):
    def logits_fn(t):
        return tiny_gpt2(t).logits

    full = evaluate_hellaswag(logits_fn, byte_encode, TINY)
    seen: list[list[list[int]]] = [[], []]
    parts = [
        evaluate_hellaswag(
            # the first 8 tokens of each example's first row (every 4th row)
            lambda t, r=r: seen[r].extend(t[::4, :8].tolist()) or logits_fn(t),
            byte_encode,
            TINY,
            rank=r,
            world_size=2,
        )
        for r in (0, 1)
    ]
    assert [p["rank_n"] for p in parts] == [3, 3]
    for key in ("correct", "correct_norm", "n"):
        assert sum(p[f"rank_{key}"] for p in parts) == full[key]
        assert sum(p[key] for p in parts) == full[key]  # no process group: global == local
    # rank r got examples r, r+2, r+4 (in length order): every example was scored exactly once
    firsts = [byte_encode(ex["ctx"])[:8] for ex in load_examples(TINY)]
    assert sorted(seen[0]) == sorted(firsts[i] for i in (0, 2, 4))
    assert sorted(seen[1]) == sorted(firsts[i] for i in (1, 3, 5))
    with pytest.raises(ValueError, match="rank"):
        evaluate_hellaswag(logits_fn, byte_encode, TINY, rank=2, world_size=2)


def _distributed_worker(rank, world_size, init_file, out_dir, limit):
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    try:
        calls = []
        table = torch.randn(257, 257, generator=torch.Generator().manual_seed(1))

        def logits_fn(t):
            calls.append(t.shape[0])
            return table[t]

        res = evaluate_hellaswag(
            logits_fn,
            byte_encode,
            TINY,
            limit=limit,
            rank=rank,
            world_size=world_size,
            examples_per_batch=2,
        )
        res["forward_calls"] = len(calls)
        Path(out_dir, f"rank{rank}.json").write_text(json.dumps(res))
    finally:
        dist.destroy_process_group()


@pytest.mark.distributed
def test_all_reduce_across_two_gloo_processes(tmp_path):
    import torch.multiprocessing as mp

    # rank 0 scores 3 examples in 2 batches of 2, rank 1 scores 2 in one batch and then runs an
    # uncounted all-padding batch so both run 2 forwards
    limit = 5
    mp.spawn(
        _distributed_worker,
        args=(2, str(tmp_path / "init"), str(tmp_path), limit),
        nprocs=2,
        join=True,
    )
    table = torch.randn(257, 257, generator=torch.Generator().manual_seed(1))
    single = evaluate_hellaswag(lambda t: table[t], byte_encode, TINY, limit=limit)
    results = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert [r["rank_n"] for r in results] == [3, 2]
    assert [r["forward_calls"] for r in results] == [2, 2]
    for r in results:  # every rank returns the global numbers
        for key in ("n", "correct", "correct_norm", "acc", "acc_norm"):
            assert r[key] == single[key]
    assert sum(r["rank_correct"] for r in results) == single["correct"]


# ------------------------------------------------------------------------------- batched vs reference

MAX_LEN = 128  # the tiny GPT's block size


@pytest.fixture(scope="module")
def tiny_gpt():
    from gpt2x.model import GPT, GPTConfig

    torch.manual_seed(0)
    cfg = GPTConfig(block_size=MAX_LEN, vocab_size=257, n_layer=2, n_head=2, n_embd=32)
    return GPT(cfg).to("cpu").eval()


def gpt_logits_fn(model):
    return lambda t: model(t)  # (logits, None): the tuple form evaluate_hellaswag accepts


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory) -> Path:
    """41 examples of varied lengths (byte tokens): short rows, rows just over MAX_LEN, long
    contexts, and one ending longer than MAX_LEN by itself (cut from the left too)."""
    gen = torch.Generator().manual_seed(3)
    words = ["the", "a", "man", "woman", "dog", "runs", "jumps", "over", "into", "slowly"]

    def text(n_words: int) -> str:
        return " ".join(words[i] for i in torch.randint(len(words), (n_words,), generator=gen))

    rows = []
    for i in range(41):
        short = i % 3 == 0  # 14 short examples: rows under 64 bytes
        n_ctx = int(torch.randint(1, 4 if short else 60, (1,), generator=gen))
        n_end = 4 if short else 15
        endings: list[str] = []
        while len(endings) < 4:  # distinct endings: identical rows would tie exactly
            ending = text(int(torch.randint(1, n_end, (1,), generator=gen)))
            endings += [ending] if ending not in endings else []
        if i == 7:
            endings[2] = text(40)  # ~200 bytes > MAX_LEN
        label = int(torch.randint(4, (1,), generator=gen))
        rows.append({"ind": i, "ctx": text(n_ctx), "endings": endings, "label": label})
    path = write_jsonl(tmp_path_factory.mktemp("synthetic") / "synthetic.jsonl", rows)
    widths = [render_example(ex, byte_encode)[0].size(1) for ex in rows]
    assert min(widths) < 64 and max(widths) > 2 * MAX_LEN  # lengths really vary
    assert len(byte_encode(" " + rows[7]["endings"][2])) > MAX_LEN
    return path


def reference_preds(logits_fn, examples, max_len):
    """One example (4 rows) per forward: render_example + score_batch, the reference path.
    Also asserts no near-tie, so that exact equality of predictions is a fair test."""
    preds = []
    for ex in examples:
        tokens, mask, _ = render_example(ex, byte_encode, max_len=max_len)
        total, mean = hs.ending_losses(logits_fn, tokens, mask)
        for loss in (total, mean):
            best2 = loss.sort().values[:2]
            assert float(best2[1] - best2[0]) > 1e-4
        preds.append(score_batch(logits_fn, tokens, mask))
    return preds


def batched_preds(
    logits_fn, examples, examples_per_batch, max_len, pad_to_max_len, logits_at=None
):
    preds: dict[int, tuple[int, int]] = {}
    batches = hs.make_batches(examples, byte_encode, examples_per_batch, max_len, pad_to_max_len)
    for batch in batches:
        pred, pred_norm = hs.batch_predictions(logits_fn, batch, "cpu", logits_at)
        for j, i in enumerate(batch.index.tolist()):
            if i >= 0:
                assert i not in preds
                preds[i] = (int(pred[j]), int(pred_norm[j]))
    return [preds[i] for i in range(len(examples))]


def label_counts(preds, examples) -> tuple[int, int]:
    labels = [ex["label"] for ex in examples]
    return (
        sum(p == y for (p, _), y in zip(preds, labels)),
        sum(q == y for (_, q), y in zip(preds, labels)),
    )


@pytest.mark.parametrize("which", ["tiny", "synthetic"])
def test_batched_equals_one_at_a_time(tiny_gpt, synthetic_file, which):
    path = TINY if which == "tiny" else synthetic_file
    examples = load_examples(path)
    logits_fn = gpt_logits_fn(tiny_gpt)
    ref = reference_preds(logits_fn, examples, MAX_LEN)
    for per_batch in (1, 5, 16):
        for pad in (False, True):
            got = batched_preds(logits_fn, examples, per_batch, MAX_LEN, pad)
            assert got == ref, (per_batch, pad)
            # the LM head at the endings only (GPT.logits_at): the same predictions
            at = batched_preds(None, examples, per_batch, MAX_LEN, pad, tiny_gpt.logits_at)
            assert at == ref, ("logits_at", per_batch, pad)
    correct, correct_norm = label_counts(ref, examples)
    for per_batch, pad in ((16, False), (3, True)):
        res = evaluate_hellaswag(
            logits_fn,
            byte_encode,
            path,
            device="cpu",
            max_len=MAX_LEN,
            pad_to_max_len=pad,
            examples_per_batch=per_batch,
        )
        assert (res["n"], res["correct"], res["correct_norm"]) == (
            len(examples),
            correct,
            correct_norm,
        )
        assert res["acc"] == correct / len(examples)
        assert res["acc_norm"] == correct_norm / len(examples)


def test_right_padding_and_other_rows_leave_logits_unchanged(tiny_gpt):
    row = torch.tensor([byte_encode("A man clips a leash onto a small brown dog.")])
    alone = tiny_gpt(row)[0]
    n = row.size(1)
    padded = F.pad(row, (0, MAX_LEN - n), value=hs.PAD_TOKEN)
    batch = torch.cat([torch.randint(1, 257, (1, MAX_LEN)), padded, torch.zeros_like(padded)])
    torch.testing.assert_close(tiny_gpt(batch)[0][1:2, :n], alone, rtol=1e-5, atol=1e-5)
    # left padding would not be safe: the positions shift
    left = F.pad(row, (MAX_LEN - n, 0), value=hs.PAD_TOKEN)
    assert not torch.allclose(tiny_gpt(left)[0][:, -n:], alone, atol=1e-3)


def test_bucket_width():
    assert [hs.bucket_width(w) for w in (1, 64, 65, 200)] == [64, 64, 128, 256]
    assert [hs.bucket_width(w, max_len=100) for w in (1, 64, 65, 100)] == [64, 64, 100, 100]
    assert hs.bucket_width(3, max_len=100, pad_to_max_len=True) == 100
    with pytest.raises(ValueError, match="needs max_len"):
        hs.bucket_width(3, pad_to_max_len=True)


@pytest.mark.parametrize("pad", [False, True])
def test_fixed_shapes_and_padding_examples(synthetic_file, pad):
    examples = load_examples(synthetic_file)
    table = torch.randn(257, 257, generator=torch.Generator().manual_seed(1))
    shapes = []

    def logits_fn(t):
        shapes.append(tuple(t.shape))
        return table[t]

    res = evaluate_hellaswag(
        logits_fn,
        byte_encode,
        synthetic_file,
        max_len=MAX_LEN,
        pad_to_max_len=pad,
        examples_per_batch=8,
    )
    assert res["n"] == 41
    assert len(shapes) == math.ceil(41 / 8)
    assert {b for b, _ in shapes} == {32}  # fixed batch dimension, 8 examples x 4 endings
    widths = [w for _, w in shapes]
    assert set(widths) == ({MAX_LEN} if pad else {64, MAX_LEN})
    assert widths == sorted(widths, reverse=True)  # longest first
    batches = hs.make_batches(examples, byte_encode, 8, MAX_LEN, pad)
    last = batches[-1]
    assert last.labels.tolist()[1:] == [-1] * 7 and last.index.tolist()[1:] == [-1] * 7
    assert not last.tokens[4:].any() and not last.mask[4:].any()  # padding rows: token 0, mask 0
    assert sorted(i for b in batches for i in b.index.tolist() if i >= 0) == list(range(41))
    with pytest.raises(ValueError, match="examples_per_batch"):
        evaluate_hellaswag(logits_fn, byte_encode, synthetic_file, examples_per_batch=0)


def test_two_ranks_in_one_process_equal_forwards_and_counts(tiny_gpt, synthetic_file):
    logits_fn = gpt_logits_fn(tiny_gpt)
    kw = dict(limit=9, device="cpu", max_len=MAX_LEN, examples_per_batch=4)
    single = evaluate_hellaswag(logits_fn, byte_encode, synthetic_file, **kw)
    calls: list[list[torch.Tensor]] = [[], []]
    progress: list[list[tuple[int, int]]] = [[], []]
    parts = []
    for r in (0, 1):
        parts.append(
            evaluate_hellaswag(
                lambda t, r=r: calls[r].append(t) or logits_fn(t),
                byte_encode,
                synthetic_file,
                rank=r,
                world_size=2,
                progress=lambda done, total, r=r: progress[r].append((done, total)),
                **kw,
            )
        )
    # 9 examples: rank 0 gets 5 (batches of 4 + 1), rank 1 gets 4 (one batch + one padding batch)
    assert [p["rank_n"] for p in parts] == [5, 4]
    assert [len(c) for c in calls] == [2, 2]
    assert not calls[1][1].any()  # rank 1's second forward is all padding
    assert progress == [[(4, 5), (5, 5)], [(4, 4), (4, 4)]]
    for key in ("n", "correct", "correct_norm"):
        assert sum(p[f"rank_{key}"] for p in parts) == single[key]


# ------------------------------------------------------------------------------- download


class FakeResponse(io.BytesIO):
    def __init__(self, data: bytes, fail_after: int | None = None):
        super().__init__(data)
        self.fail_after = fail_after

    def read(self, n=-1):
        if self.fail_after is not None and self.tell() >= self.fail_after:
            raise ConnectionResetError("connection reset by peer")
        return super().read(self.fail_after if self.fail_after is not None else n)


def test_offline_download_names_the_fix(tmp_path, monkeypatch):
    def offline(url, timeout=None):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    with pytest.raises(HellaSwagError) as info:
        hellaswag_path("val", cache_dir=tmp_path)
    msg = str(info.value)
    assert "\n" not in msg
    assert msg.startswith(f"could not download {hs.HELLASWAG_URLS['val']}")
    assert f"put hellaswag_val.jsonl at {tmp_path / 'hellaswag_val.jsonl'}" in msg
    assert "path=" in msg
    assert os.listdir(tmp_path) == []  # no partial/temporary file left behind


def test_download_is_cached_atomically_and_reused(tmp_path, monkeypatch):
    payload = TINY.read_bytes()
    calls = []

    def serve(url, timeout=None):
        calls.append(url)
        return FakeResponse(payload)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    monkeypatch.setenv(hs.CACHE_ENV_VAR, str(tmp_path / "env_cache"))
    path = hellaswag_path("val")  # cache dir from the environment variable
    assert path == tmp_path / "env_cache" / "hellaswag_val.jsonl"
    assert path.read_bytes() == payload
    assert os.listdir(path.parent) == ["hellaswag_val.jsonl"]  # the tmp file was renamed
    assert calls == [hs.HELLASWAG_URLS["val"]]
    assert hellaswag_path("val") == path  # second call: served from the cache
    assert calls == [hs.HELLASWAG_URLS["val"]]
    assert len(load_examples(path)) == 6
    # an explicit url/cache_dir
    other = hellaswag_path("train", cache_dir=tmp_path / "c", url="https://example.org/x.jsonl")
    assert other.name == "hellaswag_train.jsonl" and calls[-1] == "https://example.org/x.jsonl"


def test_interrupted_download_leaves_nothing(tmp_path, monkeypatch):
    payload = TINY.read_bytes()
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(payload, fail_after=100)
    )
    with pytest.raises(HellaSwagError, match="could not download .*ConnectionResetError"):
        hellaswag_path("val", cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []
    # a non-jsonl answer (e.g. an HTML error page) is not cached either
    monkeypatch.setattr(
        urllib.request, "urlopen", lambda url, timeout=None: FakeResponse(b"<html>proxy</html>")
    )
    with pytest.raises(HellaSwagError, match="does not look like jsonl"):
        hellaswag_path("val", cache_dir=tmp_path)
    assert os.listdir(tmp_path) == []


def test_unknown_split(tmp_path):
    with pytest.raises(HellaSwagError, match="unknown HellaSwag split"):
        hellaswag_path("dev", cache_dir=tmp_path)


# ------------------------------------------------------------------------------- malformed files


def test_malformed_files_name_file_and_line(tmp_path):
    good = TINY.read_text().splitlines()
    bad_json = tmp_path / "bad_json.jsonl"
    bad_json.write_text("\n".join(good[:2] + ['{"ctx": "x", "endings": [', *good[2:]]) + "\n")
    with pytest.raises(HellaSwagError, match=f"{bad_json}:3: malformed JSON"):
        load_examples(bad_json)
    assert len(load_examples(bad_json, limit=2)) == 2  # lines past the limit are not read

    base = json.loads(good[0])
    cases = {
        "missing key\\(s\\) \\['label'\\]": {k: v for k, v in base.items() if k != "label"},
        "'endings' must be a list of 4": {**base, "endings": base["endings"][:3]},
        "'label' must be an int in 0..3": {**base, "label": 4},
        "'ctx' must be a string": {**base, "ctx": None},
    }
    for i, (pattern, row) in enumerate(cases.items()):
        path = tmp_path / f"bad{i}.jsonl"
        path.write_text(good[0] + "\n\n" + json.dumps(row) + "\n")  # blank line 2 is skipped
        with pytest.raises(HellaSwagError, match=f"{path}:3: {pattern}"):
            load_examples(path)
    with pytest.raises(HellaSwagError, match="does not exist"):
        load_examples(tmp_path / "nope.jsonl")


# ------------------------------------------------------------------------------- CLI


def test_evaluate_scores_a_local_hf_model_like_the_reference(tmp_path):
    """`python -m gpt2x.evaluate hf_model=<folder>`: the published baselines' path, on a local
    Hugging Face folder (the Hub is unreachable here): the same accuracies as HF's own logits
    scored one example at a time."""
    from conftest import run_cli
    from transformers import GPT2Config, GPT2LMHeadModel

    enc = gpt2_encoding()
    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=50257, n_positions=128, n_embd=16, n_layer=1, n_head=2)
    model = GPT2LMHeadModel(cfg).eval()
    model.save_pretrained(tmp_path / "model")
    proc = run_cli(
        "gpt2x.evaluate",
        f"hf_model={tmp_path / 'model'}",
        "val=false",
        "hellaswag=true",
        f"hellaswag_path={TINY}",
        "device=cpu",
        cwd=tmp_path,
    )
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    correct = correct_norm = 0
    for ex in load_examples(TINY):
        tokens, mask, label = render_example(ex, enc.encode_ordinary, max_len=128)
        pred, pred_norm = score_batch(lambda t: model(t).logits, tokens, mask)
        correct += pred == label
        correct_norm += pred_norm == label
    assert got["hellaswag_n"] == 6
    assert got["hellaswag_acc"] == pytest.approx(correct / 6)
    assert got["hellaswag_acc_norm"] == pytest.approx(correct_norm / 6)
    missing = run_cli(
        "gpt2x.evaluate", "hf_model=/nonexistent/gpt2", "val=false", cwd=tmp_path, check=False
    )
    assert missing.returncode == 2 and "hf_model=/path/to/gpt2" in missing.stderr
