"""Q♯ value-model training (guidedecode.training.qsharp, ``guidedecode train qsharp``).

Real parts only: a tiny random-weight Llama saved as an HF directory (vocabulary of the embedded
SmolLM2 tokenizer, whose chat template is used), loaded through ``load_model`` like any user model.
Its ``generation_config.eos_token_id`` is a *list* of 3001 ids, so rows end early (about 6% per
step) and collection must honour the full EOS set. The labels come from a tiny hand-made task
(answer: the parity of the completion's character count), so they vary between repeats.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner

from guidedecode.errors import GuidedecodeError, TaskError
from guidedecode.tasks import base as task_base
from guidedecode.tasks.base import Problem, Task
from guidedecode.training.qsharp import (
    Example,
    Policy,
    QSharpTrainConfig,
    TrainingError,
    collate,
    collect_chunk,
    combine,
    draw_cuts,
    drop_no_variation,
    evaluate,
    nearest_atom,
    read_jsonl,
    record_examples,
    roc_auc,
    run,
    split_problems,
    train,
    value_loss,
)

EOS_IDS = [2] + list(range(100, 3100))
PARITY = "qsharp-parity-test"


class ParityTask(Task):
    """Problem i asks for anything; a completion is correct iff its text has an even length."""

    name = PARITY
    files = {"train": "", "test": ""}
    instruction = "Say something."

    def load(self, path=None, *, split="train", limit=None):
        if split not in self.files:
            raise TaskError(f"{PARITY}: unknown split {split!r}")
        return [Problem(f"parity/{i}", f"Item number {i}.", "0") for i in range(12 if limit is None else limit)]

    def extract(self, completion):
        return str(len(completion) % 2)


class ConstantTask(ParityTask):
    """Every completion is wrong: no label varies."""

    name = "qsharp-constant-test"

    def extract(self, completion):
        return "1"


@pytest.fixture
def tasks(monkeypatch):
    monkeypatch.setitem(task_base._REGISTRY, ParityTask.name, ParityTask)
    monkeypatch.setitem(task_base._REGISTRY, ConstantTask.name, ConstantTask)


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py: tiny models, one thread


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory) -> Path:
    """A tiny random Llama + the embedded tokenizer, saved as a local HF model directory."""
    from guidedecode.models import load_tokenizer
    from guidedecode.testing import tiny_model

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    model.generation_config.eos_token_id = EOS_IDS
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def policy(tiny_dir) -> Policy:
    from guidedecode.models import load_model

    return Policy.from_model(*load_model(tiny_dir))


def small_config(tiny_dir, **overrides) -> QSharpTrainConfig:
    settings = dict(model=str(tiny_dir), task=PARITY, problems=5, samples=4, max_new_tokens=6, epochs=2,
                    batch_size=4, gen_batch_size=8, lr=1e-3, held_out=0.34, device="cpu", seed=3)
    settings.update(overrides)
    return QSharpTrainConfig(**settings)


# ------------------------------------------------------------------------------- pure parts


def test_loss_mask_covers_exactly_the_switch_token_and_continuation():
    # prompt (4 tokens) + cut prefix (3 tokens, the last = switch token 72) + continuation (2 tokens)
    a = Example("a", 1, (10, 11, 12, 13, 70, 71, 72, 80, 81), target_start=6, label=1.0)
    # prompt (2) + prefix (1: switch token 50) + no continuation (cut was the last token)
    b = Example("b", 1, (20, 21, 50), target_start=2, label=0.0)
    ids, mask, targets, labels = collate([a, b], pad_token_id=0)
    assert ids.tolist() == [[10, 11, 12, 13, 70, 71, 72, 80, 81], [0, 0, 0, 0, 0, 0, 20, 21, 50]]
    assert mask.tolist() == [[1] * 9, [0] * 6 + [1] * 3]
    target_tokens = [ids[i][targets[i]].tolist() for i in range(2)]
    assert target_tokens == [[72, 80, 81], [50]]
    assert labels.tolist() == [1.0, 0.0]


def test_record_examples_rebuild_prompt_prefix_and_targets():
    record = {"id": "p", "round": 2, "partial_guided_prompts_tokenized": [[5, 6, 7, 8], [5, 6, 9]],
              "num_response_tokens_in_partial_guided_prompts": [2, 1],
              "partial_guided_responses_tokenized": [[30, 31], []],
              "partial_guided_predictions_correctness": [True, False]}
    first, second = record_examples(record)
    assert first == Example("p", 2, (5, 6, 7, 8, 30, 31), 3, 1.0)  # targets: 8 (switch), 30, 31
    assert second == Example("p", 2, (5, 6, 9), 2, 0.0)
    assert combine([[record], [record]]) == [first, second, first, second]
    bad = dict(record, num_response_tokens_in_partial_guided_prompts=[2])
    with pytest.raises(TrainingError, match="differ in length"):
        record_examples(bad)
    with pytest.raises(TrainingError, match="missing or bad field"):
        record_examples({"id": "p"})


@pytest.mark.parametrize("loss", ["bce", "mse", "mle"])
def test_value_loss_matches_a_loop(loss):
    torch.manual_seed(1)
    atoms = 5 if loss == "mle" else 1
    lengths, starts, labels = [7, 3, 5], [4, 2, 1], [1.0, 0.0, 1.0]
    width = max(lengths)
    logits = torch.randn(3, width, atoms, dtype=torch.float64)
    target_mask = torch.zeros(3, width, dtype=torch.bool)
    for b in range(3):
        target_mask[b, width - lengths[b] + starts[b]:] = True
    got = value_loss(logits, target_mask, torch.tensor(labels), loss)
    total = 0.0
    for b in range(3):
        terms = []
        for t in range(width - lengths[b] + starts[b], width):
            z, y = logits[b, t].tolist(), labels[b]
            if loss == "bce":
                p = 1 / (1 + math.exp(-z[0]))
                terms.append(-(y * math.log(p) + (1 - y) * math.log(1 - p)))
            elif loss == "mse":
                terms.append((1 / (1 + math.exp(-z[0])) - y) ** 2)
            else:
                j = round(y * (atoms - 1))
                terms.append(-(z[j] - math.log(sum(math.exp(v) for v in z))))
        total += sum(terms) / len(terms)
    assert got.item() == pytest.approx(total / 3, rel=1e-5)


def test_nearest_atom_general_range():
    labels = torch.tensor([-1.0, -0.2, 0.0, 0.49, 0.51, 1.0, 3.0])
    # atoms of [-1, 1] with 5 atoms: -1, -0.5, 0, 0.5, 1
    assert nearest_atom(labels, 5, v_min=-1.0, v_max=1.0).tolist() == [0, 2, 2, 3, 3, 4, 4]


def test_roc_auc_matches_pair_counting():
    rng = random.Random(0)
    for _ in range(20):
        n = rng.randint(2, 15)
        scores = [rng.choice([0.1, 0.2, 0.3, rng.random()]) for _ in range(n)]
        labels = [float(rng.random() < 0.5) for _ in range(n)]
        pos = [s for s, y in zip(scores, labels) if y]
        neg = [s for s, y in zip(scores, labels) if not y]
        if not pos or not neg:
            assert roc_auc(scores, labels) is None
            continue
        wins = sum(1.0 if p > q else 0.5 if p == q else 0.0 for p in pos for q in neg)
        assert roc_auc(scores, labels) == pytest.approx(wins / (len(pos) * len(neg)))
    assert roc_auc([0.9, 0.1], [1.0, 0.0]) == 1.0


def test_roc_auc_comes_from_sklearn(monkeypatch):
    # issue 8 item 19: the well-kept implementation, not a hand-written rank sum
    import sklearn.metrics

    calls = []
    real = sklearn.metrics.roc_auc_score
    monkeypatch.setattr(sklearn.metrics, "roc_auc_score", lambda y, s, **kw: calls.append(list(y)) or real(y, s, **kw))
    assert roc_auc([0.2, 0.8, 0.8, 0.1], [0.0, 1.0, 0.0, 1.0]) == pytest.approx(0.375)
    assert calls == [[0, 1, 0, 1]]


def test_drop_no_variation_only_drops_all_equal_training_groups():
    def ex(pid, rnd, label):
        return Example(pid, rnd, (1, 2), 1, label)

    examples = [ex("mixed", 1, 1.0), ex("mixed", 1, 0.0), ex("ones", 1, 1.0), ex("ones", 1, 1.0),
                ex("zeros", 1, 0.0), ex("zeros", 1, 0.0), ex("held", 1, 0.0), ex("held", 1, 0.0),
                ex("zeros", 2, 1.0), ex("zeros", 2, 0.0)]  # round 2 of "zeros" varies: kept
    kept = drop_no_variation(examples, keep_ids={"held"})
    assert [(e.problem_id, e.round, e.label) for e in kept] == [
        ("mixed", 1, 1.0), ("mixed", 1, 0.0), ("held", 1, 0.0), ("held", 1, 0.0), ("zeros", 2, 1.0),
        ("zeros", 2, 0.0)]


def test_split_problems_is_deterministic_disjoint_and_never_empty():
    ids = [f"p{i}" for i in range(40)]
    train, held = split_problems(ids, 0.1, seed=0)
    assert len(held) == 4 and train | held == set(ids) and not train & held
    assert split_problems(list(reversed(ids)), 0.1, seed=0) == (train, held)  # by id, not by order
    assert split_problems(ids, 0.1, seed=1)[1] != held
    assert len(split_problems(ids[:3], 0.1, seed=0)[1]) == 1  # at least one held out
    assert split_problems(ids[:1], 0.5, seed=0) == ({"p0"}, set())  # never all
    assert split_problems(ids, 0.0, seed=0) == (set(ids), set())


def test_cut_points_are_uniform_over_the_response():
    lengths = [7] * 7000
    cuts = draw_cuts(0, 1, "problem", lengths)
    counts = [cuts.count(c) for c in range(7)]
    assert min(cuts) == 0 and max(cuts) == 6
    # chi-square with 6 degrees of freedom: 22.5 is the 0.999 quantile
    chi2 = sum((count - 1000) ** 2 / 1000 for count in counts)
    assert chi2 < 22.5, counts
    assert draw_cuts(0, 1, "problem", [3, 1, 5]) == draw_cuts(0, 1, "problem", [3, 1, 5])
    assert draw_cuts(0, 1, "problem", [1, 1]) == [0, 0]
    with pytest.raises(TrainingError, match="empty roll-in"):
        draw_cuts(0, 1, "problem", [0])


def test_config_rejects_bad_values():
    for bad, pattern in [(dict(head="w"), "unknown head"), (dict(loss="hinge"), "unknown loss"),
                         (dict(rounds=0), "rounds must be >= 1"), (dict(samples=0), "samples must be"),
                         (dict(top_p=0.0), "top_p"), (dict(held_out=1.0), "held_out"),
                         (dict(roll_in_eta=-1.0), "roll_in_eta"), (dict(num_atoms=5), "needs loss 'mle'"),
                         (dict(loss="mle", num_atoms=1), "num_atoms >= 2"), (dict(init="reuse"), "Q head")]:
        with pytest.raises(TrainingError, match=pattern):
            QSharpTrainConfig(**bad).validate()


# ------------------------------------------------------------------------- collection (model)


def test_policy_uses_the_full_eos_set_and_cuts_after_the_first(policy):
    assert set(EOS_IDS) <= set(policy.eos_token_ids)
    assert policy.cut_at_eos([5, 6, 150, 7, 2, 2]) == [5, 6, 150]
    assert policy.cut_at_eos([5, 6, 7]) == [5, 6, 7]


def test_collected_record_fields_are_consistent(policy):
    task = ParityTask()
    problems = task.load(limit=3)
    config = QSharpTrainConfig(samples=5, max_new_tokens=12, seed=7)
    records = collect_chunk(policy, task, problems, round_index=1, chunk_index=0, config=config)
    assert [r["id"] for r in records] == [p.id for p in problems]
    ended_early = 0
    for record, problem in zip(records, problems):
        prompt = policy.prompt_ids(task.messages(problem))
        assert record["prompt_num_tokens"] == len(prompt) and record["round"] == 1 and record["roll_in_eta"] == 0.0
        assert record["gold"] == "0"
        responses = record["fully_guided_responses_tokenized"]
        cuts = draw_cuts(config.seed, 1, problem.id, [len(r) for r in responses])
        for i in range(config.samples):
            response, c = responses[i], cuts[i]
            continuation = record["partial_guided_responses_tokenized"][i]
            partial = record["partial_guided_prompts_tokenized"][i]
            # the response stops at its first EOS (any id of the set) or at the budget
            eos_at = [j for j, t in enumerate(response) if t in policy.eos_token_ids]
            assert eos_at in ([], [len(response) - 1])
            assert eos_at or len(response) == config.max_new_tokens
            ended_early += bool(eos_at)
            assert record["num_response_tokens_in_partial_guided_prompts"][i] == c + 1
            assert partial == prompt + response[: c + 1]
            assert len(response[: c + 1]) + len(continuation) <= config.max_new_tokens
            if c == len(response) - 1:
                assert continuation == []  # the cut is the last token: the roll-in is the roll-out
            eos_in_continuation = [j for j, t in enumerate(continuation) if t in policy.eos_token_ids]
            assert eos_in_continuation in ([], [len(continuation) - 1])
            text = policy.decode(response[: c + 1] + continuation)
            assert record["partial_guided_predictions"][i] == task.extract(text)
            assert record["partial_guided_predictions_correctness"][i] == task.check(text, problem)
            assert record["fully_guided_predictions_correctness"][i] == task.check(policy.decode(response), problem)
    assert ended_early > 0  # the EOS list is honoured (a single-id EOS would almost never stop a row)
    again = collect_chunk(policy, task, problems, round_index=1, chunk_index=0, config=config)
    assert again == records  # seeded


# ------------------------------------------------------------------------------ end to end


def test_cli_collect_train_then_guided_generate(tiny_dir, tmp_path, tasks):
    from guidedecode.cli.train_qsharp import qsharp

    out = tmp_path / "run"
    args = ["--model", str(tiny_dir), "--task", PARITY, "--problems", "6", "--samples", "4", "--max-new-tokens", "6",
            "--rounds", "2", "--epochs", "1", "--batch-size", "4", "--lr", "1e-3", "--roll-in-eta", "3",
            "--held-out", "0.34", "--device", "cpu", "--out", str(out), "--quiet"]
    result = CliRunner().invoke(qsharp, args)
    assert result.exit_code == 0, (result.output, result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert [r["round"] for r in metrics["rounds"]] == [1, 2]
    held = metrics["final"]["held_out"]
    assert {"bce", "bce_constant", "accuracy", "auc", "loss"} <= set(held) and held["problems"] == 2
    assert held["examples"] == 2 * 4 * 2  # two held-out problems, four repeats, two rounds (never dropped)
    round1, round2 = read_jsonl(out / "round-1" / "data.jsonl"), read_jsonl(out / "round-2" / "data.jsonl")
    assert {r["roll_in_eta"] for r in round1} == {0.0} and {r["roll_in_eta"] for r in round2} == {3.0}
    assert metrics["rounds"][1]["train_examples"] + metrics["rounds"][1]["dropped_no_variation"] == 2 * 4 * 4
    assert not (out / "round-2" / "checkpoint").exists()

    # the trained model guides generation
    from guidedecode.guides.qsharp import QSharpGuide
    from guidedecode.models import load_model
    from guidedecode.value_model import ValueModel

    model, tokenizer = load_model(tiny_dir)
    value_model = ValueModel.from_pretrained(out / "round-2" / "model")
    assert value_model.config.head == "v" and value_model.config.loss == "bce"
    value_model.check_tokenizer(tokenizer)
    guide = QSharpGuide(value_model, eta=5.0, tokenizer=tokenizer, eos_token_id=EOS_IDS,
                        pad_token_id=tokenizer.pad_token_id)
    inputs = tokenizer.apply_chat_template([{"role": "user", "content": "Hi"}], add_generation_prompt=True,
                                           return_tensors="pt", return_dict=True)
    plain = model.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=EOS_IDS)
    guided = model.generate(**inputs, do_sample=False, max_new_tokens=6, eos_token_id=EOS_IDS,
                            logits_processor=[guide])
    assert guided.shape[1] > inputs["input_ids"].shape[1]
    with torch.no_grad():  # the guide's first choice is the argmax of logits + offsets over the top-k
        logits = model(**inputs).logits[0, -1]
        top = logits.topk(20).indices
        state = value_model.start(inputs["input_ids"], inputs["attention_mask"])
        z = value_model.candidate_logits(state, top[None])[0, :, 0]
        offsets = torch.nn.functional.softplus(5.0 + z) - torch.nn.functional.softplus(z)
    expected = top[(logits[top] + offsets).argmax()]
    assert guided[0, inputs["input_ids"].shape[1]].item() == expected.item()
    assert plain[0, inputs["input_ids"].shape[1]].item() == logits.argmax().item()

    # rerunning the finished command does nothing new and reports the same metrics
    again = CliRunner().invoke(qsharp, args)
    assert again.exit_code == 0, again.output
    assert json.loads((out / "metrics.json").read_text())["rounds"] == metrics["rounds"]


class Interrupt(Exception):
    pass


def _raise_at(target):
    def hook(value):
        if value == target:
            raise Interrupt
    return hook


def test_resume_after_interrupted_collection_and_training(tiny_dir, tmp_path, tasks):
    from safetensors.torch import load_file

    config = small_config(tiny_dir, save_every=1)
    reference = run(config, tmp_path / "whole", progress=False)

    out = tmp_path / "resumed"
    with pytest.raises(Interrupt):  # gen_batch_size 8 / samples 4 = 2 problems per chunk: 2 of 5 written
        run(small_config(tiny_dir, save_every=1), out, progress=False, on_chunk=_raise_at(0))
    assert len(read_jsonl(out / "round-1" / "data.jsonl")) == 2
    with pytest.raises(Interrupt):  # collection resumes; training stops after its 3rd step (checkpointed)
        run(small_config(tiny_dir, save_every=1), out, progress=False, on_step=_raise_at(3))
    state = torch.load(out / "round-1" / "checkpoint" / "trainer.pt", weights_only=True)
    assert state["global_step"] == 3
    steps = []
    resumed = run(small_config(tiny_dir, save_every=1), out, progress=False, on_step=steps.append)
    assert steps and steps[0] == 4  # continued from the checkpoint, not from step 1
    assert steps[-1] == reference["final"]["steps"]

    def by_id(path):
        return sorted(read_jsonl(path), key=lambda r: r["id"])

    assert by_id(out / "round-1" / "data.jsonl") == by_id(tmp_path / "whole" / "round-1" / "data.jsonl")
    whole = load_file(tmp_path / "whole" / "round-1" / "model" / "model.safetensors")
    part = load_file(out / "round-1" / "model" / "model.safetensors")
    assert whole.keys() == part.keys()
    for key in whole:
        torch.testing.assert_close(part[key], whole[key], rtol=1e-6, atol=1e-7)
    assert resumed["final"]["held_out"]["bce"] == pytest.approx(reference["final"]["held_out"]["bce"], abs=1e-6)


@pytest.mark.parametrize("head,loss", [("v", "mse"), ("q", "bce"), ("q", "mle")])
def test_training_fits_a_learnable_label(tmp_path, head, loss):
    """Label = 1 iff token 7 is among the targets; training lowers the loss on that data."""
    from guidedecode.testing import tiny_model, tiny_tokenizer
    from guidedecode.value_model import ValueModel

    value_model = ValueModel.from_backbone(tiny_model("llama", seed=2, vocab_size=64), head=head, loss=loss,
                                           num_atoms=3 if loss == "mle" else None, init="zero",
                                           tokenizer=tiny_tokenizer(64))
    rng = random.Random(0)
    examples = []
    for i in range(12):
        prompt = [rng.randrange(10, 64) for _ in range(rng.randint(3, 6))]
        targets = [rng.randrange(10, 64) for _ in range(rng.randint(1, 4))]
        if i % 2:
            targets[rng.randrange(len(targets))] = 7
        examples.append(Example(f"p{i}", 1, tuple(prompt + targets), len(prompt), float(i % 2)))
    config = QSharpTrainConfig(head=head, loss=loss, epochs=8, batch_size=4, lr=3e-3, seed=0)
    before = evaluate(value_model, examples, base_rate=0.5, pad_token_id=1)
    fit = train(value_model, examples, tmp_path, config=config, round_index=1, pad_token_id=1)
    after = evaluate(value_model, examples, base_rate=0.5, pad_token_id=1)
    assert fit["steps"] == 8 * 3 and (tmp_path / "checkpoint" / "trainer.pt").exists()
    assert after["loss"] < 0.7 * before["loss"], (before, after)


def test_evaluate_reports_constant_baseline(tiny_dir):
    from guidedecode.models import load_model
    from guidedecode.value_model import ValueModel

    model, tokenizer = load_model(tiny_dir)
    value_model = ValueModel.from_backbone(model, head="v", loss="bce", init="zero", tokenizer=tokenizer)
    examples = [Example("a", 1, (5, 6, 7, 8), 2, 1.0), Example("b", 1, (5, 9, 10), 1, 0.0),
                Example("c", 1, (11, 12), 1, 0.0)]
    metrics = evaluate(value_model, examples, base_rate=0.25, pad_token_id=2, batch_size=2)
    assert metrics["bce"] == pytest.approx(math.log(2), abs=1e-6)  # a zero head predicts 1/2 everywhere
    expected = -(math.log(0.25) + 2 * math.log(0.75)) / 3
    assert metrics["bce_constant"] == pytest.approx(expected, rel=1e-6)
    assert metrics["auc"] == 0.5 and metrics["examples"] == 3


# ------------------------------------------------------------------------------- bad input


def test_cli_bad_input(tiny_dir, tmp_path, tasks):
    from guidedecode.cli.train_qsharp import qsharp

    runner = CliRunner()
    base = ["--model", str(tiny_dir), "--problems", "4", "--samples", "2", "--max-new-tokens", "4", "--quiet"]

    result = runner.invoke(qsharp, base + ["--task", "no-such-task", "--out", str(tmp_path / "a")])
    assert isinstance(result.exception, TaskError) and "unknown task 'no-such-task'" in str(result.exception)
    result = runner.invoke(qsharp, base + ["--task", PARITY, "--head", "w", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Invalid value for '--head'" in result.output
    result = runner.invoke(qsharp, base + ["--task", PARITY, "--loss", "hinge", "--out", str(tmp_path / "b")])
    assert result.exit_code == 2 and "Invalid value for '--loss'" in result.output
    result = runner.invoke(qsharp, base + ["--task", PARITY, "--rounds", "0", "--out", str(tmp_path / "c")])
    assert isinstance(result.exception, TrainingError) and "rounds must be >= 1" in str(result.exception)

    # empty data: every label equal, so drop-no-variation leaves nothing to train on
    result = runner.invoke(qsharp, base + ["--task", ConstantTask.name, "--out", str(tmp_path / "d")])
    assert isinstance(result.exception, TrainingError) and "no training examples" in str(result.exception)

    # a resumed run with different settings
    result = runner.invoke(qsharp, base + ["--task", ConstantTask.name, "--samples", "3", "--out", str(tmp_path / "d")])
    assert isinstance(result.exception, TrainingError) and "different settings (samples)" in str(result.exception)


def test_corrupt_checkpoint_is_reported(tiny_dir, tmp_path, tasks):
    out = tmp_path / "run"
    config = small_config(tiny_dir, problems=2, samples=2, epochs=1, save_every=1, drop_no_variation=False)
    with pytest.raises(Interrupt):
        run(config, out, progress=False, on_step=_raise_at(1))
    trainer = out / "round-1" / "checkpoint" / "trainer.pt"
    trainer.write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="corrupt training checkpoint"):
        run(config, out, progress=False)
    weights = out / "round-1" / "checkpoint" / "model" / "model.safetensors"
    trainer.unlink()
    with pytest.raises(TrainingError, match="corrupt training checkpoint"):
        run(config, out, progress=False)
    assert weights.exists()


def test_malformed_data_file_is_reported(tiny_dir, tmp_path, tasks):
    out = tmp_path / "run"
    config = small_config(tiny_dir, problems=2, held_out=0.0)
    (out / "round-1").mkdir(parents=True)
    bad = {"id": "parity/0", "round": 1, "partial_guided_prompts_tokenized": [[1, 2]],
           "num_response_tokens_in_partial_guided_prompts": [5], "partial_guided_responses_tokenized": [[]],
           "partial_guided_predictions_correctness": [True]}
    (out / "round-1" / "data.jsonl").write_text(json.dumps(bad) + "\n")
    with pytest.raises(GuidedecodeError, match="cut prefix of 5 tokens"):
        run(config, out, progress=False)
