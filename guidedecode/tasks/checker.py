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

The workers are subprocesses running ``guidedecode.tasks._checker_worker.main()`` (JSON lines), not
multiprocessing's spawn/forkserver workers: those re-import the caller's ``__main__``, so a plain
script without an ``if __name__ == "__main__":`` guard would run again in every worker.
"""

from __future__ import annotations

import atexit
import json
import math
import os
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Iterable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait

from guidedecode.errors import TaskError
from guidedecode.tasks._checker_worker import as_latex

__all__ = ["MathChecker", "as_latex", "default_checker"]

_START_TIMEOUT = 60.0  # seconds for a new pool's first round trip (interpreter start, imports)
_PACKAGE_PARENT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class _WorkerDied(Exception):
    """A worker exited, was killed or broke the protocol while holding a request."""


class _Worker:
    """One worker subprocess (:func:`guidedecode.tasks._checker_worker.main`); one request at a time."""

    def __init__(self) -> None:
        env = dict(os.environ)  # the worker imports guidedecode from where this process did
        env["PYTHONPATH"] = os.pathsep.join(p for p in (_PACKAGE_PARENT, env.get("PYTHONPATH")) if p)
        self.proc = subprocess.Popen(
            [sys.executable, "-P", "-c", "from guidedecode.tasks._checker_worker import main; main()"],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, text=True, encoding="utf-8",
        )

    def request(self, message: dict):
        try:
            self.proc.stdin.write(json.dumps(message) + "\n")
            self.proc.stdin.flush()
            line = self.proc.stdout.readline()
        except (OSError, ValueError) as error:  # broken pipe, or closed by a kill
            raise _WorkerDied(str(error)) from error
        if not line:
            raise _WorkerDied(f"worker {self.proc.pid} exited")
        try:
            return json.loads(line)
        except ValueError as error:
            raise _WorkerDied(f"worker {self.proc.pid} sent {line[:80]!r}") from error

    def alive(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        try:
            self.proc.kill()
        except OSError:
            pass

    def reap(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                pass
        for stream in (self.proc.stdin, self.proc.stdout):
            try:
                stream.close()
            except (OSError, ValueError):
                pass


class _Pool:
    """Up to ``size`` workers, started when first needed; a thread per in-flight request waits on its
    worker's reply, so the caller can put a wall-clock deadline on every request."""

    def __init__(self, size: int) -> None:
        self._idle: list[_Worker] = []
        self._workers: list[_Worker] = []
        self._lock = threading.Lock()
        self._dead = False
        self._threads = ThreadPoolExecutor(max_workers=size, thread_name_prefix="math-verify")

    def submit(self, message: dict) -> Future:
        return self._threads.submit(self._call, message)

    def _call(self, message: dict):
        with self._lock:
            if self._dead:
                raise _WorkerDied("pool was killed")
            while self._idle and not self._idle[-1].alive():  # died while idle: drop it
                self._workers.remove(self._idle.pop())
            worker = self._idle.pop() if self._idle else None
            if worker is None:
                worker = _Worker()
                self._workers.append(worker)
        try:
            reply = worker.request(message)
        except BaseException:
            worker.kill()
            with self._lock:
                if worker in self._workers:
                    self._workers.remove(worker)
            worker.reap(5)
            raise
        with self._lock:
            if self._dead:
                worker.kill()
            else:
                self._idle.append(worker)
        return reply

    def pids(self) -> list[int]:
        with self._lock:
            return [w.proc.pid for w in self._workers if w.alive()]

    def kill(self) -> None:
        """Kill every worker at once (a hung or stopped one ignores polite shutdown)."""
        with self._lock:
            self._dead = True
            workers, self._workers, self._idle = self._workers, [], []
        for worker in workers:
            worker.kill()
        self._threads.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.reap(10)

    def close(self, grace: float = 2.0) -> None:
        """End of input for every worker; one still there after ``grace`` seconds is killed."""
        with self._lock:
            self._dead = True
            workers, self._workers, self._idle = self._workers, [], []
        for worker in workers:
            try:
                worker.proc.stdin.close()
            except (OSError, ValueError):
                pass
        self._threads.shutdown(wait=False, cancel_futures=True)
        for worker in workers:
            worker.reap(grace)


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
        self._pool: _Pool | None = None

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
        return [] if self._pool is None else self._pool.pids()

    def close(self) -> None:
        """Shut the pool down (a worker still there after 2 s is killed); a later call starts a new one."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.close(grace=2.0)  # idle workers exit at once on end of input; hung ones are killed

    def __enter__(self) -> MathChecker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- machinery ----------------------------------------------------------------------------

    def _executor(self) -> _Pool:
        """The pool, started on first use with a round trip per worker that proves it can start
        (so no chunk's wall-clock limit pays for interpreter start-up and imports)."""
        if self._pool is None:
            pool = _Pool(self.workers)
            try:
                pings = [pool.submit({"ping": True}) for _ in range(self.workers)]
                deadline = time.monotonic() + _START_TIMEOUT
                for ping in pings:
                    ping.result(timeout=max(0.0, deadline - time.monotonic()))
            except BaseException as error:
                pool.kill()
                raise TaskError(
                    f"math-verify worker process failed to start ({type(error).__name__}: {error}); "
                    f"it runs guidedecode.tasks._checker_worker.main() under {sys.executable} (see its stderr above)"
                ) from error
            self._pool = pool
        return self._pool

    def _kill_pool(self) -> None:
        """Kill every worker at once (a hung one ignores polite shutdown) and drop the pool."""
        pool, self._pool = self._pool, None
        if pool is not None:
            pool.kill()

    def _submit(self, chunk: list[int], pairs: Sequence, symmetric: bool) -> Future:
        message = {"pairs": [list(pairs[i]) for i in chunk], "timeout": self.timeout, "symmetric": symmetric}
        return self._executor().submit(message)

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
                except _WorkerDied:  # a worker died: its pairs stay False
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
