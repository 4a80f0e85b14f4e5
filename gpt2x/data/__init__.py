"""Data: corpus sources -> token shards (+ manifest) -> the loader. See docs/data.md.

    sources.py  where documents come from (`open_source`), the `DataError` every layer raises
    shards.py   tokenizing a source into shards, the manifest, `prepare` / `ensure_prepared`
    loader.py   `ShardLoader`: shuffled, rank-disjoint, resumable batches of token windows
"""

from gpt2x.data.loader import ShardLoader
from gpt2x.data.shards import (
    MANIFEST,
    PROGRESS,
    check_manifest_matches,
    ensure_prepared,
    load_manifest,
    prepare,
)
from gpt2x.data.sources import BIG_CORPORA, SMALL_CORPORA, DataError, open_source

__all__ = [
    "BIG_CORPORA",
    "MANIFEST",
    "PROGRESS",
    "SMALL_CORPORA",
    "DataError",
    "ShardLoader",
    "check_manifest_matches",
    "ensure_prepared",
    "load_manifest",
    "open_source",
    "prepare",
]
