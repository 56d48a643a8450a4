"""What the ``generate`` call that runs a token guide applies after it and stops on.

transformers hands a ``LogitsProcessor`` only ``(input_ids, scores)``. A guide that tracks finished rows
must stop a row exactly when ``generate`` does, and one that reports figures of the sampled distribution
(Q♯'s KL) must know the warpers that ``generate`` applies after it. Asking the user to repeat those settings
to the guide makes numbers silently wrong whenever the two copies differ, so the guide reads them from the
call it runs in instead:

* ``processors``: the ``LogitsProcessorList`` calling the guide. ``generate`` builds one per call: the
  config's processors, the user's ``logits_processor=`` entries, then the sampling warpers (temperature,
  top-k, top-p, ...), so the entries after the guide are what turns its output into the sampled distribution;
* ``generation_config``: the ``GenerationConfig`` of the decoding loop that calls that list (transformers'
  sample and beam-search loops and a ``custom_generate`` callable all take it under that name). Its
  ``eos_token_id`` are the ids ``generate`` stops rows on; finished rows are padded with ``pad_token_id``,
  or with the first EOS id when there is none (transformers' own fallback).

Both are found a few frames up the stack. A guide called any other way (directly, or by another engine)
finds nothing and uses the settings it was given.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass

from transformers import GenerationConfig, LogitsProcessorList
from transformers.generation.logits_process import (
    LogitNormalization,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from guidedecode.errors import GuideError

__all__ = ["GenerateCall", "find_generate_call"]

_LIST_CALL = LogitsProcessorList.__call__.__code__
_MAX_DEPTH = 12  # frames between the guide's hook and the LogitsProcessorList that calls it


@dataclass(frozen=True)
class GenerateCall:
    """The processor list a guide runs in (``position`` = the guide's index) and the loop's generation config."""

    processors: list
    position: int
    generation_config: GenerationConfig | None

    @property
    def after(self) -> list:
        """The processors ``generate`` runs on the guide's output, in order."""
        return list(self.processors)[self.position + 1 :]

    def eos_token_ids(self) -> tuple[int, ...] | None:
        """The EOS ids ``generate`` stops rows on (``()``: none), or None when the config is not visible."""
        if self.generation_config is None:
            return None
        eos = self.generation_config.eos_token_id
        if eos is None:
            return ()
        return (int(eos),) if isinstance(eos, int) else tuple(int(t) for t in eos)

    def pad_token_id(self) -> int | None:
        """The id ``generate`` pads with: ``pad_token_id``, else the first EOS id, else None."""
        if self.generation_config is None:
            return None
        if self.generation_config.pad_token_id is not None:
            return int(self.generation_config.pad_token_id)
        eos = self.eos_token_ids()
        return eos[0] if eos else None

    def sampling(self, vocab_size: int, who: str) -> tuple[float, float]:
        """``(temperature, top_p)`` that the processors after the guide apply (1.0 where absent).

        Any other transformers processor after the guide (top-k below the vocabulary size, min-p, typical,
        epsilon/eta cut-offs, watermarking) is a :class:`GuideError` naming it: the guide's accounting covers
        exactly ``TopP(softmax(scores / T))``. The user's own processors placed after the guide are assumed
        to leave the distribution alone (they cannot be inspected)."""
        temperature, top_p = 1.0, 1.0
        for processor in self.after:
            if isinstance(processor, TemperatureLogitsWarper) and top_p == 1.0:  # temperature, then top-p
                temperature *= float(processor.temperature)
            elif isinstance(processor, TopPLogitsWarper) and processor.min_tokens_to_keep <= 1 and top_p == 1.0:
                top_p = float(processor.top_p)
            elif isinstance(processor, TopKLogitsWarper) and processor.top_k >= vocab_size:
                continue  # keeps every token
            elif isinstance(processor, LogitNormalization):
                continue  # log-softmax: the same distribution
            elif not type(processor).__module__.startswith("transformers."):
                continue  # the user's own processor, placed after the guide on purpose (e.g. a recorder)
            else:
                hint = ""
                if isinstance(processor, TopKLogitsWarper):
                    hint = f" (top_k={processor.top_k}: pass top_k=0 to generate; HF's default is top-50)"
                elif isinstance(processor, (TemperatureLogitsWarper, TopPLogitsWarper)):
                    hint = " (a second one, one after top-p, or beam sampling's top-p keeping several tokens)"
                raise GuideError(
                    f"{who}: generate applies {type(processor).__name__} after the guide{hint}; the guide's KL "
                    "accounts for temperature and top-p only, so nothing else may change the distribution after it")
        return temperature, top_p


def find_generate_call(processor) -> GenerateCall | None:
    """The :class:`GenerateCall` that is running ``processor`` now, or None (called outside ``generate``)."""
    frame = sys._getframe(1)
    for _ in range(_MAX_DEPTH):
        if frame is None:
            return None
        if frame.f_code is _LIST_CALL:
            processors = frame.f_locals.get("self")
            position = next((i for i, p in enumerate(processors or ()) if p is processor), None)
            if position is None:
                return None
            caller = frame.f_back
            config = caller.f_locals.get("generation_config") if caller is not None else None
            return GenerateCall(processors, position, config if isinstance(config, GenerationConfig) else None)
        frame = frame.f_back
    return None
