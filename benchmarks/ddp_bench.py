"""DDP throughput on CPU: tokens/s of 1 process vs N processes (torchrun, gloo) for one model.

    python benchmarks/ddp_bench.py                       # nano, 1 vs 2 processes, 30 steps
    python benchmarks/ddp_bench.py --quick               # a tiny model, 4 steps: checks the script

Both runs train the same global batch (`--micro-batch` x seq_len x N tokens per step): the single
process accumulates N micro-steps, each DDP rank one. The machine's cores are split evenly:
1 process gets `--threads` intra-op threads (default: all cores), each of N ranks gets
threads / N, so the comparison is "the same CPU, used by one process or by N". Throughput is
the trainer's own summary (record.json: tokens/s from the median step time, the first
`--warmup` steps excluded). speedup = tokens/s(N) / tokens/s(1); efficiency = speedup / N.
On a CPU the N processes share the cores one process already used, so expect speedup <= 1:
DDP adds gradient all-reduce and Python overhead per rank but no compute.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from omegaconf import OmegaConf

REPO = Path(__file__).resolve().parent.parent
QUICK = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
]


def launch(nproc: int, threads: int, overrides: list[str], out: Path) -> dict:
    """One training run; returns its record.json."""
    run_dir = out / f"nproc{nproc}"
    args = [*overrides, f"hydra.run.dir={run_dir}"]
    if nproc == 1:
        cmd = [sys.executable, "-m", "gpt2x.train", "parallel=single", *args]
    else:
        cmd = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={nproc}",
            "-m",
            "gpt2x.train",
            "parallel=ddp",
            *args,
        ]
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK")}
    env["OMP_NUM_THREADS"] = str(threads)
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    record = json.loads((run_dir / "record.json").read_text())
    record["_wall_s"] = wall
    record["_command"] = " ".join(cmd)
    return record


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="nano")
    p.add_argument("--nproc", type=int, default=2, help="processes of the DDP run")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--warmup", type=int, default=5, help="steps left out of the timing")
    p.add_argument("--micro-batch", type=int, default=8, help="B per rank and micro-step")
    p.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="intra-op threads in total (split between the N ranks)",
    )
    p.add_argument("--data-dir", default=None, help="prepared data root (paths.data_dir)")
    p.add_argument("--out", default=None, help="run folders (default: a temp folder)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--quick", action="store_true", help="tiny model, 4 steps: checks the script")
    a = p.parse_args()
    if a.quick:
        a.steps, a.warmup = 4, 1
    per_rank_threads = max(1, a.threads // a.nproc)
    out = Path(a.out or tempfile.mkdtemp(prefix="ddp_bench_"))
    # seq_len defaults to the model's block_size (conf/model/<model>.yaml)
    seq_len = 32 if a.quick else int(OmegaConf.load(REPO / f"conf/model/{a.model}.yaml").block_size)
    overrides = [
        f"model={a.model}",
        *(QUICK if a.quick else []),
        f"trainer.max_steps={a.steps}",
        f"trainer.warmup_steps_for_timing={a.warmup}",
        f"trainer.micro_batch_size={a.micro_batch}",
        # the same global batch for both runs: 1 process accumulates nproc micro-steps
        f"trainer.total_batch_tokens={a.micro_batch * seq_len * a.nproc}",
        "trainer.eval_every=0",
        f"trainer.eval_tokens={a.micro_batch * seq_len}",
        "trainer.sample_tokens=0",
        "trainer.save_final=false",
        "logger=none",
        "precision=fp32",
        *([f"paths.data_dir={a.data_dir}"] if a.data_dir else []),
    ]
    one = launch(1, a.threads, overrides, out)
    many = launch(a.nproc, per_rank_threads, overrides, out)
    tps1, tpsn = one["summary"]["tokens_per_s"], many["summary"]["tokens_per_s"]
    speedup = tpsn / tps1
    result = {
        "model": a.model if not a.quick else "quick (2x32)",
        "seq_len": seq_len,
        "micro_batch": a.micro_batch,
        "tokens_per_step": one["tokens_per_step"],
        "steps": a.steps,
        "warmup": a.warmup,
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "runs": [
            {
                "nproc": 1,
                "threads_per_proc": a.threads,
                "grad_accum": one["grad_accum_steps"],
                "tokens_per_s": tps1,
                "median_ms": one["summary"]["median_ms"],
                "wall_s": one["_wall_s"],
            },
            {
                "nproc": a.nproc,
                "threads_per_proc": per_rank_threads,
                "grad_accum": many["grad_accum_steps"],
                "tokens_per_s": tpsn,
                "median_ms": many["summary"]["median_ms"],
                "wall_s": many["_wall_s"],
            },
        ],
        "speedup": speedup,
        "efficiency": speedup / a.nproc,
        "out": str(out),
    }
    print(
        f"{result['model']} | T={result['seq_len']} B={a.micro_batch} | "
        f"{result['tokens_per_step']} tokens/step | {a.steps} steps ({a.warmup} warm-up) | "
        f"{result['cores']} cores | torch {result['torch']}"
    )
    print("| processes | threads/process | grad accum | median step ms | tokens/s |")
    print("|---|---|---|---|---|")
    for r in result["runs"]:
        print(
            f"| {r['nproc']} | {r['threads_per_proc']} | {r['grad_accum']} | "
            f"{r['median_ms']:.1f} | {r['tokens_per_s']:,.0f} |"
        )
    print(f"speedup {speedup:.2f}x, efficiency {speedup / a.nproc:.2f} (ideal 1.00)")
    if a.json:
        Path(a.json).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
