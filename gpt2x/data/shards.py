"""Token shards: a corpus tokenized once into uint16 shards, and the manifest that vouches for them.

A prepared corpus is a folder (`data.dir`) holding `manifest.json` and `*.bin` shards of raw
little-endian uint16 GPT-2 tokens; every document is preceded by <|endoftext|> (50256). The
first shard(s) are the validation split, the rest the training split. The manifest is written
last, atomically, so a folder without a valid manifest is simply "not prepared"; an interrupted
preparation resumes from `progress.json`, which records each finished shard and where in the
source (document index, token offset) the next shard starts. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import multiprocessing
import os
import signal
import sys
import time
from collections import deque
from collections.abc import Iterable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import numpy as np

from gpt2x.data.sources import (
    BIG_CORPORA,
    SMALL_CORPORA,
    DataError,
    Source,
    config_get,
    data_dir_of,
    looks_local,
    open_source,
    preparation_version,
    sha256_file,
)
from gpt2x.data.tokenizer import EOT, N_VOCAB, encode_documents, get_tokenizer
from gpt2x.data.tokenizer import NAME as TOKENIZER_NAME
from gpt2x.record.folder import atomic_write_bytes, fsync_dir

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
# with data.val_tokens=0 the val split is val_fraction of the corpus, decided before anything is
# written: corpora up to this many tokens get the exact fraction; a longer (streamed) corpus gets
# val_fraction of its first LOOKAHEAD_TOKENS tokens (set data.val_tokens for those)
LOOKAHEAD_TOKENS = 1 << 25
CHUNK_CHARS = 1 << 19  # characters per tokenization task sent to a worker
CHUNK_DOCS = 1024


def _write_json_atomic(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1) + "\n").encode())


@contextlib.contextmanager
def _locked(d: Path) -> Iterator[None]:
    """Exclusive lock on the data folder: concurrent preparers (ranks, runs) take turns."""
    try:
        import fcntl
    except ImportError:  # Windows: no locking
        yield
        return
    with open(d / ".lock", "a+b") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def _identity(data_cfg: Any) -> dict:
    """The settings that determine a prepared folder's content (compared with its manifest)."""
    name = config_get(data_cfg, "name", "")
    ident: dict[str, Any] = {"name": name}
    if preparation_version(name) != 1:  # absent at 1: older manifests still match
        ident["preparation"] = preparation_version(name)
    if name in ("text", "tinyshakespeare") + BIG_CORPORA:
        ident["source"] = str(config_get(data_cfg, "source", ""))
    if name in BIG_CORPORA:
        ident["text_field"] = str(config_get(data_cfg, "text_field", "text"))
        if not looks_local(ident["source"]):
            ident["hf_config"] = str(config_get(data_cfg, "hf_config", ""))
            ident["hf_split"] = str(config_get(data_cfg, "hf_split", "train"))
            ident["hf_revision"] = str(config_get(data_cfg, "hf_revision", ""))
    ident["shard_tokens"] = int(config_get(data_cfg, "shard_tokens", 100_000_000))
    ident["val_tokens"] = int(config_get(data_cfg, "val_tokens", 0))
    if ident["val_tokens"] <= 0:
        ident["val_fraction"] = float(config_get(data_cfg, "val_fraction", 0.1))
    return ident


# ----------------------------------------------------------------------------- tokenization


def _chunks(docs: Iterable[str]) -> Iterator[list[str]]:
    chunk: list[str] = []
    chars = 0
    for text in docs:
        chunk.append(text)
        chars += len(text)
        if chars >= CHUNK_CHARS or len(chunk) >= CHUNK_DOCS:
            yield chunk
            chunk, chars = [], 0
    if chunk:
        yield chunk


def _worker_init() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the parent handles Ctrl-C
    get_tokenizer()


def _tokenize(
    chunks: Iterator[list[str]], num_workers: int
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(tokens, per-document lengths) for each chunk, in order; `num_workers` processes
    (1: in this process). At most 2 tasks per worker are in flight (bounded memory)."""
    if num_workers <= 1:
        for chunk in chunks:
            yield encode_documents(chunk)
        return
    get_tokenizer()  # built once here; forked workers inherit it
    method = "fork" if "fork" in multiprocessing.get_all_start_methods() else "spawn"
    pool = multiprocessing.get_context(method).Pool(num_workers, initializer=_worker_init)
    try:
        pending: deque = deque()
        for chunk in chunks:
            pending.append(pool.apply_async(encode_documents, (chunk,)))
            if len(pending) >= 2 * num_workers:
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()
        pool.close()
    finally:
        pool.terminate()
        pool.join()


# ----------------------------------------------------------------------------- writing


def _shard_name(index: int, split: str) -> str:
    return f"{split}_{index:06d}.bin"


def _publish_shard(f: io.BufferedWriter, tmp: Path, final: Path) -> None:
    """Make a finished shard durable and visible under its final name."""
    f.flush()
    os.fsync(f.fileno())
    f.close()
    os.replace(tmp, final)
    fsync_dir(final.parent)


class _ShardWriter:
    """Appends tokens to shards of `shard_tokens` (val first), committing each full shard."""

    def __init__(self, d: Path, shard_tokens: int, val_count: int, progress: dict):
        self.d = d
        self.shard_tokens = shard_tokens
        self.val_count = val_count
        self.progress = progress  # saved to progress.json after every committed shard
        done = progress["shards"]
        self.index = len(done)
        self.val_written = sum(s["tokens"] for s in done if s["split"] == "val")
        self.written = sum(s["tokens"] for s in done)
        self._file: io.BufferedWriter | None = None
        self._hash = hashlib.sha256()
        self._n = 0  # tokens in the open shard

    def _target(self) -> tuple[str, int]:
        if self.val_written < self.val_count:
            return "val", min(self.shard_tokens, self.val_count - self.val_written)
        return "train", self.shard_tokens

    def room(self) -> int:
        return self._target()[1] - self._n

    def append(self, tokens: np.ndarray) -> None:
        if self._file is None:
            split, _ = self._target()
            self._tmp = self.d / (_shard_name(self.index, split) + ".tmp")
            self._file = open(self._tmp, "wb")  # noqa: SIM115 - closed in commit()
        data = tokens.astype("<u2", copy=False).tobytes()
        self._file.write(data)
        self._hash.update(data)
        self._n += len(tokens)

    def commit(self, next_doc: int, next_offset: int) -> None:
        """The open shard is complete: publish it, then record it (and where the source
        continues) in progress.json."""
        if self._file is None or self._n == 0:
            return
        split, _ = self._target()
        final = self.d / _shard_name(self.index, split)
        _publish_shard(self._file, self._tmp, final)
        entry = {
            "file": final.name,
            "split": split,
            "tokens": self._n,
            "sha256": self._hash.hexdigest(),
            "next_doc": next_doc,
            "next_offset": next_offset,
        }
        self.progress["shards"].append(entry)
        _write_json_atomic(self.d / PROGRESS, self.progress)
        if split == "val":
            self.val_written += self._n
        self.written += self._n
        self.index += 1
        self._file, self._hash, self._n = None, hashlib.sha256(), 0

    def abort(self) -> None:
        if self._file is not None:
            self._file.close()
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._file = None


def _load_progress(d: Path, ident: dict) -> dict | None:
    """The valid prefix of an interrupted preparation's progress, or None to start over."""
    path = d / PROGRESS
    if not path.is_file():
        return None
    try:
        progress = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if progress.get("format_version") != FORMAT_VERSION or progress.get("identity") != ident:
        return None
    good = []
    for s in progress.get("shards", []):
        f = d / s["file"]
        if not f.is_file() or f.stat().st_size != 2 * s["tokens"]:
            break
        good.append(s)
    progress["shards"] = good
    return progress


def _clean_stale(d: Path, keep: set[str]) -> None:
    """Remove shards and temp files that no finished-shard record vouches for."""
    for f in d.iterdir():
        name = f.name
        stale_shard = name.endswith(".bin") and name.startswith(("val_", "train_"))
        if (stale_shard and name not in keep) or name.endswith(".bin.tmp"):
            f.unlink()


def _locate(ends: np.ndarray, p: int, d0: int, o0: int) -> tuple[int, int]:
    """Source position (document, token offset) of token `p` of a chunk whose documents end
    at `ends` (chunk coordinates) and whose first document starts at offset `o0`."""
    k = int(np.searchsorted(ends, p, side="right"))
    if k == len(ends):
        return d0 + k, 0
    start = int(ends[k - 1]) if k else -o0
    return d0 + k, p - start


def _make_bar(total: int | None, initial: int, desc: str, enabled: bool | None):
    """A progress bar on stderr: documents (with ETA when their number is known), tokens.
    enabled=None: only on a terminal."""
    from tqdm.auto import tqdm

    tty = sys.stderr.isatty()
    return tqdm(
        total=total,
        initial=initial,
        desc=desc,
        unit="doc",
        dynamic_ncols=True,
        mininterval=0.5 if tty else 30.0,  # a log file gets a line every 30 s
        disable=not (tty if enabled is None else enabled),
    )


def _write_shards(
    d: Path, data_cfg: Any, source: Source, progress_bar: bool | None, workers: int
) -> dict:
    ident = _identity(data_cfg)
    shard_tokens = ident["shard_tokens"]
    if shard_tokens <= 0:
        raise DataError(f"data.shard_tokens={shard_tokens} must be positive")
    progress = _load_progress(d, ident)
    if progress is None:
        progress = {"format_version": FORMAT_VERSION, "identity": ident, "shards": []}
    _clean_stale(d, {s["file"] for s in progress["shards"]})
    done = progress["shards"]
    skip_docs, skip_tokens = (done[-1]["next_doc"], done[-1]["next_offset"]) if done else (0, 0)

    results = _tokenize(_chunks(source.documents(skip_docs)), workers)
    bar = _make_bar(source.num_documents, skip_docs, f"prepare {ident['name']}", progress_bar)
    t0 = time.perf_counter()
    stats = {"tokens": sum(s["tokens"] for s in done), "new_tokens": 0}

    def items() -> Iterator[tuple[np.ndarray, np.ndarray, int, int]]:
        """(tokens, lengths, first doc, its offset) in source order, resuming mid-document."""
        doc, offset = skip_docs, skip_tokens
        for tokens, lengths in results:
            if offset:
                tokens = tokens[offset:]
            yield tokens, lengths, doc, offset
            doc += len(lengths)
            offset = 0
            stats["tokens"] += len(tokens)
            stats["new_tokens"] += len(tokens)
            bar.update(len(lengths))
            rate = stats["new_tokens"] / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(
                f"{stats['tokens'] / 1e6:.1f}M tok, {rate / 1e6:.2f}M tok/s", refresh=False
            )

    stream = items()
    if "val_count" not in progress:
        val_tokens = ident["val_tokens"]
        buffered: list = []
        if val_tokens <= 0:  # val_fraction of the corpus: look ahead to learn its size
            n = 0
            for item in stream:
                buffered.append(item)
                n += len(item[0])
                if n >= max(LOOKAHEAD_TOKENS, shard_tokens):
                    n = max(LOOKAHEAD_TOKENS, shard_tokens)
                    break
            val_tokens = int(round(ident["val_fraction"] * n))
        progress["val_count"] = val_tokens
        stream = _chain(buffered, stream)

    writer = _ShardWriter(d, shard_tokens, progress["val_count"], progress)
    documents = skip_docs
    try:
        for tokens, lengths, d0, o0 in stream:
            ends = np.cumsum(lengths) - o0
            p = 0
            while p < len(tokens):
                take = min(writer.room(), len(tokens) - p)
                writer.append(tokens[p : p + take])
                p += take
                if writer.room() == 0:
                    writer.commit(*_locate(ends, p, d0, o0))
            documents = d0 + len(lengths)
        writer.commit(documents, 0)  # the last, partial shard
    finally:
        writer.abort()
        bar.close()
        results.close()  # stops the worker pool now, also after an error
    progress["documents"] = documents
    return progress


def _chain(first: list, rest: Iterator) -> Iterator:
    yield from first
    yield from rest


def _finish(d: Path, data_cfg: Any, source: Source, progress: dict) -> dict:
    shards = [{k: s[k] for k in ("file", "split", "tokens", "sha256")} for s in progress["shards"]]
    total = sum(s["tokens"] for s in shards)
    val = sum(s["tokens"] for s in shards if s["split"] == "val")
    where = source.description.get("url") or source.description.get("path") or "the source"
    if total == 0:
        raise DataError(
            f"data={progress['identity']['name']} ({where}) produced 0 tokens: empty corpus; "
            "check data.source"
            + (" and data.text_field" if "text_field" in progress["identity"] else "")
        )
    if total == val:
        raise DataError(
            f"all {total} tokens of {where} went to the val split; lower data.val_tokens or "
            "data.val_fraction"
        )
    manifest = {
        "format_version": FORMAT_VERSION,
        "tokenizer": {"name": TOKENIZER_NAME, "n_vocab": N_VOCAB, "eot": EOT},
        "dtype": "uint16",
        "source": source.description,
        "identity": progress["identity"],
        "shards": shards,
        "totals": {
            "tokens": total,
            "val_tokens": val,
            "train_tokens": total - val,
            "shards": len(shards),
            "documents": progress["documents"],
        },
        "created_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }
    _write_json_atomic(d / MANIFEST, manifest)  # last: from now on the folder is prepared
    with contextlib.suppress(OSError):
        (d / PROGRESS).unlink()
    return manifest


def _prepare(data_cfg: Any, progress: bool | None, workers: int) -> Path:
    d = data_dir_of(data_cfg)
    d.mkdir(parents=True, exist_ok=True)
    with _locked(d):
        if (d / MANIFEST).is_file():
            manifest = load_manifest(d, verify="none")
            if not _older_preparation(manifest, data_cfg):
                check_manifest_matches(manifest, data_cfg, d)
                return d
            name = manifest["identity"]["name"]
            print(
                f"gpt2x.data: {d} was prepared by an older version of data={name}'s "
                "preparation; preparing it again",
                file=sys.stderr,
                flush=True,
            )
            (d / MANIFEST).unlink()
            _clean_stale(d, keep=set())
        source = open_source(data_cfg, d)
        prog = _write_shards(d, data_cfg, source, progress, max(1, workers))
        _finish(d, data_cfg, source, prog)
    return d


def _older_preparation(manifest: dict, data_cfg: Any) -> bool:
    """A small corpus (cheap to prepare again) whose folder differs from the config only in
    the preparation's version (gpt2x.data.sources.PREPARATION)."""
    want, have = _identity(data_cfg), manifest.get("identity", {})
    if want.get("name") not in SMALL_CORPORA:
        return False

    def rest(ident: dict) -> dict:
        return {k: v for k, v in ident.items() if k != "preparation"}

    changed = have.get("preparation", 1) != want.get("preparation", 1)
    return changed and rest(have) == rest(want)


def prepare(data_cfg: Any, progress: bool = True) -> Path:
    """Prepare `data.dir` from `data.name`'s source unless already prepared (an interrupted
    preparation resumes), with `data.num_workers` tokenizer processes. Returns the folder.
    progress: show a progress bar on stderr (None: only on a terminal)."""
    return _prepare(data_cfg, progress, int(config_get(data_cfg, "num_workers", 1)))


# ----------------------------------------------------------------------------- validation


def load_manifest(data_dir: str | Path, verify: str = "size") -> dict:
    """Read and check a prepared folder's manifest; verify: none | size | sha256."""
    d = Path(data_dir)
    path = d / MANIFEST
    if not path.is_file():
        raise DataError(f"{d} is not prepared (no {MANIFEST})")
    try:
        m = json.loads(path.read_text())
        shards = m["shards"]
        totals = m["totals"]
        tok = m["tokenizer"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise DataError(f"{path} is unreadable ({e}); delete {d} and prepare again") from None
    if m.get("format_version") != FORMAT_VERSION:
        raise DataError(
            f"{path} has format_version {m.get('format_version')}, this code reads "
            f"{FORMAT_VERSION}; delete {d} and prepare again"
        )
    if (tok.get("name"), tok.get("n_vocab"), tok.get("eot")) != (TOKENIZER_NAME, N_VOCAB, EOT):
        raise DataError(
            f"{path} was tokenized with {tok}, not gpt2 (n_vocab {N_VOCAB}, eot {EOT}): "
            f"tokenizer mismatch; delete {d} and prepare again"
        )
    splits = [s["split"] for s in shards]
    if splits != sorted(splits, key=lambda s: s != "val") or not set(splits) <= {"val", "train"}:
        raise DataError(f"{path}: shards must be val shards followed by train shards")
    if sum(s["tokens"] for s in shards) != totals.get("tokens") or len(shards) != totals.get(
        "shards"
    ):
        raise DataError(f"{path}: totals do not match the shard list (manifest mismatch)")
    if verify not in ("none", "size", "sha256"):
        raise DataError(f"data.verify={verify!r} must be 'size' or 'sha256'")
    for s in shards:
        f = d / s["file"]
        if not f.is_file():
            raise DataError(
                f"shard {f} listed in {MANIFEST} is missing; delete {d} and prepare again"
            )
        if verify == "none":
            continue
        size = f.stat().st_size
        if size != 2 * s["tokens"]:
            raise DataError(
                f"shard {f} is truncated or corrupted: {size} bytes, expected {2 * s['tokens']} "
                f"({s['tokens']} tokens); delete {d} and prepare again"
            )
        if verify == "sha256" and sha256_file(f) != s["sha256"]:
            raise DataError(
                f"shard {f} is corrupted: sha256 differs from {MANIFEST}; delete {d} and "
                "prepare again"
            )
    return m


def check_manifest_matches(manifest: dict, data_cfg: Any, d: Path) -> None:
    want, have = _identity(data_cfg), manifest.get("identity", {})
    if want != have:
        diff = {k: (have.get(k), want.get(k)) for k in sorted(set(want) | set(have))}
        diff = {k: v for k, v in diff.items() if v[0] != v[1]}
        parts = ", ".join(f"{k}: prepared {a!r} != config {b!r}" for k, (a, b) in diff.items())
        raise DataError(
            f"{d / MANIFEST} does not match the data config ({parts}); set data.dir to another "
            f"folder or delete {d} to prepare again"
        )
    expected = str(config_get(data_cfg, "sha256", "")).lower()
    recorded = manifest.get("source", {}).get("sha256")
    if expected and recorded and expected != recorded:
        raise DataError(
            f"{d} was prepared from a file with sha256 {recorded}, but data.sha256={expected}; "
            f"delete {d} to prepare again"
        )


def ensure_prepared(data_cfg: Any) -> Path:
    """The prepared folder for `data`: small corpora are prepared on first use (in-process);
    big ones must have been prepared by `python -m gpt2x.prepare`. Validates the manifest
    (`data.verify`: size or sha256)."""
    name = config_get(data_cfg, "name", "")
    d = data_dir_of(data_cfg)
    if name in SMALL_CORPORA:
        if not (d / MANIFEST).is_file():
            print(f"gpt2x.data: preparing data={name} into {d}", file=sys.stderr, flush=True)
        _prepare(data_cfg, progress=None, workers=1)
    elif not (d / MANIFEST).is_file():
        src = config_get(data_cfg, "source", "")
        extra = f" data.source={src}" if name == "hf" else ""
        raise DataError(
            f"data.dir={d} is not prepared; run python -m gpt2x.prepare data={name}{extra} first"
        )
    m = load_manifest(d, verify=str(config_get(data_cfg, "verify", "size")))
    check_manifest_matches(m, data_cfg, d)
    return d


