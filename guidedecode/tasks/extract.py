"""Answer extraction from model completions.

Every extractor takes the completion text and returns the answer as a string, or ``None`` when the
text holds no answer of that form. When a completion states several answers, the last one wins
(models restate and correct themselves).

- :func:`extract_gsm8k`: ``#### 1,600`` -> ``"1600"``
- :func:`extract_boxed`: ``\\boxed{\\frac{1}{2}}``, ``\\fbox{..}``, ``\\boxed 5`` -> ``"\\frac{1}{2}"``
- :func:`extract_answer_is`: ``The answer is $18.`` -> ``"18"``
- :func:`extract_last_number`: ``... so -1,234.5 left`` -> ``"-1234.5"``; ``3/4`` stays ``"3/4"``
- :func:`extract_choice`: ``answer: (B)`` -> ``"B"``
- :func:`extract_yes_no`: ``So the answer is yes.`` -> ``"yes"``; true/false count as yes/no
- :func:`extract_code`: the last fenced code block, else the text itself
- :func:`extract_answer`: the extractors above tried in order for an answer kind
"""

from __future__ import annotations

import re

from guidedecode.errors import TaskError

__all__ = [
    "ANSWER_KINDS",
    "extract_answer",
    "extract_answer_is",
    "extract_boxed",
    "extract_choice",
    "extract_code",
    "extract_gsm8k",
    "extract_last_number",
    "extract_yes_no",
    "normalize_number",
]

# A number as written in text: optional sign, digits with optional thousands commas, optional
# decimals, or a bare decimal such as ".5"; optionally a fraction "a/b".
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:\s*/\s*\d+(?:\.\d+)?)?|-?\.\d+"
_NUMBER_RE = re.compile(rf"(?<![\w.])(?:{_NUMBER})(?![\d])")
_GSM8K_RE = re.compile(r"####\s*(.+)")
_ANSWER_IS_RE = re.compile(r"\banswer\s*(?:is|would\s+be|will\s+be|=|:)\s*:?\s*", re.IGNORECASE)
_BOXED_RE = re.compile(r"\\(?:boxed|fbox)\s*(\{)?")
_MARKDOWN_RE = re.compile(r"\*\*|__|`")
_TEXT_WRAP_RE = re.compile(r"^\\(?:text|textbf|mathrm|mbox)\{(.*)\}$", re.DOTALL)


def normalize_number(text: str) -> str:
    """Drop thousands commas, spaces around ``/`` and a leading ``+``: ``"+1,600"`` -> ``"1600"``."""
    text = text.replace(",", "").strip()
    text = re.sub(r"\s*/\s*", "/", text)
    return text[1:] if text.startswith("+") else text


def extract_gsm8k(text: str) -> str | None:
    """The number after the last ``####`` (GSM8K's gold format), commas removed."""
    matches = _GSM8K_RE.findall(text)
    if not matches:
        return None
    return extract_last_number(matches[-1]) if _NUMBER_RE.search(matches[-1]) else None


def _balanced(text: str, open_at: int) -> str | None:
    """Contents of the brace group whose ``{`` is at ``open_at``, or None when it never closes."""
    depth = 0
    for i in range(open_at, len(text)):
        if text[i] == "{":
            depth += 1
        elif text[i] == "}":
            depth -= 1
            if depth == 0:
                return text[open_at + 1 : i]
    return None


def extract_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}`` / ``\\fbox{...}`` (nested braces kept), or of ``\\boxed x``."""
    for match in reversed(list(_BOXED_RE.finditer(text))):
        if match.group(1):
            content = _balanced(text, match.start(1))
        else:  # "\boxed 5" form: the argument runs to the next space, "$" or end of line
            token = re.match(r"[^\s$]+", text[match.end() :])
            content = token.group(0) if token else None
        if content is not None and content.strip():
            return content.strip()
    return None


def _clean_answer(answer: str) -> str:
    """Strip markdown, math delimiters and trailing punctuation around a stated answer."""
    answer = _MARKDOWN_RE.sub("", answer).strip()
    boxed = extract_boxed(answer)
    if boxed is not None:
        return boxed
    for left, right in (("\\(", "\\)"), ("\\[", "\\]"), ("$$", "$$")):
        if answer.startswith(left) and right in answer[len(left) :]:
            answer = answer[len(left) : answer.index(right, len(left))]
    answer = answer.strip()
    if answer.startswith("$"):  # "$18." (dollars) or "$\frac{1}{2}$." (inline math)
        closing = answer.find("$", 1)
        answer = answer[1:closing] if closing > 0 else answer[1:]
    answer = answer.strip().rstrip(".,;:!?$ ").strip()
    wrapped = _TEXT_WRAP_RE.match(answer)
    return wrapped.group(1).strip() if wrapped else answer


def extract_answer_is(text: str) -> str | None:
    """What follows the last "The answer is" / "final answer:" / "answer:" up to the end of its line.

    Trailing periods, dollar signs and markdown bold are stripped; a ``\\boxed{}`` inside wins.
    """
    for match in reversed(list(_ANSWER_IS_RE.finditer(text))):
        line_end = text.find("\n", match.end())
        answer = _clean_answer(text[match.end() : len(text) if line_end < 0 else line_end])
        if answer:
            return answer
    return None


def extract_last_number(text: str) -> str | None:
    """The last number in the text (``1,600``, ``-3``, ``0.5``, ``.5``, ``3/4``), normalised."""
    matches = _NUMBER_RE.findall(text)
    return normalize_number(matches[-1]) if matches else None


_LATEX_FRAC_RE = re.compile(r"\\[dt]?frac\s*\{\s*(-?[\d.,]+)\s*\}\s*\{\s*(-?[\d.,]+)\s*\}")
_LATEX_SPACING_RE = re.compile(r"\\[,!;: ]|\{,\}|\\\$")


def _first_number_of_answer(answer: str) -> str | None:
    """The number a stated answer names: after the last "=", the first number ("18 apples" -> 18).

    LaTeX number forms are read first: ``\\frac{3}{4}`` -> ``3/4``, ``1{,}600`` -> ``1,600``.
    """
    answer = _LATEX_FRAC_RE.sub(r"\1/\2", _LATEX_SPACING_RE.sub("", answer))
    tail = answer.rsplit("=", 1)[-1]
    match = _NUMBER_RE.search(tail)
    return normalize_number(match.group(0)) if match else None


_CHOICE_PATTERNS = [
    # "answer is (B)", "Answer: C", "the correct option is D." (keywords any case, letter upper case)
    re.compile(
        r"\b(?i:answer|correct\s+option|correct\s+choice)\s*(?i:is|would\s+be|:)?\s*:?\s*[\(\[]?\s*"
        r"([A-Z])(?![\w'])(?!\.\w)"
    ),
    re.compile(r"\(([A-Z])\)"),  # "(B)" anywhere
    re.compile(r"^\s*([A-Z])\s*(?:[.):]|$)", re.MULTILINE),  # a line that starts with "B." or is "B"
]


def extract_choice(text: str, letters: str = "ABCDE") -> str | None:
    """The option letter (one of ``letters``): "answer is (B)" > "(B)" > a line starting "B." (last each)."""
    text = _MARKDOWN_RE.sub("", text)
    for pattern in _CHOICE_PATTERNS:
        found = [m.group(1) for m in pattern.finditer(text) if m.group(1) in letters]
        if found:
            return found[-1]
    return None


_YES_NO = {"yes": "yes", "true": "yes", "no": "no", "false": "no"}
_YES_NO_ANSWER_RE = re.compile(r"\banswer\s*(?:is|would\s+be|:)?\s*:?\s*(yes|no|true|false)\b", re.IGNORECASE)
_YES_NO_WORD_RE = re.compile(r"\b(yes|no|true|false)\b", re.IGNORECASE)


def extract_yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"``: the last "answer is yes/no/true/false", else the last such word."""
    text = _MARKDOWN_RE.sub("", text)
    found = _YES_NO_ANSWER_RE.findall(text) or _YES_NO_WORD_RE.findall(text)
    return _YES_NO[found[-1].lower()] if found else None


_FENCE_RE = re.compile(r"```[ \t]*([\w+-]*)[^\n]*\n(.*?)(?:```|$)", re.DOTALL)


def extract_code(text: str) -> str | None:
    """The last fenced code block (python-tagged blocks preferred), else the whole text if non-empty."""
    blocks = [(lang.lower(), body) for lang, body in _FENCE_RE.findall(text)]
    python = [body for lang, body in blocks if lang in ("python", "py", "python3")]
    if python or blocks:
        return (python or [body for _, body in blocks])[-1]
    return text if text.strip() else None


ANSWER_KINDS = ("math", "number", "choice", "yesno", "code")


def extract_answer(text: str, kind: str = "math") -> str | None:
    """Extract the final answer of the given kind.

    - ``"math"`` (MATH-style LaTeX): ``\\boxed{}`` > "The answer is" > ``####`` > last number.
    - ``"number"`` (GSM8K-style integers): ``####`` > "The answer is" > ``\\boxed{}`` > last number;
      the stated answer is reduced to its number ("$1,600 dollars." -> ``"1600"``).
    - ``"choice"``, ``"yesno"``, ``"code"``: :func:`extract_choice`, :func:`extract_yes_no`,
      :func:`extract_code`.
    """
    if kind == "math":
        for extractor in (extract_boxed, extract_answer_is, extract_gsm8k, extract_last_number):
            answer = extractor(text)
            if answer is not None:
                return answer
        return None
    if kind == "number":
        gsm8k = extract_gsm8k(text)
        if gsm8k is not None:
            return gsm8k
        for extractor in (extract_answer_is, extract_boxed):
            answer = extractor(text)
            if answer is not None and _first_number_of_answer(answer) is not None:
                return _first_number_of_answer(answer)
        return extract_last_number(text)
    if kind == "choice":
        return extract_choice(text)
    if kind == "yesno":
        return extract_yes_no(text)
    if kind == "code":
        return extract_code(text)
    raise TaskError(f"unknown answer kind {kind!r}; expected one of {', '.join(ANSWER_KINDS)}")
