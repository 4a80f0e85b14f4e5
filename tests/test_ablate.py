"""gpt2x.ablate on CPU with a tiny model: the ladder configs, the files and table it writes, the
report rebuilt from the folder, failed and interrupted rungs, the DDP rung, reproducibility."""

from __future__ import annotations

import csv
import json
import math
import os
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from conftest import TINY, compose_rung, flatten, run_cli, sigint_when

from gpt2x import REPO_ROOT
from gpt2x.config import register_configs
from gpt2x.lab import ablate, ladder, report
from gpt2x.lab.summary import COLUMNS
from gpt2x.record.folder import read_jsonl

register_configs()

LADDERS = ["nano_cpu", "gpt2_124m"]
RUNGS = ["fp32", "tf32", "bf16", "compile", "flash", "vocab", "fused", "ddp"]
# what each rung changes over the previous one (dotted keys of the resolved config)
CHANGES = {
    "tf32": {"precision.name", "precision.tf32"},
    "bf16": {"precision.name", "precision.dtype"},
    "compile": {"compile"},
    "flash": {"attn.impl"},
    "vocab": {"model.vocab_size"},
    "fused": {"optim.fused"},
    "ddp": {"parallel.kind"},
}
# tiny rungs: T follows the tiny model's context (the ladders fix T explicitly)
RUNG_OVERRIDES = [*TINY, "trainer.seq_len=32", "logger=none"]
STEPS = 2  # measured steps; TINY sets trainer.warmup_steps_for_timing=1 -> 3 steps per rung



def ablate_cli(tmp_path: Path, data_root: Path, *args: str, check=True, rung_overrides=()):
    return run_cli(
        "gpt2x.ablate",
        *args,
        "quiet=true",
        "--",
        *RUNG_OVERRIDES,
        f"paths.data_dir={data_root}",
        *rung_overrides,
        cwd=tmp_path,
        check=check,
    )


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def write_ladder(path: Path, rungs: list) -> Path:
    path.write_text(yaml.safe_dump({"rungs": rungs, "steps": STEPS, "warmup": 1}))
    return path


# --------------------------------------------------------------------------------------------
# The ladder configs (composition only: fast)


@pytest.mark.parametrize("ladder", LADDERS)
def test_each_rung_includes_the_previous_and_changes_one_thing(ladder):
    folder = REPO_ROOT / "experiments" / "ladder"
    spec = yaml.safe_load((folder / f"{ladder}.yml").read_text())
    assert spec["rungs"] == RUNGS and spec["shape"] == ladder
    # the default: intervals on every ablation (docs/ladder.md); the CPU ladder's rungs take turns
    assert spec["repeats"] == {"nano_cpu": 4, "gpt2_124m": 3}[ladder]
    assert spec.get("interleave", "runs") == {"nano_cpu": "steps", "gpt2_124m": "runs"}[ladder]
    prev = None
    for rung in RUNGS:
        text = (folder / f"{rung}.yaml").read_text()  # one file per rung, shared by the ladders
        assert text.startswith("# @package _global_")
        defaults = yaml.safe_load(text)["defaults"]
        cfg = compose_rung(f"ladder/{rung}", f"ladder_shape={ladder}")
        assert cfg["experiment"] == f"ladder/{rung}"
        assert cfg["logger"]["job_type"] == rung and cfg["logger"]["group"]
        if prev is None:
            # the base fixes what every rung shares: data, seed, B, T, steps, eval off
            t = cfg["trainer"]
            assert cfg["data"]["name"] == "shakespeare" and t["seed"] == 1337
            assert t["max_steps"] == spec["steps"] + spec["warmup"]
            assert t["warmup_steps_for_timing"] == spec["warmup"]
            assert t["eval_every"] == 0 and t["sample_tokens"] == 0
            assert t["total_batch_tokens"] == t["micro_batch_size"] * t["seq_len"]
        else:
            assert defaults[0] == f"/experiment/ladder/{prev['name']}"
            a, b = flatten(prev["cfg"]), flatten(cfg)
            changed = {k for k in a.keys() | b.keys() if a.get(k) != b.get(k)}
            assert changed - {"experiment", "logger.job_type"} == CHANGES[rung], rung
        prev = {"name": rung, "cfg": cfg}


def test_gpt2_124m_rungs_use_the_lecture_shapes():
    cfg = compose_rung("ladder/fp32", "ladder_shape=gpt2_124m")
    assert (cfg["model"]["n_layer"], cfg["model"]["n_embd"], cfg["model"]["vocab_size"]) == (
        12,
        768,
        50257,
    )
    assert (cfg["trainer"]["micro_batch_size"], cfg["trainer"]["seq_len"]) == (16, 1024)
    big = compose_rung("ladder/bf16", "ladder_shape=gpt2_124m", "trainer.micro_batch_size=32")
    nano = compose_rung("ladder/bf16")  # the default shape is the CPU one
    assert nano["model"]["n_layer"] == 4 and nano["trainer"]["seq_len"] == 256
    assert big["trainer"]["total_batch_tokens"] == 32 * 1024  # the command line's B wins


def test_ddp_rung_keeps_each_ranks_batch(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "2")  # as torchrun sets it for every rank
    cfg = compose_rung("ladder/ddp", "ladder_shape=nano_cpu")
    assert cfg["trainer"]["total_batch_tokens"] == 2 * 8 * 256


def test_dry_run_prints_the_commands_with_one_wandb_group(tmp_path):
    out = tmp_path / "abl"
    proc = run_cli(
        "gpt2x.ablate",
        "ladder=nano_cpu",
        "repeats=1",
        "dry_run=true",
        f"out={out}",
        "nproc=3",
        cwd=tmp_path,
    )
    lines = [line for line in proc.stdout.splitlines() if "gpt2x.train" in line]
    assert len(lines) == 8 and not out.exists()
    for rung, line in zip(RUNGS, lines):
        assert f"+experiment=ladder/{rung} " in line and " ladder_shape=nano_cpu " in line
        assert "logger.group=abl " in line and f"hydra.run.dir={out}/" in line
        # 3 warm-up + 8 measured steps + 1 profiled step (the breakdown, after the timed ones)
        assert "trainer.max_steps=12 " in line and "trainer.warmup_steps_for_timing=3 " in line
        assert "trainer.breakdown_steps=1 " in line
    assert "torch.distributed.run --standalone --nproc_per_node=3 -m gpt2x.train" in lines[-1]
    assert "torch.distributed.run" not in "".join(lines[:-1])


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["ladder=nope"], "no ladder 'nope'"),
        (["rungs=[ladder/fp3]"], "no experiment 'ladder/fp3'"),
        (["ladder=nano_cpu", "--", "precision=fp64"], "does not compose"),
        (["ladder=nano_cpu", "stepz=3"], "unknown option 'stepz'"),
        (["steps=3"], "name a ladder"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args, message, capsys):
    assert ablate.main([*args, "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_options_are_hydra_overrides_and_the_rung_overrides_follow_dashes():
    opts = ablate.parse_args(
        ["ladder=nano_cpu", "rungs=[fp32,bf16]", "repeats=2", "--", "trainer.seq_len=32", "a.b='c,d'"]
    )
    assert opts.rungs == ["fp32", "bf16"] and opts.repeats == 2
    assert opts.overrides == ["trainer.seq_len=32", "a.b='c,d'"]  # verbatim, commas and all


@pytest.mark.parametrize(
    ("arg", "message"),
    [
        ("repeats=0", "repeats=0: must be an integer >= 1"),
        ("repeats=-2", "repeats=-2: must be an integer >= 1"),
        ("repeats=many", "repeats=many"),
        ("steps=0", "steps=0: must be an integer >= 1"),
    ],
)
def test_bad_repeats_name_the_setting(arg, message, capsys):
    assert ablate.main(["ladder=nano_cpu", arg, "dry_run=true"]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_repeats_run_interleaved(tmp_path, capsys):
    out = tmp_path / "abl"
    args = ["rungs=[fp32,tf32,bf16]", "repeats=3", f"out={out}", "dry_run=true", "profile=false"]
    assert ablate.main(args) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "gpt2x.train" in line]
    order = [(line.split("+experiment=ladder/")[1].split()[0], line.split("repeat=")[1].split()[0]) for line in lines]
    # every rung once, then every rung again: a drift of the machine hits all rungs alike
    assert order == [(r, str(k)) for k in range(3) for r in ("fp32", "tf32", "bf16")]
    assert f"hydra.run.dir={out}/01_fp32/repeat_0" in lines[0]
    assert f"hydra.run.dir={out}/03_bf16/repeat_2" in lines[-1]


# --------------------------------------------------------------------------------------------
# Planning (gpt2x.lab.ladder): which rungs, their overrides, who takes turns; no process runs


def planned(*args: str):
    return ladder.plan(ablate.parse_args(list(args)))


def test_plan_interleaves_repeats_and_measures_each_rung(tmp_path):
    path = tmp_path / "l.yml"
    path.write_text(yaml.safe_dump({
        "shape": "nano_cpu", "steps": 4, "warmup": 2, "repeats": 2, "overrides": ["logger=none"],
        "rungs": ["fp32", {"name": "half", "experiment": "ladder/bf16", "overrides": ["a=1"]}],
    }))  # fmt: skip
    _, rungs, settings = planned(f"ladder={path}", "--", "trainer.seq_len=32")
    assert [(r.index, r.name, r.repeat) for r in rungs] == [
        (1, "ladder/fp32", 0), (2, "half", 0), (1, "ladder/fp32", 1), (2, "half", 1),
    ]  # fmt: skip
    # warm-up, the profiled step after the measured ones, max_steps = warmup + steps + 1
    measure = ["trainer.warmup_steps_for_timing=2", "trainer.breakdown_steps=1", "trainer.max_steps=7"]
    common = ["ladder_shape=nano_cpu", "logger=none", "trainer.seq_len=32"]
    assert rungs[0].overrides == [*measure, "repeat=0", *common]
    # a rung named in the ladder is its W&B job type; its experiment stays the config it composes
    assert rungs[3].overrides == [*measure, "repeat=1", "logger.job_type=half", "a=1", *common]
    assert (rungs[3].experiment, rungs[3].short) == ("ladder/bf16", "half")
    assert (settings["steps"], settings["warmup"], settings["repeats"]) == (4, 2, 2)
    assert settings["overrides"] == common and settings["interleave"] == "runs"


@pytest.mark.parametrize(
    ("given", "steps", "warmup", "added"),
    [
        # the trainer's own keys given for every rung win over steps/warmup/profile
        (["trainer.max_steps=9"], 5, 3, ["trainer.warmup_steps_for_timing=3", "trainer.breakdown_steps=1"]),
        (["++trainer.warmup_steps_for_timing=1", "trainer.breakdown_steps=0"], 10, 1, ["trainer.max_steps=11"]),
        # the last one counts, as in Hydra
        (["trainer.max_steps=6", "trainer.max_steps=14"], 10, 3,
         ["trainer.warmup_steps_for_timing=3", "trainer.breakdown_steps=1"]),
        # not an integer (quoted: a string), or deleted: the ablation's own values stand
        (["trainer.max_steps='9'"], 10, 3, [
            "trainer.warmup_steps_for_timing=3", "trainer.breakdown_steps=1", "trainer.max_steps=14"]),
        (["~trainer.max_steps"], 10, 3, [
            "trainer.warmup_steps_for_timing=3", "trainer.breakdown_steps=1", "trainer.max_steps=14"]),
    ],
)  # fmt: skip
def test_plan_reads_the_trainers_own_keys_as_hydra_does(given, steps, warmup, added):
    _, rungs, settings = planned("rungs=[fp32]", "--", *given)
    assert rungs[0].overrides == [*added, "repeat=0", *given]
    assert (settings["steps"], settings["warmup"]) == (steps, warmup)


def test_an_override_hydra_cannot_read_is_bad_input():
    with pytest.raises(ladder.AblationError, match="an override Hydra cannot read") as e:
        planned("rungs=[fp32]", "--", "trainer.max_steps=[1,")
    assert "\n" not in str(e.value)
    assert ladder.without_hydra(["a=1", "hydra.run.dir='x y'", "+b.c=2"]) == ["a=1", "+b.c=2"]


def test_turn_groups_are_a_repeats_consecutive_single_process_rungs(tmp_path):
    def rung(i: int, repeat: int, launcher: str = "python") -> ladder.Rung:
        return ladder.Rung(i, f"r{i}", repeat, f"r{i}", f"ladder/r{i}", [], launcher=launcher)

    rungs = [rung(1, 0), rung(2, 0), rung(3, 0, "torchrun"), rung(4, 0), rung(5, 0), rung(1, 1)]
    units = ladder.turn_groups(rungs, tmp_path)
    assert [[(r.index, r.repeat) for r in u] for u in units] == [
        [(1, 0), (2, 0)], [(3, 0)], [(4, 0), (5, 0)], [(1, 1)],
    ]  # fmt: skip
    # the id the report pairs steps by: one per group of a repeat; a rung alone has none
    assert [r.lockstep for r in rungs] == [
        f"{tmp_path}#repeat_0", f"{tmp_path}#repeat_0", None,
        f"{tmp_path}#repeat_0_2", f"{tmp_path}#repeat_0_2", None,
    ]  # fmt: skip


# --------------------------------------------------------------------------------------------
# A tiny ladder end to end: fp32, a failing rung, tf32, bf16


@pytest.fixture(scope="module")
def tiny_ladder(tmp_path_factory, data_root) -> tuple[Path, subprocess.CompletedProcess]:
    tmp = tmp_path_factory.mktemp("ablate")
    ladder = write_ladder(
        tmp / "tiny.yml",
        [
            "ladder/fp32",
            # fp16 needs CUDA: a ConfigError before the trainer writes a record
            {"name": "fp16", "experiment": "ladder/bf16", "overrides": ["precision=fp16"]},
            "ladder/tf32",
            "ladder/bf16",
        ],
    )
    out = tmp / "abl"
    proc = ablate_cli(tmp, data_root, f"ladder={ladder}", f"out={out}", "--wandb", check=False)
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out, proc


def test_tiny_ladder_writes_every_file_with_the_table_columns(tiny_ladder):
    out, proc = tiny_ladder
    for name in ("ablation.md", "ablation.csv", "ablation.json", "loss.png", "tokens_per_s.png"):
        assert (out / name).stat().st_size > 0, name
    dirs = sorted(p.name for p in out.iterdir() if p.is_dir())
    assert dirs == ["01_fp32", "02_fp16", "03_tf32", "04_bf16"]
    for d in dirs:
        assert (out / d / "record.json").exists() and (out / d / "rung.log").exists()
    rows = read_csv(out / "ablation.csv")
    assert list(rows[0]) == COLUMNS
    assert [r["name"] for r in rows] == [
        "ladder/fp32",
        "fp16",
        "ladder/tf32",
        "ladder/bf16",
    ]
    assert [r["status"] for r in rows] == ["completed", "failed", "completed", "completed"]
    assert all(r["world_size"] == "1" for r in rows if r["status"] == "completed")
    # W&B was asked for, but the rungs logged nowhere: one clear line, the run still finished
    assert "W&B report not saved: no rung logged to W&B" in proc.stdout


def test_speedups_follow_the_records_median_step_times(tiny_ladder):
    out, _ = tiny_ladder
    rows = read_csv(out / "ablation.csv")
    good = [r for r in rows if r["status"] == "completed"]
    medians = []
    for row in good:
        run_dir = out / next(d for d in os.listdir(out) if row["name"].endswith(d[3:]))
        metrics = read_jsonl(run_dir / "metrics.jsonl")
        record = json.loads((run_dir / "record.json").read_text())
        # 1 warm-up, STEPS timed, then 1 profiled step (the breakdown): no timed step runs after
        # a profile, and the profiled one counts in no step-time statistic
        assert len(metrics) == 1 + STEPS + 1 and record["summary"]["steps"] == 1 + STEPS + 1
        assert [bool(m.get("profiled")) for m in metrics] == [False] * (1 + STEPS) + [True]
        assert record["breakdown"]["steps"] == 1
        median = statistics.median(m["ms"] for m in metrics[1:-1])
        assert record["summary"]["median_ms"] == pytest.approx(median, rel=1e-12)
        assert float(row["median_ms"]) == pytest.approx(median, rel=1e-12)
        assert float(row["tokens_per_s"]) == pytest.approx(
            record["tokens_per_step"] / (median / 1000), rel=1e-12
        )
        assert float(row["loss"]) == metrics[-1]["loss"]
        assert row["config_hash"] == record["config_hash"]
        medians.append(median)
    # vs previous: the previous *successful* rung (the failed fp16 row breaks no chain)
    prev = [medians[0], *medians[:-1]]
    for row, m, p in zip(good, medians, prev):
        assert float(row["speedup_vs_prev"]) == pytest.approx(p / m, rel=1e-9)
        assert float(row["speedup_vs_baseline"]) == pytest.approx(medians[0] / m, rel=1e-9)


def test_failed_rung_is_recorded_with_its_reason_and_the_rest_complete(tiny_ladder):
    out, proc = tiny_ladder
    failed = read_csv(out / "ablation.csv")[1]
    assert failed["status"] == "failed" and failed["median_ms"] == ""
    assert "precision=fp16 needs CUDA" in failed["error"]
    record = json.loads((out / "02_fp16" / "record.json").read_text())
    assert record["status"] == "failed" and "precision=fp16 needs CUDA" in record["error"]
    assert "precision=fp16" in record["overrides"] and record["config_hash"]
    assert "1 of 4 rungs failed: fp16: precision=fp16 needs CUDA" in proc.stdout
    md = (out / "ablation.md").read_text()
    assert "precision=fp16 needs CUDA" in md


def test_header_and_manifest_say_how_to_reproduce(tiny_ladder):
    out, _ = tiny_ladder
    md = (out / "ablation.md").read_text()
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["status"] == "failed" and manifest["steps"] == STEPS
    assert manifest["warmup"] == 1
    assert [r["status"] for r in manifest["rungs"]] == ["completed", "failed"] + ["completed"] * 2
    assert manifest["report"]["order"] == ["ladder/fp32", "fp16"] + [
        "ladder/tf32",
        "ladder/bf16",
    ]
    assert "python -m gpt2x.ablate ladder=" in md and manifest["command"] in md
    for rung in manifest["rungs"]:
        assert rung["argv"][1:3] == ["-m", "gpt2x.train"]
        assert f"hydra.run.dir={rung['dir']}" in rung["argv"]
        assert f"{rung['index']:02d} {rung['short']}: {rung['config_hash']}" in md
    record = json.loads((out / "01_fp32" / "record.json").read_text())
    assert record["versions"]["torch"] in md and "seeds**: 1337" in md
    if record["git"]["commit"]:
        assert record["git"]["commit"] in md


def test_report_rebuilds_the_same_table_from_the_folder(tiny_ladder, tmp_path, capsys):
    out, _ = tiny_ladder
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ablation.csv").read_text() == (out / "ablation.csv").read_text()
    # the runner's own header (ladder, command, config hashes) and title come back too; only
    # the report's own date differs

    def undated(path: Path) -> list[str]:
        return [
            line for line in path.read_text().splitlines() if not line.startswith("- **date**:")
        ]

    assert undated(tmp_path / "ablation.md") == undated(out / "ablation.md")
    assert (tmp_path / "loss.png").exists() and (tmp_path / "tokens_per_s.png").exists()
    # an option that changes the table makes it a plain report of the same runs
    assert report.main([str(out), "--out", str(tmp_path / "t"), "--title", "Mine"]) == 0
    md = (tmp_path / "t" / "ablation.md").read_text()
    assert md.startswith("# Mine") and "ablate command" not in md


def test_losses_are_reproduced_exactly_in_fp32_on_cpu(tiny_ladder, tmp_path, data_root):
    first, _ = tiny_ladder
    out = tmp_path / "again"
    ablate_cli(
        tmp_path,
        data_root,
        "rungs=[ladder/tf32]",  # the tiny ladder's third rung, first here
        f"steps={STEPS}",
        f"out={out}",
    )
    again = read_csv(out / "ablation.csv")
    before = [
        r for r in read_csv(first / "ablation.csv") if r["name"] in {a["name"] for a in again}
    ]
    assert [r["name"] for r in again] == [r["name"] for r in before]
    assert [r["loss"] for r in again] == [r["loss"] for r in before]  # the CSV's repr: exact
    assert [r["config_hash"] for r in again] == [r["config_hash"] for r in before]
    losses = [m["loss"] for m in read_jsonl(out / "01_tf32" / "metrics.jsonl")]
    assert losses == [m["loss"] for m in read_jsonl(first / "03_tf32" / "metrics.jsonl")]
    assert losses and all(math.isfinite(v) for v in losses)


# --------------------------------------------------------------------------------------------
# Ctrl-C and the DDP rung


def test_ctrl_c_keeps_finished_rungs_and_writes_a_partial_table(tmp_path, data_root):
    ladder = write_ladder(
        tmp_path / "long.yml",
        [
            "ladder/fp32",
            {
                "name": "long",
                "experiment": "ladder/tf32",
                "overrides": ["trainer.max_steps=100000"],
            },
            "ladder/bf16",
        ],
    )
    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "gpt2x.ablate", f"ladder={ladder}", f"out={out}", "quiet=true"]
    cmd += ["--", *RUNG_OVERRIDES, f"paths.data_dir={data_root}"]
    metrics = out / "02_long" / "metrics.jsonl"
    returncode, stdout = sigint_when(
        cmd, tmp_path, lambda: metrics.exists() and bool(read_jsonl(metrics)), "rung 2 starting"
    )
    assert returncode == 130, stdout[-3000:]
    rows = read_csv(out / "ablation.csv")
    assert [(r["name"], r["status"]) for r in rows] == [
        ("ladder/fp32", "completed"),
        ("long", "interrupted"),
    ]
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [r["status"] for r in manifest["rungs"]] == ["completed", "interrupted", "not run"]
    assert not (out / "03_bf16").exists()
    assert (
        "interrupted**: by SIGINT during long; not run: bf16" in (out / "ablation.md").read_text()
    )


@pytest.mark.distributed
def test_ddp_rung_runs_under_torchrun_with_two_gloo_processes(tmp_path, data_root):
    out = tmp_path / "abl"
    # compile off: the rung's other settings (bf16, flash, fused, DDP) as in the ladder
    ablate_cli(
        tmp_path,
        data_root,
        "rungs=[ladder/ddp]",
        "nproc=2",
        f"out={out}",
        rung_overrides=["compile=false"],
    )
    rows = read_csv(out / "ablation.csv")
    assert [(r["status"], r["world_size"]) for r in rows] == [("completed", "2")]
    record = json.loads((out / "01_ddp" / "record.json").read_text())
    assert record["config"]["parallel"]["kind"] == "ddp" and record["grad_accum_steps"] == 1
    assert record["tokens_per_step"] == 2 * 4 * 32  # each rank keeps its B x T
    manifest = json.loads((out / "ablation.json").read_text())
    assert (
        "torch.distributed.run --standalone --nproc_per_node=2" in manifest["rungs"][0]["command"]
    )
    assert "torchrun --standalone --nproc_per_node=2" in (out / "ablation.md").read_text()


def test_rungs_share_one_wandb_group_with_the_rung_as_job_type(tmp_path, data_root):
    out = tmp_path / "abl"
    proc = run_cli(
        "gpt2x.ablate",
        "rungs=[ladder/fp32]",
        "steps=1",
        f"out={out}",
        "quiet=true",
        "wandb=true",
        "--",
        *[o for o in RUNG_OVERRIDES if o != "logger=none"],
        f"paths.data_dir={data_root}",
        cwd=tmp_path,
        env={"WANDB_MODE": "offline"},
    )
    record = json.loads((out / "01_fp32" / "record.json").read_text())
    assert record["wandb"]["mode"] == "offline" and record["wandb"]["group"] == "abl"
    assert record["config"]["logger"]["job_type"] == "fp32"
    assert record["config"]["logger"]["tags"] == ["ladder", "nano_cpu"]
    # offline: the report cannot be saved; one line says why and what to do
    (line,) = [x for x in proc.stdout.splitlines() if "W&B report not saved" in x]
    assert "WANDB_MODE=offline" in line and "wandb sync" in line
