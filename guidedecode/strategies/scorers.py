"""Scorers rank candidate completions for selection strategies (best-of-N, beam search).

A scorer is any callable ``scorer(backend, prompt, completions, gold) -> list[float]``, higher is
better. Two are built in:

* ``OracleScorer(check)``: 1.0 when ``check(completion_text, gold)`` accepts, else 0.0 (needs golds);
  the oracle-verifier protocol of the FTTT paper's baselines.
* ``MeanLogProbScorer()``: the policy's own mean token log-prob (1/|c|) sum_t log p(c_t | x, c_<t).
* ``ValueModelScorer(value_model)``: P(correct | x, c) from a trained value model (the Q♯ classifier
  as a reward model, scoring the final position), in [0, 1].
"""

from __future__ import annotations

from collections.abc import Callable

from guidedecode.errors import StrategyError


class OracleScorer:
    """1.0 for completions the checker accepts against the gold answer, 0.0 otherwise."""

    def __init__(self, check: Callable[[str, str], bool] | None = None):
        self.check = check or math_answer_check

    def __call__(self, backend, prompt, completions, gold):
        if gold is None:
            raise StrategyError("OracleScorer needs gold answers: pass golds= to run() or generate()")
        return [1.0 if self.check(c.text, gold) else 0.0 for c in completions]


class MeanLogProbScorer:
    """Mean per-token log-probability of each completion under the backend's model."""

    def __call__(self, backend, prompt, completions, gold):
        return [s.mean for s in backend.score(prompt, [c.token_ids for c in completions])]


class ValueModelScorer:
    """P(correct) of prompt + completion at its final position under a :class:`~guidedecode.ValueModel`.

    The value model must share the policy's tokenizer (checked on first use); ``batch_size`` rows per
    value-model forward.
    """

    def __init__(self, value_model, *, batch_size: int = 8):
        if batch_size < 1:
            raise StrategyError(f"batch_size must be >= 1, got {batch_size}")
        self.value_model, self.batch_size = value_model, batch_size
        self._checked: set[int] = set()

    def __call__(self, backend, prompt, completions, gold):
        from guidedecode.backends.hf import left_pad

        if id(backend.tokenizer) not in self._checked:
            self.value_model.check_tokenizer(backend.tokenizer)
            self._checked.add(id(backend.tokenizer))
        prompt_ids = backend.encode(prompt)
        rows = [prompt_ids + list(c.token_ids) for c in completions]
        device = next(self.value_model.parameters()).device
        scores: list[float] = []
        for start in range(0, len(rows), self.batch_size):
            ids, mask = left_pad(rows[start:start + self.batch_size], backend.pad_token_id, device)
            scores.extend(self.value_model.value(ids, mask).tolist())
        return scores


def math_answer_check(text: str, gold: str) -> bool:
    """Extract the final answer of a math completion and compare it to the gold with math-verify."""
    from guidedecode.tasks import default_checker, extract_answer

    prediction = extract_answer(text, "math")
    return prediction is not None and default_checker().verify(gold, prediction)
