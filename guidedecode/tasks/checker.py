"""Math answer checking with math-verify, in a process pool that can never hang the caller.

``verify(gold, pred)`` is math-verify's ``verify(parse(gold), parse(pred))``, gold first (it is not
symmetric: ``x=3`` as gold accepts ``3``). Plain answers are wrapped as ``\\boxed{...}`` before
parsing, so GSM8K golds such as ``18``, ``-3``, ``0.5`` and ``1,600`` parse as numbers and MATH golds
such as ``\\frac{\\pi}{2}`` parse as LaTeX.

Why a process pool: math-verify bounds its own work with ``signal.alarm`` (main thread only, whole
seconds, and it clobbers the host's SIGALRM handler), and sympy can still get stuck in C code where no
signal is seen. So every pair runs in a worker process under one ``setitimer`` budget of ``timeout``
seconds (math-verify's own alarms are switched off), and each chunk of pairs sent to a worker has a
wall-clock limit of ``timeout * len(chunk) + slack``. A worker that overruns it or dies takes the pool
down: the pool is killed and rebuilt on the next call, and the pairs it held count as False.
"""

from __future__ import annotations

import atexit
import logging
import math
import multiprocessing
import os
import re
import signal
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool

from guidedecode.errors import TaskError

__all__ = ["MathChecker", "as_latex", "default_checker"]

_MATH_DELIMITED_RE = re.compile(r"(?<!\\)\$|\\boxed|\\fbox|\\\(|\\\[")


def as_latex(answer: str) -> str:
    """``answer`` as text math-verify parses: ``"1,600"`` -> ``"\\boxed{1,600}"``.

    Text already holding math delimiters (an unescaped ``$``, ``\\(``, ``\\[``, ``\\boxed``) is kept.
    """
    answer = answer.strip()
    if _MATH_DELIMITED_RE.search(answer):
        return answer
    return "\\boxed{" + answer + "}"


# ---------------------------------------------------------------------------------------------
# Worker side (runs in the pool's processes, in their main thread)


class _PairTimeout(BaseException):
    """Raised by the per-pair timer; a BaseException so math-verify's ``except Exception`` lets it through."""


def _raise_pair_timeout(signum, frame):
    raise _PairTimeout()


def _exit_with_parent() -> None:
    """Watchdog thread: a worker whose caller was killed (SIGKILL, no clean-up) exits too."""
    parent = multiprocessing.parent_process()
    if parent is not None:
        parent.join()
        os._exit(0)


def _worker_init() -> None:
    import math_verify  # noqa: F401  (import once per worker, not per chunk)

    # The "timeout is disabled" notice is expected: this module times each pair itself.
    logging.getLogger("math_verify").setLevel(logging.ERROR)
    signal.signal(signal.SIGALRM, _raise_pair_timeout)
    threading.Thread(target=_exit_with_parent, name="exit-with-parent", daemon=True).start()


def _ping() -> bool:
    return True


def _verify_pair(gold: str, pred: str) -> bool:
    from math_verify import parse, verify

    gold_parsed = parse(as_latex(gold), parsing_timeout=None)
    pred_parsed = parse(as_latex(pred), parsing_timeout=None)
    return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))


def _check_chunk(pairs: list[tuple[str, str]], timeout: float, symmetric: bool) -> list[bool]:
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


# ---------------------------------------------------------------------------------------------
# Caller side

_START_TIMEOUT = 60.0  # seconds for a new pool's first round trip (interpreter start, imports)


def _pool_context() -> multiprocessing.context.BaseContext:
    """forkserver where available, else spawn: never fork a process that may hold torch threads."""
    method = "forkserver" if "forkserver" in multiprocessing.get_all_start_methods() else "spawn"
    return multiprocessing.get_context(method)


class MathChecker:
    """math-verify equivalence checks in a lazily started, reused process pool.

    ``timeout``: seconds per pair (both directions for :meth:`equivalent`); ``workers``: pool size;
    ``chunk_size``: pairs per task sent to a worker; ``slack``: extra wall-clock seconds per chunk
    (transfer, scheduling) before a chunk counts as hung. Not thread-safe: one caller at a time.
    """

    def __init__(self, timeout: float = 5.0, workers: int = 1, *, chunk_size: int = 64, slack: float = 30.0):
        if not timeout > 0:
            raise TaskError(f"MathChecker timeout must be > 0 seconds, got {timeout!r}")
        if workers < 1:
            raise TaskError(f"MathChecker workers must be >= 1, got {workers!r}")
        if chunk_size < 1:
            raise TaskError(f"MathChecker chunk_size must be >= 1, got {chunk_size!r}")
        self.timeout = float(timeout)
        self.workers = int(workers)
        self.chunk_size = int(chunk_size)
        self.slack = float(slack)
        self._pool: ProcessPoolExecutor | None = None

    # -- public API ---------------------------------------------------------------------------

    def verify(self, gold: str, pred: str | None) -> bool:
        """True when ``pred`` matches ``gold`` (math-verify, gold first)."""
        return self.verify_many([(gold, pred)])[0]

    def verify_many(self, pairs: Iterable[tuple[str, str | None]]) -> list[bool]:
        """:meth:`verify` over (gold, pred) pairs, chunked across the pool; order kept."""
        return self._run(list(pairs), symmetric=False)

    def equivalent(self, a: str | None, b: str | None) -> bool:
        """Symmetric equivalence for voting: ``a`` matches ``b`` and ``b`` matches ``a``."""
        return self.equivalent_many([(a, b)])[0]

    def equivalent_many(self, pairs: Iterable[tuple[str | None, str | None]]) -> list[bool]:
        """:meth:`equivalent` over pairs; order kept."""
        return self._run(list(pairs), symmetric=True)

    def worker_pids(self) -> list[int]:
        """Process ids of the pool's live workers (empty before the first call or after a kill)."""
        if self._pool is None:
            return []
        return [p.pid for p in (getattr(self._pool, "_processes", None) or {}).values() if p.pid is not None]

    def close(self) -> None:
        """Shut the pool down (a worker still there after 2 s is killed); a later call starts a new one."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=2)  # idle workers exit at once on the shutdown sentinel
            if process.is_alive():  # hung or stopped: never let close() block
                process.kill()
                process.join(timeout=5)

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- machinery ----------------------------------------------------------------------------

    def _executor(self) -> ProcessPoolExecutor:
        """The pool, started on first use with a round trip that proves the workers can start."""
        if self._pool is None:
            pool = ProcessPoolExecutor(max_workers=self.workers, mp_context=_pool_context(), initializer=_worker_init)
            try:
                pool.submit(_ping).result(timeout=_START_TIMEOUT)
            except BaseException as error:
                for process in (getattr(pool, "_processes", None) or {}).values():
                    process.kill()
                pool.shutdown(wait=False, cancel_futures=True)
                raise TaskError(
                    "math-verify worker processes failed to start "
                    f"({type(error).__name__}); a script that checks answers at import time needs "
                    "an `if __name__ == '__main__':` guard (workers start with forkserver/spawn)"
                ) from error
            self._pool = pool
        return self._pool

    def _kill_pool(self) -> None:
        """Kill every worker at once (a hung one ignores polite shutdown) and drop the pool."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        processes = list((getattr(pool, "_processes", None) or {}).values())
        for process in processes:
            if process.is_alive():
                process.kill()
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.join(timeout=10)

    def _submit(self, chunk: list[int], pairs: Sequence, symmetric: bool) -> Future:
        args = ([pairs[i] for i in chunk], self.timeout, symmetric)
        try:
            return self._executor().submit(_check_chunk, *args)
        except BrokenProcessPool:  # a worker died while the pool sat idle: start afresh
            self._kill_pool()
            return self._executor().submit(_check_chunk, *args)

    def _chunks(self, indices: list[int]) -> list[list[int]]:
        size = max(1, min(self.chunk_size, math.ceil(len(indices) / self.workers)))
        return [indices[k : k + size] for k in range(0, len(indices), size)]

    def _run(self, pairs: Sequence[tuple[str | None, str | None]], symmetric: bool) -> list[bool]:
        try:
            return self._run_chunks(pairs, symmetric)
        except BaseException:  # e.g. KeyboardInterrupt: do not leave chunks running in the pool
            self._kill_pool()
            raise

    def _run_chunks(self, pairs: Sequence[tuple[str | None, str | None]], symmetric: bool) -> list[bool]:
        results = [False] * len(pairs)
        todo = [
            i
            for i, (a, b) in enumerate(pairs)
            if isinstance(a, str) and isinstance(b, str) and a.strip() and b.strip()
        ]
        pending = deque(self._chunks(todo))
        running: dict[Future, tuple[list[int], float]] = {}  # future -> (pair indices, deadline)
        while pending or running:
            # Keep at most one chunk per worker in flight, so a chunk's clock starts when it runs.
            while pending and len(running) < self.workers:
                chunk = pending.popleft()
                deadline = time.monotonic() + self.timeout * len(chunk) + self.slack
                running[self._submit(chunk, pairs, symmetric)] = (chunk, deadline)
            next_deadline = min(deadline for _, deadline in running.values())
            done, _ = wait(running, timeout=max(0.0, next_deadline - time.monotonic()), return_when=FIRST_COMPLETED)
            broken = False
            for future in done:
                chunk, _ = running.pop(future)
                try:
                    values = future.result()
                except BrokenProcessPool:  # a worker died: its pairs stay False
                    broken = True
                    continue
                except BaseException:  # the chunk raised in the worker (e.g. a late timer): False
                    continue
                for i, ok in zip(chunk, values):
                    results[i] = bool(ok)
            now = time.monotonic()
            hung = [f for f, (_, deadline) in running.items() if deadline <= now and not f.done()]
            if broken or hung:
                for future in hung:  # pairs of the hung chunk stay False
                    running.pop(future)
                # Chunks still running on the killed pool did nothing wrong: run them again.
                pending.extendleft(chunk for chunk, _ in reversed(list(running.values())))
                running.clear()
                self._kill_pool()
        return results


_DEFAULT: MathChecker | None = None


def default_checker() -> MathChecker:
    """The process-wide checker that tasks use when none is given (one worker, 5 s per pair)."""
    global _DEFAULT
    if _DEFAULT is None:
        _DEFAULT = MathChecker()
        atexit.register(_DEFAULT.close)
    return _DEFAULT
