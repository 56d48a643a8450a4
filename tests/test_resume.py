"""Resume integrity (issue 9, items 2 and 3): a killed run resumes bit-identical, records are never lost or doubled.

* ``guidedecode.records``: the tail repair (a complete last line without its newline keeps its record
  and gets the newline; a torn one is cut), refusal of any other damage with the file and line named,
  and the end-of-run completeness check.
* eval, ``train qsharp`` and ``train rationale`` killed at each stage (an exception raised at the
  stage boundary, torn or newline-less files left behind) and resumed give the same files, metrics
  and weights as an uninterrupted run.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from guidedecode import records
from guidedecode.errors import RecordsError, TrainingError


class Killed(Exception):
    """Stands for the process dying at that point."""


# ---------------------------------------------------------------------------------- records


def _lines(*items):
    return "".join(json.dumps(item) + "\n" for item in items)


def test_complete_last_line_without_newline_is_kept_and_not_glued(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines({"id": "a"}) + json.dumps({"id": "b"}))  # the kill took only the newline
    assert [r["id"] for r in records.read_jsonl(path, key="id")] == ["a", "b"]
    assert path.read_text().endswith("}\n")
    records.append_jsonl(path, [{"id": "c"}])
    assert [r["id"] for r in records.read_jsonl(path, key="id")] == ["a", "b", "c"]


def test_append_repairs_the_tail_even_without_a_read(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines({"id": "a"}) + json.dumps({"id": "b"}))
    records.append_jsonl(path, [{"id": "c"}])
    assert path.read_text() == _lines({"id": "a"}, {"id": "b"}, {"id": "c"})
    path.write_text(_lines({"id": "a"}) + '{"id": "b", "x": [1, 2')  # torn: the batch is redone
    records.append_jsonl(path, [{"id": "b"}])
    assert path.read_text() == _lines({"id": "a"}, {"id": "b"})


def test_torn_last_line_is_cut_and_the_rest_kept(tmp_path):
    path = tmp_path / "r.jsonl"
    path.write_text(_lines({"id": "a"}, {"id": "b"}) + '{"id": "c", "comp')
    assert [r["id"] for r in records.read_jsonl(path)] == ["a", "b"]
    assert path.read_text() == _lines({"id": "a"}, {"id": "b"})


@pytest.mark.parametrize("middle, message", [
    ('{"id": "b", "x"\n', "line 2 is not valid JSON"),
    ("null\n", "line 2 is not a JSON object"),
    ("[1, 2]\n", "line 2 is not a JSON object"),
    ('{"x": 1}\n', "line 2 has no 'id' field"),
    ('{"id": "a"}\n', "line 2 repeats id 'a' of line 1"),
    ("\udcff\n", "line 2 is not valid JSON"),
])
def test_damaged_middle_line_is_refused_naming_file_and_line(tmp_path, middle, message):
    path = tmp_path / "r.jsonl"
    content = _lines({"id": "a"}).encode() + middle.encode("utf-8", "surrogateescape") + _lines({"id": "c"}).encode()
    path.write_bytes(content)
    with pytest.raises(RecordsError, match=message) as info:
        records.read_jsonl(path, key="id")
    assert str(path) in str(info.value)
    assert path.read_bytes() == content  # nothing dropped or rewritten


def test_input_files_are_read_without_repair(tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text(_lines({"id": "a"}) + json.dumps({"id": "b"}))
    assert len(records.read_jsonl(path, repair=False)) == 2
    assert not path.read_text().endswith("\n")  # never written to
    path.write_text(_lines({"id": "a"}) + '{"id": ')
    with pytest.raises(RecordsError, match="line 2"):
        records.read_jsonl(path, repair=False)


def test_check_complete_names_what_is_missing(tmp_path):
    records.check_complete(tmp_path / "r.jsonl", [{"id": "a"}, {"id": "b"}], ["a", "b"])
    with pytest.raises(RecordsError, match="lacks 1 of 3 expected records .id 'c' first."):
        records.check_complete(tmp_path / "r.jsonl", [{"id": "a"}, {"id": "b"}], ["a", "b", "c"])


def test_read_json_names_the_file(tmp_path):
    path = tmp_path / "config.json"
    path.write_text('{"a": ')
    with pytest.raises(RecordsError, match="config.json is not valid JSON"):
        records.read_json(path)


# -------------------------------------------------------------------------------------- eval


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    """A tiny random Llama + the embedded tokenizer whose generation config has 3001 EOS ids (rows end early)."""
    from guidedecode.models import load_tokenizer
    from guidedecode.testing import tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = [2] + list(range(100, 3100))
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: tiny models, one thread


def _eval_config(tiny_dir):
    from guidedecode.evaluation import EvalConfig

    # 6 problems, 2 per chunk (batch 4 / 2 samples): three chunks
    return EvalConfig(task="synthetic", model=str(tiny_dir), limit=6, samples=2, seed=4, temperature=1.0,
                      max_new_tokens=8, batch_size=4, guide="presence-penalty", params={"alpha": "0.5"})


def _without_time(rows):
    return [{k: v for k, v in row.items() if k != "seconds"} for row in rows]


@pytest.fixture(scope="module")
def whole_eval(tiny_dir, tmp_path_factory):
    from guidedecode.evaluation import run_eval

    out = tmp_path_factory.mktemp("whole-eval")
    summary = run_eval(_eval_config(tiny_dir), out, progress=False)
    return summary, _without_time(records.read_jsonl(out / "results.jsonl"))


@pytest.mark.parametrize("chunk, damage", [(0, "none"), (1, "torn"), (2, "no-newline"), (0, "torn-first-line"),
                                           (1, "no-newline")])
def test_eval_killed_at_each_chunk_resumes_identical(tiny_dir, tmp_path, monkeypatch, whole_eval, chunk, damage):
    from guidedecode import evaluation
    from guidedecode.evaluation import TIMING_FIELDS, run_eval

    real_append = evaluation._append_lines
    calls = []

    def dying_append(path, batch):
        calls.append(len(batch))
        if len(calls) - 1 < chunk:
            return real_append(path, batch)
        text = "".join(json.dumps(r) + "\n" for r in batch)
        if damage == "torn":  # every line but the last, then half of it
            text = text[: text.rindex("\n", 0, len(text) - 1) + 1] + json.dumps(batch[-1])[:30]
        elif damage == "no-newline":  # the whole batch, the final newline lost
            text = text[:-1]
        elif damage == "torn-first-line":
            text = text[:20]
        else:
            text = ""
        with open(path, "a") as handle:
            handle.write(text)
        raise Killed

    monkeypatch.setattr(evaluation, "_append_lines", dying_append)
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run_eval(_eval_config(tiny_dir), out, progress=False)
    monkeypatch.setattr(evaluation, "_append_lines", real_append)
    summary = run_eval(_eval_config(tiny_dir), out, progress=False)

    whole_summary, whole_rows = whole_eval
    assert _without_time(records.read_jsonl(out / "results.jsonl")) == whole_rows  # same lines, same order
    strip = lambda s: {k: v for k, v in s.items() if k not in TIMING_FIELDS}  # noqa: E731
    assert strip(summary) == strip(whole_summary)
    assert summary["problems"] == 6


def test_eval_end_of_run_check_refuses_a_file_missing_a_record(tiny_dir, tmp_path, monkeypatch):
    from guidedecode import evaluation
    from guidedecode.evaluation import run_eval

    real_append = evaluation._append_lines
    monkeypatch.setattr(evaluation, "_append_lines", lambda path, batch: real_append(path, batch[:-1]))
    with pytest.raises(RecordsError, match="lacks 3 of 6 expected records"):
        run_eval(_eval_config(tiny_dir), tmp_path / "run", progress=False)


# ------------------------------------------------------------------------------- train qsharp


def _qsharp_config(tiny_dir, **overrides):
    from guidedecode.training.qsharp import QSharpTrainConfig

    # 4 problems (1 held out), 2 per collection chunk: 2 chunks per round; round 1 trains 6 examples in 2 epochs of
    # 2 steps, round 2 12 examples in 2 epochs of 3 steps; a checkpoint every 2 steps; head only (fast checkpoints)
    settings = dict(model=str(tiny_dir), task="synthetic", problems=4, samples=2, max_new_tokens=5, epochs=2,
                    batch_size=4, gen_batch_size=4, lr=1e-2, held_out=0.25, device="cpu", seed=3, init="normal",
                    rounds=2, roll_in_eta=3.0, save_every=2, drop_no_variation=False, train_layers=0)
    return QSharpTrainConfig(**{**settings, **overrides})


def _weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(path / "model.safetensors")


@pytest.fixture(scope="module")
def whole_qsharp(tiny_dir, tmp_path_factory):
    from guidedecode.training.qsharp import run

    out = tmp_path_factory.mktemp("whole-qsharp")
    result = run(_qsharp_config(tiny_dir), out, progress=False)
    return out, result


def _raise_on(target):
    def hook(value):
        if value == target:
            raise Killed
    return hook


# (name, run() keyword arguments that kill it, file damage left behind); chunks and steps counted over both rounds
QSHARP_KILLS = [
    ("round 1 collection after chunk 0, torn tail", dict(on_chunk=_raise_on(0)), "torn"),
    ("collection done, before the first checkpoint, last newline lost", dict(on_chunk=_raise_on(1)), "no-newline"),
    ("training after step 3 (checkpoint at step 2)", dict(on_step=_raise_on(3)), None),
    ("training after its last step", dict(on_step=_raise_on(4)), None),
    ("round 2 collection after chunk 0", dict(on_chunk=_raise_on(2)), None),
    ("round 2 training after step 2", dict(on_step=_raise_on(4 + 2)), None),
]


@pytest.mark.slow
@pytest.mark.parametrize("kill, damage", [(k[1], k[2]) for k in QSHARP_KILLS], ids=[k[0] for k in QSHARP_KILLS])
def test_qsharp_killed_at_each_stage_resumes_bit_identical(tiny_dir, tmp_path, whole_qsharp, kill, damage):
    from guidedecode.training.qsharp import run

    chunks = []
    hooks = dict(kill)
    if "on_chunk" in hooks:
        inner = hooks["on_chunk"]
        hooks["on_chunk"] = lambda index: (chunks.append(index), inner(len(chunks) - 1))
    if "on_step" in hooks:
        inner_step, rounds = hooks["on_step"], []
        hooks["on_step"] = lambda step: (rounds.append(step), inner_step(len(rounds)))
    out = tmp_path / "run"
    with pytest.raises(Killed):
        run(_qsharp_config(tiny_dir), out, progress=False, **hooks)
    data = out / "round-1" / "data.jsonl"
    if damage == "torn":  # the kill came in the middle of the chunk's write
        text = data.read_bytes()
        data.write_bytes(text[: len(text) - 40])
        assert len(records.read_jsonl(data)) == 1
    elif damage == "no-newline":
        data.write_bytes(data.read_bytes().rstrip(b"\n"))
    resumed = run(_qsharp_config(tiny_dir), out, progress=False)

    whole_out, whole = whole_qsharp
    assert resumed == {**whole, "model": str(out / "round-2" / "model")}
    for round_dir in ("round-1", "round-2"):
        assert records.read_jsonl(out / round_dir / "data.jsonl") == \
            records.read_jsonl(whole_out / round_dir / "data.jsonl")
        expected, got = _weights(whole_out / round_dir / "model"), _weights(out / round_dir / "model")
        assert expected.keys() == got.keys()
        assert all(torch.equal(expected[key], got[key]) for key in expected), round_dir


def test_qsharp_normal_init_comes_from_a_seeded_generator(tiny_dir):
    """The head does not depend on the global random state (the cause of the non-identical resume)."""
    from guidedecode.models import load_model
    from guidedecode.training.qsharp import _initial_value_model

    model, tokenizer = load_model(tiny_dir)
    config = _qsharp_config(tiny_dir)
    torch.manual_seed(1)
    first = _initial_value_model(config, None, "cpu", model, tokenizer, 1).head.weight.clone()
    torch.manual_seed(2)
    torch.rand(100)
    second = _initial_value_model(config, None, "cpu", model, tokenizer, 1).head.weight.clone()
    other_round = _initial_value_model(config, None, "cpu", model, tokenizer, 2).head.weight
    assert torch.equal(first, second) and first.abs().sum() > 0
    assert not torch.equal(first, other_round)


def test_qsharp_damaged_data_line_is_refused_naming_file_and_line(tiny_dir, tmp_path):
    from guidedecode.training.qsharp import run

    out = tmp_path / "run"
    config = _qsharp_config(tiny_dir, rounds=1, problems=4)
    with pytest.raises(Killed):
        run(config, out, progress=False, on_chunk=_raise_on(1))
    data = out / "round-1" / "data.jsonl"
    lines = data.read_text().splitlines(keepends=True)
    data.write_text(lines[0] + "garbage\n" + "".join(lines[1:]))
    with pytest.raises(TrainingError, match=r"data.jsonl line 2 is not valid JSON"):
        run(config, out, progress=False)


def test_qsharp_never_reports_a_round_finished_with_missing_records(tiny_dir, tmp_path, monkeypatch):
    from guidedecode.training import common, qsharp

    real_append = common.append_jsonl  # collection appends through training.common.collect_resumable
    monkeypatch.setattr(common, "append_jsonl", lambda path, batch: real_append(path, batch[:1]))
    with pytest.raises(TrainingError, match="lacks 2 of 4 expected records"):
        qsharp.run(_qsharp_config(tiny_dir, rounds=1, problems=4), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "round-1" / "metrics.json").exists()


# ---------------------------------------------------------------------------- train rationale


def _annotate(text):
    lines = text.split("\n")
    return "\n".join([lines[0]] + [f"<BOT>This step follows from the previous one.<EOT>{line}" for line in lines[1:]])


@pytest.fixture(scope="module")
def rationale_run(tiny_dir, tmp_path_factory):
    """Documents already extracted (scripted rationales), so align, filter and SFT have records to work on:
    2 documents, 6 rationale records, SFT in 2 epochs of 2 steps with a checkpoint after each."""
    from guidedecode.training import rationale as R

    rows = [{"question": f"Tom has {i} apples and buys {i + 2} more. How many now?",
             "answer": f"He had {i} apples.\nSo {i} + {i + 2} = {2 * i + 2}.\n#### {2 * i + 2}"}
            for i in range(2)]
    data = tmp_path_factory.mktemp("rationale-data") / "train.jsonl"
    data.write_text(_lines(*rows))

    def make(out):
        documents = R.load_documents(data)
        R.write_jsonl(out / "extract.jsonl", [{**d, "output": _annotate(d["text"]), "finish_reason": "eos"}
                                              for d in documents])
        sft = R.SFTConfig(epochs=2, lr=1e-3, batch_size=4, save_every=1, dev_fraction=0.0, lora=True)
        return R.PipelineConfig(out=out, data=data, model=str(tiny_dir), default_tau=-1000.0, sft=sft)

    return make


def _rationale_outputs(out: Path) -> dict:
    files = {name: (out / name).read_bytes() for name in ("aligned.jsonl", "scored.jsonl", "filtered.jsonl")}
    files["weights"] = _weights(out / "sft" / "final")
    return files


@pytest.fixture(scope="module")
def whole_rationale(rationale_run, tmp_path_factory):
    from guidedecode.training import rationale as R

    out = tmp_path_factory.mktemp("whole-rationale")
    return R.run_pipeline(rationale_run(out), ("align", "filter", "sft")), _rationale_outputs(out)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["filter, after 2 records", "sft, after step 2", "sft, after the last step"])
def test_rationale_killed_at_each_stage_resumes_bit_identical(rationale_run, whole_rationale, tmp_path, monkeypatch,
                                                              stage):
    import functools

    from guidedecode.training import rationale as R

    stages = ("align", "filter", "sft")
    whole, expected = whole_rationale

    calls = []
    if stage.startswith("filter"):
        real_usefulness = R.usefulness

        def dying_usefulness(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:  # records 1 and 2 were saved (save_every=2)
                raise Killed
            return real_usefulness(*args, **kwargs)

        monkeypatch.setattr(R, "usefulness", dying_usefulness)
        monkeypatch.setattr(R, "score_records", functools.partial(R.score_records, save_every=2))
    elif "step 2" in stage:
        real_loss = R.masked_loss_sum

        def dying_loss(*args, **kwargs):
            calls.append(1)
            if len(calls) == 3:
                raise Killed
            return real_loss(*args, **kwargs)

        monkeypatch.setattr(R, "masked_loss_sum", dying_loss)
    else:  # every step checkpointed, killed before the final model is written
        real_atomic_dir = R.atomic_dir

        def dying_atomic_dir(target, write):
            if Path(target).name == "final":
                raise Killed
            return real_atomic_dir(target, write)

        monkeypatch.setattr(R, "atomic_dir", dying_atomic_dir)
    config = rationale_run(tmp_path / "run")
    with pytest.raises(Killed):
        R.run_pipeline(config, stages)
    monkeypatch.undo()
    resumed = R.run_pipeline(config, stages)

    got = _rationale_outputs(tmp_path / "run")
    for name in ("aligned.jsonl", "scored.jsonl", "filtered.jsonl"):
        assert got[name] == expected[name], name
    assert got["weights"].keys() == expected["weights"].keys()
    assert all(torch.equal(got["weights"][k], expected["weights"][k]) for k in expected["weights"])
    assert resumed["sft"]["epochs"] == whole["sft"]["epochs"]


def test_rationale_damaged_stage_file_is_refused_naming_file_and_line(rationale_run, tmp_path):
    from guidedecode.training import rationale as R

    config = rationale_run(tmp_path / "run")
    path = tmp_path / "run" / "extract.jsonl"
    lines = path.read_text().splitlines(keepends=True)
    path.write_text(lines[0] + "null\n" + "".join(lines[1:]))
    with pytest.raises(TrainingError, match="extract.jsonl line 2 is not a JSON object"):
        R.run_pipeline(config, ("align",))


def test_rationale_corrupt_metrics_json_is_named(rationale_run, tmp_path):
    from guidedecode.training import rationale as R

    config = rationale_run(tmp_path / "run")
    (tmp_path / "run" / "metrics.json").write_text('{"extract": ')
    with pytest.raises(TrainingError, match="metrics.json is not valid JSON"):
        R.run_pipeline(config, ("align",))
