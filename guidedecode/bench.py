"""Benchmark bookkeeping: every result records how, where and with what it was measured.

``write_result(name, figures, plot=...)`` writes ``benchmarks/results/<name>-<device>.json`` with the
exact command, git sha, machine, package versions and the figures, and optionally a PNG plot
(``plot(ax)`` draws on a matplotlib axis). Ratios should be measured side by side in one run;
absolute times only mean something on the named device.
"""

from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from importlib import metadata
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("torch", "transformers", "triton", "numpy", "guidedecode", "vllm")


def results_dir() -> Path:
    return Path(os.environ.get("GUIDEDECODE_BENCH_RESULTS", REPO / "benchmarks" / "results"))


def machine() -> dict:
    """CPU model, cores, memory and accelerator of this machine."""
    info = {"platform": platform.platform(), "processor": _cpu_model(), "cpu_count": os.cpu_count()}
    try:
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            info["device"] = torch.cuda.get_device_name(0)
        else:
            info["device"] = "cpu"
    except ImportError:  # pragma: no cover - torch is a dependency
        info["device"] = "cpu"
    return info


def device_tag() -> str:
    device = machine()["device"]
    return "cpu" if device == "cpu" else device.lower().replace("nvidia", "").strip().replace(" ", "-")


def versions() -> dict:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            continue
    return found


def git_sha() -> str | None:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def write_result(name: str, figures: dict, *, plot: Callable | None = None, notes: str | None = None) -> Path:
    """Write the JSON (and PNG when ``plot`` is given); returns the JSON path. ``$GUIDEDECODE_BENCH_NOTE``
    is appended to ``notes`` (e.g. that the machine was shared with other jobs during the run)."""
    out = results_dir()
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{name}-{device_tag()}"
    payload = {
        "benchmark": name,
        "command": " ".join(shlex.quote(a) for a in [Path(sys.executable).name, *sys.argv]),
        "git_sha": git_sha(),
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "machine": machine(),
        "versions": versions(),
        "notes": " ".join(n for n in (notes, os.environ.get("GUIDEDECODE_BENCH_NOTE")) if n) or None,
        "figures": figures,
    }
    path = out / f"{stem}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2))
    os.replace(tmp, path)
    if plot is not None:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        plot(ax)
        ax.set_title(f"{name} ({payload['machine']['device']})")
        fig.tight_layout()
        fig.savefig(out / f"{stem}.png", dpi=120)
        plt.close(fig)
    return path


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


# ------------------------------------------------------------------------------- GPU-size models, no weights
# Architecture configs of the models the GPU benchmarks stand in for (values from their published
# config.json files). Benchmarks build them with random weights: a decode step costs the same with any
# weights, and no machine here (or the lent GPU machine) can download the real ones.
_LLAMA3_ROPE = {"rope_type": "llama3", "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192}
MODEL_CONFIGS = {
    "llama-3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=64, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 32.0},
                         max_position_embeddings=131072, tie_word_embeddings=True,
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
    "llama-3.1-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                         num_attention_heads=32, num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-5,
                         rope_theta=500000.0, rope_scaling={**_LLAMA3_ROPE, "factor": 8.0},
                         max_position_embeddings=131072, tie_word_embeddings=False,
                         bos_token_id=128000, eos_token_id=[128001, 128008, 128009]),
}
SYNTHETIC_PAD_ID = 128004  # Llama-3's "<|finetune_right_pad_id|>"
# --shrink: the same architecture and vocabulary at toy width and depth, for CPU smoke runs of GPU benchmarks
SHRINK_OVERRIDES = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                        num_key_value_heads=2, head_dim=16)


def random_model(name: str, *, device=None, dtype=None, seed: int = 0, shrink: bool = False, **overrides):
    """A random-weight ``LlamaForCausalLM`` with the architecture of ``MODEL_CONFIGS[name]`` built directly on
    ``device`` in ``dtype``, in eval mode. ``shrink`` (or ``overrides``) make it toy-sized for CPU checks."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    if name not in MODEL_CONFIGS:
        raise ValueError(f"unknown model config '{name}': choose one of {', '.join(MODEL_CONFIGS)}")
    config = LlamaConfig(**{**MODEL_CONFIGS[name], **(SHRINK_OVERRIDES if shrink else {}), **overrides})
    torch.manual_seed(seed)
    with torch.device(device or "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    model.generation_config.eos_token_id = config.eos_token_id
    model.generation_config.pad_token_id = SYNTHETIC_PAD_ID if config.vocab_size > SYNTHETIC_PAD_ID else 0
    return model.eval()


def synthetic_tokenizer(vocab_size: int, *, pad_token_id: int = 0, eos_token_id: int = 1):
    """A real (fast, word-level) tokenizer over ``vocab_size`` tokens ``<0> <1> ...``, built in memory: the
    ids, pad and EOS a random-weight benchmark model needs, with no tokenizer files to ship."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {f"<{i}>": i for i in range(vocab_size)}  # bracketed: no special token is part of another token
    raw = Tokenizer(models.WordLevel(vocab, unk_token=f"<{pad_token_id}>"))
    raw.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=raw, pad_token=f"<{pad_token_id}>",
                                        eos_token=f"<{eos_token_id}>", unk_token=f"<{pad_token_id}>")
    tokenizer.padding_side = "left"
    return tokenizer
