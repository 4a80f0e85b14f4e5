"""The trainer end to end on CPU: the CLI, the run record, determinism, W&B offline, bad input."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import pytest
from conftest import REPO, cli_train, losses, run_cli, tiny_cfg

from gpt2x.config import ConfigError, register_configs
from gpt2x.data import DataError
from gpt2x.record.folder import read_jsonl
from gpt2x.train import TrainingError, run_training

register_configs()


def test_cli_run_writes_the_record_and_loss_falls(tmp_path, data_root):
    proc, run_dir = cli_train(
        tmp_path, data_root, "trainer.max_steps=20", "logger=none", "optim.lr=1e-2"
    )
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed" and record["error"] is None
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(20))
    for key in ("loss", "lr", "grad_norm", "ms", "tokens_per_s", "tokens_seen"):
        assert all(isinstance(r[key], (int, float)) for r in rows), key
    assert all(r["mfu"] is None for r in rows), "no known peak on CPU: MFU is omitted, not guessed"
    # ... but MFU against this machine's measured matmul peak (the better of bf16 and fp32)
    peaks = record["hardware"]["peak_flops"]
    assert peaks["spec"] is None and peaks["spec_bf16"] is None
    assert peaks["measured"] == max(peaks["measured_bf16"], peaks["measured_fp32"]) > 0
    flops = record["flops_per_token"]
    for r in rows:
        assert r["mfu_measured"] == pytest.approx(r["tokens_per_s"] * flops / peaks["measured"])
    assert record["hardware"]["cpu"] not in ("", "x86_64")  # the CPU's model name
    # loss starts near ln(vocab) and clearly falls
    assert abs(rows[0]["loss"] - math.log(50257)) < 0.3
    assert sum(r["loss"] for r in rows[-5:]) / 5 < rows[0]["loss"] - 1.0
    # the record holds what is needed to reproduce the run
    assert record["config"]["model"]["n_embd"] == 32
    assert "trainer.max_steps=20" in record["overrides"]
    assert record["git"]["commit"] is None or len(record["git"]["commit"]) == 40
    assert record["versions"]["torch"] and record["hardware"]["device"] == "cpu"
    assert record["tokens_per_step"] == 4 * 32 and record["grad_accum_steps"] == 1
    assert record["summary"]["steps"] == 20 and record["summary"]["median_ms"] > 0
    assert math.isfinite(record["summary"]["val_loss"])
    assert read_jsonl(run_dir / "eval.jsonl")[-1]["step"] == 19
    assert (run_dir / "sample.txt").read_text()
    assert (run_dir / ".hydra" / "config.yaml").exists()
    # one console line per step, then validation loss and a sample
    out = proc.stdout + proc.stderr
    assert out.count("tok/s") >= 20 and "val loss" in out and "sample:" in out


def test_same_seed_same_losses_in_fp32(tmp_path, data_root):
    runs = []
    for name in ("a", "b"):
        cfg = tiny_cfg(tmp_path / name / "run", data_root, "trainer.max_steps=6", "trainer.sample_tokens=0")
        run_training(cfg)
        runs.append(losses(tmp_path / name / "run"))
    assert runs[0] == runs[1]  # bit-identical on CPU in fp32
    cfg = tiny_cfg(
        tmp_path / "c" / "run",
        data_root,
        "trainer.max_steps=6",
        "trainer.seed=7",
        "trainer.sample_tokens=0",
    )
    run_training(cfg)
    assert losses(tmp_path / "c" / "run") != runs[0]


def test_grad_accumulation_matches_one_big_batch(tmp_path, data_root):
    """B=4 with 2 micro-steps gives the same update as B=8 in one (fp32, same tokens)."""
    common = ["trainer.max_steps=3", "trainer.sample_tokens=0", "data.shuffle=false"]
    run_training(tiny_cfg(tmp_path / "big" / "run", data_root, *common, "trainer.micro_batch_size=8"))
    run_training(
        tiny_cfg(
            tmp_path / "acc" / "run",
            data_root,
            *common,
            "trainer.micro_batch_size=4",
            "trainer.total_batch_tokens=256",
        )
    )
    big, acc = losses(tmp_path / "big" / "run"), losses(tmp_path / "acc" / "run")
    assert (
        json.loads((tmp_path / "acc" / "run" / "record.json").read_text())["grad_accum_steps"] == 2
    )
    assert big == pytest.approx(acc, rel=1e-5)


def test_overfit_one_batch(tmp_path, data_root):
    cfg = tiny_cfg(
        tmp_path / "run",
        data_root,
        "debug=overfit_batch",
        "trainer.max_steps=60",
        "optim.lr=3e-3",
        "model.n_embd=64",
    )
    run_training(cfg)
    rows = losses(tmp_path / "run")
    assert rows[-1] < 1.0 < rows[0]


def test_bf16_runs_close_to_fp32(tmp_path, data_root):
    common = ["trainer.max_steps=4", "trainer.sample_tokens=0"]
    run_training(tiny_cfg(tmp_path / "fp32" / "run", data_root, *common))
    run_training(tiny_cfg(tmp_path / "bf16" / "run", data_root, *common, "precision=bf16"))
    fp32, bf16 = losses(tmp_path / "fp32" / "run"), losses(tmp_path / "bf16" / "run")
    assert fp32 != bf16
    assert bf16 == pytest.approx(fp32, abs=0.05)


def test_compile_trains_evaluates_and_samples(tmp_path, data_root):
    cfg = tiny_cfg(tmp_path / "run", data_root, "compile=true", "trainer.max_steps=3", "attn=sdpa")
    run_training(cfg)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "completed"
    assert math.isfinite(record["summary"]["val_loss"])
    assert record["compile_seconds"] is not None
    assert (tmp_path / "run" / "sample.txt").read_text()


def test_mfu_uses_the_given_peak(tmp_path, data_root):
    cfg = tiny_cfg(
        tmp_path / "run",
        data_root,
        "trainer.max_steps=2",
        "trainer.peak_flops=1e12",
        "trainer.sample_tokens=0",
    )
    run_training(cfg)
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    row = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    expected = row["tokens_per_s"] * record["flops_per_token"] / 1e12
    assert row["mfu"] == pytest.approx(expected, rel=1e-9)


def test_tf32_on_cpu_says_it_is_a_no_op(tmp_path, data_root, caplog):
    cfg = tiny_cfg(
        tmp_path / "run", data_root, "precision=tf32", "trainer.max_steps=1", "trainer.sample_tokens=0"
    )
    with caplog.at_level(logging.WARNING):
        run_training(cfg)
    messages = [r.getMessage() for r in caplog.records if "tf32" in r.getMessage()]
    assert len(messages) == 1 and "no-op" in messages[0]


def test_fp16_on_cpu_is_a_clear_error(tmp_path, data_root):
    with pytest.raises(ConfigError, match="precision=bf16"):
        run_training(tiny_cfg(tmp_path / "run", data_root, "precision=fp16"))


def test_nan_loss_stops_with_the_step_and_keeps_the_record(tmp_path, data_root, monkeypatch):
    import gpt2x.train as train_mod

    real_step = train_mod.train_step

    def poisoned(run, step):
        row = real_step(run, step)
        return {**row, "loss": float("nan")} if step == 3 else row

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    with pytest.raises(TrainingError, match="at step 3"):
        run_training(tiny_cfg(tmp_path / "run", data_root, "trainer.max_steps=10"))
    record = json.loads((tmp_path / "run" / "record.json").read_text())
    assert record["status"] == "failed" and "step 3" in record["error"]
    assert "precision=fp32" not in record["error"]  # the run is fp32 already
    with pytest.raises(TrainingError, match="or try precision=fp32$"):
        train_mod.check_loss(float("nan"), [], 0, 0.0, fp32=False)
    rows = read_jsonl(tmp_path / "run" / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3] and rows[-1]["loss"] == "nan"


def test_cli_bad_batch_is_one_line_before_compute(tmp_path, data_root):
    proc, run_dir = cli_train(
        tmp_path, data_root, "trainer.total_batch_tokens=1000", "logger=none", check=False
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "trainer.total_batch_tokens" in errors[0]
    assert "Traceback" not in proc.stderr
    assert "error" not in proc.stdout  # once: not logged to the console a second time
    assert "error: trainer.total_batch_tokens" in (run_dir / "train.log").read_text()
    assert not (run_dir / "metrics.jsonl").exists()


def test_validation_set_sizes_are_checked_before_training(tmp_path, data_root):
    with pytest.raises(ConfigError, match=r"trainer.eval_tokens=16 .* set trainer.eval_tokens>=32"):
        run_training(tiny_cfg(tmp_path / "run", data_root, "trainer.eval_tokens=16"))
    # far more than Shakespeare's val split holds
    with pytest.raises(DataError, match=r"set trainer.eval_tokens<=\d+ or raise data.val_"):
        run_training(tiny_cfg(tmp_path / "run", data_root, "trainer.eval_tokens=100000000"))
    assert not (tmp_path / "run" / "metrics.jsonl").exists()


def test_cli_missing_data_file_is_one_line(tmp_path, data_root):
    proc, _ = cli_train(
        tmp_path,
        data_root,
        "data=text",
        f"data.source={tmp_path}/nope/*.txt",
        "logger=none",
        check=False,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "data.source" in errors[0]


def test_cli_unknown_option_is_hydras_message(tmp_path, data_root):
    proc, _ = cli_train(tmp_path, data_root, "attn=magic", check=False)
    assert proc.returncode != 0
    assert "attn" in proc.stderr and "magic" in proc.stderr


def test_cli_help_lists_groups_and_cfg_job_prints_config(tmp_path):
    proc = run_cli("gpt2x.train", "--help", cwd=tmp_path)
    for group in ("model", "data", "precision", "attn", "optim", "parallel", "logger"):
        assert f"{group}:" in proc.stdout
    assert "gpt2-xl" in proc.stdout and "flash" in proc.stdout
    proc = run_cli("gpt2x.train", "model=gpt2", "precision=bf16", "--cfg", "job", cwd=tmp_path)
    assert "n_layer: 12" in proc.stdout and "dtype: bf16" in proc.stdout


def test_wandb_offline_run_folder_holds_the_steps(tmp_path, data_root):
    env = {"WANDB_MODE": "", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    _, run_dir = cli_train(
        tmp_path,
        data_root,
        "trainer.max_steps=5",
        "logger=wandb",
        "logger.group=test-group",
        env=env,
    )
    record = json.loads((run_dir / "record.json").read_text())
    assert record["wandb"]["mode"] == "offline"
    files = list((run_dir / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1
    history = wandb_history(files[0])
    assert [h["_step"] for h in history] == [0, 1, 2, 3, 4]
    assert [h["train/loss"] for h in history] == pytest.approx(losses(run_dir))


def wandb_history(path: Path) -> list[dict]:
    """The history rows of an offline W&B run file.

    The .wandb file is a LevelDB-style log (7-byte file header, 32 KiB blocks, records with a
    7-byte header: crc32, length, type) of protobuf `Record`s; wandb 0.31 ships no reader.
    """
    import struct

    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, pending, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST: one whole record
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append(
                    {
                        i.key or "/".join(i.nested_key): json.loads(i.value_json)
                        for i in rec.history.item
                    }
                )
    return rows


def test_readme_commands_are_the_ones_tested():
    readme = (REPO / "README.md").read_text()
    assert 'pip install -e ".[dev]"' in readme and "python -m gpt2x.train" in readme
    assert "python -m pytest" in readme
    assert "python -m pytest" in (REPO / ".ci" / "run").read_text()


def test_wandb_mode_disabled_in_the_environment_completes_and_records_no_wandb_run(
    tmp_path, data_root
):
    # logger.mode=disabled in the config: tests/test_matrix.py
    proc, run_dir = cli_train(
        tmp_path, data_root, "trainer.max_steps=2", "logger=wandb", env={"WANDB_MODE": "disabled"}
    )
    record = json.loads((run_dir / "record.json").read_text())
    assert record["status"] == "completed", record["error"]
    assert record["wandb"] is None and not (run_dir / "wandb").exists()
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1]


def test_progress_bar_and_the_projected_wall_time(tmp_path, data_root):
    proc, run_dir = cli_train(
        tmp_path,
        data_root,
        "trainer.max_steps=6",
        "trainer.warmup_steps_for_timing=2",
        "trainer.progress=bar",
        "trainer.log_every=100",
        "logger=none",
    )
    # rich's bar (on stderr), finished: step/max, elapsed, eta, tokens/s and the latest loss;
    # on a real terminal: tests/test_first_use.py
    last = read_jsonl(run_dir / "metrics.jsonl")[-1]
    bar = [line for line in proc.stderr.splitlines() if line.startswith("step 6/6")]
    assert bar and "tok/s" in bar[-1] and f"loss {last['loss']:.4f}" in bar[-1]
    # after the first measured step (step 2), once
    assert proc.stdout.count("projected wall time:") == 1
    # log_every=100: plain lines only for the first and the last step, counted from 1
    assert proc.stdout.count("step     1/6 | loss ") == proc.stdout.count("step     6/6 | loss ") == 1
    assert proc.stdout.count("/6 | loss ") == 2
    # and without a terminal the default (auto) is plain lines only
    (tmp_path / "plain").mkdir()
    proc, _ = cli_train(tmp_path / "plain", data_root, "trainer.max_steps=3", "logger=none")
    assert "━" not in proc.stdout and proc.stdout.count("/3 | loss ") == 3


def test_peak_memory_is_per_step_on_cpu():
    import mmap

    import numpy as np
    import torch

    from gpt2x.training.metrics import peak_memory, reset_peak_memory

    cpu = torch.device("cpu")
    reset_peak_memory(cpu)
    base = peak_memory(cpu)["rss_gb"]
    # 256 MB of fresh pages, touched, then handed back: a mapping of its own, since a malloc'd
    # buffer may reuse memory the process already holds (CPU runs keep freed memory)
    big = mmap.mmap(-1, 256 << 20)
    np.frombuffer(big, dtype=np.uint8)[:] = 1
    peak = peak_memory(cpu)["rss_gb"]
    big.close()
    reset_peak_memory(cpu)  # the next step's window starts at the current (smaller) RSS
    after = peak_memory(cpu)["rss_gb"]
    assert peak - base > 0.2 and peak - after > 0.2


def test_the_loop_never_asks_the_model_for_logits(tmp_path, data_root, monkeypatch):
    """Training steps call the model with return_logits=False: logits returned from a compiled
    forward cost a zero-filled (B*T, vocab) gradient in its backward (the nano CPU step 630 ->
    506 ms, benchmarks/model-cpu.md). Validation (no backward) and sampling get logits."""
    from gpt2x.model import GPT

    calls = []
    real_forward = GPT.forward

    def spy(self, idx, targets=None, return_logits=True):
        calls.append((targets is not None, return_logits, self.training))
        return real_forward(self, idx, targets, return_logits)

    monkeypatch.setattr(GPT, "forward", spy)
    run_training(tiny_cfg(tmp_path / "run", data_root, "trainer.max_steps=2"))
    training_steps = [asked for has_targets, asked, training in calls if has_targets and training]
    assert len(training_steps) == 2 and not any(training_steps)
    assert any(has_targets and not training for has_targets, _, training in calls)  # validation
    assert any(not has_targets and asked for has_targets, asked, _ in calls)  # the sample
