"""Token guides as vLLM logits processors (both runner interfaces in one class).

A :class:`GuideLogitsProcessor` owns one :class:`~guidedecode.guides.TokenGuide` per guided request and
feeds it that request's token history (prompt + generated so far) at every step; the guide's
content-keyed bookkeeping (:class:`~guidedecode.guides.TokenGuide`) advances its state by one token when
the history grew by one, and rebuilds it from the whole history otherwise. That rebuild is the catch-up
replay vLLM needs: a new request, a request resumed after preemption (its KV cache recomputed, several
tokens later), or a request moved between batch slots are all brought up to date from their tokens.
Rows whose request asked for no guidance are never touched.

The two vLLM interfaces (vLLM 0.32-0.33, ``vllm/v1/sample/logits_processor`` and
``vllm/v1/worker/gpu/sample/logits_processor``):

* **V1 runner**: ``__init__(vllm_config, device, is_pin_memory)``; ``update_state(BatchUpdate)`` with
  removed -> added -> moved, ``added`` carrying a *live* reference to the request's output ids;
  ``apply(logits)`` with row ``i`` = persistent-batch index ``i``.
* **Model Runner V2**: ``__init__(vllm_config, req_states)``; ``add_request(slot, params) -> bool``
  (slots are recycled: the slot's old guide is always replaced or dropped); ``apply(logits, ctx)`` with
  row ``r`` belonging to slot ``ctx.expanded_idx_mapping[r]``; a row's history is the committed tokens
  ``req_states.all_token_ids[slot, :pos[r]]`` followed by the token fed at ``pos[r]`` (``ctx.input_ids[r]``).

Per-request settings come from ``SamplingParams.extra_args`` and are checked by ``validate_params`` at
admission (a ``ValueError``: HTTP 400 from ``vllm serve``), so a bad value never reaches the engine.
Rows are processed one request at a time (the per-request guide keeps its own value-model cache).
"""

from __future__ import annotations

import math
import os
from collections import OrderedDict
from typing import Any

import torch
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor

from guidedecode.errors import GuideError
from guidedecode.guides.base import TokenGuide

__all__ = ["ActionLine", "GuideLogitsProcessor", "PlanningTokens", "QSharp"]


class _Request:
    """One guided request: its guide and (V1) the live token lists vLLM hands over."""

    __slots__ = ("guide", "prompt_ids", "output_ids")

    def __init__(self, guide: TokenGuide, prompt_ids: list[int] | None = None, output_ids: list[int] | None = None):
        self.guide = guide
        self.prompt_ids = prompt_ids
        self.output_ids = output_ids

    def adjust(self, history: list[int], row: torch.Tensor) -> torch.Tensor:
        ids = torch.tensor([history], dtype=torch.long, device=row.device)
        return self.guide(ids, row[None])[0]


class GuideLogitsProcessor(V1LogitsProcessor, V2LogitsProcessor):
    """Base class: a token guide per request, for both vLLM runner interfaces.

    Subclasses implement :meth:`options` (classmethod: the request's guide settings from its
    ``extra_args``, ``None`` when it asked for no guidance, ``ValueError`` for a bad value) and
    :meth:`make_guide` (a fresh guide for those settings), and may override :meth:`setup` (load models
    once per engine).
    """

    def __init__(self, vllm_config, *args):
        if len(args) == 1:  # Model Runner V2: (vllm_config, req_states)
            self.req_states = args[0]
            self.device = torch.device(args[0].device)
        elif len(args) == 2:  # V1 runner: (vllm_config, device, is_pin_memory)
            self.req_states = None
            self.device = torch.device(args[0]) if args[0] is not None else torch.device("cpu")
        else:
            raise TypeError(f"{type(self).__name__} takes (vllm_config, req_states) or "
                            f"(vllm_config, device, is_pin_memory), got {1 + len(args)} arguments")
        self.vllm_config = vllm_config
        self.requests: dict[int, _Request] = {}  # V1: persistent-batch index; V2: request slot
        self.setup(vllm_config)

    # --------------------------------------------------------------------- method-specific parts
    def setup(self, vllm_config) -> None:
        """Load what every request shares (called once per engine)."""

    @classmethod
    def options(cls, extra_args: dict[str, Any]) -> dict[str, Any] | None:
        raise NotImplementedError

    def make_guide(self, options: dict[str, Any], sampling_params) -> TokenGuide:
        raise NotImplementedError

    # --------------------------------------------------------------------- shared by both runners
    @classmethod
    def validate_params(cls, sampling_params) -> None:
        cls.options(dict(sampling_params.extra_args or {}))

    def _new_request(self, sampling_params, prompt_ids=None, output_ids=None) -> _Request | None:
        options = self.options(dict(sampling_params.extra_args or {}))
        if options is None:
            return None
        return _Request(self.make_guide(options, sampling_params), prompt_ids, output_ids)

    def is_argmax_invariant(self) -> bool:
        return False  # guidance changes which token is most likely: greedy rows need it too

    # --------------------------------------------------------------------- V1 runner
    def update_state(self, batch_update: BatchUpdate | None) -> None:
        if batch_update is None:
            return
        for index in batch_update.removed:
            self.requests.pop(index, None)
        for index, params, prompt_ids, output_ids in batch_update.added:
            request = self._new_request(params, list(prompt_ids or []), output_ids)
            if request is None:
                self.requests.pop(index, None)
            else:
                self.requests[index] = request
        for a, b, direction in batch_update.moved:
            moving, other = self.requests.pop(a, None), self.requests.pop(b, None)
            if moving is not None:
                self.requests[b] = moving
            if other is not None and direction == MoveDirectionality.SWAP:
                self.requests[a] = other

    # --------------------------------------------------------------------- V2 runner
    def add_request(self, req_idx: int, sampling_params) -> bool:
        request = self._new_request(sampling_params)
        if request is None:
            self.requests.pop(req_idx, None)
            return False
        self.requests[req_idx] = request
        return True

    # --------------------------------------------------------------------- both
    def apply(self, logits: torch.Tensor, ctx=None) -> torch.Tensor:
        if not self.requests:
            return logits
        if ctx is None:  # V1: row i is persistent-batch index i
            for index, request in self.requests.items():
                if index < logits.shape[0]:
                    logits[index] = request.adjust(request.prompt_ids + list(request.output_ids), logits[index])
            return logits
        slots = ctx.expanded_idx_mapping.tolist()
        positions = ctx.pos.tolist()
        fed = ctx.input_ids.tolist()
        committed = self.req_states.all_token_ids.gpu
        for row, slot in enumerate(slots):
            request = self.requests.get(slot)
            if request is not None:
                history = committed[slot, : positions[row]].tolist() + [fed[row]]
                logits[row] = request.adjust(history, logits[row])
        return logits


# ------------------------------------------------------------------------------------------ Q#
VALUE_MODEL_ENV = "GUIDEDECODE_VALUE_MODEL"
VALUE_MODEL_ROOT_ENV = "GUIDEDECODE_VALUE_MODEL_ROOT"
KEEP_VALUE_MODELS = 2
"""Per-request value models an engine keeps loaded (besides its default)."""


class QSharp(GuideLogitsProcessor):
    """Q♯ value guidance (Zhou et al., arXiv 2502.20548) in vLLM: ``l_v + o_v`` on the top-``k`` candidates,
    ``o_v = log(1 - p_v + p_v e^eta)`` with ``p_v`` the value model's probability that ``prefix + v``
    ends correct (modes as :func:`~guidedecode.guides.qsharp.qsharp_offsets`).

    The value model is a :class:`~guidedecode.ValueModel` ``save_pretrained`` directory: the engine's
    default is ``$GUIDEDECODE_VALUE_MODEL`` (loaded at engine start). A request may name another one
    (``qsharp_value_model``) only where the engine's operator allows it: the directory must lie under
    ``$GUIDEDECODE_VALUE_MODEL_ROOT`` (clients cannot make a server read arbitrary paths); it is loaded on
    first use onto the engine's device, the :data:`KEEP_VALUE_MODELS` most recently used kept.
    Per request (``SamplingParams.extra_args`` / ``vllm_xargs``):

    * ``qsharp_eta``: guidance strength ``1/eta_paper`` (> 0); absent or 0: the request is untouched;
    * ``qsharp_value_model``: a value-model directory under ``$GUIDEDECODE_VALUE_MODEL_ROOT`` (default:
      ``$GUIDEDECODE_VALUE_MODEL``);
    * ``qsharp_mode``: ``bernoulli`` (default; ``mle`` for an mle value model), ``cd``, ``expectation``,
      ``fudge``;
    * ``qsharp_top_k``: candidates per step (default 20; -1 = whole vocabulary);
    * ``qsharp_tail``: ``zero`` (default: tokens outside the top-k keep their logit) or ``mask``.
    """

    KEYS = ("qsharp_eta", "qsharp_mode", "qsharp_top_k", "qsharp_tail", "qsharp_value_model")

    @classmethod
    def options(cls, extra_args):
        from guidedecode.guides.qsharp import MODES

        unknown = sorted(k for k in extra_args if k.startswith("qsharp_") and k not in cls.KEYS)
        if unknown:
            raise ValueError(f"unknown Q# request argument(s) {unknown}: known are {list(cls.KEYS)}")
        eta = extra_args.get("qsharp_eta")
        if eta is None:
            if any(k in extra_args for k in cls.KEYS):
                raise ValueError("qsharp_mode / qsharp_top_k given without qsharp_eta (the guidance strength)")
            return None
        if isinstance(eta, bool) or not isinstance(eta, (int, float)) or not math.isfinite(eta) or eta < 0:
            raise ValueError(f"qsharp_eta must be a finite number >= 0, got {eta!r}")
        if eta == 0:
            return None
        mode = extra_args.get("qsharp_mode")
        if mode is not None and mode not in MODES:
            raise ValueError(f"qsharp_mode must be one of {list(MODES)}, got {mode!r}")
        top_k = extra_args.get("qsharp_top_k", 20)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not (top_k == -1 or top_k >= 1):
            raise ValueError(f"qsharp_top_k must be an integer >= 1 or -1 (whole vocabulary), got {top_k!r}")
        tail = extra_args.get("qsharp_tail")
        if tail is not None and tail not in ("zero", "mask"):
            raise ValueError(f"qsharp_tail must be 'zero' or 'mask', got {tail!r}")
        directory = extra_args.get("qsharp_value_model")
        if directory is None:
            if not os.environ.get(VALUE_MODEL_ENV):
                raise ValueError(f"this request asks for Q# guidance but names no value model: give "
                                 f"qsharp_value_model or set ${VALUE_MODEL_ENV} for the engine")
        else:
            directory = cls._allowed_value_model(directory)
        return {"eta": float(eta), "mode": mode, "top_k": top_k, "tail": tail, "value_model": directory}

    @staticmethod
    def _allowed_value_model(directory) -> str:
        """The resolved path of a request's ``qsharp_value_model``, if the engine allows it."""
        root = os.environ.get(VALUE_MODEL_ROOT_ENV)
        if not root:
            raise ValueError(f"this engine takes no per-request value models (qsharp_value_model): its operator "
                             f"allows them by setting ${VALUE_MODEL_ROOT_ENV} to the directory they must lie under")
        if not isinstance(directory, str) or not directory:
            raise ValueError(f"qsharp_value_model must be a directory path, got {directory!r}")
        resolved, allowed = os.path.realpath(directory), os.path.realpath(root)
        if os.path.commonpath([resolved, allowed]) != allowed:
            raise ValueError(f"qsharp_value_model {directory!r} is not under ${VALUE_MODEL_ROOT_ENV}")
        if not os.path.isfile(os.path.join(resolved, "config.json")):
            raise ValueError(f"qsharp_value_model {directory!r} is not a saved ValueModel (no config.json; "
                             "ValueModel.save_pretrained writes one)")
        return resolved

    def setup(self, vllm_config):
        self.value_models: OrderedDict[str, Any] = OrderedDict()  # per-request ones, least recently used first
        self._served_tokenizer = None  # loaded on the first value-model check
        directory = os.environ.get(VALUE_MODEL_ENV)
        # a broken default is an error at engine start, not at the first request
        self.default = self._load(directory) if directory else None

    def load_value_model(self, directory: str | None):
        """The engine's default value model (``None``), or the one saved in ``directory`` (loaded on first
        use, its tokenizer checked against the served one; the least recently used beyond
        :data:`KEEP_VALUE_MODELS` dropped; requests already running keep theirs)."""
        if directory is None:
            return self.default
        if directory in self.value_models:
            self.value_models.move_to_end(directory)
        else:
            self.value_models[directory] = self._load(directory)
            while len(self.value_models) > KEEP_VALUE_MODELS:
                self.value_models.popitem(last=False)
        return self.value_models[directory]

    def _load(self, directory: str):
        from guidedecode.value_model import ValueModel

        value_model = ValueModel.from_pretrained(directory, device=self.device)
        self._check_tokenizer(value_model)
        return value_model

    def _check_tokenizer(self, value_model) -> None:
        """The value model must share the served model's tokenizer (it reads the same token ids)."""
        if self._served_tokenizer is None:
            try:
                self._served_tokenizer = _served_tokenizer(self.vllm_config)
            except (OSError, ValueError, GuideError):
                return  # no tokenizer named, or a hub one not in the local cache: the engine itself reports it
        value_model.check_tokenizer(self._served_tokenizer)

    def make_guide(self, options, sampling_params):
        from guidedecode.guides.qsharp import QSharpGuide

        value_model = self.load_value_model(options["value_model"])
        if value_model is None:  # validate_params refused it already, unless the engine's environment differs
            raise GuideError(f"a Q# request names no value model and the engine has no ${VALUE_MODEL_ENV}")
        temperature = float(sampling_params.temperature or 0.0)
        return QSharpGuide(
            value_model,
            eta=options["eta"],
            mode=options["mode"],
            top_k=options["top_k"],
            tail=options["tail"],
            # KL bookkeeping only (vLLM applies temperature and top-p itself, after this processor)
            temperature=temperature if temperature > 0 else 1.0,
            top_p=float(sampling_params.top_p or 1.0),
        )


# ------------------------------------------------------------------------------------------ shared helpers
def _flag(extra_args: dict, key: str) -> bool:
    value = extra_args.get(key, 0)
    if value in (0, 1) and not isinstance(value, float) or isinstance(value, bool):
        return bool(value)
    raise ValueError(f"{key} must be 0 or 1 (false or true), got {value!r}")


def _served_tokenizer(vllm_config):
    """The served model's tokenizer, from local files (the engine has loaded it already)."""
    from transformers import AutoTokenizer

    name = getattr(getattr(vllm_config, "model_config", None), "tokenizer", None)
    if not name:
        raise GuideError("this processor needs the served model's tokenizer, but the vLLM config names none")
    return AutoTokenizer.from_pretrained(name, local_files_only=True)


# ------------------------------------------------------------------------------------------ DOTS action line
class ActionLine(GuideLogitsProcessor):
    """DOTS (Yue et al., arXiv 2410.03864): every ``Required Action:`` line of a request is one of the 12
    reasoning-action trajectories (:class:`~guidedecode.dots.action_line.ActionLineGuide`, an outlines-core
    automaton over the served tokenizer); text before and after stays free.

    Per request: ``dots_action_line`` = 1 turns it on (absent or 0: untouched).
    """

    KEYS = ("dots_action_line",)

    @classmethod
    def options(cls, extra_args):
        unknown = sorted(k for k in extra_args if k.startswith("dots_") and k not in cls.KEYS)
        if unknown:
            raise ValueError(f"unknown DOTS request argument(s) {unknown}: known are {list(cls.KEYS)}")
        return {} if _flag(extra_args, "dots_action_line") else None

    def setup(self, vllm_config):
        self.tokenizer = _served_tokenizer(vllm_config)

    def make_guide(self, options, sampling_params):
        from guidedecode.dots.action_line import ActionLineGuide

        return ActionLineGuide(self.tokenizer)


# ------------------------------------------------------------------------------------------ planning tokens
PLANNER_ENV = "GUIDEDECODE_PLANNER"


class PlanningTokens(GuideLogitsProcessor):
    """Planning tokens (Wang et al., arXiv 2310.05707; memory/reason tokens, Jin et al., arXiv 2411.13504):
    block completion and type steering of :class:`~guidedecode.guides.planning.PlanningTokenGuide` for a
    served planner checkpoint. ``$GUIDEDECODE_PLANNER`` names the planner directory (its
    ``planning_tokens.json``; the merged export that vLLM serves has it).

    Per request: ``planning`` = 1 turns it on (block completion); ``planning_force_type`` (a type name),
    ``planning_ban_types`` (a list of type names), ``planning_memory_before_reason`` (0/1),
    ``planning_max_steps`` (an integer >= 0), ``planning_complete_blocks`` (0/1, default 1),
    ``planning_multi_type`` (0/1: several type blocks per step, the arith scheme). A steering key alone
    turns it on too.
    """

    KEYS = ("planning", "planning_force_type", "planning_ban_types", "planning_memory_before_reason",
            "planning_max_steps", "planning_complete_blocks", "planning_multi_type")

    @classmethod
    def vocab(cls):
        from guidedecode.planning.vocab import PlanningVocab

        directory = os.environ.get(PLANNER_ENV)
        if not directory:
            raise ValueError(f"planning-token requests need ${PLANNER_ENV}: the planner directory")
        return _planning_vocab(directory, PlanningVocab)

    @classmethod
    def options(cls, extra_args):
        unknown = sorted(k for k in extra_args if k.startswith("planning") and k not in cls.KEYS)
        if unknown:
            raise ValueError(f"unknown planning-token request argument(s) {unknown}: known are {list(cls.KEYS)}")
        given = [k for k in cls.KEYS if k in extra_args]
        if not given or (given == ["planning"] and not _flag(extra_args, "planning")):
            return None
        options = {"memory_before_reason": _flag(extra_args, "planning_memory_before_reason"),
                   "complete_blocks": _flag({"planning_complete_blocks": 1, **extra_args}, "planning_complete_blocks"),
                   "multi_type": _flag(extra_args, "planning_multi_type")}
        force = extra_args.get("planning_force_type")
        if force is not None and not isinstance(force, str):
            raise ValueError(f"planning_force_type must be a type name, got {force!r}")
        ban = extra_args.get("planning_ban_types", [])
        if isinstance(ban, str):
            ban = [ban]
        if not isinstance(ban, list) or not all(isinstance(t, str) for t in ban):
            raise ValueError(f"planning_ban_types must be a list of type names, got {ban!r}")
        steps = extra_args.get("planning_max_steps")
        if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
            raise ValueError(f"planning_max_steps must be an integer >= 0, got {steps!r}")
        options.update(force_type=force, ban_types=tuple(ban), max_steps=steps)
        from guidedecode.guides.planning import PlanningTokenGuide

        try:  # type names are checked against the planner's vocabulary here, at admission
            PlanningTokenGuide(cls.vocab(), **options)
        except GuideError as exc:
            raise ValueError(str(exc)) from exc
        return options

    def setup(self, vllm_config):
        try:
            self.planning_vocab = self.vocab()
        except ValueError as exc:
            raise GuideError(str(exc)) from exc

    def make_guide(self, options, sampling_params):
        from guidedecode.guides.planning import PlanningTokenGuide

        return PlanningTokenGuide(self.planning_vocab, **options)


_VOCABS: dict[str, Any] = {}


def _planning_vocab(directory: str, loader):
    if directory not in _VOCABS:
        _VOCABS[directory] = loader.from_pretrained(directory)
    return _VOCABS[directory]
