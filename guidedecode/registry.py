"""Guides and strategies by name, for the CLI and the eval harness.

``build_guide(name, tokenizer, params)`` and ``build_strategy(name, tokenizer, params)`` turn a
name and ``key=value`` parameters (strings from the command line, converted by the constructor's
annotations) into objects. Each issue that adds a method registers it here.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable

from guidedecode.errors import GuidedecodeError, ValidationError


def _special_ids(tokenizer, model) -> dict:
    """EOS and pad ids for a guide, from the one source ``HFBackend`` and the trainers use: the model's
    generation-config EOS ids plus the tokenizer's (``eos_token_ids``); the pad id as ``HFBackend`` pads.
    Inside ``generate`` a guide follows the ids of the running call anyway (``TokenGuide``)."""
    from guidedecode.backends.hf import eos_token_ids

    eos = list(eos_token_ids(model, tokenizer)) if model is not None else tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    return {"eos_token_id": eos, "pad_token_id": pad}


def _presence_penalty(tokenizer, alpha: float = 1.0, model=None):
    from guidedecode.guides import PresencePenalty

    return PresencePenalty(alpha, **_special_ids(tokenizer, model))


def _best_of_n(tokenizer, n: int = 8, temperature: float = 0.7, top_p: float = 1.0, scorer: str = "logprob",
               selection: str = "argmax", value_model: str = "", oracle: int = 0, max_new_tokens: int = 256,
               model=None):
    """``scorer``: logprob | oracle | value (``value_model=DIR`` from ``guidedecode train qsharp``);
    ``selection``: argmax | weighted_vote (sums of value-model scores per answer class)."""
    from guidedecode.strategies import BestOfN, MeanLogProbScorer, OracleScorer, ValueModelScorer

    scorers = {"logprob": MeanLogProbScorer, "oracle": OracleScorer, "value": None}
    if scorer not in scorers:
        raise GuidedecodeError(f"unknown scorer '{scorer}': choose one of {', '.join(scorers)}")
    if scorer == "value":
        score = ValueModelScorer(_load_value_model(value_model, tokenizer, model, "best-of-n scorer=value"))
    elif value_model:
        raise GuidedecodeError("value_model= is used only with scorer=value")
    else:
        score = scorers[scorer]()
    return _with_oracle(BestOfN(n, scorer=score, selection=selection, temperature=temperature, top_p=top_p,
                                tokenizer=tokenizer, max_new_tokens=max_new_tokens), oracle)


def _self_consistency(tokenizer, n: int = 8, temperature: float = 0.7, top_p: float = 1.0, oracle: int = 0,
                      max_new_tokens: int = 256):
    from guidedecode.strategies import SelfConsistency

    return _with_oracle(SelfConsistency(n, temperature=temperature, top_p=top_p, tokenizer=tokenizer,
                                        max_new_tokens=max_new_tokens), oracle)


def _beam_search(tokenizer, width: int = 4, expansions: int = 4, step_stop: str = "\n", max_steps: int = 16,
                 max_step_tokens: int = 64, temperature: float = 0.7, top_p: float = 1.0, oracle: int = 0,
                 max_new_tokens: int = 256):
    from guidedecode.strategies import BeamSearch

    return _with_oracle(BeamSearch(width, expansions, step_stop=_unescape(step_stop), max_steps=max_steps,
                                   max_step_tokens=max_step_tokens, temperature=temperature, top_p=top_p,
                                   tokenizer=tokenizer, max_new_tokens=max_new_tokens), oracle)


def _token_beam(tokenizer, width: int = 8, oracle: int = 0, max_new_tokens: int = 256):
    from guidedecode.strategies import TokenBeamSearch

    return _with_oracle(TokenBeamSearch(width, tokenizer=tokenizer, max_new_tokens=max_new_tokens), oracle)


def _revision(tokenizer, k: int = 4, temperature: float = 0.0, top_p: float = 1.0, oracle: int = 0,
              max_new_tokens: int = 256):
    from guidedecode.strategies import Revision

    return _with_oracle(Revision(k, temperature=temperature, top_p=top_p, tokenizer=tokenizer,
                                 max_new_tokens=max_new_tokens), oracle)


def _self_refine(tokenizer, k: int = 4, temperature: float = 0.6, top_p: float = 0.95, oracle: int = 0,
                 max_new_tokens: int = 256):
    from guidedecode.strategies import SelfRefine

    return _with_oracle(SelfRefine(k, temperature=temperature, top_p=top_p, tokenizer=tokenizer,
                                   max_new_tokens=max_new_tokens), oracle)


def _rationalyst(tokenizer, k: int = 3, mode: str = "implicit", score_fn: str = "mean", gamma: float = 0.9,
                 temperature: float = 0.7, top_p: float = 1.0, step_boundary: str = "\\n", max_steps: int = 15,
                 max_step_tokens: int = 96, max_rationale_tokens: int = 48, rationale_model: str = "",
                 scoring_context: str = "reference", max_new_tokens: int = 512):
    """``rationale_model``: a trained rationale model (directory or embedded name); default: the policy itself.
    ``scoring_context``: reference (the paper's scorer prompt, each step its own assistant turn) | inline."""
    from guidedecode.strategies import RationaleStepSearch

    rationale_backend = None
    if rationale_model:
        from guidedecode.backends import HFBackend
        from guidedecode.models import load_model

        rationale_backend = HFBackend(*load_model(rationale_model))
    return RationaleStepSearch(k, mode=mode, score_fn=score_fn, gamma=gamma, temperature=temperature, top_p=top_p,
                               scoring_context=scoring_context, step_boundary=_unescape(step_boundary),
                               max_steps=max_steps, max_step_tokens=max_step_tokens,
                               max_rationale_tokens=max_rationale_tokens,
                               rationale_backend=rationale_backend, tokenizer=tokenizer, max_new_tokens=max_new_tokens)


def _fttt(tokenizer, k: int = 4, reflection: int = 0, lr: float = 1e-5, rank: int = 4, temperature: float = 0.6,
          top_p: float = 0.95, oracle: int = 1, max_new_tokens: int = 256):
    """FTTT (arXiv 2502.15771): a per-question LoRA (r 4, q/v) with one AdamW step after each failed attempt;
    ``reflection=1`` is FTTT+. Needs the oracle (``oracle=1``, default): it learns from verdicts."""
    from guidedecode.strategies import FTTT

    return _with_oracle(FTTT(k, reflection=bool(reflection), lr=lr, rank=rank, temperature=temperature, top_p=top_p,
                             tokenizer=tokenizer, max_new_tokens=max_new_tokens), oracle)


def _optune(tokenizer, editor: str = "", k: int = 4, schedule: str = "alternate", accumulation: str = "replace",
            temperature: float = 0.6, top_p: float = 0.95, oracle: int = 1, max_new_tokens: int = 256, model=None):
    """OpTune (arXiv 2502.15771): weight edits from a trained editor directory (``guidedecode train optune``;
    default: an untrained editor, a scaled gradient step); ``schedule`` alternate | always_edit,
    ``accumulation`` replace | accumulate. Needs the oracle (``oracle=1``, default)."""
    from guidedecode.deltas import OpTuneEditor
    from guidedecode.strategies import OpTune

    if editor:
        built = OpTuneEditor.from_pretrained(editor, model)
    elif model is not None:
        built = OpTuneEditor.for_model(model)
    else:
        raise ValidationError("strategy 'optune' needs -p editor=DIR (a trained OpTune editor) or a loaded model")
    return _with_oracle(OpTune(k, editor=built, schedule=schedule, edit_accumulation=accumulation,
                               temperature=temperature, top_p=top_p, tokenizer=tokenizer,
                               max_new_tokens=max_new_tokens), oracle)


def _dots(tokenizer, trajectory: str = "", mode: str = "", planner: str = "", max_verify_rounds: int = 3,
          code_retries: int = 1, code_timeout: float = 15.0, constrain: int = 1, on_missing_plan: str = "fallback",
          temperature: float = 0.0, max_new_tokens: int = 512):
    """DOTS plan-then-execute. ``trajectory``: a fixed trajectory, e.g. ``CoT``, ``PoT``,
    ``decomposition,PoT,verifier`` (code ids or paper names); else ``mode=external`` (``planner=``: a
    planner model, default: the solver prompted as planner) or ``mode=internal``. PoT code runs in the sandbox.
    ``on_missing_plan``: fallback (CoT, traced) | error | complete (append the trigger, write the line constrained)."""
    from guidedecode.dots import DOTS

    planner_backend = None
    if planner:
        from guidedecode.backends import HFBackend
        from guidedecode.models import load_model

        planner_backend = HFBackend(*load_model(planner))
    return DOTS(trajectory or None, mode=mode or None, planner=planner_backend, max_verify_rounds=max_verify_rounds,
                code_retries=code_retries, code_timeout=code_timeout, constrain=bool(constrain),
                on_missing_plan=on_missing_plan, temperature=temperature, tokenizer=tokenizer, max_new_tokens=max_new_tokens)


def _with_oracle(strategy, oracle: int):
    """``oracle=1``: the eval harness gives the strategy the task's checker (oracle stop, solved@k)."""
    strategy.oracle = bool(oracle)
    return strategy


def _unescape(text: str) -> str:
    """Command-line spelling of step separators: ``\\n`` -> newline."""
    return text.encode().decode("unicode_escape")


def _qsharp(tokenizer, value_model: str = "", eta: float = 10.0, mode: str = "", top_k: int = 20, tail: str = "",
            model=None):
    """Q# with a trained value model directory (``guidedecode train qsharp``); ``mode=cd`` for CD,
    ``mode=fudge`` for FUDGE; ``tail=mask`` drops the tokens outside the top-k (a deviation from the paper).
    The KL accounting uses the temperature and top-p of the run (the guide reads them from ``generate``)."""
    from guidedecode.guides import QSharpGuide

    vm = _load_value_model(value_model, tokenizer, model, "guide 'qsharp'")
    return QSharpGuide(vm, eta=eta, mode=mode or None, top_k=top_k, tail=tail or None, tokenizer=tokenizer,
                       **_special_ids(tokenizer, model))


def _load_value_model(directory: str, tokenizer, model, who: str):
    """A trained ValueModel on the policy's device, checked against the policy's tokenizer."""
    from guidedecode.value_model import ValueModel

    if not directory:
        raise GuidedecodeError(f"{who} needs -p value_model=DIR (a directory written by guidedecode train qsharp)")
    vm = ValueModel.from_pretrained(directory, device=getattr(model, "device", None))
    vm.check_tokenizer(tokenizer)
    return vm


def _planning(tokenizer, planner: str = "", force_type: str = "", ban_types: str = "", memory_before_reason: int = 0,
              max_steps: int = -1, complete_blocks: int = 1, multi_type: int = 0):
    """Planning-token block completion and type steering (``guidedecode train planner``). ``planner``: a
    planner run or model directory holding ``planning_tokens.json`` (default: the model's own directory);
    ``ban_types``: comma-separated; ``max_steps=-1``: no limit; ``multi_type=1`` for the arith scheme."""
    from pathlib import Path

    from guidedecode.guides.planning import PlanningTokenGuide
    from guidedecode.planning import PlanningVocab

    directory = Path(planner or getattr(tokenizer, "name_or_path", "") or ".")
    if (directory / "merged" / "planning_tokens.json").is_file():
        directory = directory / "merged"
    return PlanningTokenGuide(PlanningVocab.from_pretrained(directory), tokenizer=tokenizer,
                              force_type=force_type or None, ban_types=[t for t in ban_types.split(",") if t],
                              memory_before_reason=bool(memory_before_reason),
                              max_steps=None if max_steps < 0 else max_steps, complete_blocks=bool(complete_blocks),
                              multi_type=bool(multi_type), eos_token_id=tokenizer.eos_token_id,
                              pad_token_id=tokenizer.pad_token_id)


GUIDES: dict[str, Callable] = {"presence-penalty": _presence_penalty, "qsharp": _qsharp, "planning": _planning}
STRATEGIES: dict[str, Callable] = {
    "best-of-n": _best_of_n,
    "self-consistency": _self_consistency,
    "beam-search": _beam_search,
    "token-beam": _token_beam,
    "revision": _revision,
    "self-refine": _self_refine,
    "rationalyst": _rationalyst,
    "dots": _dots,
    "fttt": _fttt,
    "optune": _optune,
}


def build_guide(name: str, tokenizer, params: dict[str, str] | None = None, *, context: dict | None = None):
    """A guide by name. ``context`` holds run settings (temperature, top_p, device, model) that a factory
    receives when it declares a parameter of that name and the user did not set it in ``params``."""
    return _build("guide", GUIDES, name, tokenizer, params or {}, context or {})


def build_strategy(name: str, tokenizer, params: dict[str, str] | None = None, *, context: dict | None = None):
    """A strategy by name; ``context`` as in :func:`build_guide`."""
    return _build("strategy", STRATEGIES, name, tokenizer, params or {}, context or {})


def parse_params(items: tuple[str, ...] | list[str]) -> dict[str, str]:
    """``["alpha=1.5", "n=4"]`` -> ``{"alpha": "1.5", "n": "4"}``."""
    params = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValidationError(f"parameter '{item}' is not of the form key=value (e.g. -p n=4)")
        params[key.strip().replace("-", "_")] = value.strip()
    return params


# Factory arguments the harness fills in from the run (``context``), never set with ``-p``.
CONTEXT_ONLY = ("model",)
_CONVERTERS = {"int": int, "float": float, "str": str}


def _table(kind: str) -> dict:
    return {"guide": GUIDES, "strategy": STRATEGIES}[kind]


def parameters(kind: str, name: str) -> dict[str, inspect.Parameter]:
    """The ``-p`` parameters of guide/strategy ``name``: its factory's keyword arguments (with defaults)."""
    table = _table(kind)
    if name not in table:
        raise ValidationError(f"unknown {kind} '{name}': choose one of {', '.join(sorted(table))}")
    signature = inspect.signature(table[name])
    return {key: p for key, p in signature.parameters.items() if key != "tokenizer" and key not in CONTEXT_ONLY}


def describe(kind: str) -> list[tuple[str, str]]:
    """``(name, "key=default key=default ...")`` for every registered guide or strategy, sorted."""
    rows = []
    for name in sorted(_table(kind)):
        shown = [f"{key}={_default_text(p.default)}" for key, p in parameters(kind, name).items()]
        rows.append((name, " ".join(shown) or "(no parameters)"))
    return rows


def _default_text(value) -> str:
    if value is inspect.Parameter.empty:
        return "REQUIRED"
    if isinstance(value, str):  # as typed on the command line: a newline shows as \n, empty as ''
        text = value if "\\" in value else value.encode("unicode_escape").decode()
        return text if text and " " not in text else repr(text)
    return str(value)


def check_params(kind: str, name: str, params: dict[str, str]) -> dict:
    """Convert ``-p`` strings by the factory's annotations; an unknown name or key, or a value that does
    not convert, is a :class:`ValidationError` naming it."""
    accepted = parameters(kind, name)
    kwargs = {}
    for key, raw in params.items():
        if key not in accepted:
            raise ValidationError(f"{kind} '{name}' has no parameter '{key}' (it takes: {', '.join(accepted)}; "
                                  f"see guidedecode eval --help)")
        annotation = accepted[key].annotation
        convert = _CONVERTERS.get(annotation if isinstance(annotation, str)
                                  else getattr(annotation, "__name__", "str"), str)
        try:
            kwargs[key] = convert(raw)
        except (TypeError, ValueError):
            raise ValidationError(f"{kind} '{name}': parameter {key}={raw!r} is not a valid {convert.__name__}") \
                from None
    return kwargs


def _build(kind: str, table: dict, name: str, tokenizer, params: dict[str, str], context: dict):
    kwargs = check_params(kind, name, params)
    signature = inspect.signature(table[name])
    for key, value in context.items():
        if key in signature.parameters and key not in kwargs:
            kwargs[key] = value
    return table[name](tokenizer, **kwargs)
