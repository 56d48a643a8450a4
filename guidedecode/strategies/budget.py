"""One attempt-budget accounting for every test-time-scaling strategy (the FTTT protocol).

An *attempt* is one complete answer (a full completion) that could be judged. A strategy given a
budget of ``k`` makes at most ``k`` attempts per problem. Each attempt leaves one record in the
strategy result's ``trace``::

    {"attempt": j, "tokens": n, "verdict": True | False | None, ...strategy-specific fields}

with ``j`` 1-based. With an *oracle* (a checker ``check(text, gold) -> bool`` and the gold answers)
the oracle-stop protocol of the FTTT paper (arXiv 2502.15771) applies: attempts are judged in order
and the loop stops at the first correct one; its index is the *trial* at which the problem was solved
(``None`` if no attempt within the budget is correct). Without an oracle every verdict is ``None``
and the strategy spends its whole budget.

``guidedecode.metrics.trial_index`` reads the trial back from these records, so solved@k and the
trial histogram are computed the same way for every strategy.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from guidedecode.backends.base import Completion
from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StrategyResult, check_golds

Check = Callable[[str, str], bool]


def check_budget(k, name: str = "budget", who: str = "the strategy") -> int:
    """``k`` as an int >= 1, else a StrategyError naming the parameter."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise StrategyError(f"{who} needs {name} >= 1 (an integer: the most attempts per problem), got {k!r}")
    return k


def check_candidates(candidates: Sequence, who: str) -> None:
    """A strategy cannot choose from nothing: an empty candidate list is a StrategyError."""
    if len(candidates) == 0:
        raise StrategyError(f"{who} got an empty candidate list: it needs at least one completion to choose from")


def oracle_golds(prompts: Sequence, golds: Sequence[str] | None, check: Check | None, who: str) -> list[str | None]:
    """Golds aligned with prompts; an oracle checker without golds is a StrategyError."""
    if check is not None and golds is None:
        raise StrategyError(
            f"{who} has an oracle checker (check=...) but no gold answers: pass golds= to run(), or check=None"
        )
    return check_golds(prompts, golds)


class AttemptLog:
    """The attempts of one problem under a budget of ``budget``, with the oracle-stop rule.

    ``add(completion)`` records (and, with an oracle, judges) the next attempt; ``done`` turns true
    when the budget is spent or, with an oracle, at the first correct attempt. ``add(..., judge=False)``
    records an attempt without judging it (self-consistency judges only its voted answer, later, with
    :meth:`judge`).
    """

    def __init__(self, budget: int, *, check: Check | None = None, gold: str | None = None):
        self.budget = check_budget(budget, "budget", "AttemptLog")
        self.check = check if gold is not None else None
        self.gold = gold
        self.attempts: list[Completion] = []
        self.records: list[dict] = []
        self.solved_at: int | None = None

    @property
    def oracle(self) -> bool:
        return self.check is not None

    @property
    def done(self) -> bool:
        return len(self.attempts) >= self.budget or self.solved_at is not None

    def add(self, completion: Completion, *, judge: bool = True, **info) -> bool | None:
        """Record the next attempt; returns its verdict (None without an oracle or with judge=False)."""
        if self.done:
            raise StrategyError(
                f"attempt {len(self.attempts) + 1} is over the budget of {self.budget} (or the problem is solved)"
            )
        self.attempts.append(completion)
        self.records.append({"attempt": len(self.attempts), "tokens": completion.num_tokens, "verdict": None, **info})
        return self.judge(len(self.attempts)) if judge else None

    def judge(self, attempt: int) -> bool | None:
        """Judge attempt ``attempt`` (1-based) with the oracle; the first correct one is the solving trial."""
        if not 1 <= attempt <= len(self.attempts):
            raise StrategyError(f"no attempt {attempt}: {len(self.attempts)} recorded")
        if not self.oracle:
            return None
        verdict = bool(self.check(self.attempts[attempt - 1].text, self.gold))
        self.records[attempt - 1]["verdict"] = verdict
        if verdict and (self.solved_at is None or attempt < self.solved_at):
            self.solved_at = attempt
        return verdict

    def result(self, completion: Completion, *, generated_tokens: int, candidates: list[Completion] | None = None,
               scores: list[float] | None = None, head: list[dict] | None = None) -> StrategyResult:
        """The StrategyResult: ``attempts`` = attempts used, ``trace`` = ``head`` + one record per attempt."""
        return StrategyResult(
            completion=completion,
            candidates=list(self.attempts) if candidates is None else candidates,
            scores=scores,
            trace=list(head or []) + self.records,
            generated_tokens=generated_tokens,
            attempts=len(self.attempts),
        )
