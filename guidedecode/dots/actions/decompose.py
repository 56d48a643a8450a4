"""Analysis action "Query decomposition" (paper name; released-code id ``planning``).

The solver restates the problem in its own words and splits it into smaller sub-tasks, paying
attention to details, remarks and examples in the question (DOTS, arXiv 2410.03864, Section 3.1).
"""

LAYER = "analysis"
CODE_ID = "planning"
PAPER_NAME = "Query decomposition"
ALIASES = ("query decomposition", "decomposition", "decompose", "plan")

INSTRUCTION = (
    "In this step, describe the problem in your own words and break it down into smaller sub-tasks that "
    "are easier to solve one at a time. Take care of every detail, remark and example the problem gives."
)
