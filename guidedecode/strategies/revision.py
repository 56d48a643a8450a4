"""Revision: sequential greedy attempts with the whole conversation in context (FTTT baseline).

Attempt 1 answers the question. After attempt t fails (oracle) the assistant's attempt and a user
turn ``feedback`` (default "Your answer is incorrect. Please try again.") are appended to the chat
history, and attempt t+1 is generated from the whole history:

    prompt_t = chat([q, a_1, f, a_2, f, ..., a_{t-1}, f])      (t-1 attempts, t-1 feedback turns)

so the context grows linearly with the attempts (FTTT, arXiv 2502.15771, section on baselines; the
reference runs greedy with a full cache). With an oracle the loop stops at the first correct attempt;
without one it runs all ``k`` attempts and the last one is the answer.

Prompts are chat messages (a list of ``{"role", "content"}`` dicts ending with a user turn) or the
question text (one user message); they are rendered with the backend's chat template, so a tokenizer
without one is a StrategyError.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy
from guidedecode.strategies.budget import AttemptLog, check_budget, oracle_golds

TRY_AGAIN = "Your answer is incorrect. Please try again."

_SENTINEL = "@@guidedecode-question@@"


class Revision(StepStrategy):
    """Up to ``k`` attempts per problem; each failed one is followed by ``feedback`` in the history.

    ``check(text, gold) -> bool``: the oracle (with golds): stop at the first correct attempt.
    ``temperature``: 0 (default, as specified) decodes greedily; > 0 samples with ``top_p``, ``seed``.
    """

    takes_messages = True  # run() wants chat messages or question text, not rendered prompts

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``k``."""
        return self.k

    def __init__(self, k: int = 32, *, check: Callable[[str, str], bool] | None = None, feedback: str = TRY_AGAIN,
                 temperature: float = 0.0, top_p: float = 1.0, stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        self.k = check_budget(k, "k", "Revision")
        if not isinstance(feedback, str) or not feedback.strip():
            raise StrategyError("Revision needs a non-empty feedback text")
        if temperature < 0:
            raise StrategyError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.check, self.feedback = check, feedback
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "Revision")
        histories = [as_messages(backend, prompt, "Revision") for prompt in prompts]
        logs = [AttemptLog(self.k, check=self.check, gold=gold) for gold in golds]
        for attempt in range(1, self.k + 1):
            active = [i for i, log in enumerate(logs) if not log.done]
            if not active:
                break
            rendered = [backend.chat_prompt(histories[i]) for i in active]
            completions = generate(self, backend, rendered, attempt)
            for i, completion in zip(active, completions):
                context_turns = len(histories[i])
                histories[i].append({"role": "assistant", "content": completion.text})
                logs[i].add(completion, context_turns=context_turns)
                if not logs[i].done:
                    histories[i].append({"role": "user", "content": self.feedback})
        return [log.result(log.attempts[-1], generated_tokens=sum(c.num_tokens for c in log.attempts))
                for log in logs]


def generate(strategy, backend, rendered: Sequence[str], call: int):
    """One completion per rendered prompt: greedy at temperature 0, else sampled with a per-call seed."""
    if strategy.temperature == 0:
        return backend.greedy(rendered, max_new_tokens=strategy.max_new_tokens, stop=strategy.stop)
    seed = None if strategy.seed is None else strategy.seed * 1_000_003 + call
    rows = backend.sample(rendered, 1, max_new_tokens=strategy.max_new_tokens, temperature=strategy.temperature,
                          top_p=strategy.top_p, stop=strategy.stop, seed=seed)
    return [row[0] for row in rows]


def as_messages(backend, prompt, who: str) -> list[dict]:
    """A prompt as a fresh list of chat messages ending with a user turn (see the module docstring)."""
    if isinstance(prompt, str):
        if not prompt.strip():
            raise StrategyError(f"{who} got an empty question")
        if _looks_rendered(backend, prompt):
            raise StrategyError(
                f"{who} got a prompt already rendered with the chat template: it appends chat turns, so pass the "
                "chat messages (a list of {'role', 'content'} dicts) or the plain question instead"
            )
        return [{"role": "user", "content": prompt}]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(m, dict) for m in prompt):
        for message in prompt:
            if "role" not in message or "content" not in message:
                raise StrategyError(f"{who}: every chat message needs 'role' and 'content', got keys {sorted(message)}")
        if prompt[-1]["role"] != "user":
            raise StrategyError(f"{who}: the chat messages must end with a user turn, got '{prompt[-1]['role']}'")
        backend.chat_prompt([{"role": "user", "content": _SENTINEL}])  # no chat template -> StrategyError
        return [dict(message) for message in prompt]
    if isinstance(prompt, Sequence) and prompt and all(isinstance(t, int) for t in prompt):
        got = "token ids"
    else:
        got = "an empty list" if isinstance(prompt, Sequence) and not prompt else type(prompt).__name__
    raise StrategyError(
        f"{who} needs chat messages (a list of {{'role', 'content'}} dicts) or the question text, got {got}: "
        "it appends chat turns to the history"
    )


def _looks_rendered(backend, prompt: str) -> bool:
    """Whether ``prompt`` ends like the chat template's rendering of a user turn (raises without a template)."""
    rendered = backend.chat_prompt([{"role": "user", "content": _SENTINEL}])
    suffix = rendered[rendered.index(_SENTINEL) + len(_SENTINEL):] if _SENTINEL in rendered else ""
    return bool(suffix.strip()) and prompt.endswith(suffix)
