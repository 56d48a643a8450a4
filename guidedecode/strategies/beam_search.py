"""Beam search over reasoning steps (step-level, any scorer) and HF token-level beam search.

``BeamSearch`` (step level). A *step* is a continuation up to the stop string ``step_stop``
(default ``"\\n\\n"``), EOS or ``max_step_tokens``. With beam width W and E expansions per beam:

    beams_0 = {empty partial solution}
    repeat up to max_steps times:
        children = {b + s : b in active beams, s ~ pi(. | x, b), E samples each}   (duplicates dropped)
        score(x, c) for every child c: the scorer on the whole partial solution (default: its mean
            token log-prob (1/|c|) sum_t log pi(c_t | x, c_<t))
        keep the top W - |finished| children (ties: earlier beam, then earlier sample); a kept child
            that ended with EOS, passes ``final_answer(text)`` or reached ``max_new_tokens`` is finished
    unfinished beams after max_steps are finished as they are

so at most W complete solutions come back, ranked by score. They are the attempts (budget W): with an
oracle (``check=`` and golds) they are judged best first and the run stops at the first correct one
(the FTTT "any returned beam is correct" pick, arXiv 2502.15771); the chosen completion is that one,
else the best-scored beam. Sampling is batched over every (problem, beam) pair of a step.

``TokenBeamSearch`` is the FTTT reference baseline: transformers' token beam search
(``num_beams = num_return_sequences = W``, no sampling) on an ``HFBackend``; on out-of-memory it
halves W and retries, and records the effective width in the trace.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from guidedecode.backends.base import Completion
from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy
from guidedecode.strategies.budget import AttemptLog, check_budget, oracle_golds
from guidedecode.strategies.scorers import MeanLogProbScorer


@dataclass
class _Beam:
    token_ids: list[int]
    text: str
    score: float = 0.0
    reason: str = ""  # why a finished beam ended: "eos", "final", "length", "max_steps"
    steps: int = 0

    def completion(self) -> Completion:
        finish = "length" if self.reason in ("length", "max_steps") else "eos" if self.reason == "eos" else "stop"
        return Completion(text=self.text, token_ids=list(self.token_ids), finish_reason=finish)


def has_boxed_answer(text: str) -> bool:
    """A ``final_answer`` rule for math: the partial solution already holds a complete ``\\boxed{...}``."""
    from guidedecode.tasks.extract import extract_boxed

    return extract_boxed(text) is not None


class BeamSearch(StepStrategy):
    """Step-level beam search: ``width`` beams, ``expansions`` sampled steps per beam, a scorer ranks them.

    ``scorer(backend, prompt, completions, gold) -> list[float]`` (see ``strategies.scorers``) scores
    whole partial solutions; ``check(text, gold) -> bool`` is the oracle for the attempt accounting;
    ``final_answer(text) -> bool`` marks a partial solution as finished (e.g. :func:`has_boxed_answer`;
    default: only EOS, ``max_new_tokens`` and ``max_steps`` end a beam).
    Needs a backend with ``encode`` and ``decode`` (token-exact partial solutions).
    """

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``width``."""
        return self.width

    def __init__(self, width: int = 4, expansions: int = 4, *, scorer=None, check: Callable | None = None,
                 step_stop: str | list[str] | None = "\n\n", max_steps: int = 16, max_step_tokens: int = 128,
                 final_answer: Callable[[str], bool] | None = None, temperature: float = 0.7, top_p: float = 1.0,
                 seed: int | None = None, **options):
        super().__init__(**options)
        self.width = check_budget(width, "width", "BeamSearch")
        self.expansions = check_budget(expansions, "expansions", "BeamSearch")
        self.max_steps = check_budget(max_steps, "max_steps", "BeamSearch")
        self.max_step_tokens = check_budget(max_step_tokens, "max_step_tokens", "BeamSearch")
        if temperature <= 0:
            raise StrategyError(f"BeamSearch samples its expansions: temperature must be > 0, got {temperature}")
        self.scorer = scorer or MeanLogProbScorer()
        self.check, self.step_stop, self.final_answer = check, step_stop, final_answer
        self.temperature, self.top_p, self.seed = temperature, top_p, seed

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "BeamSearch")
        prompt_ids = [backend.encode(p) for p in prompts]
        active: list[list[_Beam]] = [[_Beam([], "")] for _ in prompts]
        finished: list[list[_Beam]] = [[] for _ in prompts]
        generated = [0] * len(prompts)
        steps_run = 0
        for step in range(1, self.max_steps + 1):
            jobs = [(p, beam) for p in range(len(prompts)) for beam in active[p]]
            if not jobs:
                break
            steps_run = step
            seed = None if self.seed is None else self.seed * 1_000_003 + step
            rows = backend.sample([prompt_ids[p] + beam.token_ids for p, beam in jobs], self.expansions,
                                  max_new_tokens=self.max_step_tokens, temperature=self.temperature,
                                  top_p=self.top_p, stop=self.step_stop, seed=seed)
            children: list[list[_Beam]] = [[] for _ in prompts]
            seen: list[set] = [set() for _ in prompts]
            for (p, beam), row in zip(jobs, rows):
                for step_completion in row:
                    generated[p] += step_completion.num_tokens
                    child = self._extend(backend, beam, step_completion, step)
                    if tuple(child.token_ids) not in seen[p]:
                        seen[p].add(tuple(child.token_ids))
                        children[p].append(child)
            for p in range(len(prompts)):
                active[p] = []
                if not children[p]:
                    continue
                completions = [child.completion() for child in children[p]]
                scores = [float(s) for s in self.scorer(backend, prompt_ids[p], completions, golds[p])]
                if len(scores) != len(children[p]):
                    raise StrategyError(f"the scorer returned {len(scores)} scores for {len(children[p])} candidates")
                order = sorted(range(len(children[p])), key=lambda i: (-scores[i], i))
                for i in order[: self.width - len(finished[p])]:
                    child = children[p][i]
                    child.score = scores[i]
                    (finished[p] if child.reason else active[p]).append(child)
        for p in range(len(prompts)):
            for beam in active[p]:
                beam.reason = "max_steps"
                finished[p].append(beam)
        return [self._result(finished[p], golds[p], generated[p], steps_run) for p in range(len(prompts))]

    def _extend(self, backend, beam: _Beam, step: Completion, step_index: int) -> _Beam:
        token_ids = beam.token_ids + step.token_ids
        reason = ""
        if len(token_ids) >= self.max_new_tokens:
            token_ids, reason = token_ids[: self.max_new_tokens], "length"
        text = backend.decode(token_ids)
        if step.finish_reason == "eos":
            reason = "eos"
        elif self.final_answer is not None and self.final_answer(text):
            reason = "final"
        return _Beam(token_ids, text, reason=reason, steps=step_index)

    def _result(self, beams: list[_Beam], gold, generated: int, steps: int):
        ranked = sorted(beams, key=lambda b: -b.score)  # stable: ties keep the order they finished in
        if not ranked:
            raise StrategyError("BeamSearch ended with no beam (the backend returned no samples)")
        completions = [b.completion() for b in ranked]
        log = AttemptLog(len(ranked), check=self.check, gold=gold)
        for beam, completion in zip(ranked, completions):
            log.add(completion, score=beam.score, reason=beam.reason, steps=beam.steps)
            if log.done:
                break
        chosen = completions[log.solved_at - 1] if log.solved_at is not None else completions[0]
        head = [{"width": self.width, "expansions": self.expansions, "steps": steps}]
        return log.result(chosen, generated_tokens=generated, candidates=completions,
                          scores=[b.score for b in ranked], head=head)


class TokenBeamSearch(StepStrategy):
    """transformers' token beam search, W beams returned, as the FTTT beam-search baseline (HF only).

    Each prompt gets one ``generate(num_beams=W, num_return_sequences=W, do_sample=False)`` call; on
    ``torch.OutOfMemoryError`` W is halved (down to 1) and the call retried. The returned beams, best
    first, are the attempts: with an oracle the first correct one is chosen (oracle pick), else the top
    beam. The trace head records ``{"width": W, "effective_width": W_used}``.
    """

    temperature, top_p = 0.0, 1.0  # no sampling: deterministic beam search (what an eval run records)

    @property
    def max_attempts(self) -> int:
        """The attempt budget (complete answers per problem, see ``strategies.budget``): ``width``."""
        return self.width

    def __init__(self, width: int = 32, *, check: Callable | None = None, stop=None, length_penalty: float = 1.0,
                 **options):
        super().__init__(**options)
        self.width = check_budget(width, "width", "TokenBeamSearch")
        self.check, self.stop, self.length_penalty = check, stop, length_penalty

    def run(self, backend, prompts, *, golds=None):
        golds = oracle_golds(prompts, golds, self.check, "TokenBeamSearch")
        if not hasattr(backend, "model") or not hasattr(backend, "_completion"):
            raise StrategyError("TokenBeamSearch needs an HFBackend (transformers beam search)")
        results = []
        for prompt, gold in zip(prompts, golds):
            width = self.width
            while True:
                try:
                    completions = self._beams(backend, backend.encode(prompt), width)
                    break
                except torch.OutOfMemoryError:
                    if width == 1:
                        raise
                    width //= 2
                    if torch.cuda.is_available():
                        torch.cuda.empty_cache()
            log = AttemptLog(len(completions), check=self.check, gold=gold)
            for rank, completion in enumerate(completions):
                log.add(completion, rank=rank)
                if log.done:
                    break
            chosen = completions[log.solved_at - 1] if log.solved_at is not None else completions[0]
            results.append(log.result(chosen, generated_tokens=sum(c.num_tokens for c in completions),
                                      candidates=completions,
                                      head=[{"width": self.width, "effective_width": width}]))
        return results

    @torch.no_grad()
    def _beams(self, backend, prompt_ids: list[int], width: int) -> list[Completion]:
        from guidedecode.backends.hf import _stop_list

        stops = _stop_list(self.stop)
        input_ids = torch.tensor([prompt_ids], dtype=torch.long, device=backend.device)
        output = backend.model.generate(
            input_ids=input_ids, attention_mask=torch.ones_like(input_ids), max_new_tokens=self.max_new_tokens,
            num_beams=width, num_return_sequences=width, do_sample=False, length_penalty=self.length_penalty,
            pad_token_id=backend.pad_token_id, eos_token_id=list(backend.eos_token_ids),
            stop_strings=stops or None, tokenizer=backend.tokenizer if stops else None,
        )
        rows = output[:, input_ids.shape[1]:].tolist()
        completions = [backend._completion(row, stops, self.max_new_tokens) for row in rows]
        backend.stats.count_generate(prompt_tokens=width * len(prompt_ids),  # the prompt is expanded to every beam
                                     steps=output.shape[1] - input_ids.shape[1],
                                     generated_tokens=sum(c.num_tokens for c in completions), calls=1)
        return completions
