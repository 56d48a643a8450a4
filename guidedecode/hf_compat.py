"""Differences between the transformers releases guidedecode supports (``>=5.16,<5.40``), in one place."""

from __future__ import annotations

import inspect

__all__ = ["cache_argument", "layer_is_croppable"]


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
