#!/usr/bin/env bash
# Fill .whl/ (git-ignored) with the wheels the GPU check needs and the GPU machine lacks
# (benchmarks/gpu/wheels.txt), for CPython 3.12 on manylinux x86_64. Run where PyPI is reachable
# (here, CI); carry .whl/ beside the checkout to the GPU machine (benchmarks/gpu/README.md).
#
#   bash benchmarks/gpu/wheels.sh            # idempotent: wheels already in .whl/ are kept
#
# Environment: PYTHON (default python3): the pip that downloads and builds.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
dest=.whl
mkdir -p "$dest"
mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' benchmarks/gpu/wheels.txt | tr -d ' ')
# the device's interpreter and platform; --no-deps: wheels.txt names every wheel needed
target=(--python-version 3.12 --implementation cp --abi cp312 --platform manylinux_2_28_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
for req in "${wanted[@]}"; do
    name=${req%%==*}
    version=${req##*==}
    stem=$(echo "$name" | tr '-' '_')
    if compgen -G "$dest/${stem}-${version}-*.whl" >/dev/null; then
        continue  # already here
    fi
    if [ "$name" = antlr4-python3-runtime ]; then
        # only a source archive on PyPI: build it into a pure-Python wheel here
        "$PY" -m pip wheel -q --no-deps --no-cache-dir -w "$dest" "$req"
    else
        "$PY" -m pip download -q --no-deps --only-binary=:all: "${target[@]}" -d "$dest" "$req"
    fi
done
# exactly the wanted set: a stale version beside a new one would stop the install there
for whl in "$dest"/*.whl; do
    base=$(basename "$whl")
    keep=0
    for req in "${wanted[@]}"; do
        stem=$(echo "${req%%==*}" | tr '-' '_')
        case "$base" in "${stem}-${req##*==}-"*) keep=1 ;; esac
    done
    if [ "$keep" = 0 ]; then
        echo "wheels.sh: removing $whl (not in benchmarks/gpu/wheels.txt)"
        rm -f "$whl"
    fi
done
count=$(compgen -G "$dest/*.whl" | wc -l)
if [ "$count" -ne "${#wanted[@]}" ]; then
    echo "wheels.sh: error: $count wheels in $dest, expected ${#wanted[@]} (benchmarks/gpu/wheels.txt)" >&2
    exit 1
fi
size=$(du -cb "$dest"/*.whl | tail -1 | cut -f1)
if [ "$size" -gt $((64 * 1024 * 1024)) ]; then
    echo "wheels.sh: error: $dest holds $size bytes, over the 64 MiB that travel" >&2
    exit 1
fi
echo "wheels.sh: $count wheels, $((size / 1024)) KiB in $dest: $(cd "$dest" && ls -1 *.whl | tr '\n' ' ')"
