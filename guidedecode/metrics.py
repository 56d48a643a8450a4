"""Evaluation metrics with the estimators the papers use.

* pass@k, unbiased (Chen et al., 2021): with n samples of which c are correct,
      pass@k = 1 - C(n - c, k) / C(n, k)
* maj@k: the majority-voted answer of the k samples is correct (ties: earliest answer);
* a mean over problems with a 95% interval that stays inside the values' range (:func:`mean_ci`):
  the Wilson score interval when every problem contributes one 0/1 value (a proportion, from
  ``scipy.stats.binomtest``), else a seeded percentile bootstrap over problems (several samples of
  one problem are resampled together; ``scipy.stats.bootstrap``);
* solved@k with oracle stop (FTTT, arXiv 2502.15771): each problem's *trial* t is the 1-based index
  of its first correct attempt (None if unsolved within the budget), and over m problems
      solved@k = (1/m) * #{problems with t <= k},
  reported with the trial histogram h_j = #{problems with t = j}, so solved@k = (1/m) sum_{j<=k} h_j.
  An upper bound (the oracle picks), not deployable accuracy;
* plain accuracy of the final answer, judged once after the strategy finished (no oracle stop).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

from guidedecode.errors import GuidedecodeError


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k for one problem with ``c`` correct out of ``n`` samples (requires k <= n)."""
    if not 0 <= c <= n or not 1 <= k <= n:
        raise ValueError(f"pass@k needs 0 <= c <= n and 1 <= k <= n, got n={n}, c={c}, k={k}")
    if n - c < k:
        return 1.0
    return 1.0 - math.prod(1.0 - k / i for i in range(n - c + 1, n + 1))


def majority_correct(answers: Sequence[str | None], correct: Sequence[bool]) -> bool:
    """maj@k for one problem: is the most frequent non-empty answer correct? (ties: the earliest)."""
    counts: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            counts.setdefault(answer.strip(), []).append(i)
    if not counts:
        return False
    winner = min(counts.values(), key=lambda members: (-len(members), members[0]))
    return bool(correct[winner[0]])


CONFIDENCE = 0.95
BOOTSTRAP_RESAMPLES = 4000


def proportion_ci(successes: int, trials: int) -> dict:
    """``successes / trials`` with its 95% Wilson score interval (inside [0, 1] by construction)."""
    from scipy.stats import binomtest

    if isinstance(successes, bool) or isinstance(trials, bool) or not 0 <= successes <= trials:
        raise GuidedecodeError(f"a proportion needs 0 <= successes <= trials, got {successes} of {trials}")
    if trials == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "interval": "wilson"}
    ci = binomtest(int(successes), int(trials)).proportion_ci(confidence_level=CONFIDENCE, method="wilson")
    return {"mean": successes / trials, "low": float(ci.low), "high": float(ci.high), "n": trials,
            "interval": "wilson"}


def bootstrap_ci(values: Sequence[float], seed: int = 0) -> dict:
    """The mean of per-problem ``values`` with a seeded 95% percentile-bootstrap interval over problems.

    Resampling whole problems keeps the samples of one problem together; the interval's ends are
    means of observed values, so it never leaves their range (e.g. [0, 1] for per-problem pass@1).
    """
    import warnings

    import numpy as np
    from scipy.stats import bootstrap

    data = np.asarray(values, dtype=float)
    m = len(data)
    if m == 0:
        return {"mean": float("nan"), "low": float("nan"), "high": float("nan"), "n": 0, "interval": "bootstrap"}
    mean = float(data.mean())
    if m == 1 or np.all(data == data[0]):
        low = high = mean  # every resample has the same mean
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ci = bootstrap((data,), np.mean, confidence_level=CONFIDENCE, n_resamples=BOOTSTRAP_RESAMPLES,
                           method="percentile", rng=np.random.default_rng(seed)).confidence_interval
        low, high = float(ci.low), float(ci.high)
    return {"mean": mean, "low": low, "high": high, "n": m, "interval": "bootstrap", "seed": seed}


def mean_ci(values: Sequence[float], seed: int = 0) -> dict:
    """Mean over problems with a 95% interval: Wilson when every value is 0 or 1 (one verdict per
    problem), else the seeded bootstrap over problems (:func:`bootstrap_ci`).

    Returns ``{"mean", "low", "high", "n", "interval"}``; ``low <= mean <= high``.
    """
    values = [float(v) for v in values]
    if values and all(v in (0.0, 1.0) for v in values):
        return proportion_ci(int(sum(values)), len(values))
    return bootstrap_ci(values, seed)


def trial_index(item) -> int | None:
    """The trial (1-based attempt index) at which a problem was solved, or None.

    ``item`` is that index (int or None) or a strategy result whose ``trace`` holds the attempt
    records of :mod:`guidedecode.strategies.budget` (``{"attempt": j, "verdict": ...}``): the first
    attempt with verdict True.
    """
    if item is None:
        return None
    if isinstance(item, bool):
        raise GuidedecodeError(f"a trial index must be an int >= 1 or None, got the bool {item}")
    if isinstance(item, int):
        if item < 1:
            raise GuidedecodeError(f"a trial index must be >= 1 (attempts are 1-based) or None, got {item}")
        return item
    trace = getattr(item, "trace", None)
    if trace is None:
        raise GuidedecodeError(f"expected a trial index (int or None) or a strategy result, got {type(item).__name__}")
    solved = [r["attempt"] for r in trace if isinstance(r, dict) and "attempt" in r and r.get("verdict") is True]
    return min(solved) if solved else None


def trial_histogram(items: Sequence, budget: int) -> dict:
    """Histogram of solving trials: ``solved[j-1]`` problems solved at attempt j (j = 1..budget).

    Returns ``{"budget": K, "problems": m, "solved": [h_1, ..., h_K], "unsolved": m - sum(h)}``.
    A trial beyond the budget is an error (the run used more attempts than it was allowed).
    """
    if isinstance(budget, bool) or not isinstance(budget, int) or budget < 1:
        raise GuidedecodeError(f"budget must be an integer >= 1, got {budget!r}")
    counts = [0] * budget
    unsolved = 0
    for item in items:
        trial = trial_index(item)
        if trial is None:
            unsolved += 1
        elif trial > budget:
            raise GuidedecodeError(f"a problem was solved at trial {trial}, beyond the budget of {budget}")
        else:
            counts[trial - 1] += 1
    return {"budget": budget, "problems": len(items), "solved": counts, "unsolved": unsolved}


def solved_at_k(items: Sequence, k: int) -> float:
    """Fraction of problems solved within the first ``k`` attempts (oracle stop); items as in trial_index."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise GuidedecodeError(f"solved@k needs an integer k >= 1, got {k!r}")
    if len(items) == 0:
        raise GuidedecodeError("solved@k of no problems is undefined: got an empty list")
    trials = [trial_index(item) for item in items]
    return sum(1 for t in trials if t is not None and t <= k) / len(trials)


def solved_at_ks(items: Sequence, budget: int, ks: Sequence[int] = (1, 2, 4, 8, 16, 32)) -> dict:
    """``{"solved@k": value}`` for each k <= budget in ``ks`` plus k = budget, from one run of ``budget`` attempts."""
    histogram = trial_histogram(items, budget)
    if histogram["problems"] == 0:
        raise GuidedecodeError("solved@k of no problems is undefined: got an empty list")
    wanted = sorted({k for k in ks if 1 <= k <= budget} | {budget})
    return {f"solved@{k}": sum(histogram["solved"][:k]) / histogram["problems"] for k in wanted}


def final_answer_accuracy(items: Sequence, golds: Sequence[str], check: Callable[[str, str], bool]) -> float:
    """Plain accuracy without an oracle: the fraction of final answers ``check(text, gold)`` accepts.

    ``items`` are completion texts or strategy results (their chosen completion's text is judged).
    """
    if len(items) != len(golds):
        raise GuidedecodeError(f"got {len(items)} answers for {len(golds)} golds")
    if len(items) == 0:
        raise GuidedecodeError("accuracy of no problems is undefined: got an empty list")
    texts = [item if isinstance(item, str) else item.text for item in items]
    return sum(1 for text, gold in zip(texts, golds) if check(text, gold)) / len(texts)
