#!/usr/bin/env bash
# The GPU check: do gpt2x's options run, and run right, on this machine's CUDA GPU, and how fast
# is the lecture's ladder on it? Made for a machine with no network (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/check.sh --out DIR [--part PARTS] [--budget SECONDS] [--rehearse]
#
# 1. installs the wheels in .whl/ (bash benchmarks/gpu/wheels.sh fills it where PyPI is
#    reachable) with pip --no-index into a folder outside the checkout, and puts that folder and
#    the checkout on PYTHONPATH (no `pip install -e .`: its dependencies would need PyPI);
# 2. runs benchmarks/gpu/check.py: every import checked first, then (--part lecture, the
#    default) the in-process CUDA tests, the gpt2_124m ladder (B=16, T=1024), the fused rung at
#    B=64 and Hugging Face's GPT2LMHeadModel at the same setting, each only while --budget
#    (default 480 s, this whole command) allows it. Later parts: --part lecture_code (the
#    lecture's own train_gpt2.py: --lecture FILE, default .lecture/train_gpt2.py, carried
#    beside the checkout; n/a without it), --part beyond (the beyond ladder's single-GPU rungs:
#    chunked, reduce_overhead, block, ckpt, fp8, muon against fused), --part memory (the largest
#    micro batch that fits, loss=plain vs loss=chunked), --part chunk (loss=chunked's chunk
#    size against the plain loss); comma-separated, in the order given;
# 3. DIR gets at most 8 plain files: summary.md, summary.json, check.log, pytest.xml, runs.tar.gz.
#
# --rehearse runs every section on the CPU with a tiny model (CI runs it in a fresh venv).
# Exit status: 0 every section ran and passed; 1 a check or rung failed, or the budget stopped
# or skipped a section (summary.md says which: FAILED or INCOMPLETE); 2 bad usage or a missing
# import; 3 no CUDA GPU here and no --rehearse (nothing run).
# Environment: PYTHON (default python3).
set -uo pipefail
started=$(date +%s)
here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
PY=${PYTHON:-python3}
usage="usage: bash benchmarks/gpu/check.sh --out DIR [--part lecture|lecture_code|beyond|memory|chunk[,...]] [--lecture FILE] [--budget SECONDS] [--rehearse]"

out="" budget=480 rehearse="" part=lecture lecture=$repo/.lecture/train_gpt2.py
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=${2:-}; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --out=*) out=${1#--out=}; shift ;;
        --budget) budget=${2:-}; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --budget=*) budget=${1#--budget=}; shift ;;
        --part) part=${2:-}; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --part=*) part=${1#--part=}; shift ;;
        --lecture) lecture=${2:-}; shift 2 || { echo "$usage" >&2; exit 2; } ;;
        --lecture=*) lecture=${1#--lecture=}; shift ;;
        --rehearse) rehearse=--rehearse; shift ;;
        -h|--help) echo "$usage"; exit 0 ;;
        *) echo "check.sh: unknown argument '$1'; $usage" >&2; exit 2 ;;
    esac
done
if [ -z "$out" ]; then
    echo "check.sh: --out DIR is required (where summary.md and the logs go); $usage" >&2
    exit 2
fi
for p in ${part//,/ }; do
    case "$p" in
        lecture|lecture_code|beyond|memory|chunk) ;;
        *) echo "check.sh: --part '$part': each of lecture, lecture_code, beyond, memory, chunk (comma-separated)" >&2
           exit 2 ;;
    esac
done
[ -n "${part//,/}" ] || { echo "check.sh: --part is empty; $usage" >&2; exit 2; }
case "$budget" in
    ''|*[!0-9]*) echo "check.sh: --budget '$budget' must be whole seconds, e.g. --budget 480" >&2
                 exit 2 ;;
esac

if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "check.sh: torch is not importable with $PY (set PYTHON=... to the python that has it)" >&2
    exit 2
fi
if [ -z "$rehearse" ] &&
    ! "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null
then
    echo "no CUDA GPU here (torch.cuda.is_available() is False): nothing to check"
    exit 3
fi

# the carried wheels, into a folder outside the checkout (nothing is written into the repo)
site=$(mktemp -d "${TMPDIR:-/tmp}/gpt2x-site.XXXXXX")
if compgen -G "$repo/.whl/*.whl" >/dev/null; then
    if ! "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --disable-pip-version-check --target "$site" "$repo"/.whl/*.whl; then
        echo "check.sh: pip could not install $repo/.whl/*.whl (run bash benchmarks/gpu/wheels.sh again)" >&2
        exit 2
    fi
else
    echo "check.sh: no .whl/ in $repo: using the packages installed here" \
        "(on the GPU machine: bash benchmarks/gpu/wheels.sh first and carry .whl)"
fi
# the checkout first: its gpt2x, importable from the temporary folders the checks run in
export PYTHONPATH="$repo:$site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 WANDB_MODE=disabled HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
exec "$PY" "$here/check.py" --out "$out" --budget "$budget" --part "$part" \
    --lecture "$lecture" --started "$started" $rehearse
