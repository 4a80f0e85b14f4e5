"""Why a rung got faster: one optimization step's time split by what it was spent on.

`profile_steps` runs a few full steps under torch.profiler and sums the *self* time of every op
(its CPU time on CPU; on CUDA the device time of the kernels it launched itself) into the
categories of gpt2x.measure.CATEGORIES, so no nanosecond is counted twice. Whatever no op
accounts for (Python, the autograd engine's glue, waiting, an idle GPU) is "other", so the
categories add up to the profiled step time.

Op names map to categories through `categorize` (a pure function over the table `PATTERNS`).
Some categories *claim* everything that runs inside them: the elementwise ops of a for-loop
AdamW are optimizer time, the log-softmax inside `cross_entropy` is loss time, the softmax of
SDPA's math fallback is attention time.
"""

from __future__ import annotations

import re
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import asdict, dataclass

import torch
from torch.autograd import DeviceType
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from gpt2x import measure
from gpt2x.measure import CATEGORIES
from gpt2x.record.failure import one_line

# (regex, category), first match wins; matched against the op name with the autograd engine's
# "evaluate_function: " prefix removed. Names are what torch 2.13 records on CPU and CUDA.
PATTERNS: tuple[tuple[str, str], ...] = (
    # inductor kernels (cpp kernels are named only with TORCHINDUCTOR_CPP_ENABLE_KERNEL_PROFILE=1,
    # otherwise their time is the self time of "## Call CompiledFxGraph <hash> ##")
    (r"flex_attention", "attention"),
    (r"^triton_tem_", "matmul"),  # a GEMM template with a fused epilogue
    (
        r"^(graph_\d+_)?cpp_fused_|^triton_(poi|red|per|for)_|^## Call CompiledFxGraph",
        "fused kernels",
    ),
    # the compiled graph's runtime wrappers: guards, AOT autograd, the call into the graph
    (
        r"^(Torch-Compiled Region|TorchDynamo Cache Lookup|CompiledFunction|AOTDispatcher|"
        r"Pregraph bytecode)",
        "fused kernels",
    ),
    # "Optimizer.step#AdamW.step", "Optimizer.zero_grad#...", fused and foreach kernels
    # (clip_grad_norm_ runs as _foreach_norm: counted here too)
    (r"^Optimizer\.|^aten::_fused_(adamw?|sgd|adagrad)_|^aten::_foreach_", "optimizer"),
    (
        r"^(nccl|gloo|mpi|ucc):|^c10d::|^_?c10d_functional::|^record_param_comms|"
        r"^FSDP::(all_gather|post_backward_reduce|post_backward_rs_wait|.*prefetch)",
        "communication",
    ),
    (r"DataLoader|^aten::_?pin_memory|^aten::(item|_local_scalar_dense)$", "data/host"),
    (r"^aten::(cross_entropy_loss|_?log_softmax|_log_softmax_backward_data|nll_loss\w*)$", "loss"),
    # naive attention's two bmm's stay matmul; its mask + softmax are attention
    (
        r"^aten::(_?scaled_dot_product\w*|_flash_attention\w*|_efficient_attention\w*|"
        r"_cudnn_attention\w*|_?softmax|_softmax_backward_data|_safe_softmax|masked_fill_?)$",
        "attention",
    ),
    (
        r"^aten::(mm|addmm|bmm|baddbmm|addbmm|matmul|linear|_addmm_activation|mv|addmv|dot|"
        r"einsum|_int_mm|_scaled_mm\w*|_weight_int\w+|mkldnn_linear\w*|_mkldnn_matmul)$|"
        r"^mkldnn::_linear",
        "matmul",
    ),
    # views, allocation, metadata: no data moves, only dispatcher cost
    (
        r"^(aten::)?(view|_unsafe_view|reshape|as_strided|transpose|t|permute|expand|slice|select|"
        r"narrow|split|split_with_sizes|chunk|unbind|unsqueeze|squeeze|detach|alias|lift_fresh|"
        r"empty|empty_strided|empty_like|resize_|resolve_conj|resolve_neg|contiguous)$",
        "other",
    ),
    # every other aten op moves data without a matmul: layer norm, GELU, adds, casts, copies,
    # dropout, embedding, reductions; AccumulateGrad adds a gradient into .grad
    (r"^aten::|^torch::autograd::AccumulateGrad$", "elementwise+norm"),
)
_COMPILED = [(re.compile(p), c) for p, c in PATTERNS]
_BACKWARD = re.compile(r"^(\w+?)Backward\d*$")  # autograd node "NativeLayerNormBackward0"
_PREFIX = "autograd::engine::evaluate_function: "

# categories whose ops own everything that runs inside them
CLAIMING = frozenset({"optimizer", "loss", "attention", "communication", "data/host"})

STEP_MARK = "gpt2x::profiled_step"


class ProfilingUnavailable(RuntimeError):
    """torch.profiler cannot run here; the caller reports it and carries on."""


def categorize(op_name: str) -> str:
    """The category of one profiler event name (an op, a kernel, an autograd node)."""
    name = op_name.removeprefix(_PREFIX)
    for pattern, category in _COMPILED:
        if pattern.search(name):
            return category
    # an autograd node counts as its forward op: "AddmmBackward0" -> "aten::addmm"
    m = _BACKWARD.match(name)
    if m:
        return categorize("aten::" + re.sub(r"(?<!^)(?=[A-Z])", "_", m.group(1)).lower())
    return "other"


@dataclass
class Breakdown:
    """Milliseconds per step by category (summing to step_ms) over `steps` profiled steps."""

    step_ms: float
    categories: dict[str, float]
    steps: int
    device: str
    top_ops: list[tuple[str, str, float]]  # (op name, category, ms per step), largest first

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Breakdown:
        return cls(
            step_ms=float(d["step_ms"]),
            categories={k: float(v) for k, v in d["categories"].items()},
            steps=int(d["steps"]),
            device=str(d["device"]),
            top_ops=[(str(n), str(c), float(ms)) for n, c, ms in d["top_ops"]],
        )

    def summary(self) -> str:
        """One line for a log: the step time and each non-empty category's share."""
        parts = [
            f"{c} {ms:.1f} ({100 * ms / self.step_ms:.0f}%)"
            for c, ms in self.categories.items()
            if ms > 0 and self.step_ms > 0
        ]
        return f"{self.step_ms:.1f} ms/step on {self.device}: " + ", ".join(parts)


def profile_steps(step_fn: Callable[[], None], steps: int, device: torch.device) -> Breakdown:
    """Run `step_fn` (one full optimization step) `steps` times under torch.profiler and split
    the mean step time by category. Raises ProfilingUnavailable where the profiler cannot run:
    before any step, except on CUDA when no kernel was recorded (then the steps did run)."""
    device = torch.device(device)
    if steps < 1:
        raise ValueError(f"steps={steps}: profile at least 1 step")
    if device.type not in ("cpu", "cuda"):
        raise ProfilingUnavailable(f"no step breakdown on {device.type} (cpu and cuda only)")
    if not torch.profiler.kineto_available():
        raise ProfilingUnavailable("this torch build has no Kineto profiler; no step breakdown")
    if torch.autograd.profiler._is_profiler_enabled:  # a second one would break the first
        raise ProfilingUnavailable("another torch.profiler is running (debug=profiler?); skipped")
    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    prof = profile(activities=activities)
    sync()  # earlier work must not land in the first profiled step
    try:
        prof.start()
    except (RuntimeError, AssertionError) as e:
        raise ProfilingUnavailable(f"torch.profiler failed to start: {one_line(e)}") from e
    walls = []
    try:
        for _ in range(steps):
            t0 = time.perf_counter()
            with record_function(STEP_MARK):
                step_fn()
                sync()  # the step ends when its kernels do
            walls.append(time.perf_counter() - t0)
    finally:
        prof.stop()
    events = prof.events()
    roots = [e for e in events if e.name == STEP_MARK]  # CPU: one thread, nothing overlaps
    kernels, runtime = None, frozenset()
    if cuda:
        # backward launches from the autograd engine's own thread: every thread's ops count
        roots = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
        kernels, runtime = device_kernels(prof.profiler.kineto_results.events())
        if not kernels:
            raise ProfilingUnavailable("the profiler saw no CUDA kernels (CUPTI missing?)")
    return _breakdown(roots, 1e3 * sum(walls) / steps, steps, str(device), kernels, runtime)


def device_kernels(raw_events) -> tuple[list[tuple[str, int, float]], frozenset[str]]:
    """From Kineto's raw events: each kernel and copy on the GPU as (name, correlation id of
    the op that launched it, us), without the GPU copies of record_function ranges (they span
    kernels); and the names of the CUDA runtime calls (cudaLaunchKernel, ...), CPU events
    linked to an op whose own ids come from another counter. (torch 2.11's FunctionEvent has no
    linked_correlation_id; the raw event has it in every supported torch.)"""
    kernels, runtime = [], set()
    for k in raw_events:
        if k.device_type() == DeviceType.CUDA and not k.is_user_annotation():
            kernels.append((k.name(), k.linked_correlation_id(), (k.end_ns() - k.start_ns()) / 1e3))
        elif k.device_type() == DeviceType.CPU and k.linked_correlation_id() > 0:
            runtime.add(k.name())
    return kernels, frozenset(runtime)


def _breakdown(
    roots: list[FunctionEvent],
    step_ms: float,
    steps: int,
    device: str,
    kernels: list[tuple[str, int, float]] | None = None,
    runtime: frozenset[str] = frozenset(),
) -> Breakdown:
    """kernels None (CPU): each op's self CPU time. Else (CUDA): each kernel's (name,
    correlation id, us) time, in the category of the CPU op that launched it; the `runtime`
    calls (cudaLaunchKernel, ...) launch nothing of their own (their ids may equal an op's)."""
    per_op: dict[tuple[str, str], float] = defaultdict(float)  # (name, category) -> us
    launcher: dict[int, tuple[str, str]] = {}  # correlation id -> (op name, category)
    stack: list[tuple[FunctionEvent, str | None]] = []
    for root in roots:
        if root.name == STEP_MARK:
            # the marker's own self time is the Python between ops: left to "other"
            stack.extend((c, None) for c in root.cpu_children)
        else:
            stack.append((root, None))
    while stack:
        event, claim = stack.pop()
        cat = claim or categorize(event.name)
        if kernels is None:
            per_op[(event.name, cat)] += event.self_cpu_time_total
        elif event.name not in runtime:
            launcher[event.id] = (event.name, cat)
        inner = claim or (cat if cat in CLAIMING else None)
        stack.extend((c, inner) for c in event.cpu_children)
    for name, corr, us in kernels or ():
        if corr not in launcher:
            continue  # launched outside any op: stays in "other"
        op, cat = launcher[corr]
        # copies between host and device are data movement whatever op issued them
        if name.startswith("Memcpy") and ("HtoD" in name or "DtoH" in name):
            cat = "data/host"
        per_op[(op, cat)] += us

    ms = {key: us / 1e3 / steps for key, us in per_op.items()}
    categories = dict.fromkeys(CATEGORIES, 0.0)
    for (_, cat), v in ms.items():
        categories[cat] += v
    # the unattributed rest; below 0 only when kernels overlap (e.g. NCCL on its own stream)
    categories["other"] += max(0.0, step_ms - sum(categories.values()))
    top = sorted(((n, c, v) for (n, c), v in ms.items()), key=lambda t: -t[2])[: measure.TOP_OPS]
    return Breakdown(step_ms, categories, steps, device, top)


def mean_breakdown(breakdowns: list[Breakdown]) -> Breakdown:
    """Several profiled steps' breakdowns as one (gpt2x.measure.mean_breakdown)."""
    return Breakdown.from_dict(measure.mean_breakdown([b.to_dict() for b in breakdowns]))
