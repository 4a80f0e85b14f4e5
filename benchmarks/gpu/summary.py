"""Write REPORT_DIR/summary.md for benchmarks/gpu/check.sh (GPU, versions, tests, ladder).

    python benchmarks/gpu/summary.py REPORT_DIR --seconds S --batch B --tests-rc N --ladder-rc N
"""

from __future__ import annotations

import argparse
import platform
import subprocess
import xml.etree.ElementTree as ET
from pathlib import Path

import torch


def nvidia_smi() -> str:
    try:
        out = subprocess.run(
            ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        return out.stdout.strip() or out.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        return f"nvidia-smi unavailable ({e})"


def test_counts(xml_path: Path) -> str:
    """'passed P, failed F, errors E, skipped S of N' from pytest's junit xml."""
    if not xml_path.exists():
        return "not run (no pytest.xml; see pytest.log)"
    root = ET.parse(xml_path).getroot()
    suite = root if root.tag == "testsuite" else root.find("testsuite")
    n, failed, errors, skipped = (
        int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")
    )
    passed = n - failed - errors - skipped
    return f"passed {passed}, failed {failed}, errors {errors}, skipped {skipped} of {n}"


def ladder_table(ablation_md: Path) -> str:
    if not ablation_md.exists():
        return "no ladder table (see ladder.log)"
    lines = ablation_md.read_text().splitlines()
    return "\n".join(line for line in lines if line.startswith("|")) or "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("report", type=Path)
    p.add_argument("--seconds", type=int, required=True)
    p.add_argument("--batch", type=int, required=True)
    p.add_argument("--tests-rc", type=int, required=True)
    p.add_argument("--ladder-rc", type=int, required=True)
    a = p.parse_args()
    props = torch.cuda.get_device_properties(0)
    ok = a.tests_rc == 0 and a.ladder_rc == 0
    text = f"""# GPU check: {"PASSED" if ok else "FAILED"}

| | |
|---|---|
| GPU | {torch.cuda.get_device_name(0)} ({props.total_memory / 2**30:.0f} GiB), \
{torch.cuda.device_count()} visible |
| nvidia-smi (name, driver, memory) | {nvidia_smi()} |
| torch / CUDA / cuDNN | {torch.__version__} / {torch.version.cuda} / \
{torch.backends.cudnn.version()} |
| Python / host | {platform.python_version()} / {platform.node()} |
| total wall time | {a.seconds // 60} min {a.seconds % 60} s |

## (a) `python -m pytest -m cuda tests/test_cuda.py` (exit {a.tests_rc})

{test_counts(a.report / "pytest.xml")}; log: `pytest.log`, junit: `pytest.xml`.

## (b) ladder gpt2_124m, 20 measured + 5 warm-up steps, B={a.batch}, T=1024 (exit {a.ladder_rc})

{ladder_table(a.report / "ladder" / "ablation.md")}

Plots and commands: `ladder/` (ablation.md, loss.png, tokens_per_s.png); log: `ladder.log`.
"""
    (a.report / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
