"""Nothing lost: whatever ends a run (a kill between two writes, corrupt checkpoints, a full
disk, a resume from an older step), the run folder ends with every step's rows exactly once
and equal to an uninterrupted run's, a true status, and checkpoints of one history only."""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY, record, rows, run_cli, tiny_cfg

from gpt2x import checkpoint
from gpt2x.checkpoint import CheckpointError
from gpt2x.checkpoint import state as checkpoint_state
from gpt2x.checkpoint import store as checkpoint_store
from gpt2x.record import folder as runfolder
from gpt2x.record.folder import RESERVE, TEST_KILL_ENV, RunFolderError, RunRecord, truncate_jsonl
from gpt2x.train import run_training

# eval rows every 2 steps, a sample row every 3, a checkpoint every 2 (two kept)
RUN = [
    "trainer.max_steps=8",
    "trainer.eval_every=2",
    "trainer.sample_every=3",
    "trainer.sample_tokens=4",
    "trainer.checkpoint_every=2",
    "trainer.keep_last=2",
]
FILES = ("metrics.jsonl", "eval.jsonl", "samples.jsonl")


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> dict:
    """Every row of an uninterrupted run, file by file, without the timings."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    run_training(tiny_cfg(run_dir, data_root, *RUN))
    return {name: comparable(run_dir, name) for name in FILES}


def comparable(run_dir: Path, name: str) -> list[tuple]:
    """What must equal the reference in a file's rows: step, loss/val_loss/text, tokens seen."""
    keys = ("step", "loss", "tokens_seen", "val_loss", "text")
    return [tuple(r.get(k) for k in keys) for r in rows(run_dir, name)]


def assert_one_history(run_dir: Path, reference: dict) -> None:
    for name in FILES:
        assert comparable(run_dir, name) == reference[name], name
    assert record(run_dir)["status"] == "completed"
    # only this history's checkpoints, the newest two (keep_last=2)
    assert [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")] == [6, 8]


def cli(tmp_path: Path, data_root: Path, *overrides: str, env=None, run_dir=None):
    return run_cli(
        "gpt2x.train",
        *TINY,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir or tmp_path / 'run'}",
        "logger=none",
        *RUN,
        *overrides,
        cwd=tmp_path,
        env=env,
        check=False,
    )


@pytest.mark.parametrize(
    "kill_at",
    [
        "before_checkpoint@4",  # step 3's row written, its checkpoint not yet
        "in_checkpoint@4",  # the model file of step_000004 written, the rest not
        "before_checkpoint@1",  # before any checkpoint: resume=auto has nothing to load
    ],
)
def test_a_kill_between_two_writes_then_resume_auto_loses_nothing(
    tmp_path, data_root, reference, kill_at
):
    killed = cli(tmp_path, data_root, env={TEST_KILL_ENV: kill_at})
    assert killed.returncode == -9, killed.stderr[-2000:]
    resumed = cli(tmp_path, data_root, "trainer.resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert_one_history(tmp_path / "run", reference)
    assert not list((tmp_path / "run" / "checkpoints").glob("*.tmp"))


def test_resume_auto_with_only_broken_checkpoints_starts_over_cleanly(
    tmp_path, data_root, reference, caplog
):
    """Every checkpoint broken (a truncated file, a deleted meta.json), a half-written last row:
    resume=auto starts at step 0, drops
    the old rows (said once), sets the broken checkpoints aside and ends as one history."""
    run_dir = tmp_path / "run"
    run_training(tiny_cfg(run_dir, data_root, *RUN))
    with open(run_dir / "checkpoints" / "step_000006" / checkpoint.MODEL_FILE, "r+b") as f:
        f.truncate(100)
    (run_dir / "checkpoints" / "step_000008" / checkpoint.META_FILE).unlink()
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 8, "loss": 1.2')  # a kill in the middle of a row
    run_training(tiny_cfg(run_dir, data_root, *RUN, "trainer.resume=auto"))
    assert_one_history(run_dir, reference)
    aside = [p for p in (run_dir / "checkpoints").iterdir() if p.name.startswith("abandoned-")]
    assert len(aside) == 1 and sorted(p.name for p in aside[0].iterdir()) == [
        "step_000006",
        "step_000008",
    ]
    assert "starting at step 0, without the" in caplog.text
    assert "step_000008: it has no meta.json" in caplog.text  # skipped, but said
    assert "step_000006/model.safetensors is truncated or corrupted" in caplog.text


def test_resume_from_an_older_checkpoint_sets_the_newer_branch_aside(
    tmp_path, data_root, caplog
):
    """Resume by path from step 4 with another lr, stop at 6; then resume=auto continues that
    branch (step 6), not the abandoned run's step 8."""
    run_dir = tmp_path / "run"
    keep_all = [*RUN, "trainer.keep_last=0"]
    run_training(tiny_cfg(run_dir, data_root, *keep_all))
    first = comparable(run_dir, "metrics.jsonl")
    ckpt4 = run_dir / "checkpoints" / "step_000004"
    branch = ["optim.lr=1e-3", "trainer.max_steps=6"]
    run_training(tiny_cfg(run_dir, data_root, *keep_all, *branch, f"trainer.resume={ckpt4}"))
    assert "later checkpoints moved to" in caplog.text
    steps = [s for s, _ in checkpoint.list_checkpoints(run_dir / "checkpoints")]
    assert steps == [2, 4, 6]
    aside = next((run_dir / "checkpoints").glob("abandoned-*-after-step_000004"))
    assert sorted(p.name for p in aside.iterdir()) == ["step_000006", "step_000008"]
    branch_rows = comparable(run_dir, "metrics.jsonl")
    # the same up to step 4's loss (computed before the new lr's first update), then not
    assert branch_rows[:5] == first[:5] and branch_rows[5] != first[5]
    run_training(
        tiny_cfg(run_dir, data_root, *keep_all, "optim.lr=1e-3", "trainer.resume=auto")
    )
    assert [r[0] for r in comparable(run_dir, "metrics.jsonl")] == list(range(8))
    assert comparable(run_dir, "metrics.jsonl")[:6] == branch_rows
    assert record(run_dir)["resumed_from"]["step"] == 6


def test_truncate_drops_unreadable_lines_and_keeps_good_rows_after_them(tmp_path):
    path = tmp_path / "metrics.jsonl"
    good = [json.dumps({"step": s, "loss": float(s)}) for s in range(6)]
    path.write_text("\n".join([*good[:3], "{garbage", *good[3:]]) + '\n{"step": 6, "lo')
    run = RunRecord(tmp_path)
    run.start(config={})  # the record's append handles are open while it truncates
    assert run.truncate(5) == 3  # the garbage line, step 5, the cut-off row
    run.log_step({"step": 5, "loss": 5.5})
    assert [(r["step"], r["loss"]) for r in rows(tmp_path)] == [
        *((s, float(s)) for s in range(5)),
        (5, 5.5),
    ]
    assert truncate_jsonl(tmp_path / "missing.jsonl", 1) == 0


# ---------------------------------------------------------------------------------------------
# a full disk


def test_checkpoint_writers_own_errors_for_a_full_disk_are_one_line(tmp_path, monkeypatch):
    """safetensors' and torch.save's own exceptions (what a full disk raises inside them)
    become one CheckpointError; the previous checkpoint and no temp folder remain."""
    from safetensors import SafetensorError

    from gpt2x.model import GPT, GPTConfig

    model = GPT(GPTConfig(block_size=8, vocab_size=64, n_layer=1, n_head=1, n_embd=8))
    optimizer = torch.optim.AdamW(model.parameters())
    checkpoint.save(tmp_path, 1, model, optimizer)

    def safetensors_full(*args, **kwargs):
        raise SafetensorError(
            'Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No '
            'space left on device" })'
        )

    def torch_save_full(obj, path):
        raise RuntimeError("[enforce fail at inline_container.cc:858] . PytorchStreamWriter failed")

    usage = shutil.disk_usage(tmp_path)
    for writer, patch in [("save_safetensors", safetensors_full), ("save_torch", torch_save_full)]:
        with monkeypatch.context() as m:
            m.setattr(checkpoint_state, writer, patch)
            # torch.save's message does not say why: the free space does
            m.setattr(checkpoint_store.shutil, "disk_usage", lambda p: usage._replace(free=10))
            with pytest.raises(CheckpointError) as e:
                checkpoint.save(tmp_path, 2, model, optimizer)
        message = str(e.value)
        assert "\n" not in message and "No space left on device" in message, message
        assert "free space" in message and "previous checkpoints are intact" in message
        assert [s for s, _ in checkpoint.list_checkpoints(tmp_path / "checkpoints")] == [1]
        assert not list((tmp_path / "checkpoints").glob("*.tmp"))


def test_a_full_disk_while_logging_takes_back_the_half_row_and_records_the_failure(
    tmp_path, monkeypatch
):
    run = RunRecord(tmp_path)
    (tmp_path / RESERVE).write_bytes(b"\0" * 1000)
    run.start(config={})
    run.log_step({"step": 0, "loss": 1.0})
    real_write = run._files["metrics.jsonl"].write

    class Full:
        def __init__(self, f):
            self.f = f

        def write(self, text):
            real_write(text[: len(text) // 2])  # half the row reached the disk, then ENOSPC
            raise OSError(errno.ENOSPC, "No space left on device")

        def __getattr__(self, name):
            return getattr(self.f, name)

    run._files["metrics.jsonl"] = Full(run._files["metrics.jsonl"])
    with pytest.raises(RunFolderError, match=r"cannot write .*metrics.jsonl \(No space left on "):
        run.log_step({"step": 1, "loss": 0.9})
    assert [r["step"] for r in rows(tmp_path)] == [0]
    assert (tmp_path / "metrics.jsonl").read_text().endswith("}\n")  # no half row
    # the record cannot be written until the reserved space is freed
    calls = []
    real_write_json = runfolder.write_json

    def write_json_once_full(path, obj):
        calls.append(path)
        if len(calls) == 1:
            raise OSError(errno.ENOSPC, "No space left on device")
        real_write_json(path, obj)

    monkeypatch.setattr("gpt2x.record.folder.write_json", write_json_once_full)
    run.finish("failed", error="disk full")
    assert record(tmp_path)["status"] == "failed" and not (tmp_path / RESERVE).exists()
    assert not list(tmp_path.glob(".*.tmp"))


def test_keep_last_reserves_every_checkpoint_it_holds_at_once(tmp_path, monkeypatch):
    from gpt2x.training.run import checkpoints_at_once

    trainer = tiny_cfg(tmp_path, tmp_path, *RUN).trainer
    assert checkpoints_at_once(trainer) == 3  # keep_last=2 + the one being written
    trainer.keep_last = 0
    assert checkpoints_at_once(trainer) == 5  # steps 2, 4, 6, 8 + the final (same as 8)
    usage = shutil.disk_usage(tmp_path)
    one = checkpoint_store.estimate_bytes(1_000_000)
    free = usage._replace(free=int(2.5 * one))
    monkeypatch.setattr(checkpoint_store.shutil, "disk_usage", lambda p: free)
    checkpoint_store.preflight(tmp_path, 1_000_000, 2)
    with pytest.raises(Exception, match="but 3 checkpoints of this 1.0M-parameter model at once"):
        checkpoint_store.preflight(tmp_path, 1_000_000, 3)


def _tmpfs(path: Path, size_mb: int) -> bool:
    path.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size_mb}m", "tmpfs", str(path)],
        capture_output=True,
    )
    return proc.returncode == 0


@pytest.mark.slow
def test_a_real_full_disk_ends_in_one_line_and_resume_completes(tmp_path, data_root, reference):
    """A run folder on a small tmpfs that a test filler fills after the first checkpoint: the
    run stops with one line (exit 2), its record says failed; freed, resume=auto completes one
    history."""
    disk = tmp_path / "disk"
    if os.geteuid() != 0 or not _tmpfs(disk, 48):
        pytest.skip("cannot mount a tmpfs here (needs root): the exception types are tested above")
    try:
        run_dir = disk / "run"
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        cmd = [
            sys.executable, "-m", "gpt2x.train", *TINY,
            f"paths.data_dir={data_root}", f"hydra.run.dir={run_dir}", "logger=none",
            *RUN, "trainer.keep_last=1",
        ]  # fmt: skip
        proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, stderr=subprocess.PIPE, text=True)
        filler = disk / "filler"
        while proc.poll() is None and not (run_dir / "checkpoints" / "step_000002").is_dir():
            time.sleep(0.05)  # polls for the run's first checkpoint
        with open(filler, "wb") as f:  # fill the disk while the run goes on
            try:
                while True:
                    f.write(b"\0" * (1 << 20))
                    f.flush()
            except OSError as e:
                assert e.errno == errno.ENOSPC
        _, stderr = proc.communicate(timeout=300)
        errors = [line for line in stderr.splitlines() if line.startswith("error:")]
        assert proc.returncode == 2 and "Traceback" not in stderr, stderr[-3000:]
        assert len(errors) == 1 and "No space left on device" in errors[0], errors
        rec = record(run_dir)
        assert rec["status"] == "failed" and "No space left on device" in rec["error"]
        done = comparable(run_dir, "metrics.jsonl")
        assert done == reference["metrics.jsonl"][: len(done)]  # whole rows only, each once
        filler.unlink()
        resumed = cli(
            tmp_path, data_root, "trainer.keep_last=1", "trainer.resume=auto", run_dir=run_dir
        )
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        for name in FILES:
            assert comparable(run_dir, name) == reference[name], name
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)
