"""The per-step time breakdown (gpt2x.training.profiling) and its plot (gpt2x.lab.plots), on CPU."""

from __future__ import annotations

import itertools
import json
import time
from types import SimpleNamespace

import pytest
import torch

from gpt2x.lab import plots
from gpt2x.model import GPT, GPTConfig
from gpt2x.training.profiling import (
    CATEGORIES,
    PATTERNS,
    STEP_MARK,
    Breakdown,
    ProfilingUnavailable,
    _breakdown,
    categorize,
    device_kernels,
    profile_steps,
)

CPU = torch.device("cpu")

# names recorded by torch 2.13 on this CPU (eager, bf16 + compile + flash + fused AdamW), plus
# the communication/data/CUDA-side names the table is meant for
REAL_NAMES = [
    ("aten::mm", "matmul"),
    ("aten::addmm", "matmul"),
    ("aten::bmm", "matmul"),
    ("autograd::engine::evaluate_function: AddmmBackward0", "matmul"),
    ("MmBackward0", "matmul"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu", "attention"),
    ("aten::_scaled_dot_product_flash_attention_for_cpu_backward", "attention"),
    ("aten::scaled_dot_product_attention", "attention"),
    ("ScaledDotProductFlashAttentionForCpuBackward0", "attention"),
    ("aten::_softmax", "attention"),
    ("aten::cross_entropy_loss", "loss"),
    ("aten::_log_softmax", "loss"),
    ("aten::_log_softmax_backward_data", "loss"),
    ("aten::nll_loss_forward", "loss"),
    ("aten::nll_loss_backward", "loss"),
    ("autograd::engine::evaluate_function: NllLossBackward0", "loss"),
    ("LogSoftmaxBackward0", "loss"),
    ("aten::native_layer_norm", "elementwise+norm"),
    ("aten::native_layer_norm_backward", "elementwise+norm"),
    ("NativeLayerNormBackward0", "elementwise+norm"),
    ("aten::gelu", "elementwise+norm"),
    ("aten::gelu_backward", "elementwise+norm"),
    ("aten::add", "elementwise+norm"),
    ("aten::copy_", "elementwise+norm"),
    ("aten::_to_copy", "elementwise+norm"),
    ("aten::embedding_dense_backward", "elementwise+norm"),
    ("torch::autograd::AccumulateGrad", "elementwise+norm"),
    (
        "## Call CompiledFxGraph frqm3x6tmok47ealvfdrcggjuek2s5khym2yrw5l6vpvjbr6dnfs ##",
        "fused kernels",
    ),
    ("graph_0_cpp_fused__to_copy_gelu_gelu_backward_sum_view_2", "fused kernels"),
    # a fused kernel that contains the loss is still a fused kernel
    (
        "graph_0_cpp_fused__log_softmax__log_softmax_backward_data__to_copy_nll_loss_forward_0",
        "fused kernels",
    ),
    ("triton_poi_fused_add_native_layer_norm_0", "fused kernels"),
    ("triton_red_fused__log_softmax_1", "fused kernels"),
    ("CompiledFunction", "fused kernels"),
    ("CompiledFunctionBackward", "fused kernels"),
    ("autograd::engine::evaluate_function: CompiledFunctionBackward", "fused kernels"),
    ("Torch-Compiled Region: 0/0", "fused kernels"),
    ("TorchDynamo Cache Lookup", "fused kernels"),
    ("AOTDispatcher Runtime Wrapper Prologue", "fused kernels"),
    ("Pregraph bytecode", "fused kernels"),
    ("Optimizer.step#AdamW.step", "optimizer"),
    ("Optimizer.zero_grad#AdamW.zero_grad", "optimizer"),
    ("Optimizer.step#Muon.step", "optimizer"),
    ("aten::_fused_adamw_", "optimizer"),
    ("aten::_foreach_add_", "optimizer"),
    ("gloo:all_reduce", "communication"),
    ("nccl:all_reduce", "communication"),
    ("c10d::allreduce_", "communication"),
    ("record_param_comms", "communication"),
    ("FSDP::all_gather", "communication"),
    ("enumerate(DataLoader)#_SingleProcessDataLoaderIter.__next__", "data/host"),
    ("aten::pin_memory", "data/host"),
    ("aten::_local_scalar_dense", "data/host"),
    ("aten::view", "other"),
    ("aten::empty_strided", "other"),
    ("ViewBackward0", "other"),
    ("detach", "other"),
    ("DistributedDataParallel.forward", "other"),
    (STEP_MARK, "other"),
]


@pytest.mark.parametrize("name,category", REAL_NAMES)
def test_categorize_real_names(name, category):
    assert categorize(name) == category


def test_every_category_has_a_colour_and_a_pattern():
    assert set(plots.BREAKDOWN_COLORS) == set(CATEGORIES)
    assert {c for _, c in PATTERNS} <= set(CATEGORIES)


def tiny_step(attn: str = "sdpa", compile: bool = False):
    """One AdamW step of the tiny GPT on CPU, and the list its own wall times go into."""
    torch.manual_seed(0)
    cfg = GPTConfig(n_layer=2, n_head=2, n_embd=64, block_size=64, vocab_size=512, attn=attn)
    model = GPT(cfg).to(CPU)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    fwd = torch.compile(model) if compile else model
    x, y = torch.randint(0, 512, (4, 64)), torch.randint(0, 512, (4, 64))
    walls: list[float] = []

    def step() -> None:
        t0 = time.perf_counter()
        _, loss = fwd(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        walls.append(time.perf_counter() - t0)

    step()  # first step allocates the optimizer state: not representative
    walls.clear()
    return step, walls


def check_sums(b: Breakdown) -> None:
    assert list(b.categories) == list(CATEGORIES)
    assert all(v >= 0 for v in b.categories.values())
    # "other" is the unattributed rest, so the parts add up to the step (float rounding only)
    assert sum(b.categories.values()) == pytest.approx(b.step_ms, rel=1e-9)
    assert len(b.top_ops) <= 15
    assert [t[2] for t in b.top_ops] == sorted((t[2] for t in b.top_ops), reverse=True)
    assert sum(t[2] for t in b.top_ops) <= b.step_ms + 1e-9


@pytest.mark.parametrize("attn", ["sdpa", "naive"])
def test_tiny_gpt_step_breakdown(attn):
    step, walls = tiny_step(attn)
    b = profile_steps(step, 3, CPU)
    check_sums(b)
    assert b.steps == 3 and len(walls) == 3 and b.device == "cpu"
    # the profiled step time is the step's own wall time (plus the marker's microseconds)
    own_ms = 1e3 * sum(walls) / len(walls)
    assert own_ms <= b.step_ms <= 1.2 * own_ms + 2.0
    cats = b.categories
    for c in ("matmul", "attention", "loss", "elementwise+norm", "optimizer"):
        assert cats[c] > 0, c
    assert cats["fused kernels"] == cats["communication"] == 0
    # ops account for most of an eager step; Python between them is the rest
    assert cats["other"] < 0.6 * b.step_ms
    ops = {n: c for n, c, _ in b.top_ops}
    assert ops.get("aten::mm") == "matmul"
    # the for-loop AdamW's elementwise ops are claimed by the optimizer
    assert all(c == "optimizer" for n, c, _ in b.top_ops if n in ("aten::lerp_", "aten::addcdiv_"))


def test_matmul_only_step_is_matmul():
    a, w = torch.randn(512, 512), torch.randn(512, 512)
    torch.mm(a, w)  # first call: allocator and BLAS set-up
    b = profile_steps(lambda: torch.mm(a, w), 10, CPU)
    check_sums(b)
    assert b.categories["matmul"] > 0.5 * b.step_ms
    assert all(v == 0 for c, v in b.categories.items() if c not in ("matmul", "other"))
    assert b.top_ops[0][:2] == ("aten::mm", "matmul")


def test_python_only_step_is_other():
    b = profile_steps(lambda: sum(i * i for i in range(20_000)), 3, CPU)
    check_sums(b)
    assert b.categories["other"] == pytest.approx(b.step_ms, rel=1e-9)
    assert b.top_ops == []


@pytest.mark.parametrize("fused", [False, True])
def test_optimizer_step_is_optimizer(fused):
    model = torch.nn.Linear(64, 64)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    # foreach=False: a per-tensor loop of elementwise ops, all claimed by the optimizer
    kind = {"fused": True} if fused else {"foreach": False}
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3, **kind)
    opt.step()
    b = profile_steps(opt.step, 3, CPU)
    check_sums(b)
    # all attributed time is the optimizer's (a short step: "other" may catch a preemption)
    assert b.categories["optimizer"] > 0
    assert all(v == 0 for c, v in b.categories.items() if c not in ("optimizer", "other"))
    ops = {n: c for n, c, _ in b.top_ops}
    assert ops["Optimizer.step#AdamW.step"] == "optimizer"
    assert ops["aten::_fused_adamw_" if fused else "aten::addcdiv_"] == "optimizer"


class CudaTrace:
    """Stand-ins for a CUDA run's events: CPU ops (name, id, children) and the device-side
    kernels (name, correlation id of the launching op, us) that profile_steps hands over."""

    def __init__(self) -> None:
        self.kernels: list[tuple[str, int, float]] = []
        self.ids = itertools.count(1)

    def op(self, name: str, kernels=(), children=()) -> SimpleNamespace:
        corr = next(self.ids)  # the op's correlation id, unique per op
        self.kernels += [(k, corr, us) for k, us in kernels]
        return SimpleNamespace(name=name, id=corr, cpu_children=list(children))


def test_cuda_attribution_by_kernels():
    # device time is charged to the launching op's category; H2D copies are data/host
    t = CudaTrace()
    roots = [
        t.op(
            STEP_MARK,
            children=[
                t.op("aten::copy_", [("Memcpy HtoD (Pinned -> Device)", 100.0)]),
                t.op("aten::mm", [("sm90_xmma_gemm_bf16", 2000.0)]),
                t.op(
                    "aten::cross_entropy_loss",
                    children=[t.op("aten::_log_softmax", [("softmax_warp_forward", 300.0)])],
                ),
                t.op(
                    "Optimizer.step#AdamW.step",
                    children=[t.op("aten::_fused_adamw_", [("multi_tensor_apply_kernel", 400.0)])],
                ),
                t.op("triton_poi_fused_add_0", [("triton_poi_fused_add_0", 200.0)]),
            ],
        ),
        # backward runs on the autograd thread: a root of its own
        t.op(
            "autograd::engine::evaluate_function: MmBackward0",
            children=[t.op("aten::mm", [("sm90_xmma_gemm_bf16", 1000.0)])],
        ),
    ]
    t.kernels.append(("launched_outside_any_op", -1, 50.0))  # no launcher: stays "other"
    b = _breakdown(roots, step_ms=5.0, steps=1, device="cuda:0", kernels=t.kernels)
    check_sums(b)
    want = {"data/host": 0.1, "matmul": 3.0, "loss": 0.3, "optimizer": 0.4, "fused kernels": 0.2}
    for c, ms in want.items():
        assert b.categories[c] == pytest.approx(ms), c
    assert b.categories["other"] == pytest.approx(1.0)  # the GPU's idle time
    assert b.top_ops[0] == ("aten::mm", "matmul", pytest.approx(3.0))


def test_cuda_overlapping_kernels_clamp_other_at_zero():
    t = CudaTrace()
    roots = [
        t.op("nccl:all_reduce", [("ncclDevKernel_AllReduce", 3000.0)]),
        t.op("aten::mm", [("gemm", 3000.0)]),
    ]
    b = _breakdown(roots, step_ms=4.0, steps=1, device="cuda:0", kernels=t.kernels)
    assert b.categories["other"] == 0
    assert b.categories["communication"] == b.categories["matmul"] == pytest.approx(3.0)


def test_breakdown_json_round_trip():
    step, _ = tiny_step()
    b = profile_steps(step, 1, CPU)
    d = json.loads(json.dumps(b.to_dict()))
    assert Breakdown.from_dict(d) == b
    assert b.summary().startswith(f"{b.step_ms:.1f} ms/step on cpu: ")


def test_unavailable_is_one_line_and_runs_nothing():
    calls = []
    with pytest.raises(ProfilingUnavailable, match="cpu and cuda only"):
        profile_steps(lambda: calls.append(1), 2, torch.device("meta"))
    with torch.profiler.profile(), pytest.raises(ProfilingUnavailable, match="another"):
        profile_steps(lambda: calls.append(1), 2, CPU)
    assert calls == []
    with pytest.raises(ValueError, match="at least 1"):
        profile_steps(lambda: None, 0, CPU)


def test_step_error_propagates_and_profiler_stops():
    def boom() -> None:
        raise KeyError("boom")

    with pytest.raises(KeyError):
        profile_steps(boom, 2, CPU)
    assert not torch.autograd.profiler._is_profiler_enabled
    a = torch.randn(64, 64)
    assert profile_steps(lambda: a @ a, 1, CPU).categories["matmul"] > 0


@pytest.mark.slow
def test_compiled_step_shows_fused_kernels():
    step, _ = tiny_step(compile=True)
    step()  # compiles the backward graph too
    b = profile_steps(step, 2, CPU)
    check_sums(b)
    cats = b.categories
    assert cats["fused kernels"] > 0
    assert cats["matmul"] > 0  # inductor calls the GEMMs as extern aten::mm/addmm
    names = [n for n, _, _ in b.top_ops]
    assert any(n.startswith("## Call CompiledFxGraph") for n in names)
    # the loss and layer norms run inside fused kernels now
    assert cats["loss"] == 0


# ---- the plot ---------------------------------------------------------------------------------


def fake(step_ms: float, **cats: float) -> dict:
    full = dict.fromkeys(CATEGORIES, 0.0) | {k.replace("_", " "): v for k, v in cats.items()}
    return {"step_ms": step_ms, "categories": full, "steps": 1, "device": "cpu", "top_ops": []}


def bar_heights(fig) -> dict[str, list[float]]:
    """Read the stacked bars back: category -> heights, one per rung, from the Axes patches."""
    ax = fig.axes[0]
    return {c.get_label(): [p.get_height() for p in c.patches] for c in ax.containers}


def test_plot_breakdown_bars_match_the_data(tmp_path):
    rows = [
        {"name": "fp32", "breakdown": fake(10.0, matmul=6.0, other=4.0)},
        {"name": "bf16", "breakdown": None},
        {"name": "compile", "breakdown": fake(5.0, matmul=3.0, fused_kernels=1.5, other=0.5)},
    ]
    fig = plots.breakdown_figure(rows)
    heights = bar_heights(fig)
    assert list(heights) == list(CATEGORIES)
    assert heights["matmul"] == [6.0, 0.0, 3.0]
    assert heights["fused kernels"] == [0.0, 0.0, 1.5]
    assert heights["other"] == [4.0, 0.0, 0.5]
    # stacked: each segment starts where the one below it ends
    ax = fig.axes[0]
    other = next(c for c in ax.containers if c.get_label() == "other")
    assert [p.get_y() for p in other.patches] == [6.0, 0.0, 4.5]
    texts = [t.get_text() for t in ax.texts]
    assert texts == ["10.0 ms", "no profile", "5.0 ms"]
    assert [t.get_text() for t in ax.get_xticklabels()] == ["fp32", "bf16", "compile"]
    colors = {c.get_label(): c.patches[0].get_facecolor() for c in ax.containers}
    from matplotlib.colors import to_rgba

    assert colors["matmul"] == to_rgba(plots.BREAKDOWN_COLORS["matmul"])
    path = plots.plot_breakdown(rows, tmp_path / "breakdown.png")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_unknown_category_counts_as_other():
    bd = fake(3.0, matmul=1.0, other=1.0)
    bd["categories"]["some new category"] = 1.0
    heights = bar_heights(plots.breakdown_figure([{"name": "x", "breakdown": bd}]))
    assert heights["other"] == [2.0] and heights["matmul"] == [1.0]


def test_plot_from_a_real_breakdown(tmp_path):
    a = torch.randn(128, 128)
    b = profile_steps(lambda: a @ a, 2, CPU)
    heights = bar_heights(plots.breakdown_figure([{"name": "mm", "breakdown": b.to_dict()}]))
    assert sum(h[0] for h in heights.values()) == pytest.approx(b.step_ms)


def test_kernels_come_from_kinetos_raw_events():
    """device_kernels reads Kineto's raw events (torch 2.11's FunctionEvent has no
    linked_correlation_id): kernels and copies with their launching op's id and us; the GPU
    copies of record_function ranges left out; the runtime calls named."""

    def raw(name, device, linked, start_ns=0, end_ns=0, annotation=False):
        return SimpleNamespace(
            name=lambda: name,
            device_type=lambda: device,
            linked_correlation_id=lambda: linked,
            start_ns=lambda: start_ns,
            end_ns=lambda: end_ns,
            is_user_annotation=lambda: annotation,
        )

    cpu, cuda = torch.autograd.DeviceType.CPU, torch.autograd.DeviceType.CUDA
    kernels, runtime = device_kernels(
        [
            raw("aten::mm", cpu, 0),
            raw("cudaLaunchKernel", cpu, 7),
            raw("sm90_xmma_gemm_bf16", cuda, 7, 1_000, 3_500),
            raw("Optimizer.step#AdamW.step", cuda, 9, 0, 9_000, annotation=True),
            raw("Memcpy HtoD (Pinned -> Device)", cuda, 4, 10_000, 10_200),
        ]
    )
    assert kernels == [("sm90_xmma_gemm_bf16", 7, 2.5), ("Memcpy HtoD (Pinned -> Device)", 4, 0.2)]
    assert runtime == {"cudaLaunchKernel"}


def test_a_runtime_call_sharing_an_ops_id_launches_nothing():
    # cudaLaunchKernel's own id comes from CUPTI's counter: equal to another op's id, it must
    # not take that op's kernels (it is visited after its parent, in whatever order)
    t = CudaTrace()
    mm = t.op("aten::mm", [("sm90_xmma_gemm_bf16", 2000.0)])
    launch = SimpleNamespace(name="cudaLaunchKernel", id=mm.id, cpu_children=[])
    softmax = t.op("aten::_log_softmax", [("softmax_warp_forward", 300.0)], children=[launch])
    roots = [t.op(STEP_MARK, children=[mm, softmax])]
    b = _breakdown(
        roots, 3.0, 1, "cuda:0", kernels=t.kernels, runtime=frozenset({"cudaLaunchKernel"})
    )
    assert b.categories["matmul"] == pytest.approx(2.0)
    assert b.categories["loss"] == pytest.approx(0.3)


@pytest.mark.parametrize("when", ["after the step", "before the step", "the step itself"])
def test_a_failing_breakdown_never_fails_the_run(monkeypatch, when):
    from gpt2x import train

    steps = []

    def step(run, n):
        steps.append(n)
        if when == "the step itself":
            raise RuntimeError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"loss": 1.0}

    def profile(step_fn, n, device):
        if when != "before the step":
            step_fn()
        raise AttributeError("'FunctionEvent' object has no attribute 'linked_correlation_id'")

    monkeypatch.setattr(train, "train_step", step)
    monkeypatch.setattr(train, "profile_steps", profile)
    data: dict = {}
    run = SimpleNamespace(
        dist=SimpleNamespace(device=torch.device("cpu"), is_main=True),
        record=SimpleNamespace(data=data, update=lambda **kw: data.update(kw)),
    )
    breakdowns: list = []
    if when == "the step itself":
        with pytest.raises(RuntimeError, match="out of memory"):
            train.profiled_step(run, 5, breakdowns)
        assert "breakdown_error" not in data
        return
    assert train.profiled_step(run, 5, breakdowns) == {"loss": 1.0}
    assert steps == [5] and breakdowns == []  # the step ran once, profiled or not
    assert data["breakdown_error"] == (
        "the step-time breakdown failed: AttributeError: 'FunctionEvent' object has no "
        "attribute 'linked_correlation_id'"
    )
