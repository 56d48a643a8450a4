"""Hand a weight delta to a LoRA server (vLLM multi-LoRA): compress to rank r, write a PEFT adapter directory.

An OpTune edit has rank T (its token count); vLLM serves LoRAs up to ``max_lora_rank``. The best rank-r
approximation of ``ΔW = s B A`` (Eckart-Young) comes from the SVD, computed without the dense ``d_out x d_in``
matrix: ``B = Q_B R_B`` and ``A^T = Q_A R_A`` (thin QR, T columns), so ``ΔW = s Q_B (R_B R_A^T) Q_A^T`` and only
the ``T x T`` core needs an SVD. The core is factored by randomized SVD (``torch.svd_lowrank``, Halko et al.
2011) with ``niter`` power iterations, or exactly when ``r >= T``. The result is written as a PEFT LoRA
adapter (``lora_alpha = r``, so the LoRA scale is 1; ``lora_B @ lora_A = ΔW_r``), loadable by
``peft.PeftModel.from_pretrained`` and by vLLM's ``LoRARequest``.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path

import torch

from guidedecode import validation
from guidedecode.deltas.injector import DeltaError, LowRankDelta, as_delta

_LAYER = re.compile(r"layers\.(\d+)\.")


def compress(delta: LowRankDelta, rank: int, *, niter: int = 4, seed: int = 0) -> LowRankDelta:
    """The rank-``rank`` truncated SVD of ``delta`` as a LowRankDelta with scale 1 (fp32)."""
    rank = validation.positive_int("rank", rank, error=DeltaError)
    niter = validation.integer("niter", niter, minimum=0, error=DeltaError)
    A, B = delta.A.detach().float(), delta.B.detach().float()
    scale = float(delta.scale) if not torch.is_tensor(delta.scale) else float(delta.scale.detach())
    if not (torch.isfinite(A).all() and torch.isfinite(B).all()):
        raise DeltaError("the delta holds non-finite values (NaN or inf)")
    q_b, r_b = torch.linalg.qr(B)  # [d_out, T], [T, T]
    q_a, r_a = torch.linalg.qr(A.T)  # [d_in, T], [T, T]
    core = scale * (r_b @ r_a.T)  # ΔW = Q_B core Q_A^T
    if rank >= min(core.shape):
        u, s, vh = torch.linalg.svd(core, full_matrices=False)
        v = vh.T
    else:
        state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        try:
            u, s, v = torch.svd_lowrank(core, q=min(rank + 8, min(core.shape)), niter=niter)
        finally:
            torch.random.set_rng_state(state)
    u, s, v = u[:, :rank], s[:rank], v[:, :rank]
    root = s.clamp(min=0).sqrt()
    lora_b = (q_b @ u) * root  # [d_out, r]
    lora_a = (root[:, None] * (q_a @ v).T)  # [r, d_in]
    return LowRankDelta(lora_a, lora_b, 1.0)


def export_lora(deltas: Mapping[str, object], directory: str | os.PathLike, rank: int, *,
                base_model_name_or_path: str | None = None, niter: int = 4) -> Path:
    """Write ``{target module name: delta}`` as a PEFT LoRA adapter of rank ``rank`` in ``directory``.

    Targets that are a full product of module names and decoder layers (e.g. q_proj/v_proj of layers 30, 31)
    are written as ``target_modules=[q_proj, v_proj]``, ``layers_to_transform=[30, 31]`` (what vLLM
    expects); other sets as full module names. Ranks below ``rank`` are zero-padded.
    """
    from peft import LoraConfig
    from safetensors.torch import save_file

    if not isinstance(deltas, Mapping):
        raise DeltaError(f"export_lora needs a mapping {{target module name: delta}} (one edit), "
                         f"got {type(deltas).__name__}")
    if not deltas:
        raise DeltaError("export_lora got no deltas")
    rank = validation.positive_int("rank", rank, error=DeltaError)
    niter = validation.integer("niter", niter, minimum=0, error=DeltaError)
    tensors, pairs = {}, set()
    for name, value in deltas.items():
        try:
            delta = compress(as_delta(value), rank, niter=niter)
        except DeltaError as exc:
            raise DeltaError(f"delta {name!r}: {exc}") from None
        pad = rank - delta.rank
        tensors[f"base_model.model.{name}.lora_A.weight"] = torch.nn.functional.pad(delta.A, (0, 0, 0, pad)).contiguous()
        tensors[f"base_model.model.{name}.lora_B.weight"] = torch.nn.functional.pad(delta.B, (0, pad)).contiguous()
        found = _LAYER.search(name)
        pairs.add((int(found.group(1)) if found else None, name.rsplit(".", 1)[-1]))
    leaves, layers = {leaf for _, leaf in pairs}, {layer for layer, _ in pairs}
    product = None not in layers and len(pairs) == len(deltas) == len(leaves) * len(layers)
    if product:
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            target_modules=sorted(leaves), layers_to_transform=sorted(layers),
                            base_model_name_or_path=base_model_name_or_path)
    else:
        config = LoraConfig(r=rank, lora_alpha=rank, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM",
                            target_modules=sorted(deltas), base_model_name_or_path=base_model_name_or_path)
    directory = validation.output_dir("directory", directory, error=DeltaError)
    config.save_pretrained(str(directory))
    tmp = directory / "adapter_model.safetensors.tmp"
    save_file(tensors, str(tmp), metadata={"format": "pt"})
    os.replace(tmp, directory / "adapter_model.safetensors")
    return directory
