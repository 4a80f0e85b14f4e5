"""interleave=steps: the single-process rungs of a repeat run together and take turns step by
step (gpt2x.training.turns: the run's end and the runner's end, which gpt2x.ablate's runner
holds), and the report pairs their steps. Each rung must compute exactly what it computes alone;
a rung that fails must fail alone."""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import select
import sys
import threading
from datetime import datetime
from pathlib import Path

import pytest
from conftest import TINY, run_cli, sigint_when
from test_report import TOKENS_PER_STEP, write_run

from gpt2x import stats
from gpt2x.lab import ablate, ladder, report
from gpt2x.lab.runs import load_runs
from gpt2x.lab.summary import summarize
from gpt2x.record.folder import read_jsonl
from gpt2x.training.turns import Seat, Turns, TurnsClosed, take_turns

# --------------------------------------------------------------------------------------------
# gpt2x.training.turns: the run's side of the turns


def test_turns_wait_for_go_and_answer_done():
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    turns = Turns(go_r, done_w, group="g")
    assert turns.active and turns.info() == {"id": "g"}
    os.write(go_w, b"gg")
    turns.next()  # the first turn: nothing to end yet
    assert select.select([done_r], [], [], 0)[0] == []
    turns.next()  # ends turn 1 (one byte back), starts turn 2
    assert os.read(done_r, 8) == b"."
    turns.finish()  # ends turn 2, the last one ("!"), and closes its ends
    assert os.read(done_r, 8) == b"!"
    assert os.read(done_r, 8) == b""  # closed: the runner sees the run has ended
    turns.finish()  # twice is harmless
    os.close(go_w)
    os.close(done_r)


def test_turns_stop_when_the_runner_is_gone():
    go_r, go_w = os.pipe()
    done_r, done_w = os.pipe()
    os.close(go_w)  # the runner died
    with pytest.raises(TurnsClosed, match="runner handing out turns is gone"):
        Turns(go_r, done_w).next()
    os.close(go_r)
    os.close(done_r)
    os.close(done_w)


def test_without_the_variable_turns_do_nothing(monkeypatch):
    monkeypatch.delenv("GPT2X_TURN_FDS", raising=False)
    turns = Turns.from_env()
    assert not turns.active and turns.info() is None
    turns.next()
    turns.finish()
    monkeypatch.setenv("GPT2X_TURN_FDS", "3")
    with pytest.raises(ValueError, match="GPT2X_TURN_FDS='3': expected two file descriptors"):
        Turns.from_env()


# --------------------------------------------------------------------------------------------
# gpt2x.training.turns: the runner's side, against runs in threads (both ends, one process)


def seated_runs(steps: list[int], log: list[tuple[int, int]]) -> tuple[list[Seat], list]:
    """A Seat per run; run i (a thread) takes `steps[i]` turns after its setup turn, logging
    (run, step) at each, then ends. Returns the seats and the threads."""
    def run(i: int, n: int, turns: Turns) -> None:
        with contextlib.suppress(TurnsClosed):
            turns.next()  # the setup turn
            for step in range(n):
                turns.next()
                log.append((i, step))
        turns.finish()

    seats = [Seat(group="g") for _ in steps]
    threads = []
    for i, (seat, n) in enumerate(zip(seats, steps)):
        turns = Turns(*seat.run_fds, group="g")
        threads.append(threading.Thread(target=run, args=(i, n, turns), daemon=True))
        seat.run_fds = ()  # the run (its thread) owns and closes its ends
    for t in threads:
        t.start()
    return seats, threads


def test_take_turns_gives_each_run_one_step_per_round_in_a_seeded_order():
    log: list[tuple[int, int]] = []
    seats, threads = seated_runs([3, 3, 1], log)
    last = []
    take_turns(seats, seed="abl#repeat_0", on_last=last.append)
    for t in threads:
        t.join(timeout=10)
    # step j of every run comes before step j + 1 of any; run 2 ends after its first step
    assert [step for _, step in log] == [0, 0, 0, 1, 1, 2, 2]
    assert sorted(last) == [0, 1, 2]  # every run said its last turn
    # the order within a round: a shuffle seeded by the group and the round
    for r, round_ in enumerate([[0, 1, 2], [0, 1]]):
        order = list(round_)
        random.Random(f"abl#repeat_0:{r + 1}").shuffle(order)  # round 0 is the setup
        assert [i for i, step in log if step == r] == order
    for seat in seats:
        seat.close()


def test_past_the_timeout_no_run_gets_another_turn():
    log: list[tuple[int, int]] = []
    seats, threads = seated_runs([2, 2], log)
    stuck = Seat()  # a run that never answers its turn
    with pytest.raises(TimeoutError):
        take_turns([*seats, stuck], seed=0, timeout=0.5)
    for t in threads:
        t.join(timeout=10)  # a run waiting for a turn read end-of-file and stopped
        assert not t.is_alive()
    for seat in [*seats, stuck]:
        seat.close()


# --------------------------------------------------------------------------------------------
# gpt2x.ablate interleave=steps: which rungs take turns


def test_a_repeats_single_process_rungs_go_together_and_ddp_runs_alone(tmp_path, capsys):
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
    heads = [line for line in lines if line.startswith("# ") and "together" in line]
    assert (
        heads
        == [
            "# 01-02 fp32, bf16 (together, step by step)",
            "# 04-05 fused, vocab (together, step by step)",
        ]
        * 2
    )
    # each rung's command is its own, the same as with interleave=runs
    commands = [line for line in lines if not line.startswith("# ")]
    assert len(commands) == 10 and all("gpt2x.train" in c for c in commands)
    assert "torch.distributed.run" in commands[2] and "+experiment=ladder/ddp" in commands[2]
    # interleave=runs (the default without a ladder): every rung its own process
    assert ablate.main([*args[:2], f"out={out}", "dry_run=true"]) == 0
    assert "together" not in capsys.readouterr().out


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
    assert ladder.load_ladder(str(path)).interleave == "steps"
    path.write_text("rungs: [fp32, tf32]\ninterleave: process\n")
    with pytest.raises(ladder.AblationError, match="interleave: 'process' is not one of"):
        ladder.load_ladder(str(path))
    assert ladder.load_ladder("nano_cpu").interleave == "steps"


# --------------------------------------------------------------------------------------------
# the report: steps paired within a group that took turns


def write_lockstep_repeat(root: Path, rep: int, step_ms: dict[str, list[float]], same: bool):
    """One repeat of rungs that took turns (same=True) or ran apart; step_ms per rung."""
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
            rec["lockstep"] = {"id": f"abl#repeat_{rep}"}
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
        if not same:  # apart: each rung met the swings at other moments
            step_ms["tf32"] = step_ms["tf32"][3:] + step_ms["tf32"][:3]
        write_lockstep_repeat(root, rep, step_ms, same)
        for rung, ms in step_ms.items():
            all_ms.setdefault(rung, []).append(ms)
    return all_ms


def test_rungs_that_took_turns_pair_their_steps(tmp_path):
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


def test_rungs_that_ran_apart_pair_their_repeats(tmp_path):
    all_ms = lockstep_ladder(tmp_path / "abl", same=False)
    rows = {r["name"]: r for r in summarize(load_runs(tmp_path / "abl"))}
    # apart: repeat i's tokens/s (its median step, warm-up dropped) against repeat i's
    tps = {
        rung: [TOKENS_PER_STEP / (stats.median(ms[1:]) / 1000.0) for ms in all_ms[rung]]
        for rung in ("fp32", "tf32")
    }
    ref = stats.paired_ratio(tps["tf32"], tps["fp32"])
    got = rows["tf32"]["speedup_vs_prev_ci"]
    assert (got.center, got.lo, got.hi) == pytest.approx((ref.center, ref.lo, ref.hi))


# --------------------------------------------------------------------------------------------
# end to end: a tiny ladder with interleave=steps, rebuilt by gpt2x.report


RUNG_OVERRIDES = [*TINY, "trainer.seq_len=32", "logger=none"]


def ablate_tiny(cwd: Path, data_root: Path, *args: str, check: bool = True):
    """gpt2x.ablate interleave=steps over tiny rungs."""
    overrides = [*RUNG_OVERRIDES, f"paths.data_dir={data_root}"]
    return run_cli(
        "gpt2x.ablate",
        *args,
        "interleave=steps",
        "quiet=true",
        "--",
        *overrides,
        cwd=cwd,
        check=check,
    )


def step_times(rung_log: Path) -> dict[int, datetime]:
    """When each step's log line was written (the end of the step), from a rung.log."""
    out = {}
    for line in rung_log.read_text().splitlines():
        if "[gpt2x.train][INFO] - step " in line and " | loss " in line:
            when = datetime.strptime(line[1:24], "%Y-%m-%d %H:%M:%S,%f")
            # the line counts steps done: step index + 1
            out[int(line.split(" - step ")[1].split("/")[0]) - 1] = when
    return out


@pytest.fixture(scope="module")
def turns_ladder(tmp_path_factory, data_root) -> tuple[Path, object]:
    """fp32, tf32 and an fp8 rung (n/a on a CPU) taking turns; 2 repeats; then ddp alone."""
    tmp = tmp_path_factory.mktemp("turns")
    out = tmp / "abl"
    proc = ablate_tiny(
        tmp,
        data_root,
        "rungs=[fp32,tf32,ladder/beyond/fp8]",
        "steps=3",  # + TINY's 1 warm-up step + 1 profiled step (the breakdown): steps 0..4
        "repeats=2",
        f"out={out}",
    )
    return out, proc


def test_rungs_take_turns_step_by_step(turns_ladder):
    out, proc = turns_ladder
    manifest = json.loads((out / "ablation.json").read_text())
    assert [r["status"] for r in manifest["rungs"]] == ["completed", "completed", "n/a"] * 2
    assert manifest["interleave"] == "steps"
    assert "fp8: n/a (precision=fp8 is not available on cpu" in proc.stdout
    for rep in range(2):
        times = {
            rung: step_times(out / rung / f"repeat_{rep}" / "rung.log")
            for rung in ("01_fp32", "02_tf32")
        }
        assert all(sorted(t) == list(range(5)) for t in times.values())
        # every rung ends step j before any rung ends step j + 1: one step each per round
        for j in range(4):
            assert max(t[j] for t in times.values()) < min(t[j + 1] for t in times.values())
        for rung in ("01_fp32", "02_tf32", "03_fp8"):
            rec = json.loads((out / rung / f"repeat_{rep}" / "record.json").read_text())
            if rung != "03_fp8":
                assert rec["lockstep"] == {"id": f"{out}#repeat_{rep}"}


def test_a_rung_that_took_turns_computes_what_it_computes_alone(turns_ladder, tmp_path):
    out, _ = turns_ladder
    rec = json.loads((out / "01_fp32" / "repeat_1" / "record.json").read_text())
    alone = tmp_path / "alone"
    run_cli("gpt2x.train", *rec["overrides"], f"hydra.run.dir={alone}", cwd=tmp_path)
    losses = [m["loss"] for m in read_jsonl(alone / "metrics.jsonl")]
    assert losses == [m["loss"] for m in read_jsonl(out / "01_fp32" / "repeat_1" / "metrics.jsonl")]
    assert len(losses) == 5 and all(math.isfinite(v) for v in losses)
    assert "lockstep" not in json.loads((alone / "record.json").read_text())


def test_the_report_pairs_the_steps_of_rungs_that_took_turns(turns_ladder, tmp_path):
    out, _ = turns_ladder
    # (rungs that take turns start in a shuffled order: the ladder's order is the manifest's)
    order = ["ladder/fp32", "ladder/tf32", "ladder/beyond/fp8"]
    rows = {r["name"]: r for r in summarize(load_runs(out), order=order)}
    ratios = []
    for rep in range(2):
        tps = [
            {
                m["step"]: m["tokens_per_s"]
                for m in read_jsonl(out / rung / f"repeat_{rep}" / "metrics.jsonl")[
                    1:
                ]  # after the warm-up step, the profiled (breakdown) step left out
                if not m.get("profiled")
            }
            for rung in ("02_tf32", "01_fp32")
        ]
        ratios.append(stats.step_paired_ratio(*tps))
    ref = stats.log_t_interval(ratios)
    got = rows["ladder/tf32"]["speedup_vs_prev_ci"]
    assert (got.center, got.lo, got.hi) == pytest.approx((ref.center, ref.lo, ref.hi))
    assert "interleave=steps" in (out / "ablation.md").read_text()
    # gpt2x.report rebuilds the same table from the records
    assert report.main([str(out), "--out", str(tmp_path)]) == 0
    assert (tmp_path / "ablation.csv").read_text() == (out / "ablation.csv").read_text()


def test_rungs_past_the_timeout_are_stopped_and_recorded(tmp_path, data_root):
    out = tmp_path / "abl"
    proc = ablate_tiny(
        tmp_path,
        data_root,
        "rungs=[fp32,tf32]",
        "steps=2000",
        "timeout=7",  # seconds per rung: 14 for the two (a start and a first step on a busy
        # 2-core machine took over 8), far less than 2000 steps take
        f"out={out}",
        check=False,
    )
    assert proc.returncode == 1, proc.stdout[-2000:]
    for rung in ("01_fp32", "02_tf32"):
        rec = json.loads((out / rung / "record.json").read_text())
        assert rec["status"] == "failed" and rec["error"].startswith("timed out after 14 s")
        # the steps taken before the stop are kept
        assert 0 < len(read_jsonl(out / rung / "metrics.jsonl")) < 2000


def test_ctrl_c_stops_every_rung_taking_turns_and_keeps_the_finished_one(tmp_path, data_root):
    ladder = tmp_path / "long.yml"
    ladder.write_text(
        "interleave: steps\n"
        "rungs:\n"
        "  - ladder/fp32\n"
        "  - {name: long, experiment: ladder/tf32, overrides: [trainer.max_steps=100000]}\n"
        "  - ladder/bf16\n"
    )
    out = tmp_path / "abl"
    cmd = [sys.executable, "-m", "gpt2x.ablate", f"ladder={ladder}", f"out={out}", "quiet=true"]
    cmd += ["--", *RUNG_OVERRIDES, f"paths.data_dir={data_root}"]
    metrics = out / "02_long" / "metrics.jsonl"
    # fp32 and bf16 have 11 steps: past step 20, "long" takes its turns alone
    returncode, stdout = sigint_when(
        cmd, tmp_path, lambda: metrics.exists() and len(read_jsonl(metrics)) > 20, "long's step 20"
    )
    assert returncode == 130, stdout[-3000:]
    manifest = json.loads((out / "ablation.json").read_text())
    assert manifest["status"] == "interrupted"
    assert [r["status"] for r in manifest["rungs"]] == ["completed", "interrupted", "completed"]
    rec = json.loads((out / "02_long" / "record.json").read_text())
    assert rec["status"] == "interrupted" and "Ctrl-C" in rec["error"]
    assert len(read_jsonl(out / "02_long" / "metrics.jsonl")) > 20  # its steps are kept
