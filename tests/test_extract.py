"""Answer extractors, on the real rows of the data dir and on the edge cases models produce."""

import gzip
import json
import re
import string

import pytest

from guidedecode.errors import TaskError
from guidedecode.tasks import (
    extract_answer,
    extract_answer_is,
    extract_boxed,
    extract_choice,
    extract_code,
    extract_gsm8k,
    extract_last_number,
    extract_yes_no,
)


def _jsonl(path):
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.fixture(scope="module")
def gsm8k_rows(data_dir):
    return _jsonl(data_dir / "gsm8k/test.jsonl") + _jsonl(data_dir / "gsm8k/train.jsonl")


@pytest.fixture(scope="module")
def math500_rows(data_dir):
    return _jsonl(data_dir / "math500/test.jsonl")


def _gsm8k_gold(row):
    return row["answer"].rsplit("####", 1)[1].strip().replace(",", "")


# -- GSM8K ------------------------------------------------------------------------------------


def test_gsm8k_marker_on_every_gsm8k_solution(gsm8k_rows):
    assert len(gsm8k_rows) == 1319 + 7473
    for row in gsm8k_rows:
        assert extract_gsm8k(row["answer"]) == _gsm8k_gold(row)


def test_gsm8k_golds_cover_commas_and_negatives(gsm8k_rows):
    raw = [row["answer"].rsplit("####", 1)[1].strip() for row in gsm8k_rows]
    assert any("," in g for g in raw) and any(g.startswith("-") for g in raw)
    assert extract_gsm8k("#### 1,450,000") == "1450000"
    assert extract_gsm8k("#### -3") == "-3"
    assert extract_gsm8k("first #### 5\nthen #### 7") == "7"
    assert extract_gsm8k("#### none") is None
    assert extract_gsm8k("no marker 5") is None


def test_last_number_on_gsm8k_solutions(gsm8k_rows):
    for row in gsm8k_rows:  # the solution ends with "#### <gold>"
        assert extract_last_number(row["answer"]) == _gsm8k_gold(row)
    # Without the marker line, the last number written is the result of the last calculation,
    # which is the gold for almost every solution.
    bodies = [row["answer"].rsplit("####", 1)[0] for row in gsm8k_rows]
    hits = sum(extract_last_number(b) == _gsm8k_gold(r) for b, r in zip(bodies, gsm8k_rows))
    assert hits / len(gsm8k_rows) > 0.9


def test_last_number_forms_from_gsm8k_text(gsm8k_rows):
    # Decimals, fractions and negatives as they occur in real solutions.
    text = " ".join(row["answer"] for row in gsm8k_rows[:400])
    assert re.search(r"\d\.\d", text) and re.search(r"\d/\d", text)
    assert extract_last_number("She pays $1,600 in total.") == "1600"
    assert extract_last_number("It drops to -3 degrees.") == "-3"
    assert extract_last_number("Half is 0.5 and a third of it is .25") == ".25"
    assert extract_last_number("She ate 3/4 of the pie") == "3/4"
    assert extract_last_number("So 5-3 = 2.") == "2"
    assert extract_last_number("from 12 to 15.") == "15"
    assert extract_last_number("no digits here") is None


def test_answer_is_on_gsm8k_solutions(gsm8k_rows):
    for row in gsm8k_rows:
        completion = row["answer"].replace("####", "The answer is") + "."
        assert extract_answer_is(completion) == row["answer"].rsplit("####", 1)[1].strip()
        assert extract_answer(completion, "number") == _gsm8k_gold(row)


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is 18.", "18"),
        ("so the answer is $18.", "18"),
        ("**The answer is: 42**", "42"),
        ("The final answer is $\\frac{1}{2}$.", "\\frac{1}{2}"),
        ("The answer is \\(x^2\\).", "x^2"),
        ("The answer is \\boxed{7}. Wait, the answer is 8!", "8"),
        ("Final answer: \\text{Evelyn}", "Evelyn"),
        ("There is no stated result.", None),
    ],
)
def test_answer_is_edge_cases(completion, expected):
    assert extract_answer_is(completion) == expected


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("The answer is 1,600 dollars.", "1600"),
        ("The answer is $\\frac{3}{4}$.", "3/4"),
        ("The answer is 5 + 3 = 8.", "8"),
        ("We get \\boxed{12}.", "12"),
        ("Total: 4 + 5 = 9 apples", "9"),
        ("nothing", None),
    ],
)
def test_number_kind(completion, expected):
    assert extract_answer(completion, "number") == expected


# -- MATH -------------------------------------------------------------------------------------


def test_boxed_on_every_math500_solution(math500_rows):
    assert len(math500_rows) == 500
    for row in math500_rows:
        assert extract_boxed(row["solution"]) == row["answer"]
        assert extract_answer(row["solution"], "math") == row["answer"]


def test_boxed_keeps_nested_braces(math500_rows):
    nested = [r for r in math500_rows if "{" in r["answer"]]
    assert len(nested) > 100
    for row in nested:
        assert extract_boxed(f"so we get $\\boxed{{{row['answer']}}}$.") == row["answer"]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("\\boxed{\\frac{\\sqrt{3}}{2}}", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("$\\boxed 5$", "5"),
        ("\\fbox{x^{2}+1}", "x^{2}+1"),
        ("\\boxed{unclosed", None),
        ("\\boxed{}", None),
        ("no box", None),
    ],
)
def test_boxed_edge_cases(completion, expected):
    assert extract_boxed(completion) == expected


# -- choice, yes/no, code ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "file",
    [
        "commonsenseqa_memreason/commonsense_qa_test_clean_CC.json",
        "truthfulqa_memreason/truthful_qa_test_clean_CC.json",
        "truthfulqa_memreason/truthful_qa_train_clean_CC.json",
    ],
)
def test_choice_on_multiple_choice_rows(data_dir, file):
    rows = json.loads((data_dir / file).read_text())
    forms = ["The answer is ({}).", "Answer: {}", "So the correct option is {}.", "I pick\n{}.", "**Answer: {}**"]
    for i, row in enumerate(rows):  # completions that restate the options, then answer
        completion = row["question"] + "\nLet me think.\n" + forms[i % len(forms)].format(row["answer"])
        assert extract_choice(completion, letters=string.ascii_uppercase) == row["answer"]


@pytest.mark.parametrize(
    "completion, expected",
    [
        ("(A) is wrong, (C) is right", "C"),
        ("Answer:B", "B"),
        ("The answer is a dog.", None),
        ("The answer is C.will", None),
        ("The answer is E", "E"),
        ("The answer is F", None),
        ("A cat is an animal.", None),
    ],
)
def test_choice_edge_cases(completion, expected):
    assert extract_choice(completion) == expected


def test_choice_respects_letters():
    assert extract_choice("The answer is (E).", letters="ABCD") is None


@pytest.mark.parametrize(
    "file", ["strategyqa_memreason/StrategyQA_test_clean.json", "strategyqa_memreason/StrategyQA_train_clean.json"]
)
def test_yes_no_on_strategyqa_rows(data_dir, file):
    rows = json.loads((data_dir / file).read_text())
    for i, row in enumerate(rows):
        steps = " ".join(s.split(":", 1)[1] for s in row["cot_steps"])
        word = ("yes" if row["answer"] == "True" else "no") if i % 2 else row["answer"].lower()
        expected = "yes" if row["answer"] == "True" else "no"
        assert extract_yes_no(f"{steps}\nSo the answer is {word}.") == expected


def test_yes_no_on_original_strategyqa_rows(data_dir):
    rows = json.loads((data_dir / "strategyqa/dev.json").read_text())
    for row in rows:
        completion = " ".join(row["facts"]) + f" Thus: {'Yes' if row['answer'] else 'No'}."
        assert extract_yes_no(completion) == ("yes" if row["answer"] else "no")


@pytest.mark.parametrize(
    "completion, expected",
    [("**Yes**", "yes"), ("False.", "no"), ("No, wait: the answer is yes", "yes"), ("maybe", None)],
)
def test_yes_no_edge_cases(completion, expected):
    assert extract_yes_no(completion) == expected


def test_code_on_humaneval_rows(data_dir):
    with gzip.open(data_dir / "humaneval/HumanEval.jsonl.gz", "rt") as f:
        rows = [json.loads(line) for line in f]
    for row in rows:
        code = row["prompt"] + row["canonical_solution"]
        assert extract_code(f"Here you go:\n```python\n{code}```\nDone.") == code
        assert extract_code(f"```\n{code}```") == code
        assert extract_code(code) == code


def test_code_on_mbpp_rows(data_dir):
    rows = _jsonl(data_dir / "mbpp/mbpp.jsonl")
    for row in rows[:200]:
        completion = f"```text\nsome notes\n```\nCode:\n```python\n{row['code']}\n```"
        assert extract_code(completion) == row["code"] + "\n"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"  # cut off by max tokens
    assert extract_code("   ") is None


def test_extract_answer_dispatch():
    assert extract_answer("The answer is (D).", "choice") == "D"
    assert extract_answer("The answer is no.", "yesno") == "no"
    assert extract_answer("```py\nx = 1\n```", "code") == "x = 1\n"
    with pytest.raises(TaskError, match="unknown answer kind 'essay'"):
        extract_answer("text", "essay")
