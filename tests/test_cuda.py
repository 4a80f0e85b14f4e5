"""On a CUDA GPU: every ladder rung's code path, and the CUDA-only features, really work.

    python -m pytest -m cuda tests/test_cuda.py      # benchmarks/gpu/check.sh runs this

Skipped where torch.cuda.is_available() is False (this project's CPU machines). Each rung of
experiments/ladder/<rung> (ladder_shape=gpt2_124m) runs for a few steps through the CLI with a small model (2 layers,
width 128, T=128: head_dim 64 as in GPT-2, so the flash kernel takes it). In-process checks:
TF32 on after setup_precision, the flash kernel in the profiler's CUDA kernels, fused AdamW
matching the unfused update.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]

RUNGS = ["fp32", "tf32", "bf16", "compile", "flash", "vocab", "fused"]  # ddp: under torchrun
STEPS = 3
SMALL = [
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=128",
    "trainer.micro_batch_size=4",
    "trainer.seq_len=128",
    f"trainer.max_steps={STEPS}",
    "trainer.warmup_steps_for_timing=1",
    "optim.warmup_steps=2",
    "logger=none",
    "trainer.device=cuda",
]


def cli(*args: str, cwd: Path, timeout: int = 600) -> subprocess.CompletedProcess:
    """`python <args>` as a user runs it; fails the test with the output tail on error."""
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1"}
    for key in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(key, None)
    proc = subprocess.run(
        [sys.executable, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout
    )
    assert proc.returncode == 0, (
        f"{' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-3000:]}"
        f"\n--- stderr\n{proc.stderr[-3000:]}"
    )
    return proc


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def train(tmp: Path, data_root: Path, name: str, rung: str, *extra: str, torchrun: bool = False):
    """`python -m gpt2x.train +experiment=ladder/<rung> ladder_shape=gpt2_124m` (small), final checkpoint
    saved; returns the run folder."""
    run_dir = tmp / name
    launcher = ["-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]
    cli(
        *(launcher if torchrun else []),
        "-m",
        "gpt2x.train",
        f"+experiment=ladder/{rung}",
        "ladder_shape=gpt2_124m",
        *SMALL,
        "trainer.save_final=true",
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
        *extra,
        cwd=tmp,
    )
    return run_dir


@pytest.fixture(scope="module")
def rung_run(tmp_path_factory, data_root):
    """rung -> its run folder; each rung trains once per module (tests share the runs)."""
    tmp = tmp_path_factory.mktemp("rungs")
    runs: dict[str, Path] = {}

    def get(rung: str) -> Path:
        if rung not in runs:
            runs[rung] = train(tmp, data_root, rung, rung, torchrun=rung == "ddp")
        return runs[rung]

    return get


def assert_completed_on_gpu(run_dir: Path) -> list[dict]:
    """A completed record and one finite-loss row per step, each with the step's peak memory."""
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed", record.get("error")
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(STEPS))
    total_gb = torch.cuda.get_device_properties(0).total_memory / 1e9
    for r in rows:
        assert math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]), r
        assert r["mem_gb"] is not None and 0 < r["mem_gb"] <= total_gb, r
    return rows


@pytest.mark.parametrize("rung", RUNGS)
def test_ladder_rung_trains_on_the_gpu(rung, rung_run):
    rows = assert_completed_on_gpu(rung_run(rung))
    vocab = 50304 if rung in ("vocab", "fused") else 50257
    assert rows[0]["loss"] == pytest.approx(math.log(vocab), rel=0.1)  # ~uniform at init


def test_ddp_rung_on_one_gpu_under_torchrun(rung_run):
    """nccl with one rank: the same first loss as the single-process rung below it."""
    ddp = assert_completed_on_gpu(rung_run("ddp"))
    single = assert_completed_on_gpu(rung_run("fused"))
    assert json.loads((rung_run("ddp") / "record.json").read_text())["world_size"] == 1
    # step 0's loss is before any update: same weights, same batch (bf16, compiled)
    assert ddp[0]["loss"] == pytest.approx(single[0]["loss"], rel=1e-3)


def test_fp16_with_grad_scaler_trains(tmp_path, data_root):
    assert_completed_on_gpu(train(tmp_path, data_root, "fp16", "bf16", "precision=fp16"))


def test_sample_and_evaluate_a_flash_checkpoint_in_fp32(rung_run, data_root, tmp_path):
    """A checkpoint trained with attn=flash (bf16) samples, and evaluates in fp32 (where the
    flash kernel cannot run) to the run's own bf16 validation loss."""
    run_dir = rung_run("flash")
    val_bf16 = read_jsonl(run_dir / "eval.jsonl")[-1]["val_loss"]
    out = cli(
        "-m",
        "gpt2x.sample",
        f"checkpoint={run_dir}",
        "prompt=ROMEO:",
        "max_new_tokens=8",
        "device=cuda",
        cwd=tmp_path,
    )
    assert out.stdout.startswith("ROMEO:") and len(out.stdout.strip()) > len("ROMEO:")
    out = cli(
        "-m",
        "gpt2x.evaluate",
        f"checkpoint={run_dir}",
        "precision=fp32",
        "device=cuda",
        f"data_dir={data_root}/shakespeare",
        cwd=tmp_path,
    )
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["val_loss"] == pytest.approx(val_bf16, rel=2e-2)


# ----------------------------------------------------------------------------- in-process


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


def test_tf32_is_really_on_after_setup_precision(restore_matmul_precision):
    from types import SimpleNamespace

    from gpt2x.precision import setup_precision

    cuda = torch.device("cuda")
    a, b = torch.randn(2048, 2048, device=cuda), torch.randn(2048, 2048, device=cuda)
    exact = a.double() @ b.double()

    def error() -> float:
        return ((a @ b).double() - exact).abs().max().item()

    setup_precision(SimpleNamespace(dtype="fp32", tf32=False), cuda)
    assert not torch.backends.cuda.matmul.allow_tf32
    fp32 = error()
    setup_precision(SimpleNamespace(dtype="fp32", tf32=True), cuda)
    assert torch.backends.cuda.matmul.allow_tf32
    assert torch.get_float32_matmul_precision() == "high"
    # TF32 keeps 10 mantissa bits: its error is orders of magnitude above fp32's
    assert error() > 20 * fp32


def test_flash_kernel_is_selected_for_attn_flash_in_bf16():
    from torch.profiler import ProfilerActivity, profile

    from gpt2x.model import GPT, GPTConfig

    config = GPTConfig(
        block_size=128, vocab_size=256, n_layer=1, n_head=2, n_embd=128, attn="flash"
    )
    model = GPT(config).cuda()
    x = torch.randint(0, 256, (2, 128), device="cuda")
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        with torch.autocast("cuda", dtype=torch.bfloat16):
            _, loss = model(x, x)
        loss.backward()
        torch.cuda.synchronize()
    kernels = [e.name for e in prof.events() if e.device_type.name == "CUDA"]
    assert any("flash" in k.lower() for k in kernels), sorted(set(kernels))[:20]


def test_fused_adamw_matches_the_unfused_update():
    from types import SimpleNamespace

    from gpt2x.model import GPT, GPTConfig
    from gpt2x.optim import build_optimizer

    def run(fused: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=32, vocab_size=256, n_layer=2, n_head=2, n_embd=64))
        model = model.cuda()
        cfg = SimpleNamespace(
            lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.1, fused=fused
        )
        opt = build_optimizer(model, cfg)
        assert opt.defaults["fused"] is fused
        x = torch.randint(0, 256, (4, 32), device="cuda")
        for _ in range(3):
            opt.zero_grad(set_to_none=True)
            model(x, x)[1].backward()
            opt.step()
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(run(True), run(False)):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)
