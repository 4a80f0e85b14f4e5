"""Every command in README.md and docs/*.md runs in a test, as a user types it.

`doc_commands()` reads the ```bash blocks of the docs. `HOW` says how each command is tested:
run here (shrunk by overrides to the tiny model, a few steps, local data), run inside one of
the journeys below (train -> kill -> resume -> sample -> export -> transformers; ablate ->
report -> W&B report -> the same table again; sweep -> summary), run by a named test elsewhere,
or - what needs a GPU, the network or a SLURM cluster - composed and validated the way the
trainer does before its first step. A command added to the docs without an entry here, or an
entry whose command left the docs, fails `test_every_doc_command_is_tested`.
"""

from __future__ import annotations

import json
import re
import shlex
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import REPO, TINY, record, rows, run_cli

from gpt2x.checkpoint import load_model

DOCS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
HELLASWAG = REPO / "tests" / "data" / "hellaswag_tiny.jsonl"


def doc_commands() -> list[str]:
    """Each command line of the docs' ```bash blocks: continuation lines joined, comments and
    blank lines dropped, whitespace normalised."""
    out: list[str] = []
    for path in DOCS:
        fence, pending = None, ""
        for line in path.read_text().splitlines():
            m = re.match(r"^\s*```(\w*)", line)
            if m:
                fence = m.group(1) if fence is None else None
                continue
            if fence not in ("bash", "sh", "shell"):
                continue
            text = f"{pending} {line.strip()}".strip() if pending else line.strip()
            pending = ""
            if text.endswith("\\"):
                pending = text[:-1].rstrip()
                continue
            code = re.split(r"\s+#\s", f" {text}", maxsplit=1)[0].strip()
            if code and not code.startswith("#"):
                out.append(" ".join(code.split()))
    return out


@dataclass(frozen=True)
class Run:
    """Run here by test_run_doc_command: the command plus `extra` (the shrink), in a fresh
    folder; `expect` must appear in its output."""

    extra: tuple[str, ...] = ()
    expect: str = ""


@dataclass(frozen=True)
class Journey:
    name: str  # run by test_journey_<name> below


@dataclass(frozen=True)
class Covered:
    test: str  # "tests/test_x.py::test_name": run there (the same command, shrunk)


@dataclass(frozen=True)
class Compose:
    """Needs what this machine lacks (a GPU's memory, the network, a cluster): composed with
    the command's own overrides and checked with gpt2x.config.validate for `world_size`
    ranks, the trainer's first step before any compute."""

    why: str
    world_size: int = 1


@dataclass(frozen=True)
class Shell:
    why: str  # not a gpt2x command (an install, a shell variable, this suite)


SHRINK = (*TINY, "trainer.max_steps=2", "logger=none")
GPU = "a GPU's memory (GPT-2 124M at the lecture's batch)"

HOW: dict[str, object] = {
    # README.md
    'pip install -e ".[dev]" && python -m gpt2x.train': Journey("train"),
    "python -m pytest": Shell("this suite"),
    "python -m gpt2x.train model=gpt2 precision=bf16 attn=flash compile=true": Run(
        ("trainer.max_steps=3",), "attn=flash | loss=plain | compile=True"
    ),
    "python -m gpt2x.train --help": Run((), "+experiment="),
    "python -m gpt2x.train model=gpt2 --cfg job": Run((), "n_layer: 12"),
    "python -m gpt2x.train debug=fast_dev_run": Run(),
    "python -m gpt2x.ablate ladder=nano_cpu": Journey("ablate"),
    "python -m gpt2x.ablate ladder=gpt2_124m repeats=3": Compose(GPU),
    "python -m gpt2x.report outputs/ablations/<folder>": Journey("ablate"),
    "bash benchmarks/gpu/check.sh --out DIR": Covered("tests/test_gpu_check.py"),
    "bash benchmarks/gpu/check.sh --part beyond --out DIR": Covered("tests/test_gpu_check.py"),
    "python -m gpt2x.prepare data=fineweb_edu": Journey("pretrained"),
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train +experiment=reproduce/gpt2_124m": (
        Compose(GPU, world_size=8)
    ),
    "python -m gpt2x.report outputs/runs/<run> --figure": Covered(
        "tests/test_reproduce.py::test_rehearsal_end_to_end_with_resume_and_figure"
    ),
    "python -m gpt2x.train +experiment=reproduce/rehearsal": Covered(
        "tests/test_reproduce.py::test_rehearsal_end_to_end_with_resume_and_figure"
    ),
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train parallel=ddp model=gpt2 "
    "trainer.total_batch_tokens=524288": Compose(GPU, world_size=8),
    "python -m gpt2x.train -m +sweep=batch_size": Journey("sweep"),
    "python -m gpt2x.train -m +sweep=lr": Covered(
        "tests/test_sweep.py::test_optuna_lr_search_reports_the_best_value_and_groups_wandb_runs"
    ),
    "python -m gpt2x.train trainer.checkpoint_every=100 hydra.run.dir=outputs/runs/my-run": (
        Journey("train")
    ),
    "python -m gpt2x.train hydra.run.dir=outputs/runs/my-run trainer.resume=auto": Journey("train"),
    "torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m gpt2x.train parallel=ddp "
    "trainer.checkpoint_every=500 trainer.resume=auto": Covered(
        "tests/test_checkpoint.py::test_ddp_preempted_worker_checkpoints_and_relaunch_continues_the_same_training"
    ),
    'python -m gpt2x.sample checkpoint=outputs/runs/my-run prompt="To be"': Journey("train"),
    "python -m gpt2x.export checkpoint=outputs/runs/my-run out=hf_dir": Journey("train"),
    "python -m gpt2x.evaluate checkpoint=outputs/runs/my-run hellaswag=true": Journey("train"),
    "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true data_dir=<prepared fineweb_edu>": (
        Journey("pretrained")
    ),
    "python -m gpt2x.report outputs/runs/run-a outputs/runs/run-b --out compare/": Journey("train"),
    # docs/beyond.md
    "python -m gpt2x.ablate ladder=beyond_cpu": Covered(
        "tests/test_beyond.py::test_fp8_is_na_on_cpu_and_muon_trains_through_ablate"
    ),
    "python -m gpt2x.ablate ladder=beyond_gpt2_124m": Compose(GPU),
    "python -m gpt2x.ablate ladder=beyond_cpu repeats=3": Compose("9 min x 3 on this CPU"),
    # every experiment runs there, shrunk (test_experiment_runs[cpu_fast])
    "python -m gpt2x.train +experiment=cpu_fast": Covered("tests/test_matrix.py::test_experiment_runs"),
    # docs/checkpoints.md
    "python -m gpt2x.train <same overrides> hydra.run.dir=<run_dir> trainer.resume=auto": Journey(
        "train"
    ),
    "python -m gpt2x.train <same overrides> trainer.resume=<run_dir>/checkpoints/step_000100": (
        Journey("train")
    ),
    "python -m gpt2x.train <overrides> trainer.resume=auto": Journey("train"),
    'python -m gpt2x.sample checkpoint=<path> prompt="ROMEO:" max_new_tokens=100 temperature=0.8 '
    "top_k=50 seed=1 num_samples=3 [device=auto] [precision=fp32|bf16|fp16]": Journey("train"),
    "python -m gpt2x.export checkpoint=<path> out=<dir> [vocab_size=50257]": Journey("train"),
    "python -m gpt2x.evaluate checkpoint=<path> [hellaswag=true] [hellaswag_path=...] "
    "[hellaswag_limit=N] [eval_tokens=N] [micro_batch_size=N] [data_dir=...] "
    "[precision=fp32|bf16] [val=false]": Journey("train"),
    "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true "
    "data_dir=~/.cache/gpt2x/data/fineweb_edu": Journey("pretrained"),
    # docs/data.md
    "python -m gpt2x.prepare data=hf data.source='/data/*.jsonl' data.num_workers=4": Journey(
        "pretrained"
    ),
    "python -m gpt2x.prepare data=text data.source='/books/*.txt'": Run(),
    # docs/distributed.md
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train parallel=ddp model=gpt2 "
    "precision=bf16 attn=flash compile=true trainer.micro_batch_size=16 trainer.seq_len=1024 "
    "trainer.total_batch_tokens=524288": Compose(GPU, world_size=8),
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train parallel=fsdp model=gpt2 "
    "precision=bf16 trainer.micro_batch_size=16 trainer.seq_len=1024 "
    "trainer.total_batch_tokens=524288": Compose(GPU, world_size=8),
    "OMP_NUM_THREADS=1 torchrun --standalone --nproc_per_node=2 -m gpt2x.train parallel=ddp "
    "trainer.device=cpu trainer.total_batch_tokens=4096": Covered(
        "tests/test_distributed.py::test_ddp_two_ranks_match_one_process_with_accumulation"
    ),
    "export GPT2X_RUN_ID=gpt2-2x8-$(date +%Y%m%d)": Shell("a shell variable"),
    "torchrun --nnodes=2 --nproc_per_node=8 --rdzv_backend=c10d "
    "--rdzv_endpoint=node0.cluster:29500 --rdzv_id=gpt2-2x8 -m gpt2x.train parallel=ddp "
    "model=gpt2 precision=bf16 attn=flash compile=true trainer.micro_batch_size=16 "
    "trainer.seq_len=1024 trainer.total_batch_tokens=524288": Compose(
        "two nodes of 8 GPUs", world_size=16
    ),
    "pip install hydra-submitit-launcher": Shell("an install"),
    "python -m gpt2x.train -m hydra/launcher=slurm_1node_8gpu hydra.launcher.partition=gpu "
    "hydra.launcher.account=myaccount parallel=ddp model=gpt2 precision=bf16 attn=flash "
    "compile=true trainer.micro_batch_size=16 trainer.seq_len=1024 "
    "trainer.total_batch_tokens=524288": Covered(
        "tests/test_distributed.py::test_submitit_local_launcher_runs_two_task_ddp"
    ),
    "srun --kill-on-bad-exit=1 python -m gpt2x.train parallel=ddp model=gpt2 precision=bf16 "
    "trainer.micro_batch_size=16 trainer.seq_len=1024 trainer.total_batch_tokens=524288": Covered(
        "tests/test_distributed.py::test_srun_style_launch_maps_slurm_variables"
    ),
    'head=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)': Shell("a shell variable"),
    "export GPT2X_RUN_ID=slurm-$SLURM_JOB_ID": Shell("a shell variable"),
    'srun --kill-on-bad-exit=1 torchrun --nnodes="$SLURM_NNODES" --nproc_per_node=8 '
    '--rdzv_backend=c10d --rdzv_endpoint="$head:29500" --rdzv_id="$SLURM_JOB_ID" -m gpt2x.train '
    "parallel=fsdp model=gpt2 precision=bf16 trainer.total_batch_tokens=524288": Compose(
        "a SLURM cluster of 2 x 8 GPUs", world_size=16
    ),
    # docs/ladder.md
    "python -m gpt2x.ablate ladder=gpt2_124m": Compose(GPU),
    "python -m gpt2x.ablate ladder=gpt2_124m repeats=5 -- trainer.micro_batch_size=32": Compose(GPU),
    "python -m gpt2x.ablate ladder=nano_cpu dry_run=true": Journey("ablate"),
    "python -m gpt2x.train +experiment=ladder/bf16": Run(("trainer.seq_len=32",)),
    "python -m gpt2x.train +experiment=ladder/bf16 ladder_shape=gpt2_124m": Compose(GPU),
    "torchrun --standalone --nproc_per_node=2 -m gpt2x.train +experiment=ladder/ddp": Covered(
        "tests/test_matrix.py::test_distributed_experiment_runs_on_two_ranks"
    ),
    "python -m gpt2x.train +experiment=ladder/bf16 logger.group=<folder> "
    "trainer.warmup_steps_for_timing=3 trainer.breakdown_steps=1 trainer.max_steps=12 repeat=0 "
    "ladder_shape=nano_cpu <overrides> hydra.run.dir=<out>/03_bf16": Journey("ablate"),
    # docs/report.md
    "python -m gpt2x.report outputs/runs/a outputs/runs/b --out reports/ab": Journey("train"),
    "python -m gpt2x.report outputs/multirun/<sweep_id> --x trainer.micro_batch_size "
    "--basename summary": Journey("sweep"),
    "python -m gpt2x.report outputs/ablations/<folder> --wandb --entity me": Journey("ablate"),
    # docs/reproduce.md
    "torchrun --standalone --nproc_per_node=8 --max-restarts=3 -m gpt2x.train "
    "+experiment=reproduce/gpt2_124m": Compose(
        GPU, world_size=8
    ),
    "python -m gpt2x.train +experiment=reproduce/gpt2_124m": Compose(GPU),
    "python -m gpt2x.train +experiment=reproduce/gpt2_124m trainer.micro_batch_size=16": Compose(
        GPU
    ),
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train +experiment=reproduce/gpt2_124m_40b": (
        Compose(GPU, world_size=8)
    ),
    "torchrun --standalone --nproc_per_node=8 -m gpt2x.train +experiment=reproduce/gpt2_350m": (
        Compose(GPU, world_size=8)
    ),
    "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true "
    "data_dir=<prepared fineweb_edu folder>": Journey("pretrained"),
    # docs/sweeps.md
    "python -m gpt2x.train -m +sweep=batch_size trainer.micro_batch_size=2,4": Journey("sweep"),
    "python -m gpt2x.train -m +sweep=batch_size_gpu": Compose(GPU),
    "python -m gpt2x.sweep outputs/multirun/<sweep_id>": Journey("sweep"),
}


def test_every_doc_command_is_tested():
    commands = set(doc_commands())
    missing = sorted(commands - HOW.keys())
    stale = sorted(HOW.keys() - commands)
    assert not missing, f"doc commands without a test (add them to HOW): {missing}"
    assert not stale, f"HOW entries whose command is no longer in the docs: {stale}"
    for how in HOW.values():
        if isinstance(how, Covered):
            path, _, name = how.test.partition("::")
            text = (REPO / path).read_text()
            assert not name or f"def {name}(" in text, f"{how.test} does not exist"


def doc(command: str) -> list[str]:
    """A command of the docs (checked to be there) as the shell splits it, its placeholders
    (`<...>`) kept for the caller to fill and its optional `[...]` parts dropped."""
    assert command in HOW, command
    joined = re.sub(r"<([^<>]*)>", lambda m: "<" + m.group(1).replace(" ", "_") + ">", command)
    return [a for a in shlex.split(joined) if not (a.startswith("[") and a.endswith("]"))]


def gpt2x(argv: list[str], *extra: str, cwd: Path, check: bool = True, **fill: str):
    """Run `python -m gpt2x.<tool> ...` from the docs: placeholders `<name>` filled from
    `fill` (spaces in a name are _), the shrink appended."""
    args = []
    for a in argv:
        for key, value in fill.items():
            a = a.replace(f"<{key}>", value)
        assert "<" not in a, f"unfilled placeholder in {a}"
        args.append(a)
    assert args[:2] == ["python", "-m"], args
    return run_cli(args[2], *args[3:], *extra, cwd=cwd, check=check)


# ---------------------------------------------------------------------------------------------
# commands run on their own


RUNS = sorted(c for c, how in HOW.items() if isinstance(how, Run))


@pytest.mark.parametrize("command", RUNS)
def test_run_doc_command(command, tmp_path, data_root):
    how = HOW[command]
    argv = doc(command)
    extra = list(how.extra)
    if "gpt2x.train" in argv and "--help" not in argv and "--cfg" not in argv:
        extra = [*SHRINK, f"paths.data_dir={data_root}", *extra]
    if "gpt2x.prepare" in argv:  # the corpus: files this test writes where the docs say /books
        (tmp_path / "books").mkdir()
        (tmp_path / "books" / "a.txt").write_text("To be, or not to be, that is the question.\n" * 50)
        argv = [a.replace("/books/", f"{tmp_path}/books/") for a in argv]
        extra = [f"paths.data_dir={tmp_path}/data", "data.val_fraction=0.5"]
    proc = gpt2x(argv, *extra, cwd=tmp_path)
    assert how.expect in proc.stdout + proc.stderr, (proc.stdout + proc.stderr)[-3000:]
    if "gpt2x.train" in argv and "--help" not in argv and "--cfg" not in argv:
        (run_dir,) = (tmp_path / "outputs" / "runs").iterdir()
        assert record(run_dir)["status"] == "completed"
    if "gpt2x.prepare" in argv:
        manifest = json.loads(next((tmp_path / "data").rglob("manifest.json")).read_text())
        assert sum(s["tokens"] for s in manifest["shards"]) > 500


COMPOSED = sorted(c for c, how in HOW.items() if isinstance(how, Compose))


@pytest.mark.parametrize("command", COMPOSED)
def test_gpu_network_and_cluster_commands_compose_and_validate(command):
    """What the trainer checks before its first step, with the command's own overrides and
    world size: the config composes (every name exists) and validate accepts it."""
    from hydra import compose, initialize_config_dir

    from gpt2x import CONF_DIR
    from gpt2x.config import register_configs, validate
    from gpt2x.lab import ablate

    how = HOW[command]
    argv = doc(command)
    module = argv[argv.index("-m") + 1]
    args = argv[argv.index("-m") + 2 :]
    if module == "gpt2x.ablate":  # the rung commands, printed, not run
        assert ablate.main(["dry_run=true", *args]) == 0  # options go before `--`
        return
    args = [a for a in args if a != "-m" and not a.startswith("hydra")]
    register_configs()
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("config", overrides=args)
    validate(cfg, how.world_size)


# ---------------------------------------------------------------------------------------------
# journeys: commands that hand each other their folders


def shrink(data_root: Path, *more: str) -> list[str]:
    return [*SHRINK, f"paths.data_dir={data_root}", *more]


def test_journey_train(tmp_path, data_root):
    """The default run; train with checkpoints -> killed -> resume=auto -> sample -> export ->
    transformers (equal logits) -> evaluate (its val loss is the run's) -> compare two runs;
    and checkpoints.md's resume forms."""
    small = shrink(data_root, "trainer.max_steps=6", "trainer.eval_every=3")
    proc = gpt2x(doc('pip install -e ".[dev]" && python -m gpt2x.train')[5:], *small, cwd=tmp_path)
    (default_run,) = (tmp_path / "outputs" / "runs").iterdir()
    assert record(default_run)["status"] == "completed" and "sample:" in proc.stderr + proc.stdout

    my_run = tmp_path / "outputs" / "runs" / "my-run"
    first = doc("python -m gpt2x.train trainer.checkpoint_every=100 hydra.run.dir=outputs/runs/my-run")
    killed = run_cli(
        "gpt2x.train", *first[3:], *small, "trainer.checkpoint_every=2", cwd=tmp_path,
        env={"GPT2X_TEST_KILL": "before_checkpoint@4"}, check=False,
    )  # fmt: skip
    assert killed.returncode == -9 and [r["step"] for r in rows(my_run)] == [0, 1, 2, 3]
    gpt2x(
        doc("python -m gpt2x.train hydra.run.dir=outputs/runs/my-run trainer.resume=auto"),
        *small, "trainer.checkpoint_every=2", cwd=tmp_path,
    )  # fmt: skip
    assert [r["step"] for r in rows(my_run)] == list(range(6))
    assert record(my_run)["resumed_from"]["step"] == 2

    sample = gpt2x(doc('python -m gpt2x.sample checkpoint=outputs/runs/my-run prompt="To be"'), "max_new_tokens=8", cwd=tmp_path)
    assert sample.stdout.startswith("To be") and len(sample.stdout.strip()) > len("To be")
    gpt2x(doc("python -m gpt2x.export checkpoint=outputs/runs/my-run out=hf_dir"), cwd=tmp_path)
    from transformers import GPT2LMHeadModel

    hf = GPT2LMHeadModel.from_pretrained(tmp_path / "hf_dir", attn_implementation="eager").eval()
    ours, _, _ = load_model(my_run, "cpu")
    idx = torch.randint(0, 50257, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(idx)[0], hf(idx).logits, atol=1e-5, rtol=1e-5)
    evaluated = gpt2x(
        doc("python -m gpt2x.evaluate checkpoint=outputs/runs/my-run hellaswag=true"),
        f"hellaswag_path={HELLASWAG}", cwd=tmp_path,
    )  # fmt: skip
    result = json.loads(evaluated.stdout.strip().splitlines()[-1])
    assert result["val_loss"] == pytest.approx(rows(my_run, "eval.jsonl")[-1]["val_loss"], abs=1e-6)
    assert result["hellaswag_n"] > 0

    # checkpoints.md: resume by path into a new folder, continue in the same folder, and the
    # command line that finds its own folder
    by_path = gpt2x(
        doc("python -m gpt2x.train <same overrides> trainer.resume=<run_dir>/checkpoints/step_000100"),
        *small, "hydra.run.dir=outputs/runs/branch", cwd=tmp_path,
        same_overrides="trainer.checkpoint_every=2", run_dir=str(my_run),
        check=False,
    )  # fmt: skip
    # step_000100 is the docs' example: the run has no step 100, and says so in one line
    assert by_path.returncode == 2 and "step_000100" in by_path.stderr
    gpt2x(
        [a.replace("step_000100", "step_000004") for a in doc("python -m gpt2x.train <same overrides> trainer.resume=<run_dir>/checkpoints/step_000100")],
        *small, "hydra.run.dir=outputs/runs/branch", cwd=tmp_path,
        same_overrides="trainer.checkpoint_every=2", run_dir=str(my_run),
    )  # fmt: skip
    branch = tmp_path / "outputs" / "runs" / "branch"
    assert [r["step"] for r in rows(branch)] == [4, 5]
    assert [r["loss"] for r in rows(branch)] == [r["loss"] for r in rows(my_run)][4:6]
    gpt2x(
        doc("python -m gpt2x.train <same overrides> hydra.run.dir=<run_dir> trainer.resume=auto"),
        *small, "trainer.max_steps=7", cwd=tmp_path, same_overrides="trainer.checkpoint_every=2",
        run_dir=str(my_run),
    )  # fmt: skip
    assert [r["step"] for r in rows(my_run)] == list(range(7))
    for _ in range(2):  # the same command twice: one folder, continued
        gpt2x(doc("python -m gpt2x.train <overrides> trainer.resume=auto"), *small, cwd=tmp_path, overrides="trainer.seed=7")
    known = {default_run, my_run, branch}
    (stable,) = [p for p in (tmp_path / "outputs" / "runs").iterdir() if p not in known]
    assert [r["step"] for r in rows(stable)] == list(range(6))

    # checkpoints.md's tool templates
    romeo = gpt2x(
        doc('python -m gpt2x.sample checkpoint=<path> prompt="ROMEO:" max_new_tokens=100 temperature=0.8 top_k=50 seed=1 num_samples=3 [device=auto] [precision=fp32|bf16|fp16]'),
        "max_new_tokens=4", cwd=tmp_path, path=str(my_run),
    )  # fmt: skip
    assert romeo.stdout.count("ROMEO:") == 3
    gpt2x(doc("python -m gpt2x.export checkpoint=<path> out=<dir> [vocab_size=50257]"), cwd=tmp_path, path=str(my_run), dir="hf2")
    assert (tmp_path / "hf2" / "model.safetensors").is_file()
    val_only = gpt2x(
        doc("python -m gpt2x.evaluate checkpoint=<path> [hellaswag=true] [hellaswag_path=...] [hellaswag_limit=N] [eval_tokens=N] [micro_batch_size=N] [data_dir=...] [precision=fp32|bf16] [val=false]"),
        cwd=tmp_path, path=str(my_run),
    )  # fmt: skip
    assert "val_loss" in json.loads(val_only.stdout.strip().splitlines()[-1])

    # compare two runs: the table has one row per run
    for command in (
        "python -m gpt2x.report outputs/runs/run-a outputs/runs/run-b --out compare/",
        "python -m gpt2x.report outputs/runs/a outputs/runs/b --out reports/ab",
    ):
        argv = [
            a.replace("outputs/runs/run-a", "outputs/runs/my-run").replace(
                "outputs/runs/run-b", str(default_run)
            ).replace("outputs/runs/a", "outputs/runs/my-run").replace("outputs/runs/b", "outputs/runs/branch")
            for a in doc(command)
        ]
        gpt2x(argv, cwd=tmp_path)
        table = (tmp_path / argv[-1] / "ablation.md").read_text()
        assert table.count("\n|") >= 3, table  # header, rule and a row per run


def test_journey_pretrained(tmp_path, data_root):
    """Network-only commands against local stand-ins: a Hub dataset -> prepare (a local jsonl
    through the same datasets loader), a Hub model -> evaluate (a local HF folder)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    (tmp_path / "data").mkdir()
    docs_ = [{"text": "To be, or not to be, that is the question. " * 20} for _ in range(40)]
    (tmp_path / "data" / "a.jsonl").write_text("\n".join(json.dumps(d) for d in docs_) + "\n")
    local = [f"paths.data_dir={tmp_path}/prepared", "data.val_fraction=0.2"]
    gpt2x(
        [
            a.replace("/data/", f"{tmp_path}/data/")
            for a in doc("python -m gpt2x.prepare data=hf data.source='/data/*.jsonl' data.num_workers=4")
        ],
        *local, "data.num_workers=1", cwd=tmp_path,
    )  # fmt: skip
    assert next((tmp_path / "prepared").glob("hf*/manifest.json")).is_file()
    gpt2x(
        doc("python -m gpt2x.prepare data=fineweb_edu"),
        *local, f"data.source={tmp_path}/data/a.jsonl", "data.hf_config=", "data.val_tokens=1000",
        "data.num_workers=1", cwd=tmp_path,
    )  # fmt: skip
    prepared = tmp_path / "prepared" / "fineweb_edu"
    assert (prepared / "manifest.json").is_file()
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=1, n_head=2, n_embd=32, n_positions=64)).save_pretrained(
        tmp_path / "gpt2"
    )
    for command in (
        "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true data_dir=<prepared fineweb_edu>",
        "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true data_dir=<prepared fineweb_edu folder>",
        "python -m gpt2x.evaluate hf_model=gpt2 hellaswag=true data_dir=~/.cache/gpt2x/data/fineweb_edu",
    ):
        argv = [a.replace("~/.cache/gpt2x/data/fineweb_edu", str(prepared)) for a in doc(command)]
        out = gpt2x(
            argv, f"hf_model={tmp_path}/gpt2", f"hellaswag_path={HELLASWAG}", "eval_tokens=512",
            "micro_batch_size=2", cwd=tmp_path, prepared_fineweb_edu=str(prepared),
            prepared_fineweb_edu_folder=str(prepared),
        )  # fmt: skip
        result = json.loads(out.stdout.strip().splitlines()[-1])
        assert 0 < result["val_loss"] < 20 and result["hellaswag_n"] > 0


def test_journey_sweep(tmp_path, data_root):
    """sweep -> summary: the README's batch-size sweep, the docs' own list, the summary
    rebuilt identically by gpt2x.sweep, and the report's sweep view."""
    # the sweep's own micro batches and validation size: the rest of the shrink
    small = [o for o in shrink(data_root) if not o.startswith(("trainer.micro_batch_size", "trainer.eval_tokens"))]
    gpt2x(doc("python -m gpt2x.train -m +sweep=batch_size"), *small, cwd=tmp_path)
    gpt2x(
        doc("python -m gpt2x.train -m +sweep=batch_size trainer.micro_batch_size=2,4"),
        *small, cwd=tmp_path,
    )  # fmt: skip
    sweeps = sorted((tmp_path / "outputs" / "multirun").iterdir())
    jobs = [sorted(p.name for p in s.iterdir() if p.is_dir() and p.name[0].isdigit()) for s in sweeps]
    assert sorted(len(j) for j in jobs) == [2, 4]
    second = sweeps[[len(j) for j in jobs].index(2)]
    summary = (second / "summary.csv").read_text()
    (second / "summary.csv").unlink()
    gpt2x(doc("python -m gpt2x.sweep outputs/multirun/<sweep_id>"), cwd=tmp_path, sweep_id=second.name)
    assert (second / "summary.csv").read_text() == summary  # the same rows from the records
    gpt2x(
        doc("python -m gpt2x.report outputs/multirun/<sweep_id> --x trainer.micro_batch_size --basename summary"),
        cwd=tmp_path, sweep_id=second.name,
    )  # fmt: skip
    assert (second / "summary.md").read_text().count("\n|") >= 3


def test_journey_ablate(tmp_path, data_root, monkeypatch):
    """ablate -> report -> W&B report (offline) -> the same table again: the CPU ladder,
    shrunk to two of its rungs, one repeat of two steps, on the tiny model (every rung runs in
    tests/test_matrix.py, the ladder's interleaving in tests/test_turns.py)."""
    dry = gpt2x(doc("python -m gpt2x.ablate ladder=nano_cpu dry_run=true"), cwd=tmp_path)
    # docs/ladder.md's rung command is what the dry run prints
    template = doc(
        "python -m gpt2x.train +experiment=ladder/bf16 logger.group=<folder> "
        "trainer.warmup_steps_for_timing=3 trainer.breakdown_steps=1 trainer.max_steps=12 repeat=0 "
        "ladder_shape=nano_cpu <overrides> hydra.run.dir=<out>/03_bf16"
    )
    line = next(x for x in dry.stdout.splitlines() if "+experiment=ladder/bf16" in x and "repeat=0" in x)
    for arg in template[1:]:  # the interpreter is the runner's own sys.executable
        if "<" not in arg:
            assert arg in line.split(), (arg, line)
    out = tmp_path / "outputs" / "ablations" / "nano"
    gpt2x(
        doc("python -m gpt2x.ablate ladder=nano_cpu"),
        "rungs=[ladder/fp32,ladder/bf16]", "repeats=1", "steps=2", "warmup=1", "profile=false",
        f"out={out}", "--",
        *TINY, "trainer.seq_len=32", f"paths.data_dir={data_root}", "logger=none", cwd=tmp_path,
    )  # fmt: skip
    table = (out / "ablation.md").read_text()
    assert re.search(r"^\| ladder/fp32 \| [0-9.]+ \|", table, re.M), table
    assert re.search(r"^\| ladder/bf16 \| [0-9.]+ \|", table, re.M), table
    csv = (out / "ablation.csv").read_text()
    (out / "ablation.csv").unlink()
    gpt2x(doc("python -m gpt2x.report outputs/ablations/<folder>"), cwd=tmp_path, folder="nano")
    assert (out / "ablation.csv").read_text() == csv  # the same table from the run records
    # offline, W&B's report API has no server to save to: one line (exit 1), the local report
    # complete; the report it would save is built here and holds the same table
    monkeypatch.setenv("WANDB_MODE", "offline")
    report = gpt2x(
        doc("python -m gpt2x.report outputs/ablations/<folder> --wandb --entity me"),
        cwd=tmp_path, check=False, folder="nano",
    )  # fmt: skip
    assert report.returncode == 1 and report.stderr.strip().splitlines() == [
        "gpt2x.report: error: W&B report not saved: WANDB_MODE=offline; the local report is complete"
    ]
    assert (out / "ablation.csv").read_text() == csv
    from gpt2x.lab.report import rebuild_ablation
    from gpt2x.lab.wandb_report import build_wandb_report

    runs, table_rows, _ = rebuild_ablation(out, tmp_path / "again")
    wandb_report = build_wandb_report(runs, entity="me", rows=table_rows)
    assert wandb_report.entity == "me"
    text = "\n".join(getattr(b, "text", "") or "" for b in wandb_report.blocks)
    assert "| ladder/fp32 |" in text and "| ladder/bf16 |" in text
