"""``guidedecode train optune`` on a tiny random Llama (embedded tokenizer) and the synthetic task: stages,
examples without mid-sequence BOS or wrong feedback, loss falls on a memorisable set, bit-identical resume."""

import json

import pytest
import torch

from guidedecode.deltas import OpTuneEditor
from guidedecode.errors import TrainingError
from guidedecode.training.optune import OpTuneTrainConfig, build_examples, gold_solution, run


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    from guidedecode.models import load_tokenizer
    from guidedecode.testing import tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer), num_hidden_layers=3)
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def _config(tiny_dir, **overrides):
    values = dict(model=str(tiny_dir), task="synthetic", task_options={"level": 1, "shots": 0}, questions=4,
                  attempts=2, max_new_tokens=6, drop_truncated=False, epochs=2, lr=3e-3, grad_accum=2,
                  dev_fraction=0.25, save_every=1, eta_init=1e-2)
    values.update(overrides)
    return OpTuneTrainConfig(**values)


def test_examples_follow_the_verdict_and_have_no_extra_bos(tiny_dir):
    from guidedecode.models import load_model
    from guidedecode.tasks import get_task

    model, tokenizer = load_model(str(tiny_dir))
    task = get_task("synthetic", level=1, shots=0)
    problems = task.load(split="train", limit=2)
    records = [{"id": p.id, "attempts": [{"text": "The answer is 1.", "correct": False, "finish": "eos"},
                                         {"text": f"The answer is {p.answer}.", "correct": True, "finish": "eos"},
                                         {"text": "I think", "correct": False, "finish": "length"}]}
               for p in problems]
    editor = OpTuneEditor.for_model(model)
    examples = build_examples(editor, tokenizer, task, problems, records, _config(tiny_dir, drop_truncated=True))
    assert [e["id"].rsplit("#", 1)[1] for e in examples] == ["0", "0"]  # correct and truncated attempts left out
    with_correct = build_examples(editor, tokenizer, task, problems, records,
                                  _config(tiny_dir, drop_truncated=True, include_correct=True))
    texts = [tokenizer.decode(e["edit"]) for e in with_correct]
    assert "Your answer is correct." in texts[1] and "incorrect" not in texts[1]  # feedback follows the verdict
    for e in with_correct:
        rendered = tokenizer.decode(e["edit"])
        assert e["edit"].count(tokenizer.bos_token_id) == rendered.count(tokenizer.bos_token)  # only the template's
        solution = tokenizer.decode(e["target"][e["start"]:])
        assert solution.startswith(gold_solution(problems[0] if e["id"].startswith(problems[0].id) else problems[1]))


def test_train_runs_end_to_end_and_loss_falls(tiny_dir, tmp_path):
    metrics = run(_config(tiny_dir, epochs=3, dev_fraction=0.0, questions=2), tmp_path / "run", progress=False)
    history = [h["train_loss"] for h in metrics["history"]]
    assert len(history) == 3 and history[-1] < history[0]  # the outer loss falls on a memorisable set
    assert metrics["skipped_micro_batches"] == 0
    editor = OpTuneEditor.from_pretrained(tmp_path / "run" / "editor")
    assert any(float(v) != 1e-2 for v in editor.etas.values())  # the steps were trained
    assert all(t.stats_x.count > 0 for t in editor.transforms.values())  # statistics came along
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["train_examples"] == metrics["train_examples"]


@pytest.mark.slow
def test_killed_run_resumes_bit_identical(tiny_dir, tmp_path):
    run(_config(tiny_dir), tmp_path / "whole", progress=False)

    class Kill(Exception):
        pass

    def kill_at_2(step):
        if step == 2:
            raise Kill

    with pytest.raises(Kill):
        run(_config(tiny_dir), tmp_path / "killed", progress=False, on_step=kill_at_2)
    assert not (tmp_path / "killed" / "editor").exists()
    run(_config(tiny_dir), tmp_path / "killed", progress=False)
    whole = OpTuneEditor.from_pretrained(tmp_path / "whole" / "editor").state_dict()
    resumed = OpTuneEditor.from_pretrained(tmp_path / "killed" / "editor").state_dict()
    assert all(torch.equal(whole[k], resumed[k]) for k in whole)
    with pytest.raises(TrainingError, match="other settings"):
        run(_config(tiny_dir, lr=1e-3), tmp_path / "killed", progress=False)


def test_layers_that_match_nothing_fail_before_the_attempts(tiny_dir, tmp_path):
    """The editor is built before the attempts stage: a bad --layers costs no sampling and locks nothing."""
    from guidedecode.errors import GuidedecodeError

    with pytest.raises(GuidedecodeError, match="layer index 99 is out of range"):
        run(_config(tiny_dir, layers=[99]), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "attempts.jsonl").exists()
    run(_config(tiny_dir, epochs=1, questions=2), tmp_path / "run", progress=False)  # corrected: not refused
