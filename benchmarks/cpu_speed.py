"""The CPU speed goal: tokens/s of named single-process configurations of the nano shape, and of
Hugging Face's GPT2LMHeadModel at the same shape, measured interleaved in fresh processes.

    python benchmarks/cpu_speed.py                          # every configuration, 5 repeats
    python benchmarks/cpu_speed.py --repeats 2 --steps 4 --warmup 2 --configs fused,chunked,hf
    python benchmarks/cpu_speed.py --list                   # the configurations and what they set

The shape is the nano_cpu ladder's (4 layers x 4 heads x 256, T=256, B=8, vocab 50304, bf16
autocast, flash attention, torch.compile, fused AdamW: the lecture's `fused` rung). Each
configuration runs as a fresh process per repeat, and the repeats are interleaved (A B C A B C
...), so a drift of a shared machine hits every configuration alike. One repeat's number is the
median tokens/s over its measured steps; across repeats the table shows the median, a 95%
interval (gpt2x.stats.log_t_interval: a t-interval on the logs) and the ratio to `fused` paired
repeat by repeat (gpt2x.stats.paired_ratio), with `within noise` where that interval holds 1.00x.

How each is measured:
- gpt2x configurations run through the CLI, exactly as a ladder rung does: `python -m
  gpt2x.train +experiment=<rung> <overrides> trainer.max_steps=W+S
  trainer.warmup_steps_for_timing=W logger=none`; the number is record.json's
  summary.tokens_per_s (the trainer's own step timing: data, forward, loss, backward, clipping,
  optimizer step, and the loss read back to the host).
- `hf` runs this file with `--worker hf` (the GPU check runs it on CUDA as the fused rung's
  peer, `--device cuda`): an in-script loop with the same work per step (a
  batch from the same prepared Shakespeare tokens, torch.compile of forward + fp32
  cross-entropy, bf16 autocast, backward, clip_grad_norm_(1.0), fused AdamW with weight decay
  on 2-D parameters, loss.item()), timed with perf_counter around the whole step as the trainer
  times its steps, first W steps untimed.
Threads: every process gets OMP_NUM_THREADS=<--threads> (default: the machine's CPU count)
unless its configuration sets its own. Prints a markdown table; --json writes the raw numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # gpt2x.stats from this checkout when run as a script

from gpt2x import stats  # noqa: E402

BASE = "fused"  # the lecture's last single-process rung: the 2,050 tokens/s starting point


@dataclass
class Candidate:
    name: str
    what: str  # one line for the table
    experiment: str = "ladder/fused"
    overrides: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    hf: bool = False


# What can be tried without changing the model's math beyond what a rung names. Every entry is
# the fused rung plus one named change (a ladder/beyond rung, a chunk size of that rung, or a
# thread setting of the process).
CANDIDATES = [
    Candidate("fused", "the lecture's fused rung (bf16, compile, flash, vocab 50304, fused AdamW)"),
    Candidate("fused_1thread", "fused, OMP_NUM_THREADS=1", env={"OMP_NUM_THREADS": "1"}),
    Candidate(
        "chunked", "loss=chunked (4096-row chunks: one chunk at B*T=2048)", "ladder/beyond/chunked"
    ),
    Candidate(
        "chunked_512",
        "loss=chunked loss.chunk_size=512 (4 chunks)",
        "ladder/beyond/chunked",
        ["loss.chunk_size=512"],
    ),
    Candidate(
        "chunked_256",
        "loss=chunked loss.chunk_size=256 (8 chunks)",
        "ladder/beyond/chunked",
        ["loss.chunk_size=256"],
    ),
    # fp32 instead of bf16 autocast: on a CPU without bf16 matrix units (no AMX) bf16 matmuls
    # can be slower than fp32 ones; the same model, only the autocast dtype differs
    Candidate("fused_fp32", "fused with precision=fp32", overrides=["precision=fp32"]),
    Candidate(
        "chunked_256_fp32",
        "loss=chunked loss.chunk_size=256, precision=fp32",
        "ladder/beyond/chunked",
        ["loss.chunk_size=256", "precision=fp32"],
    ),
    Candidate("max_autotune", "chunked + compile_mode=max-autotune", "ladder/beyond/max_autotune"),
    Candidate(
        "reduce_overhead", "chunked + compile_mode=reduce-overhead", "ladder/beyond/reduce_overhead"
    ),
    Candidate("block", "chunked + compile_scope=block", "ladder/beyond/block"),
    Candidate(
        "hf", "transformers GPT2LMHeadModel (sdpa, bf16 autocast, compile, fused AdamW)", hf=True
    ),
]
BY_NAME = {c.name: c for c in CANDIDATES}


# --------------------------------------------------------------------------------------------
# One measurement = one fresh process


def gpt2x_command(c: Candidate, steps: int, warmup: int, run_dir: Path, extra: list[str]) -> list:
    return [
        sys.executable,
        "-m",
        "gpt2x.train",
        f"+experiment={c.experiment}",
        *c.overrides,
        f"trainer.max_steps={warmup + steps}",
        f"trainer.warmup_steps_for_timing={warmup}",
        "logger=none",
        "trainer.progress=log",
        *extra,
        f"hydra.run.dir={run_dir}",
    ]


def hf_command(steps: int, warmup: int, out: Path, extra: list[str]) -> list:
    return [
        sys.executable,
        __file__,
        "--worker",
        "hf",
        "--steps",
        str(steps),
        "--warmup",
        str(warmup),
        "--worker-out",
        str(out),
        *(a for o in extra for a in ("--override", o)),
    ]


def measure_once(c: Candidate, args, scratch: Path, repeat: int) -> dict:
    """Run one configuration once in a fresh process; its tokens/s, or the reason it failed."""
    run_dir = scratch / f"{c.name}_r{repeat}"
    out = run_dir / "hf.json"
    if c.hf:
        run_dir.mkdir(parents=True, exist_ok=True)
        cmd = hf_command(args.steps, args.warmup, out, args.override)
    else:
        cmd = gpt2x_command(c, args.steps, args.warmup, run_dir, args.override)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), **c.env}
    env.setdefault("WANDB_MODE", "offline")
    t0 = time.monotonic()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.monotonic() - t0
    result = {
        "name": c.name,
        "repeat": repeat,
        "wall_s": round(wall, 1),
        "command": shlex.join(cmd),
    }
    try:
        if c.hf:
            summary = json.loads(out.read_text())
        else:
            summary = json.loads((run_dir / "record.json").read_text())["summary"]
        result.update(
            tokens_per_s=float(summary["tokens_per_s"]), median_ms=float(summary["median_ms"])
        )
    except (OSError, KeyError, TypeError, ValueError):
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
        result["error"] = f"exit {proc.returncode}: {tail[0][:200]}"
    return result


# --------------------------------------------------------------------------------------------
# The Hugging Face worker (runs in its own process)


def hf_batches(cfg, steps: int):
    """(x, y) int64 batches from the same prepared Shakespeare shards the trainer reads; falls
    back to fixed random tokens when the shards are not prepared (the timing does not depend on
    the token values)."""
    import numpy as np
    import torch

    b, t = cfg.trainer.micro_batch_size, cfg.trainer.seq_len
    data_dir = Path(cfg.data.dir)
    shards = sorted(data_dir.glob("*train*.bin")) if data_dir.is_dir() else []
    if shards:
        tokens = np.memmap(shards[0], dtype=np.uint16, mode="r")
        need = b * t + 1
        for i in range(steps):
            start = (i * b * t) % max(1, len(tokens) - need)
            chunk = torch.from_numpy(tokens[start : start + need].astype(np.int64))
            yield chunk[:-1].view(b, t), chunk[1:].view(b, t)
    else:
        g = torch.Generator().manual_seed(1337)
        x = torch.randint(0, 50257, (b, t + 1), generator=g)
        for _ in range(steps):
            yield x[:, :-1].contiguous(), x[:, 1:].contiguous()


def run_hf(args) -> None:
    import torch
    import torch.nn.functional as F
    from hydra import compose, initialize_config_dir
    from transformers import GPT2Config, GPT2LMHeadModel

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        # the fused rung's resolved shape, so HF gets exactly the gpt2x configuration's sizes
        cfg = compose("config", overrides=["+experiment=ladder/fused", *args.override])
    m, t = cfg.model, cfg.trainer
    torch.manual_seed(t.seed)
    hf_cfg = GPT2Config(
        vocab_size=m.vocab_size,
        n_positions=m.block_size,
        n_embd=m.n_embd,
        n_layer=m.n_layer,
        n_head=m.n_head,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        attn_implementation="sdpa",
    )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model = GPT2LMHeadModel(hf_cfg).to(device).train()
    o = cfg.optim
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW(
        [
            {"params": decay, "weight_decay": o.weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ],
        lr=o.lr,
        betas=(o.beta1, o.beta2),
        eps=o.eps,
        fused=True,
    )

    def loss_fn(x, y):
        # the lecture's plain loss: logits -> fp32 cross-entropy, as gpt2x's loss=plain
        logits = model(input_ids=x).logits
        return F.cross_entropy(logits.float().view(-1, logits.size(-1)), y.view(-1))

    compiled = torch.compile(loss_fn)
    times, first_ms = [], None
    for i, (x, y) in enumerate(hf_batches(cfg, args.warmup + args.steps)):
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast(device.type, dtype=torch.bfloat16):
            loss = compiled(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        loss.item()  # the trainer reads the loss back every step too (and waits for the GPU)
        ms = (time.perf_counter() - t0) * 1000.0
        first_ms = ms if first_ms is None else first_ms
        if i >= args.warmup:
            times.append(ms)
    median_ms = stats.median(times)
    tokens = t.micro_batch_size * t.seq_len
    cuda = device.type == "cuda"
    Path(args.worker_out).write_text(
        json.dumps(
            {
                "median_ms": median_ms,
                "tokens_per_s": tokens / (median_ms / 1000.0),
                "steps_ms": times,
                "device": torch.cuda.get_device_name(device) if cuda else "cpu",
                "batch": [t.micro_batch_size, t.seq_len],
                "loss": loss.item(),
                # the first step's time beyond a measured one: torch.compile's, as the trainer's
                "compile_seconds": max(0.0, (first_ms - median_ms) / 1000.0),
                "peak_mem_gb": torch.cuda.max_memory_allocated(device) / 1e9 if cuda else None,
            }
        )
    )


# --------------------------------------------------------------------------------------------
# The table


def table(results: list[dict], names: list[str], args) -> str:
    per = {
        n: {
            r["repeat"]: r["tokens_per_s"]
            for r in results
            if r["name"] == n and "tokens_per_s" in r
        }
        for n in names
    }
    errors = {r["name"]: r["error"] for r in results if "error" in r}
    base = per.get(BASE) or {}
    lines = [
        "| configuration | what | repeats | median tokens/s | 95% interval | vs fused | "
        "95% interval | |",
        "|---|---|---:|---:|---:|---:|---:|---|",
    ]
    for n in names:
        vals = per[n]
        what = BY_NAME[n].what
        if not vals:
            lines.append(
                f"| {n} | {what} | 0/{args.repeats} | | | | | failed: {errors.get(n, '?')} |"
            )
            continue
        med = stats.median(list(vals.values()))
        ci = stats.log_t_interval(list(vals.values()))
        cell = f"{ci.lo:,.0f} - {ci.hi:,.0f}" if ci.lo is not None else ""
        ratio = rcell = note = ""
        if base and n != BASE:
            keys = sorted(set(vals) & set(base))
            if keys:
                r = stats.paired_ratio([vals[k] for k in keys], [base[k] for k in keys])
                ratio = f"{stats.median([vals[k] / base[k] for k in keys]):.3f}x"
                if r.lo is not None:
                    rcell = f"{r.lo:.3f} - {r.hi:.3f}"
                    note = "within noise" if stats.within_noise(r) else ""
        elif n == BASE:
            ratio = "1.000x"
        lines.append(
            f"| {n} | {what} | {len(vals)}/{args.repeats} | {med:,.0f} | {cell} | {ratio} | "
            f"{rcell} | {note} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument(
        "--configs",
        default=",".join(c.name for c in CANDIDATES),
        help="comma-separated names (--list shows them)",
    )
    p.add_argument("--repeats", type=int, default=5, help="fresh processes per configuration")
    p.add_argument("--steps", type=int, default=10, help="measured steps per process")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (compile, caches)")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="OMP_NUM_THREADS of every process without its own",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        help="a Hydra override for every configuration (repeatable), e.g. paths.data_dir=/data",
    )
    p.add_argument("--json", help="also write every measurement to this file")
    p.add_argument("--list", action="store_true")
    p.add_argument("--worker", choices=["hf"], help=argparse.SUPPRESS)
    p.add_argument("--worker-out", help=argparse.SUPPRESS)
    # the worker's device (default: cuda where available); benchmarks/gpu/check.sh runs it there
    p.add_argument("--device", default="", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker == "hf":
        run_hf(args)
        return 0
    if args.list:
        for c in CANDIDATES:
            print(f"{c.name:16s} {c.what}")
        return 0
    names = [n.strip() for n in args.configs.split(",") if n.strip()]
    unknown = [n for n in names if n not in BY_NAME]
    if unknown:
        print(
            f"cpu_speed.py: unknown configuration {unknown[0]!r}; --list shows them",
            file=sys.stderr,
        )
        return 2
    if args.repeats < 1 or args.steps < 1 or args.warmup < 1:
        print(
            "cpu_speed.py: --repeats, --steps and --warmup must be >= 1 (the first step compiles)",
            file=sys.stderr,
        )
        return 2
    print(
        f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, python "
        f"{platform.python_version()}; {len(names)} configurations x {args.repeats} repeats, "
        f"{args.warmup} warm-up + {args.steps} measured steps each, interleaved",
        flush=True,
    )
    results = []
    with tempfile.TemporaryDirectory(prefix="gpt2x-cpu-speed-") as tmp:
        for repeat in range(args.repeats):  # A B C A B C ...: drift hits all alike
            for n in names:
                r = measure_once(BY_NAME[n], args, Path(tmp), repeat)
                results.append(r)
                shown = f"{r['tokens_per_s']:,.0f} tokens/s" if "tokens_per_s" in r else r["error"]
                print(f"  repeat {repeat} {n}: {shown} ({r['wall_s']} s)", flush=True)
    print()
    print(table(results, names, args))
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
