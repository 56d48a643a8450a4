"""OpTune: a learned test-time optimiser that turns one failed attempt into a weight edit.

Li, Lyu, Wang, "Learning to Reason from Feedback at Test-Time" (arXiv 2502.15771, ACL 2025; reference
LaVi-Lab/FTTT, built on MEND, Mitchell et al. 2022). For a failed attempt ``y`` to question ``q``:

1. the edit sequence ``chat(q) ‖ y ‖ feedback`` (the attempt as the assistant turn, the feedback as the next
   user turn) runs forward once; the loss is the mean NLL over its non-pad tokens, summed over samples (so
   each sample's gradient equals its batch-1 gradient); one backward. Decoder layers below the first edited
   one run without a graph (their output is detached), and no base parameter gets a gradient;
2. hooks on each edited ``nn.Linear`` record per token the input ``x_t`` and the output gradient
   ``δ_t = ∂L/∂(W x_t)`` (so ``∇W = Σ_t δ_t x_t^T``, never formed);
3. per weight shape a :class:`GradientTransform` (shared by the layers of that shape) normalises
   ``u_t = (x_t - μ_x)/σ_x``, ``v_t = (δ_t - μ_δ)/σ_δ`` with running (Welford) statistics over all training
   tokens (frozen at eval), and maps ``z = [u; v]`` to ``z' = z + W_up Dropout(W_down z)`` (rank 16,
   ``W_up`` and its bias zero: the identity at init), split into ``(x̃_t, δ̃_t)``;
4. the edit of matrix ``l`` is ``ΔW_l = η_l Σ_t δ̃_t x̃_t^T`` with a learnable step ``η_l`` (init 1e-4),
   kept factored as ``A = X̃ [T, d_in]``, ``B = Δ̃^T [d_out, T]``, ``scale = η_l`` (a dense form only when
   ``T`` exceeds ``min(d_out, d_in)``). It is *added* (no minus sign): meta-training learns sign and scale.

Apply the edit with :class:`~guidedecode.deltas.DeltaInjector`. Each edit is computed at the base weights.
``save_pretrained`` / ``from_pretrained`` store the transforms, steps, statistics and the configuration
(safetensors + JSON; about 1.8 MB for Llama-3.1-8B's last two layers' q/v) and refuse a model whose edited
layers have other names or shapes.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from guidedecode import validation
from guidedecode.deltas.injector import DeltaError, LowRankDelta, find_targets

CONFIG_NAME = "optune_config.json"
WEIGHTS_NAME = "optune.safetensors"
INCORRECT = "Your answer is incorrect."


@dataclass
class OpTuneConfig:
    """Which layers are edited and how the transform is shaped (defaults: the paper's)."""

    modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])
    layers: list[int] = field(default_factory=lambda: [-2, -1])
    rank: int = 16
    dropout: float = 0.1
    eta_init: float = 1e-4
    feedback: str = INCORRECT
    # filled in by OpTuneEditor.for_model: the model the editor is made for
    targets: dict[str, list[int]] = field(default_factory=dict)  # name -> [d_out, d_in]
    model_type: str | None = None

    def __post_init__(self):
        validation.positive_int("rank", self.rank, error=DeltaError)
        self.dropout = validation.number("dropout", self.dropout, minimum=0, maximum=1, error=DeltaError)
        self.eta_init = validation.number("eta_init", self.eta_init, above=0, error=DeltaError)
        validation.string("feedback", self.feedback, error=DeltaError)


class RunningStats(nn.Module):
    """Welford / Chan running mean and variance of ``dim``-vectors; updated only in training mode."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("count", torch.zeros((), dtype=torch.float64))
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("m2", torch.zeros(dim))

    @torch.no_grad()
    def update(self, values: torch.Tensor) -> None:
        """Fold ``values [N, dim]`` in (Chan et al.'s parallel combination of Welford states)."""
        n = values.shape[0]
        if n == 0:
            return
        values = values.float()
        batch_mean = values.mean(0)
        batch_m2 = ((values - batch_mean) ** 2).sum(0)
        total = self.count + n
        delta = batch_mean - self.mean
        self.mean += delta * (n / total).float()
        self.m2 += batch_m2 + delta ** 2 * (self.count * n / total).float()
        self.count.fill_(total)

    @property
    def std(self) -> torch.Tensor:
        return (self.m2 / (self.count - 1).clamp(min=1).float()).sqrt()

    def normalise(self, values: torch.Tensor) -> torch.Tensor:
        """``(values - μ) / σ``; the identity until two vectors were seen (and where σ = 0)."""
        if self.count < 2:
            return values
        std = self.std
        return (values - self.mean) / torch.where(std > 0, std, torch.ones_like(std))


class GradientTransform(nn.Module):
    """``z' = z + W_up Dropout(W_down z)`` on ``z = [u; v]`` with running-statistics normalisation.

    ``W_up`` and its bias start at zero, so the transform starts as the identity on the normalised factors.
    ``update_stats``: whether training-mode calls fold their factors into the statistics (a trainer that
    computed them beforehand, over all training tokens, sets it False).
    """

    update_stats = True

    def __init__(self, d_in: int, d_out: int, rank: int = 16, dropout: float = 0.1):
        super().__init__()
        self.d_in, self.d_out = d_in, d_out
        self.stats_x, self.stats_delta = RunningStats(d_in), RunningStats(d_out)
        self.down = nn.Linear(d_in + d_out, rank, bias=False)
        self.up = nn.Linear(rank, d_in + d_out)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, delta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x̃, δ̃)`` for per-token factors ``x [T, d_in]``, ``δ [T, d_out]`` (statistics updated in training)."""
        x, delta = x.float(), delta.float()
        if self.training and self.update_stats:
            self.stats_x.update(x)
            self.stats_delta.update(delta)
        z = torch.cat([self.stats_x.normalise(x), self.stats_delta.normalise(delta)], dim=-1)
        z = z + self.up(self.dropout(self.down(z)))
        return z[:, : self.d_in], z[:, self.d_in:]


@dataclass
class Captured:
    """Per target: inputs ``x [B, T, d_in]`` and output gradients ``δ [B, T, d_out]``; ``mask [B, T]`` real tokens."""

    x: dict[str, torch.Tensor]
    delta: dict[str, torch.Tensor]
    mask: torch.Tensor
    loss: torch.Tensor

    def tokens(self, name: str, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        keep = self.mask[row].bool()
        return self.x[name][row][keep], self.delta[name][row][keep]

    def weight_gradient(self, name: str) -> torch.Tensor:
        """``Σ_b Σ_t δ_t x_t^T`` (dense; for tests)."""
        m = self.mask.to(self.x[name].dtype)[..., None]
        return torch.einsum("bto,bti->oi", self.delta[name] * m, self.x[name] * m)


def _key(shape) -> str:
    return f"{shape[0]}x{shape[1]}"


def _param_name(target: str) -> str:
    return target.replace(".", "__")


class OpTuneEditor(nn.Module):
    """The OpTune edit computer (see the module docstring). Build with :meth:`for_model` or
    :meth:`from_pretrained`; :meth:`edit` gives ``{target: LowRankDelta}`` per sample."""

    def __init__(self, config: OpTuneConfig):
        super().__init__()
        if not config.targets:
            raise DeltaError("OpTuneConfig has no targets: build the editor with OpTuneEditor.for_model(model)")
        if config.rank < 1:
            raise DeltaError(f"rank must be >= 1, got {config.rank}")
        self.config = config
        shapes = sorted({tuple(s) for s in config.targets.values()})
        self.transforms = nn.ModuleDict({_key(s): GradientTransform(s[1], s[0], config.rank, config.dropout)
                                         for s in shapes})
        self.etas = nn.ParameterDict({_param_name(t): nn.Parameter(torch.tensor(float(config.eta_init)))
                                      for t in config.targets})

    # ------------------------------------------------------------------ construction / io
    @classmethod
    def for_model(cls, model: nn.Module, config: OpTuneConfig | None = None, **options) -> "OpTuneEditor":
        """An editor for ``model``'s ``config.modules`` in ``config.layers`` (default: q/v of the last two layers)."""
        if config is None:
            try:
                config = OpTuneConfig(**options)
            except TypeError as exc:  # an unknown keyword
                known = ", ".join(f for f in OpTuneConfig.__dataclass_fields__ if f not in ("targets", "model_type"))
                raise DeltaError(f"OpTuneEditor.for_model: {exc}; options: {known}") from None
        modules = dict(model.named_modules())
        names = find_targets(model, config.modules, config.layers)
        config.targets = {n: [modules[n].out_features, modules[n].in_features] for n in names}
        config.model_type = getattr(getattr(model, "config", None), "model_type", None)
        return cls(config)

    def check_model(self, model: nn.Module) -> None:
        """A :class:`DeltaError` when ``model`` lacks the edited layers or their shapes differ."""
        modules = dict(model.named_modules())
        model_type = getattr(getattr(model, "config", None), "model_type", None)
        problems = []
        if self.config.model_type and model_type and model_type != self.config.model_type:
            problems.append(f"model type {model_type!r} != {self.config.model_type!r}")
        for name, shape in self.config.targets.items():
            m = modules.get(name)
            if not isinstance(m, nn.Linear):
                problems.append(f"no nn.Linear {name!r}")
            elif [m.out_features, m.in_features] != list(shape):
                problems.append(f"{name} is {m.out_features}x{m.in_features}, the editor expects {shape[0]}x{shape[1]}")
        if problems:
            raise DeltaError("this OpTune editor was made for another model: " + "; ".join(problems[:4]))

    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        tmp = directory / (WEIGHTS_NAME + ".tmp")
        save_file(state, str(tmp))
        os.replace(tmp, directory / WEIGHTS_NAME)
        tmp = directory / (CONFIG_NAME + ".tmp")
        tmp.write_text(json.dumps(asdict(self.config), indent=2))
        os.replace(tmp, directory / CONFIG_NAME)
        return directory

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, model: nn.Module | None = None) -> "OpTuneEditor":
        """Load an editor; with ``model``, check that it was made for that model's layer names and shapes."""
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        directory = Path(directory)
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise DeltaError(f"{directory} is not a saved OpTune editor (no {name})")
        try:
            config = OpTuneConfig(**json.loads((directory / CONFIG_NAME).read_text()))
        except (TypeError, ValueError, DeltaError) as exc:
            raise DeltaError(f"{directory / CONFIG_NAME} is not an OpTune configuration: {exc}") from None
        editor = cls(config)
        try:
            state = load_file(str(directory / WEIGHTS_NAME))
        except (SafetensorError, OSError) as exc:
            raise DeltaError(f"{directory / WEIGHTS_NAME} is not a readable safetensors file: {exc}") from None
        try:
            editor.load_state_dict(state)
        except RuntimeError as exc:
            raise DeltaError(f"{directory / WEIGHTS_NAME} does not match its configuration: {exc}") from None
        bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
        if bad:
            raise DeltaError(f"{directory / WEIGHTS_NAME} holds non-finite values (NaN or inf) in {', '.join(bad[:3])}")
        if model is not None:
            editor.check_model(model)
        return editor.eval()

    # ------------------------------------------------------------------ edit sequence
    def edit_sequence(self, tokenizer, question, attempt: str, feedback: str | None = None) -> list[int]:
        """Token ids of ``chat(question) ‖ attempt ‖ feedback`` (the same function at training and test time).

        The chat template renders the whole conversation once and the text is tokenised without adding
        special tokens, so a BOS appears only where the template puts it (at the start), never mid-sequence.
        """
        feedback = self.config.feedback if feedback is None else validation.string("feedback", feedback,
                                                                                      error=DeltaError)
        messages = [{"role": "user", "content": question}] if isinstance(question, str) else list(question)
        messages = messages + [{"role": "assistant", "content": attempt},
                               {"role": "user", "content": feedback}]
        if not getattr(tokenizer, "chat_template", None):
            raise DeltaError("OpTune builds the edit sequence with the tokenizer's chat template; this one has none")
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=False)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    # ------------------------------------------------------------------ capture
    def capture(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> Captured:
        """One forward + backward of the edit sequences; per-token ``x_t`` and ``δ_t`` of every target.

        ``input_ids [B, T]`` (left or right padded; ``attention_mask`` 1 on real tokens). Loss = Σ_b mean NLL of
        sample b's real next tokens. Base parameters get no gradient; layers below the first target build no graph.
        """
        self.check_model(model)
        if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.dtype not in (
                torch.int64, torch.int32):
            raise DeltaError(f"input_ids must be an integer tensor [batch, tokens], got "
                             f"{type(input_ids).__name__} {getattr(input_ids, 'dtype', '')}")
        vocab = model.get_input_embeddings().num_embeddings
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise DeltaError(f"input_ids hold ids outside the model's vocabulary [0, {vocab})")
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if (attention_mask.sum(1) < 2).any():
            raise DeltaError("every edit sequence needs at least two tokens (one prediction)")
        modules = dict(model.named_modules())
        targets = list(self.config.targets)
        first_layer = _decoder_layer(model, targets)
        xs, deltas, handles = {}, {}, []

        def detach_input(module, args, kwargs):
            if args:
                return (args[0].detach().requires_grad_(True), *args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = kwargs["hidden_states"].detach().requires_grad_(True)
            return args, kwargs

        def record(name):
            def hook(module, args, output):
                xs[name] = args[0].detach()
                output.register_hook(lambda grad: deltas.__setitem__(name, grad.detach()))
            return hook

        saved = {p: p.requires_grad for p in model.parameters()}
        try:
            for p in model.parameters():
                p.requires_grad_(False)
            handles.append(first_layer.register_forward_pre_hook(detach_input, with_kwargs=True))
            for name in targets:
                handles.append(modules[name].register_forward_hook(record(name)))
            with torch.enable_grad():
                logits = model(input_ids=input_ids, attention_mask=attention_mask).logits
                loss = sequence_nll(logits, input_ids, attention_mask).sum()
                loss.backward()
        finally:
            for h in handles:
                h.remove()
            for p, flag in saved.items():
                p.requires_grad_(flag)
        missing = [n for n in targets if n not in deltas]
        if missing:
            raise DeltaError(f"no gradient reached {missing[0]} (is it below the loss?)")
        for name in targets:
            for what, t in (("input", xs[name]), ("gradient", deltas[name])):
                if not torch.isfinite(t).all():
                    raise DeltaError(f"non-finite {what} captured at {name} (loss {loss.item():.4g}): the edit "
                                     "sequence overflows the model's dtype or the model has NaN weights")
        return Captured(xs, deltas, attention_mask, loss.detach())

    # ------------------------------------------------------------------ edit
    def deltas_from(self, captured: Captured) -> list[dict[str, LowRankDelta]]:
        """Per sample ``{target: ΔW = η Σ_t δ̃_t x̃_t^T}`` (factored; differentiable in the editor's parameters)."""
        out = []
        for row in range(captured.mask.shape[0]):
            edits = {}
            for name, shape in self.config.targets.items():
                x, delta = captured.tokens(name, row)
                x_t, d_t = self.transforms[_key(shape)](x, delta)
                eta = self.etas[_param_name(name)]
                if x_t.shape[0] > min(shape):  # more tokens than the smaller side: the dense form is smaller
                    edits[name] = LowRankDelta.from_dense(eta * (d_t.T @ x_t))
                else:
                    edits[name] = LowRankDelta(x_t, d_t.T, eta)
            out.append(edits)
        return out

    def edit(self, model: nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None
             ) -> list[dict[str, LowRankDelta]]:
        """Capture + transform: one ``{target: LowRankDelta}`` per row of ``input_ids``."""
        return self.deltas_from(self.capture(model, input_ids, attention_mask))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())


def sequence_nll(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sample mean next-token NLL over positions whose target token is real (``mask`` [B, T], 1 = token)."""
    targets = input_ids[:, 1:]
    keep = (mask[:, 1:] * mask[:, :-1]).bool()
    nll = nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets, reduction="none")
    return (nll * keep).sum(1) / keep.sum(1).clamp(min=1)


def _decoder_layer(model: nn.Module, targets: list[str]) -> nn.Module:
    """The decoder layer module holding the lowest-numbered target (``...layers.<i>``)."""
    best = None
    for name in targets:
        found = re.search(r"^(.*?layers\.(\d+))\.", name)
        if found and (best is None or int(found.group(2)) < best[1]):
            best = (found.group(1), int(found.group(2)))
    if best is None:
        raise DeltaError(f"targets {targets[:2]} are not inside numbered decoder layers (...layers.<i>...)")
    return dict(model.named_modules())[best[0]]
