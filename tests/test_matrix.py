"""Every option runs: each option of each config group, all pairs of the main axes, every
experiment (every ladder rung with every ladder_shape) and every sweep, end to end on CPU with
the tiny model for a few steps; `--help` lists only real choices.

Single-process runs call `run_training` in this process (as tests/test_train.py does); runs that
need a fresh process (W&B through the environment, the one-line CLI errors, sweeps) are
subprocesses; ddp/fsdp runs share one `torchrun --nproc_per_node=2` launch per batch
(tests/matrix_cases.py runs them one after the other on both ranks). A combination that cannot
work on a CPU must stop with its one-line error: stderr has exactly one "error: ..." line, the
exit status is 2 and the run record is absent or "failed".
"""

from __future__ import annotations

import json
import logging
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from conftest import (
    REPO,
    TINY,
    TORCHRUN_2,
    cached_peaks,
    clean_env,
    cli_train,
    conf_groups,
    losses,
    record,
    run_cli,
)
from hydra import compose, initialize_config_dir
from matrix_cases import (
    AXES,
    compose_job,
    expected_steps,
    pairwise,
    row_id,
    row_overrides,
    uncovered_pairs,
)
from omegaconf import OmegaConf

from gpt2x import CONF_DIR
from gpt2x.config import ConfigError, register_configs, validate
from gpt2x.data import DataError
from gpt2x.record.folder import read_jsonl
from gpt2x.train import run_training

register_configs()

CASES_SCRIPT = Path(__file__).with_name("matrix_cases.py")
HELLASWAG_TINY = REPO / "tests" / "data" / "hellaswag_tiny.jsonl"
NO_NETWORK = {"http_proxy": "http://127.0.0.1:9", "https_proxy": "http://127.0.0.1:9"}


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


# --------------------------------------------------------------------------------------------
# helpers


def run_here(run_dir: Path, data_dir: Path, *overrides: str) -> Path:
    """One run in this process: TINY + the overrides, then run_training; returns the run folder."""
    torch._dynamo.reset()  # a clean compile cache, as each multirun job gets
    run_training(compose_job([*TINY, f"paths.data_dir={data_dir}", *overrides], str(run_dir)))
    return run_dir


def assert_completed(run_dir: Path, steps: int) -> dict:
    rec = record(run_dir)
    assert rec["status"] == "completed", rec["error"]
    rows = read_jsonl(run_dir / "metrics.jsonl")
    assert [r["step"] for r in rows] == list(range(steps))
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rec["summary"]["steps"] == steps
    return rec


def assert_one_line_error(proc: subprocess.CompletedProcess, run_dir: Path, *needles: str) -> str:
    """Exit status 2, exactly one `error: ...` line on stderr holding every needle, no
    traceback, and no record or a failed one. Returns the line."""
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2, f"exit {proc.returncode}\n{proc.stderr[-3000:]}"
    assert len(errors) == 1, proc.stderr[-3000:]
    for needle in needles:
        assert needle in errors[0], errors[0]
    assert "Traceback" not in proc.stderr
    if (run_dir / "record.json").exists():
        assert record(run_dir)["status"] == "failed"
    assert not (run_dir / "metrics.jsonl").exists() or not losses(run_dir)
    return errors[0]


def write_text_corpus(folder: Path, files: int, lines: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for f in range(files):
        path = folder / f"part{f}.txt"
        path.write_text(
            "".join(
                f"Line {i} of part {f}: the quick brown fox {i * 7 + f} jumps over the lazy dog.\n"
                for i in range(lines)
            )
        )
        paths.append(path)
    return paths


# --------------------------------------------------------------------------------------------
# torchrun batches: many 2-rank runs in one launch (tests/matrix_cases.py)

_BATCHES: dict[str, dict] = {}


def torchrun_batch(name: str, jobs: dict[str, list[str]], tmp_path_factory) -> dict:
    """Run every job of the batch once (on first use) under one 2-rank torchrun launch; returns
    {job id: {"ok", "error", "seconds", "run_dir", "log"}}."""
    if name in _BATCHES:
        return _BATCHES[name]
    tmp = tmp_path_factory.mktemp(f"torchrun_{name}")
    listed = [
        {"id": job, "overrides": overrides, "run_dir": str(tmp / re.sub(r"[^\w.=-]", "_", job))}
        for job, overrides in jobs.items()
    ]
    (tmp / "jobs.json").write_text(json.dumps(listed))
    cmd = [
        *TORCHRUN_2,
        str(CASES_SCRIPT),
        str(tmp / "jobs.json"),
        str(tmp / "results.json"),
    ]
    proc = subprocess.run(
        cmd, cwd=tmp, env=clean_env(), capture_output=True, text=True, timeout=900
    )
    log = proc.stdout[-6000:] + "\n--- stderr\n" + proc.stderr[-6000:]
    results = (
        json.loads((tmp / "results.json").read_text()) if (tmp / "results.json").exists() else {}
    )
    out = {}
    for job in listed:
        res = results.get(
            job["id"], {"ok": False, "error": f"not run (torchrun exit {proc.returncode})"}
        )
        out[job["id"]] = {**res, "run_dir": Path(job["run_dir"]), "log": log}
    _BATCHES[name] = out
    return out


def batch_result(batches: dict, name: str, job: str, tmp_path_factory, data_root) -> dict:
    jobs = {k: [*v, f"paths.data_dir={data_root}"] for k, v in batches[name].items()}
    return torchrun_batch(name, jobs, tmp_path_factory)[job]


def assert_ok(res: dict) -> None:
    assert res["ok"], f"{res['error']}\n{res['log']}"


# ============================================================================================
# 1. every option of every config group runs


MODEL_SHAPES = {  # (n_layer, n_head, n_embd, block_size): README + conf/model/*.yaml
    "nano": (4, 4, 256, 256),
    "gpt2": (12, 12, 768, 1024),
    "gpt2-medium": (24, 16, 1024, 1024),
    "gpt2-large": (36, 20, 1280, 1024),
    "gpt2-xl": (48, 25, 1600, 1024),
}


def test_every_model_option_has_a_documented_shape():
    assert set(options("model")) == set(MODEL_SHAPES)


@pytest.mark.parametrize("model", options("model"))
def test_model_option_alone_has_the_documented_shape(model):
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        m = compose("config", overrides=[f"model={model}"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size) == MODEL_SHAPES[model]
    assert m.vocab_size == 50257 and m.name == model


def test_a_model_option_runs_with_the_tiny_shape(tmp_path, data_root):
    """A model option sets the shape only (composed for every option above), and the tiny
    shape replaces it: one run stands for all of them (five would train the same model)."""
    run_dir = run_here(
        tmp_path / "run", data_root, "model=gpt2-xl", "logger=none", "trainer.max_steps=2"
    )
    rec = assert_completed(run_dir, 2)
    assert rec["config"]["model"]["name"] == "gpt2-xl"
    assert rec["config"]["model"]["n_layer"] == 2  # the tiny shape overrides the option's


def test_data_shakespeare_runs(tmp_path, data_root):
    rec = assert_completed(
        run_here(
            tmp_path / "run", data_root, "data=shakespeare", "logger=none", "trainer.max_steps=2"
        ),
        2,
    )
    assert rec["config"]["data"]["name"] == "shakespeare"


@pytest.mark.slow
def test_data_text_runs_on_files_the_test_writes(tmp_path):
    write_text_corpus(tmp_path / "corpus", files=3, lines=300)
    data_dir = tmp_path / "data"
    source = f"{tmp_path}/corpus/*.txt"
    run_dir = run_here(
        tmp_path / "run",
        data_dir,
        "data=text",
        f"data.source={source}",
        "logger=none",
        "trainer.max_steps=2",
    )
    rec = assert_completed(run_dir, 2)
    assert rec["config"]["data"]["source"] == source
    (prepared,) = data_dir.glob("text-*")
    manifest = json.loads((prepared / "manifest.json").read_text())
    assert manifest["totals"]["documents"] >= 3 and manifest["totals"]["tokens"] > 10_000


@pytest.mark.slow
def test_data_tinyshakespeare_without_network_names_the_file_then_runs(tmp_path):
    data_dir = tmp_path / "data"
    proc, run_dir = cli_train(
        tmp_path,
        data_dir,
        "data=tinyshakespeare",
        "logger=none",
        "trainer.max_steps=2",
        env=NO_NETWORK,
        check=False,
    )
    line = assert_one_line_error(proc, run_dir, "could not download", "input.txt")
    dest = Path(re.search(r"put input.txt at (\S+)", line).group(1))
    assert dest == data_dir / "tinyshakespeare" / "input.txt"  # where data.dir says
    dest.write_text(
        "".join(
            f"FIRST CITIZEN:\nSpeak, speak, {i}! We are resolved rather to die.\n\n"
            for i in range(600)
        )
    )
    # a stand-in, not the lecture's file: the pinned data.sha256 rejects it in one line, and
    # with the checksum unpinned it runs
    tiny = ["data=tinyshakespeare", "logger=none", "trainer.max_steps=2"]
    with pytest.raises(DataError, match="data.sha256="):
        run_here(tmp_path / "run2", data_dir, *tiny)
    rec = assert_completed(run_here(tmp_path / "run3", data_dir, *tiny, "data.sha256=''"), 2)
    assert rec["config"]["data"]["name"] == "tinyshakespeare"


@pytest.mark.slow
def test_data_fineweb_edu_not_prepared_is_one_line(tmp_path):
    proc, run_dir = cli_train(
        tmp_path, tmp_path / "data", "data=fineweb_edu", "logger=none", check=False, env=NO_NETWORK
    )
    assert_one_line_error(proc, run_dir, "run python -m gpt2x.prepare data=fineweb_edu first")


@pytest.mark.slow
def test_data_hf_on_a_local_jsonl_after_prepare(tmp_path):
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text(
        "".join(
            json.dumps({"text": f"Document {d}. " + " ".join(f"word{d}x{i}" for i in range(60))})
            + "\n"
            for d in range(400)
        )
    )
    data_dir = tmp_path / "data"
    common = ["data=hf", f"data.source={jsonl}", f"paths.data_dir={data_dir}"]
    with pytest.raises(
        DataError, match=r"run python -m gpt2x.prepare data=hf data.source=\S+ first"
    ):
        run_here(tmp_path / "early", data_dir, *common, "logger=none")
    run_cli("gpt2x.prepare", *common, cwd=tmp_path, env=NO_NETWORK)
    rec = assert_completed(
        run_here(tmp_path / "run", data_dir, *common, "logger=none", "trainer.max_steps=2"), 2
    )
    assert rec["config"]["data"]["name"] == "hf"


@pytest.mark.parametrize("precision", ["fp32", "tf32", "bf16", "auto"])
def test_precision_option_runs(precision, tmp_path, data_root, caplog, monkeypatch):
    # a CPU whose bf16 matmuls are slower than its fp32 ones (no AMX): its cached peaks
    monkeypatch.setenv("GPT2X_CACHE", str(cached_peaks(tmp_path / "cache", 0.1, 0.3)))
    with caplog.at_level(logging.INFO):
        run_dir = run_here(
            tmp_path / "run",
            data_root,
            f"precision={precision}",
            "logger=none",
            "trainer.max_steps=2",
        )
    rec = assert_completed(run_dir, 2)
    assert rec["config"]["precision"]["name"] == precision
    # auto took fp32 there, and the record says what ran, never "auto"
    expected = {"fp32": "fp32", "tf32": "fp32", "bf16": "bf16", "auto": "fp32"}[precision]
    assert rec["config"]["precision"]["dtype"] == expected
    chose = [r.getMessage() for r in caplog.records if r.getMessage().startswith("precision=auto")]
    assert chose == (
        ["precision=auto: fp32 (measured matmul peaks: bf16 0.10, fp32 0.30 TFLOP/s)"]
        if precision == "auto" else []
    )
    no_op = [r.getMessage() for r in caplog.records if "no-op on cpu" in r.getMessage()]
    # tf32 says it is a no-op; bf16 (which keeps tf32=true for its fp32 matmuls) does not
    assert len(no_op) == (precision == "tf32")
    assert rec["paths_taken"]["tf32"] is False
    # bf16 there says which precision is faster, in one line; fp32 and tf32 say nothing
    hints = [r.getMessage() for r in caplog.records if "is likely faster here" in r.getMessage()]
    assert hints == (
        ["bf16 matmuls on this CPU reach 0.10 TFLOP/s, fp32 ones 0.30 (measured): "
         "precision=fp32 is likely faster here"] if precision == "bf16" else []
    )


@pytest.mark.parametrize(
    ("precision", "needle"), [("fp16", "needs CUDA"), ("fp8", "not available on cpu")]
)
def test_precision_that_cannot_run_on_cpu_is_one_line(precision, needle, tmp_path, data_root):
    proc, run_dir = cli_train(
        tmp_path, data_root, f"precision={precision}", "logger=none", check=False
    )
    assert_one_line_error(proc, run_dir, f"precision={precision}", needle)


@pytest.mark.parametrize(
    ("group", "option", "taken"),
    [
        ("attn", "naive", ("attention", "naive")),
        ("attn", "sdpa", ("attention", "sdpa")),
        ("attn", "flash", ("attention", "flash")),
        ("optim", "adamw", ("optimizer", "adamw")),
        ("optim", "muon", ("optimizer", "muon")),
        ("loss", "plain", ("loss", "plain")),
        ("loss", "chunked", ("loss", "chunked")),
        ("parallel", "single", None),
        ("logger", "none", None),
        ("trainer", "default", None),
    ],
    ids=lambda v: v if isinstance(v, str) else None,
)
def test_option_runs_and_takes_its_path(group, option, taken, tmp_path, data_root):
    extra = [] if group == "logger" else ["logger=none"]
    rec = assert_completed(
        run_here(tmp_path / "run", data_root, f"{group}={option}", *extra, "trainer.max_steps=2"), 2
    )
    if taken:
        assert rec["paths_taken"][taken[0]] == taken[1]
    assert rec["world_size"] == 1
    assert rec["wandb"] is None and not (tmp_path / "run" / "wandb").exists()


# logger=wandb offline (the steps in its run file) and WANDB_MODE=disabled from the environment:
# tests/test_train.py


def test_logger_wandb_mode_disabled_writes_no_wandb_folder(tmp_path, data_root):
    run_dir = run_here(
        tmp_path / "run", data_root, "logger=wandb", "logger.mode=disabled", "trainer.max_steps=2"
    )
    rec = assert_completed(run_dir, 2)
    assert rec["wandb"] is None and not (run_dir / "wandb").exists()


def test_debug_fast_dev_run(tmp_path, data_root):
    rec = assert_completed(run_here(tmp_path / "run", data_root, "debug=fast_dev_run"), 3)
    assert rec["config"]["logger"]["kind"] == "none"
    assert (
        math.isfinite(rec["summary"]["val_loss"]) and (tmp_path / "run" / "sample.txt").read_text()
    )


def test_debug_overfit_batch_with_fewer_steps(tmp_path, data_root):
    run_dir = run_here(tmp_path / "run", data_root, "debug=overfit_batch", "trainer.max_steps=8")
    rec = assert_completed(run_dir, 8)
    assert rec["config"]["trainer"]["overfit_one_batch"] is True
    curve = losses(run_dir)
    assert curve[-1] < curve[0] - 0.1, curve  # one batch over and over: the loss falls


def test_debug_profiler_writes_a_trace(tmp_path, data_root):
    run_dir = run_here(tmp_path / "run", data_root, "debug=profiler")
    assert_completed(run_dir, 8)
    traces = list((run_dir / "profile").glob("*.json"))
    assert len(traces) == 1 and "traceEvents" in json.loads(traces[0].read_text())


COMPILE_CASES = [
    pytest.param(["compile=false"], None, id="compile=false"),
    pytest.param(["compile=true"], "model/default", id="compile=true"),
    pytest.param(
        ["compile=true", "compile_scope=block"], "block/default", id="compile_scope=block"
    ),
    pytest.param(
        ["compile=true", "compile_mode=reduce-overhead"],
        "model/reduce-overhead",
        id="compile_mode=reduce-overhead",
    ),
    # compile_mode=max-autotune runs as the ladder/beyond/max_autotune experiment below (it
    # compiles for ~1.5 min on this CPU: once is enough)
]


def test_compile_cases_cover_every_scope_and_mode():
    taken = {p.values[1] for p in COMPILE_CASES if p.values[1]}
    assert {t.split("/")[0] for t in taken} == {"model", "block"}
    modes = {t.split("/")[1] for t in taken}
    beyond = {
        str(OmegaConf.load(f).get("compile_mode"))
        for f in (REPO / "experiments/ladder/beyond").glob("*.yaml")
    }
    assert modes | beyond >= {"default", "reduce-overhead", "max-autotune"}


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "taken"), COMPILE_CASES)
def test_compile_option_runs(overrides, taken, tmp_path, data_root):
    rec = assert_completed(
        run_here(tmp_path / "run", data_root, *overrides, "logger=none", "trainer.max_steps=2"), 2
    )
    assert rec["paths_taken"]["compile"] == taken
    assert (rec["compile_seconds"] is None) == (taken is None)
    assert math.isfinite(rec["summary"]["val_loss"])


def test_compile_mode_is_torchs_own_spelling():
    """compile_mode=max-autotune, as torch.compile spells it; anything else is one line."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=["compile_mode=max_autotune"])
    with pytest.raises(ConfigError, match="compile_mode='max_autotune' is not a torch.compile mode"):
        validate(cfg)


# ============================================================================================
# 2. all pairs of the main axes

ROWS = pairwise(AXES)
SINGLE_ROWS = [r for r in ROWS if r["parallel"] == "single"]
DIST_ROWS = [r for r in ROWS if r["parallel"] != "single"]

BATCHES = {
    "matrix": {
        **{row_id(r): [*TINY, *row_overrides(r)] for r in DIST_ROWS},
    },
}


def test_pairwise_array_covers_every_pair_and_is_small():
    assert uncovered_pairs(ROWS, AXES) == set()
    sizes = sorted(len(v) for v in AXES.values())
    assert sizes[-1] * sizes[-2] <= len(ROWS) <= 16  # the pairwise lower bound .. small
    # the check can fail: without the last row (added for a pair still open) some pair is
    assert uncovered_pairs(ROWS[:-1], AXES)
    assert len({row_id(r) for r in ROWS}) == len(ROWS)


def test_pairwise_generator_on_a_known_case():
    factors = {"a": [0, 1], "b": [0, 1], "c": [0, 1]}
    rows = pairwise(factors)
    assert uncovered_pairs(rows, factors) == set() and len(rows) == 4  # the optimum for 2^3


def check_row(run_dir: Path, row: dict, world_size: int) -> None:
    rec = assert_completed(run_dir, expected_steps(row))
    cfg = rec["config"]
    assert cfg["precision"]["name"] == row["precision"]
    assert cfg["attn"]["impl"] == row["attn"] == rec["paths_taken"]["attention"]
    assert cfg["compile"] is (row["compile"] == "true")
    assert (rec["paths_taken"]["compile"] is not None) is (row["compile"] == "true")
    assert (rec["compile_seconds"] is not None) is (row["compile"] == "true")
    assert cfg["parallel"]["kind"] == row["parallel"] and rec["world_size"] == world_size
    # MATRIX_BATCH: 2 micro-steps on one process, one per rank on two (DDP and FSDP alike)
    assert rec["tokens_per_step"] == 256 and rec["grad_accum_steps"] == 2 // world_size
    if row["logger"] == "wandb-offline":
        assert rec["wandb"]["mode"] == "offline" and (run_dir / "wandb").is_dir()
    else:
        assert rec["wandb"] is None and not (run_dir / "wandb").exists()
    if row["debug"] == "profiler":
        assert list((run_dir / "profile").glob("*.json")), "no profiler trace"
    if row["debug"] == "overfit_batch":
        assert cfg["trainer"]["overfit_one_batch"] is True
        curve = losses(run_dir)
        assert curve[-1] < curve[0], curve
    if row["debug"] == "fast_dev_run":
        assert (run_dir / "sample.txt").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("row", SINGLE_ROWS, ids=row_id)
def test_pairwise_row_single_process(row, tmp_path, data_root):
    check_row(run_here(tmp_path / "run", data_root, *row_overrides(row)), row, world_size=1)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("row", DIST_ROWS, ids=row_id)
def test_pairwise_row_two_ranks(row, tmp_path_factory, data_root):
    res = batch_result(BATCHES, "matrix", row_id(row), tmp_path_factory, data_root)
    assert_ok(res)
    check_row(res["run_dir"], row, world_size=2)


# ============================================================================================
# 3. every experiment (every ladder rung x every ladder_shape) and every sweep


def experiment_names() -> list[str]:
    root = REPO / "experiments"
    return sorted(str(p.relative_to(root).with_suffix("")) for p in root.rglob("*.yaml"))


def experiment_case(name: str, shape: str | None) -> dict:
    """The overrides of one experiment run (tiny model, 2 steps) and what to expect of it,
    decided from the composed experiment: distributed or not, fp8 (its one-line error), and
    what cannot run offline on a CPU in 2 steps (a big corpus, the HellaSwag download, a batch
    of 2**19 tokens) replaced by a small stand-in."""
    base = [*TINY, f"+experiment={name}", *([f"ladder_shape={shape}"] if shape else [])]
    base += ["trainer.seq_len=32", "trainer.max_steps=2"]
    case = {"overrides": base, "distributed": False, "error": None, "stand_ins": []}
    try:
        with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
            cfg = compose("config", overrides=base)
    except Exception:  # noqa: BLE001 - the test itself reports the composition error
        return case
    t = cfg.trainer
    if cfg.data.name in ("fineweb_edu", "hf"):
        case["stand_ins"].append("data=shakespeare")  # prepared by the network only
    if t.hellaswag_every > 0 and not t.hellaswag_path:
        case["stand_ins"].append(f"trainer.hellaswag_path={HELLASWAG_TINY}")  # not downloaded
    if OmegaConf.select(cfg, "trainer.total_batch_tokens") > 4096:
        case["stand_ins"].append("trainer.total_batch_tokens=512")  # 2 micro-steps per rank
    case["distributed"] = cfg.parallel.kind.value != "single"
    if cfg.compile and (name.startswith("reproduce/") or case["distributed"]):
        # compile is covered by the single-process ladder rungs, under DDP by the pairwise
        # 2-rank rows, under FSDP by tests/test_distributed.py's compile test
        case["stand_ins"].append("compile=false")
    case["overrides"] = [*base, *case["stand_ins"]]
    if cfg.precision.float8:
        case["error"] = "not available on cpu"
    return case


SHAPES = options("ladder_shape")
# every rung with the default shape; the other shapes with the first rung (after the tiny-model
# override the shapes run the same model: running every rung twice would only double the time;
# every rung x shape composes in tests/test_ablate.py and tests/test_beyond.py)
EXPERIMENTS = {
    f"{name}@{shape}" if shape else name: experiment_case(name, shape)
    for name in experiment_names()
    for shape in (
        (SHAPES if name == "ladder/fp32" else ["nano_cpu"]) if name.startswith("ladder/") else [None]
    )
}
SINGLE_EXPERIMENTS = [k for k, c in EXPERIMENTS.items() if not c["distributed"]]
DIST_EXPERIMENTS = [k for k, c in EXPERIMENTS.items() if c["distributed"]]
# the distributed experiments join the matrix's 2-rank jobs: one torchrun launch for all
BATCHES["matrix"].update({k: EXPERIMENTS[k]["overrides"] for k in DIST_EXPERIMENTS})


def check_experiment(key: str, run_dir: Path) -> None:
    rec = assert_completed(run_dir, 2)
    name, _, shape = key.partition("@")
    assert rec["experiment"] == name
    if shape:
        assert shape in rec["config"]["logger"]["tags"], "the ladder_shape choice did not apply"


def test_every_ladder_rung_and_every_shape_is_run():
    rungs = sorted(
        str(p.relative_to(REPO / "experiments").with_suffix(""))
        for p in (REPO / "experiments/ladder").rglob("*.yaml")
    )
    assert rungs and SHAPES
    for rung in rungs:
        assert f"{rung}@nano_cpu" in EXPERIMENTS
    for shape in SHAPES:
        assert f"ladder/fp32@{shape}" in EXPERIMENTS


@pytest.mark.slow
@pytest.mark.parametrize("key", SINGLE_EXPERIMENTS)
def test_experiment_runs(key, tmp_path, data_root):
    case = EXPERIMENTS[key]
    if case["error"]:
        with pytest.raises(ConfigError, match=case["error"]):
            run_here(tmp_path / "run", data_root, *case["overrides"][len(TINY) :])
        return
    check_experiment(key, run_here(tmp_path / "run", data_root, *case["overrides"][len(TINY) :]))


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("key", DIST_EXPERIMENTS)
def test_distributed_experiment_runs_on_two_ranks(key, tmp_path_factory, data_root):
    res = batch_result(BATCHES, "matrix", key, tmp_path_factory, data_root)
    if EXPERIMENTS[key]["error"]:
        assert not res["ok"] and EXPERIMENTS[key]["error"] in res["error"], res["error"]
        return
    assert_ok(res)
    check_experiment(key, res["run_dir"])
    assert record(res["run_dir"])["world_size"] == 2


# run by the docs' sweep journey (tests/test_docs.py) and the Optuna test (tests/test_sweep.py)
SWEEPS_RUN_ELSEWHERE = {"batch_size", "lr"}


def sweep_names() -> list[str]:
    return sorted(
        p.stem for p in (REPO / "sweeps").glob("*.yaml") if p.stem not in SWEEPS_RUN_ELSEWHERE
    )


def sweep_overrides(name: str) -> tuple[list[str], int]:
    """The sweep's own parameters cut to one or two values on the tiny model; (overrides, jobs)."""
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=[f"+sweep={name}"], return_hydra_config=True)
    params = dict(cfg.hydra.sweeper.params)
    tiny = [
        o for o in TINY if not o.startswith(("trainer.micro_batch_size=", "trainer.eval_tokens="))
    ]
    out, jobs = [*tiny, "trainer.max_steps=2", "logger=none"], 1
    if "optuna" in str(cfg.hydra.sweeper.get("_target_", "")):
        out += ["hydra.sweeper.n_trials=2", "trainer.micro_batch_size=4", "trainer.eval_tokens=256"]
        return out, 2
    for key, values in params.items():
        if key == "trainer.micro_batch_size":
            # two micro batches; a step of 2 x 4 x T tokens, not the sweep's 64 x T
            out += [f"{key}=2,4", "trainer.total_batch_tokens=256"]  # T = 32
            jobs *= 2
        else:
            out.append(f"{key}={str(values).split(',')[0]}")
    if "trainer.micro_batch_size" not in params:
        out.append("trainer.micro_batch_size=4")
    return out, jobs


@pytest.mark.slow
@pytest.mark.parametrize("name", sweep_names())
def test_sweep_runs(name, tmp_path, data_root):
    overrides, n_jobs = sweep_overrides(name)
    out = tmp_path / "out"
    proc = run_cli(
        "gpt2x.train",
        "-m",
        f"+sweep={name}",
        *overrides,
        f"paths.data_dir={data_root}",
        f"paths.output_dir={out}",
        f"hydra.sweep.dir={out / 'sweep'}",
        cwd=tmp_path,
    )
    assert proc.returncode == 0
    job_dirs = sorted(p for p in (out / "sweep").iterdir() if p.is_dir() and p.name[0].isdigit())
    assert len(job_dirs) == n_jobs, job_dirs
    for job in job_dirs:
        assert_completed(job, 2)
    assert (out / "sweep" / "summary.md").exists()


# ============================================================================================
# 4. --help lists only real choices


def test_help_lists_every_group_with_exactly_its_options(tmp_path):
    proc = run_cli("gpt2x.train", "--help", cwd=tmp_path)
    assert "_schema" not in proc.stdout
    section = proc.stdout.split("== Config groups (group=option) ==", 1)[1].split("\n\n", 1)[0]
    listed = {}
    for line in section.splitlines():
        m = re.fullmatch(r"(\S+): (.+)", line.strip())
        if m:
            listed[m.group(1)] = set(m.group(2).split(", "))
    expected = conf_groups()
    assert {
        "model",
        "data",
        "precision",
        "attn",
        "optim",
        "loss",
        "parallel",
        "logger",
        "debug",
    } <= set(expected)
    assert listed == expected
