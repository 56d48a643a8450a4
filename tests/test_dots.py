"""DOTS: action library and codec, the constrained action line (outlines-core), the executor with the
sandbox, the trajectory search (Algorithm 1) and the SFT builder. Tiny random models throughout;
scripted replies are forced token by token through a logits processor (the model still runs)."""

from __future__ import annotations

import time

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from guidedecode.dots import (
    ACTION_LINES,
    ALL_TRAJECTORIES,
    DOTS,
    ActionError,
    ActionLibrary,
    Trajectory,
    decode_action_line,
    parse_trajectory,
)
from guidedecode.dots.actions import cot, decompose, pot, rewrite, verify
from guidedecode.errors import StrategyError
from guidedecode.guides.base import TokenGuide


@pytest.fixture(scope="module")
def tokenizer():
    from guidedecode.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


@pytest.fixture(scope="module")
def backend(tokenizer):
    from guidedecode.backends import HFBackend
    from guidedecode.testing import tiny_model

    return HFBackend(tiny_model("llama", seed=0, vocab_size=len(tokenizer)), tokenizer)


class ForcedReplies(TokenGuide):
    """Forces each generated row to spell ``reply_for(prompt_text)`` followed by EOS."""

    def __init__(self, tokenizer, reply_for, *, release: bool = False):
        self.tokenizer, self.reply_for, self.release = tokenizer, reply_for, release  # release: free after the text
        super().__init__(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)

    def init_state(self, prompt_ids, prompt_mask):
        rows = []
        for ids, mask in zip(prompt_ids, prompt_mask):
            text = self.tokenizer.decode(ids[mask].tolist())
            target = self.tokenizer(self.reply_for(text), add_special_tokens=False)["input_ids"]
            rows.append({"target": target + ([] if self.release else [self.tokenizer.eos_token_id]), "pos": 0})
        return rows

    def update_state(self, state, tokens, alive):
        for row, live in zip(state, alive.tolist()):
            row["pos"] += int(live)
        return state

    def adjust(self, scores, state, active):
        out = scores.clone()
        for i, row in enumerate(state):
            if self.release and row["pos"] >= len(row["target"]):
                continue
            out[i] = float("-inf")
            out[i, row["target"][min(row["pos"], len(row["target"]) - 1)]] = 0.0
        return out


def scripted_backend(backend, reply_for, *, release: bool = False):
    from guidedecode.backends import HFBackend

    forced = ForcedReplies(backend.tokenizer, reply_for, release=release)
    return HFBackend(backend.model, backend.tokenizer, logits_processor=[forced])


# ----------------------------------------------------------------------------------- action library


def test_twelve_trajectories_round_trip_in_every_spelling():
    assert len(ALL_TRAJECTORIES) == 12 == len(set(ALL_TRAJECTORIES)) == len(set(ACTION_LINES))
    for t in ALL_TRAJECTORIES:
        assert parse_trajectory(t.action_line) == t
        assert parse_trajectory(t.slots) == t
        assert parse_trajectory(t.paper_names()) == t
        assert parse_trajectory(t.paper_names().upper()) == t
        assert decode_action_line(f"blah\nRequired Action: {t.action_line}\nNow").trajectory == t
        assert 1 <= t.length <= 3 and t.length == len(t.actions)


def test_paper_names_and_code_ids_parse_identically():
    pairs = [("decomposition", "planning"), ("Query decomposition", "planning"), ("rewriting", "query_rewriting"),
             ("PoT", "programming_solver"), ("programming", "programming_solver"), ("CoT", "CoT"),
             ("self-verification", "verifier"), ("Self-Verification", "verifier")]
    for paper, code in pairs:
        assert parse_trajectory([paper]) == parse_trajectory([code])
    assert parse_trajectory(["planning", "programming_solver", "verifier", "direct_answering"]) == Trajectory(
        "planning", "programming_solver", "verifier")
    assert parse_trajectory(["", "CoT", "", "direct_answering"]) == Trajectory()


def test_one_prompt_module_per_action():
    modules = (rewrite, decompose, cot, pot, verify)
    assert {m.CODE_ID for m in modules} == {"query_rewriting", "planning", "CoT", "programming_solver", "verifier"}
    assert all(m.INSTRUCTION and m.LAYER for m in modules)


@pytest.mark.parametrize("bad, needle", [
    ("CoT, magic", "unknown action 'magic'"),
    (["CoT", "PoT"], "two solution actions"),
    ("", "empty trajectory"),
    ([], "empty trajectory"),
    (["Empty", "direct_answering"], "empty trajectory"),
    (42, "got int"),
])
def test_bad_trajectories_raise_naming_the_input(bad, needle):
    with pytest.raises(ActionError, match=needle):
        parse_trajectory(bad)


def test_decode_action_line_is_lenient_and_takes_the_last_line():
    assert decode_action_line("no line here").trajectory is None
    plan = decode_action_line("Required Action: PoT\nthen\nRequired Action: planning, magic, verifier\nsolution")
    assert plan.trajectory == Trajectory("planning", "CoT", "verifier")  # last line; solution defaults to CoT
    assert plan.ignored == ("magic",)
    assert decode_action_line("Required Action: nothing useful").trajectory is None


def test_compiled_prompt_numbers_the_steps_and_leaves_out_empty_and_verifier():
    library = ActionLibrary()
    text = library.compile("What is 2+3?", "planning, PoT, verifier")
    assert text.startswith("{\nWhat is 2+3?\n}\nInstruction:{\n")
    assert f"Step 0: {decompose.INSTRUCTION}" in text and f"Step 1: {pot.INSTRUCTION}" in text
    assert f"Step 2: {library.direct_answer}" in text and "Step 3" not in text
    assert verify.INSTRUCTION not in text and '"#### Step i ####"' in text
    assert "Step 1:" in library.compile("q", "CoT") and "Step 2:" not in library.compile("q", "CoT")
    with pytest.raises(ActionError, match="unknown actions"):
        ActionLibrary(instructions={"magic": "x"})


def test_verdict_reads_the_last_line():
    assert verify.verdict("blah\nThe answer is: incorrect\n") == "incorrect"
    assert verify.verdict("The answer is: incorrect\nThe answer is: correct") == "correct"
    assert verify.verdict("no verdict") == "unclear"


# ------------------------------------------------------------------------------ constrained action line


def test_automaton_is_built_by_outlines_core(tokenizer):
    from outlines_core import Index

    from guidedecode.dots.action_line import ActionLineGuide

    guide = ActionLineGuide(tokenizer)
    assert isinstance(guide.index, Index)
    assert guide.regex == " (" + "|".join(ACTION_LINES) + ")\n"


def _step(guide, ids, scores):
    return guide(torch.tensor([ids]), scores[None])[0]


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(seed=st.integers(0, 2**31 - 1), before=st.integers(0, 12), after=st.integers(1, 8),
       scale=st.sampled_from([1.0, 5.0, 30.0]))
def test_action_line_is_always_one_of_the_twelve_and_free_text_is_untouched(tokenizer, seed, before, after, scale):
    from guidedecode.dots.action_line import ActionLineGuide

    guide = ActionLineGuide(tokenizer)
    generator = torch.Generator().manual_seed(seed)
    vocab = len(tokenizer) + 3  # the model's vocabulary may be wider than the tokenizer's
    ids = tokenizer("Plan:", add_special_tokens=False)["input_ids"]

    def logits():
        scores = torch.randn(vocab, generator=generator) * scale
        scores[tokenizer.eos_token_id] += scale  # push towards EOS: it must still be refused inside the line
        return scores

    for _ in range(before):  # free text: untouched, or only trigger-overrun tokens masked
        scores = logits()
        out = _step(guide, ids, scores)
        changed = (out != scores).nonzero().flatten().tolist()
        assert all(out[i] == float("-inf") for i in changed)
        assert not guide.active_rows()[0]
        ids.append(int(torch.multinomial(torch.softmax(out, -1), 1, generator=generator)))
    for token in tokenizer(" Required Action:", add_special_tokens=False)["input_ids"]:
        out = _step(guide, ids, logits())
        assert out[token] > float("-inf")
        ids.append(token)
    start = len(ids)
    for _ in range(40):
        out = _step(guide, ids, logits())
        if not guide.active_rows()[0]:
            break
        assert out[tokenizer.eos_token_id] == float("-inf") and out[len(tokenizer):].eq(float("-inf")).all()
        ids.append(int(torch.multinomial(torch.softmax(out, -1), 1, generator=generator)))
    line = tokenizer.decode(ids[start:])
    assert line.endswith("\n") and line[1:-1] in ACTION_LINES and line[0] == " "
    assert decode_action_line(tokenizer.decode(ids)).trajectory == parse_trajectory(line[1:-1])
    for _ in range(after):  # after the line: free again
        scores = logits()
        out = _step(guide, ids, scores)
        assert not guide.active_rows()[0]
        if not any(tokenizer.decode(ids).endswith("Required Action:"[:k]) for k in range(1, 16)):
            assert torch.equal(out, scores)
        ids.append(int(torch.argmax(out)))


def test_trigger_overrun_tokens_are_masked_only_at_the_trigger(tokenizer):
    from guidedecode.dots.action_line import ActionLineGuide

    guide = ActionLineGuide(tokenizer)
    overrun = [i for i, s in enumerate(guide.strings) if s and s.startswith(":") and len(s) > 1]
    assert overrun  # e.g. ":\n" or ": "
    ids = tokenizer("Required Action", add_special_tokens=False)["input_ids"]
    scores = torch.zeros(len(tokenizer))
    guide(torch.tensor([ids[:-1]]), scores[None])
    out = guide(torch.tensor([ids]), scores[None])[0]
    assert out[overrun].eq(float("-inf")).all()
    colon = tokenizer(":", add_special_tokens=False)["input_ids"][0]
    assert out[colon] == 0


def test_guided_generation_with_a_real_model_always_parses(backend):
    """The tiny random model's free text never names an action, yet every constrained plan parses."""
    from guidedecode.dots.action_line import ActionLineGuide
    from guidedecode.backends import HFBackend

    tokenizer = backend.tokenizer
    guide = ActionLineGuide(tokenizer)
    constrained = HFBackend(backend.model, tokenizer, logits_processor=[guide])
    prompt = "Plan the solution.\nRequired Action:"
    rows = constrained.sample([prompt], 24, max_new_tokens=48, temperature=1.5, seed=3)[0]  # 48 >= any line in chars
    for completion in rows:
        line = completion.text.split("\n", 1)[0]
        assert line[1:] in ACTION_LINES, completion.text
        assert decode_action_line(prompt + completion.text).trajectory is not None


# ---------------------------------------------------------------------------------------- executor

QUESTION = "Tom has 2 apples and gets 3 more. How many apples does he have? End with 'The answer is N.'"


def test_bad_executor_settings_raise(backend):
    with pytest.raises(ActionError, match="unknown action"):
        DOTS("CoT, telepathy")
    with pytest.raises(ActionError, match="empty trajectory"):
        DOTS([])
    with pytest.raises(StrategyError, match="unknown DOTS mode"):
        DOTS(mode="psychic")
    with pytest.raises(StrategyError, match="planner model is used only"):
        DOTS(mode="internal", planner=backend)
    with pytest.raises(StrategyError, match="code_timeout"):
        DOTS("PoT", code_timeout=0)


def _reply_for(code):
    def reply(prompt):
        if "did not run successfully" in prompt.rsplit("<|im_start|>user", 1)[-1]:
            return "```python\nprint(5)\n```"
        if "After execution, we get:" in prompt:
            return "The answer is 5."
        return f"#### Step 0 ####\n```python\n{code}\n```\nignored tail"
    return reply


def test_pot_code_runs_in_the_sandbox_and_its_output_is_shown(backend):
    solver = scripted_backend(backend, _reply_for("print(2 + 3)"))
    result = DOTS("PoT").run(solver, [QUESTION])[0]
    head, events = result.trace[0], result.trace[1:]
    code = [e for e in events if e["event"] == "code"]
    assert code[0]["status"] == "pass" and code[0]["stdout"].strip() == "5"
    assert result.text == "The answer is 5."
    dialogue = head["dialogue"]
    assert [m["role"] for m in dialogue] == ["user", "assistant", "user", "assistant"]
    assert dialogue[1]["content"].endswith("```") and "ignored tail" not in dialogue[1]["content"]
    assert dialogue[2]["content"].startswith("After execution, we get:\n5\n")
    assert set(head["tokens"]) == {"solve", "direct_answering"}


BAD_PROGRAMS = {
    "loops_forever": "while True:\n    pass",
    "allocates_without_bound": "x = []\nwhile True:\n    x.append(bytearray(10**7))",
    "forks": "import os, time\nif os.fork() == 0:\n    time.sleep(1000)\ntime.sleep(1000)",
    "floods_stdout": "while True:\n    print('x' * 100000)",
    "exits_early": "import os\nprint(5)\nos._exit(0)",
    "raises": "print(1 / 0)",
}


@pytest.mark.parametrize("name", sorted(BAD_PROGRAMS))
def test_bad_programs_are_contained_and_scored_as_failure(backend, name):
    from guidedecode.tasks import get_task

    solver = scripted_backend(backend, _reply_for(BAD_PROGRAMS[name]))
    started = time.monotonic()
    result = DOTS("PoT", code_retries=0, code_timeout=1.0, code_memory_mb=256).run(solver, [QUESTION])[0]
    assert time.monotonic() - started < 30
    code = [e for e in result.trace[1:] if e["event"] == "code"]
    assert len(code) == 1 and not code[0]["ok"] and code[0]["status"] in ("timeout", "error", "fail")
    assert result.trace[-1]["event"] == "failed"
    assert result.text == "" and result.completion.finish_reason == "code_failed"
    task = get_task("synthetic")
    problem = task.load(limit=1)[0]
    assert task.check(result.text, problem) is False


def test_failed_program_gets_a_retry_then_continues(backend):
    solver = scripted_backend(backend, _reply_for("while True:\n    pass"))
    result = DOTS("PoT", code_retries=1, code_timeout=1.0).run(solver, [QUESTION])[0]
    code = [e for e in result.trace[1:] if e["event"] == "code"]
    assert [e["status"] for e in code] == ["timeout", "pass"] and result.text == "The answer is 5."
    assert "code_retry" in result.trace[0]["tokens"]


def _verifier_replies(verdicts):
    """First turn, then the verdicts in order, re-answers and the direct answer."""
    calls = {"verify": 0}

    def reply(prompt):
        last_user = prompt.rsplit("<|im_start|>user", 1)[-1]
        if verify.INSTRUCTION in last_user:
            calls["verify"] += 1
            return f"Check.\nThe answer is: {verdicts[min(calls['verify'], len(verdicts)) - 1]}"
        if "judged incorrect" in last_user:
            return f"Again. The answer is {4 + calls['verify']}."
        if "give the final answer" in last_user:
            return "The answer is 5."
        return "Step by step. The answer is 4."
    return reply


def test_verify_loop_reference_shape_with_one_round(backend):
    solver = scripted_backend(backend, _verifier_replies(["incorrect"]))
    result = DOTS("CoT, verifier", max_verify_rounds=1).run(solver, [QUESTION])[0]
    roles = [m["role"] for m in result.trace[0]["dialogue"]]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]  # solve, verify, re-answer
    assert [e["verdict"] for e in result.trace[1:] if e["event"] == "verify"] == ["incorrect"]
    assert result.text == "Again. The answer is 5."


def test_verify_loop_iterates_until_accepted_or_the_round_limit(backend):
    solver = scripted_backend(backend, _verifier_replies(["incorrect", "correct"]))
    result = DOTS("CoT, verifier", max_verify_rounds=3).run(solver, [QUESTION])[0]
    assert [e["verdict"] for e in result.trace[1:] if e["event"] == "verify"] == ["incorrect", "correct"]
    assert result.text == "The answer is 5."
    solver = scripted_backend(backend, _verifier_replies(["incorrect"]))
    result = DOTS("CoT, verifier", max_verify_rounds=2).run(solver, [QUESTION])[0]
    assert [e["verdict"] for e in result.trace[1:] if e["event"] == "verify"] == ["incorrect", "incorrect"]
    assert result.text == "Again. The answer is 6."  # the last re-answer, no third round


def test_external_planner_reply_without_action_line_falls_back_and_is_traced(backend):
    planner = scripted_backend(backend, lambda prompt: "I am not sure what to do.")
    solver = scripted_backend(backend, lambda prompt: "The answer is 5.")
    result = DOTS(mode="external", planner=planner, constrain=False).run(solver, [QUESTION])[0]
    events = result.trace[1:]
    assert events[0]["event"] == "plan" and events[1]["event"] == "fallback"
    assert "no 'Required Action:' line" in events[1]["reason"]
    assert result.trace[0]["source"] == "fallback" and result.trace[0]["trajectory"] == "CoT"
    with pytest.raises(StrategyError, match="no 'Required Action:' line"):
        DOTS(mode="external", planner=planner, constrain=False, on_missing_plan="error").run(solver, [QUESTION])


def test_external_planner_choice_is_executed(backend):
    planner = scripted_backend(backend, lambda p: "Because it is arithmetic.\nRequired Action: decomposition, PoT\n")
    solver = scripted_backend(backend, _reply_for("print(5)"))
    result = DOTS(mode="external", planner=planner, constrain=False).run(solver, [QUESTION])[0]  # paper names
    assert result.trace[0]["trajectory"] == "planning, programming_solver" and result.trace[0]["source"] == "external"
    first_prompt = result.trace[0]["dialogue"][0]["content"]
    assert decompose.INSTRUCTION in first_prompt and pot.INSTRUCTION in first_prompt
    assert result.text == "The answer is 5."


def test_constrained_external_planner_on_a_random_model_always_yields_a_trajectory(backend):
    """The planner's text is forced up to the trigger, then the random model writes the line under the guide."""
    planner = scripted_backend(backend, lambda p: "Arithmetic fits.\nRequired Action:", release=True)
    results = DOTS(mode="external", planner=planner, plan_max_new_tokens=60, max_new_tokens=4, temperature=1.5,
                   seed=1).run(backend, [QUESTION, "What is 7 times 6?", "What is 1 + 1?"])
    for result in results:
        plan = result.trace[1]
        assert result.trace[0]["source"] == "external" and plan["event"] == "plan"
        assert plan["text"].startswith("Arithmetic fits.\nRequired Action: ") and plan["text"].endswith("\n")
        assert plan["action_line"] == result.trace[0]["trajectory"] and plan["action_line"] in ACTION_LINES


def test_internal_mode_continues_the_solvers_own_plan(backend):
    reply = ("First, let me analyze the question.\nCode fits.\nRequired Action: programming_solver\n"
             "Now, I will begin solving the question with the required actions:\n```python\nprint(2+3)\n```")
    solver = scripted_backend(backend, lambda p: "The answer is 5." if "After execution" in p else reply)
    result = DOTS(mode="internal").run(solver, [QUESTION])[0]
    assert result.trace[0]["trajectory"] == "programming_solver" and result.trace[0]["source"] == "internal"
    assert [e["status"] for e in result.trace[1:] if e["event"] == "code"] == ["pass"]
    assert result.text == "The answer is 5."


def test_dots_is_registered_for_eval(tokenizer):
    from guidedecode.registry import build_strategy

    strategy = build_strategy("dots", tokenizer, {"trajectory": "decomposition,PoT", "max_verify_rounds": "1"})
    assert isinstance(strategy, DOTS) and strategy.trajectory == Trajectory("planning", "programming_solver", "")
    assert strategy.max_verify_rounds == 1
    with pytest.raises(ActionError, match="unknown action"):
        build_strategy("dots", tokenizer, {"trajectory": "magic"})
