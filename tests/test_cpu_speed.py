"""benchmarks/cpu_speed.py's peers without the lecture's file: a stand-in with the interface of
build-nanogpt's train_gpt2.py (tests/data/lecture_stand_in: GPTConfig, GPT(config) -> (logits,
loss), configure_optimizers, a training run in the module body) is loaded and trained by the
`lecture` worker in-process."""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

spec = importlib.util.spec_from_file_location("cpu_speed", REPO / "benchmarks" / "cpu_speed.py")
cpu_speed = importlib.util.module_from_spec(spec)
sys.modules["cpu_speed"] = cpu_speed  # its dataclasses look their module up
spec.loader.exec_module(cpu_speed)

# a stand-in for build-nanogpt's train_gpt2.py and, beside it, its hellaswag.py (which fails
# to import offline); benchmarks/gpu/rehearse.sh runs the GPU check's lecture_code section on it
STAND_IN = REPO / "tests" / "data" / "lecture_stand_in" / "train_gpt2.py"


SHRINK = [
    "model.n_layer=1",
    "model.n_head=2",
    "model.n_embd=32",
    "model.block_size=32",
    "trainer.seq_len=32",
    "trainer.micro_batch_size=2",
]


@pytest.mark.parametrize("fp32", [False, True])
def test_the_lecture_worker_trains_the_files_own_model_with_its_optimizer(tmp_path, capsys, fp32):
    lecture = STAND_IN  # beside it, its hellaswag.py that fails to import offline
    out = tmp_path / "lecture.json"
    overrides = [*SHRINK, f"paths.data_dir={tmp_path / 'no-data'}"]  # fixed random tokens
    args = ["--worker", "lecture", "--lecture", str(lecture), "--steps", "2", "--warmup", "1"]
    args += ["--worker-out", str(out), "--device", "cpu", "--eager", *(["--fp32"] * fp32)]
    assert cpu_speed.main([*args, *(a for o in overrides for a in ("--override", o))]) == 0
    captured = capsys.readouterr()
    printed = captured.out
    # the import that fails offline is skipped, and said so
    assert (
        "cpu_speed.py: skipped the lecture's `from hellaswag import render_example` (OSError: "
        "Max retries exceeded with url: /gpt-2/encodings/main/vocab.bpe): the model does not "
        "need it"
    ) in captured.err
    # the fused rung's shape (vocab 50304) and the optimizer settings, through its own code
    assert "stand-in GPT: vocab_size=50304 n_embd=32" in printed
    assert "configure_optimizers(0.1, 0.0006, cpu)" in printed
    # bf16 autocast around the forward, as the lecture's loop; none for the fp32 peers
    assert f"stand-in logits: torch.{'float32' if fp32 else 'bfloat16'}" in printed
    result = json.loads(out.read_text())
    assert len(result["steps_ms"]) == 2 and result["tokens_per_s"] > 0
    assert result["batch"] == [2, 32]
    assert math.isfinite(result["loss"]) and result["loss"] < math.log(50304) + 0.5


def test_a_file_without_the_lectures_model_is_one_line(tmp_path):
    other = tmp_path / "train.py"
    other.write_text("import torch\n\nclass Model(torch.nn.Module):\n    pass\n")
    with pytest.raises(SystemExit) as e:
        cpu_speed.load_lecture(other)
    assert str(e.value) == (
        f"cpu_speed.py: --lecture {other} defines no GPT or GPTConfig: pass build-nanogpt's "
        "train_gpt2.py"
    )


def test_the_lecture_peer_needs_the_path(tmp_path, capsys):
    assert cpu_speed.main(["--configs", "fused,lecture"]) == 2
    assert capsys.readouterr().err.strip() == (
        "cpu_speed.py: configuration 'lecture' needs --lecture PATH (the lecture's "
        "build-nanogpt train_gpt2.py)"
    )
    assert cpu_speed.main(["--lecture", str(tmp_path / "missing.py")]) == 2
    assert "no such file" in capsys.readouterr().err
    # with the path, the lecture's peers join the default configurations
    with_path, without = cpu_speed.default_configs(True), cpu_speed.default_configs(False)
    assert set(with_path) - set(without) == {
        "lecture", "lecture_eager", "lecture_fp32", "lecture_tuned"
    }
    # the fp32 peers ask their worker for no autocast; the others keep the lecture's bf16
    args = argparse.Namespace(lecture=tmp_path / "t.py", steps=2, warmup=1, override=[])
    for name in ("hf_fp32", "lecture_fp32", "hf", "lecture", "lecture_eager"):
        cmd = cpu_speed.peer_command(cpu_speed.BY_NAME[name], args, tmp_path / "o.json")
        assert ("--fp32" in cmd) == name.endswith("_fp32"), name
        assert ("--eager" in cmd) == name.endswith("_eager"), name  # as build-nanogpt ships
    assert {"fused", "chunked", "cpu_fast", "hf", "hf_tuned"} <= set(without)


def test_a_configurations_memory_setting_reaches_its_process_one_way():
    """One name per setting (MEMORY): a gpt2x run gets it as its two trainer overrides and
    THP_MEM_ALLOC_ENABLE, a peer as --keep-freed-memory and the same variable; never the
    caller's environment."""
    tuned, lecture = cpu_speed.BY_NAME["fused_thp"], cpu_speed.BY_NAME["fused_not_kept"]
    assert tuned.kept and tuned.huge_pages and not lecture.kept and not lecture.huge_pages
    cmd = cpu_speed.gpt2x_command(tuned, 2, 1, REPO / "x", [])
    assert "trainer.cpu_keep_freed_memory=true" in cmd and "trainer.cpu_huge_pages=true" in cmd
    cmd = cpu_speed.gpt2x_command(lecture, 2, 1, REPO / "x", [])
    assert "trainer.cpu_keep_freed_memory=false" in cmd and "trainer.cpu_huge_pages=false" in cmd
    args = argparse.Namespace(steps=2, warmup=1, override=[])
    assert "--keep-freed-memory" in cpu_speed.peer_command(cpu_speed.BY_NAME["hf_tuned"], args, REPO)
    assert "--keep-freed-memory" not in cpu_speed.peer_command(cpu_speed.BY_NAME["hf"], args, REPO)


def test_a_json_file_describes_its_configurations_to_later_versions(tmp_path, capsys):
    """--table-from shows what each row was when it ran (recorded in the file), so renamed or
    redefined configurations keep their meaning; files from before that fall back to this
    version's description, and a name it no longer has says so."""
    rows = [
        {"name": "fused", "repeat": 0, "tokens_per_s": 100.0, "what": "fused as it was then"},
        {"name": "hf", "repeat": 0, "tokens_per_s": 90.0},
        {"name": "gone", "repeat": 0, "tokens_per_s": 80.0, "env": {"OMP_NUM_THREADS": "1"}},
    ]
    path = tmp_path / "old.json"
    path.write_text(json.dumps(rows))
    assert cpu_speed.main(["--table-from", str(path)]) == 0
    out = capsys.readouterr().out
    assert "| fused | fused as it was then |" in out
    assert f"| hf | {cpu_speed.BY_NAME['hf'].what} |" in out
    assert "| gone | (not a configuration of this version of cpu_speed.py) |" in out


def test_each_row_is_a_share_of_its_own_precisions_ceiling(tmp_path, capsys):
    """The ceilings come from gpt2x's runs (their records hold the measured peaks); a peer
    without autocast is a share of the fp32 one, a bf16 peer of the bf16 one."""
    rows = [
        {"name": "cpu_fast", "repeat": 0, "tokens_per_s": 1000.0, "precision": "bf16",
         "ceiling_tokens_per_s": 2000.0},
        {"name": "cpu_fast_fp32", "repeat": 0, "tokens_per_s": 1500.0, "precision": "fp32",
         "ceiling_tokens_per_s": 4000.0},
        {"name": "hf", "repeat": 0, "tokens_per_s": 500.0, "precision": "bf16"},
        {"name": "hf_fp32", "repeat": 0, "tokens_per_s": 1000.0, "precision": "fp32"},
        {"name": "lecture", "repeat": 0, "tokens_per_s": 400.0, "lecture_sha256": "6a03"},
    ]
    for row in rows:  # a run made without AMX says so when its table is printed again
        row["cpu_isa_limits"] = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    path = tmp_path / "shares.json"
    path.write_text(json.dumps(rows))
    assert cpu_speed.main(["--table-from", str(path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [
        "# --lecture file sha256 6a03",
        "# CPU instruction set capped: ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16",
    ]
    share = {
        cells[1].strip(): cells[6].strip()
        for line in out.splitlines()
        if line.startswith("| ") and len(cells := line.split("|")) > 7
    }
    assert share["cpu_fast"] == "50%" and share["cpu_fast_fp32"] == "38%"
    assert share["hf"] == "25%" and share["hf_fp32"] == "25%"


@pytest.mark.parametrize("name", ["hf", "hf_fp32"])
def test_a_peer_result_records_its_precision(tmp_path, monkeypatch, name):
    """What puts a peer row against the fp32 or the bf16 ceiling (its worker is faked here: it
    writes what a worker writes)."""

    def fake_worker(cmd, **kwargs):
        out = Path(cmd[cmd.index("--worker-out") + 1])
        out.write_text(json.dumps({"tokens_per_s": 10.0, "median_ms": 1.0}))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(cpu_speed.subprocess, "run", fake_worker)
    args = argparse.Namespace(lecture=None, steps=2, warmup=1, override=[], threads=2)
    result = cpu_speed.measure_once(cpu_speed.BY_NAME[name], args, tmp_path, 0)
    assert result["precision"] == ("fp32" if name == "hf_fp32" else "bf16")
    assert result["tokens_per_s"] == 10.0 and ("--fp32" in shlex.split(result["command"])) == (name != "hf")


@pytest.mark.parametrize(
    "raw",
    [
        "model-cpu.json",
        "model-cpu-lecture.json",
        "model-cpu-lecture-eager.json",
        "model-cpu-no-amx.json",
        "model-cpu-2026-12-04-before-kept-memory.json",
    ],
)
def test_the_committed_tables_rebuild_from_their_raw_numbers(raw, capsys):
    """benchmarks/model-cpu.md shows `cpu_speed.py --table-from <raw>` verbatim for these runs:
    a change to the table's arithmetic or to a configuration's recorded meaning shows here."""
    assert cpu_speed.main(["--table-from", str(REPO / "benchmarks" / raw)]) == 0
    rebuilt = [line for line in capsys.readouterr().out.splitlines() if line.startswith("|")]
    page = set((REPO / "benchmarks" / "model-cpu.md").read_text().splitlines())
    assert len(rebuilt) > 3 and [line for line in rebuilt if line not in page] == []
