"""What every backend does with text and token ids, whatever runs the model (HF, vLLM).

:class:`TokenizerPrompts` needs ``self.tokenizer`` and ``self.eos_token_ids``: chat rendering, encoding
(no special tokens added), decoding, the token boundary between a scoring prefix and its continuation,
and how a generated row becomes a :class:`~guidedecode.backends.base.Completion` (cut at EOS or at the
first stop string, which stays in the text). Backends share it, so a strategy sees the same prompts,
boundaries and completions on every backend.
"""

from __future__ import annotations

from collections.abc import Sequence

from guidedecode.backends.base import Completion, Prompt
from guidedecode import validation
from guidedecode.errors import StrategyError


class TokenizerPrompts:
    """Prompt and completion handling shared by the backends (see the module docstring)."""

    tokenizer: object
    eos_token_ids: tuple[int, ...]

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
        else:  # ids must index the tokenizer's vocabulary (a negative id would wrap around silently)
            ids = validation.token_ids("prompt", prompt, len(self.tokenizer), error=StrategyError)
        if not ids:
            raise StrategyError("empty prompt: every prompt needs at least one token")
        return ids

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=False)

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
        ) else validation.token_ids("continuation", continuation, len(self.tokenizer), error=StrategyError)
        return prefix_ids + continuation_ids, len(prefix_ids)

    def _completion(self, token_ids: list[int], stops: list[str], max_new_tokens: int) -> Completion:
        """Cut a generated row at EOS or the first stop string (kept in the text, like vLLM's include_stop_str)."""
        finish = "length"
        for i, token in enumerate(token_ids):
            if token in self.eos_token_ids:
                token_ids, finish = token_ids[:i], "eos"
                break
        text = self.decode(token_ids)
        if stops:
            cut = first_stop_end(text, stops)
            if cut is not None:
                # the shortest token prefix whose text already contains a stop string
                lo, hi = 1, len(token_ids)
                while lo < hi:
                    mid = (lo + hi) // 2
                    if first_stop_end(self.decode(token_ids[:mid]), stops) is None:
                        lo = mid + 1
                    else:
                        hi = mid
                token_ids, text, finish = token_ids[:lo], text[:cut], "stop"
            elif finish == "length" and len(token_ids) < max_new_tokens:
                finish = "eos"  # padding after an early stop: only EOS ends a row short of the limit
        return Completion(text=text, token_ids=token_ids, finish_reason=finish)


def stop_list(stop) -> list[str]:
    """``stop`` (None, a string or strings) as a list of non-empty stop strings."""
    if stop is None:
        return []
    stops = [stop] if isinstance(stop, str) else list(stop)
    if any(not s for s in stops):
        raise StrategyError("stop strings must be non-empty")
    return stops


def first_stop_end(text: str, stops: list[str]) -> int | None:
    """End index of the earliest-ending stop string in ``text`` (None if there is none)."""
    ends = [text.find(s) + len(s) for s in stops if s in text]
    return min(ends) if ends else None
