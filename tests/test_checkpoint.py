"""Checkpoints, exact resume and fault tolerance on CPU: crash/kill/SIGTERM then resume with
bit-identical losses, atomic writes, corrupted files, rollback on a bad loss, the sample /
export / evaluate CLIs, HellaSwag during training, an unusable output folder, DDP resume."""

from __future__ import annotations

import errno
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, cached_peaks, losses, record, rows, run_cli, tiny_cfg

from gpt2x import checkpoint
from gpt2x.checkpoint import CheckpointError
from gpt2x.checkpoint import state as checkpoint_state
from gpt2x.checkpoint import store as checkpoint_store
from gpt2x.config import ConfigError, register_configs
from gpt2x.record.folder import read_jsonl
from gpt2x.train import TrainingError, TrainingInterrupted, run_training

register_configs()

HELLASWAG = REPO / "tests" / "data" / "hellaswag_tiny.jsonl"
# the uninterrupted reference every resumed run is compared with (checkpoint settings and
# evaluation do not change the losses)
COMMON = ["trainer.max_steps=8", "trainer.sample_tokens=0", "trainer.eval_every=2"]


def ckpts(run_dir: Path) -> list[str]:
    return sorted(p.name for p in (run_dir / "checkpoints").iterdir())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_root) -> dict:
    """An uninterrupted 8-step run; resume=auto with no checkpoint yet starts fresh."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    cfg = tiny_cfg(
        run_dir,
        data_root,
        *COMMON,
        "trainer.resume=auto",
        "trainer.checkpoint_every=3",
        "trainer.keep_last=0",
    )
    run_training(cfg)
    assert "resumed_from" not in record(run_dir)
    metrics = rows(run_dir)
    return {
        "dir": run_dir,
        "loss": [r["loss"] for r in metrics],
        "tokens_seen": [r["tokens_seen"] for r in metrics],
        "eval": [(r["step"], r["val_loss"]) for r in rows(run_dir, "eval.jsonl")],
    }


def assert_matches_reference(run_dir: Path, ref: dict) -> None:
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(8)), "each step logged exactly once"
    assert [r["loss"] for r in metrics] == ref["loss"]  # bit-identical (CPU, fp32)
    assert [r["tokens_seen"] for r in metrics] == ref["tokens_seen"]
    assert [(r["step"], r["val_loss"]) for r in rows(run_dir, "eval.jsonl")] == ref["eval"]


# ---------------------------------------------------------------------------------------------
# exact resume


def test_crash_then_resume_auto_continues_bit_identically(
    tmp_path, data_root, reference, monkeypatch
):
    import gpt2x.train as train_mod

    real_step = train_mod.train_step

    def crash_at_7(run, step):
        if step == 7:
            raise RuntimeError("simulated crash")
        return real_step(run, step)

    run_dir = tmp_path / "run"
    monkeypatch.setattr(train_mod, "train_step", crash_at_7)
    with pytest.raises(RuntimeError, match="simulated crash"):
        run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.checkpoint_every=3"))
    monkeypatch.setattr(train_mod, "train_step", real_step)
    assert ckpts(run_dir) == ["step_000003", "step_000006"]
    assert [r["step"] for r in rows(run_dir)] == list(range(7))  # step 6 is past the checkpoint
    trainer = torch.load(
        run_dir / "checkpoints/step_000006/trainer.pt", map_location="cpu", weights_only=True
    )
    assert trainer["step"] == 6 and trainer["loader"]["batch"] == 6  # 1 micro-batch per step
    assert trainer["tokens_seen"] == 6 * 4 * 32

    run_training(
        tiny_cfg(run_dir, data_root, *COMMON, "trainer.checkpoint_every=3", "trainer.resume=auto")
    )
    assert_matches_reference(run_dir, reference)
    rec = record(run_dir)
    assert rec["status"] == "completed"
    assert rec["resumed_from"]["step"] == 6
    assert rec["resumed_from"]["checkpoint"].endswith("step_000006")
    assert ckpts(run_dir) == ["step_000006", "step_000008"]  # keep_last=2; final save


def test_an_auto_precision_run_keeps_its_precision_when_resumed(
    tmp_path, data_root, monkeypatch, caplog
):
    """precision=auto decides once per run: on a machine where fp32 measured faster the run
    takes fp32; resumed on one where bf16 does, it continues in fp32 (its checkpoint's), while a
    fresh run there takes bf16."""
    short = ["trainer.sample_tokens=0", "trainer.eval_every=0", "precision=auto"]
    monkeypatch.setenv("GPT2X_CACHE", str(cached_peaks(tmp_path / "no_amx", 0.1, 0.3)))
    run_training(tiny_cfg(tmp_path / "first", data_root, *short, "trainer.max_steps=2"))
    assert record(tmp_path / "first")["config"]["precision"]["dtype"] == "fp32"

    monkeypatch.setenv("GPT2X_CACHE", str(cached_peaks(tmp_path / "amx", 0.3, 0.1)))
    resume = f"trainer.resume={tmp_path / 'first'}"
    with caplog.at_level(logging.INFO, logger="gpt2x.train"):
        run_training(
            tiny_cfg(tmp_path / "resumed", data_root, *short, "trainer.max_steps=3", resume)
        )
    assert record(tmp_path / "resumed")["config"]["precision"]["dtype"] == "fp32"
    assert "precision=auto: fp32, the resumed checkpoint's" in caplog.messages
    run_training(tiny_cfg(tmp_path / "fresh", data_root, *short, "trainer.max_steps=1"))
    assert record(tmp_path / "fresh")["config"]["precision"]["dtype"] == "bf16"


def test_resume_from_a_path_in_another_run_folder(tmp_path, data_root, reference):
    src = reference["dir"] / "checkpoints" / "step_000003"
    run_dir = tmp_path / "run"
    run_training(tiny_cfg(run_dir, data_root, *COMMON, f"trainer.resume={src}"))
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(3, 8))
    assert [r["loss"] for r in metrics] == reference["loss"][3:]


def test_sigusr1_in_process_checkpoints_then_resume_matches(
    tmp_path, data_root, reference, monkeypatch
):
    import gpt2x.train as train_mod

    real_step = train_mod.train_step
    previous = signal.getsignal(signal.SIGUSR1)

    def signal_during_step_2(run, step):
        row = real_step(run, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGUSR1)
        return row

    run_dir = tmp_path / "run"
    monkeypatch.setattr(train_mod, "train_step", signal_during_step_2)
    with pytest.raises(TrainingInterrupted, match="SIGUSR1") as info:
        run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.checkpoint_every=5"))
    assert info.value.exit_code == 128 + signal.SIGUSR1
    assert signal.getsignal(signal.SIGUSR1) is previous  # handlers are restored
    assert ckpts(run_dir) == ["step_000003"]  # saved at the step boundary after step 2
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and "trainer.resume=auto" in rec["error"]
    monkeypatch.setattr(train_mod, "train_step", real_step)
    run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.resume=auto"))
    assert_matches_reference(run_dir, reference)


def _tiny_cli_args(run_dir: Path, data_root: Path, *extra: str) -> list[str]:
    return [
        *TINY,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
        "logger=none",
        "trainer.sample_tokens=0",
        "trainer.max_steps=20",
        *extra,
    ]


def test_sigterm_cli_checkpoints_exits_143_and_resume_auto_matches(tmp_path, data_root):
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run_dir = tmp_path / "run"
    log_file = tmp_path / "stderr.txt"
    with open(log_file, "w") as stderr:  # a file, not a pipe: a full pipe would block the run
        proc = subprocess.Popen(
            [sys.executable, "-m", "gpt2x.train", *_tiny_cli_args(run_dir, data_root)],
            cwd=tmp_path,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
        )
        deadline = time.time() + 120
        while len(read_jsonl(run_dir / "metrics.jsonl")) < 3:
            assert proc.poll() is None and time.time() < deadline, "run ended before the signal"
            time.sleep(0.01)
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=120)
    err = log_file.read_text()
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and "SIGTERM" in rec["error"]
    (ckpt,) = ckpts(run_dir)
    step = int(ckpt.split("_")[1])
    assert 3 <= step < 20
    checkpoint.verify(run_dir / "checkpoints" / ckpt)
    assert [r["step"] for r in rows(run_dir)] == list(range(step))

    run_cli("gpt2x.train", *_tiny_cli_args(run_dir, data_root, "trainer.resume=auto"), cwd=tmp_path)
    ref_dir = tmp_path / "ref"
    run_cli("gpt2x.train", *_tiny_cli_args(ref_dir, data_root), cwd=tmp_path)
    assert [r["step"] for r in rows(run_dir)] == list(range(20))
    assert [r["loss"] for r in rows(run_dir)] == [r["loss"] for r in rows(ref_dir)]
    assert record(run_dir)["status"] == "completed"


# ---------------------------------------------------------------------------------------------
# atomic writes, corrupted files


def test_failed_write_keeps_the_previous_checkpoint(tmp_path, data_root, monkeypatch):
    real_save = checkpoint_store.save_torch
    calls = []

    def disk_full_at_step_6(obj, path):
        calls.append(path)
        if path.parent.name == "step_000006.tmp" and path.name == checkpoint.OPTIM_FILE:
            real_save(obj, path)
            with open(path, "r+b") as f:  # half of the file made it to disk
                f.truncate(path.stat().st_size // 2)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
        real_save(obj, path)

    monkeypatch.setattr(checkpoint_state, "save_torch", disk_full_at_step_6)
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError, match="step_000006.*No space left.*previous checkpoints"):
        run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.checkpoint_every=3"))
    assert record(run_dir)["status"] == "failed"
    assert "No space left" in record(run_dir)["error"]
    assert ckpts(run_dir) == ["step_000003"]  # no partial folder left, valid or not
    checkpoint.verify(run_dir / "checkpoints" / "step_000003")

    # a kill during a write leaves only *.tmp folders: never taken for a checkpoint
    shutil.copytree(run_dir / "checkpoints/step_000003", run_dir / "checkpoints/step_000009.tmp")
    (run_dir / "checkpoints/step_000010").mkdir()  # no meta.json: not a checkpoint either
    assert checkpoint.latest(run_dir) == run_dir / "checkpoints" / "step_000003"
    with pytest.raises(CheckpointError, match="unfinished checkpoint"):
        checkpoint.resolve(run_dir / "checkpoints/step_000009.tmp")
    monkeypatch.setattr(checkpoint_state, "save_torch", real_save)
    run_training(
        tiny_cfg(run_dir, data_root, *COMMON, "trainer.checkpoint_every=3", "trainer.resume=auto")
    )
    assert record(run_dir)["resumed_from"]["step"] == 3
    assert "step_000009.tmp" not in ckpts(run_dir)  # the next save cleans up


@pytest.fixture
def small_run(tmp_path, data_root) -> Path:
    run_dir = tmp_path / "small"
    run_training(
        tiny_cfg(
            run_dir,
            data_root,
            "trainer.max_steps=2",
            "trainer.sample_tokens=0",
            "trainer.checkpoint_every=1",
            "trainer.keep_last=0",
        )
    )
    return run_dir


def test_corrupted_or_truncated_checkpoint_is_a_one_line_error(
    small_run, data_root, tmp_path, caplog
):
    last = small_run / "checkpoints" / "step_000002"
    model_file = last / checkpoint.MODEL_FILE
    data = bytearray(model_file.read_bytes())
    data[-10] ^= 0xFF  # one flipped bit pattern inside a weight
    model_file.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=r"model\.safetensors is corrupted \(sha256"):
        run_training(
            tiny_cfg(tmp_path / "r1", data_root, "trainer.max_steps=3", f"trainer.resume={last}")
        )
    # checked before the run writes anything: no record of a run that never started
    assert not (tmp_path / "r1" / "record.json").exists()
    # resume=auto skips the broken newest checkpoint (with a warning) and takes the older one
    with caplog.at_level(logging.WARNING):
        assert checkpoint.latest(small_run) == small_run / "checkpoints" / "step_000001"
    assert any("skipping checkpoint" in r.getMessage() for r in caplog.records)

    # the CLIs say the same in one line
    proc = run_cli("gpt2x.sample", f"checkpoint={last}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "model.safetensors is corrupted" in errors[0]

    first = small_run / "checkpoints" / "step_000001"
    optim = first / checkpoint.OPTIM_FILE
    optim.write_bytes(optim.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"optimizer\.pt is truncated"):
        checkpoint.verify(first)
    (first / checkpoint.META_FILE).unlink()
    with pytest.raises(CheckpointError, match="not a complete checkpoint"):
        checkpoint.read_meta(first)
    with pytest.raises(CheckpointError, match="no checkpoint at"):
        checkpoint.resolve(tmp_path / "nowhere")


def test_unreadable_files_are_translated(small_run):
    ckpt = small_run / "checkpoints" / "step_000001"
    (ckpt / checkpoint.MODEL_FILE).write_bytes(b"\xff" * 64)  # a garbage header
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a valid safetensors"):
        checkpoint.load_model_state(ckpt)
    (ckpt / checkpoint.TRAINER_FILE).write_bytes(b"not a zip")
    with pytest.raises(CheckpointError, match=r"trainer\.pt cannot be read"):
        checkpoint_store.torch_load(ckpt / checkpoint.TRAINER_FILE)


def test_restore_handles_compile_prefixes_both_ways(small_run):
    ckpt = small_run / "checkpoints" / "step_000002"
    model, meta, config = checkpoint.load_model(ckpt)
    ref = {k: v.clone() for k, v in model.state_dict().items()}
    for name in ref:  # the model keys, and _orig_mod./module. prefixed ones, map to the same
        assert checkpoint.clean_keys({f"_orig_mod.module.{name}": 0}) == {name: 0}
    fresh, _, _ = checkpoint.load_model(ckpt)
    torch.nn.init.zeros_(fresh.transformer.wte.weight)
    compiled = torch.compile(fresh)  # not run: only the wrapper's names matter here
    checkpoint.restore(ckpt, compiled, restore_rng=False)
    assert all(torch.equal(ref[k], v) for k, v in fresh.state_dict().items())
    state = checkpoint.gather_model_state(compiled)
    assert not any("_orig_mod" in k for k in state)


# ---------------------------------------------------------------------------------------------
# compile + HellaSwag during training


def test_compiled_run_checkpoint_has_plain_names_and_logs_hellaswag(tmp_path, data_root):
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        run_dir,
        data_root,
        "compile=true",
        "attn=sdpa",
        "trainer.max_steps=3",
        "trainer.sample_tokens=0",
        "trainer.hellaswag_every=1",
        f"trainer.hellaswag_path={HELLASWAG}",
        "trainer.hellaswag_limit=3",
    )
    run_training(cfg)
    evals = rows(run_dir, "eval.jsonl")
    assert [r["step"] for r in evals] == [1, 2]
    for r in evals:
        assert r["hellaswag_n"] == 3 and 0.0 <= r["hellaswag_acc_norm"] <= 1.0
        assert math.isfinite(r["val_loss"])
    from safetensors import safe_open

    ckpt = run_dir / "checkpoints" / "step_000003"
    with safe_open(str(ckpt / checkpoint.MODEL_FILE), "pt") as f:
        keys = list(f.keys())
    assert keys and not any("_orig_mod" in k or k.startswith("module.") for k in keys)
    optim = torch.load(ckpt / checkpoint.OPTIM_FILE, weights_only=True)
    assert not any("_orig_mod" in k for k in optim["state"])
    model, _, _ = checkpoint.load_model(ckpt)  # an uncompiled GPT
    assert set(model.state_dict()) == set(keys) | {"lm_head.weight"}
    # an uncompiled run resumes from the compiled run's checkpoint
    run_training(
        tiny_cfg(
            run_dir,
            data_root,
            "trainer.max_steps=4",
            "trainer.sample_tokens=0",
            "trainer.resume=auto",
        )
    )
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2, 3]


def test_missing_hellaswag_file_is_a_config_error(tmp_path, data_root):
    cfg = tiny_cfg(
        tmp_path / "run",
        data_root,
        "trainer.hellaswag_every=2",
        f"trainer.hellaswag_path={tmp_path}/nope.jsonl",
    )
    with pytest.raises(ConfigError, match="trainer.hellaswag_every"):
        run_training(cfg)


# ---------------------------------------------------------------------------------------------
# bad loss: stop (see test_train) or roll back


def _poison_batch(monkeypatch, bad_batch: int, always: bool = False):
    """NaN loss for the step that reads loader batch `bad_batch` (the data is 'bad')."""
    import gpt2x.train as train_mod

    real_step = train_mod.train_step
    hits = []

    def poisoned(run, step):
        position = run.train_loader.state_dict()["batch"]
        row = real_step(run, step)
        if position == bad_batch or (always and step == bad_batch):
            hits.append(step)
            return {**row, "loss": float("nan")}
        return row

    monkeypatch.setattr(train_mod, "train_step", poisoned)
    return hits


def test_rollback_skips_the_bad_batch_and_continues(
    tmp_path, data_root, reference, monkeypatch, caplog
):
    hits = _poison_batch(monkeypatch, bad_batch=5)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        run_dir, data_root, *COMMON, "trainer.checkpoint_every=2", "trainer.on_bad_loss=rollback"
    )
    with caplog.at_level(logging.WARNING):
        run_training(cfg)
    assert hits == [5]
    assert any("rolled back to step_000004" in r.getMessage() for r in caplog.records)
    rec = record(run_dir)
    assert rec["status"] == "completed"
    assert [(r["step"], r["to_step"]) for r in rec["rollbacks"]] == [(5, 4)]
    metrics = rows(run_dir)
    assert [r["step"] for r in metrics] == list(range(8))
    assert [r["loss"] for r in metrics[:5]] == reference["loss"][:5]
    assert all(math.isfinite(r["loss"]) for r in metrics)
    trainer = torch.load(run_dir / "checkpoints/step_000008/trainer.pt", weights_only=True)
    assert trainer["skip_batches"] == {5: 1}
    assert trainer["loader"]["batch"] == 9  # 8 steps + the 1 skipped batch: nothing replayed
    # a resume keeps the history's rollbacks in the record (they are in the checkpoint)
    run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.resume=auto"))
    assert [(r["step"], r["to_step"]) for r in record(run_dir)["rollbacks"]] == [(5, 4)]


def test_rollback_gives_up_after_max_rollbacks(tmp_path, data_root, monkeypatch):
    hits = _poison_batch(monkeypatch, bad_batch=2, always=True)
    run_dir = tmp_path / "run"
    cfg = tiny_cfg(
        run_dir,
        data_root,
        *COMMON,
        "trainer.checkpoint_every=0",
        "trainer.on_bad_loss=rollback",
        "trainer.max_rollbacks=2",
    )
    with pytest.raises(TrainingError, match="at step 2.*after 2 rollbacks"):
        run_training(cfg)
    assert hits == [2, 2, 2]
    assert ckpts(run_dir) == ["step_000000"]  # rollback mode saves the start to go back to
    assert record(run_dir)["status"] == "failed"


# ---------------------------------------------------------------------------------------------
# sample / export / evaluate


def test_sample_export_evaluate_from_a_checkpoint(small_run, tmp_path):
    proc = run_cli(
        "gpt2x.sample",
        f"checkpoint={small_run}",
        "prompt=To be",
        "max_new_tokens=5",
        "num_samples=2",
        "seed=3",
        "temperature=0.9",
        "top_k=20",
        cwd=tmp_path,
    )
    samples = proc.stdout.split("---------------")
    assert len(samples) == 2 and all(s.strip().startswith("To be") for s in samples)
    assert "step 2" in proc.stderr

    out = tmp_path / "hf"
    run_cli(
        "gpt2x.export",
        f"checkpoint={small_run}/checkpoints/step_000002",
        f"out={out}",
        cwd=tmp_path,
    )
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(str(out)).eval()
    ours, _, _ = checkpoint.load_model(small_run)
    idx = torch.randint(0, 50257, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        theirs = hf(idx).logits
        mine = ours(idx)[0]
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-4)
    # the tokenizer goes along: transformers' own loaders and pipeline work on the folder,
    # offline, and the pipeline's greedy text is gpt2x's greedy text
    from transformers import AutoTokenizer, pipeline

    from gpt2x.data.tokenizer import get_tokenizer

    text = "To be, or not to be:\n\n  ROMEO. <|endoftext|> 1234 caf\u00e9"
    tok = AutoTokenizer.from_pretrained(str(out))
    assert len(tok) == 50257 and tok.model_max_length == 32  # the model's block_size
    assert tok.encode(text) == get_tokenizer().encode(text, allowed_special="all")
    generated = pipeline("text-generation", model=str(out), device="cpu")(
        "To be", max_new_tokens=5, do_sample=False
    )[0]["generated_text"]
    prompt = torch.tensor([get_tokenizer().encode("To be")])
    greedy = ours.generate(prompt, 5, temperature=0.0)[0].tolist()
    assert len(greedy) == 2 + 5 and generated == get_tokenizer().decode(greedy)

    proc = run_cli(
        "gpt2x.evaluate",
        f"checkpoint={small_run}",
        "hellaswag=true",
        f"hellaswag_path={HELLASWAG}",
        "hellaswag_limit=4",
        cwd=tmp_path,
    )
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["step"] == 2 and result["hellaswag_n"] == 4
    assert 0.0 <= result["hellaswag_acc_norm"] <= 1.0
    # the same validation loss the run logged at its last step
    assert result["val_loss"] == pytest.approx(record(small_run)["summary"]["val_loss"], rel=1e-5)

    proc = run_cli(
        "gpt2x.export",
        f"checkpoint={tmp_path}/none",
        f"out={tmp_path}/x",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and proc.stderr.strip().startswith("error: no checkpoint at")
    proc = run_cli("gpt2x.evaluate", "bogus=1", cwd=tmp_path, check=False)
    assert proc.returncode == 1 and "Key 'bogus' not in 'EvaluateConfig'" in proc.stderr  # Hydra's


# ---------------------------------------------------------------------------------------------
# the output folder, small pieces


def test_unusable_output_folder_is_one_line_before_training(tmp_path, data_root, monkeypatch):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    # CLI: paths.run_dir inside a file (hydra.run.dir itself is created by Hydra before us)
    proc = run_cli(
        "gpt2x.train",
        *TINY,
        f"paths.data_dir={data_root}",
        "logger=none",
        f"hydra.run.dir={tmp_path}/hydra_run",
        f"paths.run_dir={blocker}/run",
        cwd=tmp_path,
        check=False,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "cannot write to the run folder" in errors[0]
    assert "paths.output_dir" in errors[0] and "hydra.run.dir" in errors[0]

    # too little free space for the one checkpoint this run saves
    import shutil as shutil_mod

    usage = shutil_mod.disk_usage(tmp_path)
    monkeypatch.setattr(shutil_mod, "disk_usage", lambda p: usage._replace(free=10_000))
    run_dir = tmp_path / "run"
    with pytest.raises(ConfigError, match="GB free, but 1 checkpoint of this"):
        run_training(tiny_cfg(run_dir, data_root, "trainer.max_steps=2"))
    assert not (run_dir / "metrics.jsonl").exists()
    # without checkpoints there is nothing to check
    run_training(
        tiny_cfg(
            run_dir,
            data_root,
            "trainer.max_steps=1",
            "trainer.save_final=false",
            "trainer.sample_tokens=0",
        )
    )
    assert not (run_dir / "checkpoints").exists()


def test_bad_settings_are_config_errors(tmp_path, data_root):
    with pytest.raises(ConfigError, match="trainer.on_bad_loss"):
        run_training(tiny_cfg(tmp_path / "run", data_root, "trainer.on_bad_loss=retry"))
    with pytest.raises(CheckpointError, match="trainer.resume=.*no checkpoint at"):
        run_training(tiny_cfg(tmp_path / "run", data_root, f"trainer.resume={tmp_path}/none"))


# ---------------------------------------------------------------------------------------------
# DDP


def _torchrun_args(
    run_dir: Path | None,
    data_root: Path,
    *extra: str,
    restarts: int = 0,
    entry=("-m", "gpt2x.train"),
    parallel: str = "ddp",
) -> list[str]:
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node=2",
        f"--max-restarts={restarts}",
        *entry,
        f"parallel={parallel}",
        *TINY,
        "trainer.total_batch_tokens=256",
        f"paths.data_dir={data_root}",
        # none: the run folder is the launch's own (outputs/runs/<name> under the cwd)
        *([f"hydra.run.dir={run_dir}"] if run_dir is not None else []),
        "logger=none",
        *COMMON,
        *extra,
    ]


TORCHRUN_ENV = {**os.environ, "OMP_NUM_THREADS": "1"}

# gpt2x.train whose rank 1 gets SIGTERM during step 2 of the first attempt (a preempted worker),
# at a deterministic point instead of racing a signal from outside against a fast run.
PREEMPTED_TRAIN = """
import os, signal
import gpt2x.train as train_mod

real_step = train_mod.train_step


def train_step(run, step):
    row = real_step(run, step)
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    if step == 2 and run.dist.rank == 1 and first_attempt:
        os.kill(os.getpid(), signal.SIGTERM)
    return row


train_mod.train_step = train_step
train_mod.main()
"""


def _torchrun(run_dir: Path, data_root: Path, *extra: str, cwd: Path, **kw) -> str:
    args = _torchrun_args(run_dir, data_root, *extra, **kw)
    proc = subprocess.run(
        args, cwd=cwd, env=TORCHRUN_ENV, capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def one_process_losses(tmp_path_factory, data_root) -> list[float]:
    """Per-step losses of the 2-process runs' training in one process (their 2 micro-batches
    accumulated; tests/test_distributed.py holds DDP and FSDP equal to it to fp32 rounding)."""
    run_dir = tmp_path_factory.mktemp("one_process") / "run"
    run_training(tiny_cfg(run_dir, data_root, *COMMON, "trainer.total_batch_tokens=256"))
    assert record(run_dir)["grad_accum_steps"] == 2
    return losses(run_dir)


@pytest.mark.distributed
def test_ddp_preempted_worker_checkpoints_and_relaunch_continues_the_same_training(
    tmp_path, data_root, one_process_losses
):

    # rank 1 is preempted (SIGTERM) during step 2: both ranks agree to stop at the step
    # boundary, checkpoint and exit 143, so torchrun reports a failed worker group ...
    # (README's recipe: no hydra.run.dir, so each `torchrun --standalone` launch has its own
    # rendezvous id; with trainer.resume=auto the run folder is named after the overrides)
    script = tmp_path / "preempted_train.py"
    script.write_text(PREEMPTED_TRAIN)
    proc = subprocess.run(
        _torchrun_args(None, data_root, "trainer.resume=auto", entry=(str(script),)),
        cwd=tmp_path,
        env=TORCHRUN_ENV,
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0 and "exitcode  : 143" in out, out[-4000:]
    assert "SIGTERM received: stopped after step 3/8" in out
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and ckpts(run_dir) == ["step_000003"]
    # the command to continue is the same launch: it finds the folder by itself
    assert rec["error"].endswith(
        "continue with: torchrun --standalone --nproc_per_node=2 -m gpt2x.train "
        + " ".join(rec["overrides"])
    ), rec["error"]
    # ... and the same command line again (a restart / requeue) continues exactly
    _torchrun(None, data_root, "trainer.resume=auto", cwd=tmp_path)
    assert list((tmp_path / "outputs" / "runs").iterdir()) == [run_dir]
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["resumed_from"]["step"] == 3
    assert [r["step"] for r in rows(run_dir)] == list(range(8))
    assert losses(run_dir) == pytest.approx(one_process_losses, rel=1e-6)


@pytest.mark.distributed
@pytest.mark.parametrize("parallel", ["fsdp"])
def test_torchrun_max_restarts_resumes_in_place_on_the_same_losses(
    tmp_path, data_root, one_process_losses, parallel
):
    """One `torchrun --max-restarts=1` command: the first attempt is preempted at step 2 and
    checkpoints; torchrun restarts the group in place and `trainer.resume=auto` continues it
    (under FSDP2 the checkpoint is gathered from the shards and re-sharded on load). The
    restart is torchrun's, the same for DDP, whose checkpoint-and-continue path the relaunch
    test above covers; FSDP2 adds the re-sharding."""
    script = tmp_path / "preempted_train.py"
    script.write_text(PREEMPTED_TRAIN)
    run_dir = tmp_path / "run"
    out = _torchrun(
        run_dir,
        data_root,
        "trainer.resume=auto",
        cwd=tmp_path,
        restarts=1,
        entry=(str(script),),
        parallel=parallel,
    )
    assert "SIGTERM received: stopped after step 3/8" in out
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["resumed_from"]["step"] == 3
    assert [r["step"] for r in rows(run_dir)] == list(range(8))
    assert losses(run_dir) == pytest.approx(one_process_losses, rel=1e-6)


def test_save_restore_round_trip_with_an_active_grad_scaler(tmp_path):
    """fp16 runs need CUDA; the GradScaler state is checked here with a CPU scaler."""
    from types import SimpleNamespace

    from gpt2x.model import GPT, GPTConfig
    from gpt2x.training.optim import build_optimizer

    def build():
        torch.manual_seed(0)
        model = GPT(GPTConfig(block_size=16, vocab_size=64, n_layer=1, n_head=2, n_embd=16))
        optim_cfg = SimpleNamespace(
            lr=1e-3, weight_decay=0.1, beta1=0.9, beta2=0.95, eps=1e-8, fused=False
        )
        return (
            model,
            build_optimizer(model, optim_cfg),
            torch.amp.GradScaler("cpu", init_scale=64.0),
        )

    model, optimizer, scaler = build()
    x = torch.randint(0, 64, (2, 8))
    for _ in range(2):
        optimizer.zero_grad()
        scaler.scale(model(x, x)[1]).backward()
        scaler.step(optimizer)
        scaler.update()
    checkpoint.save(tmp_path, 2, model, optimizer, scaler=scaler, tokens_seen=32)
    model2, optimizer2, scaler2 = build()
    state = checkpoint.restore(
        tmp_path / "checkpoints" / "step_000002", model2, optimizer2, scaler=scaler2
    )
    assert (state.step, state.tokens_seen) == (2, 32)
    assert scaler2.get_scale() == scaler.get_scale() and scaler2.state_dict() == scaler.state_dict()
    for a, b in zip(model.parameters(), model2.parameters()):
        assert torch.equal(a, b)
    s1, s2 = optimizer.state_dict(), optimizer2.state_dict()
    assert s1["param_groups"] == s2["param_groups"]  # betas stay tuples
    for k in s1["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(s1["state"][k][name], s2["state"][k][name])


def test_hellaswag_eval_row_goes_to_wandb_as_val_hellaswag_acc_norm():
    from gpt2x.record.wandb_logger import WandbLogger

    logged = []
    logger = object.__new__(WandbLogger)
    logger.run = type("Run", (), {"log": lambda self, data, step: logged.append((step, data))})()
    logger.log_eval(
        {
            "step": 4,
            "val_loss": 3.0,
            "tokens_seen": 8,
            "hellaswag_acc": 0.25,
            "hellaswag_acc_norm": 0.5,
            "hellaswag_n": 4,
        }
    )
    assert logged == [
        (
            4,
            {
                "val/loss": 3.0,
                "val/hellaswag_acc": 0.25,
                "val/hellaswag_acc_norm": 0.5,
                "val/hellaswag_n": 4,
                "tokens_seen": 8,
            },
        )
    ]


@pytest.mark.parametrize(
    ("device", "dtype", "expected"),
    [
        ("cuda", "bf16", "flash"),
        ("cuda", "fp16", "flash"),
        ("cuda", "fp32", "sdpa"),  # the flash kernel has no fp32 CUDA version
        ("cpu", "bf16", "sdpa"),
        ("cpu", "fp32", "sdpa"),
        ("mps", "fp32", "sdpa"),
    ],
)
def test_a_flash_checkpoint_runs_everywhere_with_sdpa_where_flash_cannot(device, dtype, expected):
    from gpt2x.checkpoint.state import inference_attention

    assert inference_attention("flash", torch.device(device), dtype) == expected
    assert inference_attention("naive", torch.device(device), dtype) == "naive"
