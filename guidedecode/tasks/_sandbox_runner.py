"""Trusted runner inside the code sandbox (started by :mod:`guidedecode.tasks.sandbox`; stdlib only).

Usage: ``python -I -B _sandbox_runner.py MAIN KEY_FD VERDICT_FD UID GID NET``

Two processes, neither of which ever sees the key on disk, in argv or in the environment:

* the **supervisor** (this process) reads the per-run key from ``KEY_FD`` and closes it, makes
  itself the child subreaper (``PR_SET_CHILD_SUBREAPER``), optionally leaves the network
  (``unshare(CLONE_NEWNET)`` when ``NET`` is 1), forks the worker, waits for it, then SIGKILLs and
  reaps every remaining descendant -- ``setsid()`` / double-forked children included, since orphans
  are re-parented to the subreaper -- and exits with the worker's status;
* the **worker** sets ``PR_SET_PDEATHSIG`` and ``PR_SET_NO_NEW_PRIVS``, drops to ``UID``/``GID``
  with no supplementary groups when they are >= 0, compiles ``MAIN`` (read by the supervisor
  before the fork), runs it as ``__main__`` and writes one verdict line to ``VERDICT_FD``:
  ``pass <key>`` after the whole file ran without an exception, else ``exc <Type>: <message>``.
  The key is wiped as soon as a verdict is written; ``sys.excepthook`` is never called (the
  runner prints the traceback itself, without its own frames).

The caller only counts a run as passed when the verdict line carries the key and the exit code is
0, so printing a guessed or copied line, writing to stdout, or exiting early cannot fake a pass.
"""

import ctypes
import os
import signal
import sys
import time

_PR_SET_PDEATHSIG = 1
_PR_SET_NO_NEW_PRIVS = 38
_PR_SET_CHILD_SUBREAPER = 36
_CLONE_NEWNET = 0x40000000
_SWEEP_ROUNDS = 200


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def _write_line(fd, text):
    try:
        os.write(fd, text.encode("utf-8", "replace")[:4000] + b"\n")
    except OSError:
        pass


def _children():
    """Direct children of this process, from /proc (``task/*/children`` needs CONFIG_PROC_CHILDREN,
    which many kernels lack, so every ``/proc/<pid>/stat`` is scanned for our pid as parent)."""
    me = os.getpid()
    out = set()
    try:
        names = os.listdir("/proc")
    except OSError:
        return out
    for name in names:
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as fh:
                fields = fh.read().rsplit(b")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if len(fields) > 1 and int(fields[1]) == me:
            out.add(int(name))
    return out


def _reap_all():
    """SIGKILL and reap every descendant (orphans come back to us: we are the subreaper)."""
    for _ in range(_SWEEP_ROUNDS):
        kids = _children()
        for pid in kids:
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        reaped = False
        while True:
            try:
                pid, _ = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                break
            reaped = True
        if not kids and not reaped:
            time.sleep(0.01)  # a re-parented orphan not listed yet; the caller's deadline bounds us


def _worker(source, path, key, verdict_fd, uid, gid, libc, supervisor):
    # Runs in the forked worker; ends with os._exit or SystemExit, never returns.
    if libc is not None:
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
        libc.prctl(_PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
    if uid >= 0:
        try:
            os.setgroups([])
            os.setgid(gid)
            os.setuid(uid)
        except OSError as exc:
            _write_line(verdict_fd, f"exc SandboxError: could not drop privileges: {exc}")
            os._exit(126)
    if os.getppid() != supervisor:  # the supervisor died before PDEATHSIG was set
        os._exit(125)

    import builtins
    import traceback
    import types

    state = {"key": key}  # wiped after the first verdict

    def report(line):  # one verdict line (None: none), then the key is gone
        k = state.pop("key", None)
        if k is None:
            return
        if line is not None:
            _write_line(verdict_fd, line.replace("{key}", k.decode("ascii")))
        k[:] = b"\0" * len(k)

    del key
    real_stdout, real_stderr = sys.stdout, sys.stderr
    module = types.ModuleType("__main__")
    module.__file__ = path
    module.__builtins__ = builtins
    module.__loader__ = None
    sys.modules["__main__"] = module
    sys.argv[:] = [path]
    try:
        code = compile(source, path, "exec", dont_inherit=True)
        del source
        exec(code, module.__dict__)
    except SystemExit:
        report(None)  # exit() before the end: no pass; Python applies the exit code
        raise
    except BaseException as exc:  # noqa: BLE001 - every exception is a verdict
        name = type(exc).__name__
        try:
            message = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        except BaseException:  # noqa: BLE001 - a hostile __str__
            message = ""
        report(f"exc {name}: {message}" if message else f"exc {name}")
        try:
            for f in (real_stdout, sys.__stdout__):
                f.flush()
        except BaseException:  # noqa: BLE001
            pass
        try:
            tb = exc.__traceback__.tb_next if exc.__traceback__ is not None else None
            if isinstance(exc, SyntaxError):
                tb = None
            traceback.print_exception(type(exc), exc, tb, file=real_stderr)
            real_stderr.flush()
        except BaseException:  # noqa: BLE001
            _write_line(2, f"{name}: {message}")
        os._exit(1)
    for f in (real_stdout, sys.__stdout__, real_stderr):
        try:
            f.flush()
        except BaseException:  # noqa: BLE001
            pass
    report("pass {key}")
    sys.exit(0)


def main(argv):
    path, key_fd, verdict_fd, uid, gid, net = argv[1], *map(int, argv[2:7])
    key = bytearray()
    while True:
        chunk = os.read(key_fd, 256)
        if not chunk:
            break
        key += chunk
    os.close(key_fd)
    with open(path, "rb") as fh:
        source = fh.read()
    libc = _libc()
    if libc is not None:
        libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
        if net and libc.unshare(_CLONE_NEWNET) != 0:
            _write_line(verdict_fd, "info network namespace unavailable")
    supervisor = os.getpid()
    pid = os.fork()
    if pid == 0:
        _worker(source, path, key, verdict_fd, uid, gid, libc, supervisor)
        os._exit(1)  # not reached
    key[:] = b"\0" * len(key)
    del key, source
    for sig in (signal.SIGINT, signal.SIGHUP, signal.SIGPIPE):
        signal.signal(sig, signal.SIG_IGN)
    # the caller's timeout: SIGTERM kills the worker, then every descendant is reaped below
    signal.signal(signal.SIGTERM, lambda *_: os.kill(pid, signal.SIGKILL))
    while True:
        try:
            _, status = os.waitpid(pid, 0)
            break
        except InterruptedError:
            continue
    _reap_all()
    _write_line(verdict_fd, f"wait {status}")
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):  # SIGKILL / SIGSTOP: no handler to reset
            pass
        os.kill(os.getpid(), sig)
        os._exit(128 + sig)
    os._exit(os.waitstatus_to_exitcode(status) & 0xFF)


if __name__ == "__main__":
    main(sys.argv)
