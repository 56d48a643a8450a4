#!/usr/bin/env bash
# Prepare the GPU suite on a machine with network access (here), before it travels to a GPU machine that
# has none. From the repository root:  bash benchmarks/gpu/prepare.sh
#
# 1. Wheels: the device image has torch, transformers, triton, tokenizers, safetensors, matplotlib, pytest
#    (+ pytest-timeout), peft, click, accelerate, but not datasets, math-verify, outlines, gguf. The GPU
#    path imports none of those (they are imported lazily, where data sets are loaded or answers checked),
#    so benchmarks/gpu/wheels.txt lists nothing today. Any NAME==VERSION line added there is downloaded
#    here for CPython 3.12 on x86-64 into the ignored .whl/ (pass `carry: [".whl"]` to the device call),
#    and run.sh installs it into a private directory there.
# 2. The dry run, with those packages made unimportable: every import the GPU run needs.
# 3. The size of what travels (tracked + untracked-not-ignored files + .whl): at most 64 MiB.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}"

mkdir -p .whl
mapfile -t wanted < <(grep -v '^\s*#' benchmarks/gpu/wheels.txt | grep -v '^\s*$' || true)
if [ "${#wanted[@]}" -gt 0 ]; then
  "$PY" -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform any -d .whl "${wanted[@]}"
fi
echo "wheels in .whl/: $(ls .whl | wc -l)"

PYTHON="$PY" bash benchmarks/gpu/run.sh --dry-run

bytes=$( { git ls-files -z; git ls-files -z --others --exclude-standard; find .whl -type f -print0; } \
  | xargs -0 -r stat -c %s 2>/dev/null | awk '{s += $1} END {print s + 0}')
echo "travels: $((bytes / 1048576)) MiB of 64 MiB"
[ "$bytes" -lt $((64 * 1048576)) ] || { echo "too large for the device (64 MiB)"; exit 1; }
