"""Hydra multirun sweeps on CPU, offline: batch-size sweep + summary, failed jobs, Optuna, the
joblib and torchrun launchers, W&B groups; plus the helpers in gpt2x.sweep / gpt2x.lab.launch."""

from __future__ import annotations

import json
import math
import os
import shlex
import signal
import struct
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY, losses, record, run_cli
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf, open_dict

from gpt2x import CONF_DIR
from gpt2x.config import job_dirname, register_configs, resolved_config
from gpt2x.lab.launch import quote_override_value, torchrun_command
from gpt2x.lab.supervisor import (
    Interrupted,
    exit_reason,
    failure_from_log,
    start,
    stop_process_group,
    watch,
)
from gpt2x.lab.sweep import swept_key
from gpt2x.record.failure import FAILED, write_failed_record
from gpt2x.record.folder import read_jsonl
from gpt2x.training.multirun import failure_reason, record_failure

register_configs()

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
# the tiny model of the other tests, minus its micro batch (swept) and its eval_tokens (the
# sweep file sets its own)
SWEEP_TINY = [
    o for o in TINY if not o.startswith(("trainer.eval_tokens=", "trainer.micro_batch_size="))
]
TOTAL = 4 * 32  # tokens per optimization step in the batch-size sweeps: B=1,2,4 -> accum 4,2,1


def sweep(
    tmp_path: Path,
    data_root: Path,
    *overrides: str,
    check: bool = True,
    env=None,
    script: Path | None = None,
):
    """`python -m gpt2x.train -m ...` (or a patched copy) into tmp_path/out; (proc, sweep dir)."""
    out = tmp_path / "out"
    args = [
        "-m",
        *SWEEP_TINY,
        f"paths.data_dir={data_root}",
        f"paths.output_dir={out}",
        "hydra.sweep.dir=" + quote_override_value(str(out / "sweep")),
        *overrides,
    ]
    if script is None:  # in this process unless the test sets the environment
        proc = run_cli("gpt2x.train", *args, cwd=tmp_path, check=check, env=env)
    else:
        import subprocess

        proc = subprocess.run(
            [sys.executable, str(script), *args],
            cwd=tmp_path,
            text=True,
            capture_output=True,
            env={**os.environ, "OMP_NUM_THREADS": "1", **(env or {})},
            timeout=600,
        )
        if check and proc.returncode:
            raise AssertionError(
                f"exit {proc.returncode}\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
    return proc, out / "sweep"


def jobs(sweep_dir: Path) -> dict[int, Path]:
    """Job folders by job number (the folder name starts with `<num>_`)."""
    found = {}
    for p in sweep_dir.iterdir():
        if p.is_dir() and p.name.split("_", 1)[0].isdigit():
            found[int(p.name.split("_", 1)[0])] = p
    return dict(sorted(found.items()))


def summary_rows(sweep_dir: Path) -> list[dict]:
    import csv

    with open(sweep_dir / "summary.csv") as f:
        return list(csv.DictReader(f))


# --------------------------------------------------------------------------------------------
# End to end (each a real multirun in a subprocess)


def test_batch_size_sweep_same_optimization_summary_and_a_failed_job(tmp_path, data_root):
    """B=1,2,4 at 128 tokens/step are one optimization; B=3 cannot divide it and fails alone."""
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=batch_size",
        "trainer.micro_batch_size=1,2,4,3",
        f"trainer.total_batch_tokens={TOTAL}",
        "trainer.max_steps=4",
        "logger=none",
    )
    assert proc.returncode == 0  # one job failed, the others completed: the sweep succeeded
    found = jobs(sweep_dir)
    assert sorted(found) == [0, 1, 2, 3]
    # folder names: job number, then the swept key first; the sweep group itself is left out
    for num, b in zip(range(4), (1, 2, 4, 3)):
        assert found[num].name.startswith(f"{num}_trainer.micro_batch_size={b},")
        assert "sweep=" not in found[num].name and len(found[num].name) < 100

    done = {n: record(found[n]) for n in (0, 1, 2)}
    assert all(r["status"] == "completed" for r in done.values())
    assert [done[n]["grad_accum_steps"] for n in (0, 1, 2)] == [4, 2, 1]
    assert {done[n]["tokens_per_step"] for n in (0, 1, 2)} == {TOTAL}
    # the same optimization: equal loss curves (fp32; only the summation order differs)
    ref = losses(found[2])
    assert len(ref) == 4
    for n in (0, 1):
        assert losses(found[n]) == pytest.approx(ref, rel=1e-5, abs=1e-5)
    vals = [done[n]["summary"]["val_loss"] for n in (0, 1, 2)]
    assert vals == pytest.approx([vals[2]] * 3, rel=1e-5)  # validation reads the same tokens

    failed = record(found[3])
    assert failed["status"] == "failed"
    assert "ConfigError" in failed["error"] and "total_batch_tokens" in failed["error"]
    assert failed["config"]["trainer"]["micro_batch_size"] == 3  # written before any training
    assert "trainer.micro_batch_size=3" in failed["overrides"]

    # the summary: table, csv, plots; best marked; the failure listed with its reason
    for name in ("summary.md", "summary.csv", "loss.png", "tokens_per_s.png", "sweep.png"):
        assert (sweep_dir / name).is_file(), name
    assert (sweep_dir / "sweep.png").read_bytes()[:8] == PNG_MAGIC
    rows = summary_rows(sweep_dir)
    assert [r["trainer.micro_batch_size"] for r in rows] == ["1", "2", "4", "3"]
    assert [r["status"] for r in rows] == ["completed"] * 3 + ["failed"]
    assert sum(r["best"] == "True" for r in rows) == 1
    best = next(r for r in rows if r["best"] == "True")
    assert float(best["tokens_per_s"]) == max(float(r["tokens_per_s"]) for r in rows[:3])
    assert all(abs(float(r["loss_vs_baseline"])) < 1e-4 for r in rows[:3])
    md = (sweep_dir / "summary.md").read_text()
    assert "**Best**" in md and "total_batch_tokens" in md
    assert "differ by at most" in md

    # rebuilt offline from the records, by gpt2x.report and by gpt2x.sweep
    (sweep_dir / "summary.md").unlink()
    run_cli(
        "gpt2x.report",
        str(sweep_dir),
        "--x",
        "trainer.micro_batch_size",
        "--basename",
        "summary",
        cwd=tmp_path,
    )
    assert "trainer.micro_batch_size" in (sweep_dir / "summary.md").read_text()
    proc = run_cli("gpt2x.sweep", str(sweep_dir), cwd=tmp_path)
    assert "differ by at most" in (sweep_dir / "summary.md").read_text()
    assert "trainer.micro_batch_size" in proc.stdout


OOM_SCRIPT = """
import torch
import gpt2x.train as train

real_step = train.train_step

def step(run, i):
    if run.cfg.trainer.micro_batch_size == 4 and i == 1:
        run.hog = torch.empty(1_000_000)  # something for the sweep to free
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
    return real_step(run, i)

train.train_step = step
train.main()
"""


def test_out_of_memory_job_is_recorded_and_the_sweep_goes_on(tmp_path, data_root):
    """Jobs of the sequential launcher share one process: the OOM job is recorded, the next runs."""
    script = tmp_path / "oom_train.py"
    script.write_text(OOM_SCRIPT)
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=batch_size",
        "trainer.micro_batch_size=4,2",
        "trainer.total_batch_tokens=128",
        "trainer.max_steps=3",
        "logger=none",
        script=script,
    )
    assert proc.returncode == 0
    found = jobs(sweep_dir)
    oom, ok = record(found[0]), record(found[1])
    assert oom["status"] == "failed"
    assert oom["error"].startswith("CUDA out of memory at micro_batch_size=4")
    assert [r["step"] for r in read_jsonl(found[0] / "metrics.jsonl")] == [0]  # kept what ran
    assert ok["status"] == "completed" and ok["summary"]["steps"] == 3
    md = (sweep_dir / "summary.md").read_text()
    assert "CUDA out of memory at micro_batch_size=4" in md


def test_sweep_where_every_job_fails_exits_1_with_a_summary(tmp_path, data_root):
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=batch_size",
        "trainer.micro_batch_size=1,2",
        "precision=fp16",
        "logger=none",
        check=False,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    found = jobs(sweep_dir)
    assert len(found) == 2
    for job in found.values():
        r = record(job)
        assert r["status"] == "failed" and "fp16" in r["error"]
    assert [r["status"] for r in summary_rows(sweep_dir)] == ["failed", "failed"]


def test_optuna_lr_search_reports_the_best_value_and_groups_wandb_runs(tmp_path, data_root):
    """3 Optuna trials in one process, each its own W&B run (offline), all in the sweep's group."""
    env = {"WANDB_MODE": "offline", "WANDB_API_KEY": "", "NETRC": str(tmp_path / "no-netrc")}
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=lr",
        "hydra.sweeper.n_trials=3",
        "trainer.max_steps=3",
        "trainer.micro_batch_size=4",
        "trainer.eval_tokens=256",
        "logger=wandb",
        env=env,
    )
    assert proc.returncode == 0
    # optuna's own lines are plain where the output is not a terminal (a file, a SLURM log)
    assert "A new study created" in proc.stderr and "\x1b[" not in proc.stderr
    found = jobs(sweep_dir)
    assert sorted(found) == [0, 1, 2]
    records = [record(j) for j in found.values()]
    assert all(r["status"] == "completed" for r in records)
    lrs = [r["config"]["optim"]["lr"] for r in records]
    assert len(set(lrs)) == 3 and all(1e-4 <= lr <= 3e-2 for lr in lrs)

    results = OmegaConf.load(sweep_dir / "optimization_results.yaml")
    best_val = min(r["summary"]["val_loss"] for r in records)
    assert results.best_value == pytest.approx(best_val)
    best_lr = results.best_params["optim.lr"]
    assert best_lr in lrs
    md = (sweep_dir / "summary.md").read_text()
    assert "## Optuna" in md and f"optim.lr={best_lr}" in md and str(results.best_value) in md
    rows = summary_rows(sweep_dir)
    best_row = next(r for r in rows if r["best"] == "True")
    assert float(best_row["optim.lr"]) == pytest.approx(best_lr)  # best = lowest val loss
    assert (sweep_dir / "val_loss.png").read_bytes()[:8] == PNG_MAGIC

    # W&B: one run per job, finished (exit record), all in one group named after the sweep
    groups, ids = set(), set()
    for job, r in zip(found.values(), records):
        files = list((job / "wandb").glob("offline-run-*/run-*.wandb"))
        assert len(files) == 1
        kinds, group = wandb_records(files[0])
        assert "exit" in kinds, "the job's W&B run was not finished"
        groups.add(group)
        ids.add(r["wandb"]["id"])
    assert len(ids) == 3
    assert len(groups) == 1 and groups == {records[0]["config"]["logger"]["group"]}
    assert groups.pop().startswith("lr-")


def wandb_records(path: Path) -> tuple[set[str], str | None]:
    """Record kinds and the run's group in an offline .wandb file (a LevelDB-style log of
    protobuf records: 7-byte file header, 32 KiB blocks, 7-byte record headers)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    pos, pending, kinds, group = 7, b"", set(), None
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if kind == 0:
            break
        pending += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            rec = wandb_internal_pb2.Record()
            rec.ParseFromString(pending)
            pending = b""
            which = rec.WhichOneof("record_type")
            kinds.add(which)
            if which == "run" and rec.run.run_group:
                group = rec.run.run_group
    return kinds, group


def test_joblib_launcher_runs_two_jobs_in_parallel(tmp_path, data_root):
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=batch_size",
        "trainer.micro_batch_size=2,4",
        f"trainer.total_batch_tokens={TOTAL}",
        "trainer.max_steps=2",
        "logger=none",
        "hydra/launcher=joblib",
        "hydra.launcher.n_jobs=2",
    )
    assert "Joblib.Parallel(n_jobs=2" in proc.stdout + proc.stderr
    found = jobs(sweep_dir)
    assert sorted(found) == [0, 1]
    assert all(record(j)["status"] == "completed" for j in found.values())
    assert losses(found[0]) == pytest.approx(losses(found[1]), rel=1e-5)
    assert (sweep_dir / "summary.md").is_file() and (sweep_dir / "sweep.png").is_file()


@pytest.mark.distributed
def test_torchrun_launcher_runs_each_job_as_two_ddp_processes(tmp_path, data_root):
    proc, sweep_dir = sweep(
        tmp_path,
        data_root,
        "+sweep=batch_size",
        "trainer.micro_batch_size=1,3",
        f"trainer.total_batch_tokens={TOTAL}",
        "trainer.max_steps=3",
        "logger=none",
        "hydra/launcher=torchrun",
        "hydra.launcher.nproc_per_node=2",
        "parallel=ddp",
        "parallel.backend=gloo",
    )
    assert proc.returncode == 0
    found = jobs(sweep_dir)
    assert sorted(found) == [0, 1]
    ok = record(found[0])
    # B=1 x 2 ranks: 2 micro-steps per rank (that DDP with accumulation equals one process is
    # tests/test_distributed.py's; here: the launcher gives each job its own two-rank group)
    assert ok["status"] == "completed" and ok["world_size"] == 2 and ok["grad_accum_steps"] == 2
    assert len(losses(found[0])) == 3
    assert (found[0] / "torchrun.log").is_file() and (found[0] / "train_rank1.log").is_file()
    # B=3 x 2 ranks does not divide 128 tokens: every rank exits 2 before writing anything;
    # the launcher writes the failed record from the trainer's one-line error
    bad = record(found[1])
    assert bad["status"] == "failed" and "total_batch_tokens" in bad["error"]
    rows = summary_rows(sweep_dir)
    assert [r["status"] for r in rows] == ["completed", "failed"]


# --------------------------------------------------------------------------------------------
# Helpers (no training)


def hydra_cfg(*overrides: str, num: int = 0):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.job.num = num
    return cfg


@pytest.fixture
def hydra_config_set():
    saved = HydraConfig.instance().cfg
    yield lambda cfg: HydraConfig.instance().set_config(cfg)
    HydraConfig.instance().cfg = saved


def test_job_dirname_puts_swept_keys_first_and_stays_short(hydra_config_set):
    cfg = hydra_cfg(
        "model.n_layer=2",
        "+sweep=batch_size",
        "trainer.micro_batch_size=4",
        "data.source=/some/where/file.txt",
        num=7,
    )
    hydra_config_set(cfg)
    assert job_dirname() == (
        "7_trainer.micro_batch_size=4,data.source=-some-where-file.txt,model.n_layer=2"
    )
    long = [f"model.n_embd={i}" for i in range(40)]
    cfg = hydra_cfg("+sweep=batch_size", "trainer.micro_batch_size=4", *long[-1:], num=3)
    with open_dict(cfg):
        cfg.hydra.overrides.task = ["trainer.micro_batch_size=4", *long]
    hydra_config_set(cfg)
    name = job_dirname()
    assert name.startswith("3_trainer.micro_batch_size=4,") and len(name) <= 2 + 80
    assert name == job_dirname()  # deterministic


def test_failure_reason_names_the_micro_batch_on_out_of_memory():
    cfg = OmegaConf.create({"trainer": {"micro_batch_size": 16}})
    e = torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB\nmore")
    assert failure_reason(cfg, e) == (
        "CUDA out of memory at micro_batch_size=16 (OutOfMemoryError: CUDA out of memory. "
        "Tried to allocate 2.00 GiB)"
    )
    assert failure_reason(cfg, ValueError("bad\nthing")) == "ValueError: bad"


def test_failed_records_minimal_and_updated(tmp_path):
    cfg = OmegaConf.create(
        {
            "experiment": "",
            "trainer": {"micro_batch_size": 2},
            "paths": {"run_dir": str(tmp_path / "a")},
        }
    )
    write_failed_record(
        tmp_path / "a", "ConfigError: nope", resolved_config(cfg), ["trainer.micro_batch_size=2"]
    )
    r = record(tmp_path / "a")
    assert r["status"] == "failed" and r["error"] == "ConfigError: nope"
    assert r["config"]["trainer"]["micro_batch_size"] == 2 and r["config_hash"]
    assert r["overrides"] == ["trainer.micro_batch_size=2"] and r["summary"] is None
    # a record the trainer finished keeps its fields; an OOM gets the clearer reason
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / "record.json").write_text(
        json.dumps(
            {"status": "failed", "error": "OutOfMemoryError: CUDA out of memory.", "n_params": 5}
        )
    )
    cfg.paths.run_dir = str(tmp_path / "b")
    record_failure(cfg, torch.cuda.OutOfMemoryError("CUDA out of memory."))
    r = record(tmp_path / "b")
    assert r["error"].startswith("CUDA out of memory at micro_batch_size=2") and r["n_params"] == 5
    assert math.isinf(FAILED) and FAILED > 0


def test_override_quoting_round_trips_through_hydras_parser():
    path = "/tmp/x/0_trainer.micro_batch_size=1,model.n_embd=32 it's"
    (o,) = OverridesParser.create().parse_overrides([f"hydra.run.dir={quote_override_value(path)}"])
    assert o.value() == path
    cmd = torchrun_command(["a=1"], "/j", nproc_per_node=2)
    assert cmd[-4:] == ["-m", "gpt2x.train", "a=1", "hydra.run.dir=/j"]  # quoted only if needed
    assert "--standalone" in cmd and "--nproc_per_node=2" in cmd
    (o,) = OverridesParser.create().parse_overrides(torchrun_command([], path)[-1:])
    assert o.value() == path


def test_failure_from_torchrun_output():
    assert (
        failure_from_log("x\nerror: trainer.foo=1 is bad\nChildFailedError:\n", 1)
        == "trainer.foo=1 is bad"
    )
    tb = "Traceback (most recent call last):\n  File x\nRuntimeError: boom\n"
    assert failure_from_log(tb, 1) == "RuntimeError: boom"
    assert failure_from_log("", -9) == "killed by SIGKILL"
    assert "signal 9" in failure_from_log("Signal 9 (SIGKILL) received by PID 12", 1)


def test_swept_key_from_multirun_yaml(tmp_path):
    OmegaConf.save(
        OmegaConf.create(
            {
                "hydra": {
                    "sweeper": {"params": {"trainer.micro_batch_size": "1,2"}},
                    "overrides": {"task": ["trainer.micro_batch_size=2,4", "model.n_layer=2"]},
                }
            }
        ),
        tmp_path / "multirun.yaml",
    )
    assert swept_key(tmp_path) == "trainer.micro_batch_size"
    assert swept_key(tmp_path / "nowhere") is None
    # the Optuna sweeper writes no multirun.yaml: a job's .hydra/hydra.yaml names the params
    job = tmp_path / "optuna" / "0_optim.lr=0.001" / ".hydra"
    job.mkdir(parents=True)
    cfg = {"hydra": {"sweeper": {"params": {"optim.lr": "tag(log, interval(1e-4, 3e-2))"}}}}
    OmegaConf.save(OmegaConf.create(cfg), job / "hydra.yaml")
    assert swept_key(tmp_path / "optuna") == "optim.lr"


@pytest.mark.parametrize("ignores_sigterm", [False, True])
def test_stop_process_group_escalates_until_the_group_is_gone(ignores_sigterm):
    """A timed-out job: SIGTERM to its process group, SIGKILL if that is ignored."""
    import subprocess

    code = (
        "import signal, sys, time\n"
        + ("signal.signal(signal.SIGTERM, signal.SIG_IGN)\n" if ignores_sigterm else "")
        + "print('ready', flush=True)\ntime.sleep(120)\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, start_new_session=True
    )
    assert proc.stdout.readline().strip() == "ready"  # the handler is installed
    stop_process_group(proc, ((signal.SIGTERM, 2.0), (signal.SIGKILL, 10.0)))
    expected = signal.SIGKILL if ignores_sigterm else signal.SIGTERM
    assert proc.returncode == -expected
    proc.stdout.close()
    stop_process_group(proc, ((signal.SIGKILL, 1.0),))  # already gone: nothing to do


def test_a_child_is_logged_echoed_and_waited_for(tmp_path, capsys):
    code = "import sys; print('a'); print('b', file=sys.stderr); sys.exit(3)"
    cmd = [sys.executable, "-c", code]
    children = [start(cmd, tmp_path / "c.log", echo="[c] ")]
    ended = watch(children, lambda: children[0].wait(60))
    assert (ended.timed_out, ended.interrupted, children[0].returncode) == (False, None, 3)
    lines = (tmp_path / "c.log").read_text().splitlines()
    assert lines[0] == "$ " + shlex.join(cmd) and sorted(lines[1:]) == ["a", "b"]
    assert sorted(capsys.readouterr().out.splitlines()) == ["[c] a", "[c] b"]


@pytest.mark.parametrize("how", ["timeout", "interrupt", "error"])
def test_however_the_wait_ends_the_child_is_wound_down(tmp_path, how):
    """Past the timeout: SIGTERM; an interrupt of this process: the signal the caller names (the
    trainer records itself as interrupted on SIGINT); any other error: SIGKILL, raised again."""
    children = []

    def wait():
        children.append(start(["sleep", "120"], tmp_path / "c.log"))
        if how == "timeout":
            children[0].wait(0.2)
        raise Interrupted(signal.SIGTERM) if how == "interrupt" else OSError("boom")

    if how == "error":
        with pytest.raises(OSError, match="boom"):
            watch(children, wait)
    else:
        ended = watch(children, wait, on_interrupt=signal.SIGINT)
        assert ended.timed_out == (how == "timeout")
        assert (ended.interrupted.signum if ended.interrupted else None) == (
            signal.SIGTERM if how == "interrupt" else None
        )
    expected = {"timeout": signal.SIGTERM, "interrupt": signal.SIGINT, "error": signal.SIGKILL}
    assert children[0].returncode == -expected[how]


def test_exit_reason_reads_out_of_memory_from_outside():
    assert exit_reason("", -9) == (
        "killed by SIGKILL (out of memory? the kernel's OOM killer sends SIGKILL)"
    )
    log = "Traceback ...\nRuntimeError: DefaultCPUAllocator: can't allocate memory: 4 GB\n"
    assert exit_reason(log, 1, micro_batch_size=16) == (
        "CPU out of memory at micro_batch_size=16 (RuntimeError: DefaultCPUAllocator: can't "
        "allocate memory: 4 GB)"
    )
    assert exit_reason(log, 1) == "RuntimeError: DefaultCPUAllocator: can't allocate memory: 4 GB"
    assert exit_reason("error: trainer.foo=1 is bad\n", 2) == "trainer.foo=1 is bad"


def test_each_job_of_an_in_process_sweep_compiles_afresh():
    """multirun.begin_job resets dynamo: without it, job 2 of a sequential sweep reuses job 1's
    compiled code (and, at a new batch size, recompiles with a dynamic batch dimension), so its
    tokens/s and compile_seconds would not be its own."""
    from gpt2x.training import multirun

    compiles = []

    def backend(gm, example_inputs):
        # a dynamic graph takes its symbolic sizes as inputs too (SymInt, not tensors)
        compiles.append(
            [tuple(t.shape) if isinstance(t, torch.Tensor) else "sym" for t in example_inputs]
        )
        return gm.forward

    fn = torch.compile(lambda x: torch.nn.functional.gelu(x) * 2, backend=backend)
    fn(torch.ones(4, 8))
    fn(torch.ones(4, 8))
    assert len(compiles) == 1  # cached within a job
    fn(torch.ones(6, 8))  # a new batch size in the same process: dynamo goes dynamic
    assert len(compiles) == 2 and "sym" in compiles[1]
    multirun.begin_job()
    fn(torch.ones(6, 8))
    assert len(compiles) == 3 and compiles[-1] == [(6, 8)]  # a fresh, static compile
