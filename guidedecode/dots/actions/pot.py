"""Solution action "PoT" (program of thought; released-code id ``programming_solver``).

The solver writes the simplest Python program that computes the answer and prints it; the harness
runs the first ```python block in :mod:`guidedecode.tasks.sandbox` (never in-process) and shows
the output in the next user turn (DOTS, arXiv 2410.03864, Section 3.1 and Appendix D).
"""

LAYER = "solution"
CODE_ID = "programming_solver"
PAPER_NAME = "PoT"
ALIASES = ("program of thought", "program-of-thought", "pot", "programming", "program", "code")

#: The fixed first comment line the program starts with.
FIRST_LINE = "# Python code that solves the problem and prints the answer"

INSTRUCTION = (
    "In this step, write a Python program that solves the problem. Prefer the simplest, most direct "
    "method (brute force is fine when it works); common standard libraries may be used. Do every "
    "calculation in the code and print the result with print(). You do not know the answer before "
    "the program runs, so do not write it in comments or code, and do not plot anything. Start with "
    f'"```python\\n{FIRST_LINE}".'
)

#: The user turn after the program ran: ``{output}`` is its stdout, ``{next}`` the next instruction.
AFTER_EXECUTION = "After execution, we get:\n{output}\n{next}"

#: The user turn after the program failed (timeout, error, early exit), when a retry is allowed.
CODE_FAILED = (
    "The program did not run successfully ({detail}). Write a corrected version of the Python program in "
    "one ```python block; it must print the result."
)
