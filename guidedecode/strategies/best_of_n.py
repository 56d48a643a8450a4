"""Best-of-N: sample N complete answers, return the one a scorer ranks highest.

    y* = argmax_{y_i ~ pi(.|x), i = 1..N} score(x, y_i)      (ties: the earliest sample)
"""

from __future__ import annotations

from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy, StrategyResult, check_golds
from guidedecode.strategies.scorers import MeanLogProbScorer


class BestOfN(StepStrategy):
    """Sample ``n`` answers per prompt and keep the best by ``scorer`` (default: mean log-prob)."""

    def __init__(self, n: int = 8, *, scorer=None, temperature: float = 0.7, top_p: float = 1.0,
                 stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        if n < 1:
            raise StrategyError(f"BestOfN needs n >= 1, got {n}")
        self.n, self.temperature, self.top_p, self.stop, self.seed = n, temperature, top_p, stop, seed
        self.scorer = scorer or MeanLogProbScorer()

    def run(self, backend, prompts, *, golds=None):
        golds = check_golds(prompts, golds)
        samples = backend.sample(prompts, self.n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_p=self.top_p, stop=self.stop, seed=self.seed)
        results = []
        for prompt, candidates, gold in zip(prompts, samples, golds):
            scores = [float(s) for s in self.scorer(backend, prompt, candidates, gold)]
            best = max(range(len(candidates)), key=lambda i: (scores[i], -i))
            results.append(StrategyResult(
                completion=candidates[best], candidates=candidates, scores=scores,
                trace=[{"chosen": best, "scores": scores}],
                generated_tokens=sum(c.num_tokens for c in candidates), attempts=len(candidates),
            ))
        return results
