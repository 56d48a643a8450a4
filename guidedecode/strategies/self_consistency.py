"""Self-consistency (Wang et al., 2023): sample N reasoning paths, majority-vote the final answers.

Answers are grouped into equivalence classes (identical strings, then math-verify equivalence);
the largest class wins, ties go to the class whose first member was sampled first, and the
returned completion is that class's first member. Completions without an answer do not vote.

With an oracle (``check=`` and gold answers) only the voted answer is judged (FTTT protocol, spec
3.2): the run's trial is the first occurrence of the winning class, 1-based; all samples count as
attempts (the vote needs them all) and no answer at all means unsolved.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.budget import AttemptLog, check_budget, check_candidates, oracle_golds


def vote(answers: Sequence[str | None], equivalent_many: Callable[[list[tuple[str, str]]], list[bool]] | None = None):
    """Group answers into equivalence classes: a list of member-index lists, winner first.

    ``equivalent_many(pairs) -> list[bool]`` decides equivalence of distinct strings in one batch.
    """
    distinct: dict[str, list[int]] = {}
    for i, answer in enumerate(answers):
        if answer is not None:
            distinct.setdefault(answer.strip(), []).append(i)
    keys = list(distinct)
    parent = list(range(len(keys)))

    def root(k: int) -> int:
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    if equivalent_many is not None and len(keys) > 1:
        pairs = [(a, b) for a in range(len(keys)) for b in range(a + 1, len(keys))]
        verdicts = equivalent_many([(keys[a], keys[b]) for a, b in pairs])
        for (a, b), same in zip(pairs, verdicts):
            if same:
                parent[root(b)] = root(a)
    classes: dict[int, list[int]] = {}
    for k, key in enumerate(keys):
        classes.setdefault(root(k), []).extend(distinct[key])
    groups = [sorted(members) for members in classes.values()]
    return sorted(groups, key=lambda members: (-len(members), members[0]))


class SelfConsistency(StepStrategy):
    """Majority vote over the extracted answers of ``n`` samples.

    ``equivalence``: ``"math_verify"`` (default) merges string classes that ``equivalent_many`` (default:
    math-verify) declares equal; ``"exact"`` votes by exact (stripped) strings, as for code answers.
    """

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``n``."""
        return self.n

    def __init__(self, n: int = 8, *, extract: Callable[[str], str | None] | None = None,
                 equivalent_many: Callable | None = None, equivalence: str = "math_verify",
                 check: Callable[[str, str], bool] | None = None, temperature: float = 0.7, top_p: float = 1.0,
                 stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        if equivalence not in ("exact", "math_verify"):
            raise StrategyError(f"equivalence must be 'exact' or 'math_verify', got {equivalence!r}")
        self.n = check_budget(n, "n", "SelfConsistency")
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed
        self.check = check
        self.extract = extract or math_extract
        self.equivalent_many = None if equivalence == "exact" else equivalent_many or math_equivalent_many

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "SelfConsistency")
        samples = backend.sample(prompts, self.n, max_new_tokens=self.max_new_tokens, temperature=self.temperature,
                                 top_p=self.top_p, stop=self.stop, seed=self.seed)
        return [self.select(candidates, gold) for candidates, gold in zip(samples, golds)]

    def select(self, candidates, gold=None) -> StrategyResult:
        """Vote among ``candidates`` (already sampled) for one prompt."""
        check_candidates(candidates, "SelfConsistency")
        answers = [self.extract(c.text) for c in candidates]
        groups = vote(answers, self.equivalent_many)
        chosen = groups[0][0] if groups else 0
        counts = [0.0] * len(candidates)
        for members in groups:
            for i in members:
                counts[i] = float(len(members))
        head = [{"answers": answers, "classes": groups, "chosen": chosen}]
        generated = sum(c.num_tokens for c in candidates)
        if self.check is None:
            return StrategyResult(completion=candidates[chosen], candidates=candidates, scores=counts, trace=head,
                                  generated_tokens=generated, attempts=len(candidates))
        log = AttemptLog(len(candidates), check=self.check, gold=gold)
        for index, candidate in enumerate(candidates):
            log.add(candidate, judge=False, answer=answers[index])
        if groups:  # only the voted answer is judged; all-None votes leave the problem unsolved
            log.judge(chosen + 1)
        return log.result(candidates[chosen], generated_tokens=generated, candidates=candidates, scores=counts,
                          head=head)


def math_extract(text: str) -> str | None:
    """The final answer of a math completion (``\\boxed{}`` > "The answer is" > ``####`` > last number), or None."""
    from guidedecode.tasks import extract_answer

    return extract_answer(text, "math")


def math_equivalent_many(pairs: list[tuple[str, str]]) -> list[bool]:
    """math-verify equivalence of each answer pair, in one batch (``1/2`` and ``0.5`` are equal)."""
    from guidedecode.tasks import default_checker

    return default_checker().equivalent_many(pairs)
