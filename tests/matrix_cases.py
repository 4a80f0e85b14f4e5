"""The cases of tests/test_matrix.py, and the worker that runs many of them in one torchrun launch.

Imported by the test file (the pairwise generator, the axes of the pairwise matrix, how a case
becomes Hydra overrides) and run as a script under `torchrun --nproc_per_node=2`: every rank
reads the same job list, runs each job with `run_training` in turn (a process group per job,
as a real run has) and rank 0 writes one result per job. One launch for many distributed runs
saves torchrun's start-up (~15 s) per run.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import sys
import time
import traceback
from pathlib import Path

from conftest import TINY, compose_config

# ------------------------------------------------------------------------------------------
# pairwise covering arrays


def _pair(names: list[str], a: str, va, b: str, vb) -> tuple:
    """One (factor, value) pair in a canonical order (by factor position)."""
    return ((a, va), (b, vb)) if names.index(a) < names.index(b) else ((b, vb), (a, va))


def all_pairs(factors: dict[str, list]) -> set[tuple]:
    names = list(factors)
    return {
        ((a, va), (b, vb))
        for a, b in itertools.combinations(names, 2)
        for va in factors[a]
        for vb in factors[b]
    }


def row_pairs(row: dict, factors: dict[str, list]) -> set[tuple]:
    names = list(factors)
    return {_pair(names, a, row[a], b, row[b]) for a, b in itertools.combinations(names, 2)}


def uncovered_pairs(rows: list[dict], factors: dict[str, list]) -> set[tuple]:
    """The value pairs of two factors that no row holds (empty: the rows cover every pair)."""
    covered = set()
    for row in rows:
        assert set(row) == set(factors), f"row {row} does not set exactly the factors"
        for name, value in row.items():
            assert value in factors[name], f"{name}={value!r} is not a level of {name}"
        covered |= row_pairs(row, factors)
    return all_pairs(factors) - covered


def pairwise(factors: dict[str, list]) -> list[dict]:
    """A small covering array of strength 2, built greedily (deterministic).

    While some pair is uncovered: for every uncovered pair as a seed, fill in the other factors
    (largest first) with the value that covers the most uncovered pairs together with the values
    chosen so far; keep the candidate row that covers the most new pairs.
    """
    names = list(factors)
    order = sorted(names, key=lambda n: -len(factors[n]))
    uncovered = all_pairs(factors)
    rows: list[dict] = []
    while uncovered:
        best_row, best_gain = None, -1
        for (a, va), (b, vb) in sorted(uncovered, key=repr):
            row = {a: va, b: vb}
            for n in order:
                if n in row:
                    continue

                def gain(v, n=n, row=row, todo=uncovered):
                    return sum(_pair(names, m, row[m], n, v) in todo for m in row)

                row[n] = max(factors[n], key=gain)  # first of the best: deterministic
            g = len(row_pairs(row, factors) & uncovered)
            if g > best_gain:
                best_row, best_gain = row, g
        rows.append({n: best_row[n] for n in names})
        uncovered -= row_pairs(best_row, factors)
    return rows


# ------------------------------------------------------------------------------------------
# the pairwise matrix of the main axes

AXES: dict[str, list] = {
    "debug": ["none", "fast_dev_run", "overfit_batch", "profiler"],
    "precision": ["fp32", "tf32", "bf16"],
    "attn": ["naive", "sdpa", "flash"],
    "parallel": ["single", "ddp", "fsdp"],
    "logger": ["wandb-offline", "wandb-disabled", "none"],
    "compile": ["false", "true"],
}

# a debug preset switches the logger off (conf/debug/*.yaml sets logger.kind=none): the W&B
# levels name the kind and mode as keys, which win over the preset
LOGGER_LEVELS = {
    "wandb-offline": ["logger=wandb", "logger.kind=wandb", "logger.mode=offline"],
    "wandb-disabled": ["logger=wandb", "logger.kind=wandb", "logger.mode=disabled"],
    "none": ["logger=none"],
}
DEBUG_LEVELS = {
    "none": ["trainer.max_steps=2"],
    "fast_dev_run": ["debug=fast_dev_run"],  # its own 3 steps
    "overfit_batch": ["debug=overfit_batch", "trainer.max_steps=3"],  # fewer steps than 100
    # 2 warm-up steps + 1 traced step: the trace is written when the active step ends
    "profiler": ["debug=profiler", "trainer.max_steps=3", "trainer.profile_steps=1"],
}
# 2 micro-steps of 4 x 32 on one process, one per rank on two: accumulation and DDP/FSDP alike
MATRIX_BATCH = ["trainer.total_batch_tokens=256"]


def row_id(row: dict) -> str:
    return "-".join(f"{row[k]}" if k != "compile" else f"compile={row[k]}" for k in AXES)


def row_overrides(row: dict) -> list[str]:
    return [
        f"precision={row['precision']}",
        f"attn={row['attn']}",
        f"compile={row['compile']}",
        f"parallel={row['parallel']}",
        *LOGGER_LEVELS[row["logger"]],
        *DEBUG_LEVELS[row["debug"]],
        *MATRIX_BATCH,
    ]


def expected_steps(row: dict) -> int:
    return {"none": 2, "fast_dev_run": 3, "overfit_batch": 3, "profiler": 3}[row["debug"]]


# ------------------------------------------------------------------------------------------
# the worker: python -m torch.distributed.run --nproc_per_node=2 tests/matrix_cases.py JOBS OUT


def compose_job(overrides: list[str], run_dir: str):
    return compose_config(overrides, run_dir)


def run_job(overrides: list[str], run_dir: str) -> dict:
    """One run in this process, as the tests do it: a clean compile cache, then run_training.
    Returns {"ok": bool, "error": "<Type>: <first line>", "seconds": s}."""
    import torch

    from gpt2x.train import run_training

    torch._dynamo.reset()  # as a multirun job does (gpt2x.training.multirun.begin_job)
    t0 = time.perf_counter()
    try:
        run_training(compose_job(overrides, run_dir))
        error = None
    except Exception as e:  # noqa: BLE001 - reported to the test, which decides
        lines = str(e).strip().splitlines()
        error = f"{type(e).__name__}: {lines[0] if lines else ''}"
        traceback.print_exc()
    return {"ok": error is None, "error": error, "seconds": time.perf_counter() - t0}


def worker(jobs_file: str, out_file: str) -> None:
    from gpt2x.config import register_configs

    logging.basicConfig(level=logging.INFO, format="[rank %(process)d] %(name)s: %(message)s")
    register_configs()
    jobs = json.loads(Path(jobs_file).read_text())
    rank = os.environ.get("RANK", "0")
    attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT")
    results = {}
    for i, job in enumerate(jobs):
        if attempt is not None:
            # a process group per job: each init gets its own keys in torchrun's store, as an
            # in-place restart does (gpt2x.training.distributed._restart_safe_store), never a dead one's
            os.environ["TORCHELASTIC_RESTART_COUNT"] = f"{attempt}_job{i}"
        print(f"=== rank {rank} job {job['id']}", file=sys.stderr, flush=True)
        results[job["id"]] = run_job(job["overrides"], job["run_dir"])
        if rank == "0":
            Path(out_file).write_text(json.dumps(results, indent=1))


__all__ = ["AXES", "TINY", "pairwise", "row_overrides", "uncovered_pairs", "worker"]

if __name__ == "__main__":
    worker(sys.argv[1], sys.argv[2])
