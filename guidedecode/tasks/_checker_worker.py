"""Worker process of :class:`guidedecode.tasks.checker.MathChecker`.

Started as ``python -P -c "from guidedecode.tasks._checker_worker import main; main()"``, never
through multiprocessing's spawn/forkserver, which re-import the caller's ``__main__`` (a plain
script without an ``if __name__ == "__main__":`` guard would run again in every worker). Protocol, one JSON line each
way per request on a private copy of stdout (fd 1 is pointed at stderr so nothing a library prints
can corrupt it): ``{"pairs": [[gold, pred], ...], "timeout": s, "symmetric": bool}`` ->
``[bool, ...]``; ``{"ping": true}`` -> ``true``. The worker exits on end of input or when its
parent goes away.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import sys
import threading
import time

_MATH_DELIMITED_RE = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\(|\\\[")


def as_latex(answer: str) -> str:
    """``answer`` as text math-verify parses: ``"1,600"`` -> ``"\\boxed{1,600}"``.

    Text already holding math delimiters (an unescaped ``$``, ``\\(``, ``\\[``, ``\\boxed``) is kept.
    """
    answer = answer.strip()
    if _MATH_DELIMITED_RE.search(answer):
        return answer
    return "\\boxed{" + answer + "}"


class _PairTimeout(BaseException):
    """Raised by the per-pair timer; a BaseException so math-verify's ``except Exception`` lets it through."""


def _raise_pair_timeout(signum, frame):
    raise _PairTimeout()


def _verify_pair(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(as_latex(pred), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def check_chunk(pairs: list, timeout: float, symmetric: bool) -> list[bool]:
    """Verify each (gold, pred) pair (both directions if ``symmetric``) within ``timeout`` seconds."""
    results = []
    for gold, pred in pairs:
        signal.setitimer(signal.ITIMER_REAL, timeout)
        try:
            ok = _verify_pair(gold, pred) and (not symmetric or _verify_pair(pred, gold))
        except BaseException:  # _PairTimeout, math-verify's TimeoutException (a BaseException), sympy errors
            ok = False
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
        results.append(ok)
    return results


def _exit_with_parent(parent: int) -> None:
    """Watchdog: a worker whose caller was killed (SIGKILL, no clean-up) exits even while busy."""
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(0)


def main() -> None:
    out = os.fdopen(os.dup(1), "w", encoding="utf-8")
    os.dup2(2, 1)  # stray prints from sympy & co. go to stderr, never into the protocol
    sys.stdout = sys.stderr
    import math_verify  # noqa: F401  (import once per worker, not per request)

    # The "timeout is disabled" notice is expected: this module times each pair itself.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _raise_pair_timeout)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the caller's to handle
    threading.Thread(target=_exit_with_parent, args=(os.getppid(),), daemon=True).start()
    for line in sys.stdin:
        request = json.loads(line)
        if request.get("ping"):
            reply = True
        else:
            reply = check_chunk(request["pairs"], float(request["timeout"]), bool(request["symmetric"]))
        out.write(json.dumps(reply) + "\n")
        out.flush()


if __name__ == "__main__":
    main()
