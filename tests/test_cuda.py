"""On a CUDA GPU, in one process: what only a GPU can show really works.

    python3 -m pytest -m cuda tests/test_cuda.py        # benchmarks/gpu/check.sh runs this

TF32 really on after setup_precision, the flash kernel really selected for attn=flash, fused
AdamW equal to torch's reference for-loop update, fp16 with its GradScaler (which skips a step
with inf gradients), and a checkpoint trained with attn=flash in bf16 evaluated in fp32 (where
the CUDA flash kernel cannot run) to its own bf16 validation loss and sampled from. The ladder's
rungs themselves run in the GPU check's ladder section, at GPT-2 124M.

Skipped where torch.cuda.is_available() is False. GPT2X_TEST_DEVICE=cpu (the GPU check's
--rehearse) runs the same tests on the CPU where they can run there and skips the CUDA-only
ones, saying so.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from omegaconf import DictConfig

DEVICE = torch.device(os.environ.get("GPT2X_TEST_DEVICE", "cuda"))
CUDA = DEVICE.type == "cuda"

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(CUDA and not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
cuda_only = pytest.mark.skipif(not CUDA, reason=f"a CUDA-only check; this run is on {DEVICE}")

# head_dim 64, as in GPT-2: the CUDA flash kernel takes it
SMALL = dict(block_size=128, vocab_size=50304, n_layer=2, n_head=2, n_embd=128)


def small_gpt(**options):
    from gpt2x.model import GPT, GPTConfig

    torch.manual_seed(0)
    return GPT(GPTConfig(**{**SMALL, **options})).to(DEVICE)


def batch(b: int = 4, t: int = 128) -> torch.Tensor:
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 50257, (b, t), generator=g).to(DEVICE)


@pytest.fixture
def restore_matmul_precision():
    saved = (
        torch.backends.cuda.matmul.allow_tf32,
        torch.backends.cudnn.allow_tf32,
        torch.get_float32_matmul_precision(),
    )
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved[:2]
    torch.set_float32_matmul_precision(saved[2])


@cuda_only
def test_tf32_is_really_on_after_setup_precision(restore_matmul_precision):
    from gpt2x.training.precision import setup_precision

    a, b = torch.randn(2048, 2048, device=DEVICE), torch.randn(2048, 2048, device=DEVICE)
    exact = a.double() @ b.double()

    def error() -> float:
        return ((a @ b).double() - exact).abs().max().item()

    setup_precision(SimpleNamespace(dtype="fp32", tf32=False), DEVICE)
    assert not torch.backends.cuda.matmul.allow_tf32
    fp32 = error()
    setup_precision(SimpleNamespace(dtype="fp32", tf32=True), DEVICE)
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    # TF32 keeps 10 mantissa bits: its error is orders of magnitude above fp32's
    assert error() > 20 * fp32


def test_flash_kernel_is_selected_for_attn_flash_in_bf16():
    """The profiler's record of what ran: a flash kernel on the GPU (the CPU's own flash op in
    a rehearsal), for forward and backward."""
    from torch.profiler import ProfilerActivity, profile

    model = small_gpt(n_layer=1, vocab_size=256, attn="flash")
    x = batch(2) % 256
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    with profile(activities=activities) as prof:
        with torch.autocast(DEVICE.type, dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        if CUDA:
            torch.cuda.synchronize()
    kind = "CUDA" if CUDA else "CPU"
    names = [e.name for e in prof.events() if e.device_type.name == kind]
    flash = [n for n in names if "flash" in n.lower()]
    assert len(flash) >= 2, sorted(set(names))[:30]  # forward and backward


def test_fused_adamw_equals_the_reference_update():
    """optim.fused=true (one fused kernel per group) and the fused=None default (foreach on
    CUDA) against torch's for-loop AdamW: the same parameters after 3 steps."""
    from gpt2x.training.optim import build_optimizer

    def run(fused: bool | None) -> list[torch.Tensor]:
        model = small_gpt(vocab_size=256)
        cfg = SimpleNamespace(
            lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, fused=bool(fused)
        )
        if fused is False:  # the reference: the same two groups, torch's for-loop path
            groups = [
                {"params": g["params"], "weight_decay": g["weight_decay"]}
                for g in build_optimizer(model, cfg).param_groups
            ]
            opt = torch.optim.AdamW(
                groups, lr=cfg.lr, betas=(0.9, 0.95), eps=1e-8, foreach=False, fused=False
            )
        else:
            opt = build_optimizer(model, cfg)
            assert opt.defaults["fused"] is fused and opt.defaults["foreach"] is None
        x = batch(4, 32) % 256
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(x, x)[1].backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    reference = run(False)
    for path in (True, None):
        for a, b in zip(run(path), reference):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@cuda_only
def test_fp16_with_grad_scaler_trains_and_skips_an_inf_step():
    from gpt2x.training.optim import build_optimizer
    from gpt2x.training.precision import autocast, grad_scaler

    precision = SimpleNamespace(dtype="fp16", tf32=False)
    model = small_gpt(vocab_size=256)
    adamw = SimpleNamespace(lr=3e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.0, fused=True)
    opt = build_optimizer(model, adamw)
    scaler = grad_scaler(precision, DEVICE)
    assert scaler.is_enabled()
    x = batch(4, 64) % 256
    losses = []

    def step(poison: bool = False) -> None:
        opt.zero_grad(set_to_none=True)
        with autocast(precision, DEVICE):
            _, loss = model(x, x)
        scaler.scale(loss).backward()
        if poison:
            next(model.parameters()).grad.view(-1)[0] = float("inf")
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        scaler.step(opt)
        scaler.update()
        losses.append(loss.item())

    for _ in range(8):
        step()
    assert all(math.isfinite(v) for v in losses) and losses[-1] < 0.8 * losses[0], losses
    assert all(p.dtype == torch.float32 for p in model.parameters())
    before = [p.detach().clone() for p in model.parameters()]
    scale = scaler.get_scale()
    step(poison=True)  # an inf gradient: the scaler skips the update and halves its scale
    assert scaler.get_scale() == scale * 0.5
    assert all(torch.equal(a, p) for a, p in zip(before, model.parameters()))


def flash_config(data_root: Path, run_dir: Path) -> DictConfig:
    """The ladder's flash rung (bf16, attn=flash, compile off here), at the small shape."""
    from hydra import compose, initialize_config_dir

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs

    register_configs()
    overrides = [
        "+experiment=ladder/flash",
        "compile=false",
        *(f"model.{k}={v}" for k, v in SMALL.items()),
        "trainer.seq_len=128",
        "trainer.micro_batch_size=4",
        "trainer.eval_tokens=2048",
        f"trainer.device={DEVICE}",
        f"paths.data_dir={data_root}",
    ]
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.paths.run_dir = str(run_dir)
    return cfg


def test_a_flash_checkpoint_evaluates_in_fp32_and_samples(tmp_path, data_root):
    """Trained 3 steps with attn=flash in bf16 and saved; loaded in fp32 (the CUDA flash kernel
    has no fp32 version: sdpa computes the same attention) its validation loss is the bf16
    model's, and loaded in bf16 (flash kept) it samples text after the prompt."""
    from gpt2x import checkpoint
    from gpt2x.config import to_container
    from gpt2x.data import ShardLoader, ensure_prepared
    from gpt2x.sample import generate
    from gpt2x.training.optim import build_optimizer
    from gpt2x.training.precision import autocast
    from gpt2x.training.run import build_model
    from gpt2x.training.validation import val_reader, validation_loss_sum

    cfg = flash_config(data_root, tmp_path / "run")
    data_dir = ensure_prepared(cfg.data)
    t = cfg.trainer
    model = build_model(cfg, DEVICE)
    assert model.config.attn == "flash"
    opt = build_optimizer(model, cfg.optim)
    loader = ShardLoader(data_dir, "train", batch_size=t.micro_batch_size, seq_len=t.seq_len)
    for _ in range(3):
        x, y = (v.to(DEVICE).long() for v in loader.next_batch())
        opt.zero_grad(set_to_none=True)
        with autocast(cfg.precision, DEVICE):
            _, loss = model(x, y)
        loss.backward()
        opt.step()

    def val_loss(m, dtype: str) -> float:
        total, count = validation_loss_sum(
            m.eval(),
            val_reader(data_dir, t.seq_len),
            t.eval_tokens,
            t.micro_batch_size,
            0,
            1,
            DEVICE,
            lambda: autocast(SimpleNamespace(dtype=dtype), DEVICE),
        ).tolist()
        return total / count

    val_bf16 = val_loss(model, "bf16")
    ckpt = checkpoint.save(cfg.paths.run_dir, 3, model, opt, config=to_container(cfg))
    fp32, meta, _ = checkpoint.load_model(ckpt, DEVICE, dtype="fp32")
    assert meta["step"] == 3 and fp32.config.attn == "sdpa"
    assert val_loss(fp32, "fp32") == pytest.approx(val_bf16, rel=2e-2)
    assert val_bf16 < math.log(50257)  # it learned something in 3 steps
    bf16, _, _ = checkpoint.load_model(ckpt, DEVICE, dtype="bf16")
    assert bf16.config.attn == ("flash" if CUDA else "sdpa")
    with autocast(SimpleNamespace(dtype="bf16"), DEVICE):
        (text,) = generate(bf16, "ROMEO:", 8, 1.0, 50, 1, 1, DEVICE)
    assert text.startswith("ROMEO:") and len(text) > len("ROMEO:")
