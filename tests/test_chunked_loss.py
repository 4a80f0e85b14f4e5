"""gpt2x.chunked_loss: the LM head + cross-entropy in row chunks equals the unchunked loss and its
gradients, eager and compiled, fp32 and bf16, and never holds the (N, V) logits."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from gpt2x import chunked_loss
from gpt2x.chunked_loss import chunked_cross_entropy
from gpt2x.model import GPT, GPTConfig

# a padded vocab, as 50304 pads GPT-2's 50257: head rows 90..95 exist but are never a target
V_REAL, V = 90, 96
N, C = 37, 16


def case(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, C, generator=g)
    w = 0.5 * torch.randn(V, C, generator=g)
    t = torch.randint(0, V_REAL, (N,), generator=g)
    t[[3, 17, 36]] = -1  # ignored rows, as the model marks padding targets
    return x, w, t


def unchunked(x, w, t, dtype=torch.float32):
    """The plain path: logits (N, V) in dtype, fp32 cross-entropy summed; value and gradients."""
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    logits = x.to(dtype) @ w.to(dtype).t()
    loss = F.cross_entropy(logits.float(), t, ignore_index=-1, reduction="sum")
    loss.backward()
    return loss.detach(), x.grad, w.grad


def chunked(x, w, t, chunk, dtype=torch.float32, compile=False, scale=1.0):
    x, w = x.clone().requires_grad_(), w.clone().requires_grad_()
    loss = chunked_cross_entropy(x, w, t, chunk, dtype, ignore_index=-1, compile=compile)
    (loss * scale).backward()
    return loss.detach(), x.grad, w.grad


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm()).item()


@pytest.mark.parametrize(
    "chunk,compile",
    [(5, False), (37, False), (64, False), (5, True)],
    ids=["partial-last-chunk", "one-chunk", "chunk-above-N", "compiled"],
)
def test_fp32_equals_the_unchunked_loss_and_gradients(chunk, compile):
    ref, ref_gx, ref_gw = unchunked(*case())
    value, gx, gw = chunked(*case(), chunk, compile=compile)
    assert value.dtype == torch.float32
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-5)
    torch.testing.assert_close(gx, ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, ref_gw, rtol=1e-5, atol=1e-6)
    # ignored rows get no gradient; the padding rows of the head do (their softmax share)
    assert gx[[3, 17, 36]].abs().max() == 0
    assert gw[V_REAL:].abs().max() > 0


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_bf16_is_as_close_to_fp32_as_the_unchunked_bf16_path(compile):
    # bf16 matmuls (the head under bf16 autocast), fp32 softmax and sums: the error against the
    # fp32 reference comes from the bf16 logits and gradients, as in the plain path. Measured
    # at this shape: loss ~3e-4 relative, gradients ~5e-3; the bounds leave room for a
    # different matmul blocking, and the last assert shows bf16 really ran.
    ref, ref_gx, ref_gw = unchunked(*case())
    plain, plain_gx, plain_gw = unchunked(*case(), dtype=torch.bfloat16)
    value, gx, gw = chunked(*case(), 5, torch.bfloat16, compile=compile)
    assert value.dtype == torch.float32 and gx.dtype == gw.dtype == torch.float32
    assert value.item() == pytest.approx(ref.item(), rel=2e-3)
    assert value.item() == pytest.approx(plain.item(), rel=1e-3)
    for got, want, base in ((gx, ref_gx, plain_gx), (gw, ref_gw, plain_gw)):
        assert rel(got, want) < 2e-2
        assert rel(got, want) < 2 * rel(base, want) + 1e-3  # no worse than the plain bf16 path
    assert rel(gw, ref_gw) > 1e-4


def test_gradients_follow_the_upstream_gradient():
    # the gradients are computed in the forward; backward must still scale them (the model
    # divides the sum by the count of targets, a trainer by the accumulation steps)
    _, ref_gx, ref_gw = unchunked(*case())
    _, gx, gw = chunked(*case(), 5, scale=-2.5)
    torch.testing.assert_close(gx, -2.5 * ref_gx, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gw, -2.5 * ref_gw, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_without_grad_the_loss_alone(compile):
    ref, _, _ = unchunked(*case())
    x, w, t = case()
    with torch.no_grad():
        value = chunked_cross_entropy(x, w, t, 5, ignore_index=-1, compile=compile)
    torch.testing.assert_close(value, ref, rtol=1e-6, atol=1e-5)


class LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (numel)."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for o in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(o, torch.Tensor):
                self.numel = max(self.numel, o.numel())
        return out


def test_never_holds_more_than_one_chunk_of_logits():
    x, w, t = case()
    with LargestTensor() as plain:
        unchunked(x, w, t)
    # the operator's own code, every op it runs recorded (the chunk kernel op by op)
    run = chunked_loss._loss_and_grads._init_fn
    with LargestTensor() as rows_of_8:
        value, grad_x, grad_w = run(x, w, t, 8, torch.float32, -1, False, True)
    assert value.item() == pytest.approx(unchunked(x, w, t)[0].item(), rel=1e-6)
    assert plain.numel == N * V  # the plain path's logits
    # the largest is the weight's gradient (V x C), then a chunk's logits (8 x V)
    assert rows_of_8.numel == max(V * C, 8 * V) < N * V
    assert chunked_loss._workspace.logits.shape == (8, V)


def test_buffers_are_kept_across_calls_on_a_cpu_only():
    """On a GPU (here the meta device stands in for any non-CPU one) every call takes fresh
    buffers from the caching allocator: kept ones would sit in a CUDA graph's private pool."""
    cpu = torch.empty(V, C)
    assert chunked_loss._get_workspace(cpu, torch.float32, 8) is chunked_loss._get_workspace(
        cpu, torch.float32, 8
    )
    kept = chunked_loss._workspace
    gpu = torch.empty(V, C, device="meta")
    first = chunked_loss._get_workspace(gpu, torch.bfloat16, 8)
    second = chunked_loss._get_workspace(gpu, torch.bfloat16, 8)
    assert first is not second and first.logits.shape == (8, V) and first.logits.is_meta
    assert chunked_loss._workspace is kept  # the CPU's buffers untouched


@pytest.mark.slow
@pytest.mark.parametrize(
    "kernel,bf16",
    [
        ("gpt2x", False),
        ("gpt2x", True),
        pytest.param(
            "torch",
            False,
            marks=pytest.mark.skipif(
                not hasattr(F, "linear_cross_entropy"), reason="torch < 2.13"
            ),
        ),
    ],
)
def test_compiled_model_with_chunked_loss_matches_the_eager_plain_model(kernel, bf16):
    # the whole model under torch.compile: both chunked kernels are operators of their own in
    # its graph (gpt2x's runs its compiled chunk kernel inside)
    def run(loss: str, compiled: bool, autocast: bool):
        torch.manual_seed(0)
        model = GPT(
            GPTConfig(
                block_size=32, vocab_size=V, n_layer=1, n_head=2, n_embd=32, attn="sdpa",
                loss=loss, loss_chunk_size=12, loss_kernel=kernel,
            )
        )  # fmt: skip
        g = torch.Generator().manual_seed(1)
        idx = torch.randint(0, V_REAL, (2, 16), generator=g)
        targets = torch.randint(0, V_REAL, (2, 16), generator=g)
        targets[1, 9:] = -1
        fwd = torch.compile(model) if compiled else model
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            _, value = fwd(idx, targets)
        value.backward()
        return value.detach(), {n: p.grad for n, p in model.named_parameters()}

    ref, ref_grads = run("plain", compiled=False, autocast=False)
    value, grads = run("chunked", compiled=True, autocast=bf16)
    assert value.item() == pytest.approx(ref.item(), rel=5e-3 if bf16 else 1e-5)
    for n, g in ref_grads.items():
        assert rel(grads[n], g) < (2e-2 if bf16 else 1e-5), n
