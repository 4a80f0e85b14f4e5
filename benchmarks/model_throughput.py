"""Training throughput of gpt2x's GPT vs transformers.GPT2LMHeadModel, same shape, same batch.

    python benchmarks/model_throughput.py [--steps 10] [--warmup 3] [--batch 8] [--seq 256]

Each measured step is forward + loss + backward + AdamW step on a fixed random batch, timed
with time.perf_counter() around the whole step (CPU: synchronous). Prints a markdown table.
"""

from __future__ import annotations

import argparse
import contextlib
import platform
import statistics
import time

import torch
from transformers import GPT2Config, GPT2LMHeadModel

from gpt2x.model import GPT, GPTConfig


def time_steps(step, steps: int, warmup: int) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def make_step(model, x, y, dtype, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = (
        (lambda: torch.autocast("cpu", dtype=dtype))
        if dtype != torch.float32
        else contextlib.nullcontext
    )

    def step():
        opt.zero_grad(set_to_none=True)
        with ctx():
            loss = model(input_ids=x, labels=x).loss if hf else model(x, y)[1]
        loss.backward()
        opt.step()

    return step


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--width", type=int, default=256)
    args = p.parse_args()

    torch.manual_seed(0)
    x = torch.randint(0, 50257, (args.batch, args.seq))
    y = torch.roll(x, -1, dims=1)
    tokens = args.batch * args.seq
    shape = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    print(
        f"# {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
        f"torch {torch.__version__}; B={args.batch} T={args.seq} {shape}; median of "
        f"{args.steps} steps after {args.warmup} warm-up\n"
    )
    print("| model | precision | ms/step | tokens/s | gpt2x / HF |")
    print("|---|---|---:|---:|---:|")
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        ours = GPT(GPTConfig(block_size=args.seq, vocab_size=50257, attn="sdpa", **shape))
        hf_cfg = GPT2Config(
            n_positions=args.seq,
            vocab_size=50257,
            n_layer=args.layers,
            n_head=args.heads,
            n_embd=args.width,
            resid_pdrop=0.0,
            embd_pdrop=0.0,
            attn_pdrop=0.0,
            attn_implementation="sdpa",
        )
        hf = GPT2LMHeadModel(hf_cfg)
        t_ours = time_steps(make_step(ours, x, y, dtype, hf=False), args.steps, args.warmup)
        t_hf = time_steps(make_step(hf, x, y, dtype, hf=True), args.steps, args.warmup)
        print(
            f"| gpt2x GPT | {name} | {1000 * t_ours:.0f} | {tokens / t_ours:,.0f} | {t_hf / t_ours:.2f} |"
        )
        print(f"| HF GPT2LMHeadModel | {name} | {1000 * t_hf:.0f} | {tokens / t_hf:,.0f} | |")


if __name__ == "__main__":
    main()
