"""Run generated code (HumanEval / MBPP completions, program-of-thought) in a sandbox.

Generated code never runs inside the calling interpreter. :func:`run_program` writes the source to a
fresh scratch directory and runs it there through a small trusted runner
(``guidedecode/tasks/_sandbox_runner.py``), returning a :class:`SandboxResult` with status
``"pass"``, ``"fail"``, ``"timeout"`` or ``"error"``. :func:`check_code` joins a program and its
tests into one file and runs that. :func:`isolation` says which of the layers below this machine
gives (probed once per process).

**The verdict.** A run passes only when the runner wrote ``pass <key>`` to a private verdict pipe
after the whole file ran without an exception, *and* the exit code is 0. The per-run key reaches
the runner through another pipe that it reads and closes before any generated code runs; the key
is never in ``main.py``, in argv, in the environment, on stdout/stderr or in the module's code
object, the runner never calls ``sys.excepthook``, and it wipes the key once a verdict is written.
So printing a copied or guessed line, reading ``main.py`` or ``/proc/self/*``, hooking
``sys.excepthook``, exiting early with code 0 or rebinding ``sys.stdout`` cannot fake a pass.

**Layers** (all on Linux; each one that the kernel or the machine refuses is left out, never fatal):

* ``bwrap`` mode (when `bubblewrap <https://github.com/containers/bubblewrap>`_ is installed and
  works here): the runner starts inside ``bwrap`` with its own network namespace (no network, not
  even 127.0.0.1), PID namespace (the caller and every other process are invisible and cannot be
  signalled; when the runner ends, the kernel kills everything left in the namespace), IPC and UTS
  namespaces, a read-only view of ``/``, fresh ``/proc``, ``/dev`` and ``/tmp``, the caller's home
  directory and every directory the sandbox user could not enter hidden behind empty tmpfs mounts
  (the interpreter and its library directories are bound back read-only), and only the scratch
  directory writable. ``--die-with-parent``, ``--new-session`` (no terminal injection).
* ``process`` mode (no usable ``bwrap``): a plain child process; as root its network namespace is
  still dropped (``unshare(CLONE_NEWNET)``).
* Both modes: as root the generated code runs as ``nobody`` (no supplementary groups, no
  capabilities, ``PR_SET_NO_NEW_PRIVS``), so the kernel enforces ``RLIMIT_NPROC`` and the program
  cannot read root's files, ``/proc/<caller>/environ`` or signal the caller (in ``process`` mode
  only when ``nobody`` can read the interpreter's files; otherwise the code runs as the caller and
  :func:`isolation` says why). The runner is the child subreaper (``PR_SET_CHILD_SUBREAPER``):
  after the program ends it SIGKILLs and reaps every descendant, ``setsid()`` and double-forked
  ones included; the worker dies with the runner (``PR_SET_PDEATHSIG``).
* **Time**: a wall-clock ``timeout`` plus ``RLIMIT_CPU`` = ``ceil(timeout) + 1`` s.
  **Memory**: ``RLIMIT_AS`` = ``memory_mb`` MiB. **Files**: ``RLIMIT_FSIZE`` = ``max_file_bytes``;
  ``RLIMIT_CORE`` = 0; cwd, ``HOME`` and ``TMPDIR`` are the scratch directory, removed afterwards.
  **Processes**: ``RLIMIT_NPROC`` = the sandbox user's current task count + :data:`NPROC_HEADROOM`
  (not enforced when the code runs as root). **Output**: at most ``max_output_bytes`` of stdout and
  of stderr are kept; a stream past ``max(16 * max_output_bytes, 16 MiB)`` bytes is killed at once
  (``"error"``, ``"output flood: ..."``). **Environment**: only ``PATH``, ``HOME``, ``TMPDIR``,
  ``LANG=C.UTF-8``; ``python -I`` (no ``PYTHON*`` variables, user site or script directory);
  stdin is ``/dev/null``.

**Outside the threat model** (tested as such in ``tests/test_sandbox.py``):

* *Tampering with the interpreter that runs the tests.* The tests run in the same interpreter as the
  code they test, as in the reference harnesses (openai/human-eval ``execution.py``, the MBPP
  asserts). Code written against this harness can subvert them from inside: return objects whose
  ``__eq__`` is always true, patch builtins the tests call, or walk the runner's frames to the
  verdict writer. No verdict computed inside that process can be tamper-proof; one computed in
  another process from plain data would change what HumanEval/MBPP tests may do (identity,
  mutation, user classes). The leaks a program finds without targeting this runner are closed.
* *Kernel and hardware attacks* (exploits, side channels) and *CPU/memory contention* with other
  processes: the limits are per run, not a scheduler.
* *Reading world-readable files* outside the hidden directories (e.g. ``/etc/passwd``, the
  library's own source): only writing is confined to the scratch directory.
* In ``process`` mode, everything the namespaces give in ``bwrap`` mode (network for non-root
  callers, other processes visible, ``/tmp`` writable by the sandbox user). Install bubblewrap
  (``apt-get install bubblewrap``) where that matters; :func:`isolation` reports the mode.

The caller is unharmed: its working directory, environment, signal handlers and open files are not
changed, and nothing the program does makes these functions raise -- only invalid *arguments*
raise ``ValueError``. The resource limits are applied in a ``preexec_fn`` (which the ``subprocess``
docs call unsafe in heavily threaded callers; it only calls ``resource.setrlimit``).
"""

from __future__ import annotations

import functools
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
import sysconfig
import tempfile
import time
import warnings
from dataclasses import dataclass
from typing import Literal

__all__ = ["SandboxResult", "Isolation", "isolation", "run_program", "check_code", "NPROC_HEADROOM"]

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

_RUNNER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_runner.py")
_VERDICT_BYTES = 1 << 16  # verdict pipe bytes read (the runner writes a few short lines)
_STOP_GRACE = 1.0  # seconds the runner gets to kill and reap its descendants after a timeout
_NOBODY = 65534

_EXC_LINE = re.compile(r"^([A-Za-z_][\w.]*)(?::(?:\s.*)?)?$")


@dataclass(frozen=True)
class SandboxResult:
    """Outcome of one sandboxed run.

    ``status``: ``"pass"`` (exit code 0 and the runner's keyed verdict: the whole file ran), ``"fail"``
    (an ``AssertionError``, or exit 0 before the tests finished), ``"timeout"`` (wall clock or CPU
    limit) or ``"error"`` (syntax error, any other exception, ``MemoryError``, killed by a signal,
    output flood, could not start). ``returncode`` is the child's exit code (negative: killed by
    that signal), ``None`` if it never started. ``stdout``/``stderr`` are decoded as UTF-8 (bad
    bytes replaced) and truncated to ``max_output_bytes`` bytes each. ``duration`` is seconds from start until exit (or the kill). ``detail`` is one
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


@dataclass(frozen=True)
class Isolation:
    """What the sandbox gives on this machine (see the module docstring).

    ``mode``: ``"bwrap"`` or ``"process"``; ``uid``: the user the generated code runs as;
    ``network``: no network (own network namespace); ``pid_namespace``: own PID space;
    ``private_filesystem``: read-only ``/``, private ``/tmp``, writes only in the scratch directory;
    ``reason``: why a layer is missing ('' when none is).
    """

    mode: Literal["bwrap", "process"]
    uid: int
    network: bool
    pid_namespace: bool
    private_filesystem: bool
    reason: str


def isolation() -> Isolation:
    """The isolation :func:`run_program` uses here: ``bwrap`` when bubblewrap is installed and a
    probe run inside it passes, else ``process``. ``$GUIDEDECODE_SANDBOX=process`` forces the plain
    mode (``bwrap`` requires bubblewrap and raises ``RuntimeError`` without it). Probed once per
    process and setting."""
    return _isolation(os.environ.get("GUIDEDECODE_SANDBOX", "auto"))


def run_program(
    source: str,
    *,
    timeout: float = 10.0,
    memory_mb: int = 1024,
    max_output_bytes: int = 1 << 20,
    max_file_bytes: int = 16 << 20,
) -> SandboxResult:
    """Run Python ``source`` in the sandbox and classify the outcome.

    ``timeout``: wall-clock seconds (also sets RLIMIT_CPU to ``ceil(timeout) + 1``);
    ``memory_mb``: address-space limit; ``max_output_bytes``: bytes kept of stdout and of stderr
    each; ``max_file_bytes``: largest file the program may write. The run passes only if the
    program ran to its end without an exception (the runner's keyed verdict, see the module
    docstring) *and* exited 0, so ``exit(0)`` / ``sys.exit()`` / ``os._exit(0)`` before the tests
    finish is a ``"fail"``. Raises ``ValueError`` only for invalid arguments; never for anything
    the program does.
    """
    _validate(source, timeout, memory_mb, max_output_bytes, max_file_bytes)
    iso = isolation()
    scratch = tempfile.mkdtemp(prefix="guidedecode_sandbox_")
    try:
        path = os.path.join(scratch, "main.py")
        with open(path, "wb") as fh:
            fh.write(source.encode("utf-8", "surrogatepass"))
        if iso.uid != os.geteuid():
            os.chown(scratch, iso.uid, _gid_of(iso.uid))
        return _run(iso, path, scratch, timeout, memory_mb, max_output_bytes, max_file_bytes)
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


def _rlimits(timeout: float, memory_mb: int, max_file_bytes: int, uid: int) -> list[tuple[int, int, int]]:
    """(resource, soft, hard) triples, clamped to the current hard limits (computed in the parent)."""
    cpu = math.ceil(timeout) + 1
    wanted = [
        (resource.RLIMIT_AS, memory_mb << 20, memory_mb << 20),
        (resource.RLIMIT_CPU, cpu, cpu + 1),
        (resource.RLIMIT_FSIZE, max_file_bytes, max_file_bytes),
        (resource.RLIMIT_CORE, 0, 0),
        (resource.RLIMIT_NPROC, *([_nproc_limit(uid)] * 2)),
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


def _nproc_limit(uid: int) -> int:
    """The sandbox user's current task (process + thread) count plus NPROC_HEADROOM.

    RLIMIT_NPROC counts every task of the real user id, so a fixed small number would stop a
    user with a busy desktop from forking at all. Root is not limited by the kernel anyway.
    """
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


def _gid_of(uid: int) -> int:
    try:
        import pwd

        return pwd.getpwuid(uid).pw_gid
    except (ImportError, KeyError):
        return uid


def _sandbox_uid() -> int:
    """``nobody`` when the caller is root, else the caller."""
    if os.geteuid() != 0:
        return os.geteuid()
    try:
        import pwd

        return pwd.getpwnam("nobody").pw_uid
    except (ImportError, KeyError):
        return _NOBODY


def _needed_paths() -> list[str]:
    """Directories the sandboxed interpreter reads: its prefixes, library and site directories,
    the runner's directory and the caller's ``sys.path`` directories (``.pth`` additions)."""
    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, sys.base_exec_prefix,
             os.path.dirname(os.path.realpath(sys.executable)), os.path.dirname(sys.executable),
             os.path.dirname(_RUNNER)}
    paths.update(p for p in sysconfig.get_paths().values() if p)
    paths.update(p for p in sys.path if p and os.path.isabs(p))
    out = set()
    for p in paths:
        for q in (p, os.path.realpath(p)):
            if os.path.isdir(q):
                out.add(os.path.normpath(q))
    return sorted(out)


def _others_can_enter(path: str) -> bool:
    try:
        st = os.stat(path)
    except OSError:
        return False
    return bool(st.st_mode & stat.S_IXOTH)


def _hidden_dirs(needed: list[str], uid: int) -> list[str]:
    """Directories covered by an empty tmpfs: the caller's home and, when the code runs as another
    user, the highest ancestor of each needed path that user could not enter."""
    hidden = set()
    home = os.path.realpath(os.path.expanduser("~"))
    if home not in ("/", "") and os.path.isdir(home):
        hidden.add(home)
    if uid != os.geteuid():
        for p in needed:
            parts = p.strip("/").split("/")
            for i in range(1, len(parts) + 1):
                anc = "/" + "/".join(parts[:i])
                if not _others_can_enter(anc):
                    hidden.add(anc)
                    break
    # a hidden directory inside another hidden one adds nothing
    return sorted(h for h in hidden if not any(h != o and h.startswith(o + "/") for o in hidden))


def _bwrap_argv(bwrap: str, scratch: str, uid: int) -> list[str]:
    needed = _needed_paths()
    hidden = _hidden_dirs(needed, uid)
    argv = [bwrap]
    if os.geteuid() != 0:
        argv.append("--unshare-user")  # unprivileged: the namespaces come with a user namespace
    argv += ["--ro-bind", "/", "/", "--dev", "/dev", "--proc", "/proc", "--tmpfs", "/tmp"]
    for h in hidden:
        argv += ["--tmpfs", h]
    covered = hidden + ["/tmp"]
    under = [p for p in needed if any(p == c or p.startswith(c + "/") for c in covered)]
    binds = [("--ro-bind", p) for p in under if not any(p != q and p.startswith(q + "/") for q in under)]
    made = set(covered)
    for kind, p in binds + [("--bind", scratch)]:  # bind back what a tmpfs covers, then the scratch dir
        top = next((c for c in covered if p == c or p.startswith(c + "/")), None)
        parts = p[len(top):].strip("/").split("/")[:-1] if top else []
        for i in range(1, len(parts) + 1):  # bwrap would create these 0700: unreadable for nobody
            anc = top + "/" + "/".join(parts[:i])
            if anc not in made:
                made.add(anc)
                argv += ["--perms", "0755", "--dir", anc]
        argv += [kind, p, p]
    argv += ["--chdir", scratch,
             "--unshare-net", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try",
             "--die-with-parent", "--new-session", "--"]
    return argv


@functools.lru_cache(maxsize=None)
def _isolation(setting: str) -> Isolation:
    if setting not in ("auto", "bwrap", "process"):
        raise ValueError(f"$GUIDEDECODE_SANDBOX must be auto, bwrap or process, got {setting!r}")
    uid = _sandbox_uid()
    reason = ""
    if setting != "process":
        bwrap = shutil.which("bwrap")
        if bwrap is None:
            reason = "bubblewrap (bwrap) is not installed"
        else:
            iso = Isolation("bwrap", uid, True, True, True, "")
            probe = _probe(iso)
            if probe is None:
                return iso
            reason = f"bwrap does not work here: {probe}"
        if setting == "bwrap":
            raise RuntimeError(f"$GUIDEDECODE_SANDBOX=bwrap but {reason}")
    root = os.geteuid() == 0
    if uid != os.geteuid() and not _process_mode_readable():
        reason = (reason + "; " if reason else "") + (
            "the interpreter's files are not readable by 'nobody', so the code runs as root")
        uid = os.geteuid()
    iso = Isolation("process", uid, root, False, False, reason)
    probe = _probe(iso)
    if probe is not None and uid != os.geteuid():
        reason = (reason + "; " if reason else "") + f"running as 'nobody' failed ({probe}), so the code runs as root"
        iso = Isolation("process", os.geteuid(), root, False, False, reason)
    if reason and setting == "auto":
        warnings.warn(f"guidedecode sandbox: process mode ({reason})", RuntimeWarning, stacklevel=3)
    return iso


def _process_mode_readable() -> bool:
    """Whether every needed directory and its ancestors can be entered by other users."""
    for p in _needed_paths():
        parts = p.strip("/").split("/")
        if not all(_others_can_enter("/" + "/".join(parts[:i])) for i in range(1, len(parts) + 1)):
            return False
    return True


def _probe(iso: Isolation) -> str | None:
    """None when a tiny program passes under ``iso`` (stdlib imports included), else why not."""
    scratch = tempfile.mkdtemp(prefix="guidedecode_sandbox_probe_")
    try:
        path = os.path.join(scratch, "main.py")
        with open(path, "w") as fh:
            fh.write("import json, math, re, collections, tempfile\nopen('probe', 'w').write('ok')\n")
        if iso.uid != os.geteuid():
            os.chown(scratch, iso.uid, _gid_of(iso.uid))
        result = _run(iso, path, scratch, 20.0, 1024, 1 << 16, 1 << 20)
    finally:
        _rmtree(scratch)
    if result.passed:
        return None
    return _one_line(f"{result.detail} {result.stderr[-300:]}")


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
    """Keeps the first ``limit`` bytes (and a short tail) of a pipe and discards the rest."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.head = bytearray()
        self.tail = bytearray()
        self.total = 0

    def feed(self, data: bytes) -> None:
        if len(self.head) < self.limit:
            self.head += data[: self.limit - len(self.head)]
        self.tail = (self.tail + data)[-_TAIL_BYTES:]
        self.total += len(data)

    def text(self) -> str:
        return bytes(self.head).decode("utf-8", "replace")


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


def _run(iso, path, scratch, timeout, memory_mb, max_output_bytes, max_file_bytes):
    limits = _rlimits(timeout, memory_mb, max_file_bytes, iso.uid)
    key = secrets.token_hex(32)
    drop = iso.uid if iso.uid != os.geteuid() else -1
    net = int(iso.mode == "process" and iso.network)
    key_r, key_w = os.pipe()
    verdict_r, verdict_w = os.pipe()
    os.write(key_w, key.encode("ascii"))
    os.close(key_w)
    argv = [sys.executable, "-I", "-B", _RUNNER, path, str(key_r), str(verdict_w),
            str(drop), str(_gid_of(drop) if drop >= 0 else -1), str(net)]
    if iso.mode == "bwrap":
        argv = _bwrap_argv(shutil.which("bwrap") or "bwrap", scratch, iso.uid) + argv
    start = time.monotonic()
    try:
        proc = subprocess.Popen(
            argv,
            cwd=scratch,
            env=_child_env(scratch),
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            start_new_session=True,
            close_fds=True,
            pass_fds=(key_r, verdict_w),
            preexec_fn=_limiter(limits),
        )
    except (OSError, subprocess.SubprocessError, ValueError) as exc:
        for fd in (key_r, verdict_r, verdict_w):
            os.close(fd)
        return SandboxResult("error", None, "", "", time.monotonic() - start,
                             _one_line(f"could not start the program: {exc}"))
    os.close(key_r)
    os.close(verdict_w)

    pid = pgid = proc.pid
    out = _Stream(max_output_bytes)
    err = _Stream(max_output_bytes)
    verdict = _Stream(_VERDICT_BYTES)
    hard_cap = max(_FLOOD_FACTOR * max_output_bytes, _FLOOD_MIN)
    timed_out = False
    flooded: str | None = None
    end: float | None = None
    rusage = None
    sel = selectors.DefaultSelector()
    pidfd = None

    def stop() -> None:
        # bwrap: SIGKILL to bwrap kills its PID namespace. process mode: the runner kills and reaps
        # its descendants on SIGTERM (a SIGKILL would orphan setsid() children); SIGKILL after a grace.
        if iso.mode == "process" and not _exited(pid):
            try:
                os.kill(pid, signal.SIGTERM)
            except OSError:
                pass
            stop_at = time.monotonic() + _STOP_GRACE
            while not _exited(pid) and time.monotonic() < stop_at:
                time.sleep(0.01)
        _killpg(pgid)

    try:
        streams = {proc.stdout.fileno(): out, proc.stderr.fileno(): err, verdict_r: verdict}
        names = {proc.stdout.fileno(): "stdout", proc.stderr.fileno(): "stderr", verdict_r: "verdict"}
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
                    stop()
                if end is not None:
                    _killpg(pgid)  # also on the normal path (the runner already reaped its own)
                    drain_until = time.monotonic() + _DRAIN_GRACE
            open_streams = [fd for fd in streams if fd in sel.get_map()]
            if end is not None and (not open_streams or now >= drain_until):
                break
            wait = (drain_until if end is not None else deadline) - now
            if end is not None or pidfd is None or pidfd not in sel.get_map():
                wait = min(wait, _POLL)
            for key_, _ in sel.select(max(wait, 0.0)):
                fd = key_.fd
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
                if flooded is None and end is None and fd != verdict_r and streams[fd].total > hard_cap:
                    flooded = names[fd]
                    end = time.monotonic()
                    stop()
                    drain_until = time.monotonic() + _DRAIN_GRACE
    finally:
        if end is None or not _exited(pid):
            stop()
        _killpg(pgid)
        sel.close()
        if pidfd is not None:
            os.close(pidfd)
        os.close(verdict_r)
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

    passed, exc_line, rc = _read_verdict(bytes(verdict.head), key, proc.returncode, iso)
    status, detail = _classify(rc, timed_out, flooded, hard_cap, passed, exc_line, err, timeout, limits, rusage)
    return SandboxResult(status, rc, out.text(), err.text(), end - start, detail)


def _read_verdict(data: bytes, key: str, rc: int | None, iso: Isolation):
    """(keyed pass seen, the runner's ``exc`` line, exit code with bwrap's 128+N mapped back to -N)."""
    passed = False
    exc_line = None
    wait_status = None
    for raw in data.split(b"\n"):
        line = raw.decode("utf-8", "replace")
        if line.startswith("pass "):
            passed = passed or secrets.compare_digest(line[5:].strip(), key)
        elif line.startswith("exc ") and exc_line is None:
            exc_line = line[4:].strip()
        elif line.startswith("wait "):
            try:
                wait_status = int(line[5:])
            except ValueError:
                pass
    if iso.mode == "bwrap" and rc is not None and rc > 128 and wait_status is not None:
        if os.WIFSIGNALED(wait_status) and os.WTERMSIG(wait_status) == rc - 128:
            rc = -(rc - 128)  # bwrap reports a signalled child as 128 + N
    return passed, exc_line, rc


def _classify(rc, timed_out, flooded, hard_cap, passed, exc_line, err, timeout, limits, rusage):
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
        if passed:
            return "pass", "ok"
        return "fail", "tests did not finish (program exited early)"
    exc = _last_exception(err) or (exc_line if exc_line and _EXC_LINE.match(exc_line) else None)
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
