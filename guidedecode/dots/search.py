"""Offline trajectory search, DOTS Algorithm 1 (arXiv 2410.03864, Section 3.2 and Appendix A).

For each training question the solver runs every trajectory several times and the most successful
one wins::

    P <- all 12 trajectories; R[p] <- 0
    for k = 1..K:                                   # K = 2
        for p in P:
            r_p <- share of N_eval runs of (Q, p) at temperature T the checker accepts     # N_eval = 4, T = 0.4
            R[p] <- ((k - 1) * R[p] + r_p) / k      # mean over the k rounds p has run
        sort P by (R[p] desc, |p| asc)              # shorter trajectories win ties
        P <- the first N_k                          # N_1 = 8, N_2 = 3
    return P[0]

so a question costs N_eval * (12 + 8) = 80 runs with the defaults. A question on which, after the
first round (every trajectory explored), **every** trajectory succeeded on every run or **none** ever
succeeded carries no signal and is dropped (``status`` ``"all_pass"`` / ``"all_fail"``); it runs no
further rounds. Success is the checker's verdict only (the released code counted any non-empty
answer as a success, which made every question look solved: not reproduced here).

Ties beyond (success, length) keep :data:`~guidedecode.dots.actions.ALL_TRAJECTORIES` order.
:func:`importance_trajectory` is the released code's alternative selector (marginal action
importance). Resumable: every (question, round) unit is one line of ``runs.jsonl``, every finished
question one line of ``search.jsonl``; per-unit seeds make a resumed search write the same lines.
"""

from __future__ import annotations

import hashlib
import json
import numbers
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from guidedecode import validation
from guidedecode.dots.actions import ALL_TRAJECTORIES, Trajectory, parse_trajectory
from guidedecode.errors import StrategyError
from guidedecode.records import append_jsonl, read_jsonl

__all__ = ["PRESETS", "SearchConfig", "importance_trajectory", "rank", "search"]


@dataclass(frozen=True)
class SearchConfig:
    """Algorithm 1's settings; defaults are the paper's (Appendix A)."""

    rounds: int = 2  # K
    samples: int = 4  # N_eval runs per trajectory per round
    keep: tuple[int, ...] = (8, 3)  # N_k: trajectories kept after round k
    temperature: float = 0.4
    seed: int = 0
    max_new_tokens: int = 512
    max_verify_rounds: int = 3
    code_timeout: float = 15.0

    def validate(self) -> None:
        validation.positive_int("rounds", self.rounds, error=StrategyError)
        validation.positive_int("samples", self.samples, error=StrategyError)
        if isinstance(self.keep, (str, bytes)) or not isinstance(self.keep, Sequence):
            raise StrategyError(f"keep must be a tuple of counts, one per round but the last (e.g. (8, 3)), "
                                f"got {self.keep!r}")
        if len(self.keep) < self.rounds - 1 or any(
                isinstance(n, bool) or not isinstance(n, numbers.Integral) or n < 1 for n in self.keep):
            raise StrategyError(f"keep={self.keep}: give a count >= 1 for each of the first {self.rounds - 1} round(s)")
        validation.temperature("temperature (the search samples)", self.temperature, error=StrategyError)
        validation.integer("seed", self.seed, error=StrategyError)
        validation.positive_int("max_new_tokens", self.max_new_tokens, error=StrategyError)
        validation.positive_int("max_verify_rounds", self.max_verify_rounds, error=StrategyError)
        validation.number("code_timeout (seconds)", self.code_timeout, above=0, error=StrategyError)


#: ``paper``: Algorithm 1 + Appendix A; ``released``: the MurongYue/DOTS search settings (T = 0.8,
#: 2 samples, 12 -> 8 -> 3 over three rounds, one verify round) -- their importance selector is
#: :func:`importance_trajectory`.
PRESETS = {
    "paper": SearchConfig(),
    "released": SearchConfig(rounds=3, samples=2, keep=(8, 3), temperature=0.8, max_verify_rounds=1),
}


def rank(success: dict[Trajectory, float]) -> list[Trajectory]:
    """Trajectories sorted by (success rate desc, length asc, library order)."""
    order = {t: i for i, t in enumerate(ALL_TRAJECTORIES)}
    return sorted(success, key=lambda t: (-success[t], t.length, order[t]))


def _unit_seed(seed: int, question_id: str, round_: int) -> int:
    digest = hashlib.sha256(f"dots-search/{seed}/{question_id}/{round_}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


@dataclass
class _Question:
    id: str
    messages: list[dict]
    problem: object
    success: dict = field(default_factory=dict)  # trajectory -> running mean success


def search(problems: Sequence, backend, *, messages: Callable, check: Callable[[list[str], list], list[bool]],
           config: SearchConfig = SearchConfig(), out: str | Path | None = None, progress: bool = False,
           batch_size: int | None = None) -> list[dict]:
    """Algorithm 1 over ``problems``; one summary dict per problem (see the module docstring).

    ``messages(problem)`` gives the solver's chat messages; ``check(texts, problems)`` one verdict per
    final text (e.g. ``task.check_many``). ``out``: directory for ``runs.jsonl`` / ``search.jsonl``
    (resumes from them). Summary: ``{"id", "status": "kept"|"all_pass"|"all_fail", "best",
    "success": {action line: rate}, "runs", "first_turn"}``, where ``first_turn`` is the solver's first
    reply in a successful run of the best trajectory (the internalized SFT target).
    """
    from tqdm.auto import tqdm

    from guidedecode.dots.executor import DOTS

    config.validate()
    settings = json.loads(json.dumps(asdict(config)))
    runs_path = search_path = None
    done_units: dict[str, dict] = {}
    done_questions: dict[str, dict] = {}
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        runs_path, search_path = out / "runs.jsonl", out / "search.jsonl"
        done_units = {r["id"]: r for r in read_jsonl(runs_path)}
        done_questions = {r["id"]: r for r in read_jsonl(search_path)}
        other = [r["id"] for r in done_questions.values() if r.get("settings") != settings]
        if other:
            raise StrategyError(f"{search_path} holds questions searched with other settings (e.g. {other[0]}): "
                                "use a new output directory")
    strategy = DOTS(trajectory="CoT", temperature=config.temperature, max_new_tokens=config.max_new_tokens,
                    max_verify_rounds=config.max_verify_rounds, code_timeout=config.code_timeout,
                    batch_size=batch_size or getattr(backend, "batch_size", 16))
    summaries = []
    bar = tqdm(total=len(problems), desc="dots search", unit="question", disable=not progress)
    for problem in problems:
        if problem.id in done_questions:
            summaries.append(done_questions[problem.id])
            bar.update(1)
            continue
        question = _Question(problem.id, messages(problem), problem)
        candidates = list(ALL_TRAJECTORIES)
        all_runs: list[dict] = []
        status = "kept"
        for k in range(1, config.rounds + 1):
            unit_id = f"{problem.id}/round{k}"
            unit = done_units.get(unit_id)
            if unit is None:
                unit = _run_unit(strategy, backend, question, candidates, k, config, check)
                unit["id"] = unit_id
                if runs_path is not None:
                    append_jsonl(runs_path, [unit])
            all_runs.extend(unit["runs"])
            for trajectory in candidates:
                scores = [r["score"] for r in unit["runs"] if r["trajectory"] == trajectory.action_line]
                rate = sum(scores) / len(scores)
                question.success[trajectory] = ((k - 1) * question.success.get(trajectory, 0.0) + rate) / k
            if k == 1:
                rates = set(question.success.values())
                if rates == {1.0}:
                    status = "all_pass"
                elif rates == {0.0}:
                    status = "all_fail"
                if status != "kept":
                    break
            candidates = rank({t: question.success[t] for t in candidates})
            if k <= len(config.keep):
                candidates = candidates[: config.keep[k - 1]]
        best = rank({t: question.success[t] for t in candidates})[0] if status == "kept" else None
        winner = [r for r in all_runs if best is not None and r["trajectory"] == best.action_line and r["score"]]
        summary = {
            "id": problem.id,
            "status": status,
            "best": best.action_line if best else None,
            "best_length": best.length if best else None,
            "success": {t.action_line: question.success[t] for t in rank(question.success)},
            "runs": len(all_runs),
            "first_turn": winner[0]["first_turn"] if winner else None,
            "settings": settings,
        }
        if search_path is not None:
            append_jsonl(search_path, [summary])
        summaries.append(summary)
        bar.update(1)
    bar.close()
    return summaries


def _run_unit(strategy, backend, question: _Question, candidates, round_: int, config: SearchConfig, check) -> dict:
    """``config.samples`` runs of every candidate trajectory on one question, in one batch."""
    jobs = [(t, j) for t in candidates for j in range(config.samples)]
    strategy.seed = _unit_seed(config.seed, question.id, round_)
    results = strategy.run_trajectories(backend, [question.messages] * len(jobs), [t for t, _ in jobs])
    texts = [r.completion.text for r in results]
    verdicts = check(texts, [question.problem] * len(texts))
    runs = []
    for (trajectory, j), result, verdict in zip(jobs, results, verdicts):
        head = result.trace[0]
        runs.append({"trajectory": trajectory.action_line, "sample": j, "pred": result.completion.text,
                     "score": bool(verdict), "first_turn": head["first_turn"], "dialogue": head["dialogue"],
                     "tokens": head["tokens"],
                     "events": [{k: v for k, v in e.items() if k != "stderr"} for e in result.trace[1:]]})
    return {"question": question.id, "round": round_, "seed": strategy.seed, "runs": runs}


# ------------------------------------------------------------------------------- released selector

_IMPORTANCE_ACTIONS = ("planning", "query_rewriting", "CoT", "programming_solver", "verifier")


def importance_trajectory(runs: Sequence[dict], *, margin: float = 0.3, balance: float = 0.6) -> Trajectory | None:
    """The released code's selector (``local_searched_data_processing.py``): over all runs of a
    question (dicts with ``trajectory`` and ``score``), action a is important iff
    acc_with(a) > acc_without(a) + ``margin`` and |n_with - n_without| < ``balance`` * (n_with + n_without).
    Analysis = planning if important, else query_rewriting if important, else Empty; solution = PoT
    if important, else CoT; verification = verifier if important. None when no action is important."""
    important = set()
    for action in _IMPORTANCE_ACTIONS:
        with_ = [r["score"] for r in runs if action in parse_trajectory(r["trajectory"]).actions]
        without = [r["score"] for r in runs if action not in parse_trajectory(r["trajectory"]).actions]
        if not with_ or not without:
            continue
        if (sum(with_) / len(with_) > sum(without) / len(without) + margin
                and abs(len(with_) - len(without)) < balance * (len(with_) + len(without))):
            important.add(action)
    if not important:
        return None
    analysis = "planning" if "planning" in important else "query_rewriting" if "query_rewriting" in important else ""
    solution = "programming_solver" if "programming_solver" in important else "CoT"
    return Trajectory(analysis, solution, "verifier" if "verifier" in important else "")
