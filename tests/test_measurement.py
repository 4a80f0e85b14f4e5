"""What the ladder measures is what it claims, on CPU: the AdamW path each rung asks torch for, no
timed step after a profiled one, evaluation without recompiling a compiled model, DDP compiled
inside its wrapper, and rungs this machine cannot have reading n/a with the reason."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from conftest import compose_rung
from omegaconf import OmegaConf
from test_distributed import restore_env, world_of_one  # noqa: F401 - a fixture and a helper
from torch._dynamo.testing import CompileCounter

from gpt2x.config import ParallelKind
from gpt2x.lab import ablate, ladder, runner
from gpt2x.model import GPT, GPTConfig
from gpt2x.train import breakdown_steps_at
from gpt2x.training import distributed
from gpt2x.training.evaluation import evaluate, inference
from gpt2x.training.optim import build_optimizer

LADDER = ["fp32", "tf32", "bf16", "compile", "flash", "vocab", "fused", "ddp"]


def tiny_gpt() -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=2, n_head=2, n_embd=16))


# ----------------------------------------------------------------------------- AdamW's path


@pytest.mark.parametrize("rung", LADDER)
def test_each_rung_asks_torch_for_the_adamw_path_the_lecture_used(rung):
    """Before `fused`, AdamW gets fused=None and foreach=None: torch then picks the multi-tensor
    foreach update on CUDA, as the lecture's rungs ran. fused=False (what the rungs passed
    before) makes torch take its per-tensor for-loop instead."""
    cfg = compose_rung(f"ladder/{rung}", "ladder_shape=gpt2_124m")
    opt = build_optimizer(tiny_gpt(), OmegaConf.create(cfg["optim"]))
    fused = rung in ("fused", "ddp")
    assert opt.defaults["fused"] is (True if fused else None)
    assert opt.defaults["foreach"] is None


# ----------------------------------------------------------------------------- profiled steps


@pytest.mark.parametrize(
    ("start", "max_steps", "warmup", "n", "profiled"),
    [
        (0, 12, 3, 1, [11]),  # the ablate's shape: 3 warm-up + 8 timed + 1 profiled
        (0, 12, 3, 2, [10, 11]),
        (0, 4, 1, 1, [3]),
        (0, 3, 1, 5, [2]),  # never a warm-up step; step 1 stays timed
        (0, 2, 1, 1, []),  # the only step after warm-up is timed, none is profiled
        (5, 12, 3, 1, [11]),  # resumed at step 5
        (0, 12, 3, 0, []),
    ],
)
def test_profiled_steps_are_the_last_ones_after_every_timed_step(
    start, max_steps, warmup, n, profiled
):
    at = list(breakdown_steps_at(start, max_steps, warmup, n))
    assert at == profiled
    timed = [s for s in range(start + warmup, max_steps) if s not in at]
    assert timed and all(t < p for t in timed for p in at)


# ----------------------------------------------------------------------------- evaluation


class WindowReader:
    """The validation reader's interface (gpt2x.training.validation) over random tokens."""

    seq_len = 16

    def validation_windows(self, eval_tokens: int) -> int:
        return eval_tokens // self.seq_len

    def read_windows(self, pos):
        g = torch.Generator().manual_seed(int(pos[0]))
        xy = torch.randint(0, 64, (len(pos), self.seq_len + 1), generator=g)
        return xy[:, :-1].contiguous(), xy[:, 1:].contiguous()


def test_evaluation_runs_a_compiled_model_without_recompiling():
    """A compiled model, trained a step, then evaluated (eval mode, no_grad) by the trainer's
    `evaluate`: dynamo compiles no new frame. The same evaluation without `inference` does."""
    torch._dynamo.reset()
    counter = CompileCounter()
    model = tiny_gpt()
    compiled = torch.compile(model, backend=counter)
    x = torch.randint(0, 64, (2, 16))
    compiled(x, x)[1].backward()
    frames = counter.frame_count
    assert frames >= 1
    run = SimpleNamespace(
        cfg=OmegaConf.create(
            {"trainer": {"eval_tokens": 64, "micro_batch_size": 2}, "precision": {"dtype": "fp32"}}
        ),
        dist=distributed.Dist(ParallelKind.single, 0, 0, 1, torch.device("cpu")),
        model=compiled,
        val_loader=WindowReader(),
    )
    loss = evaluate(run)
    assert counter.frame_count == frames and compiled.training
    # the eager loss of the same windows: exact, from the plain module
    model.eval()
    with torch.no_grad():
        ref = [model(*WindowReader().read_windows([i, i + 1]))[1] for i in (0, 2)]
    assert loss == pytest.approx(float(sum(ref) / 2), rel=1e-6)
    with torch.no_grad():  # what evaluate did before: a new graph for eval + no_grad
        compiled(x, x)
    assert counter.frame_count > frames
    with inference(compiled):  # and sampling's varying lengths compile nothing either
        before = counter.frame_count
        for t in (3, 5, 7):
            compiled(x[:, :t])
        assert counter.frame_count == before
    torch._dynamo.reset()


# ----------------------------------------------------------------------------- DDP


def test_ddp_compiles_the_module_inside_its_wrapper(restore_env):  # noqa: F811
    """torch's advice for DDP: compile the inner module, not the DDP wrapper."""
    torch._dynamo.reset()
    model, _ = world_of_one("ddp")
    keys = list(model.module.state_dict())
    counter = CompileCounter()
    out = distributed.compile_model(model, ParallelKind.ddp, backend=counter)
    assert out is model and isinstance(out, torch.nn.parallel.DistributedDataParallel)
    assert out.module._compiled_call_impl is not None  # the GPT inside, in place
    assert list(out.module.state_dict()) == keys  # no _orig_mod. names
    assert distributed.unwrap(out) is out.module
    x = torch.randint(0, 64, (2, 16))
    out(x, x)[1].backward()
    assert counter.frame_count >= 1
    torch._dynamo.reset()


def test_ddp_rung_on_one_process_is_na_with_its_reason_and_never_runs(tmp_path, capsys):
    out = tmp_path / "abl"
    assert ablate.main(["rungs=[ddp]", "nproc=1", f"out={out}", "quiet=true"]) == 0
    record = json.loads((out / "01_ddp" / "record.json").read_text())
    assert record["status"] == "n/a"
    assert record["error"].startswith("parallel=ddp is not available on one process (nproc=1)")
    assert "measures only ddp's overhead" in record["error"]
    assert not (out / "01_ddp" / "rung.log").exists()  # nothing was launched
    assert "| n/a |" in (out / "ablation.md").read_text()
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["status"] == "completed" and manifest["rungs"][0]["status"] == "n/a"


def test_one_cuda_device_makes_the_ddp_rung_na_saying_why(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ladder, "default_nproc", lambda: 1)
    assert ablate.main(["rungs=[fused,ddp]", f"out={tmp_path / 'abl'}", "dry_run=true"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "# 01 fused (python, nproc=1)" in lines
    assert (
        "# 02 ddp (torchrun, nproc=1) n/a: parallel=ddp is not available on one process "
        "(nproc=1: this machine has one CUDA device): a world of one measures only ddp's "
        "overhead; run it with 2+ GPUs (nproc=N)"
    ) in lines


# ----------------------------------------------------------------------------- n/a reasons


@pytest.mark.parametrize(
    ("reason", "status"),
    [
        ("precision=fp8 is not available on cpu (float8 training needs ...)", "n/a"),
        ("precision=fp8 needs torchao: pip install torchao", "n/a"),
        ("loss=chunked needs torch.nn.functional.linear_cross_entropy (torch >= 2.13); ...", "n/a"),
        ("optim.name=muon needs torch.optim.Muon (torch >= 2.9); this is torch 2.6", "n/a"),
        ("precision=fp16 needs CUDA (GradScaler), this run is on cpu", "failed"),
        ("RuntimeError: CUDA out of memory", "failed"),
    ],
)
def test_an_option_this_machine_cannot_have_reads_na(tmp_path, reason, status):
    """The trainer's one-line error in the record decides: n/a for what this machine lacks."""
    rung = ladder.Rung(1, "ladder/x", 0, "x", "ladder/x", [], dir=str(tmp_path), returncode=2)
    (tmp_path / "record.json").write_text(
        json.dumps({"experiment": "ladder/x", "status": "failed", "error": reason})
    )
    runner.settle(rung, f"error: {reason}\n", timed_out=False, timeout=None, interrupted=False)
    assert (rung.status, rung.error) == (status, reason)
    assert json.loads((tmp_path / "record.json").read_text())["status"] == status
