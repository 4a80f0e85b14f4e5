"""The offline GPT-2 tokenizer equals tiktoken's own "gpt2" encoding."""

from __future__ import annotations

import hashlib
import shutil

import pytest
import tiktoken
import tiktoken.registry

from gpt2x.data.tokenizer import (
    ENCODER_JSON_URL,
    EOT,
    VOCAB_BPE_URL,
    bpe_files,
    encode_documents,
    get_tokenizer,
)

SAMPLE = [
    "Hello, world! The quick brown fox jumps over the lazy dog.",
    "Ünïcödé: naïve café, Straße, Ελληνικά, русский текст, 日本語のテキスト, 中文, 한국어, עברית, العربية",
    "emoji 😀🎉👩‍👩‍👧‍👦 🇫🇷 ❤️‍🔥 and symbols ™ © ½ → ∞",
    "whitespace:  two  spaces\ttab\n\nnewlines\r\n   \n\t\t trailing   ",
    "def f(x):\n    return {'a': [1, 2, 3], \"b\": x ** 2}  # comment\n\nif __name__ == '__main__':\n",
    "numbers 1234567890 3.14159 -42 1e-9 0xDEADBEEF, contractions: don't I'll we've they'RE",
    "<|endoftext|> written as text, and <|fim_prefix|> too",
    "",
    " " * 50 + "x" + "\n" * 20,
]


@pytest.fixture
def reference(tmp_path, monkeypatch):
    """tiktoken.get_encoding("gpt2") built from a cache pre-filled with the local files."""
    vocab_bpe, encoder_json = bpe_files()
    for url, path in [(VOCAB_BPE_URL, vocab_bpe), (ENCODER_JSON_URL, encoder_json)]:
        shutil.copyfile(path, tmp_path / hashlib.sha1(url.encode()).hexdigest())
    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path))

    read_file = tiktoken.load.read_file

    def no_network(path):  # a download attempt fails the test instead of hanging
        assert "://" not in path, f"tiktoken tried to download {path}"
        return read_file(path)

    monkeypatch.setattr(tiktoken.load, "read_file", no_network)
    monkeypatch.delitem(tiktoken.registry.ENCODINGS, "gpt2", raising=False)
    enc = tiktoken.get_encoding("gpt2")
    yield enc
    tiktoken.registry.ENCODINGS.pop("gpt2", None)  # don't leak the test's object


def test_identical_to_tiktoken(reference):
    enc = get_tokenizer()
    assert enc.n_vocab == reference.n_vocab == 50257
    assert enc.eot_token == reference.eot_token == EOT
    assert enc._pat_str == reference._pat_str
    assert enc._mergeable_ranks == reference._mergeable_ranks
    assert enc._special_tokens == reference._special_tokens
    for text in SAMPLE:
        assert enc.encode_ordinary(text) == reference.encode_ordinary(text), text
        assert enc.encode(text, disallowed_special=()) == reference.encode(
            text, disallowed_special=()
        )
    assert enc.encode_ordinary_batch(SAMPLE) == reference.encode_ordinary_batch(SAMPLE)


def test_round_trip_decode():
    enc = get_tokenizer()
    for text in SAMPLE:
        assert enc.decode(enc.encode_ordinary(text)) == text
    assert enc.decode_bytes(enc.encode_ordinary("\xff\x00")) == "\xff\x00".encode()


def test_special_tokens():
    enc = get_tokenizer()
    assert enc.encode("<|endoftext|>", allowed_special={"<|endoftext|>"}) == [EOT]
    assert enc.encode("a<|endoftext|>b", allowed_special="all") == [64, EOT, 65]
    with pytest.raises(ValueError):
        enc.encode("<|endoftext|>")  # disallowed by default, as in tiktoken
    assert EOT not in enc.encode_ordinary("<|endoftext|>")
    assert enc.decode([EOT]) == "<|endoftext|>"
    assert get_tokenizer() is enc  # cached


def test_encode_documents():
    enc = get_tokenizer()
    docs = ["first doc", "", "<|endoftext|> is text here"]
    tokens, lengths = encode_documents(docs)
    assert tokens.dtype.name == "uint16"
    assert lengths.tolist() == [
        1 + len(enc.encode_ordinary(docs[0])),
        0,  # an empty document adds nothing
        1 + len(enc.encode_ordinary(docs[2])),
    ]
    assert tokens[0] == EOT and tokens[lengths[0]] == EOT
    assert (tokens == EOT).sum() == 2
    assert enc.decode(tokens.tolist()) == "<|endoftext|>first doc<|endoftext|>" + docs[2]
