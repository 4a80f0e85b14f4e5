"""HellaSwag evaluation (acc and acc_norm), scored the way GPT-2/GPT-3 style evals do it.

Each example is a context plus four candidate endings. Every ending is appended to the context,
the four rows are run through a causal language model, and the cross-entropy of the *ending*
tokens only is collected per row:

* ``acc``      -- predicted ending = the row with the lowest *total* ending loss;
* ``acc_norm`` -- predicted ending = the row with the lowest *mean* (per-token) ending loss.

:func:`score_batch` scores one example (4 rows) per forward and is the reference;
:func:`evaluate_hellaswag` tokenizes all examples once and runs many per forward
(:func:`make_batches`, :func:`batch_predictions`), with the same predictions.

The data is the official jsonl release (https://github.com/rowanz/hellaswag, ``data/``); one
line per example with at least ``ctx`` (str), ``endings`` (4 str) and ``label`` (int), plus
``ind``, ``activity_label``, ``ctx_a``, ``ctx_b``, ``split``, ``split_type``, ``source_id``.

This module depends on torch and the standard library only; the model is reached through a
``logits_fn`` callable and the tokenizer through an ``encode`` callable, so the trainer can pass
a lambda around its (possibly compiled / DDP / FSDP wrapped) GPT and its tiktoken encoding.

From the command line: `python -m gpt2x.evaluate checkpoint=<run> hellaswag=true`, or
`python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true val=false` for OpenAI's checkpoints.
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
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F

from gpt2x.training.distributed import is_distributed

__all__ = [
    "HELLASWAG_URLS",
    "Batch",
    "HellaSwagError",
    "batch_predictions",
    "bucket_width",
    "default_cache_dir",
    "evaluate_hellaswag",
    "hellaswag_path",
    "load_examples",
    "make_batches",
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
# (tokens (N, L), flat positions (K,) into N*L) -> logits (K, V) at those positions only
LogitsAtFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


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
    split: str = "val",
    cache_dir: str | os.PathLike | None = None,
    url: str | None = None,
    option: str = "path",
) -> Path:
    """Local path of ``hellaswag_<split>.jsonl``, downloading it once into the cache if needed.

    The download goes to a temporary file in the cache directory which is renamed into place
    only when complete, so an interrupted download never leaves a truncated file behind.
    Offline (or on any download failure) a one-line :class:`HellaSwagError` says where to put
    the file by hand, or to name it with `option` (the caller's own setting for it).
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

    fix = f"put {target.name} at {target} (or pass {option}=...)"
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
            f"gpt2x.training.hellaswag.hellaswag_path('val') or from {HELLASWAG_URLS['val']}"
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
# batched scoring

# Row widths are rounded up to a multiple of this (capped at max_len): a handful of shapes, so a
# torch.compile'd model compiles a few graphs instead of one per row length.
WIDTH_MULTIPLE = 64


class Batch(NamedTuple):
    """``E`` examples as ``4 * E`` rows of one fixed shape, on the host (moved per forward)."""

    tokens: torch.Tensor  # (4E, W) int64, right-padded with PAD_TOKEN
    mask: torch.Tensor  # (4E, W) int64, 1 exactly on the scored ending tokens
    labels: torch.Tensor  # (E,) int64; -1 marks a padding example, which is never counted
    index: torch.Tensor  # (E,) int64, position in the examples list; -1 for padding
    scored: torch.Tensor  # (K,) int64 flat positions r * W + t whose logits predict a mask-1 token


def bucket_width(width: int, max_len: int | None = None, pad_to_max_len: bool = False) -> int:
    """``width`` rounded up to a multiple of :data:`WIDTH_MULTIPLE`, capped at ``max_len``."""
    if pad_to_max_len:
        if max_len is None:
            raise ValueError("pad_to_max_len=True needs max_len")
        return max_len
    width = math.ceil(width / WIDTH_MULTIPLE) * WIDTH_MULTIPLE
    return width if max_len is None else min(width, max_len)


def _pack(
    rendered: list[tuple[int, torch.Tensor, torch.Tensor, int]], n_examples: int, width: int
) -> Batch:
    rows = NUM_ENDINGS * n_examples
    tokens = torch.full((rows, width), PAD_TOKEN, dtype=torch.long)
    mask = torch.zeros((rows, width), dtype=torch.long)
    labels = torch.full((n_examples,), -1, dtype=torch.long)
    index = torch.full((n_examples,), -1, dtype=torch.long)
    for j, (i, t, m, label) in enumerate(rendered):
        r = NUM_ENDINGS * j
        tokens[r : r + NUM_ENDINGS, : t.size(1)] = t
        mask[r : r + NUM_ENDINGS, : m.size(1)] = m
        labels[j], index[j] = label, i
    # position t predicts token t + 1; found here on the host so the device never has to sync
    scored = (mask[:, 1:] == 1).nonzero()
    return Batch(tokens, mask, labels, index, scored[:, 0] * width + scored[:, 1])


def make_batches(
    examples: Sequence[dict],
    encode: Encode,
    examples_per_batch: int = 16,
    max_len: int | None = None,
    pad_to_max_len: bool = False,
    num_batches: int | None = None,
) -> list[Batch]:
    """Tokenize every example once (:func:`render_example`) and pack them into batches.

    Examples are sorted by row width, longest first (the largest shape runs first, so running
    out of memory shows up at once), and ``examples_per_batch`` go into each batch; the last one
    is filled with padding examples so every batch has ``4 * examples_per_batch`` rows. Widths
    are :func:`bucket_width`. With ``num_batches`` all-padding batches are appended up to that
    count (equal forward counts on every rank).
    """
    if examples_per_batch < 1:
        raise ValueError(f"examples_per_batch must be >= 1, got {examples_per_batch}")
    rendered = [(i, *render_example(ex, encode, max_len=max_len)) for i, ex in enumerate(examples)]
    rendered.sort(key=lambda r: -r[1].size(1))  # stable: ties keep file order
    batches = []
    for start in range(0, len(rendered), examples_per_batch):
        chunk = rendered[start : start + examples_per_batch]
        width = bucket_width(chunk[0][1].size(1), max_len, pad_to_max_len)
        batches.append(_pack(chunk, examples_per_batch, width))
    if num_batches is not None:
        if num_batches < len(batches):
            raise ValueError(f"num_batches={num_batches} < the {len(batches)} batches needed")
        # reuse the last width so a compiled model sees no new shape
        width = batches[-1].tokens.size(1) if batches else bucket_width(1, max_len, pad_to_max_len)
        batches += [_pack([], examples_per_batch, width) for _ in range(num_batches - len(batches))]
    return batches


@torch.no_grad()
def batch_predictions(
    logits_fn: LogitsFn,
    batch: Batch,
    device: str | torch.device = "cpu",
    logits_at: LogitsAtFn | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per example ``(pred, pred_norm)`` as (E,) device tensors; the batched :func:`score_batch`.

    Right padding is safe: in a causal model position t attends to positions <= t only, so pad
    tokens after a row's last token cannot change the logits at any scored position (left
    padding would, by shifting the position embeddings), and the mask keeps pads out of the
    loss. Rows never interact (attention, LayerNorm, MLP are per row), so padding examples
    cannot change real ones. Only the scored positions go through the float32 cross-entropy,
    not all (4E, W, V) logits.
    """
    tokens = batch.tokens.to(device, non_blocking=True)
    rows, width = tokens.shape
    scored = batch.scored.to(device, non_blocking=True)
    if logits_at is not None:  # the model computes the head at the scored positions only
        picked = logits_at(tokens, scored).float()
    else:
        logits = _as_logits(logits_fn(tokens))
        if logits.shape[:2] != (rows, width):
            raise ValueError(
                f"logits_fn returned shape {tuple(logits.shape)} for input {(rows, width)}"
            )
        picked = logits.reshape(rows * width, -1).index_select(0, scored).float()
    losses = F.cross_entropy(picked, tokens.view(-1)[scored + 1], reduction="none")
    total = torch.zeros(rows, device=losses.device).index_add_(0, scored // width, losses)
    count = batch.mask[:, 1:].sum(dim=1).clamp_min(1).to(device, non_blocking=True)
    mean = total / count
    return total.view(-1, NUM_ENDINGS).argmin(dim=1), mean.view(-1, NUM_ENDINGS).argmin(dim=1)


# ----------------------------------------------------------------------------------------------
# evaluation loop


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
    examples_per_batch: int = 16,
    logits_at: LogitsAtFn | None = None,
) -> dict:
    """Score HellaSwag; returns ``acc``, ``acc_norm`` and the counts behind them.

    * ``logits_at(tokens, positions)`` (e.g. ``GPT.logits_at``), when given, replaces
      ``logits_fn``: the model computes its LM head only at the scored (ending) positions.

    * Example ``i`` is scored by the rank with ``i % world_size == rank``; all examples are
      tokenized up front, ``examples_per_batch`` examples (``4 *`` as many rows) per forward.
      Every forward has the same batch dimension (``min(examples_per_batch, examples per
      rank)``) and a width from :func:`bucket_width`; sorted by length, little is padding.
    * Every rank runs the same number of forwards (a rank with fewer examples runs uncounted
      all-padding batches), which FSDP's collectives need.
    * Counts stay on ``device`` until the end; if ``torch.distributed`` is initialized and
      ``world_size > 1`` they are all-reduced (SUM) once, so every rank returns the global
      ``acc``/``acc_norm``/``n``/``correct``/``correct_norm``.
    * ``rank_n``, ``rank_correct``, ``rank_correct_norm`` are always this rank's own share.
    * ``path=None`` means the cached/downloaded validation split (:func:`hellaswag_path`).
    * ``max_len`` (the model's block size) left-truncates long contexts; ``pad_to_max_len``
      pads every batch to exactly ``max_len`` columns (one static shape for compiled models).
    * ``autocast_ctx`` (e.g. ``torch.autocast("cuda", torch.bfloat16)``) is entered once around
      the forward passes; losses are computed in float32 regardless.
    * ``progress(done, total)`` is called after each batch with this rank's example counts.
    * The caller puts the model in eval mode; ``acc`` is NaN when ``n == 0``.
    """
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank} world_size={world_size}")
    if pad_to_max_len and max_len is None:
        raise ValueError("pad_to_max_len=True needs max_len")
    if examples_per_batch < 1:
        raise ValueError(f"examples_per_batch must be >= 1, got {examples_per_batch}")
    if path is None:
        path = hellaswag_path("val")
    examples = load_examples(path, limit=limit)
    mine = examples[rank::world_size]
    # from global counts, so every rank gets the same batch size and number of batches
    per_rank = math.ceil(len(examples) / world_size)
    per_batch = max(1, min(examples_per_batch, per_rank))
    num_batches = math.ceil(per_rank / per_batch)
    batches = make_batches(mine, encode, per_batch, max_len, pad_to_max_len, num_batches)

    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct, correct_norm, n
    done = 0
    ctx = autocast_ctx if autocast_ctx is not None else contextlib.nullcontext()
    with ctx:
        for batch in batches:
            pred, pred_norm = batch_predictions(logits_fn, batch, device, logits_at)
            labels = batch.labels.to(device, non_blocking=True)
            real = labels >= 0
            counts += torch.stack(
                [((pred == labels) & real).sum(), ((pred_norm == labels) & real).sum(), real.sum()]
            )
            done += int((batch.index >= 0).sum())  # a host tensor: no device sync
            if progress is not None:
                progress(done, len(mine))

    totals = counts
    if is_distributed(world_size):
        import torch.distributed as dist

        totals = counts.clone()
        dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    (correct, correct_norm, n), (rank_correct, rank_correct_norm, rank_n) = torch.stack(
        [totals, counts]
    ).tolist()  # the one host sync
    return {
        "rank_n": rank_n,
        "rank_correct": rank_correct,
        "rank_correct_norm": rank_correct_norm,
        "acc": correct / n if n else float("nan"),
        "acc_norm": correct_norm / n if n else float("nan"),
        "n": n,
        "correct": correct,
        "correct_norm": correct_norm,
    }
