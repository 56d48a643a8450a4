"""RATIONALYST: rationale-scored step selection (Jiang et al., "RATIONALYST: Pre-training
Process-Supervision for Improving Reasoning", arXiv 2410.01044).

A policy solves each problem one step at a time. At every step t, for every problem still running:

1. the rationale model writes one rationale r_t for the text so far, greedily, in the RATIONALYST
   format ``<BOT>r<EOT>`` (generation stops at ``<EOT>``; the markers are stripped);
2. the policy samples K candidate next steps c_1..c_K (default K = 3, T = 0.7), each ending at a step
   boundary: the chat end-of-turn token, or a stop string such as ``"\\n"``;
3. the scorer (default: the policy model) scores each candidate teacher-forced after the context with
   the rationale inserted, ``ctx_r = prefix + "<BOT>r<EOT>"``, with lp_i = log P(c_i | ctx_r, c_<i),
   i = 0..L-1, L = the candidate's tokens (the end-of-turn token is not part of it):

   - ``mean`` (default):  S(c) = (1/L) Σ_i lp_i
   - ``decayed``:         S(c) = (1/L) Σ_i γ^i lp_i                 (γ = 0.9, the ARC-only reference script)
   - ``pmi``:             S(c) = mean_i lp_i  −  mean_i log P(c_i | prefix, c_<i)
     (how much the rationale raises the step's likelihood; one extra scoring pass per step)

4. the candidate with the highest score is appended (ties: the earliest candidate), and the problem
   stops as soon as the chosen step contains an answer (``is_final(step_text)``), not one step later.

Modes: ``implicit`` (above; the paper's implicit supervision), ``explicit`` (the rationale block is also
placed in the policy prompt before sampling, ``prompt_t = prefix + "<BOT>r<EOT>"``; the candidates are
then ranked the same way) and ``random`` (the "without RATIONALYST" baseline: same loop and K
candidates, one kept uniformly at random; no rationale and no scoring calls).

Contexts are text. The policy context at step t is ``prompt + s_1 + sep + s_2 + sep + ... + s_{t-1} +
sep`` where ``sep`` is ``""`` for stop-string boundaries (a step keeps its stop string) and, for chat
turns, the template's text between two assistant turns (end-of-turn + a new assistant header), read off
the tokenizer's chat template. A prompt is rendered text, token ids (decoded with the policy's
tokenizer), or a list of chat messages (rendered with the policy's chat template).

Every phase is one backend call for all live problems (rationales: one ``greedy``; candidates: one
``sample``); scoring is one ``score`` call per problem (per condition), because ``score`` takes one
prefix. Differences from the reference loop (spec Section 7): stop detection right after the step is
chosen; the scorer is configurable; per-step sampling seeds derive from (seed, step) and the random
choice from (seed, problem, step).
"""

from __future__ import annotations

import hashlib
import random as _random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from guidedecode.backends.base import Completion
from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy, StrategyResult, check_golds

MODES = ("implicit", "explicit", "random")
SCORE_FNS = ("mean", "decayed", "pmi")
_SCORE_ALIASES = {"mean_logprob": "mean"}
CHAT = "chat"
BOT, EOT = "<BOT>", "<EOT>"

_ANSWER_IS_RE = re.compile(r"\b(?:the\s+)?(?:correct\s+|final\s+)?answer\s+is\b\s*:?\s*\S", re.IGNORECASE)


def contains_answer_marker(text: str) -> bool:
    """The default answer detector: a non-empty ``\\boxed{...}`` or "The answer is <something>"."""
    from guidedecode.tasks.extract import extract_boxed

    return extract_boxed(text) is not None or _ANSWER_IS_RE.search(text) is not None


def strip_rationale_markers(text: str) -> str:
    """The rationale without ``<BOT>`` / ``<EOT>`` markers and surrounding whitespace."""
    return text.replace(BOT, "").replace(EOT, "").strip()


def default_rationale_prompt(backend, preceding: str):
    """The rationale model's prompt: ``[user: preceding]`` in its chat template (the RATIONALYST training
    format, spec Section 5), or, for a model without a template, the inline form ``preceding + " <BOT>"``."""
    if getattr(backend.tokenizer, "chat_template", None):
        return backend.chat_prompt([{"role": "user", "content": preceding}])
    return preceding + " " + BOT


def aggregate(logprobs: torch.Tensor, score_fn: str, gamma: float = 0.9) -> float:
    """Length-normalised score of one candidate's token log-probs: mean, or γ^i-weighted sum over L."""
    length = int(logprobs.numel())
    if length == 0:
        raise StrategyError("cannot score a candidate with no tokens")
    if score_fn == "decayed":
        weights = gamma ** torch.arange(length, dtype=torch.float64)
        return float((weights * logprobs.double()).sum() / length)
    return float(logprobs.double().sum() / length)


def chat_turn_separator(tokenizer) -> str:
    """The text a chat template puts between one assistant turn's content and the next assistant turn
    (e.g. ``"<|im_end|>\\n<|im_start|>assistant\\n"``)."""
    if not getattr(tokenizer, "chat_template", None):
        raise StrategyError(
            "step_boundary='chat' needs a tokenizer with a chat template; this one has none: "
            "use a stop-string boundary instead, e.g. step_boundary='\\n'"
        )
    mark = "\u2063STEP\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Q"}, {"role": "assistant", "content": mark}],
        tokenize=False, add_generation_prompt=True,
    )
    if mark not in rendered:
        raise StrategyError("the chat template drops assistant message content: cannot place steps as chat turns")
    separator = rendered[rendered.index(mark) + len(mark):]
    if not separator:
        raise StrategyError("the chat template puts nothing between assistant turns: cannot place steps as chat turns")
    return separator


def _derived_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class _Problem:
    """One problem's running state."""

    index: int
    prompt: str  # the rendered policy prompt
    question: str  # the text the rationale model sees before the steps
    steps: list[Completion] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    generated_tokens: int = 0
    attempts: int = 0
    finish: str | None = None
    last_candidates: list[Completion] = field(default_factory=list)
    last_scores: list[float] | None = None


class RationaleStepSearch(StepStrategy):
    """Step-by-step search where a rationale model's rationale decides between K sampled steps.

    ``rationale_backend`` / ``scorer_backend``: backends of the rationale model and of the scorer
    (default: the policy backend given to ``run``; under ``model.generate(custom_generate=...)`` only the
    generating model is wrapped as the policy). ``step_boundary``: ``"chat"`` (one step = one assistant
    turn, ended by the end-of-turn token) or a stop string / list of stop strings. ``max_step_tokens``:
    the per-step token limit; ``max_new_tokens``: the budget of the whole chosen trajectory.
    ``rationale_template``: how the rationale enters a context (``{rationale}`` is replaced).
    ``rationale_prompt(backend, preceding_text) -> prompt``: the rationale model's prompt.
    ``is_final(step_text) -> bool``: the answer detector (default :func:`contains_answer_marker`).
    """

    def __init__(
        self,
        k: int = 3,
        *,
        rationale_backend=None,
        scorer_backend=None,
        mode: str = "implicit",
        score_fn: str = "mean",
        gamma: float = 0.9,
        temperature: float = 0.7,
        top_p: float = 1.0,
        max_steps: int = 15,
        step_boundary: str | Sequence[str] = CHAT,
        max_step_tokens: int = 128,
        max_rationale_tokens: int = 64,
        rationale_template: str = BOT + "{rationale}" + EOT,
        rationale_prompt: Callable | None = None,
        is_final: Callable[[str], bool] | None = None,
        seed: int | None = None,
        max_new_tokens: int = 2048,
        **options,
    ):
        super().__init__(max_new_tokens=max_new_tokens, **options)
        if not isinstance(k, int) or k < 1:
            raise StrategyError(f"RationaleStepSearch needs k >= 1 candidates per step, got {k}")
        if mode not in MODES:
            raise StrategyError(f"unknown mode '{mode}': choose one of {', '.join(MODES)}")
        score_fn = _SCORE_ALIASES.get(score_fn, score_fn)
        if score_fn not in SCORE_FNS:
            raise StrategyError(f"unknown score function '{score_fn}': choose one of {', '.join(SCORE_FNS)}")
        if not 0.0 < gamma <= 1.0:
            raise StrategyError(f"gamma must be in (0, 1], got {gamma}")
        if temperature <= 0:
            raise StrategyError(f"temperature must be > 0, got {temperature}")
        for name, value in (("max_steps", max_steps), ("max_step_tokens", max_step_tokens),
                            ("max_rationale_tokens", max_rationale_tokens)):
            if value < 1:
                raise StrategyError(f"{name} must be >= 1, got {value}")
        if "{rationale}" not in rationale_template:
            raise StrategyError(f"rationale_template must contain '{{rationale}}', got {rationale_template!r}")
        if step_boundary == CHAT:
            self.stop = None
        else:
            stops = [step_boundary] if isinstance(step_boundary, str) else list(step_boundary)
            if not stops or any(not isinstance(s, str) or not s for s in stops):
                raise StrategyError(f"step_boundary must be 'chat' or non-empty stop strings, got {step_boundary!r}")
            self.stop = stops
        self.k, self.mode, self.score_fn, self.gamma = k, mode, score_fn, gamma
        self.temperature, self.top_p, self.max_steps, self.seed = temperature, top_p, max_steps, seed
        self.step_boundary = step_boundary
        self.max_step_tokens, self.max_rationale_tokens = max_step_tokens, max_rationale_tokens
        self.rationale_template = rationale_template
        self.rationale_backend, self.scorer_backend = rationale_backend, scorer_backend
        self.rationale_prompt = rationale_prompt or default_rationale_prompt
        self.is_final = is_final or contains_answer_marker
        self._prefetched: dict = {}  # scores of the current step, computed for all problems at once

    # ------------------------------------------------------------------ run
    def run(self, backend, prompts, *, golds=None):
        check_golds(prompts, golds)
        chat = self.stop is None
        separator = chat_turn_separator(backend.tokenizer) if chat else ""
        problems = [self._problem(i, backend, p) for i, p in enumerate(prompts)]
        for step in range(self.max_steps):
            live = [p for p in problems if p.finish is None]
            if not live:
                break
            self._step(step, live, backend, separator, chat)
        return [self._result(p, backend, separator) for p in problems]

    def _problem(self, index: int, backend, prompt) -> _Problem:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
            return _Problem(index, backend.chat_prompt(list(prompt)), users[-1] if users else "")
        text = prompt if isinstance(prompt, str) else backend.decode([int(t) for t in prompt])
        if not text:
            raise StrategyError(f"prompt {index} is empty")
        return _Problem(index, text, text)

    def _block(self, rationale: str) -> str:
        return self.rationale_template.replace("{rationale}", rationale)

    def _step(self, step: int, live: list[_Problem], policy, separator: str, chat: bool) -> None:
        prefixes = [p.prompt + "".join(s.text + separator for s in p.steps) for p in live]
        rationales: list[str | None] = [None] * len(live)
        rationale_tokens = [0] * len(live)
        if self.mode != "random":
            rationale_backend = self.rationale_backend or policy
            joiner = " " if chat else ""
            preceding = [joiner.join([p.question] + [s.text for s in p.steps]) for p in live]
            requests = [self.rationale_prompt(rationale_backend, text) for text in preceding]
            outputs = rationale_backend.greedy(requests, max_new_tokens=self.max_rationale_tokens, stop=EOT)
            rationales = [strip_rationale_markers(o.text) for o in outputs]
            rationale_tokens = [o.num_tokens for o in outputs]
        if self.mode == "explicit":
            policy_prompts = [prefix + self._block(r) for prefix, r in zip(prefixes, rationales)]
        else:
            policy_prompts = prefixes
        seed = None if self.seed is None else _derived_seed(self.seed, step)
        samples = policy.sample(policy_prompts, self.k, max_new_tokens=self.max_step_tokens,
                                temperature=self.temperature, top_p=self.top_p, stop=self.stop, seed=seed)
        if len(samples) != len(live):
            raise StrategyError(f"the policy returned {len(samples)} candidate lists for {len(live)} prompts")
        self._prefetched = self._prefetch_scores(prefixes, rationales, samples, policy)
        for problem, prefix, rationale, r_tokens, candidates in zip(live, prefixes, rationales, rationale_tokens,
                                                                    samples):
            self._choose(step, problem, prefix, rationale, r_tokens, list(candidates), policy)
        self._prefetched = {}

    def _prefetch_scores(self, prefixes, rationales, samples, policy) -> dict:
        """Score the usable candidates of every live problem in one ``score_many`` call (shared forwards
        across problems), keyed by (context, candidate texts); ``_score`` falls back to ``score``."""
        scorer = self.scorer_backend or policy
        if self.mode == "random" or not hasattr(scorer, "score_many"):
            return {}
        requests = []
        for prefix, rationale, candidates in zip(prefixes, rationales, samples):
            texts = tuple(c.text for c in candidates if c.token_ids and c.text and c.finish_reason != "length")
            if not texts:
                continue  # _choose raises the error that names the problem
            requests.append((prefix + self._block(rationale), texts))
            if self.score_fn == "pmi":
                requests.append((prefix, texts))
        rows = scorer.score_many([(context, list(texts)) for context, texts in requests]) if requests else []
        return dict(zip(requests, rows))

    def _choose(self, step, problem, prefix, rationale, rationale_tokens, candidates, policy) -> None:
        where = f"problem {problem.index}, step {step + 1}"
        if not candidates:
            raise StrategyError(f"{where}: the policy produced an empty candidate list")
        if len(candidates) != self.k:
            raise StrategyError(f"{where}: the policy returned {len(candidates)} candidates, expected k={self.k}")
        empty = [not c.token_ids or not c.text for c in candidates]
        unfinished = [c.finish_reason == "length" for c in candidates]
        eligible = [i for i in range(self.k) if not empty[i] and not unfinished[i]]
        if not eligible:
            if all(unfinished):
                boundary = "the chat end-of-turn token" if self.stop is None else f"stop strings {self.stop!r}"
                raise StrategyError(
                    f"{where}: none of the {self.k} candidates reached a step boundary ({boundary}) within "
                    f"max_step_tokens={self.max_step_tokens}; raise max_step_tokens or choose a boundary the "
                    "policy produces"
                )
            raise StrategyError(
                f"{where}: the policy produced no usable step ({sum(empty)} empty, {sum(unfinished)} cut at "
                f"max_step_tokens={self.max_step_tokens})"
            )
        entry = {"step": step + 1, "rationale": rationale, "candidates": [c.text for c in candidates],
                 "finish_reasons": [c.finish_reason for c in candidates], "eligible": eligible,
                 "rationale_tokens": rationale_tokens,
                 "calls": {"rationale": 0 if rationale is None else 1, "sample": 1, "score": 0}}
        scores: list[float] | None = None
        if self.mode == "random":
            rng = _random.Random(f"{self.seed}:{problem.index}:{step}") if self.seed is not None else None
            chosen = rng.choice(eligible) if rng else eligible[int(torch.randint(len(eligible), ()))]
        else:
            scores, token_logprobs = self._score(where, prefix, rationale, [candidates[i] for i in eligible], policy)
            full = [float("-inf")] * self.k
            for i, s in zip(eligible, scores):
                full[i] = s
            scores = full
            entry["token_logprobs"] = {}  # condition ("with", and "without" for pmi) -> per candidate
            for condition, rows in token_logprobs.items():
                per_candidate: list[list[float] | None] = [None] * self.k
                for i, row in zip(eligible, rows):
                    per_candidate[i] = row
                entry["token_logprobs"][condition] = per_candidate
            entry["calls"]["score"] = len(token_logprobs)
            chosen = max(eligible, key=lambda i: (scores[i], -i))
        entry["scores"], entry["chosen"] = scores, chosen
        best = candidates[chosen]
        problem.steps.append(best)
        problem.trace.append(entry)
        problem.generated_tokens += sum(c.num_tokens for c in candidates) + rationale_tokens
        problem.attempts += len(candidates)
        problem.last_candidates, problem.last_scores = candidates, scores
        if self.is_final(best.text):
            problem.finish = "answer"
        elif self.stop is not None and best.finish_reason == "eos":
            problem.finish = "eos"  # the policy ended its text inside a stop-string step
        elif sum(s.num_tokens for s in problem.steps) >= self.max_new_tokens:
            problem.finish = "max_new_tokens"
        elif step + 1 >= self.max_steps:
            problem.finish = "max_steps"
        entry["finish"] = problem.finish

    def _score(self, where, prefix, rationale, candidates, policy):
        """Scores of the candidates (see the module docstring) and their per-token log-probs per condition."""
        scorer = self.scorer_backend or policy
        texts = [c.text for c in candidates]
        conditions = {"with": prefix + self._block(rationale)}
        if self.score_fn == "pmi":
            conditions["without"] = prefix
        token_logprobs: dict[str, list[list[float]]] = {}
        aggregates: dict[str, list[float]] = {}
        for condition, context in conditions.items():
            rows = self._prefetched.get((context, tuple(texts)))
            if rows is None:
                rows = scorer.score(context, texts)
            if len(rows) != len(texts):
                raise StrategyError(f"{where}: the scorer returned {len(rows)} scores for {len(texts)} candidates")
            for text, row in zip(texts, rows):
                if row.logprobs.numel() == 0:
                    raise StrategyError(f"{where}: the scorer found no tokens to score in candidate {text!r}")
            token_logprobs[condition] = [row.logprobs.tolist() for row in rows]
            fn = "decayed" if self.score_fn == "decayed" else "mean"
            aggregates[condition] = [aggregate(row.logprobs, fn, self.gamma) for row in rows]
        if self.score_fn == "pmi":
            scores = [a - b for a, b in zip(aggregates["with"], aggregates["without"])]
        else:
            scores = aggregates["with"]
        return scores, token_logprobs

    def _result(self, problem: _Problem, policy, separator: str) -> StrategyResult:
        text = separator.join(s.text for s in problem.steps)
        sep_ids = policy.tokenizer(separator, add_special_tokens=False)["input_ids"] if separator else []
        token_ids: list[int] = []
        for i, s in enumerate(problem.steps):
            token_ids += (sep_ids if i else []) + list(s.token_ids)
        finish = {"answer": "stop", "eos": "eos"}.get(problem.finish, "length")
        return StrategyResult(
            completion=Completion(text=text, token_ids=token_ids, finish_reason=finish),
            candidates=problem.last_candidates, scores=problem.last_scores, trace=problem.trace,
            generated_tokens=problem.generated_tokens, attempts=problem.attempts,
        )


RationaleGuidedStepSearch = RationaleStepSearch  # the name used in the spec (Section 8.2)
