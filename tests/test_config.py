"""Every option of every config group composes, resolves and validates; bad values fail clearly."""

from __future__ import annotations

from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException
from omegaconf import OmegaConf
from omegaconf.errors import ValidationError

from gpt2x import CONF_DIR, REPO_ROOT
from gpt2x.config import ConfigError, grad_accum_steps, register_configs, validate

register_configs()

GROUPS = ["model", "data", "precision", "attn", "optim", "parallel", "trainer", "logger", "debug"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


def named_configs(folder: str) -> list[str]:
    root = REPO_ROOT / folder
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def compose_cfg(overrides: list[str]):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=overrides)
    cfg.paths.run_dir = "/tmp/run"  # normally ${hydra:runtime.output_dir}, set by @hydra.main
    return cfg


CASES = [(g, o) for g in GROUPS for o in options(g)]


@pytest.mark.parametrize(("group", "option"), CASES, ids=[f"{g}={o}" for g, o in CASES])
def test_every_group_option_composes_and_resolves(group, option):
    extra = (
        ["data.source=/tmp/x.txt"] if (group, option) in {("data", "text"), ("data", "hf")} else []
    )
    cfg = compose_cfg([f"{group}={option}", *extra])
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if group in ("model", "data", "precision", "logger"):
        assert cfg[group].name == option or cfg[group].kind.value == option
    assert resolved["trainer"]["seq_len"] <= resolved["model"]["block_size"]


@pytest.mark.parametrize("name", named_configs("experiments"))
def test_every_experiment_composes(name):
    cfg = compose_cfg([f"+experiment={name}"])
    OmegaConf.to_container(cfg, resolve=True)
    assert cfg.experiment, "an experiment names itself in `experiment:` for the run record"


@pytest.mark.parametrize("name", named_configs("sweeps"))
def test_every_sweep_composes(name):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    assert cfg.hydra.sweeper.params, "a sweep defines hydra.sweeper.params"


def test_group_choices_from_the_command_line():
    cfg = compose_cfg(["model=gpt2", "precision=bf16", "attn=flash", "compile=true"])
    assert (cfg.model.n_layer, cfg.model.n_head, cfg.model.n_embd, cfg.model.block_size) == (
        12,
        12,
        768,
        1024,
    )
    assert cfg.precision.dtype.value == "bf16" and cfg.precision.tf32
    assert cfg.attn.impl.value == "flash" and cfg.compile is True
    assert cfg.trainer.seq_len == 1024  # follows the model's context by default


def test_exact_gpt2_shapes():
    shapes = {name: compose_cfg([f"model={name}"]).model for name in options("model")}
    assert (shapes["gpt2-medium"].n_layer, shapes["gpt2-medium"].n_embd) == (24, 1024)
    assert (shapes["gpt2-large"].n_layer, shapes["gpt2-large"].n_head) == (36, 20)
    assert (shapes["gpt2-xl"].n_layer, shapes["gpt2-xl"].n_head, shapes["gpt2-xl"].n_embd) == (
        48,
        25,
        1600,
    )
    assert (shapes["nano"].n_layer, shapes["nano"].n_embd, shapes["nano"].block_size) == (
        4,
        256,
        256,
    )


def test_unknown_option_is_hydras_error():
    with pytest.raises(ConfigCompositionException, match="precision"):
        compose_cfg(["precision=fp64"])


def test_unknown_key_is_hydras_error():
    with pytest.raises(ConfigCompositionException, match="lrr"):
        compose_cfg(["optim.lrr=1"])


def test_wrong_type_is_hydras_error():
    with pytest.raises((ConfigCompositionException, ValidationError), match="max_steps"):
        compose_cfg(["trainer.max_steps=many"])


def test_enum_field_rejects_unknown_value():
    with pytest.raises((ConfigCompositionException, ValidationError), match="impl"):
        compose_cfg(["attn.impl=magic"])


@pytest.mark.parametrize(
    ("overrides", "world", "setting"),
    [
        (["trainer.total_batch_tokens=1000"], 1, "trainer.total_batch_tokens"),
        (
            ["trainer.total_batch_tokens=2048", "trainer.micro_batch_size=8"],
            2,
            "trainer.total_batch_tokens",
        ),
        (["trainer.seq_len=512"], 1, "trainer.seq_len"),
        (["model.vocab_size=50000"], 1, "model.vocab_size"),
        (["model.n_head=3"], 1, "model.n_embd"),
        (["optim.lr=-1"], 1, "optim.lr"),
        (["trainer.max_steps=0"], 1, "trainer.max_steps"),
    ],
)
def test_cross_field_problems_name_the_setting(overrides, world, setting):
    cfg = compose_cfg(overrides)
    with pytest.raises(ConfigError) as err:
        validate(cfg, world_size=world)
    message = str(err.value)
    assert setting in message and "\n" not in message


def test_grad_accum_is_derived_from_the_global_batch():
    cfg = compose_cfg(["trainer.micro_batch_size=4", "trainer.total_batch_tokens=8192"])
    # 4 * 256 tokens per micro-step and rank: 8 micro-steps alone, 4 each on 2 ranks
    assert grad_accum_steps(cfg, 1) == 8
    assert grad_accum_steps(cfg, 2) == 4


def test_default_global_batch_is_one_micro_batch():
    cfg = compose_cfg(["trainer.micro_batch_size=3"])
    assert cfg.trainer.total_batch_tokens == 3 * 256


def test_conf_layout_links_experiments_and_sweeps():
    assert (CONF_DIR / "experiment").resolve() == (REPO_ROOT / "experiments").resolve()
    assert (CONF_DIR / "sweep").resolve() == (REPO_ROOT / "sweeps").resolve()
    assert Path(CONF_DIR / "experiment").is_dir()


def test_a_batch_that_does_not_divide_names_the_micro_batch_that_fits():
    # the lecture's 524,288 tokens per step on 8 ranks at T=1024: B=48 does not divide, 32 does
    cfg = compose_cfg(
        ["trainer.micro_batch_size=48", "model.block_size=1024", "trainer.total_batch_tokens=524288"]
    )
    with pytest.raises(ConfigError) as e:
        grad_accum_steps(cfg, 8)
    assert "set trainer.micro_batch_size=32 (accumulation makes up the rest)" in str(e.value)
    cfg.trainer.micro_batch_size = 32
    assert grad_accum_steps(cfg, 8) == 2
