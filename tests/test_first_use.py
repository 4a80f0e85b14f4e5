"""What a new user meets first: the progress bar on a real terminal, Ctrl-C, relaunching a
preempted run, the command-line help and the checkpoint tools' missing options."""

from __future__ import annotations

import os
import shlex
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

import pytest
from conftest import TINY, cli_train, record, run_cli, tiny_cfg
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import OmegaConf

import gpt2x.config
from gpt2x import CONF_DIR
from gpt2x.config import register_configs
from gpt2x.record.folder import read_jsonl
from gpt2x.training.preemption import StopSignals, StopWaiting, continue_command

register_configs()


# --------------------------------------------------------------------------------------------
# the progress bar on a real terminal (tmux)


@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux (.ci/run installs it)")
def test_progress_bar_on_a_terminal_prints_log_lines_above_one_live_bar(tmp_path, data_root):
    """Under tmux (a real terminal), every log line is a clean line of its own and the bar is
    one line at the end: before, each log line stuck to a frozen copy of the bar."""
    sock = tmp_path / "tmux.sock"
    tmux = ["tmux", "-S", str(sock)]
    cmd = [
        sys.executable,
        "-m",
        "gpt2x.train",
        *TINY,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={tmp_path / 'run'}",
        "trainer.max_steps=6",
        "trainer.warmup_steps_for_timing=2",
        "trainer.log_every=2",
        "logger=none",
    ]
    script = tmp_path / "run.sh"
    script.write_text(
        f"cd {shlex.quote(str(tmp_path))}\n"
        "unset COLUMNS LINES\n"
        "export OMP_NUM_THREADS=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 "
        f"GPT2X_CACHE={shlex.quote(os.environ['GPT2X_CACHE'])}\n"
        f"{shlex.join(cmd)}\n"
        "echo EXIT=$?\n"
        f"{shlex.join(tmux)} wait-for -S done\n"
        "exec sleep 600\n"  # keeps the pane (and its scrollback) until it is captured
    )
    subprocess.run([*tmux, "new-session", "-d", "-x", "250", "-y", "50", "bash", str(script)],
                   check=True)
    try:
        subprocess.run([*tmux, "wait-for", "done"], check=True, timeout=300)
        screen = subprocess.run(
            [*tmux, "capture-pane", "-p", "-J", "-S", "-", "-E", "-"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
    finally:
        subprocess.run([*tmux, "kill-server"], check=False)
    lines = [line.rstrip() for line in screen.splitlines() if line.strip()]
    assert "EXIT=0" in lines, screen
    last = read_jsonl(tmp_path / "run" / "metrics.jsonl")[-1]
    # one bar, finished, on its own line: step/max, elapsed, eta, tokens/s, the latest loss
    bars = [line for line in lines if "━" in line]
    assert len(bars) == 1, screen
    assert bars[0].startswith("step 6/6") and "tok/s" in bars[0]
    assert f"loss {last['loss']:.4f}" in bars[0]
    # the log lines, each whole on its own line (log_every=2: steps 1, 3, 5 and the last, 6)
    step_lines = [line for line in lines if "/6 | loss " in line]
    assert [line.split("/6 |")[0].split()[-1] for line in step_lines] == ["1", "3", "5", "6"]
    assert sum("projected wall time:" in line for line in lines) == 1


# --------------------------------------------------------------------------------------------
# Ctrl-C: stop at the step boundary, save, say how to continue; twice: abort at once

# gpt2x.train that gets Ctrl-C (SIGINT) during step 2 (`times` times), at a deterministic point
# instead of racing a signal from outside against a fast run
CTRL_C_TRAIN = """
import os, signal, sys
import gpt2x.train as train_mod

real_step = train_mod.train_step
TIMES = int(sys.argv.pop(1))


def train_step(run, step):
    row = real_step(run, step)
    if step == 2 and not run.cfg.trainer.resume:
        for _ in range(TIMES):
            os.kill(os.getpid(), signal.SIGINT)
    return row


train_mod.train_step = train_step
train_mod.main()
"""


def _ctrl_c_run(tmp_path: Path, data_root: Path, times: int, *extra: str):
    script = tmp_path / "ctrl_c_train.py"
    script.write_text(CTRL_C_TRAIN)
    args = [
        *TINY,
        f"paths.data_dir={data_root}",
        f"paths.output_dir={tmp_path / 'outputs'}",
        "logger=none",
        "trainer.sample_tokens=0",
        "trainer.max_steps=8",
        *extra,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(script), str(times), *args],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
    return proc, run_dir


def test_ctrl_c_saves_at_the_step_boundary_and_prints_the_command_that_continues(
    tmp_path, data_root
):
    proc, run_dir = _ctrl_c_run(tmp_path, data_root, 1)
    assert proc.returncode == 130, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    # one line on stderr says how to continue, with the exact command
    (line,) = [x for x in proc.stderr.splitlines() if x.startswith("interrupted:")]
    assert "Ctrl-C" in line and "step_000003" in line
    command = line.split("continue with: ", 1)[1]
    assert command.startswith("python -m gpt2x.train ") and "trainer.resume=auto" in command
    assert f"hydra.run.dir={run_dir}" in command  # a timestamped folder: named in the command
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and command in rec["error"]
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == [0, 1, 2]
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000003"]
    # the printed command, as printed, finishes the run from step 3
    argv = shlex.split(command)
    assert argv[:3] == ["python", "-m", "gpt2x.train"]
    run_cli("gpt2x.train", *argv[3:], cwd=tmp_path)
    rec = record(run_dir)
    assert rec["status"] == "completed" and rec["resumed_from"]["step"] == 3
    assert [r["step"] for r in read_jsonl(run_dir / "metrics.jsonl")] == list(range(8))


def test_a_second_ctrl_c_aborts_at_once_without_saving(tmp_path, data_root, monkeypatch):
    """In-process (the trainer's own handlers; main turns KeyboardInterrupt into its one line
    and exit 130): the first Ctrl-C during step 2 asks for a stop, the second aborts there."""
    import gpt2x.train as train_mod

    real_step = train_mod.train_step

    def train_step(run, step):
        row = real_step(run, step)
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return row

    monkeypatch.setattr(train_mod, "train_step", train_step)
    cfg = tiny_cfg(tmp_path / "run", data_root, "trainer.max_steps=8", "trainer.checkpoint_every=2")
    with pytest.raises(KeyboardInterrupt):
        train_mod.run_training(cfg)
    run_dir = tmp_path / "run"
    rec = record(run_dir)
    assert rec["status"] == "interrupted" and rec["error"] == (
        f"aborted by the user (Ctrl-C); {run_dir / 'checkpoints' / 'step_000002'} is the newest "
        "checkpoint"
    )
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["step_000002"]
    assert len(read_jsonl(run_dir / "metrics.jsonl")) == 2  # step 2 never finished
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


# --------------------------------------------------------------------------------------------
# relaunching a preempted run: trainer.resume=auto names the run folder after the overrides


def _run_dir_of(*overrides: str) -> str:
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    HydraConfig.instance().set_config(cfg)
    return str(OmegaConf.select(cfg, "hydra.run.dir"))


def test_resume_auto_relaunch_finds_the_same_run_folder(monkeypatch):
    """Two `torchrun --standalone` launches of the same command get different rendezvous ids;
    with trainer.resume=auto both land in one folder named after the overrides, while a run
    without it gets a fresh folder per launch (a fresh run never lands in an old run's)."""
    readme = ["parallel=ddp", "trainer.checkpoint_every=500", "trainer.resume=auto"]
    dirs = []
    for launch in ("1f3c", "9ab0"):
        monkeypatch.setattr(gpt2x.config, "_RUN_ID", None)
        monkeypatch.setenv("TORCHELASTIC_RUN_ID", launch)
        monkeypatch.setenv("RANK", "0")
        dirs.append((_run_dir_of(*readme), _run_dir_of("parallel=ddp")))
    (auto_1, fresh_1), (auto_2, fresh_2) = dirs
    assert auto_1 == auto_2 and auto_1.endswith("/runs/parallel=ddp,trainer.checkpoint_every=500")
    assert fresh_1.endswith("/runs/torchrun-1f3c") and fresh_2.endswith("/runs/torchrun-9ab0")
    # order, paths and logger do not change the name; the recipe's experiment names it
    monkeypatch.setattr(gpt2x.config, "_RUN_ID", None)
    assert _run_dir_of(
        "trainer.resume=auto", "logger=none", "paths.data_dir=/x", "trainer.checkpoint_every=500",
        "parallel=ddp",
    ) == auto_1
    assert _run_dir_of("+experiment=reproduce/gpt2_124m").endswith(
        "/runs/experiment=reproduce-gpt2_124m"
    )
    # GPT2X_RUN_ID still names the folder when given
    monkeypatch.setenv("GPT2X_RUN_ID", "mine")
    assert _run_dir_of(*readme).endswith("/runs/mine")


def test_continue_command_names_the_folder_only_when_the_command_would_not_find_it(tmp_path):
    out = tmp_path / "outputs"
    overrides = ["parallel=ddp", "trainer.resume=auto", "data.source='a b/*.txt'"]
    found = out / "runs" / gpt2x.config.stable_run_name(overrides)
    # quoted for the shell: the same overrides come back
    assert shlex.split(continue_command(overrides, found, out, world_size=2)) == [
        "torchrun", "--standalone", "--nproc_per_node=2", "-m", "gpt2x.train",
        "parallel=ddp", "data.source='a b/*.txt'", "trainer.resume=auto",
    ]
    other = out / "runs" / "2026-12-04_10-00-00_ab12"
    assert continue_command(["model=gpt2"], other, out) == (
        f"python -m gpt2x.train model=gpt2 trainer.resume=auto hydra.run.dir={other}"
    )
    # a multi-node launch: the launcher's own options are the user's
    assert continue_command([], other, out, world_size=16, local_world_size=8).startswith(
        "torchrun <the same launch options> -m gpt2x.train trainer.resume=auto"
    )


def test_stop_signals_ctrl_c_once_is_a_flag_twice_aborts(caplog):
    with StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)  # the scheduler repeating itself: still a flag
        assert stop.requested() and stop.name == "SIGTERM"
    with StopSignals() as stop, caplog.at_level("WARNING", logger="gpt2x.train"):
        os.kill(os.getpid(), signal.SIGINT)
        assert stop.requested() and stop.name == "Ctrl-C (SIGINT)"
        stop.announcer.join(timeout=10)
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
    assert [r.getMessage() for r in caplog.records] == [
        "Ctrl-C: stopping after this step and saving a checkpoint (Ctrl-C again: abort now, "
        "without saving)"
    ]
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # restored


def test_stop_signals_end_a_wait_at_the_step_boundary_at_once():
    """interleave=steps: a run blocked waiting for its turn stops on Ctrl-C without the turn."""
    go_read, go_write = os.pipe()
    try:
        with StopSignals() as stop:
            sender = threading.Thread(target=os.kill, args=(os.getpid(), signal.SIGINT))
            with pytest.raises(StopWaiting), stop.waiting():
                sender.start()
                os.read(go_read, 1)  # blocks: nobody writes the turn
            sender.join()
            assert stop.requested()
            with pytest.raises(StopWaiting), stop.waiting():  # already stopping: no wait
                os.read(go_read, 1)
            with stop.waiting(active=False):  # ranks of a distributed run stop together later
                pass
    finally:
        os.close(go_read)
        os.close(go_write)


# --------------------------------------------------------------------------------------------
# the checkpoint tools without their required options: one line, not a traceback


@pytest.mark.parametrize(
    "tool, args, missing",
    [("gpt2x.sample", [], "checkpoint="), ("gpt2x.export", ["checkpoint=x"], "out=")],
)
def test_checkpoint_tools_name_a_missing_required_option(tmp_path, tool, args, missing):
    proc = run_cli(tool, *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith(f"error: {missing} is required: python -m {tool} ")


def test_an_expected_error_is_printed_once_per_launch(tmp_path, data_root):
    """Under torchrun every rank fails the same check: rank 0 prints its one line (before: every
    rank printed it twice, once logged to stdout and once on stderr; rank 0's own case is
    test_train's bad-batch test), each rank's log file has it."""
    proc, run_dir = cli_train(
        tmp_path, data_root, "trainer.total_batch_tokens=1000", "logger=none", check=False,
        env={"RANK": "1"},
    )
    assert proc.returncode == 2 and "error" not in proc.stdout + proc.stderr
    assert "error: trainer.total_batch_tokens=1000" in (run_dir / "train_rank1.log").read_text()


def test_evaluate_offline_names_its_own_hellaswag_option(tmp_path, monkeypatch, capsys):
    """Offline and nothing cached: the one line names `hellaswag_path=`, evaluate's option
    (it said `path=`, which no command takes)."""
    import urllib.error
    import urllib.request

    from gpt2x import evaluate
    from gpt2x.model import GPT, GPTConfig
    from gpt2x.training.hellaswag import CACHE_ENV_VAR

    GPT(GPTConfig(block_size=16, n_layer=1, n_head=1, n_embd=8)).export_hf(tmp_path / "hf")

    def offline(url, timeout=None):
        raise urllib.error.URLError("no network")

    monkeypatch.setattr(urllib.request, "urlopen", offline)
    monkeypatch.setenv(CACHE_ENV_VAR, str(tmp_path / "cache"))
    argv = ["gpt2x.evaluate", f"hf_model={tmp_path / 'hf'}", "val=false", "hellaswag=true"]
    monkeypatch.setattr(sys, "argv", [*argv, "device=cpu"])
    with pytest.raises(SystemExit) as exit_info:
        evaluate.main()
    assert exit_info.value.code == 2
    # (transformers' own loading bars share stderr)
    (line,) = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith("error: could not download") and "(or pass hellaswag_path=...)" in line


def test_train_help_is_examples_and_groups_not_a_config_dump(tmp_path):
    out = run_cli("gpt2x.train", "--help", cwd=tmp_path).stdout
    assert len(out.splitlines()) < 50  # was the whole config, ~140 lines
    assert "Examples:" in out and "n_layer:" not in out
    assert "+experiment=ladder/bf16" in out and "-m +sweep=batch_size" in out
    assert "add them with a `+`" in out and "--cfg job" in out
    assert "model: gpt2, gpt2-large, gpt2-medium, gpt2-xl, nano" in out  # the groups' options
