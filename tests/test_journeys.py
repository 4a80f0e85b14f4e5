"""Journeys that span commands, run as a user types them: start from Hugging Face weights,
train, export, continue from the export; the run folder is never mixed or lost."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from conftest import TINY, record, rows, run_cli

from gpt2x.checkpoint import list_checkpoints, load_model
from gpt2x.data import ShardLoader

# TINY without the model's shape: with model.init_from the shape is the checkpoint's
TINY_RUN = [o for o in TINY if not o.startswith("model.")]
TINY_SHAPE = [o for o in TINY if o.startswith("model.")]
# the pretrained model's shape differs from the default model group (nano: 4 x 256, T=256)
HF_SHAPE = dict(n_layer=2, n_head=2, n_embd=32, n_positions=64)


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory) -> Path:
    """A small randomly initialised GPT-2 saved the way save_pretrained writes the Hub's."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    out = tmp_path_factory.mktemp("pretrained") / "tiny-gpt2"
    GPT2LMHeadModel(GPT2Config(**HF_SHAPE)).save_pretrained(out)
    return out


def hf_loss(model_dir: Path, x: torch.Tensor, y: torch.Tensor, vocab: int = 0) -> float:
    """The mean next-token cross-entropy of Hugging Face's model on the (x, y) windows; with
    `vocab`, as a model padded to that many tokens computes it (zero rows: logits of 0)."""
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(model_dir, attn_implementation="eager").eval()
    with torch.no_grad():
        logits = hf(input_ids=x).logits
    logits = torch.nn.functional.pad(logits, (0, max(0, vocab - logits.size(-1))))
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten()).item()


def first_batch(record: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """The run's first training batch, read again with the run's own loader settings."""
    c, t = record["config"], record["config"]["trainer"]
    loader = ShardLoader(
        c["data"]["dir"], "train", t["micro_batch_size"], t["seq_len"], seed=t["seed"]
    )
    x, y = loader.next_batch()
    return x.long(), y.long()


def train(tmp_path: Path, data_root: Path, run: str, *overrides: str, check: bool = True):
    run_dir = tmp_path / run
    proc = run_cli(
        "gpt2x.train",
        *TINY_RUN,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
        "logger=none",
        *overrides,
        cwd=tmp_path,
        check=check,
    )
    return proc, run_dir


def test_pretrained_train_export_continue(tmp_path, data_root, hf_dir):
    """model.init_from=<HF folder> trains with the checkpoint's shape (not repeated by the
    user), its first loss is Hugging Face's on the same batch; the export loads in transformers
    with equal logits, and training continues from the export."""
    _, run_dir = train(
        tmp_path,
        data_root,
        "finetune",
        f"model.init_from={hf_dir}",
        "precision=fp32",
        "attn=sdpa",
        "trainer.max_steps=2",
        "optim.warmup_steps=0",
    )
    rec = json.loads((run_dir / "record.json").read_text())
    m = rec["config"]["model"]
    assert (m["n_layer"], m["n_head"], m["n_embd"], m["block_size"]) == (2, 2, 32, 64)
    assert rec["config"]["trainer"]["seq_len"] == 64  # the default follows the block size
    step0 = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[0])
    x, y = first_batch(rec)
    assert step0["loss"] == pytest.approx(hf_loss(hf_dir, x, y), abs=1e-5)

    out = tmp_path / "exported"
    run_cli("gpt2x.export", f"checkpoint={run_dir}", f"out={out}", cwd=tmp_path)
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(out, attn_implementation="eager").eval()
    ours, _, _ = load_model(run_dir, "cpu")
    with torch.no_grad():
        theirs = hf(input_ids=x).logits
        mine, _ = ours.eval()(x)
    torch.testing.assert_close(mine[..., : theirs.size(-1)], theirs, atol=1e-5, rtol=1e-5)

    # continue from the export with a padded vocab: the export's loss with zero logits for the
    # padding tokens
    _, again = train(
        tmp_path,
        data_root,
        "continued",
        f"model.init_from={out}",
        "model.vocab_size=50304",
        "trainer.max_steps=1",
    )
    rec2 = json.loads((again / "record.json").read_text())
    assert rec2["config"]["model"]["vocab_size"] == 50304
    loss = json.loads((again / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    assert loss == pytest.approx(hf_loss(out, x, y, vocab=50304), abs=1e-5)


class OneProcess:
    is_main, is_distributed, world_size = True, False, 1


@pytest.mark.parametrize(
    "override, error",
    [
        ("n_layer=3", "model.n_layer=3 conflicts with model.init_from=.* whose n_layer is 2"),
        ("vocab_size=50000", "model.vocab_size=50000 is smaller than model.init_from="),
        ("n_layer=2", None),  # the checkpoint's own value: not a conflict
        ("vocab_size=50304", None),  # pads the vocabulary
    ],
)
def test_explicit_shape_values_must_agree_with_the_checkpoint(hf_dir, monkeypatch, override, error):
    from omegaconf import OmegaConf

    from gpt2x.config import ConfigError, ModelConfig
    from gpt2x.training import run as run_module

    cfg = OmegaConf.create({"model": OmegaConf.structured(ModelConfig(init_from=str(hf_dir)))})
    key, value = override.split("=")
    cfg.model[key] = int(value)
    monkeypatch.setattr(run_module, "command_line_values", lambda prefix: {key: value})
    if error:
        with pytest.raises(ConfigError, match=error) as e:
            run_module.adopt_pretrained_shape(cfg, OneProcess())
        assert "\n" not in str(e.value)
    else:
        run_module.adopt_pretrained_shape(cfg, OneProcess())
        assert (cfg.model.n_layer, cfg.model.n_embd, cfg.model.block_size) == (2, 32, 64)
        assert cfg.model.vocab_size == max(50257, cfg.model.vocab_size)


def test_init_from_targets_that_are_no_hf_gpt2_are_one_line(tmp_path, hf_dir):
    from transformers import LlamaConfig

    from gpt2x.config import ConfigError
    from gpt2x.training.run import read_pretrained_shape

    (tmp_path / "empty").mkdir()
    run = tmp_path / "run" / "checkpoints" / "step_000002"
    run.mkdir(parents=True)
    (run / "meta.json").write_text("{}")
    LlamaConfig(num_hidden_layers=1, hidden_size=32).save_pretrained(tmp_path / "llama")
    cases = {
        str(tmp_path / "missing"): "no such folder",
        str(tmp_path / "empty"): "has no config.json",
        str(tmp_path / "run"): "is a gpt2x run or checkpoint, .* trainer.resume=",
        str(tmp_path / "llama"): "is a 'llama' model",
        "not-a-model-name-offline": "cannot be loaded .*huggingface-cli download gpt2",
    }
    for target, error in cases.items():
        with pytest.raises(ConfigError, match=error) as e:
            read_pretrained_shape(target)
        assert str(e.value).startswith(f"model.init_from={target}") and "\n" not in str(e.value)
    assert read_pretrained_shape(str(hf_dir))["n_layer"] == 2


# ---------------------------------------------------------------------------------------------
# a run folder is never mixed or lost


def folder_bytes(run_dir: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(run_dir)): p.read_bytes()
        for p in sorted(run_dir.rglob("*"))
        if p.is_file() and p.name != ".lock"
    }


def test_a_folder_that_holds_a_run_is_continued_only_when_asked(tmp_path, data_root):
    """A fresh start into a finished run's folder changes nothing (one line, exit 2); with
    trainer.move_aside=true the old run is renamed first and the new run keeps its checkpoint;
    resume=auto continues."""
    ckpt = ["trainer.checkpoint_every=2", "trainer.max_steps=3", *TINY_SHAPE]
    train(tmp_path, data_root, "run", *ckpt)
    before = folder_bytes(tmp_path / "run")
    refused, _ = train(tmp_path, data_root, "run", *ckpt, check=False)
    errors = [line for line in refused.stderr.splitlines() if line.startswith("error:")]
    assert refused.returncode == 2 and len(errors) == 1, refused.stderr[-2000:]
    assert "already holds a completed run of 3 logged steps with checkpoints" in errors[0]
    assert "trainer.resume=auto" in errors[0] and "trainer.move_aside=true" in errors[0]
    assert folder_bytes(tmp_path / "run") == before  # .hydra/ and train.log included

    moved, run_dir = train(tmp_path, data_root, "run", *ckpt, "trainer.max_steps=2", "trainer.move_aside=true")
    (old,) = tmp_path.glob("run-old-*")
    assert folder_bytes(old) == before
    assert [r["step"] for r in rows(run_dir)] == [0, 1]
    assert [s for s, _ in list_checkpoints(run_dir / "checkpoints")] == [2]

    resumed, _ = train(tmp_path, data_root, "run", *ckpt, "trainer.resume=auto")
    assert [r["step"] for r in rows(run_dir)] == [0, 1, 2]
    assert record(run_dir)["resumed_from"]["step"] == 2


def test_a_folder_in_use_is_refused_at_once(tmp_path, data_root):
    """A second run into the folder of a live one stops at once with one line; the first run
    goes on and logs every step once. The lock is the live process's: none is left behind."""
    import subprocess
    import sys
    import time

    run_dir = tmp_path / "run"
    args = [
        *TINY_RUN, *TINY_SHAPE, f"paths.data_dir={data_root}", f"hydra.run.dir={run_dir}",
        "logger=none", "trainer.resume=auto", "trainer.max_steps=30",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    first = subprocess.Popen(
        [sys.executable, "-m", "gpt2x.train", *args], cwd=tmp_path, env=env,
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
    )  # fmt: skip
    try:
        while first.poll() is None and not rows(run_dir):
            time.sleep(0.05)  # until the first run has logged a step
        second = run_cli("gpt2x.train", *args, cwd=tmp_path, check=False)
        assert second.returncode == 2, second.stderr[-2000:]
        (line,) = [x for x in second.stderr.splitlines() if x.startswith("error:")]
        assert f"the run folder {run_dir} is in use by process {first.pid}" in line
        assert first.wait(timeout=300) == 0, first.stderr.read()[-2000:]
    finally:
        if first.poll() is None:
            first.kill()
    assert [r["step"] for r in rows(run_dir)] == list(range(30))
    # the lock went with the process: the folder can be continued at once
    again = run_cli("gpt2x.train", *args, "trainer.max_steps=31", cwd=tmp_path, check=False)
    assert again.returncode == 0, again.stderr[-2000:]
    assert [r["step"] for r in rows(run_dir)] == list(range(31))


# ---------------------------------------------------------------------------------------------
# bad input: every option that names a path or a model


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_root) -> Path:
    root = tmp_path_factory.mktemp("finished")
    _, run_dir = train(root, data_root, "run", *TINY_SHAPE, "trainer.max_steps=2")
    return run_dir


@pytest.mark.parametrize(
    "case",
    [
        # (tool, option, target, what the one line says)
        ("train", "model.init_from", "{missing}", "no such folder"),
        ("train", "model.init_from", "{empty}", "has no config.json"),
        ("train", "model.init_from", "{run}", "is a gpt2x run or checkpoint"),
        ("train", "trainer.resume", "{missing}", "no checkpoint at"),
        ("train", "trainer.resume", "{empty}", "no checkpoint at"),
        ("train", "trainer.resume", "{file}", "no checkpoint at"),
        ("train", "data.source", "{missing}/*.txt", "matched no files"),
        ("train", "data.source", "{file}", "produced 0 tokens"),
        ("sample", "checkpoint", "{missing}", "no checkpoint at"),
        ("evaluate", "checkpoint", "{empty}", "no checkpoint at"),
        ("export", "checkpoint", "{file}", "no checkpoint at"),
        ("export", "out", "{file}", "is a file"),
        ("export", "out", "{run}", "is not empty and holds no Hugging Face model"),
    ],
    ids=lambda c: f"{c[0]}-{c[1]}-{c[2].strip('{}').split('}')[0]}",
)
def test_path_options_name_the_fix_and_change_nothing(case, tmp_path, data_root, finished_run):
    """A missing, empty or wrong-kind target is one `error:` line (exit 2), and the finished run
    next door is byte for byte what it was."""
    tool, option, target, message = case
    (tmp_path / "empty").mkdir()
    (tmp_path / "file.txt").write_text("")
    target = target.format(
        missing=tmp_path / "missing", empty=tmp_path / "empty", file=tmp_path / "file.txt",
        run=finished_run,
    )  # fmt: skip
    before = folder_bytes(finished_run)
    args = {
        "train": [
            *TINY_RUN, *TINY_SHAPE, f"paths.data_dir={tmp_path}/data", "logger=none",
            f"hydra.run.dir={tmp_path}/new", *(["data=text"] if option == "data.source" else []),
        ],
        "sample": [],
        "evaluate": [],
        "export": [f"out={tmp_path}/exported"] if option != "out" else [],
    }[tool]  # fmt: skip
    if tool != "train" and option != "checkpoint":
        args.append(f"checkpoint={finished_run}")
    if tool == "train" and option != "data.source":
        args[args.index(f"paths.data_dir={tmp_path}/data")] = f"paths.data_dir={data_root}"
    proc = run_cli(f"gpt2x.{tool}", *args, f"{option}={target}", cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1, proc.stderr[-3000:]
    assert message in errors[0] and "Traceback" not in proc.stderr, errors[0]
    assert folder_bytes(finished_run) == before
