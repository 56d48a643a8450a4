"""DOTS: reasoning-action trajectory planning (Yue et al., arXiv 2410.03864, ICLR 2025).

* :mod:`~guidedecode.dots.actions`: the action library, the 12 trajectories and their codec;
* :mod:`~guidedecode.dots.action_line`: :class:`ActionLineGuide`, the constrained ``Required Action:`` line;
* :mod:`~guidedecode.dots.planner`: the planner's prompts and output format;
* :mod:`~guidedecode.dots.executor`: :class:`DOTS`, the plan-then-execute step strategy;
* :mod:`~guidedecode.dots.search`: the offline trajectory search (Algorithm 1).

Training data and the planner fine-tune: :mod:`guidedecode.training.dots`.
"""

from guidedecode.dots.actions import (
    ACTION_LINE_TRIGGER,
    ACTION_LINES,
    ALL_TRAJECTORIES,
    ActionError,
    ActionLibrary,
    Trajectory,
    decode_action_line,
    parse_trajectory,
)
from guidedecode.dots.executor import DOTS, first_python_block, run_code

__all__ = [
    "ACTION_LINES", "ACTION_LINE_TRIGGER", "ALL_TRAJECTORIES", "ActionError", "ActionLibrary", "ActionLineGuide",
    "DOTS", "Trajectory", "decode_action_line", "first_python_block", "parse_trajectory", "run_code",
]


def __getattr__(name):
    if name == "ActionLineGuide":
        from guidedecode.dots.action_line import ActionLineGuide

        return ActionLineGuide
    raise AttributeError(f"module 'guidedecode.dots' has no attribute {name!r}")
