"""The reproduction recipes (experiments/reproduce/): every value equals its cited source, the
micro-batch override keeps the tokens per step, the published baselines, the results figure's
plotted data, and (slow) the CPU rehearsal end to end with a resume."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, run_cli
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from gpt2x import CONF_DIR
from gpt2x.config import ConfigError, grad_accum_steps, register_configs, validate
from gpt2x.lab import baselines
from gpt2x.lab.figure import FigureError, load_series, plot_reproduction, reproduction_figure
from gpt2x.record.folder import read_jsonl, read_record

register_configs()
ASSET = REPO / "gpt2x" / "assets" / "hellaswag_sample.jsonl"

TOKENS_10B = 10_000_000_000
# GPT-3 paper Appendix B: "linear LR warmup over the first 375 million tokens"
WARMUP_TOKENS = 375_000_000
# the lecture's val set: val_loss_steps=20 batches of B=64 x T=1024 on each of 8 ranks
LECTURE_EVAL_TOKENS = 20 * 64 * 1024 * 8

# name: (model, n_layer, n_embd, lr, tokens/step, steps, warmup, B, grad accum on 8 GPUs)
# lr and tokens/step: GPT-3 Table 2.1 (124M: the lecture's train_gpt2.py, the same values)
RECIPES = {
    "gpt2_124m": ("gpt2", 12, 768, 6e-4, 524288, 19073, 715, 64, 1),
    "gpt2_124m_40b": ("gpt2", 12, 768, 6e-4, 524288, 76292, 715, 64, 1),
    "gpt2_350m": ("gpt2-medium", 24, 1024, 3e-4, 524288, 19073, 715, 16, 4),
    "gpt2_774m": ("gpt2-large", 36, 1280, 2.5e-4, 524288, 19073, 715, 8, 8),
    "gpt2_1558m": ("gpt2-xl", 48, 1600, 2e-4, 1048576, 9536, 358, 4, 32),
}
# what every GPU recipe shares (the lecture's train_gpt2.py; GPT-3 Appendix B)
COMMON = {
    "model.vocab_size": 50304,
    "model.block_size": 1024,
    "data.name": "fineweb_edu",
    "precision.name": "bf16",
    "attn.impl": "flash",
    "compile": True,
    "parallel.kind": "ddp",
    "optim.name": "adamw",
    "optim.fused": True,
    "optim.min_lr_ratio": 0.1,
    "optim.decay_steps": None,
    "optim.weight_decay": 0.1,
    "optim.beta1": 0.9,
    "optim.beta2": 0.95,
    "optim.eps": 1e-8,
    "optim.grad_clip": 1.0,
    "trainer.seq_len": 1024,
    "trainer.seed": 1337,
    "trainer.eval_every": 250,
    "trainer.eval_tokens": 10_485_760,
    "trainer.hellaswag_every": 250,
    "trainer.hellaswag_limit": 0,
    "trainer.hellaswag_path": "",
    "trainer.sample_every": 250,
    "trainer.sample_tokens": 32,
    "trainer.sample_prompt": "Hello, I'm a language model,",
    "trainer.keep_last": 3,
    "trainer.resume": "auto",
    "logger.kind": "wandb",
}


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.paths.run_dir = "/tmp/run"  # normally ${hydra:runtime.output_dir}, set by @hydra.main
    return cfg


def resolved(cfg, key: str):
    value = OmegaConf.select(cfg, key)
    return value.value if hasattr(value, "value") else value  # enums as their names


def recipe_names() -> list[str]:
    return sorted(p.stem for p in (REPO / "experiments" / "reproduce").glob("*.yaml"))


def test_the_recipe_table_covers_every_recipe():
    assert recipe_names() == sorted([*RECIPES, "rehearsal"])


@pytest.mark.parametrize("name", recipe_names())
def test_every_reproduce_experiment_composes_and_names_itself(name):
    cfg = compose_cfg([f"+experiment=reproduce/{name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment == f"reproduce/{name}"
    assert cfg.logger.group == f"reproduce-{name}"


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_values_equal_their_sources(name):
    model, n_layer, n_embd, lr, tokens, steps, warmup, b, accum8 = RECIPES[name]
    cfg = compose_cfg([f"+experiment=reproduce/{name}"])
    got = {key: resolved(cfg, key) for key in COMMON}
    assert got == COMMON
    assert (cfg.model.name, cfg.model.n_layer, cfg.model.n_embd) == (model, n_layer, n_embd)
    assert cfg.optim.lr == pytest.approx(lr)
    assert cfg.optim.lr * cfg.optim.min_lr_ratio == pytest.approx(lr / 10)  # 6e-5 for 124M
    assert cfg.trainer.total_batch_tokens == tokens
    assert cfg.trainer.max_steps == steps
    assert cfg.optim.warmup_steps == warmup
    assert cfg.trainer.micro_batch_size == b
    assert grad_accum_steps(cfg, 8) == accum8
    assert cfg.trainer.micro_batch_size * 1024 * 8 * accum8 == tokens
    validate(cfg, 8)  # and on one GPU: the accumulation grows, the tokens per step do not
    assert grad_accum_steps(cfg, 1) == 8 * accum8


@pytest.mark.parametrize("name", sorted(RECIPES))
def test_recipe_steps_and_warmup_follow_from_the_token_budgets(name):
    """10B tokens in floor(10e9 / tokens per step) steps as the lecture rounds (19,073), the
    40B run 4x that; warmup = GPT-3's 375M tokens in steps (715.3 -> 715, 357.6 -> 358)."""
    cfg = compose_cfg([f"+experiment=reproduce/{name}"])
    tokens = cfg.trainer.total_batch_tokens
    budget_steps = TOKENS_10B // tokens
    assert cfg.trainer.max_steps == (4 * budget_steps if name.endswith("_40b") else budget_steps)
    assert cfg.optim.warmup_steps == round(WARMUP_TOKENS / tokens)
    assert cfg.trainer.eval_tokens == LECTURE_EVAL_TOKENS
    assert cfg.trainer.checkpoint_every > 0 and cfg.trainer.save_final


def test_the_124m_recipe_is_the_lectures_in_numbers():
    cfg = compose_cfg(["+experiment=reproduce/gpt2_124m"])
    assert grad_accum_steps(cfg, 8) == 524288 // (64 * 1024 * 8) == 1
    assert cfg.trainer.max_steps * cfg.trainer.total_batch_tokens == pytest.approx(1e10, rel=1e-4)
    assert cfg.trainer.checkpoint_every == 500


def test_a_smaller_gpu_lowers_the_micro_batch_and_keeps_the_tokens_per_step():
    base = compose_cfg(["+experiment=reproduce/gpt2_124m"])
    small = compose_cfg(["+experiment=reproduce/gpt2_124m", "trainer.micro_batch_size=16"])
    assert small.trainer.total_batch_tokens == base.trainer.total_batch_tokens == 524288
    assert (grad_accum_steps(base, 8), grad_accum_steps(small, 8)) == (1, 4)
    assert (grad_accum_steps(base, 1), grad_accum_steps(small, 1)) == (8, 32)
    validate(small, 8)


def test_a_micro_batch_that_does_not_divide_the_tokens_per_step_is_a_config_error():
    cfg = compose_cfg(["+experiment=reproduce/gpt2_124m", "trainer.micro_batch_size=48"])
    with pytest.raises(ConfigError, match=r"trainer\.total_batch_tokens=524288"):
        grad_accum_steps(cfg, 8)


def test_the_rehearsal_keeps_the_recipes_shape_on_a_cpu():
    recipe = compose_cfg(["+experiment=reproduce/gpt2_124m"])
    cfg = compose_cfg(["+experiment=reproduce/rehearsal"])
    same = [k for k in COMMON if not k.startswith(("data.", "model.block", "trainer.", "compile"))]
    same += ["trainer.seed", "trainer.keep_last", "trainer.resume", "trainer.sample_prompt"]
    assert {k: resolved(cfg, k) for k in same} == {k: resolved(recipe, k) for k in same}
    assert cfg.compile is False  # CPU compile would take most of the budget (rehearsal.yaml)
    assert cfg.data.name == "shakespeare"
    assert grad_accum_steps(cfg, 1) == 2  # accumulation is exercised
    t = cfg.trainer
    assert t.max_steps <= 60
    events = (t.eval_every, t.hellaswag_every, t.sample_every, t.checkpoint_every)
    assert all(0 < n <= t.max_steps // 2 for n in events)
    assert t.eval_tokens == 4 * t.micro_batch_size * t.seq_len
    assert Path(t.hellaswag_path) == ASSET
    validate(cfg, 1)


def test_the_shipped_hellaswag_sample_is_the_test_file():
    assert ASSET.read_bytes() == (REPO / "tests" / "data" / "hellaswag_tiny.jsonl").read_bytes()
    rows = [json.loads(line) for line in ASSET.read_text().splitlines() if line.strip()]
    assert len(rows) == 6 and all(len(r["endings"]) == 4 for r in rows)


# --------------------------------------------------------------------------------------------
# baselines


def test_published_baselines_are_the_cited_numbers():
    # build-nanogpt play.ipynb (loss_baseline, hella2_baseline, hella3_baseline)
    assert baselines.GPT2_VAL_LOSS == {"124M": 3.2924}
    assert baselines.GPT2_HELLASWAG == {
        "124M": 0.294463,
        "350M": 0.375224,
        "774M": 0.431986,
        "1558M": 0.488946,
    }
    assert baselines.GPT3_HELLASWAG == {"124M": 0.337, "350M": 0.436, "774M": 0.510, "1558M": 0.547}
    assert set(baselines.GPT3_NAME) == set(baselines.GPT3_HELLASWAG)


@pytest.mark.parametrize(
    ("model", "size"),
    [("gpt2", "124M"), ("gpt2-medium", "350M"), ("gpt2-large", "774M"), ("gpt2-xl", "1558M")],
)
def test_size_key_of_each_gpt2_model_config(model, size):
    cfg = compose_cfg([f"model={model}", "model.vocab_size=50304"])  # padding does not matter
    assert baselines.size_key(OmegaConf.to_container(cfg.model)) == size


def test_size_key_of_other_shapes_is_none():
    nano = compose_cfg(["model=nano"]).model
    assert baselines.size_key(OmegaConf.to_container(nano)) is None
    assert baselines.size_key({"n_layer": 12, "n_embd": 512}) is None
    assert baselines.size_key({}) is None and baselines.size_key(None) is None


def test_val_loss_baseline_applies_to_124m_on_fineweb_edu_only():
    assert baselines.val_loss_baseline("124M", "fineweb_edu") == 3.2924
    assert baselines.val_loss_baseline("124M", "shakespeare") is None
    assert baselines.val_loss_baseline("350M", "fineweb_edu") is None
    assert baselines.val_loss_baseline(None, "fineweb_edu") is None


# --------------------------------------------------------------------------------------------
# the figure, on run folders written here


def write_run(
    folder: Path,
    *,
    n_layer: int = 12,
    n_embd: int = 768,
    data: str = "fineweb_edu",
    metrics: list[dict],
    evals: list[dict],
) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    record = {
        "run_id": folder.name,
        "experiment": "reproduce/test",
        "tokens_per_step": 1000,
        "config": {
            "model": {"name": "m", "n_layer": n_layer, "n_embd": n_embd},
            "data": {"name": data},
        },
    }
    (folder / "record.json").write_text(json.dumps(record))
    for name, rows in (("metrics.jsonl", metrics), ("eval.jsonl", evals)):
        (folder / name).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return folder


# a resumed run: steps 3..5 logged again after the checkpoint at 3, with other losses
METRICS = [{"step": s, "loss": 10.0 - s, "tokens_seen": 1000 * (s + 1)} for s in range(6)] + [
    {"step": s, "loss": 9.5 - s, "tokens_seen": 1000 * (s + 1)} for s in range(3, 8)
]
EVALS = [
    {"step": 2, "val_loss": 8.5, "tokens_seen": 3000, "hellaswag_acc_norm": 0.25, "hellaswag_n": 8},
    {"step": 4, "val_loss": 7.5, "tokens_seen": 5000, "hellaswag_acc_norm": 0.26, "hellaswag_n": 8},
    {"step": 4, "val_loss": 7.0, "tokens_seen": 5000, "hellaswag_acc_norm": 0.27, "hellaswag_n": 8},
    {"step": 7, "val_loss": 6.0, "tokens_seen": 8000, "hellaswag_acc_norm": 0.30, "hellaswag_n": 8},
]


def lines(ax) -> dict[str, tuple[list[float], list[float]]]:
    return {
        line.get_gid(): ([float(x) for x in line.get_xdata()], [float(y) for y in line.get_ydata()])
        for line in ax.get_lines()
    }


def test_figure_plots_the_records_rows_and_the_124m_baselines(tmp_path):
    run = write_run(tmp_path / "run", metrics=METRICS, evals=EVALS)
    fig = reproduction_figure(run)
    ax_loss, ax_hs = fig.axes
    got = lines(ax_loss)
    assert set(got) == {"train", "val", "gpt2_val"}
    # one point per step, the last row of a repeated step
    assert got["train"] == (
        [1000.0 * (s + 1) for s in range(8)],
        [10, 9, 8, 6.5, 5.5, 4.5, 3.5, 2.5],
    )
    assert got["val"] == ([3000.0, 5000.0, 8000.0], [8.5, 7.0, 6.0])
    assert got["gpt2_val"][1] == [3.2924, 3.2924]
    hs = lines(ax_hs)
    assert set(hs) == {"hellaswag", "gpt2_hellaswag", "gpt3_hellaswag"}
    assert hs["hellaswag"] == ([3000.0, 5000.0, 8000.0], [0.25, 0.27, 0.30])
    assert hs["gpt2_hellaswag"][1] == [0.294463, 0.294463]
    assert hs["gpt3_hellaswag"][1] == [0.337, 0.337]
    labels = [t.get_text() for t in ax_hs.get_legend().get_texts()]
    assert any("GPT-3 Small (125M)" in t for t in labels) and any("n=8" in t for t in labels)


def test_figure_on_other_data_has_no_val_loss_line_and_says_why(tmp_path):
    run = write_run(tmp_path / "run", data="shakespeare", metrics=METRICS, evals=EVALS)
    ax_loss, ax_hs = reproduction_figure(run).axes
    assert set(lines(ax_loss)) == {"train", "val"}
    assert "no GPT-2 baseline for data=shakespeare" in ax_loss.get_title()
    assert set(lines(ax_hs)) == {"hellaswag", "gpt2_hellaswag", "gpt3_hellaswag"}  # data-free


def test_figure_of_a_bigger_size_uses_that_sizes_numbers(tmp_path):
    run = write_run(tmp_path / "run", n_layer=48, n_embd=1600, metrics=METRICS, evals=EVALS)
    ax_loss, ax_hs = reproduction_figure(run).axes
    assert set(lines(ax_loss)) == {"train", "val"}  # OpenAI's val loss: 124M only
    assert "no published OpenAI GPT-2 1558M val loss" in ax_loss.get_title()
    hs = lines(ax_hs)
    assert hs["gpt2_hellaswag"][1] == [0.488946] * 2 and hs["gpt3_hellaswag"][1] == [0.547] * 2


def test_figure_of_a_small_model_without_hellaswag_says_so(tmp_path):
    evals = [{k: v for k, v in r.items() if not k.startswith("hellaswag")} for r in EVALS]
    run = write_run(tmp_path / "run", n_layer=4, n_embd=256, metrics=METRICS, evals=evals)
    ax_loss, ax_hs = reproduction_figure(run).axes
    assert set(lines(ax_loss)) == {"train", "val"}
    assert "not a GPT-2 shape" in ax_loss.get_title()
    assert lines(ax_hs) == {}
    assert any("no HellaSwag evaluations" in t.get_text() for t in ax_hs.texts)


def test_figure_of_a_folder_without_a_record_is_a_one_line_error(tmp_path):
    with pytest.raises(FigureError, match="no readable record.json"):
        reproduction_figure(tmp_path)


def test_plot_reproduction_writes_a_png(tmp_path):
    run = write_run(tmp_path / "run", metrics=METRICS, evals=EVALS)
    out = plot_reproduction(run, tmp_path / "out" / "reproduction.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("module", ["gpt2x.lab.figure", "gpt2x.lab.baselines"])
def test_figure_and_baselines_never_load_torch_or_matplotlib_on_import(module):
    code = f"import sys, {module}; print('torch' in sys.modules, 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["False", "False"]


# --------------------------------------------------------------------------------------------
# the rehearsal, end to end through the CLI


@pytest.mark.slow
def test_rehearsal_end_to_end_with_resume_and_figure(tmp_path, data_root):
    """Run the rehearsal (its events every 4 steps instead of 10, to keep the test short) to
    step 10 without a final checkpoint (a preempted job: checkpoints at 4 and 8, rows logged up
    to 9), then the same folder with max_steps=12 and resume=auto: it must continue from step
    8, log steps 8..11 once, and reproduce step 8's loss."""
    run = tmp_path / "run"
    args = [
        "+experiment=reproduce/rehearsal",
        "trainer.device=cpu",
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run}",
        "trainer.progress=log",
        *(f"trainer.{event}_every=4" for event in ("eval", "hellaswag", "sample", "checkpoint")),
    ]
    run_cli("gpt2x.train", *args, "trainer.max_steps=10", "trainer.save_final=false", cwd=tmp_path)
    first = {r["step"]: r for r in read_jsonl(run / "metrics.jsonl")}
    assert sorted(first) == list(range(10))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [
        "step_000004",
        "step_000008",
    ]
    assert read_record(run)["grad_accum_steps"] == 2

    run_cli("gpt2x.train", *args, "trainer.max_steps=12", cwd=tmp_path)
    record = read_record(run)
    assert record["status"] == "completed"
    assert record["resumed_from"]["step"] == 8
    assert Path(record["config"]["trainer"]["hellaswag_path"]) == ASSET
    rows = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(12))  # rows 8..9 of the first run dropped
    assert [r["tokens_seen"] for r in rows] == [1024 * (s + 1) for s in range(12)]
    # the checkpoint restored weights and data position: step 8 sees the same batch and weights
    assert rows[8]["loss"] == pytest.approx(first[8]["loss"], rel=1e-5)
    assert rows[11]["loss"] < rows[0]["loss"]

    evals = read_jsonl(run / "eval.jsonl")
    assert [e["step"] for e in evals] == [4, 8, 11]
    assert all(e["val_loss"] > 0 and e["hellaswag_n"] == 6 for e in evals)
    assert all(0.0 <= e["hellaswag_acc_norm"] <= 1.0 for e in evals)
    samples = read_jsonl(run / "samples.jsonl")
    # the resumed run dropped its checkpoint's future and sampled again: each step once
    assert [r["step"] for r in samples] == [4, 8]
    assert all(r["text"].startswith("Hello, I'm a language model,") for r in samples)
    assert (run / "sample.txt").read_text().startswith("Hello, I'm a language model,")
    assert record["wandb"]["group"] == "reproduce-rehearsal"

    path = plot_reproduction(run, run / "reproduction.png")
    assert path.stat().st_size > 0
    series = load_series(run)
    assert series.size is None and series.data_name == "shakespeare"
    ax_loss, ax_hs = reproduction_figure(run).axes
    got, hs = lines(ax_loss), lines(ax_hs)
    assert set(got) == {"train", "val"} and set(hs) == {"hellaswag"}  # no baseline for nano
    assert got["train"] == ([float(r["tokens_seen"]) for r in rows], [r["loss"] for r in rows])
    assert got["val"] == ([float(e["tokens_seen"]) for e in evals], [e["val_loss"] for e in evals])
    assert hs["hellaswag"][1] == [e["hellaswag_acc_norm"] for e in evals]
