"""Analysis action "Query rewriting" (paper name; released-code id ``query_rewriting``).

The solver restates the core question in one sentence and lists the facts it needs, one per line,
before solving (DOTS, arXiv 2410.03864, Section 3.1 and Appendix D).
"""

LAYER = "analysis"
CODE_ID = "query_rewriting"
PAPER_NAME = "Query rewriting"
ALIASES = ("query rewriting", "rewriting", "rewrite", "query rewrite")

INSTRUCTION = (
    "In this step, restate the core question in one short sentence, then list the information from the "
    "question that is useful for answering it, one item per line, in this form:\n"
    "Core question: ...\n"
    "Useful information:\n"
    "- ..."
)
