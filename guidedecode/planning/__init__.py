"""Planning tokens and memory/reason tokens (arXiv 2310.05707, arXiv 2411.13504).

* :mod:`~guidedecode.planning.vocab`: :class:`PlanningVocab` (the token registry) and
  :func:`add_planning_tokens` (vocabulary extension with the padded-embedding check);
* :mod:`~guidedecode.planning.typers`: step typers (``memreason`` labels, ``kmeans``, ``sqvae``, ``arith``,
  ``tfidf``);
* :mod:`~guidedecode.planning.data`: reading rows, the target layout, encoding;
* :mod:`~guidedecode.planning.trace`: the step structure ``[{type, text}]`` of a generation;
* training: :mod:`guidedecode.training.planner` (``guidedecode train planner``);
* decoding: :class:`guidedecode.PlanningTokenGuide` (block completion, type steering).
"""

from guidedecode.planning.data import encode, extract_answer, prompt_text, read_examples, target_text, type_examples
from guidedecode.planning.trace import format_trace, parse_trace, strip_planning_tokens, trace_stats
from guidedecode.planning.typers import (
    SCHEMES,
    ArithmeticTyper,
    KMeansTyper,
    LabelTyper,
    SQVAETyper,
    StepTyper,
    TfidfTyper,
    make_typer,
)
from guidedecode.planning.vocab import (
    PlanningTokenError,
    PlanningVocab,
    add_planning_tokens,
    trainable_token_modules,
)

__all__ = [
    "SCHEMES",
    "ArithmeticTyper",
    "KMeansTyper",
    "LabelTyper",
    "PlanningTokenError",
    "PlanningVocab",
    "SQVAETyper",
    "StepTyper",
    "TfidfTyper",
    "add_planning_tokens",
    "encode",
    "extract_answer",
    "format_trace",
    "make_typer",
    "parse_trace",
    "prompt_text",
    "read_examples",
    "strip_planning_tokens",
    "target_text",
    "trace_stats",
    "trainable_token_modules",
    "type_examples",
]
