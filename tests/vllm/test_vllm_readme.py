"""The README's vLLM examples (blocks marked ``<!-- readme-venv: vllm -->``) run as written, as scripts,
in the vLLM environment; ``tests/test_readme.py`` runs every other block in the main one."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

pytest.importorskip("vllm")

_spec = importlib.util.spec_from_file_location("readme_runner", Path(__file__).resolve().parents[1] / "test_readme.py")
readme = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = readme  # dataclasses look their module up there
_spec.loader.exec_module(readme)

BLOCKS = [b for b in readme.BLOCKS if b.venv == "vllm" and not b.no_run]


def test_the_readme_has_vllm_examples():
    assert BLOCKS, "README.md has no block marked <!-- readme-venv: vllm -->"


@pytest.mark.slow
@pytest.mark.timeout(readme.TIMEOUT_S + 60)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_vllm_readme_block_runs_as_a_script(block, tmp_path):
    readme.run_block(block, tmp_path)
