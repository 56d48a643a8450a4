"""A ``vllm.LLM`` set up for a guidedecode run (``guidedecode eval --backend vllm``).

A registry guide (``--guide qsharp -p value_model=DIR -p eta=3``) becomes the matching vLLM logits
processor plus per-request ``extra_args`` (:func:`guide_request`); the engine loads the processor class,
and :class:`~guidedecode.vllm.VLLMBackend` sends the arguments with every request.
"""

from __future__ import annotations

import os

from guidedecode.errors import GuidedecodeError

__all__ = ["CPU_KV_CACHE_BYTES", "GUIDE_PROCESSORS", "build_backend", "build_engine", "guide_request",
           "require_processor", "stored_dtype"]


def _qsharp(params: dict) -> tuple[dict, dict]:
    env = {"GUIDEDECODE_VALUE_MODEL": params.get("value_model", "")}
    if not env["GUIDEDECODE_VALUE_MODEL"]:
        raise GuidedecodeError("guide 'qsharp' needs -p value_model=DIR (a directory written by guidedecode train qsharp)")
    args = {"qsharp_eta": float(params.get("eta", 10.0)), "qsharp_top_k": int(params.get("top_k", 20))}
    if params.get("mode"):
        args["qsharp_mode"] = params["mode"]
    if params.get("tail"):
        args["qsharp_tail"] = params["tail"]
    return env, args


def _planning(params: dict) -> tuple[dict, dict]:
    planner = params.get("planner", "")
    if not planner:
        raise GuidedecodeError("guide 'planning' on vLLM needs -p planner=DIR (the served planner's directory)")
    if os.path.isfile(os.path.join(planner, "merged", "planning_tokens.json")):
        planner = os.path.join(planner, "merged")
    args = {"planning": 1, "planning_complete_blocks": int(params.get("complete_blocks", 1)),
            "planning_memory_before_reason": int(params.get("memory_before_reason", 0)),
            "planning_multi_type": int(params.get("multi_type", 0))}
    if params.get("force_type"):
        args["planning_force_type"] = params["force_type"]
    if params.get("ban_types"):
        args["planning_ban_types"] = [t for t in params["ban_types"].split(",") if t]
    if int(params.get("max_steps", -1)) >= 0:
        args["planning_max_steps"] = int(params["max_steps"])
    return {"GUIDEDECODE_PLANNER": planner}, args


GUIDE_PROCESSORS = {"qsharp": ("QSharp", _qsharp), "planning": ("PlanningTokens", _planning)}
"""Registry guide name -> (processor class in :mod:`guidedecode.vllm`, params -> (environment, extra_args))."""


def guide_request(name: str, params: dict) -> tuple[type, dict, dict]:
    """(processor class, environment it reads, per-request ``extra_args``) for registry guide ``name``.

    The environment is set in this process (the engine's processes inherit it) and the arguments are
    checked by the processor's own ``validate_params``, so a bad setting fails before the engine starts."""
    from guidedecode import vllm as gv

    if name not in GUIDE_PROCESSORS:
        raise GuidedecodeError(f"guide {name!r} has no vLLM processor; on --backend vllm use one of "
                               f"{', '.join(sorted(GUIDE_PROCESSORS))}, or --backend hf")
    class_name, convert = GUIDE_PROCESSORS[name]
    env, extra_args = convert(dict(params))
    os.environ.update(env)
    processor = getattr(gv, class_name)
    try:
        processor.validate_params(_Params(extra_args))
    except ValueError as exc:
        raise GuidedecodeError(f"guide {name!r}: {exc}") from exc
    return processor, env, extra_args


def require_processor(llm, processor: type) -> None:
    """Raise unless engine ``llm`` was built with ``processor`` among its logits processors: vLLM ignores
    ``extra_args`` that no processor reads, so a guided request would silently run unguided."""
    loaded = getattr(llm.llm_engine.model_config, "logits_processors", None) or []
    names = {f"{processor.__module__}:{processor.__qualname__}", f"{processor.__module__}.{processor.__qualname__}",
             f"guidedecode.vllm:{processor.__qualname__}", f"guidedecode.vllm.{processor.__qualname__}"}
    if not any(entry is processor or (isinstance(entry, str) and entry in names) for entry in loaded):
        raise GuidedecodeError(f"the vLLM engine was built without the {processor.__qualname__} logits processor: "
                               f"build it with vllm.LLM(..., logits_processors=[guidedecode.vllm.{processor.__qualname__}])"
                               " (vLLM ignores request arguments no processor reads)")


class _Params:
    def __init__(self, extra_args):
        self.extra_args = extra_args


CPU_KV_CACHE_BYTES = 1 << 30
"""KV cache a CPU engine reserves unless told otherwise (vLLM's CPU default takes most of the memory)."""


def build_engine(model: str, *, processors=(), dtype: str | None = None, seed: int = 0, **engine_args):
    """``vllm.LLM`` for a guidedecode model name (embedded name, directory or Hub id), eager mode, prefix
    caching on, weights in ``dtype`` (default: as stored, like ``load_model``; :func:`stored_dtype`).

    Without a GPU the KV cache is :data:`CPU_KV_CACHE_BYTES` unless ``kv_cache_memory_bytes`` (or
    ``gpu_memory_utilization``) is given."""
    import torch
    from vllm import LLM

    from guidedecode.models import model_source

    source = model_source(model)
    options = {"enforce_eager": True, "enable_prefix_caching": True, "seed": seed, **engine_args}
    if not torch.cuda.is_available() and not {"kv_cache_memory_bytes", "gpu_memory_utilization"} & set(options):
        options["kv_cache_memory_bytes"] = CPU_KV_CACHE_BYTES
    options["dtype"] = dtype or stored_dtype(source) or "auto"
    return LLM(source, logits_processors=list(processors) or None, **options)


def stored_dtype(source: str) -> str | None:
    """The dtype a model's config records (``"float32"``, ...): what ``load_model`` loads it in by default.
    vLLM's ``"auto"`` would instead turn float32 weights into bfloat16 on CPUs, so the engine is given this."""
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(source, local_files_only=True)
    except (OSError, ValueError):
        return None  # not readable here (e.g. a Hub id not yet downloaded): vLLM decides ("auto")
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    return str(dtype).removeprefix("torch.") if dtype is not None else None


def build_backend(model: str, *, processors=(), dtype: str | None = None, seed: int = 0, extra_args=None,
                  **engine_args):
    """A :class:`~guidedecode.vllm.VLLMBackend` on a new engine (:func:`build_engine`); checks the vLLM
    version first (:func:`~guidedecode.vllm.require_vllm`)."""
    from guidedecode.vllm import VLLMBackend, require_vllm

    require_vllm()
    engine = build_engine(model, processors=processors, dtype=dtype, seed=seed, **engine_args)
    return VLLMBackend(engine, extra_args=extra_args)
