"""Every ```python block of README.md runs as written.

Each block is saved as a script and run by this project's Python in a fresh process whose working
directory is an empty temporary directory, as a user who copies it from a fresh clone would (after the
README's setup commands). New sections are picked up automatically. A block that is deliberately not
runnable is preceded by a ``<!-- no-run: reason -->`` line; keep those rare. A block that needs another
environment names it, ``<!-- readme-venv: vllm -->``: it runs there (``tests/vllm/test_vllm_readme.py``).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
FENCE = re.compile(r"^```(python|py)\s*$")
NO_RUN = re.compile(r"^<!--\s*no-run:\s*(\S.*?)\s*-->$")
VENV = re.compile(r"^<!--\s*readme-venv:\s*([\w-]+)\s*-->$")
TIMEOUT_S = 1500  # per block; a block takes 0.5-3 min of CPU time, far longer on a busy machine


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the block's first code line
    heading: str  # the section it is in
    code: str
    no_run: str | None  # the reason given in a <!-- no-run: ... --> line right above the fence
    venv: str | None = None  # the environment named in a <!-- readme-venv: ... --> line right above the fence

    @property
    def name(self) -> str:
        slug = re.sub(r"[^a-z0-9]+", "-", self.heading.lower()).strip("-")[:40]
        return f"L{self.line}-{slug}"


def python_blocks(text: str) -> list[Block]:
    """The ```python (or ```py) blocks of a Markdown text, in order; an unclosed fence is an error."""
    lines = text.splitlines()
    blocks, heading, i = [], "top", 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("#"):
            heading = line.lstrip("#").strip()
        if FENCE.match(line.strip()):
            end = next((j for j in range(i + 1, len(lines)) if lines[j].strip() == "```"), None)
            if end is None:
                raise ValueError(f"README.md line {i + 1}: a ```python fence is never closed")
            above = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
            marked, venv = NO_RUN.match(above), VENV.match(above)
            blocks.append(Block(i + 2, heading, "\n".join(lines[i + 1 : end]) + "\n",
                                marked.group(1) if marked else None, venv.group(1) if venv else None))
            i = end
        i += 1
    return blocks


BLOCKS = python_blocks(README.read_text(encoding="utf-8"))


def test_the_extractor_finds_blocks_and_no_run_marks():
    text = ("# A\n\n```python\nprint(1)\n```\n\n## B\n<!-- no-run: needs a GPU -->\n\n```py\nimport x\n```\n"
            "```bash\nls\n```\n")
    first, second = python_blocks(text)
    assert (first.line, first.heading, first.code, first.no_run) == (4, "A", "print(1)\n", None)
    assert (second.heading, second.code, second.no_run) == ("B", "import x\n", "needs a GPU")
    with pytest.raises(ValueError, match="never closed"):
        python_blocks("```python\nprint(1)\n")
    assert len(BLOCKS) >= 3  # the README does have examples to run


@pytest.mark.slow
@pytest.mark.timeout(TIMEOUT_S + 60)
@pytest.mark.parametrize("block", BLOCKS, ids=[b.name for b in BLOCKS])
def test_readme_python_block_runs_as_a_script(block, tmp_path):
    if block.no_run:
        pytest.skip(f"README.md line {block.line} is marked no-run: {block.no_run}")
    if block.venv:
        pytest.skip(f"README.md line {block.line} runs in the {block.venv} environment (tests/{block.venv})")
    run_block(block, tmp_path)


def run_block(block: Block, tmp_path: Path) -> None:
    """Save ``block`` as a script in ``tmp_path`` and run it with this Python; it must exit 0."""
    script = tmp_path / "example.py"
    script.write_text(block.code, encoding="utf-8")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # set by conftest for the kernel tests; a user's shell does not have it
    result = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=TIMEOUT_S, stdin=subprocess.DEVNULL)
    assert result.returncode == 0, (
        f"README.md line {block.line} ({block.heading}) exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout[-3000:]}\n--- stderr ---\n{result.stderr[-6000:]}")
