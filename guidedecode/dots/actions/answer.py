"""The terminal step (released-code id ``direct_answering``) and the re-answer prompt.

Every trajectory ends with the direct answer: the final answer from the previous thoughts, in the
format the question asks for. After a verifier's "incorrect" verdict the solver is asked to solve
again in words without repeating the mistake (DOTS, arXiv 2410.03864, Section 3.1).
"""

CODE_ID = "direct_answering"
ALIASES = ("direct answering", "direct answer", "answer")

INSTRUCTION = (
    "In this step, give the final answer to the question from the previous thoughts, in the format the "
    "question asks for."
)

REANSWER = (
    "The previous solution was judged incorrect. Solve the question again step by step in words, "
    "avoid the same mistake, and give the final answer in the format the question asks for."
)
