"""Differences between the transformers releases guidedecode supports (``>=5.16,<5.40``), in one place."""

from __future__ import annotations

import inspect

__all__ = ["cache_argument", "kept_logits", "layer_is_croppable"]


def cache_argument(module) -> str:
    """The keyword under which ``module.forward`` takes a KV cache: ``cache`` from transformers 5.24 on,
    ``past_key_values`` in 5.16-5.23 (5.24 deprecates that name; its removal is announced for 5.40)."""
    parameters = inspect.signature(module.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


def layer_is_croppable(layer) -> bool:
    """Whether a cache layer can be cropped back (``Cache.crop``). transformers 5.17 added
    ``layer.is_croppable``; in 5.16 only the plain full-attention ``DynamicLayer`` is treated as croppable."""
    value = getattr(layer, "is_croppable", None)
    if value is None:
        from transformers.cache_utils import DynamicLayer

        return type(layer) is DynamicLayer
    return bool(value)


def kept_logits(model, input_ids, attention_mask, keep):
    """Logits ``[num_kept, V]`` at the ``True`` positions of the boolean mask ``keep`` ``[B, T]`` (row-major,
    as ``tensor[keep]``), without computing the others.

    transformers releases with ``modeling_utils.slice_logits_to_keep`` take the boolean mask as
    ``logits_to_keep`` directly; earlier ones (5.16-5.19 at least) index with it as positions, so there the
    model gets the sorted union of kept positions (a 1D index tensor, which every release takes) and the
    mask picks the rows."""
    from transformers import modeling_utils

    if hasattr(modeling_utils, "slice_logits_to_keep"):
        return model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=keep).logits
    positions = keep.any(0).nonzero().flatten()
    logits = model(input_ids=input_ids, attention_mask=attention_mask, logits_to_keep=positions).logits
    return logits[keep[:, positions]]
