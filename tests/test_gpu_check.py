"""benchmarks/gpu/check.sh on a machine without CUDA: one plain line, exit 3, nothing run."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.skipif(torch.cuda.is_available(), reason="with CUDA the check really runs")
def test_gpu_check_without_cuda_says_so_and_exits_3(tmp_path):
    report = tmp_path / "report"
    proc = subprocess.run(
        ["bash", str(REPO / "benchmarks" / "gpu" / "check.sh"), str(report)],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 3, proc.stdout + proc.stderr
    assert proc.stdout == (
        "no CUDA GPU here (torch.cuda.is_available() is False): nothing to check\n"
    )
    assert not report.exists()  # no report, no tests, no ladder


def test_gpu_summary_counts_junit_results(tmp_path):
    """The summary's pass/fail counts come from pytest's junit xml."""
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "gpu_summary", REPO / "benchmarks" / "gpu" / "summary.py"
    )
    summary = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summary)
    xml = tmp_path / "pytest.xml"
    xml.write_text(
        '<testsuites><testsuite name="pytest" tests="13" failures="2" errors="1" skipped="3">'
        "</testsuite></testsuites>"
    )
    assert summary.test_counts(xml) == "passed 7, failed 2, errors 1, skipped 3 of 13"
    assert summary.test_counts(tmp_path / "missing.xml").startswith("not run")
    md = tmp_path / "ablation.md"
    md.write_text("# ladder\n\n| rung | tokens/s |\n|---|---:|\n| fp32 | 1 |\n\nmore\n")
    assert summary.ladder_table(md) == "| rung | tokens/s |\n|---|---:|\n| fp32 | 1 |"
