"""gpt2x.report on synthetic run records: the arithmetic, the files, the CLI, the W&B report."""

from __future__ import annotations

import csv
import json
import statistics
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

from gpt2x.lab import header
from gpt2x.lab.report import main, write_report
from gpt2x.lab.runs import ReportError, load_runs
from gpt2x.lab.summary import COLUMNS, details, summarize
from gpt2x.lab.wandb_report import build_wandb_report
from gpt2x.record.folder import read_jsonl

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
TOKENS_PER_STEP = 4096
WARMUP_MS = [1000.0, 500.0, 300.0]  # the first 3 steps: compile/warm-up, excluded from timing
SPREAD = [0.90, 1.00, 1.10, 1.00, 1.00, 0.95, 1.05]  # x median: p10 = 0.93, p90 = 1.07


def write_run(
    root: Path,
    folder: str,
    experiment: str,
    median_ms: float | None,
    final_loss: float = 3.5,
    *,
    started: int = 0,
    status: str = "completed",
    error: str | None = None,
    mfu: float | None = None,
    mem_gb: float | None = None,
    val_loss: float | None = 3.6,
    compile_seconds: float | None = None,
    config: dict | None = None,
    wandb: dict | None = None,
    n_steps: int | None = None,
    truncate: bool = False,
) -> Path:
    """A run folder as the trainer writes it: record.json, metrics.jsonl, eval.jsonl."""
    run_dir = root / folder
    run_dir.mkdir(parents=True)
    cfg = {
        "trainer": {"warmup_steps_for_timing": 3, "micro_batch_size": 8},
        "logger": {"kind": "wandb", "project": "gpt2x-test", "entity": None, "group": "abl-1"},
        "experiment": experiment,
    }
    for key, value in (config or {}).items():
        cfg.setdefault(key, {}).update(value)
    ms = [] if median_ms is None else [*WARMUP_MS, *(f * median_ms for f in SPREAD)]
    if n_steps is not None:
        ms = ms[:n_steps]
    rows = []
    for step, t in enumerate(ms):
        rows.append(
            {
                "step": step,
                "loss": final_loss + 0.1 * (len(ms) - 1 - step),  # falls to final_loss
                "lr": 6e-4,
                "grad_norm": 1.0,
                "ms": t,
                "tokens_per_s": TOKENS_PER_STEP / (t / 1000.0),
                "mfu": mfu,
                "mem_gb": mem_gb,
                "tokens_seen": TOKENS_PER_STEP * (step + 1),
            }
        )
    with open(run_dir / "metrics.jsonl", "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
        if truncate:  # a killed run: half a line
            f.write('{"step": 99, "loss": 3.')
    if val_loss is not None and rows:
        (run_dir / "eval.jsonl").write_text(
            json.dumps({"step": len(rows) - 1, "val_loss": val_loss, "tokens_seen": 1}) + "\n"
        )
    record = {
        "schema": 1,
        "run_id": folder,
        "run_dir": str(run_dir),
        "experiment": experiment,
        "status": status,
        "error": error,
        "command": f"train.py experiment={experiment}",
        "overrides": [f"experiment={experiment}", "trainer.max_steps=10"],
        "config": cfg,
        "config_hash": f"{abs(hash(folder)) % 16**12:012x}",
        "git": {"commit": "a" * 40, "dirty": False},
        "versions": {"python": "3.11.7", "torch": "2.5.0", "cuda": "12.4"},
        "hardware": {
            "device": "cuda",
            "device_name": "NVIDIA H100 80GB HBM3",
            "device_count": 1,
            "cpu": "x86_64",
            "cpu_count": 16,
            "hostname": "node1",
            "peak_flops": 989e12,
        },
        "world_size": 1,
        "grad_accum_steps": 1,
        "tokens_per_step": TOKENS_PER_STEP,
        "started_at": f"2025-01-01T00:{started:02d}:00+00:00",
        "ended_at": None,
        "compile_seconds": compile_seconds,
        "summary": None,
        "wandb": wandb,
    }
    (run_dir / "record.json").write_text(json.dumps(record, indent=2))
    return run_dir


@pytest.fixture
def ladder(tmp_path) -> Path:
    """fp32 100 ms -> bf16 50 ms -> (flash fails) -> compile 25 ms."""
    root = tmp_path / "ladder"
    write_run(root, "r0", "fp32", 100.0, 3.50, started=0, mfu=0.10, mem_gb=8.0)
    write_run(root, "r1", "bf16", 50.0, 3.52, started=1, mfu=0.20, mem_gb=5.0, truncate=True)
    write_run(
        root,
        "r2",
        "flash",
        50.0,
        started=2,
        status="failed",
        error="RuntimeError: FlashAttention only supports sm80+\nTraceback ...",
        n_steps=2,
    )
    write_run(
        root, "r3", "compile", 25.0, 3.49, started=3, mfu=0.40, mem_gb=4.0, compile_seconds=42.0
    )
    return root


def test_summarize_arithmetic(ladder):
    runs = load_runs([ladder])
    assert [r.name for r in runs] == ["fp32", "bf16", "flash", "compile"]
    rows = summarize(runs)
    assert [r["name"] for r in rows] == ["fp32", "bf16", "flash", "compile"]
    assert all(list(r) == COLUMNS for r in rows)
    fp32, bf16, flash, comp = rows

    assert [r["median_ms"] for r in (fp32, bf16, comp)] == [100.0, 50.0, 25.0]
    assert fp32["p10_ms"] == pytest.approx(93.0) and fp32["p90_ms"] == pytest.approx(107.0)
    assert comp["p10_ms"] == pytest.approx(23.25) and comp["p90_ms"] == pytest.approx(26.75)
    assert [r["tokens_per_s"] for r in (fp32, bf16, comp)] == [40960.0, 81920.0, 163840.0]
    assert [r["speedup_vs_prev"] for r in (fp32, bf16, comp)] == [1.0, 2.0, 2.0]
    assert [r["speedup_vs_baseline"] for r in (fp32, bf16, comp)] == [1.0, 2.0, 4.0]
    assert [r["mfu"] for r in (fp32, bf16, comp)] == [0.10, 0.20, 0.40]
    assert [r["peak_mem_gb"] for r in (fp32, bf16, comp)] == [8.0, 5.0, 4.0]
    assert [r["steps"] for r in (fp32, bf16, comp)] == [10, 10, 10]
    assert fp32["loss"] == pytest.approx(3.50) and bf16["loss"] == pytest.approx(3.52)
    assert fp32["loss_vs_baseline"] == 0.0
    assert bf16["loss_vs_baseline"] == pytest.approx(0.02)
    assert comp["loss_vs_baseline"] == pytest.approx(-0.01)
    assert fp32["val_loss"] == 3.6
    assert comp["compile_s"] == 42.0 and fp32["compile_s"] is None
    assert fp32["world_size"] == 1 and fp32["config_hash"]

    # the failed run: its one-line reason, empty cells, and the chain is not broken
    assert flash["status"] == "failed"
    assert flash["error"] == "RuntimeError: FlashAttention only supports sm80+"
    assert flash["steps"] == 2
    for col in ("median_ms", "tokens_per_s", "speedup_vs_prev", "speedup_vs_baseline", "loss"):
        assert flash[col] is None, col


def test_truncated_last_metrics_line_is_tolerated(ladder):
    run = next(r for r in load_runs(ladder) if r.name == "bf16")
    assert [row["step"] for row in run.metrics] == list(range(10))
    assert run.metrics[-1]["loss"] == pytest.approx(3.52)


def test_baseline_warmup_and_order(ladder):
    runs = load_runs(ladder)
    rows = {r["name"]: r for r in summarize(runs, baseline="bf16")}
    assert rows["fp32"]["speedup_vs_baseline"] == 0.5
    assert rows["compile"]["speedup_vs_baseline"] == 2.0
    assert rows["fp32"]["loss_vs_baseline"] == pytest.approx(-0.02)
    assert rows["fp32"]["speedup_vs_prev"] == 1.0  # vs_prev is unaffected by the baseline

    # warmup=0 keeps the slow first steps in: the median moves off 100 ms
    assert summarize(runs, warmup=0)[0]["median_ms"] == 102.5  # (100 + 105) / 2

    ordered = summarize(runs, order=["compile", "fp32"])
    assert [r["name"] for r in ordered] == ["compile", "fp32", "bf16", "flash"]
    assert [r["speedup_vs_prev"] for r in ordered] == [1.0, 0.25, 2.0, None]

    with pytest.raises(ReportError, match="baseline 'nope'"):
        summarize(runs, baseline="nope")


def test_first_run_failed_baseline_is_first_success(tmp_path):
    write_run(tmp_path, "a", "broken", None, status="failed", error="OOM", val_loss=None)
    write_run(tmp_path, "b", "ok", 40.0, started=1)
    write_run(tmp_path, "c", "faster", 20.0, started=2)
    rows = summarize(load_runs(tmp_path))
    assert rows[0]["status"] == "failed" and rows[0]["error"] == "OOM" and rows[0]["steps"] == 0
    assert [r["speedup_vs_baseline"] for r in rows] == [None, 1.0, 2.0]
    assert [r["speedup_vs_prev"] for r in rows] == [None, 1.0, 2.0]


def test_record_summary_is_the_fallback_without_metrics(tmp_path):
    run_dir = write_run(tmp_path, "a", "only-record", None, val_loss=None)
    record = json.loads((run_dir / "record.json").read_text())
    record["summary"] = {
        "steps": 5,
        "final_loss": 4.0,
        "val_loss": 4.1,
        "median_ms": 10.0,
        "p10_ms": 9.0,
        "p90_ms": 11.0,
        "tokens_per_s": 409600.0,
        "mfu": None,
        "peak_mem_gb": None,
    }
    (run_dir / "record.json").write_text(json.dumps(record))
    (run_dir / "metrics.jsonl").unlink()
    (row,) = summarize(load_runs(tmp_path))
    assert row["median_ms"] == 10.0 and row["tokens_per_s"] == 409600.0
    assert row["loss"] == 4.0 and row["val_loss"] == 4.1 and row["steps"] == 5


def read_csv(path: Path) -> list[dict]:
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def assert_png(path: Path) -> None:
    import matplotlib.image

    assert path.read_bytes()[:8] == PNG_MAGIC, path
    img = matplotlib.image.imread(path)
    assert img.ndim == 3 and img.shape[0] > 100 and img.shape[1] > 100


def test_write_report_files(ladder, tmp_path):
    runs = load_runs(ladder)
    rows = summarize(runs)
    out = tmp_path / "out"
    paths = write_report(rows, runs, out, header=header.build_header(runs, "fp32"))
    assert set(paths) == {"md", "csv", "loss", "tokens_per_s"}
    assert paths["md"] == out / "ablation.md" and paths["csv"] == out / "ablation.csv"
    assert not (out / "sweep.png").exists()

    table = read_csv(paths["csv"])
    assert list(table[0]) == COLUMNS
    assert [r["name"] for r in table] == ["fp32", "bf16", "flash", "compile"]
    assert [r["speedup_vs_baseline"] for r in table] == ["1.0", "2.0", "", "4.0"]
    assert [r["median_ms"] for r in table] == ["100.0", "50.0", "", "25.0"]
    assert [float(r["tokens_per_s"]) for r in table if r["tokens_per_s"]] == [
        40960.0,
        81920.0,
        163840.0,
    ]
    assert table[2]["status"] == "failed" and "sm80+" in table[2]["error"]

    md = paths["md"].read_text()
    for needle in (
        "NVIDIA H100 80GB HBM3",
        "torch 2.5.0, CUDA 12.4",
        "a" * 40,
        "train.py experiment=fp32",
        "- **date**:",
        "- **baseline**: fp32",
    ):
        assert needle in md, needle
    table_lines = [line for line in md.splitlines() if line.startswith("|")]
    # the markdown shows what has a value (one repeat: no intervals; the CSV has every column),
    # a column with one value in every row once above the table, the config hashes per run
    empty = {"tokens_per_s_ci", "wall_tokens_per_s", "mfu_measured", "speedup_vs_prev_ci"}
    empty |= {"speedup_vs_baseline_ci", "noise", "world_size", "config_hash"}
    assert table_lines[0] == "| " + " | ".join(c for c in COLUMNS if c not in empty) + " |"
    assert "\nAll rows: world_size 1.\n" in md
    assert len(table_lines) == 2 + 4
    assert "| compile | completed |  | 1/1 | 10 | 25.0 |" in md
    assert "| 163,840 | 40.0% | 2.00x | 4.00x |" in md
    assert "| -0.0100 |" in md
    assert "| flash | failed | RuntimeError: FlashAttention only supports sm80+ | 0/1 | 2 |" in md
    # per-run section: config hash and the re-run command
    assert "python -m gpt2x.train experiment=compile trainer.max_steps=10" in md
    assert md.count("- config hash: `") == 4

    for name in ("loss", "tokens_per_s"):
        assert_png(paths[name])

    # the basename is a parameter
    paths = write_report(rows, runs, out, header={}, basename="summary")
    assert (out / "summary.md").exists() and (out / "summary.csv").exists()


def test_sweep_marks_the_best(tmp_path):
    root = tmp_path / "sweep"
    for i, (mbs, ms, mem) in enumerate([(4, 40.0, 10.0), (8, 30.0, 20.0), (16, 35.0, 40.0)]):
        write_run(
            root,
            str(i),
            "mbs",
            ms,
            started=i,
            mem_gb=mem,
            config={"trainer": {"micro_batch_size": mbs}},
        )
    write_run(
        root,
        "3",
        "mbs",
        None,
        started=3,
        status="failed",
        error="CUDA OOM",
        config={"trainer": {"micro_batch_size": 32}},
    )
    runs = load_runs(root)
    assert [r.name for r in runs] == ["mbs [0]", "mbs [1]", "mbs [2]", "mbs [3]"]
    x = "trainer.micro_batch_size"
    rows = summarize(runs, x=x)
    assert [r[x] for r in rows] == [4, 8, 16, 32]
    assert [r["best"] for r in rows] == [False, True, False, False]

    out = tmp_path / "out"
    paths = write_report(rows, runs, out, basename="summary", x=x)
    assert_png(paths["sweep"])
    table = read_csv(out / "summary.csv")
    assert list(table[0]) == ["name", x, *COLUMNS[1:], "best"]
    assert [r["best"] for r in table] == ["False", "True", "False", "False"]
    md = (out / "summary.md").read_text()
    assert "| **mbs [1]** | 8 |" in md and "★" in md
    assert "**Best**: mbs [1] (trainer.micro_batch_size=8)" in md


def test_cli_reproduces_the_function_api(ladder, tmp_path, capsys):
    api_out = tmp_path / "api"
    runs = load_runs([str(ladder)])
    write_report(summarize(runs), runs, api_out)
    expected = (api_out / "ablation.csv").read_text()

    cli_out = tmp_path / "cli"
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2x.report", str(ladder), "--out", str(cli_out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    assert (cli_out / "ablation.csv").read_text() == expected
    assert "| fp32 |" in proc.stdout and "ablation.md" in proc.stdout
    for name in ("ablation.md", "loss.png", "tokens_per_s.png"):
        assert (cli_out / name).exists()

    main_out = tmp_path / "main"
    assert main([str(ladder), "--out", str(main_out)]) == 0
    assert (main_out / "ablation.csv").read_text() == expected

    # sweep mode and the basename through the CLI
    sweep_out = tmp_path / "sweep"
    argv = [
        str(ladder),
        "--out",
        str(sweep_out),
        "--x",
        "trainer.micro_batch_size",
        "--basename",
        "summary",
        "--baseline",
        "bf16",
    ]
    assert main(argv) == 0
    assert (sweep_out / "sweep.png").exists() and (sweep_out / "summary.csv").exists()
    table = read_csv(sweep_out / "summary.csv")
    assert [r["best"] for r in table] == ["False", "False", "False", "True"]
    assert table[0]["speedup_vs_baseline"] == "0.5"


@pytest.mark.parametrize("kind", ["missing", "empty"])
def test_cli_input_errors_are_one_line(tmp_path, capsys, kind):
    folder = tmp_path / "nothing"
    if kind == "empty":
        folder.mkdir()
    assert main([str(folder), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and str(folder) in err
    assert ("no such folder" if kind == "missing" else "no record.json") in err
    with pytest.raises(ReportError):
        load_runs(folder)


def test_cli_input_error_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "gpt2x.report", str(tmp_path / "missing")],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


@pytest.fixture
def no_network(monkeypatch):
    """W&B offline, no key; any attempt to reach the API or save fails the test."""
    import wandb_workspaces.reports.v2 as wr
    from wandb_workspaces.reports.v2 import interface

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("NETRC", "/nonexistent/netrc")

    def forbidden(*args, **kwargs):
        pytest.fail("the W&B API was called")

    monkeypatch.setattr(interface, "_get_api", forbidden)
    monkeypatch.setattr(wr.Report, "save", forbidden)
    return wr


def test_wandb_report_construction_offline(ladder, no_network):
    wr = no_network
    runs = load_runs(ladder)
    rows = summarize(runs)
    rep = build_wandb_report(runs, project="proj", entity="me", title="Ladder", rows=rows)
    assert isinstance(rep, wr.Report)
    assert (rep.project, rep.entity, rep.title) == ("proj", "me", "Ladder")

    grids = [b for b in rep.blocks if isinstance(b, wr.PanelGrid)]
    assert len(grids) == 1
    (runset,) = grids[0].runsets
    assert (runset.entity, runset.project) == ("me", "proj")
    assert "Group" in str(runset.filters) and "abl-1" in str(runset.filters)

    panels = grids[0].panels
    lines = {p.y[0]: p for p in panels if isinstance(p, wr.LinePlot)}
    assert set(lines) == {"train/loss", "perf/tokens_per_s", "perf/mfu", "val/loss"}
    assert lines["perf/mfu"].x == "Step"
    loss_x = {p.x for p in panels if isinstance(p, wr.LinePlot) and p.y == ["train/loss"]}
    assert loss_x == {"Step", "tokens_seen"}
    assert any(isinstance(p, wr.RunComparer) for p in panels)
    bars = [p for p in panels if isinstance(p, wr.BarPlot)]
    assert bars and bars[0].metrics == ["perf/tokens_per_s"]
    # the local table is in the report as markdown
    md = [b for b in rep.blocks if isinstance(b, wr.MarkdownBlock)]
    assert md and "NVIDIA H100 80GB HBM3" in md[0].text and "commands:" in md[0].text  # header
    assert "| compile |" in md[1].text
    # one line / bar per rung, repeats as a band / error bar
    for p in [*lines.values(), *bars]:
        assert p.groupby == wr.Config("experiment") and p.groupby_rangefunc == "minmax"

    # defaults come from the records; an explicit group overrides
    rep = build_wandb_report(runs, entity="me", group="other")
    assert rep.project == "gpt2x-test"
    assert "other" in str(rep.blocks[-1].runsets[0].filters)


def test_wandb_report_serializes_to_the_saved_spec(ladder, no_network, monkeypatch):
    """What save() would upload, produced locally with the one API lookup faked."""
    from wandb_workspaces.reports.v2 import interface

    monkeypatch.setattr(interface, "_get_api", lambda: object())
    monkeypatch.setattr(
        interface, "execute_graphql", lambda api, q, v: {"project": {"internalId": "pid"}}
    )
    rep = build_wandb_report(load_runs(ladder), entity="me")
    spec = json.loads(rep._to_model().spec.model_dump_json(by_alias=True, exclude_none=True))
    text = json.dumps(spec)
    assert '{"key": {"section": "run", "name": "group"}, "op": "=", "value": "abl-1"' in text
    assert '"xAxis": "tokens_seen"' in text
    for metric in ("train/loss", "perf/tokens_per_s", "perf/mfu", "val/loss"):
        assert f'"metrics": ["{metric}"]' in text, metric
    for view in ("Run History Line Plot", "Bar Chart", "Run Comparer"):
        assert f'"viewType": "{view}"' in text, view


def test_wandb_report_without_group_selects_run_ids(tmp_path, no_network):
    wr = no_network
    for i in range(2):
        write_run(
            tmp_path,
            f"r{i}",
            f"e{i}",
            10.0,
            started=i,
            config={"logger": {"group": None}},
            wandb={
                "mode": "online",
                "id": f"id{i}",
                "dir": "x",
                "group": None,
                "project": "p",
                "url": f"https://wandb.ai/team/p/runs/id{i}",
            },
        )
    rep = build_wandb_report(load_runs(tmp_path))
    assert (rep.entity, rep.project) == ("team", "p")  # parsed from the run URL
    grid = next(b for b in rep.blocks if isinstance(b, wr.PanelGrid))
    filters = str(grid.runsets[0].filters)
    assert "ID" in filters and "id0" in filters and "id1" in filters


def test_cli_wandb_offline_is_one_line_and_nonzero(ladder, tmp_path, capsys, no_network):
    rc = main([str(ladder), "--out", str(tmp_path / "o"), "--wandb", "--entity", "me"])
    assert rc == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "W&B report not saved" in err
    assert (tmp_path / "o" / "ablation.csv").exists()  # the local report is still written


def test_cli_wandb_offline_subprocess(ladder, tmp_path):
    env = {k: v for k, v in __import__("os").environ.items() if k != "WANDB_API_KEY"}
    env.update(WANDB_MODE="offline", NETRC=str(tmp_path / "no-netrc"))
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "gpt2x.report",
            str(ladder),
            "--out",
            str(tmp_path / "o"),
            "--wandb",
        ],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert proc.returncode == 1
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "gpt2x.report: error: W&B report not saved: WANDB_MODE=offline; the local report is "
        "complete"
    ]


# --------------------------------------------------------------------------------------------
# repeats: one row per configuration, intervals across repeats, paired speed-ups


def repeated_ladder(root: Path) -> dict[str, list[float]]:
    """3 rungs x 3 interleaved repeats. The machine drifts (repeat 2 is 20% slower for every
    rung); "tf32" is fp32 again (a no-op), "bf16" is really 2x faster."""
    drift = [1.0, 1.05, 1.2]
    ms = {"fp32": 100.0, "tf32": 100.0, "bf16": 50.0}
    wobble = {"fp32": [1.0, 1.0, 1.0], "tf32": [1.02, 0.97, 1.01], "bf16": [1.0, 1.01, 0.99]}
    medians: dict[str, list[float]] = {}
    t = 0
    for rep in range(3):
        for i, rung in enumerate(ms):
            m = ms[rung] * drift[rep] * wobble[rung][rep]
            medians.setdefault(rung, []).append(m)
            config = {"trainer": {}}  # the same config except `repeat`
            run = write_run(root, f"{i:02d}_{rung}/repeat_{rep}", rung, m, started=t, config=config)
            rec = json.loads((run / "record.json").read_text())
            rec["config"]["repeat"] = rep
            rec["breakdown"] = {
                "step_ms": m,
                "categories": {"matmul": 0.6 * m, "optimizer": 0.1 * m, "other": 0.3 * m},
                "steps": 1,
                "device": "cpu",
            }
            (run / "record.json").write_text(json.dumps(rec))
            t += 1
    return medians


def test_repeats_are_one_row_with_paired_intervals(tmp_path):
    from gpt2x import stats

    medians = repeated_ladder(tmp_path / "abl")
    runs = load_runs(tmp_path / "abl")
    assert len(runs) == 9 and {r.name for r in runs} == {"fp32", "tf32", "bf16"}  # no [folder]
    rows = {r["name"]: r for r in summarize(runs)}
    assert list(rows) == ["fp32", "tf32", "bf16"] and all(r["repeats"] == "3/3" for r in rows.values())
    tps = {k: [TOKENS_PER_STEP / (m / 1000.0) for m in v] for k, v in medians.items()}
    # the per-repeat interval of tokens/s, and the paired speed-ups, from the repeats' medians
    ci = rows["fp32"]["tokens_per_s_ci"]
    ref = stats.log_t_interval(tps["fp32"])
    assert (ci.lo, ci.hi) == pytest.approx((ref.lo, ref.hi), rel=1e-9)
    pair = rows["tf32"]["speedup_vs_prev_ci"]
    ref = stats.paired_ratio(tps["tf32"], tps["fp32"])
    assert (pair.lo, pair.hi) == pytest.approx((ref.lo, ref.hi), rel=1e-9)
    # the drift (20% on repeat 2) would swamp unpaired intervals; paired, tf32 is noise and
    # bf16 a real 2x
    assert rows["tf32"]["noise"] is True and pair.half_width_pct < 10
    assert rows["bf16"]["noise"] is False
    assert rows["bf16"]["speedup_vs_prev_ci"].lo > 1.5
    # the median step time pools all measured steps of all repeats
    pooled = [f * m for m in medians["fp32"] for f in SPREAD]
    assert rows["fp32"]["median_ms"] == pytest.approx(statistics.median(pooled))
    assert rows["tf32"]["loss_vs_prev"] == pytest.approx(0.0)


def test_one_failed_repeat_is_said_and_the_others_count(tmp_path):
    repeated_ladder(tmp_path / "abl")
    bad = tmp_path / "abl" / "01_tf32" / "repeat_1" / "record.json"
    rec = json.loads(bad.read_text())
    rec.update(status="failed", error="RuntimeError: boom")
    bad.write_text(json.dumps(rec))
    rows = {r["name"]: r for r in summarize(load_runs(tmp_path / "abl"))}
    tf32 = rows["tf32"]
    assert tf32["repeats"] == "2/3" and "1 of 3 repeats: RuntimeError: boom" in tf32["error"]
    assert tf32["speedup_vs_prev_ci"].n == 2 and tf32["tokens_per_s_ci"].n == 2


def test_plots_carry_the_spread_and_the_breakdown(tmp_path):
    from gpt2x.lab import plots

    medians = repeated_ladder(tmp_path / "abl")
    runs = load_runs(tmp_path / "abl")
    rows = summarize(runs)
    # tokens/s bars with the repeats' interval as error bars
    fig = plots.tokens_per_s_figure(rows)
    ax = fig.axes[0]
    heights = [b.get_height() for b in ax.patches]
    assert heights == pytest.approx([r["tokens_per_s"] for r in rows])
    from matplotlib.container import ErrorbarContainer

    (errbars,) = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    segs = errbars.lines[2][0].get_segments()  # the vertical error segments, one per bar
    ci = rows[0]["tokens_per_s_ci"]
    lo, hi = segs[0][0][1], segs[0][1][1]
    assert hi / heights[0] == pytest.approx(ci.hi / ci.center) and lo / heights[0] == pytest.approx(
        ci.lo / ci.center
    )
    # loss: one line per rung (the median over repeats) and a band
    about = details(runs, rows)
    curves = [d.curve for d in about]
    assert [c.label for c in curves] == ["fp32", "tf32", "bf16"] and len(curves[0].repeats) == 3
    fig = plots.loss_figure(curves)
    assert len(fig.axes[0].lines) == 3 and len(fig.axes[0].collections) == 3  # 3 bands
    # the breakdown: the repeats' step times and categories averaged, one stacked bar per rung
    bd = next(d.breakdown for d in about if d.name == "bf16")
    assert bd["step_ms"] == pytest.approx(statistics.mean(medians["bf16"]))
    assert bd["categories"]["matmul"] == pytest.approx(0.6 * statistics.mean(medians["bf16"]))
    assert sum(bd["categories"].values()) == pytest.approx(bd["step_ms"])  # they add up
    paths = write_report(rows, runs, tmp_path / "out")
    assert_png(paths["breakdown"])
    md = paths["md"].read_text()
    assert "## Where the step time goes" in md and "Precision reached: speed-up" in md


def test_report_cli_rebuilds_the_same_table_from_a_repeated_ablation(tmp_path, capsys):
    repeated_ladder(tmp_path / "abl")
    out1, out2 = tmp_path / "r1", tmp_path / "r2"
    assert main([str(tmp_path / "abl"), "--out", str(out1)]) == 0
    assert main([str(tmp_path / "abl"), "--out", str(out2)]) == 0
    assert (out1 / "ablation.csv").read_text() == (out2 / "ablation.csv").read_text()
    table = read_csv(out1 / "ablation.csv")
    assert [r["name"] for r in table] == ["fp32", "tf32", "bf16"]
    assert table[1]["noise"] == "True" and ".." in table[1]["speedup_vs_prev_ci"]


def test_cli_figure_draws_the_reproduction_figure_from_the_record(tmp_path, capsys):
    from gpt2x.lab.figure import reproduction_figure

    run = write_run(tmp_path, "run", "reproduce/rehearsal", 100.0)
    with open(run / "eval.jsonl", "a") as f:
        f.write(json.dumps({"step": 9, "val_loss": 3.55, "hellaswag_acc_norm": 0.25, "tokens_seen": 9}))
        f.write("\n")
    assert main([str(run), "--figure"]) == 0
    assert_png(run / "reproduction.png")
    assert f"wrote {run / 'reproduction.png'}" in capsys.readouterr().out
    # what the PNG shows is the record's data
    ax_loss = reproduction_figure(run).axes[0]
    train = next(line for line in ax_loss.lines if line.get_gid() == "train")
    assert list(train.get_ydata()) == [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert main([str(tmp_path / "nothing"), "--figure"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("gpt2x.report: error:") and "\n" not in err


def test_sweep_repeats_share_one_row(tmp_path):
    # `-m repeat=0,1 trainer.micro_batch_size=1,2`: job folders differ in number and repeat only
    for i, (rep, b, ms) in enumerate([(0, 1, 40.0), (0, 2, 30.0), (1, 1, 44.0), (1, 2, 33.0)]):
        run = write_run(tmp_path, f"{i}_trainer.micro_batch_size={b},repeat={rep}", "", ms)
        rec = json.loads((run / "record.json").read_text())
        rec["config"].update(repeat=rep)
        rec["config"]["trainer"]["micro_batch_size"] = b
        (run / "record.json").write_text(json.dumps(rec))
    rows = summarize(load_runs(tmp_path), x="trainer.micro_batch_size")
    assert [(r["name"], r["repeats"]) for r in rows] == [
        ("trainer.micro_batch_size=1", "2/2"),
        ("trainer.micro_batch_size=2", "2/2"),
    ]
    assert rows[1]["speedup_vs_prev_ci"].n == 2 and rows[1]["best"]


# --------------------------------------------------------------------------------------------
# readable reports: too few repeats, s_to_target's tolerance, what ran, what varies, plots


def two_repeat_ladder(root: Path) -> None:
    """fp32 and bf16, 2 repeats each; the second repeat 40% slower (a busy machine)."""
    for rep in range(2):
        for i, (rung, ms, loss) in enumerate([("fp32", 100.0, 3.5), ("bf16", 50.0, 3.50003)]):
            run = write_run(
                root, f"{i:02d}_{rung}/repeat_{rep}", rung, ms * (1 + 0.4 * rep), loss,
                started=2 * rep + i,
                config={"model": {"n_layer": 1, "n_embd": 64, "n_head": 2},
                        "trainer": {"seq_len": 64, "micro_batch_size": 4}},
            )
            rec = json.loads((run / "record.json").read_text())
            rec["config"]["repeat"] = rep
            (run / "record.json").write_text(json.dumps(rec))


def test_two_repeats_say_too_few_instead_of_a_meaningless_interval(tmp_path):
    from matplotlib.container import ErrorbarContainer

    from gpt2x.lab import plots

    two_repeat_ladder(tmp_path / "abl")
    runs = load_runs(tmp_path / "abl")
    rows = summarize(runs)
    fp32, bf16 = rows
    # the interval is computed (n = 2) but not reported: t = 12.7 makes it +-several 100%
    assert fp32["tokens_per_s_ci"].n == 2 and fp32["tokens_per_s_ci"].half_width_pct > 300
    assert not fp32["tokens_per_s_ci"].reported and bf16["noise"] is None
    paths = write_report(rows, runs, tmp_path / "out")
    md = paths["md"].read_text()
    assert "%" not in md.split("| fp32 |")[1].split("\n")[0]  # no "+-2839.3%"
    assert md.count("too few repeats (2)") == 4  # the tokens/s of both, bf16's two speed-ups
    table = read_csv(paths["csv"])
    assert [r["tokens_per_s_ci"] for r in table] == ["", ""] and table[1]["noise"] == ""
    # no error bar reaching to 3x the bar; the title says why
    ax = plots.tokens_per_s_figure(rows).axes[0]
    assert not [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert "none with fewer than 3" in ax.get_title()


def test_s_to_target_has_a_stated_tolerance(tmp_path):
    """bf16 ends 3e-5 above fp32's final loss: it reaches the target (within 1%), and the
    report says what the target and the tolerance were."""
    two_repeat_ladder(tmp_path / "abl")
    runs = load_runs(tmp_path / "abl")
    rows = summarize(runs)
    assert all(r["s_to_target"] is not None for r in rows)
    # the first step within 1% of 3.5 (<= 3.535): the losses fall by 0.1 per step to 3.5
    fp32_steps = [m["ms"] for m in runs[0].metrics]
    assert rows[0]["s_to_target"] == pytest.approx(statistics.median([
        sum(m["ms"] for m in r.metrics) / 1000.0 for r in runs if r.name == "fp32"
    ]))
    assert len(fp32_steps) == 10
    md = write_report(rows, runs, tmp_path / "out")["md"].read_text()
    assert "within 1% of 3.5000 (the baseline's (fp32) final training loss), i.e. <= 3.5350" in md
    # an explicit target: said as such
    rows = summarize(runs, target_loss=4.0)
    md = write_report(rows, runs, tmp_path / "out2", target_loss=4.0)["md"].read_text()
    assert "within 1% of 4.0000 (--target-loss)" in md


def test_the_header_says_when_the_cpus_instruction_set_was_capped(tmp_path):
    capped = write_run(tmp_path / "abl", "01_fp32", "fp32", 100.0)
    record = json.loads((capped / "record.json").read_text())
    record["hardware"]["cpu_isa_limits"] = {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_BF16"}
    (capped / "record.json").write_text(json.dumps(record))
    write_run(tmp_path / "abl", "02_bf16", "bf16", 50.0)
    # the two runs ran on different machines in effect: two hardware lines, one naming the cap
    assert header.build_header(load_runs(tmp_path / "abl"))["hardware"] == [
        "NVIDIA H100 80GB HBM3 (cuda); CPU x86_64 x16; host node1; "
        "ONEDNN_MAX_CPU_ISA=AVX512_CORE_BF16",
        "NVIDIA H100 80GB HBM3 (cuda); CPU x86_64 x16; host node1",
    ]


def test_ablation_header_names_the_shape_that_ran_and_each_repeat(tmp_path):
    two_repeat_ladder(tmp_path / "abl")
    runs = load_runs(tmp_path / "abl")
    rows = summarize(runs)
    manifest = {
        "name": "abl", "ladder": "nano_cpu", "ladder_file": "experiments/ladder/nano_cpu.yml",
        "description": "nano GPT-2 (4 x 256, T=256), B=8", "command": "python -m gpt2x.ablate",
        "steps": 7, "warmup": 3, "repeats": 2, "interleave": "steps",
        "overrides": ["model.n_layer=1", "model.n_embd=64"],
        "rungs": [
            {"index": i + 1, "short": rung, "repeat": rep, "config_hash": f"h{i}{rep}",
             "status": "completed"}
            for rep in range(2) for i, rung in enumerate(["fp32", "bf16"])
        ],
    }
    facts = header.ablation_header(runs, rows, manifest)
    # the ladder's description (its own shape) is not what ran: the header says what did
    assert facts["ladder"] == "nano_cpu (experiments/ladder/nano_cpu.yml)"
    assert facts["shape"].startswith("1 layers x 64 wide, 2 heads, T=64, B=4 (set by the overrides")
    assert "the ladder's: nano GPT-2 (4 x 256, T=256), B=8" in facts["shape"]
    assert facts["config hashes"] == [
        "01 fp32 repeat 0: h00 (completed)", "02 bf16 repeat 0: h10 (completed)",
        "01 fp32 repeat 1: h01 (completed)", "02 bf16 repeat 1: h11 (completed)",
    ]
    # no overrides: the ladder's description is what ran, and stays on the ladder line
    facts = header.ablation_header(runs, rows, {**manifest, "overrides": [], "repeats": 1})
    assert facts["ladder"].endswith(": nano GPT-2 (4 x 256, T=256), B=8")
    assert facts["config hashes"][0] == "01 fp32: h00 (completed)"


@pytest.mark.parametrize("folder", ["ladder-cpu", "beyond-cpu"])
def test_the_committed_benchmark_manifests_still_give_their_header_lines(folder):
    """A rebuild (`python -m gpt2x.report benchmarks/<folder>`) needs ablation.json and the rung
    folders' records; the records stayed in outputs/ (not committed), the manifests are here:
    what the header takes from them reads as the committed ablation.md says. (The ladder line
    and the repeats' config-hash labels changed after ladder-cpu was measured.)"""
    from gpt2x.lab.tables import header_lines

    bench = REPO / "benchmarks" / folder
    manifest = json.loads((bench / "ablation.json").read_text())
    lines = header_lines(header.ablation_header([], [], manifest))
    md = (bench / "ablation.md").read_text().splitlines()
    for key in ("ablation", "ablate command", "measured", "overrides for every rung"):
        (line,) = [x for x in lines if x.startswith(f"- **{key}**: ")]
        assert line in md, line


def test_sweep_summary_shows_what_varies(tmp_path):
    """Job folders repeat every override of the command line (and end in a hash when long):
    a row is named by the overrides that differ, and the table keeps the sweep's columns."""
    common = ["trainer.max_steps=10", "model.n_layer=1", "model.n_embd=64", "+sweep=batch_size"]
    for i, (b, ms) in enumerate([(1, 40.0), (2, 30.0), (4, 25.0)]):
        for rep in range(3):
            folder = f"{3 * i + rep}_trainer.micro_batch_size={b},repeat={rep},model.n_-{i}{rep}ab"
            run = write_run(tmp_path / "sweep", folder, "", ms * (1 + 0.01 * rep))
            rec = json.loads((run / "record.json").read_text())
            rec["config"].update(repeat=rep)
            rec["config"]["trainer"]["micro_batch_size"] = b
            rec["overrides"] = [f"trainer.micro_batch_size={b}", f"repeat={rep}", *common]
            (run / "record.json").write_text(json.dumps(rec))
    runs = load_runs(tmp_path / "sweep")
    assert {r.name for r in runs} == {f"trainer.micro_batch_size={b}" for b in (1, 2, 4)}
    rows = summarize(runs, x="trainer.micro_batch_size")
    md = write_report(rows, runs, tmp_path / "out", x="trainer.micro_batch_size")["md"]
    text = md.read_text()
    header = next(line for line in text.splitlines() if line.startswith("| "))
    assert header.split(" | ")[0] == "| trainer.micro_batch_size"  # the name only repeated it
    assert len(header.split(" | ")) <= 12 and "config_hash" not in header and "p10_ms" not in header
    assert "All rows: status completed, repeats 3/3, steps 10, world_size 1." in text
    assert "**Best**: trainer.micro_batch_size=4: " in text
    assert len(read_csv(tmp_path / "out" / "ablation.csv")[0]) == len(COLUMNS) + 2  # all kept


def test_plots_keep_titles_inside_and_long_names_from_squeezing_the_plot(tmp_path):
    from gpt2x.lab import plots

    root = tmp_path / "runs"
    names = [
        "ladder/beyond/reduce_overhead",
        "trainer.micro_batch_size=16,optim.lr=0.0006,model.n_embd=768,precision=bf16",
        "an_experiment_name_with_no_separators_at_all_that_goes_on_and_on",
    ]
    for i, name in enumerate(names):
        write_run(root, f"r{i}", name, 100.0 - 10 * i, started=i)
    runs = load_runs(root)
    rows = summarize(runs)
    bars, loss = plots.tokens_per_s_figure(rows), plots.loss_figure([d.curve for d in details(runs, rows)])
    for fig, texts in ((bars, "get_xticklabels"), (loss, "legend")):
        fig.tight_layout()
        fig.canvas.draw()
        ax = fig.axes[0]
        box = fig.bbox
        named = ax.get_xticklabels() if texts == "get_xticklabels" else ax.get_legend().get_texts()
        for text in (ax.title, *named):
            extent = text.get_window_extent()
            assert box.x0 <= extent.x0 and extent.x1 <= box.x1, text.get_text()
            assert box.y0 <= extent.y0 and extent.y1 <= box.y1, text.get_text()
        assert ax.get_position().height > 0.5  # the names do not squeeze the plot
        assert fig.get_figwidth() < 12
    labels = [t.get_text() for t in plots.tokens_per_s_figure(rows).axes[0].get_xticklabels()]
    assert labels[0] == "ladder/beyond/\nreduce_overhead"
    assert all(len(line) <= 22 for label in labels for line in label.splitlines())
    assert all(label.count("\n") <= 2 for label in labels)


def test_report_of_several_folders_never_writes_into_one_of_them(tmp_path, monkeypatch, capsys):
    a = write_run(tmp_path, "run-a", "a", 100.0)
    b = write_run(tmp_path, "run-b", "b", 50.0)
    monkeypatch.chdir(tmp_path)
    assert main([str(a), str(b)]) == 0
    assert sorted(p.name for p in a.iterdir()) == ["eval.jsonl", "metrics.jsonl", "record.json"]
    (out,) = (tmp_path / "outputs" / "reports").iterdir()
    assert (out / "ablation.md").is_file() and str(out.relative_to(tmp_path)) in capsys.readouterr().out


def test_a_precision_auto_run_hashes_as_what_was_asked_for():
    """A repeat whose record was written from the composed config (it failed before choosing)
    and repeats that chose bf16 or fp32 are one configuration: precision=auto. Other precisions
    keep their dtype in the hash."""
    from gpt2x.record.folder import config_hash

    def cfg(name: str, dtype: str) -> dict:
        return {"model": {"n_layer": 1}, "precision": {"name": name, "dtype": dtype, "tf32": True}}

    auto = {config_hash(cfg("auto", d)) for d in ("auto", "bf16", "fp32")}
    assert len(auto) == 1
    assert config_hash(cfg("bf16", "bf16")) != config_hash(cfg("bf16", "fp32"))
    assert config_hash(cfg("bf16", "bf16")) not in auto
