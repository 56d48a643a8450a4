"""The DOTS planner's prompts and output format (arXiv 2410.03864, Sections 3.3-3.4).

A planner reads the question and writes an explanation, then the action line::

    First, let me analyze the question and determine the reasoning actions I will follow.
    <explanation>
    Required Action: planning, programming_solver
    Now, I will begin solving the question with the required actions:
    <the solver's first turn>                       (internalized planner only)

The **external** planner stops after the action line; the frozen solver then executes the
trajectory. The **internalized** planner is the solver itself and continues with the solution. The
same prompt texts are used at inference (:class:`guidedecode.DOTS`) and to build SFT data
(:mod:`guidedecode.training.dots`), so training and inference see the same input.
"""

from __future__ import annotations

from guidedecode.dots.actions import ACTION_LINE_TRIGGER, ACTION_LINES

__all__ = ["ANALYSIS_HEADER", "BEGIN_SOLVING", "explanation_prompt", "planner_prompt", "plan_text"]

ANALYSIS_HEADER = "First, let me analyze the question and determine the reasoning actions I will follow."
BEGIN_SOLVING = "Now, I will begin solving the question with the required actions:"

_DESCRIPTIONS = {
    "query_rewriting": "restate the core question and list the useful information",
    "planning": "decompose the problem into smaller sub-tasks",
    "CoT": "solve step by step in words",
    "programming_solver": "write and run a Python program that computes the answer",
    "verifier": "check the answer and solve again if it is wrong",
}
_MENU = "\n".join(f"- {code}: {text}" for code, text in _DESCRIPTIONS.items())


def planner_prompt(query: str, *, internal: bool = False) -> str:
    """The planner's user message for ``query``; ``internal=True`` also asks for the solution."""
    lines = ", ".join(f'"{line}"' for line in ACTION_LINES[:4])
    text = (
        "Choose the reasoning actions for the question below.\n"
        f"Actions:\n{_MENU}\n"
        "Pick at most one of query_rewriting / planning, exactly one of CoT / programming_solver, and "
        "optionally verifier.\n"
        f'Start with "{ANALYSIS_HEADER}", explain in one short paragraph which actions fit this question '
        f'and why, then write one line "{ACTION_LINE_TRIGGER} <actions separated by commas>" '
        f"(for example {lines}).\n"
    )
    if internal:
        text += f'After that line, write "{BEGIN_SOLVING}" and solve the question with those actions.\n'
    return text + f"\nQuestion:\n{query}"


def plan_text(explanation: str, trajectory, solution: str | None = None) -> str:
    """A planner target: header, explanation, action line, and (internalized) the solution turn."""
    from guidedecode.dots.actions import parse_trajectory

    line = parse_trajectory(trajectory).action_line
    text = f"{ANALYSIS_HEADER}\n{explanation.strip()}\n{ACTION_LINE_TRIGGER} {line}\n"
    if solution is not None:
        text += f"{BEGIN_SOLVING}\n{solution.strip()}"
    return text


_WHY = {
    "query_rewriting": "why restating the question and listing its facts helps",
    "planning": "why breaking the problem into sub-tasks helps",
    "CoT": "why reasoning in words suits this question better than code",
    "programming_solver": "why a program suits this question better than reasoning in words",
    "verifier": "why checking the answer is feasible and important here",
}


def explanation_prompt(query: str, trajectory) -> str:
    """The prompt that asks an LLM for one paragraph explaining why ``trajectory`` fits ``query``
    (paper Section 3.3: the explanation answers the action-specific "why")."""
    from guidedecode.dots.actions import parse_trajectory

    trajectory = parse_trajectory(trajectory)
    whys = "; ".join(_WHY[a] for a in trajectory.actions)
    return (
        "A solver answers questions by following reasoning actions:\n"
        f"{_MENU}\n"
        f"For the question below, the actions that worked best were: {trajectory.action_line}.\n"
        f"In one short paragraph, explain {whys}. Do not solve the question.\n\n"
        f"Question:\n{query}"
    )
