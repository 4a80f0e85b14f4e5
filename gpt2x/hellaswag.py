"""HellaSwag evaluation (acc and acc_norm), scored the way GPT-2/GPT-3 style evals do it.

Each example is a context plus four candidate endings. Every ending is appended to the context,
the four rows are run through a causal language model, and the cross-entropy of the *ending*
tokens only is collected per row:

* ``acc``      -- predicted ending = the row with the lowest *total* ending loss;
* ``acc_norm`` -- predicted ending = the row with the lowest *mean* (per-token) ending loss.

The data is the official jsonl release (https://github.com/rowanz/hellaswag, ``data/``); one
line per example with at least ``ctx`` (str), ``endings`` (4 str) and ``label`` (int), plus
``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``split``, ``split_type``, ``source_id``.

This module depends on torch and the standard library only; the model is reached through a
``logits_fn`` callable and the tokenizer through an ``encode`` callable, so the trainer can pass
a lambda around its (possibly compiled / DDP / FSDP wrapped) GPT and its tiktoken encoding.

CLI, scoring a Hugging Face checkpoint with tiktoken's GPT-2 encoding::

    python -m gpt2x.hellaswag --hf-model gpt2 [--path FILE] [--limit N] [--device cpu]
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import tempfile
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

__all__ = [
    "HELLASWAG_URLS",
    "HellaSwagError",
    "default_cache_dir",
    "evaluate_hellaswag",
    "hellaswag_path",
    "load_examples",
    "render_example",
    "score_batch",
]

_BASE_URL = "https://raw.githubusercontent.com/rowanz/hellaswag/master/data"
HELLASWAG_URLS = {
    "val": f"{_BASE_URL}/hellaswag_val.jsonl",
    "train": f"{_BASE_URL}/hellaswag_train.jsonl",
    # the official test split ships without labels, so it cannot be scored here
    "test": f"{_BASE_URL}/hellaswag_test.jsonl",
}
CACHE_ENV_VAR = "GPT2X_HELLASWAG_DIR"
NUM_ENDINGS = 4
PAD_TOKEN = 0
_DOWNLOAD_TIMEOUT_S = 60

Encode = Callable[[str], Sequence[int]]
LogitsFn = Callable[[torch.Tensor], Any]


class HellaSwagError(RuntimeError):
    """Missing/undownloadable data or a malformed HellaSwag file; the message names the fix."""


# ----------------------------------------------------------------------------------------------
# data


def default_cache_dir() -> Path:
    """``$GPT2X_HELLASWAG_DIR`` if set, else ``~/.cache/gpt2x/hellaswag``."""
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "gpt2x" / "hellaswag"


def hellaswag_path(
    split: str = "val", cache_dir: str | os.PathLike | None = None, url: str | None = None
) -> Path:
    """Local path of ``hellaswag_<split>.jsonl``, downloading it once into the cache if needed.

    The download goes to a temporary file in the cache directory which is renamed into place
    only when complete, so an interrupted download never leaves a truncated file behind.
    Offline (or on any download failure) a one-line :class:`HellaSwagError` says where to put
    the file by hand.
    """
    if url is None:
        if split not in HELLASWAG_URLS:
            raise HellaSwagError(
                f"unknown HellaSwag split {split!r}; choose one of {sorted(HELLASWAG_URLS)}"
            )
        url = HELLASWAG_URLS[split]
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    target = cache / f"hellaswag_{split}.jsonl"
    if target.is_file() and target.stat().st_size > 0:
        return target

    fix = f"put {target.name} at {target} (or pass path=...)"
    tmp_name = None
    try:
        cache.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(
            "wb", dir=cache, prefix=f".{target.name}.", suffix=".tmp", delete=False
        ) as tmp:
            tmp_name = tmp.name
            # looked up at call time so tests (and users) can monkeypatch urllib.request.urlopen
            with urllib.request.urlopen(url, timeout=_DOWNLOAD_TIMEOUT_S) as resp:
                shutil.copyfileobj(resp, tmp)
        with open(tmp_name, "rb") as f:
            head = f.read(1)
        if head != b"{":
            raise HellaSwagError(
                f"downloaded {url} but it does not look like jsonl (starts with {head!r}); {fix}"
            )
        os.replace(tmp_name, target)
        tmp_name = None
    except HellaSwagError:
        raise
    except (urllib.error.URLError, OSError, ValueError) as e:
        reason = getattr(e, "reason", None) or e
        msg = " ".join(f"could not download {url} ({type(e).__name__}: {reason}); {fix}".split())
        raise HellaSwagError(msg) from e
    finally:
        if tmp_name is not None:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
    return target


def load_examples(path: str | os.PathLike, limit: int | None = None) -> list[dict]:
    """Parse a HellaSwag jsonl file (blank lines skipped); stop after ``limit`` examples.

    Every example must have ``ctx`` (str), ``endings`` (list of 4 str) and ``label``
    (int in 0..3); otherwise a :class:`HellaSwagError` names the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise HellaSwagError(
            f"HellaSwag file {path} does not exist; download it with "
            f"gpt2x.hellaswag.hellaswag_path('val') or from {HELLASWAG_URLS['val']}"
        )
    if limit is not None and limit < 0:
        raise HellaSwagError(f"limit must be >= 0 or None, got {limit}")
    examples: list[dict] = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                ex = json.loads(line)
            except json.JSONDecodeError as e:
                raise HellaSwagError(f"{where}: malformed JSON ({e})") from e
            _validate(ex, where)
            examples.append(ex)
    return examples


def _validate(ex: Any, where: str) -> None:
    if not isinstance(ex, dict):
        raise HellaSwagError(f"{where}: expected a JSON object, got {type(ex).__name__}")
    missing = [k for k in ("ctx", "endings", "label") if k not in ex]
    if missing:
        hint = " (the official test split has no labels)" if missing == ["label"] else ""
        raise HellaSwagError(f"{where}: missing key(s) {missing}{hint}")
    if not isinstance(ex["ctx"], str):
        raise HellaSwagError(f"{where}: 'ctx' must be a string")
    endings = ex["endings"]
    if (
        not isinstance(endings, list)
        or len(endings) != NUM_ENDINGS
        or not all(isinstance(e, str) for e in endings)
    ):
        raise HellaSwagError(f"{where}: 'endings' must be a list of {NUM_ENDINGS} strings")
    label = ex["label"]
    if isinstance(label, str) and label.strip().isdigit():  # HF mirrors store it as "3"
        label = int(label)
    if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < NUM_ENDINGS:
        raise HellaSwagError(f"{where}: 'label' must be an int in 0..{NUM_ENDINGS - 1}")
    ex["label"] = label


# ----------------------------------------------------------------------------------------------
# rendering and scoring


def render_example(
    example: dict, encode: Encode, max_len: int | None = None
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Tokenize one example into four rows ``context + ending``.

    Context tokens are ``encode(ctx)``; ending tokens are ``encode(" " + ending)`` (with the
    GPT-2 BPE the space between context and ending belongs to the ending's first token).
    Rows are right-padded with ``PAD_TOKEN`` (0) to the longest row; ``mask`` is 1 exactly on
    ending tokens. Returns ``(tokens (4, L) int64, mask (4, L) int64, label)``.

    With ``max_len`` (the model's block size) each row longer than ``max_len`` is cut from the
    left, i.e. the context loses its oldest tokens (done per row, like lm-eval-harness). Only in
    the degenerate case where an ending alone is ``>= max_len`` tokens, its first tokens are cut
    too, and the row's first kept token is unmasked since no position predicts it.
    """
    if max_len is not None and max_len < 2:
        raise HellaSwagError(f"max_len must be >= 2, got {max_len}")
    ctx_tokens = list(encode(example["ctx"]))
    if not ctx_tokens:
        raise HellaSwagError(f"example {example.get('ind', '?')}: context encodes to no tokens")
    rows: list[list[int]] = []
    masks: list[list[int]] = []
    for ending in example["endings"]:
        end_tokens = list(encode(" " + ending))
        if not end_tokens:
            raise HellaSwagError(f"example {example.get('ind', '?')}: empty ending {ending!r}")
        row = ctx_tokens + end_tokens
        row_mask = [0] * len(ctx_tokens) + [1] * len(end_tokens)
        if max_len is not None and len(row) > max_len:
            row, row_mask = row[-max_len:], row_mask[-max_len:]
            row_mask[0] = 0
        rows.append(row)
        masks.append(row_mask)
    width = max(len(r) for r in rows)
    tokens = torch.full((len(rows), width), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (row, row_mask) in enumerate(zip(rows, masks)):
        tokens[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        mask[i, : len(row_mask)] = torch.tensor(row_mask, dtype=torch.long)
    return tokens, mask, int(example["label"])


def _as_logits(out: Any) -> torch.Tensor:
    """Accept plain logits, a ``(logits, loss)`` tuple or an HF ``ModelOutput``."""
    if isinstance(out, torch.Tensor):
        return out
    if hasattr(out, "logits"):
        return out.logits
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], torch.Tensor):
        return out[0]
    raise TypeError(f"logits_fn must return a (N, L, V) tensor, got {type(out).__name__}")


@torch.no_grad()
def ending_losses(
    logits_fn: LogitsFn, tokens: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (sum, mean) cross-entropy over the masked (ending) tokens, in float32."""
    logits = _as_logits(logits_fn(tokens))
    n, length = tokens.shape
    if logits.shape[:2] != (n, length):
        raise ValueError(f"logits_fn returned shape {tuple(logits.shape)} for input {(n, length)}")
    # position t predicts token t+1
    pred_logits = logits[:, :-1, :].float()
    targets = tokens[:, 1:]
    m = mask[:, 1:].to(pred_logits.dtype)
    losses = F.cross_entropy(
        pred_logits.reshape(-1, pred_logits.size(-1)), targets.reshape(-1), reduction="none"
    ).view(n, length - 1)
    total = (losses * m).sum(dim=1)
    count = m.sum(dim=1)
    if bool((count == 0).any()):
        raise ValueError("a row has no scorable ending token (mask empty after position 0)")
    return total, total / count


@torch.no_grad()
def score_batch(logits_fn: LogitsFn, tokens: torch.Tensor, mask: torch.Tensor) -> tuple[int, int]:
    """Return ``(pred, pred_norm)``: argmin of the summed and of the mean ending loss.

    ``logits_fn(tokens)`` must map the ``(N, L)`` rows to ``(N, L, V)`` logits (a
    ``(logits, loss)`` tuple or an object with ``.logits`` is accepted too).
    """
    total, mean = ending_losses(logits_fn, tokens, mask)
    return int(total.argmin().item()), int(mean.argmin().item())


# ----------------------------------------------------------------------------------------------
# evaluation loop


def _dist_active(world_size: int) -> bool:
    import torch.distributed as dist

    return world_size > 1 and dist.is_available() and dist.is_initialized()


@torch.no_grad()
def evaluate_hellaswag(
    logits_fn: LogitsFn,
    encode: Encode,
    path: str | os.PathLike | None,
    limit: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    device: str | torch.device = "cpu",
    autocast_ctx: contextlib.AbstractContextManager | None = None,
    max_len: int | None = None,
    pad_to_max_len: bool = False,
    progress: Callable[[int, int], None] | None = None,
) -> dict:
    """Score HellaSwag; returns ``acc``, ``acc_norm`` and the counts behind them.

    * Example ``i`` is scored by the rank with ``i % world_size == rank``.
    * If ``torch.distributed`` is initialized and ``world_size > 1`` the counts are all-reduced
      (SUM), so every rank returns the global ``acc``/``acc_norm``/``n``/``correct``/
      ``correct_norm``. All ranks then also run the same number of forward passes (a rank with
      one example fewer runs an uncounted dummy forward), which FSDP's collectives need.
    * ``rank_n``, ``rank_correct``, ``rank_correct_norm`` are always this rank's own share.
    * ``path=None`` means the cached/downloaded validation split (:func:`hellaswag_path`).
    * ``max_len`` (the model's block size) left-truncates long contexts; ``pad_to_max_len``
      pads every batch to exactly ``max_len`` columns (one static shape for compiled models).
    * ``autocast_ctx`` (e.g. ``torch.autocast("cuda", torch.bfloat16)``) is entered once around
      the forward passes; losses are computed in float32 regardless.
    * The caller puts the model in eval mode; ``acc`` is NaN when ``n == 0``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if pad_to_max_len and max_len is None:
        raise ValueError("pad_to_max_len=True needs max_len")
    if path is None:
        path = hellaswag_path("val")
    examples = load_examples(path, limit=limit)
    distributed = _dist_active(world_size)
    n_total = len(examples)
    steps = math.ceil(n_total / world_size)
    rank_steps = len(range(rank, n_total, world_size))

    def prepare(ex: dict) -> tuple[torch.Tensor, torch.Tensor, int]:
        tokens, mask, label = render_example(ex, encode, max_len=max_len)
        if pad_to_max_len and tokens.size(1) < max_len:
            pad = max_len - tokens.size(1)
            tokens = F.pad(tokens, (0, pad), value=PAD_TOKEN)
            mask = F.pad(mask, (0, pad), value=0)
        return tokens.to(device), mask.to(device), label

    correct = correct_norm = n = 0
    ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    with ctx:
        for step in range(steps):
            i = step * world_size + rank
            if i >= n_total:
                if distributed:  # keep forward counts equal across ranks (FSDP collectives)
                    tokens, _, _ = prepare(examples[0])
                    logits_fn(tokens)
                continue
            tokens, mask, label = prepare(examples[i])
            pred, pred_norm = score_batch(logits_fn, tokens, mask)
            correct += int(pred == label)
            correct_norm += int(pred_norm == label)
            n += 1
            if progress is not None:
                progress(n, rank_steps)

    result = {"rank_n": n, "rank_correct": correct, "rank_correct_norm": correct_norm}
    if distributed:
        import torch.distributed as dist

        counts = torch.tensor([correct, correct_norm, n], dtype=torch.long, device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.SUM)
        correct, correct_norm, n = (int(c) for c in counts.tolist())
    result.update(
        acc=correct / n if n else float("nan"),
        acc_norm=correct_norm / n if n else float("nan"),
        n=n,
        correct=correct,
        correct_norm=correct_norm,
    )
    return result


# ----------------------------------------------------------------------------------------------
# CLI


def main(argv: Sequence[str] | None = None) -> dict:
    import argparse
    import sys
    import time

    p = argparse.ArgumentParser(
        prog="python -m gpt2x.hellaswag",
        description="Score a Hugging Face GPT2LMHeadModel on HellaSwag (acc, acc_norm).",
    )
    p.add_argument("--hf-model", required=True, help="hub name (e.g. gpt2) or local directory")
    p.add_argument("--path", default=None, help="hellaswag jsonl (default: cached val split)")
    p.add_argument("--limit", type=int, default=None, help="score only the first N examples")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    try:
        path = Path(args.path) if args.path else hellaswag_path("val")
        load_examples(path, limit=1)  # fail fast on a bad file before loading the model
    except HellaSwagError as e:
        p.exit(2, f"error: {e}\n")

    from transformers import GPT2LMHeadModel

    from gpt2x.tokenizer import get_tokenizer

    enc = get_tokenizer()
    encode = getattr(enc, "encode_ordinary", enc.encode)
    model = GPT2LMHeadModel.from_pretrained(args.hf_model).to(args.device).eval()
    max_len = int(model.config.n_positions)

    t0 = time.perf_counter()

    def progress(done: int, total: int) -> None:
        if done % 500 == 0 or done == total:
            rate = done / max(time.perf_counter() - t0, 1e-9)
            print(f"  {done}/{total} examples ({rate:.1f}/s)", file=sys.stderr, flush=True)

    result = evaluate_hellaswag(
        lambda t: model(t).logits,
        encode,
        path,
        limit=args.limit,
        device=args.device,
        max_len=max_len,
        progress=progress,
    )
    result = {"model": args.hf_model, "path": str(path), **result}
    result["seconds"] = round(time.perf_counter() - t0, 2)
    print(json.dumps(result))
    return result


if __name__ == "__main__":
    main()
