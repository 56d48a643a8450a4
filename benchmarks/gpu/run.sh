#!/usr/bin/env bash
# The GPU suite in one command, from the repository root:
#   bash benchmarks/gpu/run.sh            # pytest -m gpu, then every benchmark at GPU sizes (< 8 min)
#   bash benchmarks/gpu/run.sh --dry-run  # list steps and budgets, check every import the run needs
#   bash benchmarks/gpu/run.sh --smoke    # every step at toy sizes (CPU check of the scripts)
# Results go to $OUT (or benchmarks/results/gpu-run): summary.json, log.txt, results.tar.gz.
# PYTHON picks the interpreter (default: python3, the one that holds torch on the lent machine).
set -euo pipefail
cd "$(dirname "$0")/../.."
PY="${PYTHON:-python3}"

# 1. wheels that benchmarks/gpu/prepare.sh put into .whl/ (none are needed today: the GPU path imports
#    without the packages the device image lacks); installed into a private directory, never system-wide.
if compgen -G ".whl/*.whl" > /dev/null; then
  SITE="$(mktemp -d)/site"
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
fi

# 2. the repository's packages without installing them: guidedecode/ plus kernels/ and cli/ as
#    guidedecode.kernels and guidedecode.cli (the pyproject's package-dir), as a tree of symbolic links.
SRC="$(mktemp -d)/src"
mkdir -p "$SRC/guidedecode"
cp -rs "$PWD/guidedecode/." "$SRC/guidedecode/"
rm -rf "$SRC/guidedecode/kernels" "$SRC/guidedecode/cli"
cp -rs "$PWD/kernels" "$SRC/guidedecode/kernels"
cp -rs "$PWD/cli" "$SRC/guidedecode/cli"
export PYTHONPATH="$SRC${PYTHONPATH:+:$PYTHONPATH}"
# ... and never the repository's own guidedecode/ (no kernels/ inside) through the working directory, also
# in the Python processes the tests start
export PYTHONSAFEPATH=1
# git may refuse a checkout owned by another user (the results record the commit): trust it for this run only
export GIT_CONFIG_COUNT=1 GIT_CONFIG_KEY_0=safe.directory GIT_CONFIG_VALUE_0="$PWD"

exec "$PY" benchmarks/gpu/suite.py --python "$PY" "$@"
