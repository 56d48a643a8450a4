"""``HFBackend``: the backend primitives on a Hugging Face causal LM and its tokenizer.

Sampling and greedy decoding go through ``model.generate`` (left-padded batches,
``num_return_sequences`` for n samples, stop strings through transformers' ``StopStringCriteria``),
so token guides passed as ``logits_processor`` apply to every step. Scoring is one teacher-forced
forward per batch of continuations that computes logits only at the continuation positions
(``logits_to_keep`` as a boolean mask), never a log-softmax over every position.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import LogitsProcessorList

from guidedecode.backends.base import BackendStats, Completion, ContinuationScore, Prompt
from guidedecode.errors import StrategyError


class HFBackend:
    """Backend primitives for a transformers model.

    ``logits_processor``: token guides (or any ``LogitsProcessor``) applied while sampling.
    ``batch_size``: the most sequences one ``generate`` or scoring forward holds.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 16, logits_processor: Sequence | None = None):
        if batch_size < 1:
            raise StrategyError(f"batch_size must be >= 1, got {batch_size}")
        self.model = model
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.logits_processor = list(logits_processor or [])
        self.stats = BackendStats()
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = _eos_ids(model, tokenizer)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------ prompts
    def chat_prompt(self, messages: str | list[dict]) -> str:
        """Render chat messages (or one user message) with the tokenizer's chat template."""
        if isinstance(messages, str):
            messages = [{"role": "user", "content": messages}]
        if not getattr(self.tokenizer, "chat_template", None):
            raise StrategyError(
                "the tokenizer has no chat template: pass already-rendered prompt strings or token ids instead"
            )
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)

    def encode(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: text is tokenised as is (no BOS/EOS added), ids pass through."""
        if isinstance(prompt, str):
            ids = self.tokenizer(prompt, add_special_tokens=False)["input_ids"] if prompt else []
        else:
            ids = [int(t) for t in prompt]
        if not ids:
            raise StrategyError("empty prompt: every prompt needs at least one token")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

    # ----------------------------------------------------------- sampling
    def sample(self, prompts, n=1, *, max_new_tokens=256, temperature=1.0, top_p=1.0, top_k=0, stop=None, seed=None):
        if n < 1:
            raise StrategyError(f"n must be >= 1, got {n}")
        if temperature <= 0:
            raise StrategyError(f"temperature must be > 0 for sampling (use greedy()), got {temperature}")
        if seed is not None:
            torch.manual_seed(seed)
        options = dict(do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k)
        return self._generate(prompts, n, max_new_tokens=max_new_tokens, stop=stop, options=options)

    def greedy(self, prompts, *, max_new_tokens=256, stop=None):
        results = self._generate(prompts, 1, max_new_tokens=max_new_tokens, stop=stop, options=dict(do_sample=False))
        return [row[0] for row in results]

    def _generate(self, prompts, n, *, max_new_tokens, stop, options) -> list[list[Completion]]:
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
            output = self.model.generate(
                input_ids=input_ids,
                attention_mask=attention_mask,
                max_new_tokens=max_new_tokens,
                num_return_sequences=n,
                pad_token_id=self.pad_token_id,
                eos_token_id=list(self.eos_token_ids),
                stop_strings=stops or None,
                tokenizer=self.tokenizer if stops else None,
                logits_processor=LogitsProcessorList(self.logits_processor),
                **options,
            )
            generated = output[:, input_ids.shape[1] :].tolist()
            for i in range(len(chunk)):
                rows = generated[i * n : (i + 1) * n]
                results.append([self._completion(row, stops, max_new_tokens) for row in rows])
        self.stats.sample_calls += 1
        self.stats.generated_tokens += sum(c.num_tokens for row in results for c in row)
        return results

    def _completion(self, token_ids: list[int], stops: list[str], max_new_tokens: int) -> Completion:
        """Cut a generated row at EOS or the first stop string (kept in the text, like vLLM's include_stop_str)."""
        finish = "length"
        for i, token in enumerate(token_ids):
            if token in self.eos_token_ids:
                token_ids, finish = token_ids[:i], "eos"
                break
        text = self.decode(token_ids)
        if stops:
            cut = _first_stop_end(text, stops)
            if cut is not None:
                # the shortest token prefix whose text already contains a stop string
                lo, hi = 1, len(token_ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if _first_stop_end(self.decode(token_ids[:mid]), stops) is None:
                        lo = mid + 1
                    else:
                        hi = mid
                token_ids, text, finish = token_ids[:lo], text[:cut], "stop"
            elif finish == "length" and len(token_ids) < max_new_tokens:
                finish = "eos"  # padding after an early stop: only EOS ends a row short of the limit
        return Completion(text=text, token_ids=token_ids, finish_reason=finish)

    def _left_pad(self, rows: list[list[int]]):
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, row in enumerate(rows):
            ids[i, width - len(row) :] = torch.tensor(row)
            mask[i, width - len(row) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ------------------------------------------------------------ scoring
    def join(self, prefix: Prompt, continuation: Prompt) -> tuple[list[int], int]:
        """Token ids of prefix+continuation and the index of the continuation's first token.

        Text + text is tokenised *together* (as the model would see it); a token that spans the
        boundary, e.g. ``"4" + "2" -> "42"``, belongs to the continuation.
        """
        if isinstance(prefix, str) and isinstance(continuation, str) and self.tokenizer.is_fast:
            if not prefix:
                raise StrategyError("empty prefix: scoring needs at least one context token")
            encoding = self.tokenizer(prefix + continuation, add_special_tokens=False, return_offsets_mapping=True)
            ids, offsets = encoding["input_ids"], encoding["offset_mapping"]
            boundary = len(prefix)
            start = next((i for i, (_, end) in enumerate(offsets) if end > boundary), len(ids))
            if start == 0:
                raise StrategyError("the continuation's first token spans the whole prefix: no context to score it")
            return ids, start
        prefix_ids = self.encode(prefix)
        continuation_ids = self.tokenizer(continuation, add_special_tokens=False)["input_ids"] if isinstance(
            continuation, str
        ) else [int(t) for t in continuation]
        return prefix_ids + continuation_ids, len(prefix_ids)

    @torch.no_grad()
    def score(self, prefix: Prompt, continuations: Sequence[Prompt]) -> list[ContinuationScore]:
        """Per-token log p(c_t | prefix, c_<t) for each continuation (teacher forced, batched)."""
        joined = [self.join(prefix, c) for c in continuations]
        scores: list[ContinuationScore] = []
        for start in range(0, len(joined), self.batch_size):
            scores.extend(self._score_batch(joined[start : start + self.batch_size]))
        self.stats.score_calls += 1
        self.stats.scored_tokens += sum(len(s.token_ids) for s in scores)
        return scores

    def _score_batch(self, joined: list[tuple[list[int], int]]) -> list[ContinuationScore]:
        width = max(len(ids) for ids, _ in joined)
        input_ids = torch.full((len(joined), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros_like(input_ids)
        # keep[b, p] = True where the logits at position p predict a continuation token (p + 1)
        keep = torch.zeros_like(input_ids, dtype=torch.bool)
        for b, (ids, first) in enumerate(joined):
            input_ids[b, : len(ids)] = torch.tensor(ids)
            attention_mask[b, : len(ids)] = 1
            keep[b, first - 1 : len(ids) - 1] = True
        targets = torch.roll(input_ids, -1, dims=1)[keep]
        device = self.device
        if not bool(keep.any()):
            return [ContinuationScore(token_ids=[], logprobs=torch.zeros(0)) for _ in joined]
        logits = self.model(
            input_ids=input_ids.to(device), attention_mask=attention_mask.to(device), logits_to_keep=keep.to(device)
        ).logits.float()  # [num_kept, V]
        logprobs = (logits.gather(-1, targets.to(device)[:, None])[:, 0] - torch.logsumexp(logits, -1)).cpu()
        counts = keep.sum(-1).tolist()
        pieces = torch.split(logprobs, counts)
        return [ContinuationScore(token_ids=ids[first:], logprobs=piece) for (ids, first), piece in zip(joined, pieces)]


def _eos_ids(model, tokenizer) -> tuple[int, ...]:
    ids: set[int] = set()
    configured = getattr(model.generation_config, "eos_token_id", None)
    if isinstance(configured, int):
        ids.add(configured)
    elif configured:
        ids.update(int(t) for t in configured)
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return tuple(sorted(ids))


def _stop_list(stop) -> list[str]:
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise StrategyError("stop strings must be non-empty")
    return stops


def _first_stop_end(text: str, stops: list[str]) -> int | None:
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None
