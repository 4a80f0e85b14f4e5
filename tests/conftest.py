"""Shared test setup: everything offline, every path under tmp, tiny models."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent

# Tests never talk to W&B's servers or the Hugging Face Hub.
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("WANDB_SILENT", "true")
# CPU tests pin the CPU: one intra-op thread, as every subprocess gets (OMP_NUM_THREADS=1)
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Huge pages for CPU buffers >= 2 MB (trainer.cpu_huge_pages; PyTorch reads this at a process's
# first allocation): the same arithmetic, and the suite's runs ~1.3x faster with them (the tiny
# model's logits are its large buffers). tests/test_allocator.py checks the setting itself.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
# A pytest started in the background (`pytest &` in a script) inherits SIGINT ignored, and so
# would every child it starts: the Ctrl-C tests need Python's own handler here, and the default
# action in the children, as a run started from a terminal has.
if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
    signal.signal(signal.SIGINT, signal.default_int_handler)
# the measured matmul peak (gpt2x.training.peak) is probed once per test session, not read from ~/.cache
os.environ.setdefault("GPT2X_CACHE", tempfile.mkdtemp(prefix="gpt2x-test-cache-"))

# A tiny model and batch: every CLI run in the tests uses these unless it says otherwise.
TINY = [
    "trainer.device=cpu",  # CPU tests stay on the CPU on a GPU machine too (cuda tests: -m cuda)
    "model.n_layer=2",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "trainer.micro_batch_size=4",
    "trainer.eval_tokens=256",  # 8 windows of 32
    "trainer.sample_tokens=4",
    "trainer.warmup_steps_for_timing=1",
    "optim.warmup_steps=2",
]


def pytest_collection_modifyitems(config, items):
    """The quick tier (`python -m pytest -m "not slow"`) leaves out what trains on the prepared
    corpus (the `data_root` fixture: an end-to-end run) and what launches several processes
    (`distributed`); a few others are marked slow where they stand."""
    for item in items:
        if "data_root" in item.fixturenames or item.get_closest_marker("distributed"):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def data_root(tmp_path_factory) -> Path:
    """One prepared-data cache for the whole session (Shakespeare is tokenized once)."""
    return tmp_path_factory.mktemp("data")

# `torchrun --standalone --nproc_per_node=2` as this interpreter runs it (2 gloo ranks on CPU)
TORCHRUN_2 = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]


def run_cli(
    module: str,
    *args: str,
    cwd: Path,
    env: dict | None = None,
    timeout: int = 600,
    check: bool = True,
    new_process: bool = False,
) -> subprocess.CompletedProcess:
    """Run `python -m module args...` the way a user would; returns the finished process.

    In this process (the module run as __main__ with the same argv, working folder and captured
    output: ~4 s of interpreter and torch start-up saved per command), unless the test sets
    `env` (read at import time by some libraries, or a test hook such as a kill) or asks for
    `new_process`, which runs a real `python -m`."""
    if env is None and not new_process:
        proc = _run_in_process(module, list(args), cwd)
    else:
        full_env = {**os.environ, "OMP_NUM_THREADS": "1", **(env or {})}
        proc = subprocess.run(
            [sys.executable, "-m", module, *args],
            cwd=cwd,
            env=full_env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    if check and proc.returncode != 0:
        raise AssertionError(
            f"{module} {' '.join(args)} exited {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}"
            f"\n--- stderr\n{proc.stderr[-4000:]}"
        )
    return proc


def _run_in_process(module: str, args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m module args` inside pytest: exit status from SystemExit (1 and the traceback
    for an uncaught exception, as the interpreter would); logging handlers, argv, the working
    folder, the environment and gpt2x's per-launch run id are restored afterwards."""
    import contextlib
    import io
    import logging
    import runpy
    import traceback

    import gpt2x.config

    out, err = io.StringIO(), io.StringIO()
    root = logging.getLogger()
    handlers, level = list(root.handlers), root.level
    argv, old_cwd, environ = sys.argv, os.getcwd(), dict(os.environ)
    gpt2x.config._RUN_ID = None  # one id per launch, as a new process would draw
    code = 0
    try:
        os.chdir(cwd)
        sys.argv = [module, *args]
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                runpy.run_module(module, run_name="__main__", alter_sys=True)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
                if isinstance(e.code, str):
                    print(e.code, file=sys.stderr)
            except Exception:  # noqa: BLE001 - what an interpreter prints for an uncaught one
                traceback.print_exc()
                code = 1
    finally:
        sys.argv = argv
        os.chdir(old_cwd)
        os.environ.clear()  # what the run exported (e.g. a sweep's GPT2X_RUN_ID) ends with it
        os.environ.update(environ)
        for handler in root.handlers:
            if handler not in handlers:
                with contextlib.suppress(Exception):
                    handler.close()
        root.handlers[:] = handlers
        root.setLevel(level)
        gpt2x.config._RUN_ID = None
    return subprocess.CompletedProcess([module, *args], code, out.getvalue(), err.getvalue())


def cli_train(tmp_path: Path, data_root: Path, *overrides: str, check=True, env=None):
    """`python -m gpt2x.train` on the tiny model in tmp_path/run; returns (process, run folder)."""
    run_dir = tmp_path / "run"
    proc = run_cli(
        "gpt2x.train",
        *TINY,
        f"paths.data_dir={data_root}",
        f"hydra.run.dir={run_dir}",
        *overrides,
        cwd=tmp_path,
        check=check,
        env=env,
    )
    return proc, run_dir


def sigint_when(
    cmd: list[str], cwd: Path, ready: Callable[[], bool], what: str, timeout: float = 240
) -> tuple[int, str]:
    """Start `cmd`, poll until ready() (a file the run writes; never a fixed sleep), send it
    SIGINT (Ctrl-C) and return its exit status and output."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + timeout
        while not ready():
            assert proc.poll() is None and time.monotonic() < deadline, f"{what} never happened"
            time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        stdout, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, stdout


def compose_config(overrides: list[str], run_dir: str | Path = "/tmp/run"):
    """The trainer's config for `overrides`, composed as `python -m gpt2x.train` would (Hydra's
    compose API), its run folder set; the choice of every config group is noted for the
    suite's coverage check (`pytest_sessionfinish`)."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf, open_dict

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs

    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=list(overrides), return_hydra_config=True)
    note_choices(OmegaConf.to_container(cfg.hydra.runtime.choices))
    with open_dict(cfg):
        del cfg["hydra"]
    cfg.paths.run_dir = str(run_dir)
    return cfg


def compose_rung(name: str, *overrides: str) -> dict:
    """An experiment's resolved config as the trainer sees it (tests of the ladder rungs)."""
    from omegaconf import OmegaConf

    cfg = compose_config([f"+experiment={name}", *overrides])
    return OmegaConf.to_container(cfg, resolve=True, enum_to_str=True)


def flatten(d: dict, prefix: str = "") -> dict:
    """{"a": {"b": 1}} -> {"a.b": 1}: configs compared key by key."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def clean_env(**extra: str) -> dict:
    """This process' environment without launcher variables (the test may run under one)."""
    from gpt2x.lab.runner import LAUNCH_ENV

    env = {
        k: v
        for k, v in os.environ.items()
        if k not in LAUNCH_ENV and not k.startswith(("SLURM_", "SUBMITIT_"))
    }
    return {**env, "OMP_NUM_THREADS": "1", **extra}


def tiny_cfg(run_dir: Path, data_root: Path, *overrides: str):
    """The trainer's composed config for the tiny model in `run_dir` (in-process runs)."""
    return compose_config([*TINY, f"paths.data_dir={data_root}", "logger=none", *overrides], run_dir)


def rows(run_dir: Path, name: str = "metrics.jsonl") -> list[dict]:
    """The rows a run folder's jsonl file holds (a cut-off last line ends the read)."""
    from gpt2x.record.folder import read_jsonl

    return read_jsonl(Path(run_dir) / name)


def record(run_dir: Path) -> dict:
    import json

    return json.loads((Path(run_dir) / "record.json").read_text())


def losses(run_dir: Path) -> list[float]:
    return [r["loss"] for r in rows(run_dir)]


def cached_peaks(
    cache_dir: Path, bf16_tflops: float, fp32_tflops: float, threads: int | None = None
) -> Path:
    """A matmul-peak cache (for GPT2X_CACHE) saying what this CPU's bf16 and fp32 matmuls reach,
    for runs with `threads` torch threads (default: this process'). bf16 0.1 and fp32 0.3 is a
    CPU without AMX: precision=auto takes fp32 there, and a bf16 run says fp32 is faster."""
    import json

    import torch

    from gpt2x.training import peak

    real = torch.get_num_threads
    try:
        if threads is not None:
            torch.get_num_threads = lambda: threads
        keys = [peak.cache_key(torch.device("cpu"), dt) for dt in (torch.bfloat16, torch.float32)]
    finally:
        torch.get_num_threads = real
    Path(cache_dir).mkdir(parents=True, exist_ok=True)
    peaks = (bf16_tflops * 1e12, fp32_tflops * 1e12)
    (Path(cache_dir) / "peak_flops.json").write_text(json.dumps(dict(zip(keys, peaks))))
    return Path(cache_dir)


# ---------------------------------------------------------------------------------------------
# coverage: every option of every config group ran somewhere in the suite. Derived from what
# the tests ran, not from a list: the choices of every config composed in a test process
# (compose_config), of every command-line run (its .hydra/hydra.yaml) and of every run record
# (the model/data/precision/... it names, for runs in torchrun workers), all found under the
# session's temporary folder at the end of a whole-suite run.

_BASETEMP: list[Path] = []


@pytest.fixture(scope="session", autouse=True)
def _coverage_folder(tmp_path_factory):
    _BASETEMP.append(tmp_path_factory.getbasetemp())


def note_choices(choices: dict) -> None:
    if _BASETEMP:
        import json
        import uuid

        folder = _BASETEMP[0] / "ran"
        folder.mkdir(exist_ok=True)
        (folder / f"{uuid.uuid4().hex}.json").write_text(json.dumps(choices))


RECORD_KEYS = {  # group -> where a run record names its option
    "model": ("model", "name"),
    "data": ("data", "name"),
    "precision": ("precision", "name"),
    "attn": ("attn", "impl"),
    "loss": ("loss", "impl"),
    "optim": ("optim", "name"),
    "parallel": ("parallel", "kind"),
    "logger": ("logger", "kind"),
}


def ran_choices(root: Path) -> set[tuple[str, str]]:
    """(group, option) of every config the suite composed or ran under `root`."""
    import json

    from omegaconf import OmegaConf

    seen: set[tuple[str, str]] = set()

    def add(choices: dict) -> None:
        for group, option in choices.items():
            if option is None or group.startswith("hydra"):
                continue
            # +experiment=ladder/bf16 is option bf16 of the group experiment/ladder
            sub, _, name = f"{group}/{option}".rpartition("/")
            seen.add((sub, name))

    for f in root.rglob("ran/*.json"):
        add(json.loads(f.read_text()))
    for f in root.rglob(".hydra/hydra.yaml"):
        choices = OmegaConf.select(OmegaConf.load(f), "hydra.runtime.choices")
        add(dict(choices or {}))  # a sweep's own folder has none
    for f in root.rglob("record.json"):
        try:
            rec = json.loads(f.read_text())
        except ValueError:
            continue
        config = rec.get("config") or {}
        for group, (section, key) in RECORD_KEYS.items():
            value = (config.get(section) or {}).get(key)
            if value:
                seen.add((group, str(value)))
        if rec.get("experiment"):
            add({"experiment": rec["experiment"]})
    return seen


def conf_groups() -> dict[str, set[str]]:
    """Every folder of YAML options under conf/ (experiment/ and sweep/ links followed; Hydra's
    own hydra/ group excluded): group path -> option names."""
    from gpt2x import CONF_DIR

    groups: dict[str, set[str]] = {}
    for dirpath, _, files in os.walk(CONF_DIR, followlinks=True):
        rel = Path(dirpath).relative_to(CONF_DIR).as_posix()
        if rel == "." or rel.split("/")[0] == "hydra":
            continue
        yamls = {Path(f).stem for f in files if f.endswith(".yaml")}
        if yamls:
            groups[rel] = yamls
    return groups


def pytest_sessionfinish(session, exitstatus):
    """After a whole-suite run that passed: every option of every group must have run."""
    config = session.config
    if hasattr(config, "workerinput") or exitstatus != 0:
        return  # an xdist worker, or a failed run (its own failures say enough)
    if config.option.keyword or config.option.markexpr or config.args != config.getini("testpaths"):
        return  # a part of the suite: the coverage of a part means nothing
    root = config._tmp_path_factory.getbasetemp()
    seen = ran_choices(root)
    missing = sorted(
        f"{group}={option}"
        for group, options in conf_groups().items()
        for option in options
        if (group, option) not in seen
    )
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if missing:
        reporter.write_line(f"coverage: options that no test ran: {', '.join(missing)}", red=True)
        session.exitstatus = 1
    else:
        reporter.write_line(f"coverage: every option of every config group ran ({len(seen)} seen)")
