"""Every bad input gets a clear, typed error that names the input (issue 9, item 1).

One table for the Python API and one for the command line. Each row: what is called, the error type
(the CLI: exit status 2), and the text the message must contain to name the input. The last tests
check that a run that failed validation leaves nothing behind that blocks the corrected rerun.
"""

from __future__ import annotations

import json
import math
import sys

import pytest
import torch

from guidedecode import validation
from guidedecode.errors import (
    GuideError,
    ModelLoadError,
    RecordsError,
    StrategyError,
    TaskError,
    TrainingError,
    ValidationError,
)

NAN, INF = math.nan, math.inf


@pytest.fixture(scope="module")
def tokenizer():
    from guidedecode.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory, tokenizer):
    """A tiny random Qwen2 with the embedded tokenizer, saved as a local HF model directory."""
    from guidedecode.testing import tiny_model

    directory = tmp_path_factory.mktemp("tiny")
    model = tiny_model("qwen2", seed=1, vocab_size=len(tokenizer), eos_token_id=tokenizer.eos_token_id,
                       pad_token_id=tokenizer.pad_token_id)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def backend(tokenizer):
    from guidedecode.backends import HFBackend
    from guidedecode.testing import tiny_model

    return HFBackend(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), tokenizer, batch_size=2)


@pytest.fixture(scope="module")
def value_dir(tmp_path_factory):
    from guidedecode.testing import random_value_model

    directory = tmp_path_factory.mktemp("value")
    random_value_model().save_pretrained(directory)
    return directory


def _with_config(directory, edit, tmp_path):
    """A copy of a model directory whose config.json is edited by ``edit(dict) -> dict | str``."""
    import shutil

    copy = tmp_path / "edited"
    shutil.copytree(directory, copy)
    edited = edit(json.loads((copy / "config.json").read_text()))
    (copy / "config.json").write_text(edited if isinstance(edited, str) else json.dumps(edited))
    return copy


def _eval_config(tiny_dir=None, **overrides):
    from guidedecode.evaluation import EvalConfig

    settings = dict(task="synthetic", model=str(tiny_dir or "x"), limit=2, samples=1, max_new_tokens=4, batch_size=2)
    return EvalConfig(**{**settings, **overrides})


def _qsharp_config(**overrides):
    from guidedecode.training.qsharp import QSharpTrainConfig

    return QSharpTrainConfig(**overrides)


def _records_file(tmp_path, text):
    path = tmp_path / "results.jsonl"
    path.write_text(text)
    return path


def _bad_hidden_size(value_dir, tmp_path):
    from guidedecode.value_model import ValueModel

    def edit(config):
        config["backbone_config"]["hidden_size"] = 62  # not a multiple of the 4 heads: transformers refuses it
        return config

    ValueModel.from_pretrained(_with_config(value_dir, edit, tmp_path))


def _vocab_mismatch(tiny_dir, tmp_path):
    import shutil

    from guidedecode.models import load_model
    from guidedecode.testing import tiny_model

    copy = tmp_path / "small-vocab"
    shutil.copytree(tiny_dir, copy)
    tiny_model("qwen2", vocab_size=1000).save_pretrained(copy)  # weights and config of a 1000-token model
    load_model(copy)


def _qsharp_guide(**options):
    from guidedecode.guides import QSharpGuide
    from guidedecode.testing import random_value_model

    QSharpGuide(random_value_model(), **options)


def _eval_into(tiny_dir, out):
    from guidedecode.evaluation import run_eval

    run_eval(_eval_config(tiny_dir), out, progress=False)


def _registry_build(kind, name, params, tokenizer):
    from guidedecode.registry import build_guide, build_strategy

    (build_guide if kind == "guide" else build_strategy)(name, tokenizer, params)


# (id, call(ctx) -> None, error type, text the message must contain)
API_CASES = [
    # sampling settings (HFBackend: the boundary every strategy goes through)
    ("sample temperature=inf", lambda c: c.backend.sample(["hi"], temperature=INF), StrategyError, "temperature"),
    ("sample temperature=nan", lambda c: c.backend.sample(["hi"], temperature=NAN), StrategyError, "temperature"),
    ("sample temperature=0", lambda c: c.backend.sample(["hi"], temperature=0), StrategyError, "temperature"),
    ("sample temperature='1'", lambda c: c.backend.sample(["hi"], temperature="1"), StrategyError, "temperature"),
    ("sample top_p=2", lambda c: c.backend.sample(["hi"], top_p=2), StrategyError, "top_p"),
    ("sample top_p=0", lambda c: c.backend.sample(["hi"], top_p=0), StrategyError, "top_p"),
    ("sample top_p=nan", lambda c: c.backend.sample(["hi"], top_p=NAN), StrategyError, "top_p"),
    ("sample top_k=-1", lambda c: c.backend.sample(["hi"], top_k=-1), StrategyError, "top_k"),
    ("sample n=0", lambda c: c.backend.sample(["hi"], 0), StrategyError, "n must be"),
    ("sample n=True", lambda c: c.backend.sample(["hi"], True), StrategyError, "n must be an integer"),
    ("sample seed=-1", lambda c: c.backend.sample(["hi"], seed=-1), StrategyError, "seed"),
    ("greedy('2+2=')", lambda c: c.backend.greedy("2+2="), StrategyError, "one string"),
    ("greedy(flat ids)", lambda c: c.backend.greedy([5, 6, 7]), StrategyError, "flat list of token ids"),
    ("greedy(None)", lambda c: c.backend.greedy(None), StrategyError, "prompts"),
    ("greedy max_new_tokens=0", lambda c: c.backend.greedy(["hi"], max_new_tokens=0), StrategyError, "max_new_tokens"),
    ("greedy max_new_tokens=-5", lambda c: c.backend.greedy(["hi"], max_new_tokens=-5), StrategyError,
     "max_new_tokens"),
    ("greedy max_new_tokens=2.5", lambda c: c.backend.greedy(["hi"], max_new_tokens=2.5), StrategyError,
     "max_new_tokens"),
    ("negative token id", lambda c: c.backend.greedy([[5, -1]]), StrategyError, "token id -1"),
    ("out-of-vocabulary id", lambda c: c.backend.greedy([[5, 10**6]]), StrategyError, "token id 1000000"),
    ("float token id", lambda c: c.backend.greedy([[5, 1.5]]), StrategyError, "token id at position 1"),
    ("score out-of-vocabulary", lambda c: c.backend.score([1, 2], [[10**6]]), StrategyError, "token id 1000000"),
    ("HFBackend(batch_size='4')", lambda c: type(c.backend)(c.backend.model, c.backend.tokenizer, batch_size="4"),
     StrategyError, "batch_size"),
    # strategies
    ("SelfConsistency(n=True)", lambda c: __import__("guidedecode").SelfConsistency(n=True), StrategyError, "n"),
    ("BestOfN(n='4')", lambda c: __import__("guidedecode").BestOfN(n="4"), StrategyError, "n"),
    ("BestOfN(max_new_tokens='9')", lambda c: __import__("guidedecode").BestOfN(2, max_new_tokens="9"),
     StrategyError, "max_new_tokens"),
    ("SelfConsistency.run(backend, '2+2=')", lambda c: __import__("guidedecode").SelfConsistency(
        2, max_new_tokens=2).run(c.backend, "2+2="), StrategyError, "one string"),
    # guides
    ("PresencePenalty('1.5')", lambda c: __import__("guidedecode").PresencePenalty("1.5"), GuideError, "alpha"),
    ("PresencePenalty(-1)", lambda c: __import__("guidedecode").PresencePenalty(-1.0), GuideError, "alpha"),
    ("PresencePenalty(nan)", lambda c: __import__("guidedecode").PresencePenalty(NAN), GuideError, "alpha"),
    ("QSharpGuide(eta='10')", lambda c: _qsharp_guide(eta="10"), GuideError, "eta"),
    ("QSharpGuide(eta=['a'])", lambda c: _qsharp_guide(eta=["a"]), GuideError, "eta"),
    ("QSharpGuide(eta=inf)", lambda c: _qsharp_guide(eta=INF), GuideError, "eta"),
    ("QSharpGuide(top_p=nan)", lambda c: _qsharp_guide(top_p=NAN), GuideError, "top_p"),
    ("QSharpGuide(temperature=inf)", lambda c: _qsharp_guide(temperature=INF), GuideError, "temperature"),
    # tasks
    ("synthetic level='2'", lambda c: __import__("guidedecode.tasks").tasks.get_task("synthetic", level="2"),
     TaskError, "level"),
    ("synthetic level=1.5", lambda c: __import__("guidedecode.tasks").tasks.get_task("synthetic", level=1.5),
     TaskError, "level"),
    ("synthetic level=10**9", lambda c: __import__("guidedecode.tasks").tasks.get_task("synthetic", level=10**9),
     TaskError, "level must be <= 20"),
    ("synthetic level=0", lambda c: __import__("guidedecode.tasks").tasks.get_task("synthetic", level=0),
     TaskError, "level"),
    ("synthetic load(limit='5')", lambda c: __import__("guidedecode.tasks").tasks.get_task("synthetic").load(
        limit="5"), TaskError, "limit"),
    ("gsm8k load(limit='5')", lambda c: __import__("guidedecode.tasks").tasks.get_task("gsm8k").load(limit="5"),
     TaskError, "limit"),
    ("gsm8k load(limit=-1)", lambda c: __import__("guidedecode.tasks").tasks.get_task("gsm8k").load(limit=-1),
     TaskError, "limit"),
    ("check(None, p)", lambda c: c.task.check(None, c.problem), TaskError, "completion 0 must be a string"),
    ("check_many('text', [p])", lambda c: c.task.check_many("7", [c.problem]), TaskError, "one string"),
    ("check(text, None)", lambda c: c.task.check("7", None), TaskError, "problem 0 must be a Problem"),
    # eval settings (EvalConfig: the API, the CLI and config files)
    ("EvalConfig temperature=nan", lambda c: _eval_config(temperature=NAN).validate(), ValidationError,
     "temperature"),
    ("EvalConfig temperature=inf", lambda c: _eval_config(temperature=INF).validate(), ValidationError,
     "temperature"),
    ("EvalConfig top_p=-1", lambda c: _eval_config(top_p=-1).validate(), ValidationError, "top_p"),
    ("EvalConfig top_p=nan", lambda c: _eval_config(top_p=NAN).validate(), ValidationError, "top_p"),
    ("EvalConfig max_new_tokens=0", lambda c: _eval_config(max_new_tokens=0).validate(), ValidationError,
     "max_new_tokens"),
    ("EvalConfig samples=0", lambda c: _eval_config(samples=0).validate(), ValidationError, "samples"),
    ("EvalConfig samples=2.0", lambda c: _eval_config(samples=2.0).validate(), ValidationError, "samples"),
    ("EvalConfig limit='5'", lambda c: _eval_config(limit="5").validate(), ValidationError, "limit"),
    ("EvalConfig limit=0", lambda c: _eval_config(limit=0).validate(), ValidationError, "limit"),
    ("EvalConfig batch_size=0", lambda c: _eval_config(batch_size=0).validate(), ValidationError, "batch_size"),
    ("EvalConfig seed=-1", lambda c: _eval_config(seed=-1).validate(), ValidationError, "seed"),
    ("EvalConfig seed=True", lambda c: _eval_config(seed=True).validate(), ValidationError, "seed"),
    ("EvalConfig task=None", lambda c: _eval_config(task=None).validate(), ValidationError, "task"),
    ("EvalConfig params not strings", lambda c: _eval_config(strategy="best-of-n", params={"n": 4}).validate(),
     ValidationError, "params"),
    ("EvalConfig unknown -p key", lambda c: _eval_config(strategy="best-of-n", params={"bogus": "1"}).validate(),
     ValidationError, "'bogus'"),
    ("EvalConfig -p model=", lambda c: _eval_config(guide="qsharp", params={"model": "x"}).validate(),
     ValidationError, "'model'"),
    ("EvalConfig -p without method", lambda c: _eval_config(params={"n": "4"}).validate(), ValidationError,
     "without a guide or strategy"),
    ("EvalConfig -p n=abc", lambda c: _eval_config(strategy="best-of-n", params={"n": "abc"}).validate(),
     ValidationError, "n='abc'"),
    ("EvalConfig unknown strategy", lambda c: _eval_config(strategy="nope").validate(), ValidationError, "'nope'"),
    ("parse_params without =", lambda c: __import__("guidedecode.registry").registry.parse_params(["n4"]),
     ValidationError, "'n4'"),
    ("registry unknown key", lambda c: _registry_build("strategy", "self-consistency", {"bogus": "1"}, c.tokenizer),
     ValidationError, "'bogus'"),
    # output directories
    ("out is a file", lambda c: _eval_into(c.tiny_dir, c.a_file), ValidationError, "is a file"),
    ("out under a file", lambda c: _eval_into(c.tiny_dir, c.a_file / "sub"), ValidationError, "which is a file"),
    ("out unwritable", lambda c: _eval_into(c.tiny_dir, "/proc/guidedecode-test/out"), ValidationError,
     "/proc/guidedecode-test/out"),
    ("validation.output_dir(None)", lambda c: validation.output_dir("--out", None), ValidationError, "--out"),
    # records files
    ("results line null", lambda c: __import__("guidedecode.evaluation").evaluation.read_results(
        _records_file(c.tmp, '{"id": "a"}\nnull\n')), RecordsError, "results.jsonl line 2"),
    ("results line without id", lambda c: __import__("guidedecode.evaluation").evaluation.read_results(
        _records_file(c.tmp, '{"id": "a"}\n{"x": 1}\n')), RecordsError, "line 2 has no 'id'"),
    ("results garbage middle line", lambda c: __import__("guidedecode.evaluation").evaluation.read_results(
        _records_file(c.tmp, '{"id": "a"}\n{"id": "b\n{"id": "c"}\n')), RecordsError, "results.jsonl line 2"),
    ("results repeated id", lambda c: __import__("guidedecode.evaluation").evaluation.read_results(
        _records_file(c.tmp, '{"id": "a"}\n{"id": "a"}\n')), RecordsError, "repeats id 'a' of line 1"),
    # models and value models
    ("value model of the wrong hidden size", lambda c: _bad_hidden_size(c.value_dir, c.tmp), ModelLoadError,
     "config.json"),
    ("corrupt config.json", lambda c: __import__("guidedecode.models").models.load_model(
        _with_config(c.tiny_dir, lambda cfg: '{"model_type": "qwen2",', c.tmp)), ModelLoadError, "config.json"),
    ("model/tokenizer vocabulary mismatch", lambda c: _vocab_mismatch(c.tiny_dir, c.tmp), ModelLoadError,
     "tokenizer has 49152 tokens"),
    ("unknown local path", lambda c: __import__("guidedecode.models").models.load_model("./no/such/model"),
     ModelLoadError, "./no/such/model"),
    ("Hub id offline", lambda c: __import__("guidedecode.models").models.load_model("no-org/no-such-model"),
     ModelLoadError, "HF_HUB_OFFLINE"),
    ("device cuda without GPU", lambda c: __import__("guidedecode.models").models.resolve_device(
        "cuda" if not torch.cuda.is_available() else "cuda:99"), ModelLoadError, "cuda"),
    ("device nonsense", lambda c: __import__("guidedecode.models").models.resolve_device("gpu0"), ModelLoadError,
     "gpu0"),
    ("dtype int8", lambda c: __import__("guidedecode.models").models.resolve_dtype("int8"), ModelLoadError, "int8"),
    # Q# training settings
    ("QSharpTrainConfig rounds='2'", lambda c: _qsharp_config(rounds="2").validate(), TrainingError, "rounds"),
    ("QSharpTrainConfig temperature=inf", lambda c: _qsharp_config(temperature=INF).validate(), TrainingError,
     "temperature"),
    ("QSharpTrainConfig top_p=0", lambda c: _qsharp_config(top_p=0).validate(), TrainingError, "top_p"),
    ("QSharpTrainConfig lr=nan", lambda c: _qsharp_config(lr=NAN).validate(), TrainingError, "lr"),
    ("QSharpTrainConfig problems=1.5", lambda c: _qsharp_config(problems=1.5).validate(), TrainingError, "problems"),
]


class Context:
    """What the table's calls need, built once per test from the fixtures."""

    def __init__(self, **items):
        self.__dict__.update(items)


@pytest.fixture
def ctx(request, tmp_path, monkeypatch):
    needs = request.node.callspec.params["case"][1].__code__.co_names  # the attributes the call reads
    a_file = tmp_path / "a-file"
    a_file.write_text("not a directory")
    items = {"tmp": tmp_path, "a_file": a_file}
    for name in ("backend", "tokenizer", "tiny_dir", "value_dir"):
        if name in needs:
            items[name] = request.getfixturevalue(name)
    from guidedecode.tasks import get_task

    task = get_task("synthetic")
    items.update(task=task, problem=task.load(limit=1)[0])
    return Context(**items)


@pytest.mark.parametrize("case", API_CASES, ids=[case[0] for case in API_CASES])
def test_bad_api_input_is_a_clear_typed_error(case, ctx):
    _, call, error_type, names = case
    with pytest.raises(error_type) as info:
        call(ctx)
    message = str(info.value)
    assert names in message, message
    assert "\n" not in message and len(message) < 600, message


def run_cli(monkeypatch, capsys, *args):
    from guidedecode.cli.main import main

    monkeypatch.setattr(sys, "argv", ["guidedecode", *args])
    with pytest.raises(SystemExit) as exit_info:
        main()
    return exit_info.value.code, capsys.readouterr().err


# (argv after `guidedecode`, text the error must contain). All fail before any model is loaded.
CLI_CASES = [
    (["eval", "--task", "synthetic", "--temperature", "inf"], "--temperature"),
    (["eval", "--task", "synthetic", "--temperature", "nan"], "--temperature"),
    (["eval", "--task", "synthetic", "--temperature", "-1"], "--temperature"),
    (["eval", "--task", "synthetic", "--top-p", "0"], "--top-p"),
    (["eval", "--task", "synthetic", "--top-p", "5"], "--top-p"),
    (["eval", "--task", "synthetic", "--top-p", "nan"], "--top-p"),
    (["eval", "--task", "synthetic", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["eval", "--task", "synthetic", "--max-new-tokens", "-5"], "--max-new-tokens"),
    (["eval", "--task", "synthetic", "--samples", "0"], "--samples"),
    (["eval", "--task", "synthetic", "-n", "0"], "--limit"),
    (["eval", "--task", "synthetic", "--batch-size", "0"], "--batch-size"),
    (["eval", "--task", "synthetic", "--seed", "-3"], "--seed"),
    (["eval", "--task", "synthetic", "--level", "1000000000"], "level must be <= 20"),
    (["eval", "--task", "synthetic", "--level", "0"], "--level"),
    (["eval", "--task", "synthetic", "--strategy", "best-of-n", "-p", "bogus=1"], "'bogus'"),
    (["eval", "--task", "synthetic", "--guide", "presence-penalty", "-p", "alpha"], "'alpha'"),
    (["eval", "--task", "synthetic", "--out", "{a_file}"], "--out"),
    (["eval", "--task", "synthetic", "--out", "{a_file}/sub"], "--out"),
    (["eval", "--task", "synthetic", "--out", "/proc/guidedecode-test/out"], "--out"),
    (["eval", "--task", "synthetic", "--device", "gpu0"], "gpu0"),
    (["generate", "--prompt", "hi", "--temperature", "nan"], "--temperature"),
    (["generate", "--prompt", "hi", "--max-new-tokens", "0"], "--max-new-tokens"),
    (["generate", "--prompt", "hi", "--strategy", "best-of-n", "-p", "bogus=1"], "'bogus'"),
    (["generate", "--prompt", "hi", "-p", "n=2"], "without a --guide or --strategy"),
    (["generate", "--prompt", "hi", "--model", "./no/such/dir"], "./no/such/dir"),
    (["train", "qsharp", "--task", "synthetic", "--rounds", "0"], "rounds"),
    (["train", "qsharp", "--task", "synthetic", "--temperature", "inf"], "temperature"),
    (["train", "qsharp", "--task", "synthetic", "--top-p", "0"], "top_p"),
    (["bench", "decode", "--out", "{a_file}"], "--out"),
]


@pytest.mark.parametrize("argv, names", CLI_CASES, ids=[" ".join(c[0]) for c in CLI_CASES])
def test_bad_cli_input_exits_2_naming_the_input(argv, names, monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    a_file = tmp_path / "a-file"
    a_file.write_text("x")
    code, err = run_cli(monkeypatch, capsys, *[arg.format(a_file=a_file) for arg in argv])
    assert code == 2, err
    assert names in err and "Traceback" not in err, err


def test_failed_validation_leaves_nothing_that_blocks_the_corrected_rerun(tiny_dir, tmp_path, monkeypatch, capsys):
    from guidedecode.evaluation import run_eval

    out = tmp_path / "run"
    monkeypatch.chdir(tmp_path)
    # fails after the output directory and its config.json exist (the task option is checked when the task loads)
    code, err = run_cli(monkeypatch, capsys, "eval", "--task", "synthetic", "--model", str(tiny_dir), "-n", "2",
                        "--level", "1000000000", "--max-new-tokens", "4", "--out", str(out), "--quiet")
    assert code == 2 and "level must be <= 20" in err
    summary = run_eval(_eval_config(tiny_dir, task_options={"level": 1}), out, progress=False)
    assert summary["problems"] == 2
    # a finished run still refuses other settings
    with pytest.raises(Exception, match="different settings"):
        run_eval(_eval_config(tiny_dir, task_options={"level": 2}), out, progress=False)


def test_failed_qsharp_run_leaves_nothing_that_blocks_the_corrected_rerun(tiny_dir, tmp_path):
    from guidedecode.training.qsharp import QSharpTrainConfig, run

    out = tmp_path / "train"
    settings = dict(model=str(tiny_dir), task="synthetic", problems=2, samples=2, max_new_tokens=3, epochs=1,
                    batch_size=2, held_out=0.0, device="cpu", drop_no_variation=False)
    with pytest.raises(TaskError, match="level"):
        run(QSharpTrainConfig(**settings, task_options={"level": 99}), out, progress=False)
    assert (out / "config.json").exists()
    result = run(QSharpTrainConfig(**settings, task_options={"level": 1}), out, progress=False)
    assert result["final"]["round"] == 1


def test_corrupt_eval_config_json_is_named(tiny_dir, tmp_path):
    from guidedecode.evaluation import run_eval

    out = tmp_path / "run"
    run_eval(_eval_config(tiny_dir), out, progress=False)
    (out / "config.json").write_text('{"task": "synthetic",')
    with pytest.raises(ValidationError, match="config.json is not valid JSON"):
        run_eval(_eval_config(tiny_dir), out, progress=False)


def test_validators_return_clean_values():
    assert validation.temperature("t", 1) == 1.0 and isinstance(validation.temperature("t", 1), float)
    assert validation.temperature("t", 0, allow_zero=True) == 0.0
    assert validation.probability("p", 1) == 1.0
    assert validation.integer("n", 3, minimum=1) == 3
    assert validation.prompts("prompts", ("a", [1, 2])) == ["a", [1, 2]]
    assert validation.token_ids("ids", torch.tensor([0, 4]), 5) == [0, 4]
    for value in (True, "1", 1.0, None):
        with pytest.raises(ValidationError):
            validation.integer("n", value)
