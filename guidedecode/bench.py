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
    """Write the JSON (and PNG when ``plot`` is given); returns the JSON path."""
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
        "notes": notes,
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
