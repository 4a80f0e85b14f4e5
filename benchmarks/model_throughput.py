"""Training throughput of gpt2x's GPT vs transformers.GPT2LMHeadModel, same shape, same batch.

    python benchmarks/model_throughput.py [--steps 10] [--warmup 3] [--batch 8] [--seq 256] \
        [--device cpu|cuda|cuda:N|auto]

Each measured step is forward + loss + backward + AdamW step on a fixed random batch, timed
with time.perf_counter() around the whole step; on CUDA the device is synchronized before and
after each timed step (kernels run asynchronously) and the table adds peak memory allocated /
reserved per row. Prints a markdown table. The default device is cpu, as measured in
benchmarks/model-cpu.md (its last section).
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(step, steps: int, warmup: int, device: torch.device) -> float:
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        sync(device)
        t0 = time.perf_counter()
        step()
        sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit(f"--device {name}: CUDA is not available here; use --device cpu")
    return device


def make_step(model, x, y, dtype, hf: bool):
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ctx = (
        (lambda: torch.autocast(x.device.type, dtype=dtype))
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
    p.add_argument("--device", default="cpu", help="cpu | cuda | cuda:N | auto")
    args = p.parse_args()
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)

    torch.manual_seed(0)
    x = torch.randint(0, 50257, (args.batch, args.seq), device=device)
    y = torch.roll(x, -1, dims=1)
    tokens = args.batch * args.seq
    shape = dict(n_layer=args.layers, n_head=args.heads, n_embd=args.width)
    where = (
        f"{torch.cuda.get_device_name(device)} (CUDA {torch.version.cuda})"
        if cuda
        else f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    )
    print(
        f"# {where}, torch {torch.__version__}; B={args.batch} T={args.seq} {shape}; median of "
        f"{args.steps} steps after {args.warmup} warm-up\n"
    )
    mem_cols = " peak alloc GB | peak reserved GB |" if cuda else ""
    print("| model | precision | ms/step | tokens/s | gpt2x / HF |" + mem_cols)
    print("|---|---|---:|---:|---:|" + ("---:|---:|" if cuda else ""))

    def measure(model, dtype: torch.dtype, hf: bool) -> tuple[float, str]:
        """Median step time, and the peak-memory cells of this model's run on CUDA."""
        if cuda:
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats(device)
        t = time_steps(make_step(model, x, y, dtype, hf), args.steps, args.warmup, device)
        if not cuda:
            return t, ""
        alloc = torch.cuda.max_memory_allocated(device) / 1e9
        reserved = torch.cuda.max_memory_reserved(device) / 1e9
        return t, f" {alloc:.2f} | {reserved:.2f} |"

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
        t_ours, mem_ours = measure(ours.to(device), dtype, hf=False)
        del ours  # free its weights and optimizer state before HF's peak is measured
        t_hf, mem_hf = measure(hf.to(device), dtype, hf=True)
        del hf
        ratio = f"{t_hf / t_ours:.2f}"
        print(
            f"| gpt2x GPT | {name} | {1000 * t_ours:.0f} | {tokens / t_ours:,.0f} | {ratio} |"
            + mem_ours
        )
        print(
            f"| HF GPT2LMHeadModel | {name} | {1000 * t_hf:.0f} | {tokens / t_hf:,.0f} | |" + mem_hf
        )


if __name__ == "__main__":
    main()
