"""Run generated code (HumanEval / MBPP completions) in a resource-limited child process.

Generated code never runs inside the calling interpreter. :func:`run_program` writes the source to a
fresh scratch directory, starts ``sys.executable -I -B main.py`` there as a new session (its own
process group) and returns a :class:`SandboxResult` with status ``"pass"``, ``"fail"``,
``"timeout"`` or ``"error"``. :func:`check_code` joins a program and its tests into one file and
runs that.

What is limited / isolated:

* **Time**: a wall-clock ``timeout`` (the process group is SIGKILLed when it runs out) plus
  ``RLIMIT_CPU`` = ``ceil(timeout) + 1`` s (soft: SIGXCPU; hard: one second later, SIGKILL).
* **Memory**: ``RLIMIT_AS`` = ``memory_mb`` MiB of address space (allocations fail with
  ``MemoryError``).
* **Files**: ``RLIMIT_FSIZE`` = ``max_file_bytes`` per written file (Python ignores SIGXFSZ, so the
  write fails with ``OSError: [Errno 27] File too large``); ``RLIMIT_CORE`` = 0. The working
  directory, ``HOME`` and ``TMPDIR`` are the scratch directory, which is removed afterwards.
* **Processes**: ``RLIMIT_NPROC`` is set to the user's current task count plus a small headroom
  (:data:`NPROC_HEADROOM`). The kernel does not enforce it for root (or with
  ``CAP_SYS_RESOURCE``/``CAP_SYS_ADMIN``). Whatever the program forks stays in its process group,
  and the whole group is SIGKILLed when the call ends -- on every path, the normal one included --
  so children that keep spinning (``os.fork()``, ``subprocess.Popen(["sleep", "1000"])``) do not
  outlive the call.
* **Output**: stdout and stderr are read concurrently (one ``selectors`` loop in the calling thread,
  no helper threads); at most ``max_output_bytes`` of each is kept and the rest is discarded. A
  stream that produces more than the *hard cap* -- ``max(16 * max_output_bytes, 16 MiB)`` bytes --
  gets the process group killed at once, with status ``"error"`` (detail ``"output flood: ..."``);
  below the cap a flooding program simply runs into its timeout.
* **Environment**: only ``PATH``, ``HOME``, ``TMPDIR`` and ``LANG=C.UTF-8``; ``-I`` drops
  ``PYTHON*`` variables, the user site directory and the script directory from ``sys.path``; stdin
  is ``/dev/null``.

What is **not** isolated: this is a resource-limited subprocess, **not a security boundary** like
a container, VM or seccomp jail. The program runs as the calling user, sees the whole file system
with that user's permissions (and can read its own source, nonce included), can reach the network,
can see other processes, and can leave the process group with ``setsid()`` (such escapees are not
killed). Run untrusted code inside a container if that matters.

The caller is unharmed: its working directory, environment, signal handlers and open files are not
changed, and nothing the program does makes these functions raise -- only invalid *arguments*
raise ``ValueError``. The resource limits are applied in a ``preexec_fn`` (which the ``subprocess``
docs call unsafe in heavily threaded callers; it only calls ``resource.setrlimit``).
"""

from __future__ import annotations

import math
import os
import re
import resource
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Literal

__all__ = ["SandboxResult", "run_program", "check_code", "NPROC_HEADROOM"]

Status = Literal["pass", "fail", "timeout", "error"]

#: Extra processes/threads the program may create beyond what the user already runs (RLIMIT_NPROC
#: is per user, not per process tree). Not enforced for root.
NPROC_HEADROOM = 64

_FLOOD_FACTOR = 16  # hard cap on one stream: max(_FLOOD_FACTOR * max_output_bytes, _FLOOD_MIN)
_FLOOD_MIN = 16 << 20
_TAIL_BYTES = 8192  # stderr tail kept (beyond the head) to find the final exception line
_DRAIN_GRACE = 0.5  # seconds to drain pipes after the program ended / was killed
_POLL = 0.05  # fallback polling interval when pidfd is not available
_READ = 1 << 16
_DETAIL_CHARS = 200

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::(?:\s.*)?)?$")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``"pass"`` (exit code 0 and the end-of-program sentinel was printed), ``"fail"``
    (an ``AssertionError``, or exit 0 before the tests finished), ``"timeout"`` (wall clock or CPU
    limit) or ``"error"`` (syntax error, any other exception, ``MemoryError``, killed by a signal,
    output flood, could not start). ``returncode`` is the child's exit code (negative: killed by
    that signal), ``None`` if it never started. ``stdout``/``stderr`` are decoded as UTF-8 (bad
    bytes replaced) and truncated to ``max_output_bytes`` bytes each; the sentinel line is removed
    from ``stdout``. ``duration`` is seconds from start until exit (or the kill). ``detail`` is one
    line saying why.
    """

    status: Status
    returncode: int | None
    stdout: str
    stderr: str
    duration: float
    detail: str

    @property
    def passed(self) -> bool:
        return self.status == "pass"


def check_code(program: str, tests: str, **limits) -> SandboxResult:
    """Run ``program`` followed by ``tests`` as one file (see :func:`run_program` for ``limits``).

    For HumanEval, ``program`` is prompt + completion and ``tests`` the test code plus
    ``check(<entry_point>)``; for MBPP, ``tests`` are the ``assert`` lines.
    """
    if not isinstance(program, str) or not isinstance(tests, str):
        raise ValueError("check_code: program and tests must be str")
    sep = "" if program.endswith("\n") or not program else "\n"
    return run_program(program + sep + "\n" + tests, **limits)


def run_program(
    source: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_file_bytes: int = 16 << 20,
) -> SandboxResult:
    """Run Python ``source`` in a fresh, resource-limited child process and classify the outcome.

    ``timeout``: wall-clock seconds (also sets RLIMIT_CPU to ``ceil(timeout) + 1``);
    ``memory_mb``: address-space limit; ``max_output_bytes``: bytes kept of stdout and of stderr
    each; ``max_file_bytes``: largest file the program may write. A random nonce line is appended
    to the source; the run passes only if the process exits 0 *and* printed that line, so
    ``exit(0)`` / ``sys.exit()`` / ``os._exit(0)`` before the tests finish is a ``"fail"``.
    See the module docstring for what is and is not isolated. Raises ``ValueError`` only for
    invalid arguments; never for anything the program does.
    """
    _validate(source, timeout, memory_mb, max_output_bytes, max_file_bytes)
    token = f"__guidedecode_ok_{secrets.token_hex(16)}__"
    sentinel = (token + "\n").encode("ascii")
    full = source + ("" if source.endswith("\n") or not source else "\n") + _sentinel_code(token)

    scratch = tempfile.mkdtemp(prefix="guidedecode_sandbox_")
    try:
        path = os.path.join(scratch, "main.py")
        with open(path, "wb") as fh:
            fh.write(full.encode("utf-8", "surrogatepass"))
        return _run(path, scratch, sentinel, timeout, memory_mb, max_output_bytes, max_file_bytes)
    finally:
        _rmtree(scratch)


# ----------------------------------------------------------------------------------------------
# internals


def _validate(source, timeout, memory_mb, max_output_bytes, max_file_bytes) -> None:
    if not isinstance(source, str):
        raise ValueError(f"run_program: source must be str, got {type(source).__name__}")
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not (
        math.isfinite(timeout) and timeout > 0
    ):
        raise ValueError(f"run_program: timeout must be a finite number > 0, got {timeout!r}")
    for name, value in (
        ("memory_mb", memory_mb),
        ("max_output_bytes", max_output_bytes),
        ("max_file_bytes", max_file_bytes),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"run_program: {name} must be an int > 0, got {value!r}")


def _sentinel_code(token: str) -> str:
    # Flush whatever the program buffered, then write the nonce straight to fd 1 (works even if the
    # program rebound sys.stdout). Private aliases so the program's own names do not interfere.
    return (
        "import sys as _guidedecode_sys, os as _guidedecode_os\n"
        "try:\n"
        "    _guidedecode_sys.stdout.flush()\n"
        "except BaseException:\n"
        "    pass\n"
        f"_guidedecode_os.write(1, b{token + chr(10)!r})\n"
    )


def _rlimits(timeout: float, memory_mb: int, max_file_bytes: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, clamped to the current hard limits (computed in the parent)."""
    cpu = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, max_file_bytes, max_file_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, *([_nproc_limit()] * 2)),
    ]
    out = []
    for res, soft, hard in wanted:
        try:
            _, cur_hard = resource.getrlimit(res)
        except (OSError, ValueError):
            continue
        if cur_hard != resource.RLIM_INFINITY:
            soft, hard = min(soft, cur_hard), min(hard, cur_hard)
        out.append((res, soft, hard))
    return out


def _nproc_limit() -> int:
    """The user's current task (process + thread) count plus NPROC_HEADROOM.

    RLIMIT_NPROC counts every task of the real user id, so a fixed small number would stop a
    user with a busy desktop from forking at all. Root is not limited by the kernel anyway.
    """
    uid = os.getuid()
    if uid == 0:
        return NPROC_HEADROOM
    count = 0
    try:
        entries = os.listdir("/proc")
    except OSError:
        return 4096
    for name in entries:
        if not name.isdigit():
            continue
        try:
            if os.stat(f"/proc/{name}").st_uid != uid:
                continue
            count += len(os.listdir(f"/proc/{name}/task"))
        except OSError:
            continue
    return count + NPROC_HEADROOM


def _limiter(limits: list[tuple[int, int, int]]):
    def apply_limits() -> None:  # runs in the child between fork and exec; must not raise
        for res, soft, hard in limits:
            try:
                resource.setrlimit(res, (soft, hard))
            except (OSError, ValueError):
                pass

    return apply_limits


def _child_env(scratch: str) -> dict[str, str]:
    return {
        "PATH": os.environ.get("PATH") or "/usr/local/bin:/usr/bin:/bin",
        "HOME": scratch,
        "TMPDIR": scratch,
        "LANG": "C.UTF-8",
    }


class _Stream:
    """Keeps the first ``limit`` bytes (and a short tail) of a pipe, discards the rest, and spots
    the sentinel anywhere in the stream (even in discarded bytes)."""

    def __init__(self, limit: int, sentinel: bytes | None = None) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0
        self.sentinel = sentinel
        self.sentinel_at: int | None = None  # stream offset of the first sentinel
        self._carry = b""

    def feed(self, data: bytes) -> None:
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        if self.sentinel is not None and self.sentinel_at is None:
            window = self._carry + data
            idx = window.find(self.sentinel)
            if idx >= 0:
                self.sentinel_at = self.total - len(self._carry) + idx
            self._carry = window[-(len(self.sentinel) - 1):]
        self.total += len(data)

    def text(self) -> str:
        head = bytes(self.head)
        if self.sentinel_at is not None and self.sentinel_at < len(head):
            head = head[: self.sentinel_at] + head[self.sentinel_at + len(self.sentinel):]
        return head.decode("utf-8", "replace")


def _killpg(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError, OSError):
        pass


def _exited(pid: int) -> bool:
    """True once the child has exited, without reaping it (the zombie keeps the pgid reserved)."""
    try:
        return os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
    except ChildProcessError:
        return True


def _run(path, scratch, sentinel, timeout, memory_mb, max_output_bytes, max_file_bytes):
    limits = _rlimits(timeout, memory_mb, max_file_bytes)
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            [sys.executable, "-I", "-B", path],
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            preexec_fn=_limiter(limits),
        )
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        return SandboxResult("error", None, "", "", time.monotonic() - start,
                             _one_line(f"could not start the program: {exc}"))

    pid = pgid = proc.pid
    out = _Stream(max_output_bytes, sentinel)
    err = _Stream(max_output_bytes)
    hard_cap = max(_FLOOD_FACTOR * max_output_bytes, _FLOOD_MIN)
    timed_out = False
    flooded: str | None = None
    end: float | None = None
    rusage = None
    sel = selectors.DefaultSelector()
    pidfd = None
    try:
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err}
        names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr"}
        for fd in streams:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        try:
            pidfd = os.pidfd_open(pid)
            sel.register(pidfd, selectors.EVENT_READ)
        except (AttributeError, OSError):
            pidfd = None
        deadline = start + timeout
        drain_until = None
        while True:
            now = time.monotonic()
            if end is None:
                if _exited(pid):
                    end = now
                elif now >= deadline:
                    timed_out = True
                    end = now
                if end is not None:
                    _killpg(pgid)  # also on the normal path: forked children must not outlive us
                    drain_until = now + _DRAIN_GRACE
            open_streams = [fd for fd in streams if fd in sel.get_map()]
            if end is not None and (not open_streams or now >= drain_until):
                break
            wait = (drain_until if end is not None else deadline) - now
            if end is not None or pidfd is None or pidfd not in sel.get_map():
                wait = min(wait, _POLL)
            for key, _ in sel.select(max(wait, 0.0)):
                fd = key.fd
                if fd == pidfd:
                    sel.unregister(pidfd)  # stays readable; _exited() is checked next round
                    continue
                try:
                    data = os.read(fd, _READ)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if not data:
                    sel.unregister(fd)
                    continue
                streams[fd].feed(data)
                if flooded is None and end is None and streams[fd].total > hard_cap:
                    flooded = names[fd]
                    end = time.monotonic()
                    _killpg(pgid)
                    drain_until = end + _DRAIN_GRACE
    finally:
        _killpg(pgid)
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        try:
            _, wstatus, rusage = os.wait4(pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(wstatus)
        except ChildProcessError:
            proc.wait()
        for f in (proc.stdout, proc.stderr):
            try:
                f.close()
            except OSError:
                pass
    if end is None:
        end = time.monotonic()

    rc = proc.returncode
    status, detail = _classify(rc, timed_out, flooded, hard_cap, out, err, timeout, limits, rusage)
    return SandboxResult(status, rc, out.text(), err.text(), end - start, detail)


def _classify(rc, timed_out, flooded, hard_cap, out, err, timeout, limits, rusage):
    if timed_out:
        return "timeout", f"exceeded {float(timeout)} s"
    if flooded is not None:
        return "error", f"output flood: {flooded} exceeded {hard_cap} bytes (killed)"
    cpu_limit = next((soft for res, soft, _ in limits if res == resource.RLIMIT_CPU), None)
    if rc is not None and rc < 0:
        sig = -rc
        if sig == signal.SIGXCPU:
            return "timeout", f"exceeded CPU limit of {cpu_limit} s (SIGXCPU)"
        if sig == signal.SIGKILL and rusage is not None and cpu_limit is not None:
            if rusage.ru_utime + rusage.ru_stime >= cpu_limit:
                return "timeout", f"exceeded CPU limit of {cpu_limit} s (SIGKILL)"
        exc = _last_exception(err)
        return "error", _one_line(f"killed by {_signame(sig)}" + (f" after {exc}" if exc else ""))
    if rc == 0:
        if out.sentinel_at is not None:
            return "pass", "ok"
        return "fail", "tests did not finish (program exited early)"
    exc = _last_exception(err)
    if exc is not None:
        name = exc.split(":", 1)[0].rsplit(".", 1)[-1]
        return ("fail" if name == "AssertionError" else "error"), _one_line(exc)
    return "error", f"exited with code {rc}"


def _last_exception(err: _Stream) -> str | None:
    """The final ``ExcName: message`` line of a traceback in stderr's tail, if any."""
    text = bytes(err.tail).decode("utf-8", "replace")
    for line in reversed(text.splitlines()):
        if not line.strip() or line[0].isspace():
            continue
        if line.startswith(("Traceback (most recent call last)", "During handling", "The above")):
            continue
        if _EXC_LINE.match(line):
            return line
        return None
    return None


def _signame(sig: int) -> str:
    try:
        return signal.Signals(sig).name
    except ValueError:
        return f"signal {sig}"


def _one_line(text: str) -> str:
    line = " ".join(text.split())
    return line if len(line) <= _DETAIL_CHARS else line[: _DETAIL_CHARS - 3] + "..."


def _rmtree(path: str) -> None:
    def onerror(func, p, _exc):  # e.g. the program chmod-ed a directory to 000
        try:
            parent = os.path.dirname(p)
            os.chmod(parent, stat.S_IRWXU)
            if os.path.isdir(p) and not os.path.islink(p):
                os.chmod(p, stat.S_IRWXU)
            func(p)
        except OSError:
            pass

    shutil.rmtree(path, onerror=onerror)
    if os.path.exists(path):
        shutil.rmtree(path, ignore_errors=True)
