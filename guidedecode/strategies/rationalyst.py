"""RATIONALYST: rationale-scored step selection (Jiang et al., "RATIONALYST: Pre-training
Process-Supervision for Improving Reasoning", arXiv 2410.01044).

A policy solves each problem one step at a time. At every step t, for every problem still running:

1. the rationale model writes one rationale r_t for the trajectory so far,
   ``traj_t = "Question: q\\nAnswer:" + " s_1" + ... + " s_{t-1}"`` (q = the problem's user message),
   greedily, in the RATIONALYST format ``<BOT>r<EOT>`` (generation stops at ``<EOT>``; markers stripped);
2. the policy samples K candidate next steps c_1..c_K (default K = 3, T = 0.7), each ending at a step
   boundary: the chat end-of-turn token, or a stop string such as ``"\\n"``; a step cut at
   ``max_step_tokens`` is kept (marked ``truncated`` in the trace) when no candidate reached a boundary;
3. the scorer (default: the policy model) scores each candidate teacher-forced after a context that
   holds the rationale, with lp_i = log P(c_i | ctx_r, c_<i), i = 0..L-1, L = the candidate's tokens
   (the end-of-turn token is not part of it). ``scoring_context="reference"`` (default; the reference's
   ``get_post_prob``): ctx_r = the scorer's chat template over ``[system: S_r, user: traj_t + " <BOT>r<EOT>"]``
   and the candidate (stripped of surrounding whitespace and its boundary) as its own assistant turn,
   no few-shot demos, S_r = :data:`SCORER_SYSTEM_PROMPT`; ``"inline"``: ctx_r = the policy context +
   ``"<BOT>r<EOT>"``, the candidate continuing it:

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

A prompt is given once: as chat messages (the harness's form; q = the last user message), as text
rendered with the policy's chat template (q is read back from it), or as plain text (then the text
itself starts the trajectory), never wrapped twice.

Rationales are one ``greedy`` call for all live problems and scoring one ``score_many`` call; with a
``seed``, candidates are one ``sample`` call per problem seeded by (seed, problem, step), so a
problem's candidates do not depend on the batch it runs in. Differences from the reference loop (spec
Section 7): stop detection right after the step is chosen; the scorer is configurable; seeds per
(seed, problem, step) for sampling and for the random choice.

One run makes one complete answer per problem: ``attempts`` is 1 (the attempt of
``strategies.budget``); the k candidate steps per step are in the trace (``candidates``) and the cost.
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

SCORING_CONTEXTS = ("reference", "inline")
# S_r: the scorer's system prompt in the reference's get_post_prob (JHU-CLSP/RATIONALYST,
# model_inference/evaluation_scripts/inference_no_length*.py), reworded.
SCORER_SYSTEM_PROMPT = (
    "Your task is to generate the text that comes next given the preceding text. Text enclosed in <BOT> and "
    "<EOT> tokens is a rationale that may or may not help you with what comes next."
)

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


def last_user_message(tokenizer, text: str) -> str | None:
    """The last user message of ``text`` if it is a prompt rendered with the tokenizer's chat template
    (ending with the generation header), else None.

    The user-turn header is the longest common suffix of what the template writes before a first and
    before a later user message; the generation tail is what it writes after the last one.
    """
    if not getattr(tokenizer, "chat_template", None):
        return None
    mark = "\u2063Q\u2063"
    render = lambda turns: tokenizer.apply_chat_template(turns, tokenize=False, add_generation_prompt=True)  # noqa: E731
    first = render([{"role": "user", "content": mark}])
    later = render([{"role": "user", "content": "x"}, {"role": "assistant", "content": "\u2063A\u2063"},
                    {"role": "user", "content": mark}])
    if first.count(mark) != 1 or later.count(mark) != 1:
        return None
    head, tail = first.split(mark)
    between = later.split("\u2063A\u2063")[-1].split(mark)[0]
    size = 0
    while size < min(len(head), len(between)) and head[-1 - size] == between[-1 - size]:
        size += 1
    header = head[len(head) - size:]
    if not header or not tail or not text.endswith(tail) or header not in text:
        return None
    return text[text.rindex(header) + len(header): len(text) - len(tail)]


def _derived_seed(*parts) -> int:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return int.from_bytes(digest[:4], "little") & 0x7FFFFFFF


@dataclass
class _Problem:
    """One problem's running state."""

    index: int
    key: str  # identifies the problem for its seeds: a digest of its prompt (and its repeat in the batch)
    prompt: str  # the rendered policy prompt
    trajectory: str  # "Question: q\nAnswer:" (or a plain-text prompt as given): the text before the steps
    steps: list[Completion] = field(default_factory=list)
    trace: list[dict] = field(default_factory=list)
    generated_tokens: int = 0
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
    ``scoring_context``: ``"reference"`` (default) or ``"inline"`` (see the module docstring);
    ``scorer_system_prompt``: S_r of the reference context.
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
        scoring_context: str = "reference",
        scorer_system_prompt: str = SCORER_SYSTEM_PROMPT,
        rationale_prompt: Callable | None = None,
        is_final: Callable[[str], bool] | None = None,
        seed: int | None = None,
        max_new_tokens: int = 2048,
        **options,
    ):
        super().__init__(max_new_tokens=max_new_tokens, **options)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise StrategyError(f"RationaleStepSearch needs k >= 1 candidates per step (an integer), got {k!r}")
        if scoring_context not in SCORING_CONTEXTS:
            raise StrategyError(f"unknown scoring_context {scoring_context!r}: choose one of {', '.join(SCORING_CONTEXTS)}")
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
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise StrategyError(f"{name} must be an integer >= 1, got {value!r}")
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
        self.scoring_context, self.scorer_system_prompt = scoring_context, scorer_system_prompt
        self.rationale_backend, self.scorer_backend = rationale_backend, scorer_backend
        self.rationale_prompt = rationale_prompt or default_rationale_prompt
        self.is_final = is_final or contains_answer_marker
        self._prefetched: dict = {}  # scores of the current step, computed for all problems at once

    takes_messages = True  # the eval harness hands over chat messages, which run() renders once

    @property
    def max_attempts(self) -> int:
        """One complete answer per problem (the attempt of ``strategies.budget``)."""
        return 1

    @property
    def candidates_per_step(self) -> int:
        return self.k

    # ------------------------------------------------------------------ run
    def run(self, backend, prompts, *, golds=None):
        check_golds(prompts, golds)
        chat = self.stop is None
        separator = chat_turn_separator(backend.tokenizer) if chat else ""
        scorer = self.scorer_backend or backend
        if self.mode != "random" and self.scoring_context == "reference" and not getattr(
                scorer.tokenizer, "chat_template", None):
            raise StrategyError("scoring_context='reference' scores each step as an assistant turn in the scorer's chat "
                                "template, and the scorer's tokenizer has none: use scoring_context='inline'")
        seen: dict[str, int] = {}
        problems = [self._problem(i, backend, p, seen) for i, p in enumerate(prompts)]
        for step in range(self.max_steps):
            live = [p for p in problems if p.finish is None]
            if not live:
                break
            self._step(step, live, backend, separator, chat)
        return [self._result(p, backend, separator) for p in problems]

    def _problem(self, index: int, backend, prompt, seen: dict[str, int]) -> _Problem:
        if isinstance(prompt, (list, tuple)) and prompt and all(isinstance(m, dict) for m in prompt):
            users = [m.get("content", "") for m in prompt if m.get("role") == "user"]
            if not users or not users[-1].strip():
                raise StrategyError(f"prompt {index}: the chat messages hold no user message with a question")
            text, question = backend.chat_prompt(list(prompt)), users[-1]
        else:
            text = prompt if isinstance(prompt, str) else backend.decode([int(t) for t in prompt])
            if not text:
                raise StrategyError(f"prompt {index} is empty")
            question = last_user_message(backend.tokenizer, text)  # a rendered chat: never wrap it again
        trajectory = text if question is None else f"Question: {question}\nAnswer:"
        digest = hashlib.sha256(text.encode()).hexdigest()[:16]
        seen[digest] = seen.get(digest, -1) + 1
        return _Problem(index, f"{digest}.{seen[digest]}", text, trajectory)

    def _block(self, rationale: str) -> str:
        return self.rationale_template.replace("{rationale}", rationale)

    def _step(self, step: int, live: list[_Problem], policy, separator: str, chat: bool) -> None:
        prefixes = [p.prompt + "".join(s.text + separator for s in p.steps) for p in live]
        rationales: list[str | None] = [None] * len(live)
        rationale_tokens = [0] * len(live)
        if self.mode != "random":
            rationale_backend = self.rationale_backend or policy
            requests = [self.rationale_prompt(rationale_backend, self._trajectory(p)) for p in live]
            outputs = rationale_backend.greedy(requests, max_new_tokens=self.max_rationale_tokens, stop=EOT)
            rationales = [strip_rationale_markers(o.text) for o in outputs]
            rationale_tokens = [o.num_tokens for o in outputs]
        if self.mode == "explicit":
            policy_prompts = [prefix + self._block(r) for prefix, r in zip(prefixes, rationales)]
        else:
            policy_prompts = prefixes
        options = dict(max_new_tokens=self.max_step_tokens, temperature=self.temperature, top_p=self.top_p,
                       stop=self.stop)
        if self.seed is None:
            samples = policy.sample(policy_prompts, self.k, **options)
        else:  # one call per problem, seeded by (seed, problem, step): independent of the batch it runs in
            samples = []
            for problem, prompt in zip(live, policy_prompts):
                rows = policy.sample([prompt], self.k, seed=_derived_seed(self.seed, problem.key, step), **options)
                if len(rows) != 1:
                    raise StrategyError(f"the policy returned {len(rows)} candidate lists for 1 prompt")
                samples.append(rows[0])
        if len(samples) != len(live):
            raise StrategyError(f"the policy returned {len(samples)} candidate lists for {len(live)} prompts")
        self._prefetched = self._prefetch_scores(live, prefixes, rationales, samples, policy)
        for problem, prefix, rationale, r_tokens, candidates in zip(live, prefixes, rationales, rationale_tokens,
                                                                    samples):
            self._choose(step, problem, prefix, rationale, r_tokens, list(candidates), policy)
        self._prefetched = {}

    def _trajectory(self, problem: _Problem) -> str:
        """``traj_t``: the trajectory's start and the chosen steps, each after one space (the reference's)."""
        return problem.trajectory + "".join(" " + s.text.strip() for s in problem.steps)

    def _contexts(self, problem: _Problem, prefix: str, rationale: str, scorer) -> dict[str, str]:
        """The scoring context per condition: "with" the rationale, and "without" it for pmi."""
        if self.scoring_context == "inline":
            contexts = {"with": prefix + self._block(rationale), "without": prefix}
        else:
            trajectory = self._trajectory(problem)
            turns = lambda user: [{"role": "system", "content": self.scorer_system_prompt},  # noqa: E731
                                  {"role": "user", "content": user}]
            contexts = {"with": scorer.chat_prompt(turns(trajectory + " " + self._block(rationale))),
                        "without": scorer.chat_prompt(turns(trajectory))}
        return contexts if self.score_fn == "pmi" else {"with": contexts["with"]}

    def _scored_text(self, candidate: Completion) -> str:
        """The candidate as the scorer sees it: in the reference context, an assistant turn's content
        (whitespace and the step boundary around it removed; a step of only whitespace as sampled),
        else the text as sampled."""
        if self.scoring_context == "inline":
            return candidate.text
        text = candidate.text
        for stop in self.stop or []:
            if text.endswith(stop):
                text = text[: -len(stop)]
                break
        return text.strip() or candidate.text

    def _eligible(self, candidates: list[Completion]) -> tuple[list[int], bool]:
        """Indices of the candidates that can be chosen, and whether they are truncated steps: the
        non-empty ones that reached a boundary, else (as the reference does) the non-empty truncated ones."""
        usable = [i for i, c in enumerate(candidates) if c.token_ids and c.text]
        finished = [i for i in usable if candidates[i].finish_reason != "length"]
        return (finished, False) if finished else (usable, bool(usable))

    def _prefetch_scores(self, live, prefixes, rationales, samples, policy) -> dict:
        """Score the usable candidates of every live problem in one ``score_many`` call (shared forwards
        across problems), keyed by (context, candidate texts); ``_score`` falls back to ``score``."""
        scorer = self.scorer_backend or policy
        if self.mode == "random" or not hasattr(scorer, "score_many"):
            return {}
        requests = []
        for problem, prefix, rationale, candidates in zip(live, prefixes, rationales, samples):
            eligible, _ = self._eligible(list(candidates))
            if not eligible or len(candidates) != self.k:
                continue  # _choose records or raises what went wrong, naming the problem
            texts = tuple(self._scored_text(candidates[i]) for i in eligible)
            requests.extend((context, texts) for context in self._contexts(problem, prefix, rationale, scorer).values())
        rows = scorer.score_many([(context, list(texts)) for context, texts in requests]) if requests else []
        return dict(zip(requests, rows))

    def _choose(self, step, problem, prefix, rationale, rationale_tokens, candidates, policy) -> None:
        where = f"problem {problem.index}, step {step + 1}"
        if not candidates:
            raise StrategyError(f"{where}: the policy produced an empty candidate list")
        if len(candidates) != self.k:
            raise StrategyError(f"{where}: the policy returned {len(candidates)} candidates, expected k={self.k}")
        eligible, truncated = self._eligible(candidates)
        entry = {"step": step + 1, "rationale": rationale, "candidates": [c.text for c in candidates],
                 "finish_reasons": [c.finish_reason for c in candidates], "eligible": eligible,
                 "truncated": truncated, "rationale_tokens": rationale_tokens,
                 "calls": {"rationale": 0 if rationale is None else 1, "sample": 1, "score": 0}}
        problem.generated_tokens += sum(c.num_tokens for c in candidates) + rationale_tokens
        if not eligible:  # every candidate is empty: the problem ends here, recorded, the run goes on
            entry.update(scores=None, chosen=None, finish="no_step")
            problem.trace.append(entry)
            problem.last_candidates, problem.last_scores, problem.finish = candidates, None, "no_step"
            return
        scores: list[float] | None = None
        if self.mode == "random":
            rng = _random.Random(f"{self.seed}:{problem.key}:{step}") if self.seed is not None else None
            chosen = rng.choice(eligible) if rng else eligible[int(torch.randint(len(eligible), ()))]
        else:
            scores, token_logprobs = self._score(where, problem, prefix, rationale, [candidates[i] for i in eligible],
                                                 policy)
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

    def _score(self, where, problem, prefix, rationale, candidates, policy):
        """Scores of the candidates (see the module docstring) and their per-token log-probs per condition."""
        scorer = self.scorer_backend or policy
        texts = [self._scored_text(c) for c in candidates]
        conditions = self._contexts(problem, prefix, rationale, scorer)
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
            generated_tokens=problem.generated_tokens, attempts=1,
        )


RationaleGuidedStepSearch = RationaleStepSearch  # the name used in the spec (Section 8.2)
