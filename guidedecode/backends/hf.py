"""``HFBackend``: the backend primitives on a Hugging Face causal LM and its tokenizer.

Sampling and greedy decoding go through ``model.generate`` (left-padded batches; n samples per prompt
from one prefill whose KV cache is expanded to the n rows; stop strings through transformers'
``StopStringCriteria``), so token guides passed as ``logits_processor`` apply to every step. Scoring
runs the token prefix that the candidates share once into a KV cache, then every candidate's remaining
tokens in one batched forward, and reads target log-probs from the hidden states through the LM head in
vocabulary chunks (``guidedecode.kernels.logprobs``): never a log-softmax over ``[N, T, V]``.
"""

from __future__ import annotations

import contextlib
import copy
import functools
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache, LogitsProcessorList, PreTrainedModel

from guidedecode.backends.base import BackendStats, Completion, ContinuationScore, Prompt
from guidedecode.backends.text import TokenizerPrompts, stop_list as _stop_list
from guidedecode import validation
from guidedecode.errors import StrategyError
from guidedecode.hf_compat import cache_argument
from guidedecode.kernels.logprobs import linear_target_logprobs, target_logprobs


class HFBackend(TokenizerPrompts):
    """Backend primitives for a transformers model.

    ``logits_processor``: token guides (or any ``LogitsProcessor``) applied while sampling.
    ``batch_size``: the most sequences one ``generate`` or scoring forward holds.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, logits_processor: Sequence | None = None):
        batch_size = validation.positive_int("batch_size", batch_size, error=StrategyError)
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.logits_processor = list(logits_processor or [])
        self.stats = BackendStats()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = eos_token_ids(model, tokenizer)
        self.deltas = None
        """A :class:`~guidedecode.deltas.DeltaInjector` with per-request-row deltas: each ``generate`` chunk
        selects its prompts' rows (``injector.window``); the injector's hooks must be attached."""

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ----------------------------------------------------------- sampling
    def sample(self, prompts, n=1, *, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        n = validation.positive_int("n", n, error=StrategyError)
        temperature = validation.temperature("temperature", temperature, error=StrategyError)  # 0: use greedy()
        top_p = validation.probability("top_p", top_p, error=StrategyError)
        top_k = validation.integer("top_k", top_k, minimum=0, error=StrategyError)
        validation.optional(validation.integer, "seed", seed, minimum=0, error=StrategyError)
        if seed is not None:
            torch.manual_seed(seed)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        return self._generate(prompts, n, max_new_tokens=max_new_tokens, stop=stop, options=options)

    def greedy(self, prompts, *, max_new_tokens=256, stop=None):
        results = self._generate(prompts, 1, max_new_tokens=max_new_tokens, stop=stop, options=dict(do_sample=False))
        return [row[0] for row in results]

    def _generate(self, prompts, n, *, max_new_tokens, stop, options) -> list[list[Completion]]:
        prompts = validation.prompts("prompts", prompts, error=StrategyError)  # a bare string is not a list
        max_new_tokens = validation.positive_int("max_new_tokens", max_new_tokens, error=StrategyError)
        stops = _stop_list(stop)
        encoded = [self.encode(p) for p in prompts]
        per_call = max(1, self.batch_size // n)
        results: list[list[Completion]] = []
        for start in range(0, len(encoded), per_call):
            chunk = encoded[start : start + per_call]
            input_ids, attention_mask = self._left_pad(chunk)
            for guide in self.logits_processor:
                if hasattr(guide, "reset"):
                    guide.reset()
            rows = self.deltas.window(start, start + len(chunk)) if self.deltas is not None and \
                self.deltas.rows is not None else contextlib.nullcontext()
            shared = self._shares_prefill(n, input_ids)
            with rows:
                output = self._generate_chunk(input_ids, attention_mask, n, max_new_tokens, stops, options, shared)
            generated = output[:, input_ids.shape[1] :].tolist()
            if shared:  # all but the last prompt token once, then the last token on each of the n rows
                self.stats.count_generate(prompt_tokens=sum(len(row) - 1 for row in chunk) + n * len(chunk),
                                          steps=output.shape[1] - input_ids.shape[1] + 1)
            else:
                self.stats.count_generate(prompt_tokens=n * sum(len(row) for row in chunk),
                                          steps=output.shape[1] - input_ids.shape[1])
            figures = self._guide_figures(len(generated))
            for i in range(len(chunk)):
                rows = generated[i * n : (i + 1) * n]
                completions = [self._completion(row, stops, max_new_tokens) for row in rows]
                for j, completion in enumerate(completions):
                    completion.info.update({key: values[i * n + j] for key, values in figures.items()})
                results.append(completions)
        self.stats.count_generate(generated_tokens=sum(c.num_tokens for row in results for c in row), calls=1)
        return results

    share_prefill: bool = True
    """``n > 1`` samples per prompt: run each prompt once into a KV cache and expand the cache to its ``n``
    rows, instead of ``generate(num_return_sequences=n)``, which prefills every one of the ``n`` rows
    (best-of-8 on a 900-token prompt: 900 prompt tokens instead of 7,200). ``False`` restores the latter."""

    def _shares_prefill(self, n: int, input_ids: torch.Tensor) -> bool:
        config = getattr(self.model, "config", None)
        return (n > 1 and self.share_prefill and input_ids.shape[1] > 1 and isinstance(self.model, PreTrainedModel)
                and not getattr(config, "is_encoder_decoder", False))

    def _generate_chunk(self, input_ids, attention_mask, n, max_new_tokens, stops, options, shared=False):
        """One ``generate`` call for the chunk's prompts, ``n`` rows each (prompt ``i``'s rows ``i*n .. i*n+n-1``).

        Shared prefill: prompts minus their last token go through the model once into a ``DynamicCache``
        (positions ``cumsum(mask) - 1``, as ``generate`` computes them), the cache is repeated ``n`` times per
        row (``batch_repeat_interleave``, the row order of ``num_return_sequences``) and ``generate`` gets
        the full repeated prompts with that cache: it feeds only the uncached last token of each row, and
        logits processors (token guides) still see every row's whole history in ``input_ids``. Sampling
        draws the same random numbers as ``num_return_sequences`` (same rows, same order, same steps).
        """
        kwargs = dict(
            max_new_tokens=max_new_tokens,
            pad_token_id=self.pad_token_id,
            eos_token_id=list(self.eos_token_ids),
            stop_strings=stops or None,
            tokenizer=self.tokenizer if stops else None,
            logits_processor=LogitsProcessorList(self.logits_processor),
            **options,
        )
        if not shared:
            return self.model.generate(input_ids=input_ids, attention_mask=attention_mask, num_return_sequences=n,
                                       **kwargs)
        head, head_mask = input_ids[:, :-1], attention_mask[:, :-1]
        cache = {cache_argument(self.model): DynamicCache(config=self.model.config)}
        positions = (head_mask.long().cumsum(-1) - 1).masked_fill(head_mask == 0, 1)
        with torch.no_grad():
            self.model(input_ids=head, attention_mask=head_mask, position_ids=positions, use_cache=True,
                       logits_to_keep=1, **cache)
        next(iter(cache.values())).batch_repeat_interleave(n)
        return self.model.generate(input_ids=input_ids.repeat_interleave(n, dim=0),
                                   attention_mask=attention_mask.repeat_interleave(n, dim=0),
                                   num_return_sequences=1, **cache, **kwargs)

    def _guide_figures(self, rows: int) -> dict[str, list[float]]:
        """Per-row figures of the last ``generate`` from guides that report them (Q#: ``sequence_kl()``)."""
        figures = {}
        for guide in self.logits_processor:
            if hasattr(guide, "sequence_kl") and getattr(guide, "state", None) is not None:
                for key, values in guide.sequence_kl().items():
                    if len(values) == rows:
                        figures[key] = [float(v) for v in values]
        return figures

    def _left_pad(self, rows: list[list[int]]):
        return left_pad(rows, self.pad_token_id, self.device)

    # ------------------------------------------------------------ scoring
    score_kernel_backend: str | None = None
    """Backend for ``guidedecode.kernels.logprobs``: ``None`` = Triton on CUDA, torch otherwise
    (the CPU interpreter is a test device, far too slow for real vocabularies); or ``"auto"``,
    ``"triton"``, ``"torch"`` as in :func:`~guidedecode.kernels.logprobs.target_logprobs`."""
    score_suffix_padding: str = "right"
    """Side on which candidate suffixes are padded in the batched forward (``"right"`` or ``"left"``);
    the scores do not depend on it (positions and masks follow each token), tests check both."""

    @torch.no_grad()
    def score(self, prefix: Prompt, continuations: Sequence[Prompt]) -> list[ContinuationScore]:
        """Per-token log p(c_t | prefix, c_<t) for each continuation (teacher forced, batched).

        Each candidate is ``join(prefix, c)``: token ids and the index of its first continuation
        token. The longest common token prefix of the joined candidates (at most up to the earliest
        continuation start) is run once at batch 1 into a KV cache; the cache is expanded to the
        candidates and their remaining tokens run right-padded in one forward per ``batch_size``
        candidates. The log-prob of token ``t`` comes from the hidden state at ``t - 1`` (for the
        first continuation token this may be the last shared-prefix position) through the LM head,
        folded in vocabulary chunks by :func:`~guidedecode.kernels.logprobs.linear_target_logprobs`:
        ``log p(x_t) = h_{t-1}·w_{x_t}/T - logsumexp_v(h_{t-1}·w_v/T)``, never a ``[N, T, V]``
        log-softmax. Architectures whose final logits cannot be reproduced from the LM head
        (e.g. Gemma-2 soft-capping) use the model's logits and
        :func:`~guidedecode.kernels.logprobs.target_logprobs` instead (:attr:`scoring_plan`).

        Prefix sharing is the idea of Hydragen (Juravsky et al., 2024, "Hydragen: High-Throughput LLM
        Inference with Shared Prefixes") done with a plain KV cache; the vocabulary-chunked head follows
        Liger-Kernel's fused linear cross-entropy (Hsu et al., 2024, arXiv:2410.10989).
        """
        (scores,) = self._score_requests([(prefix, continuations)])
        return scores

    @torch.no_grad()
    def score_many(
        self, requests: Sequence[tuple[Prompt, Sequence[Prompt]]]
    ) -> list[list[ContinuationScore]]:
        """``[score(prefix, continuations) for prefix, continuations in requests]`` in shared forwards.

        Up to ``batch_size`` prefixes run together (left-padded), and candidates of different
        requests share the batched suffix forwards: strategies that score many problems at once
        (beam search, RATIONALYST) pay one forward per ``batch_size`` candidates, not one per problem.
        """
        return self._score_requests(requests)

    @functools.cached_property
    def scoring_plan(self) -> ScoringPlan:
        """How hidden states become log-probs for this model (resolved and verified once)."""
        return _resolve_scoring_plan(self.model)

    def _score_requests(self, requests) -> list[list[ContinuationScore]]:
        if self.score_suffix_padding not in ("right", "left"):
            raise StrategyError(f"score_suffix_padding must be 'right' or 'left', got {self.score_suffix_padding!r}")
        units: list[_SharedPrefix] = []
        results: list[list[ContinuationScore | None]] = []
        for r, request in enumerate(requests):
            if not (isinstance(request, (tuple, list)) and len(request) == 2):
                raise StrategyError(f"score_many takes (prefix, continuations) pairs, got {type(request).__name__}")
            prefix, continuations = request
            if isinstance(continuations, (str, bytes)) or not isinstance(continuations, Sequence):
                raise StrategyError(
                    "continuations must be a list of prompts (strings or token-id lists), "
                    f"got {type(continuations).__name__}"
                )
            rows = [_Candidate(r, c, *self.join(prefix, cont)) for c, cont in enumerate(continuations)]
            results.append([None] * len(rows))
            units.extend(_shared_prefix_units(rows))
        plan = self.scoring_plan
        for start in range(0, len(units), self.batch_size):
            for cand, score in self._score_units(units[start : start + self.batch_size], plan):
                results[cand.request][cand.index] = score
        self.stats.score_calls += 1
        self.stats.scored_tokens += sum(len(s.token_ids) for row in results for s in row)
        return results

    def _score_units(self, units: list[_SharedPrefix], plan: ScoringPlan):
        """Score the candidates of up to ``batch_size`` shared prefixes; yields (candidate, score)."""
        rows = [(g, cand) for g, unit in enumerate(units) for cand in unit.candidates]
        if all(len(cand.ids) == cand.first for _, cand in rows):  # nothing to score: no forward
            for _, cand in rows:
                yield cand, ContinuationScore(token_ids=[], logprobs=torch.zeros(0))
            return
        prefix_ids, prefix_mask = self._left_pad([unit.candidates[0].ids[: unit.length] for unit in units])
        positions = (prefix_mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache(config=self.model.config)
        last = self._forward(plan, prefix_ids, prefix_mask, positions, cache, last_only=True)  # [G, H or V]
        self.stats.prompt_tokens += sum(unit.length for unit in units)
        for start in range(0, len(rows), self.batch_size):
            chunk = rows[start : start + self.batch_size]
            is_last_chunk = start + self.batch_size >= len(rows)
            # the last chunk may consume the prefix cache; earlier ones expand a copy of it
            chunk_cache = cache if is_last_chunk else copy.deepcopy(cache)
            yield from self._score_chunk(plan, units, chunk, last, prefix_mask, chunk_cache)

    def _score_chunk(self, plan, units, chunk, last, prefix_mask, cache):
        """One batched forward of the candidates' suffixes after their (expanded) shared prefixes.

        Candidate ``r`` with shared length ``P``, tokens ``ids`` and continuation start ``f``:
        the suffix fed is ``ids[P : len - 1]`` (the last token predicts nothing) at positions
        ``P, P+1, ...``; token ``ids[t]`` for ``t >= f`` is scored from the hidden state at
        ``t - 1``, which is the prefix's last state when ``t == P`` and suffix slot ``t - 1 - P``
        otherwise.
        """
        device = self.device
        n = len(chunk)
        group = torch.tensor([g for g, _ in chunk], device=device)
        shared = [units[g].length for g, _ in chunk]
        fed = [max(len(cand.ids) - 1 - p, 0) for (_, cand), p in zip(chunk, shared)]
        width = max(fed)
        # scoring from the last shared-prefix position: the first continuation token when f == P
        keep0 = [cand.first == p and len(cand.ids) > p for (_, cand), p in zip(chunk, shared)]
        targets0 = torch.tensor([cand.ids[p] for (_, cand), p, k in zip(chunk, shared, keep0) if k], dtype=torch.long)
        keep0 = torch.tensor(keep0, dtype=torch.bool)
        # scoring from suffix slots
        suffix = torch.full((n, width), self.pad_token_id, dtype=torch.long)
        suffix_mask = torch.zeros((n, width), dtype=torch.long)
        positions = torch.zeros((n, width), dtype=torch.long)
        keep = torch.zeros((n, width), dtype=torch.bool)
        targets = torch.full((n, width), _IGNORE, dtype=torch.long)
        for r, ((_, cand), p, s) in enumerate(zip(chunk, shared, fed)):
            if s == 0:
                continue
            off = 0 if self.score_suffix_padding == "right" else width - s
            suffix[r, off : off + s] = torch.tensor(cand.ids[p : p + s])
            suffix_mask[r, off : off + s] = 1
            positions[r, off : off + s] = torch.arange(p, p + s)
            j0 = max(cand.first - p - 1, 0)  # first slot whose next token belongs to the continuation
            keep[r, off + j0 : off + s] = True
            targets[r, off + j0 : off + s] = torch.tensor(cand.ids[p + j0 + 1 : p + s + 1])
        hidden = None
        if width > 0:
            cache.batch_select_indices(group)
            hidden = self._forward(
                plan,
                suffix.to(device),
                torch.cat([prefix_mask[group], suffix_mask.to(device)], dim=1),
                positions.to(device),
                cache,
                last_only=False,
            )  # [n, width, H or V]
            self.stats.prompt_tokens += sum(fed)
        lp0, lp = self._target_logprobs(plan, last[group[keep0.to(device)]], targets0, hidden, keep, targets)
        first_lp = torch.zeros(n)
        first_lp[keep0] = lp0
        suffix_lp = torch.zeros((n, width))
        suffix_lp[keep] = lp
        for r, (_, cand) in enumerate(chunk):
            logprobs = torch.cat([first_lp[r : r + 1][keep0[r : r + 1]], suffix_lp[r][keep[r]]])
            yield cand, ContinuationScore(token_ids=cand.ids[cand.first :], logprobs=logprobs)

    def _forward(self, plan, input_ids, attention_mask, position_ids, cache, *, last_only: bool) -> torch.Tensor:
        """Hidden states after the final norm (fused plan) or logits (fallback); ``[B, H|V]`` if ``last_only``."""
        inputs = dict(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            use_cache=True,
        )
        inputs[cache_argument(self.model)] = cache  # `cache=` from transformers 5.24, `past_key_values=` before
        self.stats.forward_passes += 1
        if plan.fused:
            out = self.model.base_model(**inputs).last_hidden_state
        else:
            out = self.model(**inputs, logits_to_keep=1 if last_only else 0).logits
        return out[:, -1] if last_only else out

    def _target_logprobs(self, plan, first_out, first_targets, suffix_out, keep, suffix_targets):
        """fp32 CPU log-probs of the kept first-token rows and of the kept suffix slots."""
        device = self.device
        backend = self.score_kernel_backend or ("auto" if device.type == "cuda" else "torch")
        first_targets = first_targets.to(device)
        if plan.fused:  # one pass over the LM head for every scored row of the chunk
            head = self.model.get_output_embeddings()
            rows = [first_out] if suffix_out is None else [first_out, suffix_out[keep.to(device)]]
            wanted = [first_targets] if suffix_out is None else [first_targets, suffix_targets[keep].to(device)]
            lp = linear_target_logprobs(
                torch.cat(rows),
                head.weight,
                torch.cat(wanted),
                bias=head.bias,
                temperature=plan.temperature,
                ignore_index=_IGNORE,
                backend=backend,
            ).cpu()
            return lp[: len(first_targets)], lp[len(first_targets) :]
        lp0 = target_logprobs(first_out, first_targets, ignore_index=_IGNORE, backend=backend).cpu()
        if suffix_out is None:
            return lp0, torch.zeros(0)
        lp = target_logprobs(suffix_out, suffix_targets.to(device), ignore_index=_IGNORE, backend=backend).cpu()
        return lp0, lp[keep]


# ---------------------------------------------------------------------------------- scoring helpers

_IGNORE = -100  # target id of positions that are not scored (prompt, padding)
# Config attributes some architectures multiply or divide the LM-head logits by (Granite, Cohere,
# Falcon-H1, MiniCPM3, HyperCLOVA X): a temperature of the fused kernel; which one the probe decides.
_LOGIT_SCALE_ATTRS = ("logits_scaling", "logit_scale", "lm_head_multiplier")


@dataclass(frozen=True)
class ScoringPlan:
    """How ``HFBackend.score`` turns the model's outputs into target log-probs.

    ``fused``: base-model hidden states (after the final norm) go through the LM head in vocabulary
    chunks (``linear_target_logprobs``) with ``softmax(h·W^T / temperature)``. Otherwise the model's
    own logits are read row by row (``target_logprobs``), for heads that are not a plain linear
    layer or final logit processing a temperature cannot express (soft-capping).
    """

    fused: bool
    temperature: float
    reason: str


@dataclass
class _Candidate:
    request: int  # index of the (prefix, continuations) request
    index: int  # index of the continuation in its request
    ids: list[int]  # joined prefix + continuation tokens
    first: int  # index of the first continuation token


@dataclass
class _SharedPrefix:
    candidates: list[_Candidate]
    length: int  # tokens ids[:length] are common to every candidate and run once


def _shared_prefix_units(candidates: list[_Candidate]) -> list[_SharedPrefix]:
    """The longest common token prefix of the joined candidates, capped at the earliest continuation start.

    Capping keeps the hidden state that scores each candidate's first token inside the shared
    prefix or its own suffix. Candidates that disagree on the very first token (a text prefix
    tokenised differently in each join) share nothing and are scored as their own units.
    """
    if not candidates:
        return []
    reference = candidates[0].ids
    length = min(c.first for c in candidates)
    for cand in candidates[1:]:
        k = 0
        while k < length and cand.ids[k] == reference[k]:
            k += 1
        length = k
    if length == 0:
        return [_SharedPrefix([cand], cand.first) for cand in candidates]
    return [_SharedPrefix(candidates, length)]


def _resolve_scoring_plan(model) -> ScoringPlan:
    """Pick the fused LM-head path when it reproduces the model's log-probs, else the logits path.

    The fused path needs a ``PreTrainedModel`` with a separate base model, a plain ``nn.Linear``
    output embedding (tied or not: its weight is the one the model uses) and no soft-capping. A
    probe forward then checks ``log_softmax(base(x)·W^T / T)`` against ``log_softmax(model(x).logits)``
    for T = 1 and, if the config names a logit scale s, T = s or 1/s; the first match wins, and an
    unexplained difference (logit processing this code does not know) selects the logits path.
    """
    if not isinstance(model, PreTrainedModel):
        return ScoringPlan(False, 1.0, f"{type(model).__name__} is not a transformers PreTrainedModel: model logits")
    head = model.get_output_embeddings()
    if model.base_model is model or type(head) is not torch.nn.Linear:
        return ScoringPlan(False, 1.0, "no plain linear LM head over a separate base model: model logits")
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    cap = getattr(config, "final_logit_softcapping", None)
    if cap:
        return ScoringPlan(False, 1.0, f"final_logit_softcapping={cap} (tanh) is not a linear head: model logits")
    temperatures = [1.0]
    for name in _LOGIT_SCALE_ATTRS:
        scale = getattr(config, name, None)
        if isinstance(scale, (int, float)) and not isinstance(scale, bool) and scale > 0 and scale != 1:
            temperatures = [float(scale), 1.0 / scale, 1.0]
            break
    weight = head.weight
    probe = (torch.arange(1, 6, device=weight.device) * 7919 % weight.shape[0])[None]
    with torch.no_grad():
        try:
            reference = torch.log_softmax(model(input_ids=probe).logits[0].float(), -1)
            hidden = model.base_model(input_ids=probe).last_hidden_state[0]
        except (TypeError, ValueError, AttributeError, RuntimeError) as exc:
            return ScoringPlan(False, 1.0, f"probe forward of the base model failed ({exc}): model logits")
        logits = torch.nn.functional.linear(hidden, weight, head.bias).float()
    tolerance = 1e-4 if weight.dtype == torch.float32 else 2e-2
    for temperature in temperatures:
        error = (torch.log_softmax(logits / temperature, -1) - reference).abs().max().item()
        if error <= tolerance:
            reason = f"linear LM head, temperature {temperature:g} (probe error {error:.1e})"
            return ScoringPlan(True, temperature, reason)
    reason = "the LM head does not reproduce the model's logits (unknown logit processing): model logits"
    return ScoringPlan(False, 1.0, reason)



def left_pad(rows: Sequence[Sequence[int]], pad_token_id: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Token-id rows as a left-padded ``[B, T]`` batch and its attention mask (1 on real tokens)."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, row in enumerate(rows):
        ids[i, width - len(row) :] = torch.tensor(list(row), dtype=torch.long)
        mask[i, width - len(row) :] = 1
    return ids.to(device), mask.to(device)


def eos_token_ids(model, tokenizer) -> tuple[int, ...]:
    """The full end-of-sequence set: ``generation_config.eos_token_id`` (an int or a list) plus the
    tokenizer's own EOS (Llama-3-style models stop on several ids)."""
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(t) for t in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))
