"""Best-of-N: sample N complete answers, return the one a scorer ranks highest.

    argmax:         y* = argmax_{y_i ~ pi(.|x), i = 1..N} score(x, y_i)      (ties: the earliest sample)
    weighted_vote:  a* = argmax_a sum_{i: ans(y_i) = a} score(x, y_i)         (Value-Guided Search)
                    y* = the highest-scoring sample of class a*

``weighted_vote`` groups answers into equivalence classes as self-consistency does (extracted
answers, math-verify equivalence; samples without an answer do not vote) and needs non-negative
scores, e.g. P(correct) from :class:`~guidedecode.strategies.scorers.ValueModelScorer`.

With an oracle (``check=`` and gold answers) the FTTT protocol (arXiv 2502.15771) applies instead:
the samples are attempts 1..N in order, the first one the checker accepts is chosen and the run
counts as stopped there (``attempts`` = its index; attempt records in ``trace``, see
:mod:`guidedecode.strategies.budget`). The N samples are drawn in one batch: they are i.i.d., so
stopping after drawing is the same experiment as stopping while drawing; ``generated_tokens`` counts
every token actually generated.
"""

from __future__ import annotations

from collections.abc import Callable

from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.budget import AttemptLog, check_budget, check_candidates, oracle_golds
from guidedecode.strategies.scorers import MeanLogProbScorer
from guidedecode.strategies.self_consistency import math_equivalent_many, math_extract, vote

SELECTIONS = ("argmax", "weighted_vote")


class BestOfN(StepStrategy):
    """Sample ``n`` answers per prompt and keep the best by ``scorer`` (default: mean log-prob).

    ``selection``: ``"argmax"`` (the top-scoring sample) or ``"weighted_vote"`` (the answer class with
    the largest score sum; ``extract`` / ``equivalence`` as in :class:`SelfConsistency`).
    ``check(text, gold) -> bool``: an oracle; with it (and golds) the first accepted sample is chosen
    and the attempt count stops there; unsolved problems fall back to the selection's choice.
    """

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``n``."""
        return self.n

    def __init__(self, n: int = 8, *, scorer=None, selection: str = "argmax",
                 extract: Callable[[str], str | None] | None = None, equivalence: str = "math_verify",
                 check=None, temperature: float = 0.7, top_p: float = 1.0, stop=None, seed: int | None = None,
                 **options):
        super().__init__(**options)
        if selection not in SELECTIONS:
            raise StrategyError(f"unknown selection {selection!r}: choose one of {', '.join(SELECTIONS)}")
        if equivalence not in ("exact", "math_verify"):
            raise StrategyError(f"equivalence must be 'exact' or 'math_verify', got {equivalence!r}")
        self.n = check_budget(n, "n", "BestOfN")
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed
        self.scorer = scorer or MeanLogProbScorer()
        self.selection = selection
        self.extract = extract or math_extract
        self.equivalent_many = None if equivalence == "exact" else math_equivalent_many
        self.check = check

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "BestOfN")
        samples = backend.sample(prompts, self.n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_p=self.top_p, stop=self.stop, seed=self.seed)
        return [self.select(backend, prompt, candidates, gold)
                for prompt, candidates, gold in zip(prompts, samples, golds)]

    def select(self, backend, prompt, candidates, gold=None) -> StrategyResult:
        """Choose among ``candidates`` (already sampled) for one prompt."""
        check_candidates(candidates, "BestOfN")
        scores = [float(s) for s in self.scorer(backend, prompt, candidates, gold)]
        if len(scores) != len(candidates):
            raise StrategyError(f"the scorer returned {len(scores)} scores for {len(candidates)} candidates")
        head = {"scores": scores}
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        if self.selection == "weighted_vote":
            best = self._weighted_vote(candidates, scores, head, fallback=best)
        head["chosen"] = best
        generated = sum(c.num_tokens for c in candidates)
        if self.check is None:
            return StrategyResult(
                completion=candidates[best], candidates=candidates, scores=scores,
                trace=[head], generated_tokens=generated, attempts=len(candidates),
            )
        log = AttemptLog(len(candidates), check=self.check, gold=gold)
        for index, candidate in enumerate(candidates):
            log.add(candidate, score=scores[index])
            if log.done:
                break
        if log.solved_at is not None:
            best = log.solved_at - 1
        head["chosen"] = best
        return log.result(candidates[best], generated_tokens=generated, candidates=candidates, scores=scores,
                          head=[head])

    def _weighted_vote(self, candidates, scores, head: dict, *, fallback: int) -> int:
        """The top-scoring member of the answer class with the largest score sum (ties: the class voted
        first by self-consistency's order); ``fallback`` when no sample has an answer."""
        negative = [i for i, score in enumerate(scores) if score < 0]
        if negative:
            raise StrategyError(
                f"weighted_vote sums scores per answer, so they must be >= 0 (probabilities); sample "
                f"{negative[0]} scored {scores[negative[0]]:.4g}: use a scorer such as ValueModelScorer"
            )
        answers = [self.extract(c.text) for c in candidates]
        groups = vote(answers, self.equivalent_many)
        totals = [sum(scores[i] for i in members) for members in groups]
        head.update(answers=answers, classes=groups, class_scores=totals)
        if not groups:
            return fallback
        winner = groups[max(range(len(groups)), key=lambda g: (totals[g], -g))]
        return max(winner, key=lambda i: (scores[i], -i))
