"""The DOTS action library: three layers of reasoning actions and their 12 trajectories.

DOTS (Yue et al., "DOTS: Learning to Reason Dynamically in LLMs via Optimal Reasoning Trajectories
Search", arXiv 2410.03864, ICLR 2025) picks one action per layer and ends with a direct answer:

| layer        | paper name          | released-code id     | module       |
|--------------|---------------------|----------------------|--------------|
| analysis     | Query rewriting     | ``query_rewriting``  | ``rewrite``  |
| analysis     | Query decomposition | ``planning``         | ``decompose``|
| analysis     | Empty               | ``""``               |              |
| solution     | CoT                 | ``CoT``              | ``cot``      |
| solution     | PoT                 | ``programming_solver``| ``pot``     |
| verification | Self-Verification   | ``verifier``         | ``verify``   |
| verification | Empty               | ``""``               |              |
| terminal     |                     | ``direct_answering`` | ``answer``   |

so 3 x 2 x 2 = 12 trajectories. A :class:`Trajectory` is written three ways:

* the 4-slot list of the reference code: ``["planning", "programming_solver", "verifier", "direct_answering"]``;
* the **action line** (what a planner writes after ``Required Action:``): the non-empty actions by
  code id, joined by ``", "``, the solution always listed: ``"planning, programming_solver, verifier"``;
* paper names, any case: ``"decomposition, PoT, self-verification"``.

:func:`parse_trajectory` accepts all of them (strict: unknown names raise :class:`ActionError`);
:func:`decode_action_line` reads a planner reply leniently (the text after the *last*
``Required Action:``; unlisted layers default to Empty / CoT / Empty; no line -> ``None``).
Length ``|p|`` = the number of non-empty analysis/solution/verification slots (1..3).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from guidedecode.dots.actions import answer, cot, decompose, pot, rewrite, verify
from guidedecode.errors import StrategyError

__all__ = [
    "ACTION_MODULES", "ACTION_LINE_TRIGGER", "ALL_TRAJECTORIES", "ActionError", "ActionLibrary", "LAYERS",
    "Trajectory", "decode_action_line", "parse_trajectory",
]

LAYERS = ("analysis", "solution", "verification")
ACTION_MODULES = {m.CODE_ID: m for m in (rewrite, decompose, cot, pot, verify)}
ACTION_LINE_TRIGGER = "Required Action:"
_EMPTY_NAMES = ("", "empty", "none", "skip", "null")


class ActionError(StrategyError):
    """An action name or trajectory that is not one of the DOTS actions / 12 trajectories."""


def _key(name: str) -> str:
    return re.sub(r"[\s_\-]+", "", name.strip().lower())


# normalised name -> (layer, code id); "" code id = Empty
_NAMES: dict[str, tuple[str | None, str]] = {}
for _module in ACTION_MODULES.values():
    for _name in (_module.CODE_ID, _module.PAPER_NAME, *_module.ALIASES):
        _NAMES[_key(_name)] = (_module.LAYER, _module.CODE_ID)
for _name in (answer.CODE_ID, *answer.ALIASES):
    _NAMES[_key(_name)] = ("terminal", answer.CODE_ID)
for _name in _EMPTY_NAMES:
    _NAMES[_key(_name)] = (None, "")

_CHOICES = {
    "analysis": ("", "query_rewriting", "planning"),
    "solution": ("CoT", "programming_solver"),
    "verification": ("", "verifier"),
}


@dataclass(frozen=True, order=True)
class Trajectory:
    """One action per layer, by released-code id (``""`` = Empty)."""

    analysis: str = ""
    solution: str = "CoT"
    verification: str = ""

    def __post_init__(self):
        for layer in LAYERS:
            value = getattr(self, layer)
            if value not in _CHOICES[layer]:
                raise ActionError(f"{layer} action {value!r} is not one of {_CHOICES[layer]}")

    @property
    def slots(self) -> list[str]:
        """The reference code's 4-slot list, e.g. ``["", "CoT", "verifier", "direct_answering"]``."""
        return [self.analysis, self.solution, self.verification, answer.CODE_ID]

    @property
    def actions(self) -> list[str]:
        """The non-empty actions in order (code ids)."""
        return [a for a in (self.analysis, self.solution, self.verification) if a]

    @property
    def length(self) -> int:
        """|p|: the number of non-empty analysis/solution/verification actions."""
        return len(self.actions)

    @property
    def action_line(self) -> str:
        """The canonical text after ``Required Action:``, e.g. ``"planning, programming_solver, verifier"``."""
        return ", ".join(self.actions)

    @property
    def uses_code(self) -> bool:
        return self.solution == pot.CODE_ID

    @property
    def verifies(self) -> bool:
        return self.verification == verify.CODE_ID

    def paper_names(self) -> str:
        """The trajectory in the paper's names, e.g. ``"Query decomposition, PoT, Self-Verification"``."""
        return ", ".join(ACTION_MODULES[a].PAPER_NAME for a in self.actions)

    def __str__(self) -> str:
        return self.action_line


#: The 12 trajectories, shortest first (then analysis none/rewrite/decompose, CoT before PoT).
ALL_TRAJECTORIES: tuple[Trajectory, ...] = tuple(sorted(
    (Trajectory(a, s, v) for a, s, v in itertools.product(*(_CHOICES[layer] for layer in LAYERS))),
    key=lambda t: (t.length, _CHOICES["analysis"].index(t.analysis), _CHOICES["solution"].index(t.solution),
                   _CHOICES["verification"].index(t.verification)),
))
ACTION_LINES: tuple[str, ...] = tuple(t.action_line for t in ALL_TRAJECTORIES)


def parse_trajectory(value) -> Trajectory:
    """A :class:`Trajectory` from a Trajectory, an action-line string or a list of action names.

    Names may be released-code ids or paper names (any case; ``Empty``/``""`` for a skipped layer;
    ``direct_answering`` is accepted and implied). A layer that is not named is Empty (CoT for the
    solution). Raises :class:`ActionError` for an unknown name, two different actions in one layer,
    or an empty trajectory (no action named at all).
    """
    if isinstance(value, Trajectory):
        return value
    if isinstance(value, str):
        names = [part for part in value.split(",")]
        shown = repr(value)
    elif isinstance(value, Iterable):
        names = list(value)
        shown = repr(names)
        if any(not isinstance(n, str) for n in names):
            raise ActionError(f"trajectory {shown}: action names must be strings")
    else:
        raise ActionError(f"a trajectory is a Trajectory, an action line or a list of names, got {type(value).__name__}")
    chosen: dict[str, str] = {}
    named = 0
    for raw in names:
        key = _key(raw)
        if key not in _NAMES:
            raise ActionError(
                f"trajectory {shown}: unknown action {raw.strip()!r}; known actions: "
                + ", ".join(f"{m.CODE_ID} ({m.PAPER_NAME})" for m in ACTION_MODULES.values())
                + ", direct_answering, Empty"
            )
        layer, code = _NAMES[key]
        if layer is None or layer == "terminal":  # Empty, or the implied direct answer
            continue
        named += 1
        if layer in chosen and chosen[layer] != code:
            raise ActionError(f"trajectory {shown}: two {layer} actions ({chosen[layer]} and {code}); pick one")
        chosen[layer] = code
    if named == 0:
        raise ActionError(f"empty trajectory {shown}: name at least one analysis, solution or verification "
                          "action (e.g. 'CoT' or 'PoT')")
    return Trajectory(chosen.get("analysis", ""), chosen.get("solution", cot.CODE_ID), chosen.get("verification", ""))


@dataclass(frozen=True)
class DecodedPlan:
    """What a planner reply says: the trajectory (``None`` if there is no action line), the raw line,
    and the names in it that are not actions (ignored)."""

    trajectory: Trajectory | None
    line: str | None
    ignored: tuple[str, ...] = ()


def decode_action_line(reply: str, trigger: str = ACTION_LINE_TRIGGER) -> DecodedPlan:
    """Read the trajectory after the last ``trigger`` in ``reply`` (to the end of that line).

    Lenient, as the released parser is: every comma-separated name that is an action counts, the rest
    is reported in ``ignored``; unlisted layers default to Empty / CoT / Empty; two actions in one
    layer keep the first. No trigger, or a line with no action name -> ``trajectory=None``.
    """
    at = reply.rfind(trigger)
    if at < 0:
        return DecodedPlan(None, None)
    line = reply[at + len(trigger):].split("\n", 1)[0].strip()
    chosen: dict[str, str] = {}
    ignored = []
    named = 0
    for part in line.split(","):
        key = _key(part.strip(" .*`'\""))
        if not key:
            continue
        if key not in _NAMES or _NAMES[key][0] is None:
            ignored.append(part.strip())
            continue
        layer, code = _NAMES[key]
        named += 1
        if layer != "terminal":
            chosen.setdefault(layer, code)
    if named == 0:
        return DecodedPlan(None, line, tuple(ignored))
    trajectory = Trajectory(chosen.get("analysis", ""), chosen.get("solution", cot.CODE_ID),
                            chosen.get("verification", ""))
    return DecodedPlan(trajectory, line, tuple(ignored))


@dataclass
class ActionLibrary:
    """The prompts of every action (user-overridable) and the one-prompt compiler of a trajectory.

    ``instructions``: code id -> step instruction (defaults: each action module's ``INSTRUCTION``);
    ``direct_answer``, ``reanswer``, ``after_execution`` (with ``{output}`` and ``{next}``) and
    ``code_failed`` (with ``{detail}``) are the harness's user turns.
    """

    instructions: Mapping[str, str] = field(default_factory=dict)
    direct_answer: str = answer.INSTRUCTION
    reanswer: str = answer.REANSWER
    after_execution: str = pot.AFTER_EXECUTION
    code_failed: str = pot.CODE_FAILED

    def __post_init__(self):
        unknown = sorted(set(self.instructions) - set(ACTION_MODULES))
        if unknown:
            raise ActionError(f"instructions for unknown actions {unknown}: known ids are {sorted(ACTION_MODULES)}")
        self.instructions = {**{k: m.INSTRUCTION for k, m in ACTION_MODULES.items()}, **self.instructions}
        for name in ("{output}", "{next}"):
            if name not in self.after_execution:
                raise ActionError(f"after_execution must contain {name}")

    def instruction(self, action: str) -> str:
        return self.instructions[action]

    def compile(self, query: str, trajectory) -> str:
        """The single prompt of a trajectory: the query in braces, then the numbered steps (analysis,
        solution, direct answer; Empty slots and the verifier are left out: the verifier is its own
        turn), each output section starting with ``#### Step i ####``."""
        trajectory = parse_trajectory(trajectory)
        steps = [self.instructions[a] for a in (trajectory.analysis, trajectory.solution) if a]
        steps.append(self.direct_answer)
        body = "\n".join(f"Step {i}: {text}" for i, text in enumerate(steps))
        return (f"{{\n{query}\n}}\nInstruction:{{\n{body}\n}}\n"
                'For the i-th step, the output should start with "#### Step i ####".\n')
