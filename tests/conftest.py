"""Shared fixtures. Sets TRITON_INTERPRET=1 on machines without CUDA *before* any kernel module is
imported, so every Triton kernel runs (in the NumPy interpreter) against its torch reference."""

import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# Tests never download: a Hub id resolves from the local Hub cache only (read at call time by load_model).
os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
# The test machines keep the data sets beside the repository; the library finds them through $GUIDEDECODE_DATA
# (also in the scripts and CLIs the tests start as subprocesses).
DATA_DIR = Path(os.environ.get("GUIDEDECODE_DATA", REPO.parent / "shared" / "data"))
os.environ.setdefault("GUIDEDECODE_DATA", str(DATA_DIR))


@pytest.fixture(scope="session")
def data_dir() -> Path:
    if not DATA_DIR.is_dir():
        pytest.fail(f"data directory {DATA_DIR} not found: put ../shared beside the repo or set GUIDEDECODE_DATA")
    return DATA_DIR


@pytest.fixture(scope="session")
def embedded():
    """(model, tokenizer) of the embedded default model, loaded once per session."""
    from guidedecode.models import load_model

    return load_model("smollm2-135m-instruct")


@pytest.fixture(scope="session")
def embedded_tokenizer(embedded):
    return embedded[1]


@pytest.fixture(scope="session")
def tiny_llama_with_tokenizer(embedded_tokenizer):
    """A tiny random Llama whose vocabulary matches the embedded tokenizer (real BPE boundaries)."""
    from guidedecode.testing import tiny_model

    return tiny_model("llama", seed=0, vocab_size=len(embedded_tokenizer)), embedded_tokenizer


@pytest.fixture
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared CPU, two threads thrash (10x slower).
    Use with ``pytestmark = pytest.mark.usefixtures("one_torch_thread")``."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
