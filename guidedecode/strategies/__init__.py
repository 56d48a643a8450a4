"""Step strategies: outer loops over whole steps or attempts, written against backend primitives."""

from guidedecode.strategies.base import StepStrategy, StrategyResult
from guidedecode.strategies.beam_search import BeamSearch, TokenBeamSearch
from guidedecode.strategies.best_of_n import BestOfN
from guidedecode.strategies.budget import AttemptLog
from guidedecode.strategies.feedback_loop import FeedbackLoop, Verifier
from guidedecode.strategies.rationalyst import RationaleGuidedStepSearch, RationaleStepSearch, contains_answer_marker
from guidedecode.strategies.revision import Revision
from guidedecode.strategies.scorers import MeanLogProbScorer, OracleScorer, ValueModelScorer
from guidedecode.strategies.self_consistency import SelfConsistency, vote
from guidedecode.strategies.self_refine import SelfRefine
from guidedecode.strategies.weight_update import FTTT, OpTune

__all__ = [
    "StepStrategy", "StrategyResult", "AttemptLog", "FeedbackLoop", "Verifier",
    "BestOfN", "SelfConsistency", "BeamSearch", "TokenBeamSearch", "Revision", "SelfRefine",
    "RationaleStepSearch", "RationaleGuidedStepSearch", "contains_answer_marker",
    "OracleScorer", "MeanLogProbScorer", "ValueModelScorer", "vote", "FTTT", "OpTune",
]
