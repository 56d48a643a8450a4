"""Evaluation metrics with the estimators the papers use.

* pass@k, unbiased (Chen et al., 2021): with n samples of which c are correct,
      pass@k = 1 - C(n - c, k) / C(n, k)
* maj@k: the majority-voted answer of the k samples is correct (ties: earliest answer);
* a mean with a normal-approximation 95% confidence interval over problems,
      mean +- 1.96 * s / sqrt(m).
"""

from __future__ import annotations

import math
from collections.abc import Sequence


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


def mean_ci(values: Sequence[float]) -> dict:
    """Mean and the half-width of its 95% normal confidence interval."""
    m = len(values)
    if m == 0:
        return {"mean": float("nan"), "ci95": float("nan"), "n": 0}
    mean = sum(values) / m
    var = sum((v - mean) ** 2 for v in values) / (m - 1) if m > 1 else 0.0
    return {"mean": mean, "ci95": 1.96 * math.sqrt(var / m), "n": m}
