"""Best-of-N: sample N complete answers, return the one a scorer ranks highest.

    y* = argmax_{y_i ~ pi(.|x), i = 1..N} score(x, y_i)      (ties: the earliest sample)

With an oracle (``check=`` and gold answers) the FTTT protocol (arXiv 2502.15771) applies instead:
the samples are attempts 1..N in order, the first one the checker accepts is chosen and the run
counts as stopped there (``attempts`` = its index; attempt records in ``trace``, see
:mod:`guidedecode.strategies.budget`). The N samples are drawn in one batch: they are i.i.d., so
stopping after drawing is the same experiment as stopping while drawing; ``generated_tokens`` counts
every token actually generated.
"""

from __future__ import annotations

from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.budget import AttemptLog, check_budget, check_candidates, oracle_golds
from guidedecode.strategies.scorers import MeanLogProbScorer


class BestOfN(StepStrategy):
    """Sample ``n`` answers per prompt and keep the best by ``scorer`` (default: mean log-prob).

    ``check(text, gold) -> bool``: an oracle; with it (and golds) the first accepted sample is chosen
    and the attempt count stops there; unsolved problems fall back to the scorer's choice.
    """

    def __init__(self, n: int = 8, *, scorer=None, check=None, temperature: float = 0.7, top_p: float = 1.0,
                 stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        self.n = check_budget(n, "n", "BestOfN")
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed
        self.scorer = scorer or MeanLogProbScorer()
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
        best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
        generated = sum(c.num_tokens for c in candidates)
        if self.check is None:
            return StrategyResult(
                completion=candidates[best], candidates=candidates, scores=scores,
                trace=[{"chosen": best, "scores": scores}], generated_tokens=generated, attempts=len(candidates),
            )
        log = AttemptLog(len(candidates), check=self.check, gold=gold)
        for index, candidate in enumerate(candidates):
            log.add(candidate, score=scores[index])
            if log.done:
                break
        if log.solved_at is not None:
            best = log.solved_at - 1
        return log.result(candidates[best], generated_tokens=generated, candidates=candidates, scores=scores,
                          head=[{"chosen": best, "scores": scores}])
