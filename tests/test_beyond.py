"""The beyond-the-lecture rungs (experiments/ladder/beyond/) and their two ladders
(experiments/ladder/beyond_cpu.yml, beyond_gpt2_124m.yml): every rung is its parent rung plus
exactly the one thing it names (checked on the composed configs, as test_ablate.py checks the
lecture's ladder), for both shapes; and a tiny ablation through gpt2x.ablate in which the fp8
rung is n/a on a CPU and the muon rung trains."""

from __future__ import annotations

import csv
import json
import math

import pytest
import yaml
from conftest import TINY, compose_rung, flatten, run_cli

from gpt2x import REPO_ROOT
from gpt2x.config import register_configs

register_configs()

FOLDER = REPO_ROOT / "experiments" / "ladder"
SHAPES = {"beyond_cpu": "nano_cpu", "beyond_gpt2_124m": "gpt2_124m"}
# rung -> (its parent experiment, the keys of the resolved config it changes). Cumulative where
# the choices compose (chunked -> block -> ckpt -> ddp -> fsdp); branches from chunked where they
# are alternatives: the two compile modes (one key, two values), fp8 and muon (each a different
# numerics / optimization, kept single-process at the shape's B so loss compares at equal tokens)
RUNGS = {
    "chunked": ("ladder/fused", {"loss.impl"}),
    "max_autotune": ("ladder/beyond/chunked", {"compile_mode"}),
    "reduce_overhead": ("ladder/beyond/chunked", {"compile_mode"}),
    "block": ("ladder/beyond/chunked", {"compile_scope"}),
    # two settings on purpose (the rung's comment says why): checkpointing buys the memory that
    # the larger micro batch spends
    "ckpt": ("ladder/beyond/block", {"model.activation_checkpointing", "trainer.micro_batch_size"}),
    "ddp": ("ladder/beyond/ckpt", {"parallel.kind"}),
    "fsdp": ("ladder/beyond/ddp", {"parallel.kind"}),
    "fp8": ("ladder/beyond/chunked", {"precision.name", "precision.float8"}),
    "muon": ("ladder/beyond/chunked", {"optim.name"}),
}
# keys that are interpolations of the micro batch in the ladder shapes (B x T per step, one
# batch of evaluation): they follow trainer.micro_batch_size, they are not settings of a rung
FOLLOW_B = {"trainer.total_batch_tokens", "trainer.eval_tokens"}
# compile=false: these tests are about which rungs run and what they record, not compile
RUNG_OVERRIDES = [*TINY, "trainer.seq_len=32", "logger=none", "compile=false"]



def changed(a: dict, b: dict) -> set[str]:
    fa, fb = flatten(a), flatten(b)
    keys = {k for k in fa.keys() | fb.keys() if fa.get(k) != fb.get(k)}
    return keys - {"experiment", "logger.job_type"}  # every rung names itself


def entry(item) -> tuple[str, list[str]]:
    """(experiment, overrides) of one `rungs:` item of a ladder file, as gpt2x.ablate reads it:
    names with '/' that exist under experiments/ladder/ are `ladder/<name>`."""
    if isinstance(item, dict):
        name, overrides = item["experiment"], list(item.get("overrides") or [])
    else:
        name, overrides = item, []
    return f"ladder/{name}", overrides


# --------------------------------------------------------------------------------------------
# The rung files, alone (both shapes)


@pytest.mark.parametrize("shape", sorted(set(SHAPES.values())))
@pytest.mark.parametrize("rung", list(RUNGS))
def test_each_rung_is_its_parent_plus_the_one_thing_it_names(rung, shape):
    text = (FOLDER / "beyond" / f"{rung}.yaml").read_text()
    assert text.startswith("# @package _global_")
    parent, keys = RUNGS[rung]
    assert yaml.safe_load(text)["defaults"][0] == f"/experiment/{parent}"
    cfg = compose_rung(f"ladder/beyond/{rung}", f"ladder_shape={shape}")
    assert cfg["experiment"] == f"ladder/beyond/{rung}"
    assert cfg["logger"]["job_type"] == rung and cfg["logger"]["group"]
    before = compose_rung(parent, f"ladder_shape={shape}")
    diff = changed(before, cfg)
    if "trainer.micro_batch_size" in keys:
        t = cfg["trainer"]
        assert diff - FOLLOW_B == keys, rung
        assert t["total_batch_tokens"] == t["micro_batch_size"] * t["seq_len"]
    else:
        assert diff == keys, rung


def test_the_changes_are_the_named_options():
    # the option each rung names, as gpt2x.config spells it (enum members, group choices)
    cfg = {r: compose_rung(f"ladder/beyond/{r}") for r in RUNGS}
    assert cfg["chunked"]["loss"]["impl"] == "chunked"
    assert cfg["max_autotune"]["compile_mode"] == "max-autotune"
    assert cfg["reduce_overhead"]["compile_mode"] == "reduce-overhead"
    assert cfg["block"]["compile_scope"] == "block" and cfg["block"]["compile"] is True
    assert cfg["ckpt"]["model"]["activation_checkpointing"] is True
    assert (cfg["ddp"]["parallel"]["kind"], cfg["fsdp"]["parallel"]["kind"]) == ("ddp", "fsdp")
    assert cfg["fp8"]["precision"]["float8"] is True and cfg["fp8"]["precision"]["dtype"] == "bf16"
    assert cfg["muon"]["optim"]["name"] == "muon" and cfg["muon"]["optim"]["fused"] is True


def test_ckpt_doubles_the_gpu_shapes_micro_batch():
    gpu = compose_rung("ladder/beyond/ckpt", "ladder_shape=gpt2_124m")
    base = compose_rung("ladder/beyond/block", "ladder_shape=gpt2_124m")
    assert gpu["trainer"]["micro_batch_size"] == 2 * base["trainer"]["micro_batch_size"] == 32


# --------------------------------------------------------------------------------------------
# The two ladders: entries as gpt2x.ablate composes them (shape + the entry's overrides)


@pytest.mark.parametrize("ladder", list(SHAPES))
def test_each_ladder_rung_changes_exactly_one_thing_over_its_predecessor(ladder):
    spec = yaml.safe_load((FOLDER / f"{ladder}.yml").read_text())
    assert spec["shape"] == SHAPES[ladder]
    entries = [entry(item) for item in spec["rungs"]]
    names = [e for e, _ in entries]
    # the lecture's fused rung first (the baseline row), then every beyond rung once
    assert names == ["ladder/fused", *(f"ladder/beyond/{r}" for r in RUNGS)]
    shape = f"ladder_shape={spec['shape']}"
    composed = {e: compose_rung(e, shape, *o) for e, o in entries}
    for exp, _ in entries[1:]:
        rung = exp.rsplit("/", 1)[-1]
        parent, keys = RUNGS[rung]
        assert names.index(parent) < names.index(exp), f"{rung}: its parent runs first"
        diff = changed(composed[parent], composed[exp])
        assert (diff - FOLLOW_B if "trainer.micro_batch_size" in keys else diff) == keys, rung
    b = {e: composed[e]["trainer"]["micro_batch_size"] for e in names}
    assert b["ladder/beyond/ckpt"] == 2 * b["ladder/beyond/block"]  # doubled on both ladders
    assert b["ladder/beyond/ddp"] == b["ladder/beyond/fsdp"] == b["ladder/beyond/ckpt"]
    # the branches that compare loss keep the baseline's tokens per step
    for r in ("fp8", "muon"):
        assert composed[f"ladder/beyond/{r}"]["trainer"]["micro_batch_size"] == b["ladder/fused"]


def test_dry_run_launches_the_distributed_rungs_with_torchrun(capsys):
    from gpt2x.lab import ablate

    assert ablate.main(["ladder=beyond_cpu", "dry_run=true", "out=/tmp/beyond-dry", "nproc=2"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if "gpt2x.train" in line]
    assert len(lines) == 1 + len(RUNGS)
    torchrun = [line for line in lines if "torch.distributed.run" in line]
    assert [line.split("+experiment=")[1].split()[0] for line in torchrun] == [
        "ladder/beyond/ddp",
        "ladder/beyond/fsdp",
    ]
    assert all(" ladder_shape=nano_cpu " in line for line in lines)


# --------------------------------------------------------------------------------------------
# A tiny ablation end to end: the baseline, fp8 (n/a on a CPU) and muon


@pytest.mark.slow
def test_fp8_is_na_on_cpu_and_muon_trains_through_ablate(tmp_path, data_root):
    out = tmp_path / "abl"
    proc = run_cli(
        "gpt2x.ablate",
        "rungs=[ladder/fused,ladder/beyond/fp8,ladder/beyond/muon]",
        "steps=1",
        "warmup=1",
        "quiet=true",
        "profile=false",
        f"out={out}",
        "--",
        *RUNG_OVERRIDES,
        f"paths.data_dir={data_root}",
        cwd=tmp_path,
        check=False,
    )
    # n/a is not a failure: the ablation exits 0
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    with open(out / "ablation.csv", newline="") as f:
        rows = {r["name"]: r for r in csv.DictReader(f)}
    assert [rows[n]["status"] for n in rows] == ["completed", "n/a", "completed"]
    fp8 = rows["ladder/beyond/fp8"]
    assert "precision=fp8 is not available on cpu" in fp8["error"] and fp8["median_ms"] == ""
    muon = rows["ladder/beyond/muon"]
    assert math.isfinite(float(muon["loss"])) and float(muon["tokens_per_s"]) > 0
    # the loss column the muon rung is read by: against the baseline at equal tokens
    base = rows["ladder/fused"]
    assert float(muon["loss_vs_baseline"]) == pytest.approx(
        float(muon["loss"]) - float(base["loss"]), abs=1e-9
    )
    record = json.loads((out / "03_muon" / "record.json").read_text())
    baseline = json.loads((out / "01_fused" / "record.json").read_text())
    assert record["config"]["optim"]["name"] == "muon"
    assert record["tokens_per_step"] == baseline["tokens_per_step"]  # equal tokens per step
    # n/a: stopped before any step ran (no step rows at all)
    assert json.loads((out / "02_fp8" / "record.json").read_text())["status"] == "n/a"
    metrics = out / "02_fp8" / "metrics.jsonl"
    assert not metrics.exists() or not metrics.read_text().strip()
