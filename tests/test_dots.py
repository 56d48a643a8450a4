"""DOTS: action library and codec, the constrained action line (outlines-core), the executor with the
sandbox, the trajectory search (Algorithm 1) and the SFT builder. Tiny random models throughout;
scripted replies are forced token by token through a logits processor (the model still runs)."""

from __future__ import annotations

import json
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
        free = out.clone()
        free[tokenizer.eos_token_id] = float("-inf")  # EOS would end the row before the action line
        ids.append(int(torch.multinomial(torch.softmax(free, -1), 1, generator=generator)))
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
    rows = constrained.sample([prompt], 12, max_new_tokens=48, temperature=1.5, seed=3)[0]  # 48 >= any line in chars
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


def test_action_line_guide_rebuilt_from_a_history_inside_a_line_stays_constrained(tokenizer):
    """A guide that first sees a history ending inside an action line (a prompt ending "Required Action: Co",
    or a vLLM request resumed after preemption, whose generated tokens come back as prompt) continues that
    line; a prompt that quotes a malformed line and a finished one leaves the guide free, counting no line."""
    from guidedecode.dots.action_line import ActionLineGuide

    inside = tokenizer("Plan:\nRequired Action: Co", add_special_tokens=False)["input_ids"]
    guide = ActionLineGuide(tokenizer)
    out = _step(guide, inside, torch.zeros(len(tokenizer)))
    assert guide.active_rows() == [True]
    allowed = {tokenizer.decode([t]) for t in torch.isfinite(out).nonzero().flatten().tolist()}
    assert allowed and all(any(f" {line}\n".startswith(" Co" + text) for line in ACTION_LINES) for text in allowed)
    quoted = tokenizer("Example: Required Action: magic words\nRequired Action: CoT\nNow solve.",
                       add_special_tokens=False)["input_ids"]
    guide = ActionLineGuide(tokenizer, stop_after_line=True)
    scores = torch.randn(len(tokenizer), generator=torch.Generator().manual_seed(0))
    out = _step(guide, quoted, scores)
    assert guide.active_rows() == [False] and guide.state[0]["lines"] == 0
    assert torch.isfinite(out).sum() > len(tokenizer) // 2  # free text, no forced EOS


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
    before = solver.stats.counters()
    result = DOTS(mode="external", planner=planner, constrain=False).run(solver, [QUESTION])[0]  # paper names
    assert result.trace[0]["trajectory"] == "planning, programming_solver" and result.trace[0]["source"] == "external"
    spent = solver.stats.since(before)  # the planner's tokens count as the strategy's cost
    assert spent["generated_tokens"] == sum(result.trace[0]["tokens"].values())
    assert result.trace[0]["tokens"]["plan"] == planner.stats.generated_tokens > 0
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


# ---------------------------------------------------------------------------------- trajectory search


def _trajectory_of(prompt: str) -> str:
    analysis = "planning" if decompose.INSTRUCTION in prompt else "query_rewriting" if rewrite.INSTRUCTION in prompt else ""
    solution = "programming_solver" if pot.INSTRUCTION in prompt else "CoT"
    return Trajectory(analysis, solution, "verifier" if verify.INSTRUCTION in prompt else "").action_line


def _tagging_reply(prompt: str) -> str:
    """Every final answer names the trajectory that produced it: TRAJ[<action line>]."""
    last = prompt.rsplit("<|im_start|>user", 1)[-1]
    if verify.INSTRUCTION in last:
        return "Looks fine.\nThe answer is: correct"
    if pot.INSTRUCTION in last:
        return "```python\nprint(1)\n```"
    return f"TRAJ[{_trajectory_of(prompt)}]"


def scripted_checker(rates: dict[str, float], samples: int, calls: list | None = None):
    """Accepts the first round(rate * samples) runs of each trajectory in every call."""
    def check(texts, problems):
        seen: dict[str, int] = {}
        verdicts = []
        for text in texts:
            line = text[text.index("TRAJ[") + 5: text.index("]")]
            j = seen[line] = seen.get(line, -1) + 1
            verdicts.append(j < round(rates.get(line, 0.0) * samples))
        if calls is not None:
            calls.append(len(texts))
        return verdicts
    return check


def _problems(n=1):
    from guidedecode.tasks import get_task

    task = get_task("synthetic")
    return task, task.load(split="train", limit=n)


def test_rank_orders_by_success_then_length():
    from guidedecode.dots.search import rank

    t = {line: parse_trajectory(line) for line in ACTION_LINES}
    success = {t["planning, programming_solver, verifier"]: 0.5, t["CoT, verifier"]: 0.5, t["CoT"]: 0.25,
               t["query_rewriting, CoT, verifier"]: 0.75}
    assert [x.action_line for x in rank(success)] == [
        "query_rewriting, CoT, verifier", "CoT, verifier", "planning, programming_solver, verifier", "CoT"]


def test_search_follows_algorithm_1_on_a_scripted_checker(backend, tmp_path):
    from guidedecode.dots.search import SearchConfig, search

    task, problems = _problems(1)
    solver = scripted_backend(backend, _tagging_reply)
    rates = {"planning, CoT": 1.0, "CoT": 0.5, "query_rewriting, CoT": 0.5, "CoT, verifier": 0.5,
             "planning, programming_solver, verifier": 1.0}
    calls = []
    config = SearchConfig(rounds=2, samples=2, keep=(8, 3), temperature=0.7, max_new_tokens=24)
    summary = search(problems, solver, messages=task.messages, check=scripted_checker(rates, 2, calls), config=config,
                     out=tmp_path)[0]
    assert calls == [24, 16] and summary["runs"] == 2 * (12 + 8)  # N_eval * (12 + N_1)
    assert summary["status"] == "kept"
    assert summary["best"] == "planning, CoT"  # success 1.0, shorter than the other 1.0 trajectory
    assert summary["success"]["planning, programming_solver, verifier"] == 1.0
    assert summary["success"]["CoT"] == 0.5 and summary["success"]["programming_solver"] == 0.0
    assert summary["first_turn"] == "TRAJ[planning, CoT]"
    # round 2 ran only the top 8 of round 1
    units = [json.loads(line) for line in (tmp_path / "runs.jsonl").read_text().splitlines()]
    second = {r["trajectory"] for r in units[1]["runs"]}
    assert len(second) == 8 and {"planning, CoT", "planning, programming_solver, verifier", "CoT"} <= second
    # resume: the finished question is not searched again
    calls.clear()
    again = search(problems, solver, messages=task.messages, check=scripted_checker(rates, 2, calls), config=config,
                   out=tmp_path)[0]
    assert calls == [] and again == summary


def test_search_resumes_after_a_kill_between_rounds(backend, tmp_path):
    from guidedecode.dots.search import SearchConfig, search

    task, problems = _problems(1)
    solver = scripted_backend(backend, _tagging_reply)
    rates = {"CoT": 0.0, "programming_solver": 1.0}
    config = SearchConfig(rounds=2, samples=1, temperature=0.7, max_new_tokens=24)
    full = search(problems, solver, messages=task.messages, check=scripted_checker(rates, 1), config=config,
                  out=tmp_path / "a")[0]
    (tmp_path / "b").mkdir()
    first_unit = (tmp_path / "a" / "runs.jsonl").read_text().splitlines()[0]
    (tmp_path / "b" / "runs.jsonl").write_text(first_unit + "\n" + '{"torn": ')  # killed in round 2
    calls = []
    resumed = search(problems, solver, messages=task.messages, check=scripted_checker(rates, 1, calls),
                     config=config, out=tmp_path / "b")[0]
    assert calls == [8] and resumed == full and resumed["best"] == "programming_solver"


@pytest.mark.parametrize("rate, status", [(1.0, "all_pass"), (0.0, "all_fail")])
def test_search_drops_all_pass_and_all_fail_questions(backend, rate, status):
    from guidedecode.dots.search import SearchConfig, search

    task, problems = _problems(1)
    solver = scripted_backend(backend, _tagging_reply)
    config = SearchConfig(rounds=2, samples=1, temperature=0.7, max_new_tokens=24)
    summary = search(problems, solver, messages=task.messages,
                     check=scripted_checker({line: rate for line in ACTION_LINES}, 1), config=config)[0]
    assert summary["status"] == status and summary["best"] is None and summary["runs"] == 12  # no round 2
    assert set(summary["success"].values()) == {rate}


def test_search_settings_are_validated():
    from guidedecode.dots.search import PRESETS, SearchConfig

    with pytest.raises(StrategyError, match="keep"):
        SearchConfig(rounds=3, keep=(8,)).validate()
    with pytest.raises(StrategyError, match="temperature"):
        SearchConfig(temperature=0).validate()
    assert PRESETS["paper"] == SearchConfig(rounds=2, samples=4, keep=(8, 3), temperature=0.4)


def test_importance_selector_of_the_released_code():
    from guidedecode.dots.search import importance_trajectory

    runs = [{"trajectory": t.action_line, "score": t.uses_code} for t in ALL_TRAJECTORIES]
    assert importance_trajectory(runs) == Trajectory("", "programming_solver", "")
    assert importance_trajectory([{"trajectory": "CoT", "score": True}]) is None


# ------------------------------------------------------------------------------- SFT and the pipeline


def test_sft_records_in_both_formats_decode_to_the_best_trajectory():
    from guidedecode.dots.planner import BEGIN_SOLVING
    from guidedecode.training.dots import build_sft

    kept = [{"id": "q1", "question": "What is 2+3?", "best": "planning, programming_solver",
             "explanation": "Arithmetic is exact in code.", "first_turn": "```python\nprint(2+3)\n```"}]
    external = build_sft(kept, format="external")[0]
    assert decode_action_line(external["output"]).trajectory == Trajectory("planning", "programming_solver")
    assert external["output"].endswith("Required Action: planning, programming_solver\n")
    assert "What is 2+3?" in external["instruction"] and BEGIN_SOLVING not in external["instruction"]
    internal = build_sft(kept, format="internal", upsample=3)
    assert [r["id"] for r in internal] == ["q1#0", "q1#1", "q1#2"]
    assert internal[0]["output"].endswith(f"{BEGIN_SOLVING}\n```python\nprint(2+3)\n```")
    assert build_sft([{**kept[0], "first_turn": None}], format="internal") == []


@pytest.mark.slow
def test_train_planner_pipeline_search_explain_sft_train_and_resume(tokenizer, tmp_path):
    from guidedecode.backends import HFBackend
    from guidedecode.dots.search import SearchConfig
    from guidedecode.models import load_model
    from guidedecode.testing import tiny_model
    from guidedecode.training.dots import DotsPlannerConfig, run_dots_pipeline

    model = tiny_model("llama", seed=1, vocab_size=len(tokenizer))
    solver = HFBackend(model, tokenizer, logits_processor=[ForcedReplies(tokenizer, _tagging_reply)])
    explainer = HFBackend(model, tokenizer, logits_processor=[ForcedReplies(tokenizer, lambda p: "Words suffice.")])
    rates = {"CoT": 1.0, "programming_solver": 0.5}
    config = DotsPlannerConfig(questions=3, solver="tiny", explainer="explainer", epochs=2, batch_size=2,
                               save_every=1, dev_fraction=0.34,
                               search=SearchConfig(rounds=1, samples=2, keep=(), temperature=0.7, max_new_tokens=24))
    kwargs = dict(models={"tiny": (model, tokenizer)}, backends={"tiny": solver, "explainer": explainer},
                  check=scripted_checker(rates, 2))
    metrics = run_dots_pipeline(config, tmp_path, **kwargs)
    assert metrics["search"]["kept"] == 3 and metrics["search"]["best_counts"] == {"CoT": 3}
    assert metrics["search"]["runs"] == 3 * 2 * 12
    assert metrics["sft"]["records"] == 3 and metrics["sft"]["trajectories"] == {"CoT": 3}
    sft = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    assert all("Words suffice." in r["output"] for r in sft)
    train = metrics["train"]
    assert train["train_examples"] == 2 and train["dev_examples"] == 1 and train["lora"]
    assert len(train["fit"]["history"]) == 2
    # a rerun resumes everything: nothing is searched or trained again
    again = run_dots_pipeline(config, tmp_path, **kwargs)
    assert again["train"]["resumed_finished"] and again["search"] == metrics["search"]
    # the trained planner loads as a plain HF model and plans under the constraint
    planner = HFBackend(*load_model(tmp_path / "planner"))
    result = DOTS(mode="external", planner=planner, plan_max_new_tokens=16, max_new_tokens=4).run(
        HFBackend(model, tokenizer), [QUESTION])[0]
    assert result.trace[0]["trajectory"] in ACTION_LINES
    # other settings in the same directory are refused
    from guidedecode.errors import TrainingError

    with pytest.raises(TrainingError, match="other settings"):
        run_dots_pipeline(DotsPlannerConfig(**{**config.__dict__, "questions": 2}), tmp_path, **kwargs)


# ----------------------------------------------------------------------------------------------- CLI


def test_cli_train_planner_dispatches_method_dots():
    from click.testing import CliRunner

    from guidedecode.cli.main import app as cli

    runner = CliRunner()
    dots_help = runner.invoke(cli, ["train", "planner", "--method", "dots", "--help"])
    assert dots_help.exit_code == 0 and "Algorithm 1" in dots_help.output and "--preset" in dots_help.output
    tokens_help = runner.invoke(cli, ["train", "planner", "--help"])
    assert tokens_help.exit_code == 0 and "--scheme" in tokens_help.output and "--method" in tokens_help.output
    bad = runner.invoke(cli, ["train", "planner", "--method=dots", "--keep", "eight", "--out", "x"])
    assert bad.exit_code != 0 and "--keep 'eight'" in (bad.output + str(bad.exception))


def test_missing_action_line_can_be_completed_under_the_guide(backend):
    """on_missing_plan='complete': the trigger is appended and the planner writes the line constrained."""
    planner = scripted_backend(backend, lambda p: "" if p.endswith("Required Action:") else "Not sure.",
                               release=True)
    solver = scripted_backend(backend, lambda prompt: "The answer is 5.")
    results = DOTS(mode="external", planner=planner, on_missing_plan="complete", plan_max_new_tokens=6,
                   temperature=1.5, seed=2).run(solver, [QUESTION, "What is 1 + 1?"])
    for result in results:
        plan = result.trace[1]
        assert plan["event"] == "plan" and plan["completed"] and plan["text"].startswith("Not sure.")
        assert result.trace[0]["source"] == "external" and plan["action_line"] in ACTION_LINES
        assert all(e["event"] != "fallback" for e in result.trace[1:])
    with pytest.raises(StrategyError, match="needs constrain=True"):
        DOTS(mode="external", on_missing_plan="complete", constrain=False)


def test_registry_passes_on_missing_plan(tokenizer):
    from guidedecode.registry import build_strategy

    assert build_strategy("dots", tokenizer, {"mode": "external", "on_missing_plan": "complete"}).on_missing_plan == "complete"
    with pytest.raises(StrategyError, match="on_missing_plan"):
        build_strategy("dots", tokenizer, {"on_missing_plan": "guess"})


def test_bad_dots_and_search_numbers_are_named():
    from guidedecode.dots.search import SearchConfig

    for options, message in (({"code_timeout": float("nan")}, "code_timeout.*finite"),
                             ({"code_timeout": float("inf")}, "code_timeout.*finite"),
                             ({"temperature": "0"}, "temperature must be a number"),
                             ({"top_p": 5}, r"top_p must be in \(0, 1\]"),
                             ({"top_p": float("nan")}, r"top_p must be in \(0, 1\]"),
                             ({"code_memory_mb": -1}, "code_memory_mb must be >= 1"),
                             ({"plan_max_new_tokens": 0}, "plan_max_new_tokens must be >= 1"),
                             ({"max_verify_rounds": 1.5}, "max_verify_rounds must be an integer")):
        with pytest.raises(StrategyError, match=message):
            DOTS("PoT", **options)
    with pytest.raises(StrategyError, match="planner must be a backend.*got str"):
        DOTS(mode="external", planner="/some/dir")
    for options, message in (({"keep": 8}, "keep must be a tuple of counts"),
                             ({"keep": (8, 2.5)}, "keep="),
                             ({"rounds": "2"}, "rounds must be an integer"),
                             ({"temperature": float("nan")}, "temperature.*finite"),
                             ({"code_timeout": float("nan")}, "code_timeout.*finite"),
                             ({"max_new_tokens": 0}, "max_new_tokens must be >= 1")):
        with pytest.raises(StrategyError, match=message):
            SearchConfig(**options).validate()


@pytest.mark.parametrize("bad", [7, "no", 0.5])
def test_dots_constrain_must_be_a_boolean(bad):
    from guidedecode.dots import DOTS

    with pytest.raises(StrategyError, match="constrain"):
        DOTS(trajectory="CoT", constrain=bad)
