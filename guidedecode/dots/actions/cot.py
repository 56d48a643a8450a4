"""Solution action "CoT" (chain of thought; released-code id ``CoT``).

The solver reasons step by step in words and reaches the answer (DOTS, arXiv 2410.03864, Section 3.1).
"""

LAYER = "solution"
CODE_ID = "CoT"
PAPER_NAME = "CoT"
ALIASES = ("chain of thought", "chain-of-thought", "cot")

INSTRUCTION = "In this step, reason step by step in words, solve the problem and reach the answer."
