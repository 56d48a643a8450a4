"""``DOTS``: plan a reasoning-action trajectory per question, then execute it (arXiv 2410.03864).

Three ways to get the trajectory p (:mod:`guidedecode.dots.actions`):

* **fixed**: ``DOTS(trajectory="PoT")`` runs one trajectory for every question (the CoT / PoT
  baselines, and the trajectory search's runs);
* **external**: a planner model writes ``(E, p) = LLM_p(Q)`` from :func:`~guidedecode.dots.planner.planner_prompt`
  (with the constraint, the guide ends the reply right after the action line; unconstrained replies
  are cut there), then the solver executes ``(R, y) = LLM_s(Q, p)``;
* **internal**: the solver plans for itself, ``(E, p, R, y) = LLM_s(Q)``, in one reply that continues
  into the solution; the harness then supplies the follow-up turns.

With ``constrain=True`` the planner's ``Required Action:`` line is decoded under
:class:`~guidedecode.dots.action_line.ActionLineGuide`, so it always names one of the 12 trajectories.
A reply without an action line falls back to ``fallback`` (default: CoT alone) and the trace records
``{"event": "fallback", ...}``; ``on_missing_plan="error"`` raises instead, and ``"complete"`` (external
mode) appends ``Required Action:`` to the reply and has the planner write the line under the guide
(the plan event says ``"completed": true``).

Executing p (reference ``think_reply``, with the paper's verification loop):

1. one user turn, the compiled prompt (``ActionLibrary.compile``: the query in braces and the
   numbered analysis / solution / direct-answer steps); the reply is the solver's first turn;
2. PoT: the first ```python block of the reply (text after its closing fence is dropped, as if
   generation had stopped there) runs in :func:`guidedecode.tasks.sandbox.run_program` -- a child
   process with wall-clock, CPU, memory, file-size and process limits, never in-process. On
   success the next user turn is ``"After execution, we get:\\n<stdout>\\n<next instruction>"``. A
   program that times out, errors, exits early, floods its output or is missing gets
   ``code_retries`` requests for a corrected program; after that the run **fails**: its answer is
   empty (so every checker scores it wrong) and the trace says why;
3. verification: a verifier turn; its last line's verdict "incorrect" brings the re-answer prompt
   and, while fewer than ``max_verify_rounds`` rounds ran, another verifier turn; "correct" (or an
   unclear verdict, as in the reference) brings the direct-answer prompt. ``max_verify_rounds=1`` is
   the reference's dialogue shape; the paper iterates (default 3);
4. the last assistant message is the prediction.

All questions advance in lockstep: each phase is one batched backend call. A separate planner's
cost counters (tokens, forward passes) are added to the solver backend's, so the cost per problem
covers both models. Every result carries a
trace: a head ``{"trajectory", "source", "dialogue", "first_turn", "tokens"}`` (tokens per action) followed by
the events (plan, fallback, code runs with status/stdout/detail, verdicts).
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from dataclasses import dataclass, field

from guidedecode import validation
from guidedecode.backends.base import Completion
from guidedecode.dots.actions import ACTION_LINE_TRIGGER, ActionLibrary, Trajectory
from guidedecode.dots.actions import decode_action_line, parse_trajectory, verify
from guidedecode.dots.planner import planner_prompt
from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.revision import as_messages

__all__ = ["DOTS", "MODES", "first_python_block", "run_code"]

MODES = ("fixed", "external", "internal")
_FENCE = re.compile(r"```[ \t]*(?:python|py|python3)[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)
_MAX_SHOWN_OUTPUT = 2000  # characters of program output shown to the solver


def first_python_block(text: str) -> tuple[str, int] | None:
    """``(code, end)`` of the first ```python block (an unclosed fence runs to the end of the text);
    ``end`` is where the block's closing fence ends. None without such a block."""
    match = _FENCE.search(text)
    if match is None or not match.group(1).strip():
        return None
    return match.group(1), match.end()


def run_code(code: str, *, timeout: float = 15.0, memory_mb: int = 1024, max_output_bytes: int = 1 << 16) -> dict:
    """Run ``code`` in :func:`guidedecode.tasks.sandbox.run_program`; a trace event with the outcome.

    ``ok`` is True only for a clean run (exit 0 after the last line: ``status == "pass"``)."""
    from guidedecode.tasks.sandbox import run_program

    result = run_program(code, timeout=timeout, memory_mb=memory_mb, max_output_bytes=max_output_bytes)
    return {
        "event": "code", "code": code, "status": result.status, "ok": result.passed,
        "stdout": result.stdout, "stderr": result.stderr[-1000:], "detail": result.detail,
        "seconds": round(result.duration, 3),
    }


@dataclass
class _Run:
    index: int
    query: str
    prefix: list[dict]  # chat messages before the question (e.g. a system turn)
    trajectory: Trajectory | None
    source: str
    phase: str
    messages: list[dict] = field(default_factory=list)
    events: list[dict] = field(default_factory=list)
    tokens: dict = field(default_factory=dict)
    code_attempts: int = 0
    verify_rounds: int = 0
    final: Completion | None = None


class DOTS(StepStrategy):
    """Plan-then-execute with the DOTS action library (see the module docstring).

    ``trajectory``: a fixed trajectory (any spelling :func:`~guidedecode.dots.actions.parse_trajectory`
    accepts); else ``mode`` is ``"external"`` (``planner``: a backend; default: the solver prompted as a
    planner) or ``"internal"``. ``temperature``: 0 = greedy (the paper's inference), > 0 samples with
    ``top_p`` and per-call seeds from ``seed``. ``code_timeout`` / ``code_memory_mb``: sandbox limits.
    """

    takes_messages = True  # run() wants chat messages or question text, not rendered prompts

    def __init__(self, trajectory=None, *, mode: str | None = None, planner=None, library: ActionLibrary | None = None,
                 max_verify_rounds: int = 3, code_retries: int = 1, code_timeout: float = 15.0,
                 code_memory_mb: int = 1024, constrain: bool = True, fallback="CoT", on_missing_plan: str = "fallback",
                 temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None, plan_max_new_tokens: int = 192,
                 **options):
        super().__init__(**options)
        if trajectory is not None:
            trajectory = parse_trajectory(trajectory)
            mode = mode or "fixed"
            if mode != "fixed":
                raise StrategyError(f"a fixed trajectory runs in mode 'fixed', not {mode!r}")
        mode = mode or "external"
        if mode not in MODES:
            raise StrategyError(f"unknown DOTS mode {mode!r}: choose one of {', '.join(MODES)}")
        if mode == "fixed" and trajectory is None:
            raise StrategyError("mode 'fixed' needs trajectory=...")
        if planner is not None and mode != "external":
            raise StrategyError("a planner model is used only in mode 'external'")
        if planner is not None and not all(callable(getattr(planner, m, None)) for m in ("chat_prompt", "greedy", "sample")):
            raise StrategyError(f"planner must be a backend (e.g. HFBackend(*load_model(directory))), got "
                                f"{type(planner).__name__} {planner!r:.80}")
        max_verify_rounds = validation.positive_int("max_verify_rounds", max_verify_rounds, error=StrategyError)
        code_retries = validation.integer("code_retries", code_retries, minimum=0, error=StrategyError)
        code_timeout = validation.number("code_timeout (seconds)", code_timeout, above=0, error=StrategyError)
        code_memory_mb = validation.positive_int("code_memory_mb", code_memory_mb, error=StrategyError)
        temperature = validation.temperature("temperature", temperature, allow_zero=True, error=StrategyError)
        top_p = validation.probability("top_p", top_p, error=StrategyError)
        seed = validation.optional(validation.integer, "seed", seed, error=StrategyError)
        plan_max_new_tokens = validation.positive_int("plan_max_new_tokens", plan_max_new_tokens, error=StrategyError)
        if constrain not in (True, False) or isinstance(constrain, float):  # True/False or 1/0, not 7 or "no"
            raise StrategyError(f"constrain must be True or False, got {constrain!r}")
        constrain = bool(constrain)
        if on_missing_plan not in ("fallback", "error", "complete"):
            raise StrategyError(f"on_missing_plan must be 'fallback', 'error' or 'complete', got {on_missing_plan!r}")
        if on_missing_plan == "complete" and not constrain:
            raise StrategyError("on_missing_plan='complete' writes the action line under the constraint: "
                                "it needs constrain=True")
        self.trajectory, self.mode, self.planner = trajectory, mode, planner
        self.library = library or ActionLibrary()
        self.max_verify_rounds, self.code_retries = max_verify_rounds, code_retries
        self.code_timeout, self.code_memory_mb = code_timeout, code_memory_mb
        self.constrain, self.fallback, self.on_missing_plan = constrain, parse_trajectory(fallback), on_missing_plan
        self.temperature, self.top_p, self.seed = temperature, top_p, seed
        self.plan_max_new_tokens = plan_max_new_tokens
        self._calls = 0

    # ------------------------------------------------------------------ driver
    def run(self, backend, prompts, *, golds=None):
        runs = [self._start(i, as_messages(backend, prompt, "DOTS")) for i, prompt in enumerate(prompts)]
        return self._drive(backend, runs)

    def run_trajectories(self, backend, prompts, trajectories) -> list[StrategyResult]:
        """Execute ``trajectories[i]`` on ``prompts[i]`` (fixed trajectories, one batch; the search's runs)."""
        if len(prompts) != len(trajectories):
            raise StrategyError(f"got {len(trajectories)} trajectories for {len(prompts)} prompts")
        runs = []
        for i, (prompt, trajectory) in enumerate(zip(prompts, trajectories)):
            messages = as_messages(backend, prompt, "DOTS")
            trajectory = parse_trajectory(trajectory)
            run = _Run(i, messages[-1]["content"], messages[:-1], trajectory, "fixed", "solve")
            run.messages = [{"role": "user", "content": self.library.compile(run.query, trajectory)}]
            runs.append(run)
        return self._drive(backend, runs)

    def _drive(self, backend, runs: list[_Run]) -> list[StrategyResult]:
        self._calls = 0
        while True:
            pending = [r for r in runs if r.phase != "done"]
            if not pending:
                break
            for phase in ("plan", "internal"):
                group = [r for r in pending if r.phase == phase]
                if group:
                    self._generate_plans(backend, group, phase)
            group = [r for r in pending if r.phase not in ("plan", "internal", "done")]
            if group:
                replies = self._generate(backend, [backend.chat_prompt(r.prefix + r.messages) for r in group])
                for run, reply in zip(group, replies):
                    self._advance(run, reply)
        return [self._result(r) for r in runs]

    def _start(self, index: int, messages: list[dict]) -> _Run:
        query, prefix = messages[-1]["content"], messages[:-1]
        if self.mode == "fixed":
            run = _Run(index, query, prefix, self.trajectory, "fixed", "solve")
            run.messages = [{"role": "user", "content": self.library.compile(query, self.trajectory)}]
            return run
        phase = "plan" if self.mode == "external" else "internal"
        return _Run(index, query, prefix, None, self.mode, phase)

    def _generate(self, backend, rendered: list[str], *, max_new_tokens: int | None = None, stop=None):
        self._calls += 1
        limit = max_new_tokens or self.max_new_tokens
        if self.temperature == 0:
            return backend.greedy(rendered, max_new_tokens=limit, stop=stop)
        seed = None if self.seed is None else self.seed * 1_000_003 + self._calls
        rows = backend.sample(rendered, 1, max_new_tokens=limit, temperature=self.temperature, top_p=self.top_p,
                              stop=stop, seed=seed)
        return [row[0] for row in rows]

    def _generate_plans(self, solver, group: list[_Run], phase: str) -> None:
        internal = phase == "internal"
        backend = solver if internal or self.planner is None else self.planner
        prompts = [backend.chat_prompt(r.prefix + [{"role": "user", "content": planner_prompt(r.query, internal=internal)}])
                   for r in group]
        guide = _action_guide(backend, stop_after_line=not internal) if self.constrain else None
        before = backend.stats.counters() if backend is not solver and hasattr(backend, "stats") else None
        with _attached(backend, guide):
            replies = self._generate(backend, prompts, max_new_tokens=None if internal else self.plan_max_new_tokens)
        if before is not None and hasattr(solver, "stats"):  # the planner's spend counts as the strategy's cost
            for name, value in backend.stats.since(before).items():
                setattr(solver.stats, name, getattr(solver.stats, name) + value)
        if not internal and self.on_missing_plan == "complete":
            replies = self._complete_action_lines(backend, prompts, replies)
        for run, reply in zip(group, replies):
            if not internal:
                reply = _cut_after_action_line(reply)
            self._take_plan(run, reply, internal)

    def _complete_action_lines(self, backend, prompts, replies):
        """Replies without an action line get ``"\nRequired Action:"`` appended and the line written under
        the guide (one more batched call), so every external plan names one of the 12 trajectories."""
        missing = [i for i, reply in enumerate(replies) if decode_action_line(reply.text).trajectory is None]
        if not missing:
            return replies
        heads = [replies[i].text.rstrip("\n") + "\n" + ACTION_LINE_TRIGGER for i in missing]
        with _attached(backend, _action_guide(backend, stop_after_line=True)):
            lines = self._generate(backend, [prompts[i] + head for i, head in zip(missing, heads)],
                                   max_new_tokens=48)
        replies = list(replies)
        for i, head, line in zip(missing, heads, lines):
            replies[i] = Completion(text=head + line.text, token_ids=replies[i].token_ids + line.token_ids,
                                    finish_reason=line.finish_reason,
                                    info={**replies[i].info, "completed_action_line": True})
        return replies

    # --------------------------------------------------------------- state machine
    def _take_plan(self, run: _Run, reply: Completion, internal: bool) -> None:
        decoded = decode_action_line(reply.text)
        run.tokens["plan"] = run.tokens.get("plan", 0) + reply.num_tokens
        run.events.append({"event": "plan", "text": reply.text, "action_line": decoded.line,
                           "ignored": list(decoded.ignored), "constrained": self.constrain,
                           "completed": bool(reply.info.get("completed_action_line"))})
        if decoded.trajectory is None:
            reason = ("the planner reply has no 'Required Action:' line" if decoded.line is None
                      else f"the action line {decoded.line!r} names no action")
            if self.on_missing_plan == "error":
                raise StrategyError(f"DOTS question {run.index}: {reason}")
            run.events.append({"event": "fallback", "reason": reason, "trajectory": self.fallback.action_line})
            run.trajectory, run.source = self.fallback, "fallback"
        else:
            run.trajectory = decoded.trajectory
        if not internal:
            run.messages = [{"role": "user", "content": self.library.compile(run.query, run.trajectory)}]
            run.phase = "solve"
            return
        run.messages = [{"role": "user", "content": planner_prompt(run.query, internal=True)}]
        self._after_solution(run, reply, count="plan")

    def _advance(self, run: _Run, reply: Completion) -> None:
        phase = run.phase
        if phase == "solve":
            self._after_solution(run, reply, count="solve")
        elif phase == "code_retry":
            self._after_solution(run, reply, count="code_retry")
        elif phase == "verify":
            self._count(run, "verifier", reply)
            run.messages.append({"role": "assistant", "content": reply.text})
            run.verify_rounds += 1
            verdict = verify.verdict(reply.text)
            run.events.append({"event": "verify", "round": run.verify_rounds, "verdict": verdict})
            if verdict == "incorrect":
                run.messages.append({"role": "user", "content": self.library.reanswer})
                run.phase = "reanswer"
            else:
                run.messages.append({"role": "user", "content": self.library.direct_answer})
                run.phase = "answer"
        elif phase == "reanswer":
            self._count(run, "reanswer", reply)
            run.messages.append({"role": "assistant", "content": reply.text})
            if run.verify_rounds < self.max_verify_rounds:
                run.messages.append({"role": "user", "content": self.library.instruction(verify.CODE_ID)})
                run.phase = "verify"
            else:
                self._finish(run, reply)
        elif phase == "answer":
            self._count(run, "direct_answering", reply)
            run.messages.append({"role": "assistant", "content": reply.text})
            self._finish(run, reply)
        else:  # pragma: no cover - the driver only sends the phases above
            raise StrategyError(f"DOTS: unexpected phase {phase!r}")

    def _after_solution(self, run: _Run, reply: Completion, *, count: str) -> None:
        """The solver's first turn (or a corrected program) arrived: run code, verify, or finish."""
        if count != "plan":
            self._count(run, count, reply)
        text = reply.text
        if run.trajectory.uses_code:
            found = first_python_block(text)
            if found is not None:
                text = text[: found[1]]  # as if generation had stopped at the closing fence
            run.messages.append({"role": "assistant", "content": text})
            self._run_code(run, found[0] if found else None)
            return
        run.messages.append({"role": "assistant", "content": text})
        if run.trajectory.verifies:
            run.messages.append({"role": "user", "content": self.library.instruction(verify.CODE_ID)})
            run.phase = "verify"
        else:
            self._finish(run, reply)

    def _run_code(self, run: _Run, code: str | None) -> None:
        run.code_attempts += 1
        if code is None:
            event = {"event": "code", "code": None, "status": "missing", "ok": False,
                     "detail": "no ```python block in the reply"}
        else:
            event = run_code(code, timeout=self.code_timeout, memory_mb=self.code_memory_mb)
        event["attempt"] = run.code_attempts
        run.events.append(event)
        if event["ok"]:
            following = (self.library.instruction(verify.CODE_ID) if run.trajectory.verifies
                         else self.library.direct_answer)
            output = event["stdout"].strip() or "(the program printed nothing)"
            if len(output) > _MAX_SHOWN_OUTPUT:
                output = output[:_MAX_SHOWN_OUTPUT] + " ...(truncated)"
            run.messages.append({"role": "user", "content": self.library.after_execution.format(output=output,
                                                                                                 next=following)})
            run.phase = "verify" if run.trajectory.verifies else "answer"
        elif run.code_attempts <= self.code_retries:
            run.messages.append({"role": "user", "content": self.library.code_failed.format(detail=event["detail"])})
            run.phase = "code_retry"
        else:
            run.events.append({"event": "failed", "reason": f"the program failed ({event['status']}: "
                                                            f"{event['detail']}) after {run.code_attempts} attempt(s)"})
            self._finish(run, Completion(text="", token_ids=[], finish_reason="code_failed"))

    def _count(self, run: _Run, action: str, reply: Completion) -> None:
        run.tokens[action] = run.tokens.get(action, 0) + reply.num_tokens

    def _finish(self, run: _Run, completion: Completion) -> None:
        run.final, run.phase = completion, "done"

    def _result(self, run: _Run) -> StrategyResult:
        head = {"trajectory": run.trajectory.action_line, "source": run.source, "mode": self.mode,
                "dialogue": run.prefix + run.messages, "tokens": dict(run.tokens),
                "first_turn": next((m["content"] for m in run.messages if m["role"] == "assistant"), None),
                "code_attempts": run.code_attempts, "verify_rounds": run.verify_rounds}
        return StrategyResult(completion=run.final, trace=[head, *run.events],
                              generated_tokens=sum(run.tokens.values()), attempts=1)


def _action_guide(backend, *, stop_after_line: bool):
    from guidedecode.dots.action_line import ActionLineGuide

    return ActionLineGuide(backend.tokenizer, stop_after_line=stop_after_line)


def _cut_after_action_line(reply: Completion) -> Completion:
    """An external planner's reply ends with its first action line (unconstrained replies may go on)."""
    at = reply.text.find(ACTION_LINE_TRIGGER)
    end = reply.text.find("\n", at) if at >= 0 else -1
    if end < 0 or end + 1 == len(reply.text):
        return reply
    return Completion(text=reply.text[: end + 1], token_ids=reply.token_ids, finish_reason=reply.finish_reason,
                      info={**reply.info, "cut_after_action_line": True})


@contextmanager
def _attached(backend, guide):
    """Add ``guide`` to the backend's logits processors for the duration of the block."""
    if guide is None:
        yield
        return
    processors = getattr(backend, "logits_processor", None)
    if processors is None:
        raise StrategyError(f"{type(backend).__name__} takes no logits processors: use constrain=False")
    processors.append(guide)
    try:
        yield
    finally:
        processors.remove(guide)
