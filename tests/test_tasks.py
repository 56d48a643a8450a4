"""Task loaders on the real data files, the registry, prompts, checking, and the synthetic task."""

import collections
import re
import subprocess
import sys

import pytest

from guidedecode.errors import TaskError
from guidedecode.tasks import MathChecker, Problem, SyntheticArithmetic, get_task, list_tasks
from guidedecode.tasks.synthetic import level_spec

# (task, split, rows): row counts from shared/data/README.md (MBPP test = task ids 11-510).
ROW_COUNTS = [
    ("gsm8k", "test", 1319),
    ("gsm8k", "train", 7473),
    ("math500", "test", 500),
    ("humaneval", "test", 164),
    ("mbpp", "test", 500),
    ("mbpp", "prompt", 10),
    ("mbpp", "validation", 90),
    ("mbpp", "train", 374),
    ("mbpp", "all", 974),
    ("strategyqa", "train", 1603),
    ("strategyqa", "test", 687),
    ("strategyqa", "dev", 229),
    ("strategyqa", "orig-train", 2061),
    ("commonsenseqa", "test", 1221),
    ("truthfulqa", "train", 632),
    ("truthfulqa", "test", 164),
]


@pytest.fixture(scope="module")
def checker():
    with MathChecker(timeout=5.0, workers=2) as c:
        yield c


@pytest.mark.parametrize("name, split, rows", ROW_COUNTS)
def test_loader_row_counts_and_fields(data_dir, name, split, rows):
    problems = get_task(name).load(data_dir, split=split)
    assert len(problems) == rows
    assert len({p.id for p in problems}) == rows
    for p in problems:
        assert isinstance(p, Problem)
        assert p.question.strip() and p.answer.strip()
        assert isinstance(p.meta, dict)


def test_registry_lists_every_task():
    assert set(list_tasks()) == {
        "gsm8k", "math500", "humaneval", "mbpp", "strategyqa", "commonsenseqa", "truthfulqa", "synthetic",
    }


def test_default_data_dir_and_limit(data_dir, monkeypatch):
    monkeypatch.setenv("GUIDEDECODE_DATA", str(data_dir))
    problems = get_task("gsm8k").load(limit=5)
    assert [p.id for p in problems] == [f"gsm8k/test/{i}" for i in range(5)]
    assert get_task("gsm8k").load(limit=0) == []


def test_path_may_be_a_file_a_task_folder_or_the_data_root(data_dir):
    task = get_task("gsm8k")
    from_file = task.load(data_dir / "gsm8k" / "train.jsonl", limit=3)
    from_folder = task.load(data_dir / "gsm8k", split="train", limit=3)
    from_root = task.load(data_dir, split="train", limit=3)
    assert from_file == from_folder == from_root
    assert from_file[0].answer == "72"


def test_gsm8k_gold_is_the_number_after_the_marker(data_dir):
    problems = get_task("gsm8k").load(data_dir)
    assert problems[0].answer == "18"
    for p in problems:
        assert re.fullmatch(r"-?\d+", p.answer), p.answer  # commas removed
        assert p.meta["solution"].rsplit("####", 1)[1].strip().replace(",", "") == p.answer


def test_math500_fields(data_dir):
    problems = get_task("math500").load(data_dir)
    assert problems[0].id == "test/precalculus/807.json"
    assert problems[0].answer == "\\left( 3, \\frac{\\pi}{2} \\right)"
    subjects = collections.Counter(p.meta["subject"] for p in problems)
    assert subjects["Algebra"] == 124 and subjects["Counting & Probability"] == 38
    levels = collections.Counter(p.meta["level"] for p in problems)
    assert levels == {1: 43, 2: 90, 3: 105, 4: 128, 5: 134}


def test_strategyqa_memreason_steps_and_labels(data_dir):
    task = get_task("strategyqa")
    train = task.load(data_dir, split="train")
    test = task.load(data_dir, split="test")
    assert collections.Counter(p.answer for p in train) == {"no": 865, "yes": 738}
    assert collections.Counter(p.answer for p in test) == {"no": 354, "yes": 333}
    train_labels = collections.Counter(label for p in train for label, _ in p.meta["steps"])
    assert train_labels == {"memory": 3646, "reason": 3893}
    # Two test steps are tagged "[reason] and [rag]"; they count as reasoning steps.
    test_labels = collections.Counter(label for p in test for label, _ in p.meta["steps"])
    assert test_labels == {"memory": 1542, "reason": 1708 + 2}
    assert sum(not p.meta["steps"] for p in test) == 1
    first = test[0].meta["steps"][0]
    assert first == ("memory", "The ship that recovered Apollo 13 was the USS Iwo Jima (LPH-2).")
    assert all(not text.startswith("[") for p in train + test for _, text in p.meta["steps"])


def test_strategyqa_original_format(data_dir):
    dev = get_task("strategyqa").load(data_dir, split="dev")
    assert dev[0].id == "e0044a7b4d146d611e73" and dev[0].answer == "no"
    assert dev[0].meta["format"] == "original"
    assert dev[0].meta["facts"] == ["Albany, GA has around 75,000 people", "Albany, NY has almost 100,000 people"]
    assert len(dev[0].meta["decomposition"]) == 5
    assert {p.answer for p in dev} == {"yes", "no"}


@pytest.mark.parametrize("name, split", [("commonsenseqa", "test"), ("truthfulqa", "train"), ("truthfulqa", "test")])
def test_multiple_choice_options_are_parsed(data_dir, name, split):
    task = get_task(name)
    problems = task.load(data_dir, split=split)
    for p in problems:
        letters = [letter for letter, _ in p.meta["choices"]]
        assert len(letters) >= 2 and letters == [chr(ord("A") + i) for i in range(len(letters))]
        assert p.answer in letters
        assert all(text for _, text in p.meta["choices"])
    first = problems[0]
    prompt = task.prompt(first)
    assert first.meta["stem"] in prompt and "\nA. " in prompt and "\nB. " in prompt
    if name == "commonsenseqa":
        assert first.meta["choices"][0] == ("A", "bank")


def test_messages_are_chat_messages(data_dir):
    for name in ("gsm8k", "math500", "strategyqa", "commonsenseqa", "humaneval", "mbpp"):
        task = get_task(name)
        problem = task.load(data_dir, limit=1)[0]
        messages = task.messages(problem)
        assert [m["role"] for m in messages] == ["user"]
        assert problem.question.strip()[:40] in messages[0]["content"]
    gsm8k = get_task("gsm8k")
    assert "The answer is" in gsm8k.prompt(gsm8k.load(data_dir, limit=1)[0])
    math500 = get_task("math500")
    assert "\\boxed{}" in math500.prompt(math500.load(data_dir, limit=1)[0])


# -- errors -----------------------------------------------------------------------------------


def test_missing_file_names_the_path(tmp_path):
    with pytest.raises(TaskError, match=re.escape(str(tmp_path / "gsm8k" / "test.jsonl"))):
        get_task("gsm8k").load(tmp_path)
    with pytest.raises(TaskError, match="data path '.*nowhere' does not exist"):  # not ".../nowhere/humaneval/..."
        get_task("humaneval").load(tmp_path / "nowhere")


def test_unknown_task_split_and_option(data_dir):
    with pytest.raises(TaskError, match="'gsm9k'"):
        get_task("gsm9k")
    with pytest.raises(TaskError, match="unknown split 'validation'"):
        get_task("gsm8k").load(data_dir, split="validation")
    with pytest.raises(TaskError, match="bad options"):
        get_task("gsm8k", level=3)
    with pytest.raises(TaskError, match="level must be >= 1"):
        get_task("synthetic", level=0)


def test_malformed_file_names_the_problem(tmp_path, data_dir):
    bad = tmp_path / "test.jsonl"
    bad.write_text('{"question": "q", "answer": "no marker"}\n')
    with pytest.raises(TaskError, match="no '#### answer' line"):
        get_task("gsm8k").load(bad)
    with pytest.raises(TaskError, match="gsm8k: row 0 of .*mbpp.jsonl has no field 'answer'"):
        get_task("gsm8k").load(data_dir / "mbpp" / "mbpp.jsonl")
    broken = tmp_path / "broken.jsonl"
    broken.write_text('{"question": \n')
    with pytest.raises(TaskError, match="cannot read data file"):
        get_task("gsm8k").load(broken)


# -- checking ---------------------------------------------------------------------------------


def test_gsm8k_check_many(data_dir, checker):
    task = get_task("gsm8k", checker=checker)
    problems = task.load(data_dir, limit=60)
    right = [f"Let me compute.\nThe answer is {p.answer}." for p in problems]
    wrong = [f"The answer is {int(p.answer) + 1}." for p in problems]
    assert task.check_many(right, problems) == [True] * 60
    assert task.check_many(wrong, problems) == [False] * 60
    assert task.check(problems[0].meta["solution"], problems[0])  # the "#### 18" solution itself
    assert not task.check("I do not know.", problems[0])
    with pytest.raises(TaskError, match="2 completions for 1 problems"):
        task.check_many(["a", "b"], problems[:1])


def test_math500_solutions_check_against_their_golds(data_dir, checker):
    task = get_task("math500", checker=checker)
    problems = task.load(data_dir)
    assert all(task.check_many([p.meta["solution"] for p in problems], problems))
    shifted = problems[1:] + problems[:1]
    assert sum(task.check_many([p.meta["solution"] for p in shifted], problems)) < 10


def test_yes_no_and_choice_checks(data_dir):
    strategy = get_task("strategyqa")
    problems = strategy.load(data_dir, limit=40)
    assert strategy.check_many([f"So the answer is {p.answer}." for p in problems], problems) == [True] * 40
    flipped = {"yes": "no", "no": "yes"}
    assert strategy.check_many([f"The answer is {flipped[p.answer]}." for p in problems], problems) == [False] * 40
    truthful = get_task("truthfulqa")
    problems = truthful.load(data_dir, split="train")
    assert all(truthful.check_many([f"The answer is ({p.answer})." for p in problems], problems))
    assert not any(truthful.check_many(["The answer is (Z)." for _ in problems], problems))


def _run_python(program: str) -> int:
    return subprocess.run([sys.executable, "-I", "-c", program], capture_output=True, timeout=60).returncode


def test_code_programs_pass_with_reference_solutions_and_fail_without(data_dir):
    humaneval = get_task("humaneval")
    for p in humaneval.load(data_dir, limit=3):
        assert _run_python(humaneval.program(p.answer, p)) == 0
        assert _run_python(humaneval.program("    return None\n", p)) != 0
    mbpp = get_task("mbpp")
    for p in mbpp.load(data_dir, limit=3):
        assert p.meta["task_id"] in (11, 12, 13)
        assert _run_python(mbpp.program(p.answer, p)) == 0
        assert _run_python(mbpp.program("pass", p)) != 0


def test_code_check_runs_in_the_sandbox(data_dir):
    pytest.importorskip("guidedecode.tasks.sandbox")
    humaneval = get_task("humaneval")
    problems = humaneval.load(data_dir, limit=2)
    full = [f"```python\n{p.question}{p.answer}```" for p in problems]
    body_only = [p.answer for p in problems]
    assert humaneval.check_many(full + body_only, problems + problems) == [True] * 4
    assert humaneval.check_many(["```python\ndef nothing():\n    pass\n```"], problems[:1]) == [False]
    mbpp = get_task("mbpp")
    problems = mbpp.load(data_dir, limit=2)
    assert mbpp.check_many([f"Sure:\n```python\n{p.answer}\n```" for p in problems], problems) == [True, True]
    assert mbpp.check_many(["", "while True: pass"], problems) == [False, False]


# -- synthetic --------------------------------------------------------------------------------


def test_synthetic_is_deterministic_per_seed():
    a = SyntheticArithmetic(level=2, seed=7).load(limit=50)
    b = get_task("synthetic", level=2, seed=7).load(limit=50)
    assert a == b
    assert SyntheticArithmetic(level=2, seed=7).load(limit=10) == a[:10]
    other = SyntheticArithmetic(level=2, seed=8).load(limit=50)
    assert sum(x.question == y.question for x, y in zip(a, other)) <= 1
    train = SyntheticArithmetic(level=2, seed=7).load(split="train", limit=50)
    assert not {p.question for p in train} & {p.question for p in a}
    assert len({p.question for p in a}) == 50


def test_synthetic_gold_follows_the_story():
    for level in (1, 2, 3, 5):
        for p in SyntheticArithmetic(level=level, seed=1).load(limit=100):
            count = p.meta["start"]
            for kind, operand, total in p.meta["trace"]:
                count = {
                    "add": count + operand, "sub": count - operand, "packs_in": count + operand,
                    "packs_out": count - operand, "half": count // operand, "double": count * 2, "triple": count * 3,
                }[kind]
                assert count == total and count >= 0
            assert p.answer == str(count)
            assert p.question.endswith("have now?")
            assert len(p.meta["trace"]) == level


def test_synthetic_difficulty_grows_with_level():
    def stats(level):
        problems = SyntheticArithmetic(level=level, seed=0).load(limit=200)
        numbers = [int(n) for p in problems for n in re.findall(r"\d+", p.question)]
        kinds = {kind for p in problems for kind, _, _ in p.meta["trace"]}
        return sum(numbers) / len(numbers), sum(len(p.meta["trace"]) for p in problems) / len(problems), kinds

    previous = stats(1)
    assert previous[2] == {"add", "sub"}
    for level in (2, 3, 4, 5):
        current = stats(level)
        assert current[0] > previous[0]  # larger numbers
        assert current[1] > previous[1]  # more events
        assert current[2] >= previous[2]  # at least the same kinds of events
        previous = current
    assert previous[2] == set(level_spec(5).kinds)
    assert level_spec(2).kinds == ("add", "sub")
    assert level_spec(5).kinds == ("add", "sub", "packs_in", "packs_out", "half", "double", "triple")


def test_synthetic_check_and_prompt(checker):
    task = SyntheticArithmetic(level=1, seed=0, checker=checker)
    problems = task.load(limit=20)
    assert task.check_many([f"The answer is {p.answer}." for p in problems], problems) == [True] * 20
    assert task.check_many([f"The answer is {int(p.answer) + 2}." for p in problems], problems) == [False] * 20
    with pytest.raises(TaskError, match="generated, not read"):
        task.load("somewhere.jsonl")


def test_synthetic_prompt_has_worked_examples_of_the_same_level(checker):
    for level in (1, 3):
        task = SyntheticArithmetic(level=level, seed=0, shots=2, checker=checker)
        problem = task.load(limit=1)[0]
        messages = task.messages(problem)
        assert [m["role"] for m in messages] == ["user", "assistant"] * 2 + ["user"]
        assert problem.question in messages[-1]["content"] and "The answer is" in messages[-1]["content"]
        demos = task.demos
        assert all(len(d.meta["trace"]) == level for d in demos)
        assert [m["content"] for m in messages[1:4:2]] == [d.meta["solution"] for d in demos]
        assert task.check_many([d.meta["solution"] for d in demos], demos) == [True, True]
        test_questions = {p.question for p in task.load(limit=500)}
        assert not any(d.question in test_questions for d in demos)
    zero_shot = SyntheticArithmetic(level=1, shots=0)
    assert len(zero_shot.messages(problem)) == 1


# -- Hugging Face Hub when no local copy is given (issue 8 item 20) ---------------------------


def _hub_repo(root, repo_id, configs):
    """A local copy of a Hub dataset repository (what ``git clone`` of it gives): a README.md with
    the ``configs`` YAML and parquet files. ``datasets.load_dataset`` reads it through the same
    config/split resolution as the Hub repository, so pointing a task's Hub id here exercises the
    real loading code offline."""
    import datasets

    repo = root / repo_id
    yaml = ["---", "configs:"]
    for config, splits in configs.items():
        yaml += [f"- config_name: {config}", "  data_files:"]
        features = datasets.Dataset.from_list([r for rows in splits.values() for r in rows]).features  # one schema
        for split, rows in splits.items():
            relative = f"{config}/{split}-00000-of-00001.parquet"
            (repo / config).mkdir(parents=True, exist_ok=True)
            datasets.Dataset.from_list(rows, features=features).to_parquet(str(repo / relative))
            yaml += [f"  - split: {split}", f"    path: {relative}"]
    (repo / "README.md").write_text("\n".join(yaml + ["---", ""]))
    return str(repo)


@pytest.fixture
def no_local_data(monkeypatch, tmp_path):
    """A fresh clone elsewhere: no --data, no $GUIDEDECODE_DATA, no ../shared/data."""
    from guidedecode.tasks import base

    monkeypatch.delenv("GUIDEDECODE_DATA", raising=False)
    monkeypatch.setattr(base, "DEFAULT_DATA_DIR", tmp_path / "no-shared-data")
    return tmp_path


def _raw_rows(path, n=None):
    from guidedecode.tasks.base import read_rows

    rows = read_rows(path)
    return rows if n is None else rows[:n]


def test_without_local_data_tasks_load_from_the_hub(no_local_data, data_dir, monkeypatch):
    from guidedecode.tasks.base import HubSource

    gsm8k = get_task("gsm8k")
    assert gsm8k.hub["test"] == HubSource("openai/gsm8k", "main", "test")  # the real id
    repo = _hub_repo(no_local_data, "openai/gsm8k", {
        "main": {"test": _raw_rows(data_dir / "gsm8k" / "test.jsonl", 12),
                 "train": _raw_rows(data_dir / "gsm8k" / "train.jsonl", 3)},
    })
    monkeypatch.setattr(type(gsm8k), "hub", {s: HubSource(repo, "main", s) for s in ("test", "train")})
    assert gsm8k.load(limit=5) == get_task("gsm8k").load(data_dir, limit=5)  # same ids, questions, golds
    assert len(gsm8k.load(split="train")) == 3

    humaneval = get_task("humaneval")
    assert humaneval.hub["test"].id == "openai/openai_humaneval"
    rows = _raw_rows(data_dir / "humaneval" / "HumanEval.jsonl.gz", 4)
    repo = _hub_repo(no_local_data, "openai/openai_humaneval", {"openai_humaneval": {"test": rows}})
    monkeypatch.setattr(type(humaneval), "hub", {"test": HubSource(repo, None, "test")})
    assert humaneval.load() == humaneval.load(data_dir, limit=4)


def test_mbpp_from_the_hub_joins_the_full_splits_and_keeps_the_task_id_ranges(no_local_data, data_dir, monkeypatch):
    from guidedecode.tasks.base import HubSource

    mbpp = get_task("mbpp")
    assert mbpp.hub["test"].id == "google-research-datasets/mbpp" and mbpp.hub["test"].config == "full"
    rows = {r["task_id"]: r for r in _raw_rows(data_dir / "mbpp" / "mbpp.jsonl")}
    full = {"train": [rows[i] for i in (601, 602)], "test": [rows[i] for i in (11, 12, 13)],
            "validation": [rows[511]], "prompt": [rows[1], rows[2]]}
    repo = _hub_repo(no_local_data, "google-research-datasets/mbpp", {"full": full})
    monkeypatch.setattr(type(mbpp), "hub", {s: HubSource(repo, "full", "train+test+validation+prompt") for s in mbpp.files})
    local = {p.meta["task_id"]: p for p in mbpp.load(data_dir, split="all")}
    assert mbpp.load() == [local[i] for i in (11, 12, 13)]
    assert [p.meta["task_id"] for p in mbpp.load(split="prompt")] == [1, 2]
    assert len(mbpp.load(split="all")) == 8


def test_commonsenseqa_hub_rows_give_the_same_prompts(no_local_data, data_dir, monkeypatch):
    from guidedecode.tasks.base import HubSource

    task = get_task("commonsenseqa")
    local = task.load(data_dir, limit=6)
    hub_rows = [{"id": str(i), "question": p.meta["stem"], "question_concept": "",
                 "choices": {"label": [c for c, _ in p.meta["choices"]], "text": [t for _, t in p.meta["choices"]]},
                 "answerKey": p.answer} for i, p in enumerate(local)]
    repo = _hub_repo(no_local_data, "tau/commonsense_qa", {"default": {"validation": hub_rows}})
    monkeypatch.setattr(type(task), "hub", {"test": HubSource(repo, None, "validation")})
    from_hub = task.load()
    assert [task.prompt(p) for p in from_hub] == [task.prompt(p) for p in local]
    assert [(p.id, p.answer, p.meta["choices"]) for p in from_hub] == [(p.id, p.answer, p.meta["choices"]) for p in local]


def test_no_data_anywhere_names_all_three_places(no_local_data, monkeypatch):
    import datasets.config
    import huggingface_hub.constants

    from guidedecode.tasks import base
    from guidedecode.tasks.base import HubSource

    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)  # never touch the network here
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", no_local_data / "hf-cache")
    gsm8k = get_task("gsm8k")
    monkeypatch.setattr(type(gsm8k), "hub", {"test": HubSource("guidedecode-tests/no-such-dataset", "main", "test")})
    with pytest.raises(TaskError) as error:
        gsm8k.load()
    message = str(error.value)
    for needle in ("--data", "GUIDEDECODE_DATA", str(base.DEFAULT_DATA_DIR), "guidedecode-tests/no-such-dataset"):
        assert needle in message, (needle, message)
    with pytest.raises(TaskError, match="no Hugging Face Hub copy") as error:
        get_task("truthfulqa").load()
    for needle in ("--data", "GUIDEDECODE_DATA", str(base.DEFAULT_DATA_DIR)):
        assert needle in str(error.value)
