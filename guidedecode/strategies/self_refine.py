"""Self-Refine (Madaan et al., arXiv 2303.17651) as the FTTT baseline: critique the last attempt only.

One initial answer a_0 is generated and **not judged** (it counts as an extra generation in
``generated_tokens`` and in the trace head, not as an attempt). Then for rounds t = 1..k:

    prompt_t = chat([q, a_{t-1}, critique])        (only the last attempt: history is not accumulated)
    a_t      = the model's response (its critique and a new solution), judged by the oracle

The critique is the Self-Refine GSM feedback prompt as used by the FTTT reference ("There is an error
in the solution above because of lack of understanding of the question. What is the error? ...").
With an oracle the loop stops at the first correct response; without one it runs all ``k`` rounds
and the last response is the answer. Sampling defaults to the best-of-N settings of the FTTT scripts
(T = 0.6, top-p 0.95); temperature 0 decodes greedily.

Prompts are chat messages or the question text, as for :class:`guidedecode.strategies.revision.Revision`.
"""

from __future__ import annotations

from collections.abc import Callable

from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy
from guidedecode.strategies.budget import AttemptLog, check_budget, oracle_golds
from guidedecode.strategies.revision import as_messages, generate

CRITIQUE = (
    "There is an error in the solution above because of lack of understanding of the question. What is the error? "
    "To find the error, go through semantically complete blocks of the solution, and check if everything looks good."
)


class SelfRefine(StepStrategy):
    """An unjudged initial answer, then up to ``k`` critique-and-rewrite rounds on the last answer only."""

    takes_messages = True  # run() wants chat messages or question text, not rendered prompts

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``k``."""
        return self.k

    def __init__(self, k: int = 32, *, check: Callable[[str, str], bool] | None = None, critique: str = CRITIQUE,
                 temperature: float = 0.6, top_p: float = 0.95, stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        self.k = check_budget(k, "k", "SelfRefine")
        if not isinstance(critique, str) or not critique.strip():
            raise StrategyError("SelfRefine needs a non-empty critique text")
        if temperature < 0:
            raise StrategyError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.check, self.critique = check, critique
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "SelfRefine")
        questions = [as_messages(backend, prompt, "SelfRefine") for prompt in prompts]
        logs = [AttemptLog(self.k, check=self.check, gold=gold) for gold in golds]
        last = generate(self, backend, [backend.chat_prompt(q) for q in questions], 0)
        initial = list(last)
        for round_ in range(1, self.k + 1):
            active = [i for i, log in enumerate(logs) if not log.done]
            if not active:
                break
            rendered = [backend.chat_prompt(self.messages(questions[i], last[i].text)) for i in active]
            for i, completion in zip(active, generate(self, backend, rendered, round_)):
                last[i] = completion
                logs[i].add(completion)
        return [
            log.result(log.attempts[-1], generated_tokens=first.num_tokens + sum(c.num_tokens for c in log.attempts),
                       head=[{"initial": True, "tokens": first.num_tokens, "text": first.text}])
            for log, first in zip(logs, initial)
        ]

    def messages(self, question: list[dict], last_attempt: str) -> list[dict]:
        """The round's chat: the question, the last attempt as the assistant's turn, the critique."""
        return question + [{"role": "assistant", "content": last_attempt}, {"role": "user", "content": self.critique}]
