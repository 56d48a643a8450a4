"""In-forward weight deltas (FTTT / OpTune, arXiv 2502.15771): the injector that applies them, the
OpTune editor that computes them from feedback, FTTT's per-request LoRA, and LoRA export."""

from guidedecode.deltas.injector import DeltaError, DeltaInjector, LowRankDelta, as_delta, find_targets
from guidedecode.deltas.export import compress, export_lora
from guidedecode.deltas.optune import GradientTransform, OpTuneConfig, OpTuneEditor

__all__ = ["DeltaError", "DeltaInjector", "GradientTransform", "LowRankDelta", "OpTuneConfig", "OpTuneEditor",
           "as_delta", "compress", "export_lora", "find_targets"]
