"""Q♯ value model (classifier): any HF causal-LM backbone plus a linear head.

Paper: Zhou et al., "Q♯: Provably Optimal Distributional RL for LLM Post-Training", arXiv 2502.20548
(reference code ``jinpz/q_sharp``).

The model predicts, for a prefix ``x, y≤t`` (prompt plus response tokens), the logits of the probability
``p = P(correct | prefix)`` under the reference policy (``loss`` ``bce``/``mse``: one logit) or of a pmf
over ``num_atoms`` return atoms (``loss`` ``mle``). Two head types:

* **V head** (``head="v"``): ``z(prefix) = W h_t`` with ``h_t`` the backbone's last hidden state at the
  last token of the prefix; ``W`` is ``[A, H]`` (``A = num_atoms``).
* **Q head** (``head="q"``): ``z(prefix[:t] + v) = W[v] h_{t-1}``: one output per vocabulary token
  (``W`` is ``[V * A, H]``, row ``v * A + a``), read at the position *before* the candidate token
  (it replaces the LM head). Only the rows of the needed tokens are ever gathered.

Two ways to run it, which must agree (the test suite checks it):

* training: :meth:`ValueModel.token_logits` scores every prefix of a batch of sequences in one forward;
* inference: :meth:`ValueModel.start` / :meth:`ValueModel.advance` keep an incremental KV cache (one token
  per step) and :meth:`ValueModel.candidate_logits` scores ``k`` candidate next tokens per row. For a V
  head the ``k`` candidates go through the backbone in **one** batched forward, all at position ``L``,
  each attending to the prefix and to itself only; their keys/values never stay in the persistent cache
  (transformers 5 caches mutate in place, so the cache is cropped back, or the pass runs
  on a scratch copy).

Positions are per row, ``cumsum(mask) - 1``, in both paths (left padding is harmless, also for absolute
position embeddings such as GPT-2's).
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch

from guidedecode.errors import GuideError, ModelLoadError
from guidedecode.hf_compat import cache_argument, layer_is_croppable

__all__ = ["ValueModelConfig", "ValueModel", "ValueState", "tokenizer_fingerprint"]

HEADS = ("v", "q")
LOSSES = ("bce", "mse", "mle")
INITS = ("zero", "reuse", "normal")
DEFAULT_MLE_ATOMS = 11
CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
ETA_CONVENTION = "eta = 1/eta_paper"


@dataclass
class ValueModelConfig:
    """What a checkpoint records besides its weights (head, loss, atoms, eta convention,
    tokenizer hash)."""

    head: str = "v"  # "v" (one output per prefix) or "q" (one output per vocabulary token)
    loss: str = "bce"  # "bce" | "mse" | "mle" (mle: distributional head with num_atoms outputs)
    num_atoms: int = 1  # 1 for bce/mse; default 11 for mle
    v_min: float = 0.0  # atom a_j = v_min + j * (v_max - v_min) / (num_atoms - 1)
    v_max: float = 1.0
    vocab_size: int = 0
    tokenizer_fingerprint: str = ""  # tokenizer_fingerprint(); "" = unknown (the check only compares sizes)
    eta_convention: str = ETA_CONVENTION
    backbone_config: dict = field(default_factory=dict)  # the HF backbone config (to_dict())

    def validate(self) -> None:
        if self.head not in HEADS:
            raise GuideError(f"unknown value head '{self.head}': choose one of {', '.join(HEADS)}")
        if self.loss not in LOSSES:
            raise GuideError(f"unknown value loss '{self.loss}': choose one of {', '.join(LOSSES)}")
        if not isinstance(self.num_atoms, int) or self.num_atoms < 1:
            raise GuideError(f"num_atoms must be a positive integer, got {self.num_atoms!r}")
        if self.loss == "mle" and self.num_atoms < 2:
            raise GuideError(f"loss 'mle' needs num_atoms >= 2, got {self.num_atoms}")
        if self.loss != "mle" and self.num_atoms != 1:
            raise GuideError(f"loss '{self.loss}' has one output per prefix: num_atoms must be 1, got {self.num_atoms}")
        if not float(self.v_max) > float(self.v_min):
            raise GuideError(f"v_max must exceed v_min, got v_min={self.v_min}, v_max={self.v_max}")
        if self.eta_convention != ETA_CONVENTION:
            raise GuideError(f"unsupported eta convention '{self.eta_convention}' "
                             f"(guidedecode uses '{ETA_CONVENTION}')")
        if not isinstance(self.vocab_size, int) or self.vocab_size < 1:
            raise GuideError(f"vocab_size must be a positive integer, got {self.vocab_size!r}")

    def atoms(self, device=None) -> torch.Tensor:
        """The return atoms ``linspace(v_min, v_max, num_atoms)`` (fp32)."""
        return torch.linspace(float(self.v_min), float(self.v_max), self.num_atoms, device=device)


@dataclass
class ValueState:
    """Per-row inference state of the value model (one generate batch).

    ``cache``: the backbone's KV cache of the consumed tokens (``length`` slots per row, including left
    padding and the slots of finished rows); ``mask``: ``[B, length]`` 1 for real tokens; ``next_pos``:
    ``[B]`` position of the next token (= number of real tokens so far); ``last_hidden``: ``[B, H]``
    hidden state at the last real token (the Q head reads it).
    """

    cache: object
    mask: torch.Tensor
    next_pos: torch.Tensor
    last_hidden: torch.Tensor
    length: int


def tokenizer_fingerprint(tokenizer) -> str:
    """sha256 over the sorted ``(id, token)`` pairs of ``get_vocab()`` and the BOS/EOS/UNK ids.

    The pad id is left out on purpose: loaders set it (e.g. to EOS) without changing the mapping.
    Two tokenizers of the same length but different mapping get different fingerprints.
    """
    vocab = tokenizer.get_vocab()
    digest = hashlib.sha256()
    for token, index in sorted(vocab.items(), key=lambda item: (item[1], item[0])):
        digest.update(f"{index}\t{token}\n".encode("utf-8", "surrogatepass"))
    for name in ("bos_token_id", "eos_token_id", "unk_token_id"):
        digest.update(f"{name}={getattr(tokenizer, name, None)}\n".encode())
    return digest.hexdigest()


def _positions(mask: torch.Tensor) -> torch.Tensor:
    """Per-row positions ``cumsum(mask) - 1`` (padding slots get 0; they are masked anyway)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


def _hidden_size(config) -> int:
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("hidden_size", "n_embd", "d_model"):
        value = getattr(text, name, None)
        if isinstance(value, int):
            return value
    raise GuideError(f"cannot find the hidden size of backbone config {type(config).__name__}")


def _truncated(base, num_layers: int):
    """A copy of the base model ``base`` with only its first ``num_layers`` decoder layers."""
    name = next((n for n in ("layers", "h") if isinstance(getattr(base, n, None), torch.nn.ModuleList)), None)
    if name is None:
        raise GuideError(f"cannot truncate {type(base).__name__}: no decoder layer list ('layers' or 'h')")
    total = len(getattr(base, name))
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or not 1 <= num_layers <= total:
        raise GuideError(f"num_layers must be an integer in [1, {total}] for this backbone, got {num_layers!r}")
    layers = getattr(base, name)
    setattr(base, name, torch.nn.ModuleList(list(layers)[:num_layers]))  # share, then deep-copy the whole
    try:
        copied = copy.deepcopy(base)
    finally:
        setattr(base, name, layers)
    config = copied.config
    for key in ("num_hidden_layers", "n_layer"):
        if hasattr(config, key):
            setattr(config, key, num_layers)
    if isinstance(getattr(config, "layer_types", None), list):
        config.layer_types = config.layer_types[:num_layers]
    return copied


def _saved_tokenizer(model):
    """The tokenizer saved with ``model`` (its ``name_or_path`` directory), or a GuideError asking for one."""
    from guidedecode.models import load_tokenizer

    path = str(getattr(model, "name_or_path", "") or "")
    if path and Path(path).is_dir():
        try:
            return load_tokenizer(path)
        except ModelLoadError:
            pass
    raise GuideError(
        "ValueModel.from_backbone needs tokenizer= (the reference model's tokenizer): its fingerprint is "
        "recorded so that a tokenizer with another id mapping is refused later, and this backbone has no saved "
        f"tokenizer (name_or_path {path!r})")


def _fsync_replace(tmp: str, final: Path) -> None:
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, final)


class ValueModel(torch.nn.Module):
    """HF base model (hidden states, no LM head) + ``head``: ``Linear(H, A)`` (V) or ``Linear(H, V*A)`` (Q)."""

    def __init__(self, backbone, config: ValueModelConfig):
        super().__init__()
        config.validate()
        self.config = config
        self.backbone = backbone
        hidden = _hidden_size(backbone.config)
        out = config.num_atoms if config.head == "v" else config.vocab_size * config.num_atoms
        dtype = next(backbone.parameters()).dtype
        device = next(backbone.parameters()).device
        self.head = torch.nn.Linear(hidden, out, bias=False, dtype=dtype, device=device)
        self._cache_argument = cache_argument(backbone)

    # ------------------------------------------------------------------------------------------ building
    @classmethod
    def from_backbone(cls, model, *, head: str = "v", loss: str = "bce", num_atoms: int | None = None,
                      init: str = "zero", tokenizer=None, num_layers: int | None = None,
                      generator: torch.Generator | None = None) -> "ValueModel":
        """A value model on a *copy* of ``model``'s base model (the reference model is never shared).

        ``model``: an HF causal LM (its base model is used; its ``lm_head`` seeds a Q head with
        ``init="reuse"``), a bare base model (e.g. ``LlamaModel``), or a name for
        :func:`guidedecode.load_model`. ``init``: ``"zero"`` (default; the first collection round),
        ``"reuse"`` (Q only: copies the LM head, the same rows for every atom) or ``"normal"`` (std 0.02).
        A zero head is untrained, not neutral: every candidate gets ``z = 0`` (p = 1/2), so Q♯ adds the same
        offset ``log((1 + e^eta) / 2)`` to all top-k tokens, boosting the top-k against the tail.
        ``tokenizer``: the reference model's tokenizer; its fingerprint is recorded so that
        :meth:`check_tokenizer` refuses one with another id mapping. Without it the tokenizer saved with the
        backbone (its local ``name_or_path``) is used, and a backbone without one is an error.
        ``num_layers`` keeps only the first that many decoder layers (then the final norm): a smaller,
        cheaper value model that shares the reference's embeddings and tokenizer (Q♯ guides a large model
        with a small one).
        ``generator``: the (CPU) random generator of ``init="normal"``; pass a seeded one for a head that
        does not depend on the global random state (the trainer does, so a resumed run is identical).
        """
        if isinstance(model, (str, os.PathLike)):
            from guidedecode.models import load_model

            model, loaded_tokenizer = load_model(model)
            tokenizer = tokenizer if tokenizer is not None else loaded_tokenizer
        if not isinstance(model, torch.nn.Module) or not hasattr(model, "config"):
            raise GuideError(f"value model backbone must be an HF model or a model name, got {type(model).__name__}")
        if init not in INITS:
            raise GuideError(f"unknown head init '{init}': choose one of {', '.join(INITS)}")
        if num_atoms is None:
            num_atoms = DEFAULT_MLE_ATOMS if loss == "mle" else 1
        if tokenizer is None:
            tokenizer = _saved_tokenizer(model)
        lm_head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        base = getattr(model, "base_model", model)
        if num_layers is not None:
            base = _truncated(base, num_layers)
        embeddings = base.get_input_embeddings()
        config = ValueModelConfig(
            head=head, loss=loss, num_atoms=num_atoms, vocab_size=int(embeddings.num_embeddings),
            tokenizer_fingerprint=tokenizer_fingerprint(tokenizer),
            backbone_config=json.loads(base.config.to_json_string(use_diff=False)),
        )
        config.validate()
        if init == "reuse" and head != "q":
            raise GuideError("init='reuse' copies the LM head into a Q head; a V head takes 'zero' or 'normal'")
        if init == "reuse" and lm_head is None:
            raise GuideError("init='reuse' needs a causal LM with an LM head, got a bare base model")
        vm = cls(base if num_layers is not None else copy.deepcopy(base), config)
        with torch.no_grad():
            if init == "zero":
                vm.head.weight.zero_()
            elif init == "normal":
                draw = torch.randn(vm.head.weight.shape, generator=generator, dtype=torch.float32) * 0.02
                vm.head.weight.copy_(draw)
            else:
                source = lm_head.weight
                if source.shape != (config.vocab_size, vm.head.in_features):
                    raise GuideError(f"LM head of shape {tuple(source.shape)} does not match vocabulary "
                                     f"{config.vocab_size} x hidden {vm.head.in_features}")
                vm.head.weight.view(config.vocab_size, num_atoms, -1).copy_(source[:, None, :])
        return vm.eval()

    def save_pretrained(self, directory) -> None:
        """Write ``config.json`` (:class:`ValueModelConfig`) and ``model.safetensors`` atomically."""
        from safetensors.torch import save_model

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".model-", suffix=".tmp")
        os.close(fd)
        try:
            save_model(self, tmp, metadata={"format": "pt"})
            _fsync_replace(tmp, directory / WEIGHTS_NAME)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=".config-", suffix=".tmp")
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(asdict(self.config), handle, indent=2, sort_keys=True)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, directory / CONFIG_NAME)
        finally:
            if os.path.exists(tmp):
                os.remove(tmp)

    @classmethod
    def from_pretrained(cls, directory, *, device=None, dtype=None) -> "ValueModel":
        """Load a :meth:`save_pretrained` directory; :class:`ModelLoadError` names what is missing or corrupt."""
        from safetensors import SafetensorError, safe_open
        from safetensors.torch import load_model
        from transformers import AutoConfig, AutoModel

        directory = Path(directory)
        config_path, weights_path = directory / CONFIG_NAME, directory / WEIGHTS_NAME
        for path in (config_path, weights_path):
            if not path.is_file():
                raise ModelLoadError(f"value model checkpoint {directory}: missing {path.name}")
        try:
            raw = json.loads(config_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ModelLoadError(f"value model checkpoint {directory}: {CONFIG_NAME} is not valid JSON "
                                 f"({exc})") from exc
        known = {f.name for f in fields(ValueModelConfig)}
        if not isinstance(raw, dict) or set(raw) - known:
            extra = sorted(set(raw) - known) if isinstance(raw, dict) else raw
            raise ModelLoadError(f"value model checkpoint {directory}: {CONFIG_NAME} has unknown entries {extra}")
        config = ValueModelConfig(**raw)
        try:
            config.validate()
        except GuideError as exc:
            raise ModelLoadError(f"value model checkpoint {directory}: {exc}") from exc
        backbone_config = dict(config.backbone_config)
        model_type = backbone_config.pop("model_type", None)
        if not model_type:
            raise ModelLoadError(f"value model checkpoint {directory}: backbone_config has no model_type")
        try:  # transformers' config validators raise their own error types (e.g. a hidden size of the wrong shape)
            hf_config = AutoConfig.for_model(model_type, **backbone_config)
        except Exception as exc:
            reason = " ".join(str(exc).split())[:300]
            raise ModelLoadError(f"value model checkpoint {directory}: bad backbone_config in {config_path} "
                                 f"({type(exc).__name__}: {reason})") from exc
        try:
            with safe_open(str(weights_path), framework="pt") as handle:
                stored = handle.get_slice("head.weight").get_dtype()
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise ModelLoadError(f"value model checkpoint {directory}: {WEIGHTS_NAME} is unreadable ({exc})") from exc
        stored_dtype = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64}
        load_dtype = stored_dtype.get(stored, torch.float32)
        backbone = AutoModel.from_config(hf_config, dtype=load_dtype)
        vm = cls(backbone, config)
        try:
            load_model(vm, str(weights_path), strict=True)
        except (SafetensorError, OSError, RuntimeError, KeyError, ValueError) as exc:
            reason = " ".join(str(exc).split())[:300]
            raise ModelLoadError(f"value model checkpoint {directory}: weights do not match the config "
                                 f"({reason})") from exc
        if dtype is not None or device is not None:
            vm = vm.to(device=device, dtype=dtype)
        return vm.eval()

    def check_tokenizer(self, tokenizer) -> None:
        """:class:`GuideError` unless ``tokenizer`` maps tokens to ids exactly like the value model's."""
        size = len(tokenizer)
        if size > self.config.vocab_size:
            raise GuideError(f"tokenizer has {size} tokens but the value model's vocabulary has "
                             f"{self.config.vocab_size}")
        if not self.config.tokenizer_fingerprint:
            return  # no recorded tokenizer: only the size could be checked
        fingerprint = tokenizer_fingerprint(tokenizer)
        if fingerprint != self.config.tokenizer_fingerprint:
            raise GuideError(
                "tokenizer mismatch: the reference tokenizer maps tokens to ids differently from the value model's "
                f"(fingerprint {fingerprint[:12]} vs {self.config.tokenizer_fingerprint[:12]}); "
                "the value model must share the reference model's tokenizer")

    def freeze_backbone(self, trainable_layers: int | None) -> list[torch.nn.Parameter]:
        """Train only the head and the top ``trainable_layers`` decoder layers (with the final norm);
        ``None`` trains everything, ``0`` the head alone. Returns the trainable parameters."""
        name = next((n for n in ("layers", "h") if isinstance(getattr(self.backbone, n, None), torch.nn.ModuleList)),
                    None)
        total = len(getattr(self.backbone, name)) if name else 0
        if trainable_layers is None:
            self.requires_grad_(True)
            return list(self.parameters())
        if name is None or not 0 <= trainable_layers <= total:
            raise GuideError(f"trainable_layers must be in [0, {total}] for this backbone, got {trainable_layers}")
        self.requires_grad_(False)
        self.head.requires_grad_(True)
        if trainable_layers:
            for layer in list(getattr(self.backbone, name))[total - trainable_layers:]:
                layer.requires_grad_(True)
            for norm in ("norm", "ln_f"):
                if isinstance(getattr(self.backbone, norm, None), torch.nn.Module):
                    getattr(self.backbone, norm).requires_grad_(True)
        return [p for p in self.parameters() if p.requires_grad]

    # ------------------------------------------------------------------------------------------ head
    @property
    def num_atoms(self) -> int:
        return self.config.num_atoms

    def _v_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[..., H] -> [..., A]`` fp32."""
        return torch.nn.functional.linear(hidden.float(), self.head.weight.float())

    def _q_head(self, hidden: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
        """Gathered Q head: ``hidden [B, H]`` or ``[B, T, H]``, ``token_ids [B, k]`` or ``[B, T]`` ->
        ``[B, k, A]`` / ``[B, T, A]`` fp32 = ``W[v] · h`` for the named tokens only."""
        rows = self.head.weight.view(self.config.vocab_size, self.num_atoms, -1)[token_ids].float()  # [B,k,A,H]
        if hidden.dim() == 2:
            return torch.einsum("bkah,bh->bka", rows, hidden.float())
        return torch.einsum("btah,bth->bta", rows, hidden.float())

    def _check_ids(self, ids: torch.Tensor, what: str) -> None:
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= self.config.vocab_size):
            raise GuideError(f"{what} contain token ids outside the value model's vocabulary "
                             f"[0, {self.config.vocab_size})")

    # ------------------------------------------------------------------------------------------ training
    def token_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B, T, A]`` fp32: entry ``t`` = head logits of the prefix ending with token ``t``.

        V head: ``W h_t``; Q head: ``W[input_ids[t]] h_{t-1}`` (entry 0 is 0: no prefix). Left-padded rows,
        positions ``cumsum(mask) - 1`` (the same as :meth:`start`).
        """
        device = self.head.weight.device
        input_ids = input_ids.to(device)
        mask = torch.ones_like(input_ids) if attention_mask is None else attention_mask.to(device).long()
        hidden = self.backbone(input_ids=input_ids, attention_mask=mask, position_ids=_positions(mask),
                               use_cache=False).last_hidden_state
        if self.config.head == "v":
            return self._v_head(hidden)
        B, T = input_ids.shape
        out = torch.zeros(B, T, self.num_atoms, dtype=torch.float32, device=device)
        if T > 1:
            out[:, 1:] = self._q_head(hidden[:, :-1], input_ids[:, 1:])
        return out

    def probability(self, logits: torch.Tensor) -> torch.Tensor:
        """``[...]`` P(correct) from head logits ``[..., A]``: σ(z) for bce/mse, Σ_j softmax(z)_j a_j for mle."""
        logits = logits.float()
        if self.config.loss == "mle":
            return (torch.softmax(logits, -1) * self.config.atoms(logits.device)).sum(-1)
        return torch.sigmoid(logits[..., 0])

    @torch.no_grad()
    def value(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """``[B]`` P(correct) of each left-padded row's whole sequence (its last position): a reward score."""
        return self.probability(self.token_logits(input_ids, attention_mask)[:, -1])

    # ------------------------------------------------------------------------------------------ inference
    def _forward(self, ids, mask, positions, cache):
        return self.backbone(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                             **{self._cache_argument: cache})

    @torch.no_grad()
    def start(self, prompt_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> ValueState:
        """Consume left-padded prompts ``[B, T]``; returns the state after the last prompt token."""
        from transformers import DynamicCache

        device = self.head.weight.device
        ids = prompt_ids.to(device)
        self._check_ids(ids, "prompts")
        mask = torch.ones_like(ids) if attention_mask is None else attention_mask.to(device).long()
        cache = DynamicCache(config=self.backbone.config)
        out = self._forward(ids, mask, _positions(mask), cache)  # fills `cache` in place
        return ValueState(cache=cache, mask=mask, next_pos=mask.sum(-1),
                          last_hidden=out.last_hidden_state[:, -1], length=ids.shape[1])

    @torch.no_grad()
    def advance(self, state: ValueState, tokens: torch.Tensor, alive: torch.Tensor | None = None) -> None:
        """Consume one token per row (``tokens [B]``), in place. Rows with ``alive[i] = False`` (finished:
        their token is padding) get a masked slot and keep their position and hidden state."""
        device = self.head.weight.device
        tokens = tokens.to(device).view(-1, 1)
        step = torch.ones_like(tokens) if alive is None else alive.to(device).long().view(-1, 1)
        mask = torch.cat([state.mask, step], dim=1)
        out = self._forward(tokens, mask, state.next_pos.view(-1, 1), state.cache)
        keep = step.bool()
        state.last_hidden = torch.where(keep, out.last_hidden_state[:, 0], state.last_hidden)
        state.mask = mask
        state.next_pos = state.next_pos + step.view(-1)
        state.length += 1

    @torch.no_grad()
    def candidate_logits(self, state: ValueState, candidate_ids: torch.Tensor) -> torch.Tensor:
        """``[B, k] -> [B, k, A]`` fp32: the head logits of ``prefix + candidate`` for each candidate."""
        device = self.head.weight.device
        candidate_ids = candidate_ids.to(device)
        if self.config.head == "q":
            return self._q_head(state.last_hidden, candidate_ids)
        if self._can_crop(state.cache):
            hidden = self._candidates_masked(state, candidate_ids)
        else:
            hidden = self._candidates_scratch(state, candidate_ids)
        return self._v_head(hidden)

    def _can_crop(self, cache) -> bool:
        """The masked pass needs full-attention croppable layers and an attention that takes a 4D mask."""
        attn = getattr(self.backbone.config, "_attn_implementation", None)
        layers = getattr(cache, "layers", None)
        return (attn in ("sdpa", "eager") and layers is not None
                and all(layer_is_croppable(layer) and not layer.is_sliding for layer in layers))

    def _candidates_masked(self, state: ValueState, cand: torch.Tensor) -> torch.Tensor:
        """All ``k`` candidates as ``k`` query tokens of each row at position ``L``: a 4D mask lets each see
        the row's prefix and itself only (a tree mask, as in speculative-decoding verification); the ``k``
        keys/values the pass appends are cropped off again."""
        B, k = cand.shape
        L = state.length
        cache = state.cache
        if cache.get_seq_length() != L:
            raise GuideError(f"value model cache holds {cache.get_seq_length()} positions, expected {L}")
        prefix = state.mask.bool()[:, None, :].expand(B, k, L)
        own = torch.eye(k, dtype=torch.bool, device=cand.device).expand(B, k, k)
        allowed = torch.cat([prefix, own], dim=-1)[:, None]  # [B, 1, k, L + k]
        dtype = self.head.weight.dtype
        additive = torch.zeros(allowed.shape, dtype=dtype, device=cand.device)
        additive.masked_fill_(~allowed, torch.finfo(dtype).min)
        positions = state.next_pos.view(-1, 1).expand(B, k)
        try:
            out = self._forward(cand, additive, positions, cache)
        finally:
            grown = cache.get_seq_length() - L
            if grown > 0:
                cache.crop(-grown)
        if cache.get_seq_length() != L:
            raise GuideError("value model cache could not be restored after the candidate pass")
        return out.last_hidden_state

    def _candidates_scratch(self, state: ValueState, cand: torch.Tensor) -> torch.Tensor:
        """Fallback for caches that cannot be cropped (sliding windows) or attention without 4D masks: a
        scratch copy of the cache repeated ``k`` times per row, one candidate per copy (more memory)."""
        B, k = cand.shape
        scratch = copy.deepcopy(state.cache)
        scratch.batch_repeat_interleave(k)
        ones = torch.ones(B * k, 1, dtype=state.mask.dtype, device=cand.device)
        mask = torch.cat([state.mask.repeat_interleave(k, dim=0), ones], dim=1)
        positions = state.next_pos.repeat_interleave(k).view(-1, 1)
        out = self._forward(cand.reshape(B * k, 1), mask, positions, scratch)
        return out.last_hidden_state.view(B, k, -1)

    def select(self, state: ValueState, rows: torch.Tensor) -> ValueState:
        """The state of rows ``rows`` (reorder/duplicate: beams, ``num_return_sequences``). The cache is
        re-indexed in place, so ``state`` itself must not be used afterwards."""
        rows = rows.to(state.mask.device)
        state.cache.batch_select_indices(rows)
        return ValueState(cache=state.cache, mask=state.mask[rows], next_pos=state.next_pos[rows],
                          last_hidden=state.last_hidden[rows], length=state.length)
