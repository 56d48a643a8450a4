"""One controller over the test-time-scaling baselines.

    loop = FeedbackLoop(backend, Verifier.oracle(), budget=8, strategy="best_of_n", temperature=0.6)
    reports = loop.run(questions, golds)

A :class:`Verifier` says how attempts are judged:

* ``Verifier.oracle(checker)``: the checker and the gold answer judge each attempt; the strategy stops at
  the first correct one (the FTTT oracle-stop protocol) and the report gives the solving attempt. Numbers
  under an oracle are upper bounds, not deployable accuracy;
* ``Verifier.reward_model(scorer)``: a scorer (``scorer(backend, prompt, completions, gold)``, e.g.
  :class:`~guidedecode.strategies.scorers.ValueModelScorer`) ranks the attempts of best-of-N or the beams
  of step-level beam search (``step_beam``); nothing is judged;
* ``Verifier.none()``: nothing is judged (self-consistency's majority vote, revision without feedback).

Every strategy shares the attempt accounting of :mod:`guidedecode.strategies.budget`, so one report format
serves all: per question the attempts (text, extracted answer, verdict, tokens), the solving attempt, the
strategy's final answer, the verifier kind and the cost counters of :class:`~guidedecode.backends.BackendStats`
(the batch's spend shared evenly by its questions).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from guidedecode.errors import StrategyError
from guidedecode.metrics import trial_index
from guidedecode.strategies.beam_search import BeamSearch, TokenBeamSearch
from guidedecode.strategies.best_of_n import BestOfN
from guidedecode.strategies.revision import Revision
from guidedecode.strategies.scorers import math_answer_check
from guidedecode.strategies.self_consistency import SelfConsistency, math_extract
from guidedecode.strategies.self_refine import SelfRefine

# "beam" is the FTTT baseline: token-level beam search at T = 0 (TokenBeamSearch); "step_beam" is the
# sampled step-level BeamSearch, the one a reward model can rank.
STRATEGIES = ("best_of_n", "self_consistency", "beam", "step_beam", "revision", "self_refine", "optune", "fttt",
              "fttt+")
WEIGHT_UPDATE = ("optune", "fttt", "fttt+")  # test-time weight updates (strategies.weight_update; HF backends)
RANKING = ("best_of_n", "step_beam")  # the strategies a reward model can drive
_SAMPLING_OPTIONS = ("temperature", "top_p", "seed", "expansions", "step_stop", "max_steps", "max_step_tokens")


@dataclass(frozen=True)
class Verifier:
    """How attempts are judged: ``kind`` is ``"oracle"``, ``"reward_model"`` or ``"none"``."""

    kind: str
    check: Callable[[str, str], bool] | None = None
    scorer: Callable | None = None

    @classmethod
    def oracle(cls, checker: Callable[[str, str], bool] | None = None) -> "Verifier":
        """``checker(text, gold) -> bool`` (default: the last math answer, math-verify equivalence)."""
        return cls("oracle", check=checker or math_answer_check)

    @classmethod
    def reward_model(cls, scorer: Callable) -> "Verifier":
        """A scorer ranks attempts (higher is better); no verdicts."""
        if not callable(scorer):
            raise StrategyError(f"Verifier.reward_model needs a callable scorer, got {type(scorer).__name__}")
        return cls("reward_model", scorer=scorer)

    @classmethod
    def none(cls) -> "Verifier":
        return cls("none")


class FeedbackLoop:
    """Run one baseline strategy under a verifier and an attempt budget; ``options`` go to the strategy
    (``temperature``, ``top_p``, ``max_new_tokens``, ``seed``, beam ``expansions`` / ``step_stop``, ...).

    ``budget`` is best-of-N's and self-consistency's ``n``, the beam width, and revision's and
    self-refine's ``k``. ``strategy="beam"`` is the FTTT beam-search baseline, transformers' token-level
    beam search without sampling (:class:`TokenBeamSearch`, HF backends); ``"step_beam"`` is the
    sampled step-level :class:`BeamSearch`. ``extractor(text) -> answer | None`` and ``equivalence``
    (``"math_verify"`` or ``"exact"``) define the answers that are voted on and reported.
    """

    def __init__(self, backend, verifier: Verifier, budget: int = 32, *, strategy: str = "best_of_n",
                 extractor: Callable[[str], str | None] | None = None, equivalence: str = "math_verify", **options):
        if not isinstance(verifier, Verifier):
            raise StrategyError("FeedbackLoop needs a Verifier: Verifier.oracle(), .reward_model(scorer) or .none()")
        if strategy not in STRATEGIES:
            raise StrategyError(f"unknown strategy {strategy!r}: choose one of {', '.join(STRATEGIES)}")
        if verifier.kind == "reward_model" and strategy not in RANKING:
            raise StrategyError(f"a reward-model verifier ranks attempts, which only {' and '.join(RANKING)} do; "
                                f"{strategy} needs Verifier.oracle() or Verifier.none()")
        self.backend, self.verifier, self.strategy_name = backend, verifier, strategy
        self.extract = extractor or math_extract
        check = verifier.check if verifier.kind == "oracle" else None
        if strategy == "best_of_n":
            self.strategy = BestOfN(budget, scorer=verifier.scorer, check=check, extract=self.extract,
                                    equivalence=equivalence, **options)
        elif strategy == "self_consistency":
            self.strategy = SelfConsistency(budget, extract=self.extract, equivalence=equivalence, check=check,
                                            **options)
        elif strategy == "beam":
            sampling = sorted(set(options) & set(_SAMPLING_OPTIONS))
            if sampling:
                raise StrategyError(f"strategy 'beam' is token-level beam search at temperature 0 (FTTT): it takes no "
                                    f"{', '.join(sampling)}; use strategy='step_beam' for sampled step-level beams")
            self.strategy = TokenBeamSearch(budget, check=check, **options)
        elif strategy == "step_beam":
            self.strategy = BeamSearch(budget, options.pop("expansions", 4), scorer=verifier.scorer, check=check,
                                       **options)
        elif strategy == "revision":
            self.strategy = Revision(budget, check=check, **options)
        elif strategy in WEIGHT_UPDATE:
            from guidedecode.strategies.weight_update import FTTT, OpTune

            if strategy == "optune":
                self.strategy = OpTune(budget, check=check, **options)
            else:
                self.strategy = FTTT(budget, check=check, reflection=strategy == "fttt+", **options)
        else:
            self.strategy = SelfRefine(budget, check=check, **options)

    def run(self, prompts: Sequence, golds: Sequence[str] | None = None) -> list[dict]:
        """One report per prompt (see the module docstring). Oracle verifiers need ``golds``."""
        if self.verifier.kind == "oracle" and golds is None:
            raise StrategyError("an oracle verifier judges against gold answers: pass golds= to run()")
        if not prompts:
            return []
        before, extra_before = self.backend.stats.counters(), dict(self.backend.stats.extra)
        results = self.strategy.run(self.backend, list(prompts), golds=golds)
        spent = self.backend.stats.since(before)
        spent.update({name: value - extra_before.get(name, 0) for name, value in self.backend.stats.extra.items()
                      if isinstance(value, (int, float)) and value != extra_before.get(name, 0)})
        cost = {name: value / len(prompts) for name, value in spent.items()}
        return [self._report(result, cost) for result in results]

    def _report(self, result, cost: dict) -> dict:
        records = [r for r in result.trace if isinstance(r, dict) and "attempt" in r]
        if not records:  # strategies judge nothing without an oracle: every candidate was an attempt
            records = [{"attempt": j + 1, "verdict": None, "tokens": c.num_tokens}
                       for j, c in enumerate(result.candidates[:result.attempts])]
        attempts = []
        for record in records:
            text = result.candidates[record["attempt"] - 1].text
            attempts.append({"attempt": record["attempt"], "text": text, "answer": self.extract(text),
                             "verdict": record["verdict"], "tokens": record["tokens"],
                             **({"edited": record["edited"]} if "edited" in record else {})})
        return {
            "strategy": self.strategy_name,
            "verifier": self.verifier.kind,
            "attempts": attempts,
            "solved_at": trial_index(result) if self.verifier.kind == "oracle" else None,
            "answer": self.extract(result.completion.text),
            "text": result.completion.text,
            "generated_tokens": result.generated_tokens,
            "cost": cost,
        }
