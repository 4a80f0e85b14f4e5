"""What a speed measurement is, in one torch-free place for the trainer and the lab alike: which
steps a step time counts, the step-time breakdown's categories and how breakdowns average.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import TypeVar

# untimed steps before the measured ones (trainer.warmup_steps_for_timing's default; a record
# that does not say, and an ablation whose ladder does not say, use it too)
DEFAULT_WARMUP = 3

# the step-time breakdown's categories (gpt2x.training.profiling), in the order of the report's
# stacked bars, bottom to top
CATEGORIES = (
    "matmul",
    "attention",
    "loss",
    "elementwise+norm",
    "fused kernels",
    "optimizer",
    "communication",
    "data/host",
    "other",
)
TOP_OPS = 15  # ops a breakdown lists by name, largest first

T = TypeVar("T")


def timed(steps: Sequence[T], warmup: int) -> list[T]:
    """The steps a step time counts: the first `warmup` skipped, but always the last one kept
    (a run shorter than its warm-up is still measured, by its last step)."""
    return list(steps[min(max(0, warmup), max(0, len(steps) - 1)) :])


def mean_breakdown(breakdowns: Sequence[dict]) -> dict:
    """Several breakdowns (a run's profiled steps, or a row's repeats) as one: the mean step
    time and the mean of each category (so they still add up to the step time), the steps
    summed, the top ops re-ranked by their mean."""
    if not breakdowns:
        raise ValueError("mean_breakdown needs at least one breakdown")
    n = len(breakdowns)
    names = [*CATEGORIES, *(c for b in breakdowns for c in b["categories"] if c not in CATEGORIES)]
    ops: dict[tuple[str, str], float] = defaultdict(float)
    for b in breakdowns:
        for name, cat, ms in b.get("top_ops") or ():
            ops[(name, cat)] += ms / n
    top = sorted(((name, cat, ms) for (name, cat), ms in ops.items()), key=lambda t: -t[2])
    return {
        "step_ms": sum(b["step_ms"] for b in breakdowns) / n,
        "categories": {
            c: sum(b["categories"].get(c, 0.0) for b in breakdowns) / n for c in dict.fromkeys(names)
        },
        "steps": sum(b.get("steps", 1) for b in breakdowns),
        "device": breakdowns[0].get("device"),
        "top_ops": top[:TOP_OPS],
    }
