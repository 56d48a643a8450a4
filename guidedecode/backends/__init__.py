"""Backends: the primitives (sample, greedy, score) that step strategies are written against."""

from guidedecode.backends.base import Backend, BackendStats, Completion, ContinuationScore, Prompt
from guidedecode.backends.hf import HFBackend

__all__ = ["Backend", "BackendStats", "Completion", "ContinuationScore", "Prompt", "HFBackend"]
