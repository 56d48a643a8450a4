"""Step strategies: outer loops over whole steps or attempts, written against backend primitives."""

from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.best_of_n import BestOfN
from guidedecode.strategies.scorers import MeanLogProbScorer, OracleScorer
from guidedecode.strategies.self_consistency import SelfConsistency, vote

__all__ = ["StepStrategy", "StrategyResult", "BestOfN", "SelfConsistency", "OracleScorer", "MeanLogProbScorer", "vote"]
