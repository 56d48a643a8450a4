"""guidedecode: inference-time decoding plugins for LLM reasoning.

Three plug points (see README): token guides (``transformers.LogitsProcessor`` objects), step
strategies (``model.generate(custom_generate=strategy)`` or ``strategy.run(backend, prompts)``),
and in-forward weight deltas. Names are imported lazily so ``guidedecode --help`` stays fast.
"""

from importlib import import_module

__version__ = "0.1.0"

_EXPORTS = {
    "load_model": "guidedecode.models",
    "load_tokenizer": "guidedecode.models",
    "DEFAULT_MODEL": "guidedecode.models",
    "HFBackend": "guidedecode.backends",
    "Completion": "guidedecode.backends",
    "ContinuationScore": "guidedecode.backends",
    "TokenGuide": "guidedecode.guides",
    "HistoryBias": "guidedecode.guides",
    "PresencePenalty": "guidedecode.guides",
    "StepStrategy": "guidedecode.strategies",
    "StrategyResult": "guidedecode.strategies",
    "BestOfN": "guidedecode.strategies",
    "SelfConsistency": "guidedecode.strategies",
    "OracleScorer": "guidedecode.strategies",
    "MeanLogProbScorer": "guidedecode.strategies",
    "ValueModelScorer": "guidedecode.strategies",
    "FeedbackLoop": "guidedecode.strategies",
    "Verifier": "guidedecode.strategies",
    "BeamSearch": "guidedecode.strategies",
    "TokenBeamSearch": "guidedecode.strategies",
    "Revision": "guidedecode.strategies",
    "SelfRefine": "guidedecode.strategies",
    "RationaleStepSearch": "guidedecode.strategies",
    "DOTS": "guidedecode.dots",
    "ActionLineGuide": "guidedecode.dots",
    "QSharpGuide": "guidedecode.guides",
    "PlanningTokenGuide": "guidedecode.guides",
    "PlanningVocab": "guidedecode.planning",
    "add_planning_tokens": "guidedecode.planning",
    "parse_trace": "guidedecode.planning",
    "qsharp_offsets": "guidedecode.guides",
    "ValueModel": "guidedecode.value_model",
    "get_task": "guidedecode.tasks",
    "GuidedecodeError": "guidedecode.errors",
    "DeltaInjector": "guidedecode.deltas",
    "LowRankDelta": "guidedecode.deltas",
    "find_targets": "guidedecode.deltas",
    "OpTuneEditor": "guidedecode.deltas",
    "OpTune": "guidedecode.strategies",
    "FTTT": "guidedecode.strategies",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
    if name in _EXPORTS:
        return getattr(import_module(_EXPORTS[name]), name)
    raise AttributeError(f"module 'guidedecode' has no attribute '{name}'")


def __dir__():
    return __all__
