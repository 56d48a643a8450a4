"""Errors that name the problem.

Every error guidedecode raises on bad input derives from :class:`GuidedecodeError`; the CLI prints
it as one line (``error: <message>``) instead of a traceback.
"""


class GuidedecodeError(Exception):
    """Base class: a problem the user can fix, described in one line."""


class ModelLoadError(GuidedecodeError):
    """Unknown model name, missing wheel, corrupt weights or cache."""


class TaskError(GuidedecodeError):
    """Unknown task, missing or malformed data file."""


class GuideError(GuidedecodeError):
    """A token guide got or produced invalid values (NaN logits, bad parameters)."""


class StrategyError(GuidedecodeError):
    """A step strategy got invalid parameters or inputs."""


class TrainingError(GuidedecodeError):
    """A training run got bad input: malformed or empty data, bad settings, a damaged checkpoint."""


class ValidationError(GuidedecodeError):
    """A setting or argument of the wrong type or out of range (raised by :mod:`guidedecode.validation`
    when the caller names no more specific error type)."""


class RecordsError(GuidedecodeError):
    """A results or records file (JSONL) is damaged or incomplete; the message names the file and line."""
