"""Issue 8, items 14, 16, 17 and 21: help generated from the registry, `generate --strategy` budgets,
`guidedecode bench` output and cwd, Hub model ids and --device / --dtype."""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

from guidedecode.cli.main import app
from guidedecode.registry import CONTEXT_ONLY, GUIDES, STRATEGIES

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from guidedecode.models import load_tokenizer
    from guidedecode.testing import tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    directory = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


# ------------------------------------------------------------------------------------ 8.14 / 8.16


@pytest.mark.parametrize("command", ["eval", "generate"])
def test_help_lists_every_registered_guide_strategy_and_parameter(command):
    result = CliRunner().invoke(app, [command, "--help"], terminal_width=200)
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    for table in (GUIDES, STRATEGIES):
        for name, factory in table.items():
            assert f" {name} " in text, name
            for key in inspect.signature(factory).parameters:
                if key not in ("tokenizer", *CONTEXT_ONLY):
                    assert f"{key}=" in text, (name, key)


def test_eval_help_separates_problems_from_a_strategy_budget():
    text = " ".join(CliRunner().invoke(app, ["eval", "--help"], terminal_width=200).output.split())
    assert "evaluate the first N problems of the task (not a strategy's budget: that is -p n=K)" in text


def test_unknown_parameter_key_is_refused_before_anything_loads(tmp_path):
    from guidedecode.errors import ValidationError

    result = CliRunner().invoke(app, ["eval", "--task", "synthetic", "--strategy", "self-consistency", "-p", "m=3",
                                      "--out", str(tmp_path / "run")])
    assert isinstance(result.exception, ValidationError)
    assert "strategy 'self-consistency' has no parameter 'm' (it takes: n, " in str(result.exception)
    assert not (tmp_path / "run" / "config.json").exists()


def test_generate_strategy_honours_max_new_tokens(tiny_dir, monkeypatch):
    from guidedecode.backends.hf import HFBackend

    budgets = []
    real = HFBackend._generate

    def spy(self, prompts, n, *, max_new_tokens, **kwargs):
        budgets.append(max_new_tokens)
        return real(self, prompts, n, max_new_tokens=max_new_tokens, **kwargs)

    monkeypatch.setattr(HFBackend, "_generate", spy)
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--strategy",
                                      "self-consistency", "-p", "n=2", "--max-new-tokens", "7", "--device", "cpu"])
    assert result.exit_code == 0, (result.output, result.exception)
    assert budgets and set(budgets) == {7}
    budgets.clear()  # an explicit -p max_new_tokens still wins for the strategy's own budget
    result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--strategy",
                                      "self-consistency", "-p", "n=2", "-p", "max_new_tokens=3"])
    assert result.exit_code == 0 and set(budgets) == {3}


def test_generate_with_a_strategy_that_renders_its_own_chat(tiny_dir):
    """revision and dots add chat turns themselves: generate hands them the message, not the rendered prompt."""
    for strategy, params in (("revision", ["-p", "k=2"]), ("dots", ["-p", "trajectory=CoT"])):
        result = CliRunner().invoke(app, ["generate", "--model", str(tiny_dir), "--prompt", "Hi", "--strategy",
                                          strategy, *params, "--max-new-tokens", "4", "--device", "cpu"])
        assert result.exit_code == 0, (strategy, result.output, result.exception)


# ------------------------------------------------------------------------------------------ 8.17


FAKE_BENCH = '''"""A benchmark for the test."""
import argparse

from guidedecode.bench import write_result

parser = argparse.ArgumentParser(description="fake benchmark")
parser.add_argument("--size", type=int, default=3, help="the fake size option")
args = parser.parse_args()
print(write_result("fake", {"size": args.size}))
'''


def _cli(args, cwd, env=None):
    command = [sys.executable, "-c", "from guidedecode.cli.main import main; main()", *args]
    return subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=120,
                          env={**os.environ, **(env or {})})


def test_bench_writes_to_a_directory_of_the_users_choosing(tmp_path):
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    (scripts / "bench_fake.py").write_text(FAKE_BENCH)
    env = {k: "" for k in ("GUIDEDECODE_BENCH_RESULTS",)}
    done = _cli(["bench", "fake", "--benchmarks-dir", str(scripts), "--size", "5"], tmp_path, env)
    assert done.returncode == 0, done.stderr
    written = tmp_path / "bench-results" / f"fake-{__import__('guidedecode.bench').bench.device_tag()}.json"
    assert json.loads(written.read_text())["figures"] == {"size": 5}  # default: ./bench-results
    done = _cli(["bench", "fake", "--benchmarks-dir", str(scripts), "--out", str(tmp_path / "mine")], tmp_path, env)
    assert done.returncode == 0 and (tmp_path / "mine" / written.name).is_file()


def test_bench_name_help_shows_the_benchmarks_options_from_any_cwd(tmp_path):
    done = _cli(["bench", "decode", "--help"], tmp_path)  # the repository's benchmarks/, found from the package
    assert done.returncode == 0, done.stderr
    assert "usage: bench_decode.py" in done.stdout and "--new-tokens" in done.stdout
    assert not (tmp_path / "bench-results").exists()  # help writes nothing
    listing = _cli(["bench", "--help"], tmp_path)
    assert listing.returncode == 0 and "decode" in listing.stdout and "--out" in listing.stdout


# ------------------------------------------------------------------------------------------ 8.21


def _hub_cache(tiny_dir, cache: Path, repo_id: str) -> None:
    """``tiny_dir`` laid out as the Hugging Face Hub cache holds a downloaded model."""
    import shutil

    snapshot_id = "0123456789abcdef0123456789abcdef01234567"
    root = cache / ("models--" + repo_id.replace("/", "--"))
    shutil.copytree(tiny_dir, root / "snapshots" / snapshot_id)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(snapshot_id)


def test_load_model_takes_a_hub_id(tiny_dir, tmp_path, monkeypatch):
    import torch

    from guidedecode.errors import ModelLoadError
    from guidedecode.models import load_model

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # no machine here downloads: the id resolves from the Hub cache
    _hub_cache(tiny_dir, tmp_path / "hub", "someone/tiny-llama")
    model, tokenizer = load_model("someone/tiny-llama", cache_dir=tmp_path / "hub", dtype="bfloat16", device="cpu")
    assert next(model.parameters()).dtype == torch.bfloat16 and tokenizer.padding_side == "left"
    with pytest.raises(ModelLoadError, match="'someone/other-model'.*HF_HUB_OFFLINE"):
        load_model("someone/other-model", cache_dir=tmp_path / "hub")


def test_eval_takes_device_and_dtype_and_records_them(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["eval", "--task", "synthetic", "--model", str(tiny_dir), "-n", "1",
                                      "--max-new-tokens", "3", "--device", "cpu", "--dtype", "bfloat16", "--out",
                                      str(out), "--quiet"])
    assert result.exit_code == 0, (result.output, result.exception)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["dtype"] == "bfloat16" and summary["device"] == "cpu"


def test_train_commands_take_device_and_dtype():
    from guidedecode.cli.train_qsharp import qsharp
    from guidedecode.cli.train_rationale import rationale

    for command in (qsharp, rationale):
        names = {option for param in command.params for option in param.opts}
        assert {"--device", "--dtype"} <= names, command.name
