"""``VLLMBackend``: the backend primitives on a ``vllm.LLM`` engine.

Every step strategy written against :class:`~guidedecode.backends.base.Backend` runs on it unchanged:

* ``sample(prompts, n)`` is one ``LLM.generate`` call with ``SamplingParams(n=n)``: vLLM prefills each
  prompt once and its prefix cache shares it between the n samples and later calls;
* ``greedy`` is the same at temperature 0; a seeded ``sample`` gives each prompt its own seed
  (:func:`prompt_seed`): the random draws of a call do not depend on what else the engine runs (the
  logits can still differ in the last bits with the batch's composition, e.g. on GPUs);
* ``score(prefix, continuations)`` reads ``prompt_logprobs`` of ``prefix + continuation`` over the
  continuation's span, with the token boundary of :meth:`TokenizerPrompts.join` (the one ``HFBackend``
  uses), so both backends score the same tokens.

Completions are cut exactly as ``HFBackend`` cuts them (EOS dropped, the first stop string kept in the
text: :meth:`TokenizerPrompts._completion`). Token guides that run inside the engine are vLLM logits
processors (:mod:`guidedecode.vllm.processors`), given to ``vllm.LLM(logits_processors=[...])``; their
per-request settings go in ``extra_args``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import torch

from guidedecode import validation
from guidedecode.backends.base import BackendStats, Completion, ContinuationScore, Prompt
from guidedecode.backends.text import TokenizerPrompts, stop_list
from guidedecode.errors import StrategyError

__all__ = ["VLLMBackend"]


class VLLMBackend(TokenizerPrompts):
    """Backend primitives for a ``vllm.LLM`` (any runner, any device vLLM supports).

    ``extra_args``: ``SamplingParams.extra_args`` sent with every sampling request (e.g.
    ``{"qsharp_eta": 3.0}`` for an engine built with ``logits_processors=[guidedecode.vllm.QSharp]``).
    ``lora_request``: a ``vllm.lora.request.LoRARequest`` applied to every request, or a list with one per
    prompt of each call (``None`` entries: the base model) - a weight delta served as a LoRA adapter
    (:func:`guidedecode.deltas.export.export_lora` writes one; the engine needs ``enable_lora=True``).
    """

    def __init__(self, llm, *, tokenizer=None, extra_args: dict | None = None, lora_request=None):
        from vllm import LLM

        if not isinstance(llm, LLM):
            raise StrategyError(f"VLLMBackend needs a vllm.LLM, got {type(llm).__name__}")
        self.llm = llm
        self.tokenizer = tokenizer if tokenizer is not None else llm.get_tokenizer()
        self.extra_args = dict(extra_args or {})
        self.lora_request = lora_request
        self.stats = BackendStats()
        self.pad_token_id = (self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None
                             else self.tokenizer.eos_token_id)
        self.eos_token_ids = _eos_token_ids(llm, self.tokenizer)

    # ----------------------------------------------------------------------------------- sampling
    def sample(self, prompts, n=1, *, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        n = validation.positive_int("n", n, error=StrategyError)  # the same checks as HFBackend.sample
        temperature = validation.temperature("temperature", temperature, error=StrategyError)  # 0: use greedy()
        top_p = validation.probability("top_p", top_p, error=StrategyError)
        top_k = validation.integer("top_k", top_k, minimum=0, error=StrategyError)
        validation.optional(validation.integer, "seed", seed, minimum=0, error=StrategyError)
        return self._generate(prompts, n, max_new_tokens=max_new_tokens, stop=stop,
                              options=dict(temperature=float(temperature), top_p=float(top_p), top_k=int(top_k),
                                           seed=seed))

    def greedy(self, prompts, *, max_new_tokens=256, stop=None):
        results = self._generate(prompts, 1, max_new_tokens=max_new_tokens, stop=stop, options=dict(temperature=0.0))
        return [row[0] for row in results]

    def _generate(self, prompts, n, *, max_new_tokens, stop, options) -> list[list[Completion]]:
        from vllm import SamplingParams

        if isinstance(prompts, (str, bytes)):
            raise StrategyError("prompts must be a list of prompts (a single string was given)")
        stops = stop_list(stop)
        encoded = [self.encode(p) for p in prompts]
        seed = options.pop("seed", None)
        common = dict(n=n, max_tokens=max_new_tokens, stop=stops or None, include_stop_str_in_output=True,
                      skip_special_tokens=False, extra_args=dict(self.extra_args) or None, **options)
        if seed is None:
            params = SamplingParams(**common)
        else:  # one stream per prompt (one seed for all would give every prompt the same random draws)
            params = [SamplingParams(**common, seed=prompt_seed(seed, i)) for i in range(len(encoded))]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids in encoded], params, use_tqdm=False,
                                    lora_request=self._lora(len(encoded)))
        results: list[list[Completion]] = []
        longest = 0
        for ids, output in zip(encoded, outputs):
            rows = sorted(output.outputs, key=lambda o: o.index)
            longest = max([longest] + [len(o.token_ids) for o in rows])
            results.append([self._completion(list(o.token_ids), stops, max_new_tokens) for o in rows])
        self.stats.count_generate(prompt_tokens=n * sum(len(ids) for ids in encoded), steps=longest,
                                  generated_tokens=sum(c.num_tokens for row in results for c in row), calls=1)
        return results

    def _lora(self, prompts: int):
        if isinstance(self.lora_request, (list, tuple)):
            if len(self.lora_request) != prompts:
                raise StrategyError(f"lora_request has {len(self.lora_request)} entries for {prompts} prompts")
            return list(self.lora_request)
        return self.lora_request

    # ------------------------------------------------------------------------------------ scoring
    def score(self, prefix: Prompt, continuations: Sequence[Prompt]) -> list[ContinuationScore]:
        """Per-token log p(c_t | prefix, c_<t) of each continuation, from vLLM's ``prompt_logprobs``."""
        (scores,) = self.score_many([(prefix, continuations)])
        return scores

    def score_many(self, requests: Sequence[tuple[Prompt, Sequence[Prompt]]]) -> list[list[ContinuationScore]]:
        """All candidates of all requests in one engine call (vLLM batches and shares prefixes itself)."""
        from vllm import SamplingParams

        joined = [[self.join(prefix, c) for c in continuations] for prefix, continuations in requests]
        flat = [pair for row in joined for pair in row]
        if not flat:
            return [[] for _ in requests]
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        lora = self._lora(len(requests))
        if isinstance(lora, list):  # one adapter per request: the same one for each of its candidates
            lora = [lora[i] for i, row in enumerate(joined) for _ in row]
        outputs = self.llm.generate([{"prompt_token_ids": ids} for ids, _ in flat], params, use_tqdm=False,
                                    lora_request=lora)
        scores = []
        for (ids, start), output in zip(flat, outputs):
            logprobs = output.prompt_logprobs  # [None, {token: Logprob}, ...] aligned with ids
            values = [logprobs[t][ids[t]].logprob for t in range(start, len(ids))]
            scores.append(ContinuationScore(token_ids=ids[start:], logprobs=torch.tensor(values, dtype=torch.float32)))
        self.stats.prompt_tokens += sum(len(ids) for ids, _ in flat)
        self.stats.scored_tokens += sum(len(ids) - start for ids, start in flat)
        self.stats.forward_passes += 1
        self.stats.score_calls += 1
        result, k = [], 0
        for row in joined:
            result.append(scores[k : k + len(row)])
            k += len(row)
        return result


def prompt_seed(seed: int, index: int) -> int:
    """The sampling seed of prompt ``index`` of a call seeded with ``seed`` (a 63-bit hash of both)."""
    digest = hashlib.sha256(f"{int(seed)}/{int(index)}".encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def _eos_token_ids(llm, tokenizer) -> tuple[int, ...]:
    """The engine's EOS set: the model's generation-config EOS ids plus the tokenizer's (as ``HFBackend``)."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    try:
        config = llm.llm_engine.model_config.try_get_generation_config() or {}
    except Exception:  # noqa: BLE001 - a model without a generation config: the tokenizer's EOS only
        config = {}
    configured = config.get("eos_token_id")
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(t) for t in configured)
    return tuple(sorted(ids))
