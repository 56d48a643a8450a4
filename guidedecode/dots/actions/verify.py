"""Verification action "Self-Verification" (paper name; released-code id ``verifier``).

After an answer, the solver poses a new verification question that assumes the answer is right and
looks for a contradiction; its last line states the verdict, "The answer is: correct" or "The
answer is: incorrect" (DOTS, arXiv 2410.03864, Section 3.1). An "incorrect" verdict triggers the
re-answer prompt (:mod:`guidedecode.dots.actions.answer`).
"""

LAYER = "verification"
CODE_ID = "verifier"
PAPER_NAME = "Self-Verification"
ALIASES = ("self-verification", "self verification", "verification", "verify", "self-verify")

INSTRUCTION = (
    "In this step, check the previous answer in words. Assume it is correct and ask a new question that "
    "tests it (not the original question again), then look for any contradiction. End with one last "
    'line: "The answer is: correct" if nothing contradicts it, otherwise "The answer is: incorrect".'
)


def verdict(reply: str) -> str:
    """``"incorrect"``, ``"correct"`` or ``"unclear"`` from the last non-empty line of ``reply``."""
    lines = [line for line in reply.strip().splitlines() if line.strip()]
    last = lines[-1].lower() if lines else ""
    if "incorrect" in last or "not correct" in last:
        return "incorrect"
    if "correct" in last:
        return "correct"
    return "unclear"
