"""In-forward weight deltas: ``y = W x + b + s (x A^T) B^T`` on chosen linear layers, per batch row.

The third plug point of guidedecode. FTTT and OpTune (Li, Lyu, Wang, "Learning to Reason from Feedback at
Test-Time", arXiv 2502.15771; reference LaVi-Lab/FTTT) change a model's weights between attempts; here the
change ``ΔW = s B A`` (``A [r, d_in]``, ``B [d_out, r]``) is added by forward hooks on the target
``nn.Linear`` modules, so the base weights never change, the delta stays factored (rank ``r`` costs
``r (d_in + d_out)``, not ``d_in d_out``), and every row of a batch can carry its own delta or none.

    injector = DeltaInjector(model, {"model.layers.1.self_attn.q_proj": [delta_a, None, delta_b]})
    with injector:                       # hooks on; removed on exit
        model.generate(**inputs, num_return_sequences=4)

* A target maps to one delta (every row) or to a list with one entry per *request row* (``None`` = no
  delta, the row's outputs are bit-identical to the base model). When the model's batch is a multiple of
  the request rows, as after ``num_return_sequences`` or beam expansion (``repeat_interleave``), each
  request's delta follows its expanded rows.
* The hook sees every forward: prefill and each cached decode step alike; the KV cache stays consistent
  because the delta is constant during a generation.
* Hooks are module hooks, so they work with any attention implementation (SDPA, eager) and any model
  family whose projections are ``nn.Linear`` (Llama, Mistral, Qwen2, ...).
* ``HFBackend``: set ``backend.deltas = injector``; its batched ``generate`` calls then select the
  injector's request rows chunk by chunk (:meth:`DeltaInjector.window`).

The update itself is :func:`guidedecode.kernels.lowrank.lowrank_update` (Triton on CUDA, torch on CPU and
whenever autograd needs a graph through the factors).
"""

from __future__ import annotations

import contextlib
import fnmatch
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from guidedecode import validation
from guidedecode.errors import GuidedecodeError
from guidedecode.kernels.lowrank import lowrank_update


class DeltaError(GuidedecodeError):
    """A weight delta does not fit its target (unknown layer, wrong shape, wrong number of rows)."""


@dataclass(frozen=True)
class LowRankDelta:
    """``ΔW = scale * B @ A`` with ``A [r, d_in]``, ``B [d_out, r]``; ``scale`` a float or a scalar tensor
    (a learnable step size keeps its gradient)."""

    A: torch.Tensor
    B: torch.Tensor
    scale: float | torch.Tensor = 1.0

    def __post_init__(self):
        for side in ("A", "B"):
            if not torch.is_tensor(getattr(self, side)):
                raise DeltaError(f"{side} of a low-rank delta must be a torch.Tensor, got "
                                 f"{type(getattr(self, side)).__name__}")
        if self.A.dim() != 2 or self.B.dim() != 2 or self.A.shape[0] != self.B.shape[1]:
            raise DeltaError(f"a low-rank delta needs A [r, d_in] and B [d_out, r] with the same r, "
                             f"got A {tuple(self.A.shape)} and B {tuple(self.B.shape)}")
        if isinstance(self.scale, torch.Tensor) and self.scale.numel() != 1:
            raise DeltaError(f"scale must be a number or a one-element tensor, got shape {tuple(self.scale.shape)}")
        if isinstance(self.scale, torch.Tensor):
            if not torch.isfinite(self.scale.detach()).all():
                raise DeltaError(f"scale must be finite, got {self.scale.detach().item()}")
        else:
            validation.number("scale", self.scale, error=DeltaError)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        """``(d_out, d_in)`` of the weight it edits."""
        return self.B.shape[0], self.A.shape[1]

    def dense(self) -> torch.Tensor:
        """The ``[d_out, d_in]`` matrix (for tests and small layers)."""
        return (self.B.float() @ self.A.float()) * (self.scale.float() if torch.is_tensor(self.scale) else self.scale)

    @classmethod
    def from_dense(cls, delta_w: torch.Tensor) -> "LowRankDelta":
        """An exact factored form of a dense ``[d_out, d_in]`` delta (an identity on the smaller side)."""
        if delta_w.dim() != 2:
            raise DeltaError(f"a dense delta must be [d_out, d_in], got shape {tuple(delta_w.shape)}")
        d_out, d_in = delta_w.shape
        if d_out <= d_in:
            return cls(delta_w, torch.eye(d_out, dtype=delta_w.dtype, device=delta_w.device))
        return cls(torch.eye(d_in, dtype=delta_w.dtype, device=delta_w.device), delta_w)


def as_delta(value) -> LowRankDelta:
    """A :class:`LowRankDelta`, an ``(A, B)`` / ``(A, B, scale)`` tuple or a dense ``[d_out, d_in]`` tensor."""
    if isinstance(value, LowRankDelta):
        return value
    if isinstance(value, torch.Tensor):
        return LowRankDelta.from_dense(value)
    if isinstance(value, tuple) and len(value) in (2, 3) and all(torch.is_tensor(v) for v in value[:2]):
        return LowRankDelta(*value)
    raise DeltaError(f"a delta is a LowRankDelta, an (A, B[, scale]) tuple or a dense tensor, got "
                     f"{type(value).__name__}")


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def find_targets(model: nn.Module, modules: str | Sequence[str] = ("q_proj", "v_proj"),
                 layers: Iterable[int] | None = None) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``model`` to edit.

    ``modules``: patterns matched (``fnmatch``) against the module's last name component or its full name,
    e.g. ``"q_proj"``, ``"self_attn.*_proj"``. ``layers``: decoder-layer indices (``...layers.<i>...``);
    negative indices count from the end (``[-2, -1]`` = the last two layers); ``None`` = all layers.
    A pattern or layer that matches nothing is a :class:`DeltaError` listing what exists.
    """
    patterns = [modules] if isinstance(modules, str) else list(modules)
    if not patterns:
        raise DeltaError("find_targets needs at least one module name pattern")
    linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    layer_of = {name: int(found.group(1)) for name in linear if (found := _LAYER.search(name))}
    num_layers = 1 + max(layer_of.values(), default=-1)
    wanted = None
    if layers is not None:
        wanted = set()
        if isinstance(layers, (str, bytes)) or not isinstance(layers, Iterable):
            raise DeltaError(f"layers must be a list of decoder-layer indices, got {layers!r}")
        for i in layers:
            i = validation.integer("layer index", i, error=DeltaError)
            j = i + num_layers if i < 0 else i
            if not 0 <= j < num_layers:
                raise DeltaError(f"layer index {i} is out of range: the model has {num_layers} decoder layers")
            wanted.add(j)
    names = []
    for pattern in patterns:
        hits = [n for n in linear if fnmatch.fnmatch(n.rsplit(".", 1)[-1], pattern) or fnmatch.fnmatch(n, pattern)]
        if wanted is not None:
            hits = [n for n in hits if layer_of.get(n) in wanted]
        if not hits:
            leaves = sorted({n.rsplit(".", 1)[-1] for n in linear})
            raise DeltaError(f"target pattern {pattern!r} (layers {sorted(wanted) if wanted is not None else 'all'}) "
                             f"matches no nn.Linear of {type(model).__name__}; linear layers are named "
                             f"{', '.join(leaves)}")
        names.extend(n for n in hits if n not in names)
    return sorted(names, key=lambda n: (layer_of.get(n, -1), n))


@dataclass
class _Packed:
    """One target's deltas stacked for :func:`lowrank_update`: slots ``[N, R, d_in]`` / ``[N, d_out, R]``."""

    A: torch.Tensor
    B: torch.Tensor
    scale: torch.Tensor
    slots: torch.Tensor | None  # [request rows] slot per row (-1 none); None = one delta on every row


class DeltaInjector:
    """Forward hooks adding per-row low-rank deltas to linear layers (see the module docstring).

    ``deltas``: ``{module name: delta | [delta or None per request row]}``; a delta is anything
    :func:`as_delta` accepts. ``backend``: kernel backend of :func:`~guidedecode.kernels.lowrank.lowrank_update`;
    ``None`` (default) = the Triton kernel on CUDA, torch otherwise (the CPU interpreter is a test device).
    Use as a context manager (hooks on inside, removed on exit) or with :meth:`attach` / :meth:`remove`.
    """

    def __init__(self, model: nn.Module, deltas: Mapping | None = None, *, backend: str | None = None):
        if not isinstance(model, nn.Module):
            raise DeltaError(f"DeltaInjector needs a torch model (nn.Module), got {type(model).__name__}")
        self.model = model
        self.backend = validation.optional(validation.choice, "backend", backend, choices=("auto", "triton", "torch"),
                                           error=DeltaError)
        self._linear = {name: m for name, m in model.named_modules() if isinstance(m, nn.Linear)}
        self._packed: dict[str, _Packed] = {}
        self._rows: int | None = None
        self._window: tuple[int, int] | None = None
        self._handles: list = []
        if deltas:
            self.set(deltas)

    # ------------------------------------------------------------------ deltas
    @property
    def rows(self) -> int | None:
        """Number of request rows of the per-row deltas (``None``: every delta applies to every row)."""
        return self._rows

    @property
    def targets(self) -> list[str]:
        return list(self._packed)

    def set(self, deltas: Mapping) -> "DeltaInjector":
        """Replace all deltas (hooks follow when attached). Validates names, shapes and row counts."""
        if not isinstance(deltas, Mapping):
            raise DeltaError(f"deltas must be a mapping {{module name: delta}}, got {type(deltas).__name__}")
        packed, rows = {}, None
        for name, value in deltas.items():
            module = self._linear.get(name)
            if module is None:
                close = [n for n in self._linear if n.endswith(str(name).rsplit(".", 1)[-1])][:4]
                raise DeltaError(f"no nn.Linear named {name!r} in {type(self.model).__name__}"
                                 + (f" (similar: {', '.join(close)})" if close else "")
                                 + "; use find_targets(model, modules, layers) to list targets")
            per_row = isinstance(value, (list, tuple)) and not (
                isinstance(value, tuple) and len(value) in (2, 3) and torch.is_tensor(value[0]))
            if per_row:
                if rows is not None and len(value) != rows:
                    raise DeltaError(f"per-row deltas disagree on the number of rows: {name!r} has {len(value)}, "
                                     f"another target {rows}")
                if len(value) == 0:
                    raise DeltaError(f"{name!r}: an empty list of per-row deltas")
                rows = len(value)
            packed[name] = self._pack(name, module, list(value) if per_row else value, per_row)
        self._packed, self._rows = packed, rows
        if self._handles:
            self.remove()
            self.attach()
        return self

    def clear(self) -> "DeltaInjector":
        """Drop every delta (hooks stay attached and do nothing)."""
        self._packed, self._rows = {}, None
        return self

    def _pack(self, name: str, module: nn.Linear, value, per_row: bool) -> _Packed:
        """Validate and stack one target's deltas; the same object on several rows shares one slot."""
        entries = value if per_row else [value]
        slots, ordered, slot_of = [], [], {}
        for row, entry in enumerate(entries):
            if entry is None:
                if not per_row:
                    raise DeltaError(f"{name!r}: the delta is None (use a list with None entries for rows "
                                     "without a delta, or leave the target out)")
                slots.append(-1)
                continue
            if id(entry) not in slot_of:
                delta = as_delta(entry)
                if delta.shape != (module.out_features, module.in_features):
                    raise DeltaError(
                        f"{name!r} is nn.Linear({module.in_features} -> {module.out_features}), so its delta must "
                        f"be [d_out={module.out_features}, d_in={module.in_features}]; row {row} has "
                        f"{list(delta.shape)} (A {tuple(delta.A.shape)}, B {tuple(delta.B.shape)})")
                slot_of[id(entry)] = len(ordered)
                ordered.append(delta)
            slots.append(slot_of[id(entry)])
        dev, dtype = module.weight.device, module.weight.dtype
        rank = max([d.rank for d in ordered], default=1)
        if ordered:  # ranks padded with zeros to the largest one
            A = torch.stack([nn.functional.pad(d.A.to(dev, dtype), (0, 0, 0, rank - d.rank)) for d in ordered])
            B = torch.stack([nn.functional.pad(d.B.to(dev, dtype), (0, rank - d.rank)) for d in ordered])
            scale = torch.stack([torch.as_tensor(d.scale, dtype=torch.float32, device=dev).reshape(())
                                 for d in ordered])
        else:
            A = module.weight.new_zeros(1, 1, module.in_features)
            B = module.weight.new_zeros(1, module.out_features, 1)
            scale = torch.zeros(1, device=dev)
        return _Packed(A, B, scale, torch.tensor(slots, device=dev) if per_row else None)

    # ------------------------------------------------------------------ hooks
    def attach(self) -> "DeltaInjector":
        if self._handles:
            return self
        for name in self._packed:
            self._handles.append(self._linear[name].register_forward_hook(self._hook(name)))
        return self

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

    def __enter__(self) -> "DeltaInjector":
        return self.attach()

    def __exit__(self, *exc) -> None:
        self.remove()

    @contextlib.contextmanager
    def window(self, start: int, stop: int):
        """Within the block, the model's batch holds request rows ``start:stop`` of the per-row deltas."""
        start = validation.integer("window start", start, minimum=0, error=DeltaError)
        stop = validation.integer("window stop", stop, error=DeltaError)
        if stop <= start:
            raise DeltaError(f"row window {start}:{stop} is empty: stop must be > start")
        if self._rows is not None and not 0 <= start < stop <= self._rows:
            raise DeltaError(f"row window {start}:{stop} is outside the {self._rows} request rows of the deltas")
        saved, self._window = self._window, (start, stop)
        try:
            yield self
        finally:
            self._window = saved

    def row_index(self, name: str, batch: int) -> torch.Tensor:
        """The slot of each of ``batch`` model rows for target ``name`` (-1 = no delta)."""
        packed = self._packed[name]
        if packed.slots is None:
            return torch.zeros(batch, dtype=torch.long, device=packed.A.device)
        slots = packed.slots
        if self._window is not None:
            slots = slots[self._window[0]:self._window[1]]
        if batch % len(slots):
            raise DeltaError(f"{name!r}: the model's batch has {batch} rows but the deltas are given for "
                             f"{len(slots)} request rows (batch must be a multiple: num_return_sequences / beams "
                             "expand each request's rows); select rows with injector.window(start, stop)")
        return slots.repeat_interleave(batch // len(slots))

    def _hook(self, name: str):
        def hook(module, args, output):
            packed = self._packed.get(name)
            if packed is None:
                return output
            x = args[0]
            batch = x.shape[0]
            x3 = x.reshape(batch, -1, x.shape[-1])
            y3 = output.reshape(batch, -1, output.shape[-1])
            index = self.row_index(name, batch)
            inplace = not (torch.is_grad_enabled() and output.requires_grad)
            backend = self.backend or ("auto" if x.is_cuda else "torch")
            y3 = lowrank_update(y3, x3, packed.A, packed.B, packed.scale, index, inplace=inplace, backend=backend)
            return y3.reshape(output.shape)

        return hook
