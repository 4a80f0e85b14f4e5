"""interleave=steps: single-process rungs taking turns step by step in one process
(gpt2x.lockstep), and the report pairing their steps. Each run must compute exactly what it
computes alone; a member that fails must fail alone."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import TINY, run_cli
from test_report import TOKENS_PER_STEP, write_run

from gpt2x import ablate, report, stats
from gpt2x.report import load_runs, summarize
from gpt2x.runfolder import read_jsonl

OVERRIDES = [*TINY, "trainer.seq_len=32", "logger=none", "trainer.max_steps=4"]


def member(name: str, experiment: str, run_dir: Path, *extra: str, data_root: Path) -> dict:
    overrides = [*OVERRIDES, f"paths.data_dir={data_root}", *extra]
    return {"name": name, "experiment": experiment, "overrides": overrides, "run_dir": str(run_dir)}


def losses(run_dir: Path) -> list[float]:
    return [row["loss"] for row in read_jsonl(run_dir / "metrics.jsonl")]


# --------------------------------------------------------------------------------------------
# gpt2x.lockstep: each member as if alone


@pytest.fixture(scope="module")
def lockstep_run(tmp_path_factory, data_root) -> tuple[Path, object]:
    """fp32 and bf16 with dropout (each step draws from the RNG) and an fp8 member that cannot
    run on a CPU, in one process."""
    tmp = tmp_path_factory.mktemp("lockstep")
    dropout = "model.dropout=0.1"
    plan = {
        "id": "t",
        "members": [
            member("fp32", "ladder/fp32", tmp / "a", dropout, data_root=data_root),
            member("fp8", "ladder/beyond/fp8", tmp / "c", data_root=data_root),
            member("bf16", "ladder/bf16", tmp / "b", dropout, data_root=data_root),
        ],
    }
    (tmp / "plan.json").write_text(json.dumps(plan))
    proc = run_cli("gpt2x.lockstep", str(tmp / "plan.json"), cwd=tmp, check=False)
    return tmp, proc


def test_members_take_turns_and_compute_what_they_compute_alone(lockstep_run, data_root):
    tmp, proc = lockstep_run
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]  # fp8 failed
    # turns: fp32 step 0, bf16 step 0, fp32 step 1, ... (the log tags each line with the member)
    steps = [
        line.split("][")[1]
        for line in proc.stdout.splitlines()
        if "][INFO] step " in line and "/4 |" in line
    ]
    assert steps == ["fp32", "bf16"] * 4
    for name, folder in (("fp32", "a"), ("bf16", "b")):
        rec = json.loads((tmp / folder / "record.json").read_text())
        assert rec["status"] == "completed"
        assert rec["lockstep"] == {"id": "t", "members": ["fp32", "fp8", "bf16"]}
        assert rec["overrides"][0] == f"+experiment=ladder/{name}"
        # the same run alone: identical losses (the member's RNG is its own between turns:
        # dropout draws from it every step)
        alone = tmp / f"alone_{name}"
        run_cli(
            "gpt2x.train",
            *rec["overrides"],
            f"hydra.run.dir={alone}",
            cwd=tmp,
        )
        assert losses(tmp / folder) == losses(alone)
        assert all(math.isfinite(v) for v in losses(alone))


def test_a_member_that_cannot_run_fails_alone_with_one_line(lockstep_run):
    tmp, _ = lockstep_run
    rec = json.loads((tmp / "c" / "record.json").read_text())
    assert rec["status"] == "failed"
    assert rec["error"].startswith("ConfigError: precision=fp8 is not available on cpu")
    assert rec["experiment"] == "ladder/beyond/fp8" and rec["config"]["precision"]["name"] == "fp8"
    assert not (tmp / "c" / "metrics.jsonl").exists()


def test_a_distributed_member_is_refused(tmp_path, data_root):
    plan = {"members": [member("ddp", "ladder/ddp", tmp_path / "d", data_root=data_root)]}
    (tmp_path / "plan.json").write_text(json.dumps(plan))
    proc = run_cli("gpt2x.lockstep", str(tmp_path / "plan.json"), cwd=tmp_path, check=False)
    assert proc.returncode == 1
    rec = json.loads((tmp_path / "d" / "record.json").read_text())
    assert rec["status"] == "failed" and "parallel=ddp cannot share a process" in rec["error"]


def test_a_bad_plan_is_one_line_and_exit_2(tmp_path):
    (tmp_path / "plan.json").write_text('{"members": [{"name": "x"}]}')
    proc = run_cli("gpt2x.lockstep", str(tmp_path / "plan.json"), cwd=tmp_path, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().startswith("gpt2x.lockstep: error: cannot read the lockstep plan")
    assert len(proc.stderr.strip().splitlines()) == 1


# --------------------------------------------------------------------------------------------
# gpt2x.ablate interleave=steps: which rungs share a process


def test_units_group_a_repeats_single_process_rungs_and_run_ddp_alone(tmp_path, capsys):
    out = tmp_path / "abl"
    args = [
        "rungs=[fp32,bf16,ddp,fused,vocab]",
        "repeats=2",
        "interleave=steps",
        f"out={out}",
        "dry_run=true",
    ]
    assert ablate.main(args) == 0
    lines = capsys.readouterr().out.splitlines()
    heads = [line for line in lines if line.startswith("# ")]
    assert (
        heads
        == [
            "# 01-02 fp32, bf16 (lockstep: one process)",
            "# 03 ddp (torchrun, nproc=2)",
            "# 04-05 fused, vocab (lockstep: one process)",
        ]
        * 2
    )
    commands = [line for line in lines if "gpt2x.lockstep" in line]
    assert [c.rsplit("/", 1)[1] for c in commands] == [
        "repeat_0.json",
        "repeat_0_2.json",
        "repeat_1.json",
        "repeat_1_2.json",
    ]
    # interleave=runs (the default without a ladder): every rung its own process
    assert ablate.main([*args[:2], f"out={out}", "dry_run=true"]) == 0
    assert "gpt2x.lockstep" not in capsys.readouterr().out


@pytest.mark.parametrize(
    ("arg", "message"),
    [("interleave=rungs", "interleave"), ("interleave=3", "interleave")],
)
def test_bad_interleave_names_the_setting(arg, message, capsys):
    assert ablate.main(["rungs=[fp32]", arg]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2x.ablate: error:") and message in err and len(err.splitlines()) == 1


def test_a_ladder_file_sets_interleave_and_rejects_other_values(tmp_path):
    path = tmp_path / "l.yml"
    path.write_text("rungs: [fp32, tf32]\ninterleave: steps\n")
    assert ablate.load_ladder(str(path)).interleave == "steps"
    path.write_text("rungs: [fp32, tf32]\ninterleave: process\n")
    with pytest.raises(ablate.AblationError, match="interleave: 'process' is not one of"):
        ablate.load_ladder(str(path))
    assert ablate.load_ladder("nano_cpu").interleave == "steps"


# --------------------------------------------------------------------------------------------
# the report: steps paired within a process


def write_lockstep_repeat(root: Path, rep: int, step_ms: dict[str, list[float]], same: bool):
    """One repeat of rungs that ran in one process (same=True) or not; step_ms per rung."""
    for i, (rung, ms) in enumerate(step_ms.items()):
        run = write_run(root, f"{i:02d}_{rung}/repeat_{rep}", rung, 100.0, config={"trainer": {}})
        rows = read_jsonl(run / "metrics.jsonl")[: len(ms)]
        for row, t in zip(rows, ms):
            row.update(ms=t, tokens_per_s=TOKENS_PER_STEP / (t / 1000.0))
        (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        rec = json.loads((run / "record.json").read_text())
        rec["config"]["repeat"] = rep
        rec["config"]["trainer"]["warmup_steps_for_timing"] = 1
        if same:
            rec["lockstep"] = {"id": f"plan_{rep}", "members": list(step_ms)}
        (run / "record.json").write_text(json.dumps(rec))


# the machine's speed per step: it swings by up to 40% within seconds, alike for both rungs
SWING = [1.0, 1.4, 0.8, 1.2, 0.7, 1.3, 0.9]


def lockstep_ladder(root: Path, same: bool) -> dict[str, list[list[float]]]:
    """3 repeats; "tf32" is fp32 again (a no-op) with 1% step jitter, "flash" 10% faster."""
    jitter = [1.01, 0.99, 1.0, 1.01, 0.99, 1.0, 1.01]
    drift = [1.0, 1.1, 0.95]  # per repeat
    all_ms: dict[str, list[list[float]]] = {}
    for rep in range(3):
        jitter = jitter[1:] + jitter[:1]  # a different 1% jitter in each repeat
        step_ms = {
            "fp32": [100 * s * drift[rep] for s in SWING],
            "tf32": [100 * s * drift[rep] * j for s, j in zip(SWING, jitter)],
            "flash": [100 / 1.1 * s * drift[rep] * j for s, j in zip(SWING, jitter[::-1])],
        }
        if not same:  # separate processes: each rung met the swings at other moments
            step_ms["tf32"] = step_ms["tf32"][3:] + step_ms["tf32"][:3]
        write_lockstep_repeat(root, rep, step_ms, same)
        for rung, ms in step_ms.items():
            all_ms.setdefault(rung, []).append(ms)
    return all_ms


def test_rungs_of_one_process_pair_their_steps(tmp_path):
    all_ms = lockstep_ladder(tmp_path / "abl", same=True)
    rows = {r["name"]: r for r in summarize(load_runs(tmp_path / "abl"))}

    # by hand: per repeat the median of the step-by-step speed-ups (warm-up step 0 dropped),
    # then the t-interval on their logs across repeats
    def by_hand(new: str, old: str) -> stats.Interval:
        ratios = [
            stats.median([b / a for a, b in zip(new_ms[1:], old_ms[1:])])
            for new_ms, old_ms in zip(all_ms[new], all_ms[old])
        ]
        return stats.log_t_interval(ratios)

    for new, old in (("tf32", "fp32"), ("flash", "tf32")):
        got, ref = rows[new]["speedup_vs_prev_ci"], by_hand(new, old)
        assert (got.center, got.lo, got.hi) == pytest.approx((ref.center, ref.lo, ref.hi))
    # the swings (up to 40% within a repeat) cancel step by step: the no-op is within noise
    # by a narrow interval, and a 10% gain is resolved
    tf32, flash = rows["tf32"]["speedup_vs_prev_ci"], rows["flash"]["speedup_vs_prev_ci"]
    assert rows["tf32"]["noise"] is True and tf32.half_width_pct < 3
    assert (
        rows["flash"]["noise"] is False
        and flash.lo > 1.05
        and flash.center == pytest.approx(1.1, rel=0.02)
    )


def test_rungs_of_separate_processes_pair_their_repeats(tmp_path):
    all_ms = lockstep_ladder(tmp_path / "abl", same=False)
    rows = {r["name"]: r for r in summarize(load_runs(tmp_path / "abl"))}
    # no shared process: repeat i's tokens/s (its median step, warm-up dropped) against repeat i's
    tps = {
        rung: [TOKENS_PER_STEP / (stats.median(ms[1:]) / 1000.0) for ms in all_ms[rung]]
        for rung in ("fp32", "tf32")
    }
    ref = stats.paired_ratio(tps["tf32"], tps["fp32"])
    got = rows["tf32"]["speedup_vs_prev_ci"]
    assert (got.center, got.lo, got.hi) == pytest.approx((ref.center, ref.lo, ref.hi))


# --------------------------------------------------------------------------------------------
# end to end: a tiny ladder with interleave=steps, rebuilt by gpt2x.report


def test_tiny_ladder_interleaved_by_steps_end_to_end(tmp_path, data_root):
    out = tmp_path / "abl"
    proc = run_cli(
        "gpt2x.ablate",
        "rungs=[fp32,tf32,ladder/beyond/fp8]",
        "steps=3",
        "warmup=2",
        "repeats=2",
        "interleave=steps",
        f"out={out}",
        "quiet=true",
        "--",
        *TINY,
        "trainer.seq_len=32",
        "logger=none",
        f"paths.data_dir={data_root}",
        cwd=tmp_path,
    )
    assert "ladder/beyond/fp8: n/a (ConfigError: precision=fp8 is not available" in proc.stdout
    manifest = json.loads((out / "ablation.json").read_text())
    assert [r["status"] for r in manifest["rungs"]] == ["completed", "completed", "n/a"] * 2
    assert {r["launcher"] for r in manifest["rungs"]} == {"lockstep"}
    assert manifest["interleave"] == "steps"
    # each rung's log holds its own lines; the process's log holds all
    own = (out / "01_fp32" / "repeat_0" / "rung.log").read_text()
    assert "[ladder/fp32][INFO] step" in own and "[ladder/tf32]" not in own
    assert "[ladder/tf32][INFO] step" in (out / "lockstep" / "repeat_0.log").read_text()
    # the speed-up interval pairs the steps of each repeat's process
    rows = {r["name"]: r for r in summarize(load_runs(out))}
    ratios = []
    for rep in range(2):
        a = {
            m["step"]: m["tokens_per_s"]
            for m in read_jsonl(out / "02_tf32" / f"repeat_{rep}" / "metrics.jsonl")[2:]
        }
        b = {
            m["step"]: m["tokens_per_s"]
            for m in read_jsonl(out / "01_fp32" / f"repeat_{rep}" / "metrics.jsonl")[2:]
        }
        ratios.append(stats.step_paired_ratio(a, b))
    ref = stats.log_t_interval(ratios)
    got = rows["ladder/tf32"]["speedup_vs_prev_ci"]
    assert (got.lo, got.hi) == pytest.approx((ref.lo, ref.hi))
    md = (out / "ablation.md").read_text()
    assert "interleave=steps" in md
    # gpt2x.report rebuilds the same table from the records
    again = tmp_path / "again"
    assert report.main([str(out), "--out", str(again)]) == 0
    assert (again / "ablation.csv").read_text() == (out / "ablation.csv").read_text()
