"""Token guides: ``transformers.LogitsProcessor`` objects that adjust next-token scores per row."""

from guidedecode.guides.base import TokenGuide
from guidedecode.guides.bias import HistoryBias, PresencePenalty
from guidedecode.guides.planning import PlanningTokenGuide
from guidedecode.guides.qsharp import QSharpGuide, qsharp_offsets

__all__ = ["TokenGuide", "HistoryBias", "PlanningTokenGuide", "PresencePenalty", "QSharpGuide", "qsharp_offsets"]
