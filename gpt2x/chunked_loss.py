"""Cross-entropy of a linear head (the LM head) in chunks of rows, never holding the (N, V) logits.

For each chunk of rows: the logits (one matmul), then one compiled kernel that turns them, in
place, into the gradient of the loss with respect to them (d loss / d logits = softmax -
one_hot(target): the backward needs nothing the forward does not have, so it is done in the
forward) and returns the chunk's loss, then the gradients with respect to the chunk's inputs and
to the head's weight (two matmuls). So one chunk of logits exists at a time, the head costs the
same three matmuls as the unchunked head, and the softmax, the loss and the gradient of the
logits are one fused pass over the chunk instead of separate elementwise ops.

The whole computation is one operator (`gpt2x::chunked_cross_entropy`, as torch's own
linear_cross_entropy is): a compiled model calls it as a single node and it runs chunk by chunk
as written here. (Traced into the model's graph instead, the compiler ran every chunk's matmul
first and kept every chunk's weight gradient: memory growing with the number of chunks.) On a
CPU its chunk-sized buffers are kept from one call to the next (`_Workspace`): a fresh 50 MB
buffer per chunk costs its page faults every time there. Works on any torch with torch.compile
(torch >= 2.6); torch's `F.linear_cross_entropy` (torch >= 2.13) runs its chunks as eager ops.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
from torch import Tensor


def _softmax_grad(logits: Tensor, targets: Tensor, ignore_index: int, out: Tensor):
    """From a chunk's logits (n, V): `out` (n, V) becomes the gradient of the chunk's summed
    loss with respect to them (in out's dtype), except at the targets. Returns (summed loss in
    fp32, the target column of each row, the gradient there) for the caller to write: writing
    the targets' entries here would cost one more pass."""
    lf = logits.float()  # fp32 softmax even when the matmul ran in bf16
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    top = lf.amax(-1, keepdim=True)
    sumexp = torch.exp(lf - top).sum(-1)
    lse = top.squeeze(1) + sumexp.log()
    target_logit = lf.gather(1, safe[:, None]).squeeze(1)
    loss = torch.where(valid, lse - target_logit, 0.0).sum()
    # softmax - one_hot(target), zero on ignored rows: the softmax of every logit here, the
    # target's entry (softmax - 1) written afterwards (1.7x faster on CPU than comparing every
    # column with the target). Into a second buffer: in place, the compiler split the pass over
    # each row in two (1.5x slower).
    out.copy_(torch.exp(lf - top) * (valid / sumexp)[:, None])
    at_target = (torch.exp(target_logit - lse) - 1.0) * valid
    return loss, safe, at_target.to(out.dtype)


def _accumulate(total: Tensor, part: Tensor) -> None:
    """total (fp32) += part (e.g. bf16): one pass (eager, the mixed dtypes cost a copy first)."""
    total.add_(part.float())


def _softmax_loss(logits: Tensor, targets: Tensor, ignore_index: int) -> Tensor:
    """A chunk's summed loss (fp32) from its logits (n, V)."""
    lf = logits.float()
    valid = targets != ignore_index
    safe = torch.where(valid, targets, 0)
    target_logit = lf.gather(1, safe[:, None]).squeeze(1)
    return torch.where(valid, lf.logsumexp(-1) - target_logit, 0.0).sum()


@functools.cache
def _compiled(fn):
    # one graph per chunk shape (a partial last chunk is a second); compiled on first use, since
    # importing the compiler takes seconds
    return torch.compile(fn, dynamic=False)


@dataclass
class _Workspace:
    """Buffers reused from call to call: the weight in the matmuls' dtype, one chunk's logits
    and their gradient, one chunk's weight gradient."""

    key: tuple
    weight: Tensor
    logits: Tensor
    grad: Tensor
    grad_weight: Tensor


_workspace: _Workspace | None = None  # the last shape's (one model trains at a time)


def _new_workspace(key: tuple, weight: Tensor, dtype: torch.dtype, chunk: int) -> _Workspace:
    empty = functools.partial(torch.empty, dtype=dtype, device=weight.device)
    rows = (chunk, weight.size(0))
    return _Workspace(key, empty(weight.shape), empty(rows), empty(rows), empty(weight.shape))


def _get_workspace(weight: Tensor, dtype: torch.dtype, chunk: int) -> _Workspace:
    """The call's buffers: kept from call to call on a CPU only. On a GPU the caching allocator
    already reuses freed blocks, and a buffer kept past the call would be left in a CUDA graph's
    private pool (compile mode reduce-overhead), untracked: torch's cudagraph checks stop there."""
    global _workspace
    key = (weight.device, dtype, tuple(weight.shape), chunk)
    if weight.device.type != "cpu":
        return _new_workspace(key, weight, dtype, chunk)
    if _workspace is None or _workspace.key != key:
        _workspace = None  # free the old buffers first
        _workspace = _new_workspace(key, weight, dtype, chunk)
    return _workspace


@torch.library.custom_op("gpt2x::chunked_cross_entropy", mutates_args=())
def _loss_and_grads(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int,
    dtype: torch.dtype,
    ignore_index: int,
    compile: bool,
    grads: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    """(summed loss in fp32, its gradient with respect to x, to weight); without `grads` the
    gradients are empty tensors."""
    rows = x.size(0)
    ws = _get_workspace(weight, dtype, min(chunk_size, rows))
    wc = weight if weight.dtype == dtype else ws.weight.copy_(weight)
    xc = x.to(dtype)
    total = torch.zeros((), dtype=torch.float32, device=x.device)
    chunks = [(i, min(chunk_size, rows - i)) for i in range(0, rows, chunk_size)]
    if not grads:
        loss_of = _compiled(_softmax_loss) if compile else _softmax_loss
        for i, n in chunks:
            logits = torch.mm(xc[i : i + n], wc.t(), out=ws.logits[:n])
            total += loss_of(logits, targets[i : i + n], ignore_index)
        return total, x.new_empty(0), weight.new_empty(0)
    grad_of = _compiled(_softmax_grad) if compile else _softmax_grad
    accumulate = _compiled(_accumulate) if compile else _accumulate
    grad_x = torch.empty_like(xc)
    # the chunks' weight gradients (bf16 when the matmuls are) summed in fp32
    grad_w = torch.empty(weight.shape, dtype=torch.float32, device=x.device)
    for i, n in chunks:
        xi = xc[i : i + n]
        logits = torch.mm(xi, wc.t(), out=ws.logits[:n])
        loss, col, at_target = grad_of(logits, targets[i : i + n], ignore_index, ws.grad[:n])
        g = ws.grad[:n]
        g[torch.arange(n, device=g.device), col] = at_target  # g: d loss / d logits
        total += loss
        torch.mm(g, wc, out=grad_x[i : i + n])
        if dtype == torch.float32:
            grad_w.addmm_(g.t(), xi, beta=1 if i else 0)
        elif i:
            accumulate(grad_w, torch.mm(g.t(), xi, out=ws.grad_weight))
        else:
            grad_w.copy_(torch.mm(g.t(), xi, out=ws.grad_weight))
    return total, grad_x.to(x.dtype), grad_w.to(weight.dtype)


@_loss_and_grads.register_fake
def _(x, weight, targets, chunk_size, dtype, ignore_index, compile, grads):
    total = x.new_empty((), dtype=torch.float32)
    if not grads:
        return total, x.new_empty(0), weight.new_empty(0)
    return total, torch.empty_like(x), torch.empty_like(weight)


def _setup_context(ctx, inputs, output) -> None:
    ctx.save_for_backward(output[1], output[2])
    # the gradients are outputs only to be saved: no gradient flows into them (and none is
    # materialised as zeros for them in the backward)
    ctx.mark_non_differentiable(output[1], output[2])
    ctx.set_materialize_grads(False)


def _backward(ctx, grad_total, _grad_x, _grad_w):
    # the gradients were computed in the forward; only the upstream gradient scales them
    grad_x, grad_w = ctx.saved_tensors
    return grad_x * grad_total, grad_w * grad_total, None, None, None, None, None, None


_loss_and_grads.register_autograd(_backward, setup_context=_setup_context)


def chunked_cross_entropy(
    x: Tensor,
    weight: Tensor,
    targets: Tensor,
    chunk_size: int,
    dtype: torch.dtype | None = None,
    ignore_index: int = -100,
    compile: bool = True,
) -> Tensor:
    """sum over rows of cross_entropy(x @ weight.T, targets), rows with target ignore_index left
    out, in fp32. x (N, C), weight (V, C), targets (N,). The matmuls run in `dtype` (default:
    x's), the softmax and the sums in fp32; outside autocast: the caller picks the dtype.
    compile=False runs the same chunk kernel op by op (tests)."""
    grads = torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad)
    with torch.autocast(x.device.type, enabled=False):
        return _loss_and_grads(
            x, weight, targets, chunk_size, dtype or x.dtype, ignore_index, compile, grads
        )[0]
