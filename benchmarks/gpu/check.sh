#!/usr/bin/env bash
# One-command GPU check: do all options run, and run right, on this machine's CUDA GPU?
#
#   pip install -e . && bash benchmarks/gpu/check.sh [REPORT_DIR]
#
# (a) python -m pytest -m cuda tests/test_cuda.py       -> REPORT_DIR/pytest.{log,xml}
# (b) the gpt2_124m ladder, 20 measured + 5 warm-up steps -> REPORT_DIR/ladder/ (table, plots)
# (c) REPORT_DIR/summary.md: GPU, driver/CUDA/torch versions, test counts, ladder table, wall time
# REPORT_DIR defaults to outputs/gpu-check-<date>/. About 6-8 minutes on one H100/H200.
# Exit status: 0 all passed, 1 a test or rung failed, 3 no CUDA GPU here (nothing is run).
# Environment: PYTHON (default python), GPT2X_CHECK_B (the ladder's micro batch, see below).
set -uo pipefail

PY=${PYTHON:-python}
t0=$(date +%s)
if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "torch is not importable with $PY: run 'pip install -e .' first (or set PYTHON=...)"
    exit 2
fi
if ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
    exit 3
fi

# REPORT_DIR relative to the caller's folder; the default relative to the repository
if [ $# -ge 1 ]; then
    mkdir -p "$1" && report=$(cd "$1" && pwd)
fi
cd "$(dirname "$0")/../.." || exit 2
report=${report:-$PWD/outputs/gpu-check-$(date +%Y%m%d-%H%M%S)}
mkdir -p "$report"
echo "gpu check: report in $report"
export WANDB_MODE=disabled HF_HUB_OFFLINE=1

# (a) the CUDA tests. addopts is replaced so that --strict-markers cannot fail the run where
# the `cuda` marker is not registered; the rest of pyproject's pytest settings apply.
tests_rc=0
if "$PY" -c "import pytest" 2>/dev/null; then
    echo "== (a) pytest -m cuda tests/test_cuda.py"
    timeout 330 "$PY" -m pytest -m cuda tests/test_cuda.py -o addopts="-ra" \
        --junitxml="$report/pytest.xml" 2>&1 | tee "$report/pytest.log"
    tests_rc=${PIPESTATUS[0]}
else
    echo "pytest is not installed: pip install pytest (or pip install -e '.[dev]'); tests skipped" \
        | tee "$report/pytest.log"
    tests_rc=1
fi

# (b) the ladder. B: the lecture's 16 where the fp32 rung (naive attention, fp32 activations,
# ~40 GB at B=16, T=1024) fits; 8 on smaller GPUs. A probe run per candidate B would cost
# ~30 s each of the 8-minute budget; GPT2X_CHECK_B=32 tries a bigger one (a rung that runs out
# of memory is recorded as failed, the others still run).
if [ -z "${GPT2X_CHECK_B:-}" ]; then
    gb=$("$PY" -c "import torch; print(torch.cuda.get_device_properties(0).total_memory >> 30)")
    if [ "$gb" -ge 60 ]; then GPT2X_CHECK_B=16; else GPT2X_CHECK_B=8; fi
fi
echo "== (b) ladder gpt2_124m, B=$GPT2X_CHECK_B"
"$PY" -m gpt2x.ablate ladder=gpt2_124m steps=20 warmup=5 repeats=1 out="$report/ladder" timeout=150 \
    -- logger=none trainer.micro_batch_size="$GPT2X_CHECK_B" 2>&1 | tee "$report/ladder.log"
ladder_rc=${PIPESTATUS[0]}

# (c) summary.md
"$PY" benchmarks/gpu/summary.py "$report" --seconds $(($(date +%s) - t0)) \
    --batch "$GPT2X_CHECK_B" --tests-rc "$tests_rc" --ladder-rc "$ladder_rc"
echo "gpu check: $report/summary.md"
[ "$tests_rc" -eq 0 ] && [ "$ladder_rc" -eq 0 ]
