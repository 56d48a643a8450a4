"""Tests for guidedecode.tasks.sandbox: real child processes, no mocks.

Timing assertions are only generous upper bounds proving that a runaway program was stopped.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import guidedecode.tasks.sandbox as sandbox_module
from guidedecode.tasks.sandbox import SandboxResult, check_code, isolation, run_program

HUMANEVAL_PROGRAM = textwrap.dedent(
    '''
    from typing import List


    def has_close_elements(numbers: List[float], threshold: float) -> bool:
        """Check if in given list of numbers, are any two numbers closer than threshold."""
        for i, a in enumerate(numbers):
            for j, b in enumerate(numbers):
                if i != j and abs(a - b) < threshold:
                    return True
        return False
    '''
)

HUMANEVAL_TESTS = textwrap.dedent(
    """
    def check(candidate):
        assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.3) == True
        assert candidate([1.0, 2.0, 3.9, 4.0, 5.0, 2.2], 0.05) == False
        assert candidate([1.0, 2.0, 5.9, 4.0, 5.0], 0.95) == True
        assert candidate([1.1, 2.2, 3.1, 4.1, 5.1], 1.0) == True


    check(has_close_elements)
    """
)

BUGGY_PROGRAM = HUMANEVAL_PROGRAM.replace("< threshold", "> threshold")


def _sigalrm_marker(signum, frame):  # pragma: no cover - never fired
    pass


@pytest.fixture(autouse=True)
def caller_unharmed():
    """Every test: the caller's cwd, environment and SIGALRM handler are unchanged afterwards."""
    previous = signal.signal(signal.SIGALRM, _sigalrm_marker)
    cwd = os.getcwd()
    env = _environ()
    try:
        yield
        assert os.getcwd() == cwd
        assert _environ() == env
        assert signal.getsignal(signal.SIGALRM) is _sigalrm_marker
    finally:
        signal.signal(signal.SIGALRM, previous)


def _environ() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if k != "PYTEST_CURRENT_TEST"}


def _dead(pid: int, wait: float = 5.0) -> bool:
    """True once pid no longer runs (gone, or a zombie nobody reaped: PID 1 may not reap)."""
    stop = time.monotonic() + wait
    while True:
        try:
            with open(f"/proc/{pid}/stat") as fh:
                state = fh.read().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        if time.monotonic() > stop:
            return False
        time.sleep(0.05)


# --------------------------------------------------------------------------- outcomes


def test_good_code_passes_and_sentinel_is_stripped():
    r = check_code(HUMANEVAL_PROGRAM + "\nprint('hello')\n", HUMANEVAL_TESTS, timeout=10.0)
    assert isinstance(r, SandboxResult)
    assert r.status == "pass" and r.passed, r
    assert r.returncode == 0
    assert r.stdout == "hello\n"
    assert "__guidedecode_ok_" not in r.stdout
    assert "\n" not in r.detail


def test_buffered_output_without_newline_is_kept_exactly():
    r = run_program("print('abc', end='')\nimport sys\nsys.stdout = open(__import__('os').devnull, 'w')")
    assert r.status == "pass", r
    assert r.stdout == "abc"


def test_wrong_code_fails_with_assertion_error():
    r = check_code(BUGGY_PROGRAM, HUMANEVAL_TESTS, timeout=10.0)
    assert r.status == "fail" and not r.passed, r
    assert r.returncode == 1
    assert r.detail.startswith("AssertionError")
    assert "AssertionError" in r.stderr


def test_mbpp_style_assert_message_in_detail():
    r = check_code("def add(a, b):\n    return a - b", "assert add(2, 3) == 5, 'add is wrong'")
    assert r.status == "fail", r
    assert r.detail == "AssertionError: add is wrong"


def test_syntax_error_is_error():
    r = check_code("def f(:\n    return 1", "assert f() == 1")
    assert r.status == "error", r
    assert "SyntaxError" in r.detail


def test_other_exception_is_error():
    r = check_code("def f():\n    return undefined_name", "assert f() == 1")
    assert r.status == "error", r
    assert r.detail.startswith("NameError")


def test_stdin_is_devnull():
    r = run_program("input()")
    assert r.status == "error", r
    assert r.detail.startswith("EOFError")


def test_nonzero_exit_without_traceback_is_error():
    r = run_program("import sys\nsys.exit(3)")
    assert r.status == "error", r
    assert r.returncode == 3
    assert r.detail == "exited with code 3"


@pytest.mark.parametrize(
    "early_exit",
    ["import os; os._exit(0)", "import sys; sys.exit()", "exit(0)", "raise SystemExit(0)"],
)
def test_exit_zero_before_tests_finish_fails(early_exit):
    r = check_code(BUGGY_PROGRAM + "\n" + early_exit + "\n", HUMANEVAL_TESTS)
    assert r.status == "fail", r
    assert r.returncode == 0
    assert r.detail == "tests did not finish (program exited early)"


def test_guessed_sentinel_does_not_pass():
    fake = "print('__guidedecode_ok_' + '0' * 32 + '__', flush=True)\nimport os; os._exit(0)"
    r = run_program(fake)
    assert r.status == "fail", r


def test_non_utf8_output_and_surrogates_do_not_raise():
    r = run_program("import os\nos.write(1, b'\\xff\\xfe\\n')\nos.write(2, b'\\xc3\\n')")
    assert r.status == "pass", r
    assert "\ufffd" in r.stdout and "\ufffd" in r.stderr
    r = run_program("x = '\ud800'\n")  # lone surrogate in the source: the child rejects it
    assert r.status == "error", r


# --------------------------------------------------------------------------- limits


@pytest.mark.timeout(30)  # a hang fails the test; the status and SIGKILL below prove the kill
def test_infinite_loop_times_out():
    r = run_program("while True:\n    pass", timeout=1.0)
    assert r.status == "timeout", r
    assert r.detail == "exceeded 1.0 s"
    assert r.returncode == -signal.SIGKILL


def test_sleeping_program_times_out():
    r = run_program("import time\ntime.sleep(100)", timeout=1.0)
    assert r.status == "timeout", r


@pytest.mark.timeout(30)
def test_huge_allocation_is_memory_error():
    r = run_program("x = bytearray(10**10)", memory_mb=512, timeout=10.0)
    assert r.status == "error", r
    assert r.detail.startswith("MemoryError")


@pytest.mark.timeout(30)
def test_growing_list_is_stopped_promptly():
    r = run_program("x = []\nwhile True:\n    x.append(bytearray(1 << 20))", memory_mb=256, timeout=5.0)
    assert r.status in ("error", "timeout"), r


def test_huge_file_is_stopped_by_rlimit_fsize():
    program = textwrap.dedent(
        """
        import os
        try:
            with open("big.bin", "wb") as fh:
                for _ in range(64):
                    fh.write(b"\\0" * (1 << 20))
        except OSError as exc:
            print("errno", exc.errno, "size", os.path.getsize("big.bin"), flush=True)
            raise
        """
    )
    r = run_program(program, max_file_bytes=1 << 20)
    assert r.status == "error", r
    assert "File too large" in r.detail
    words = r.stdout.split()
    assert words[:2] == ["errno", "27"]
    assert int(words[3]) <= 1 << 20


@pytest.mark.timeout(30)
def test_stdout_flood_is_bounded():
    r = run_program('while True:\n    print("x" * 10000)', timeout=5.0, max_output_bytes=1000)
    assert r.status in ("error", "timeout"), r
    assert len(r.stdout) <= 1000
    assert len(r.stdout.encode()) <= 1000


def test_stderr_flood_is_bounded():
    program = 'import sys\nwhile True:\n    sys.stderr.write("e" * 10000)'
    r = run_program(program, timeout=5.0, max_output_bytes=2000)
    assert r.status in ("error", "timeout"), r
    assert len(r.stderr.encode()) <= 2000


def test_large_output_is_truncated_but_still_passes():
    # 5 MB of output (under the flood cap): kept output truncated, sentinel still seen
    r = run_program('import sys\nsys.stdout.write("y" * 5_000_000)\nassert True', max_output_bytes=1000)
    assert r.status == "pass", r
    assert r.stdout == "y" * 1000


# --------------------------------------------------------------------------- processes


def _survivors(token: str, wait: float = 5.0) -> list[int]:
    """Live (non-zombie) processes whose command line contains ``token``, after up to ``wait`` s."""
    stop = time.monotonic() + wait
    while True:
        alive = []
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == os.getpid():
                continue
            try:
                with open(f"/proc/{name}/cmdline", "rb") as fh:
                    if token.encode() not in fh.read():
                        continue
            except OSError:
                continue
            if not _dead(int(name), wait=0):
                alive.append(int(name))
        if not alive or time.monotonic() > stop:
            return alive
        time.sleep(0.05)


def _token() -> str:
    return f"gdtok{os.getpid()}x{time.monotonic_ns()}"


def _sleeper(token: str) -> str:
    """Source of a statement that starts a long-lived process carrying ``token`` in its cmdline."""
    return f"[sys.executable, '-c', 'import time; time.sleep(1000)', {token!r}]"


def test_forked_child_spinning_is_killed():
    token = _token()
    program = textwrap.dedent(
        f"""
        import os, sys
        pid = os.fork()
        if pid == 0:
            os.execv(sys.executable, [sys.executable, "-c", "while True: pass", {token!r}])
        assert True
        """
    )
    r = run_program(program, timeout=10.0)
    assert r.status == "pass", r
    assert not _survivors(token), "forked child outlived run_program"


def test_subprocess_child_is_killed():
    token = _token()
    program = f"import subprocess, sys\nsubprocess.Popen({_sleeper(token)})\n"
    r = run_program(program, timeout=10.0)
    assert r.status == "pass", r
    assert not _survivors(token), "subprocess outlived run_program"


def test_children_killed_on_timeout_too():
    token = _token()
    program = f"import subprocess, sys, time\nsubprocess.Popen({_sleeper(token)})\ntime.sleep(1000)\n"
    r = run_program(program, timeout=1.0)
    assert r.status == "timeout", r
    assert not _survivors(token)


# --------------------------------------------------------------------------- environment


def test_scratch_dir_env_and_cleanup(monkeypatch):
    monkeypatch.setenv("GUIDEDECODE_SANDBOX_SECRET", "hunter2")
    monkeypatch.setenv("PYTHONPATH", "/nonexistent")
    program = textwrap.dedent(
        """
        import json, os, sys, tempfile
        os.makedirs("locked/inner")
        open("locked/inner/f.txt", "w").write("x")
        os.chmod("locked", 0)
        print(json.dumps({"cwd": os.getcwd(), "env": dict(os.environ),
                          "tmp": tempfile.gettempdir(), "path": sys.path}))
        """
    )
    r = run_program(program)
    assert r.status == "pass", r
    info = json.loads(r.stdout)
    env = info["env"]
    assert "GUIDEDECODE_SANDBOX_SECRET" not in env
    assert "PYTHONPATH" not in env
    assert env["HOME"] == info["cwd"] == env["TMPDIR"] == info["tmp"]
    assert env["LANG"] == "C.UTF-8"
    assert info["cwd"] not in info["path"]  # -I: the script directory is not importable
    assert info["cwd"] != os.getcwd()
    assert not os.path.exists(info["cwd"]), "scratch dir was not removed"


def test_program_deleting_its_scratch_dir_is_harmless():
    # in bwrap mode the scratch directory is a mount point: its contents go, the directory stays
    r = run_program("import os, shutil\nshutil.rmtree(os.getcwd(), ignore_errors=True)")
    assert r.status == "pass", r


def test_program_cannot_touch_caller_state():
    fds_before = sorted(os.listdir("/proc/self/fd"))
    program = textwrap.dedent(
        """
        import os, signal
        os.chdir("/")
        os.environ["HOME"] = "/nowhere"
        os.environ["INJECTED"] = "1"
        signal.signal(signal.SIGALRM, signal.SIG_IGN)
        try:
            os.kill(os.getppid(), 0)  # the runner; EPERM when the code runs as 'nobody'
        except PermissionError:
            pass
        os.close(0)
        """
    )
    for _ in range(3):
        assert run_program(program).status == "pass"
    run_program("while True: pass", timeout=0.5)
    fds_after = sorted(os.listdir("/proc/self/fd"))
    assert len(fds_after) == len(fds_before), (fds_before, fds_after)
    assert "INJECTED" not in os.environ


# --------------------------------------------------------------------------- arguments


@pytest.mark.parametrize(
    "kwargs",
    [
        {"timeout": 0},
        {"timeout": -1.0},
        {"timeout": float("nan")},
        {"timeout": float("inf")},
        {"memory_mb": 0},
        {"memory_mb": 1.5},
        {"max_output_bytes": -1},
        {"max_file_bytes": True},
    ],
)
def test_bad_limits_raise_value_error(kwargs):
    with pytest.raises(ValueError):
        run_program("pass", **kwargs)


def test_bad_source_type_raises_value_error():
    with pytest.raises(ValueError, match="source must be str"):
        run_program(b"print(1)")  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        check_code("x = 1", None)  # type: ignore[arg-type]


# --------------------------------------------------------------------------- attacks
# The 25 attacks on the sandbox (issue: bad input, faults and the sandbox). Each one is contained
# here, or is outside the threat model (module docstring and README) and marked xfail(strict=True),
# so a change that contains it shows up. Containment that needs a layer this machine lacks (bwrap,
# a separate user) is skipped with the reason; CI runs as root with bubblewrap, where all apply.

ISO = isolation()
OTHER_USER = ISO.uid != os.geteuid()
needs_bwrap = pytest.mark.skipif(ISO.mode != "bwrap", reason=f"needs bubblewrap ({ISO.reason})")
needs_other_user = pytest.mark.skipif(
    not OTHER_USER, reason=f"code runs as the caller here ({ISO.reason or 'not root'})"
)
needs_pid_or_user = pytest.mark.skipif(
    not (ISO.pid_namespace or OTHER_USER), reason="needs a PID namespace or another user"
)

FAILING_TESTS = "\nassert 1 == 2, 'the real tests fail'\n"

STEAL_AND_FORGE = textwrap.dedent(
    """
    import os, re, sys
    def _forge(found):
        for text in found:
            for fd in range(0, 64):
                try:
                    os.write(fd, ("pass " + text + "\\n").encode())
                except OSError:
                    pass
            print("__guidedecode_ok_" + text + "__", flush=True)
        os._exit(0)
    def _candidates(blob):
        return sorted(set(re.findall(r"[0-9a-f]{32,}", blob)))
    """
)


def test_attack_01_nonce_from_own_source():
    program = STEAL_AND_FORGE + "_forge(_candidates(open(__file__).read()) + ['0' * 64])\n"
    r = check_code(program, FAILING_TESTS)
    assert r.status == "fail" and not r.passed, r


def test_attack_02_nonce_through_excepthook():
    program = STEAL_AND_FORGE + textwrap.dedent(
        """
        def _hook(tp, value, tb):
            found = []
            while tb is not None:
                frame = tb.tb_frame
                while frame is not None:
                    for ns in (frame.f_locals, frame.f_globals):
                        for v in list(ns.values()):
                            found += _candidates(repr(v))
                    found += _candidates(repr(frame.f_code.co_consts))
                    frame = frame.f_back
                tb = tb.tb_next
            _forge(found or ["0" * 64])
        sys.excepthook = _hook
        import threading
        threading.excepthook = lambda args: _hook(args.exc_type, args.exc_value, args.exc_traceback)
        """
    )
    r = check_code(program, FAILING_TESTS)
    assert r.status == "fail" and not r.passed, r


def test_attack_03_guessed_verdict_on_stdout_and_stderr():
    program = (
        "import sys\nprint('pass ' + '0' * 64)\nprint('__guidedecode_ok_' + '0' * 32 + '__')\n"
        "sys.stderr.write('pass ' + 'f' * 64 + '\\n')\nsys.stdout.flush()\nimport os; os._exit(0)\n"
    )
    assert run_program(program).status == "fail"


def test_attack_04_forged_lines_on_every_fd_and_read_every_fd():
    program = STEAL_AND_FORGE + textwrap.dedent(
        """
        found = []
        for fd in range(0, 64):
            try:
                os.set_blocking(fd, False)
                found += _candidates(os.read(fd, 4096).decode("latin-1"))
            except OSError:
                pass
        _forge(found + ["0" * 64])
        """
    )
    r = check_code(program, FAILING_TESTS)
    assert r.status == "fail", r


def test_attack_05_nonce_from_proc_environment_and_argv():
    program = STEAL_AND_FORGE + textwrap.dedent(
        """
        found = []
        for pid in ["self", "1", str(os.getppid())]:
            for name in ["cmdline", "environ"]:
                try:
                    found += _candidates(open(f"/proc/{pid}/{name}", "rb").read().decode("latin-1"))
                except OSError:
                    pass
        found += _candidates(repr(dict(os.environ)) + repr(sys.argv))
        _forge(found + ["0" * 64])
        """
    )
    r = check_code(program, FAILING_TESTS)
    assert r.status == "fail", r


@pytest.mark.parametrize("early_exit", ["import os; os._exit(0)", "import sys; sys.exit(0)", "exit()"])
def test_attack_06_exit_zero_before_the_tests(early_exit):
    r = check_code(BUGGY_PROGRAM + "\n" + early_exit + "\n", HUMANEVAL_TESTS)
    assert r.status == "fail", r


@needs_other_user
@pytest.mark.timeout(60)
def test_attack_07_fork_bomb_is_capped_and_reaped():
    token = _token()
    program = textwrap.dedent(
        f"""
        import os, sys, time
        made = 0
        for _ in range(200):  # a bounded "fork bomb"
            try:
                pid = os.fork()
            except OSError:
                break
            if pid == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)", {token!r}])
            made += 1
        print(made, flush=True)
        """
    )
    r = run_program(program, timeout=30.0)
    made = int(r.stdout.split()[0])
    # the cap is the sandbox user's task count at launch + NPROC_HEADROOM (64): other sandboxes
    # running at the same time as 'nobody' raise it, so only "well short of 200" is asserted
    assert made < 200, "RLIMIT_NPROC not enforced"
    assert not _survivors(token, wait=10.0)


def _escape_program(token: str, tail: str = "") -> str:
    return textwrap.dedent(
        f"""
        import os, sys, time
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:  # double fork: the daemon's parent exits at once
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(1000)", {token!r}])
            os._exit(0)
        time.sleep(0.5)
        """
    ) + tail


def test_attack_08_setsid_double_fork_daemon_is_reaped():
    token = _token()
    r = run_program(_escape_program(token), timeout=10.0)
    assert r.status == "pass", r
    assert not _survivors(token), "a setsid() daemon outlived the call"


def test_attack_09_setsid_daemon_is_reaped_after_a_timeout():
    token = _token()
    r = run_program(_escape_program(token, "time.sleep(1000)\n"), timeout=2.0)
    assert r.status == "timeout", r
    assert not _survivors(token)


def test_attack_10_setsid_daemon_is_reaped_after_an_output_flood():
    token = _token()
    flood = "while True:\n    sys.stdout.write('x' * 65536)\n"
    r = run_program(_escape_program(token, flood), timeout=20.0, max_output_bytes=1000)
    assert r.status == "error" and r.detail.startswith("output flood"), r
    assert not _survivors(token)


@needs_pid_or_user
def test_attack_11_caller_environ_and_cmdline(monkeypatch):
    monkeypatch.setenv("GUIDEDECODE_CALLER_SECRET", "s3cr3t-value")
    program = textwrap.dedent(
        f"""
        import os
        got = []
        for pid in [{os.getpid()}, os.getppid(), 1]:
            for name in ["environ", "cmdline"]:
                try:
                    got.append(open(f"/proc/{{pid}}/{{name}}", "rb").read().decode("latin-1"))
                except OSError as exc:
                    got.append(type(exc).__name__)
        print(repr(got))
        """
    )
    r = run_program(program)
    assert r.status == "pass", r
    assert "s3cr3t-value" not in r.stdout
    if ISO.pid_namespace:  # the caller's pid does not exist in the sandbox
        assert "pytest" not in r.stdout


@needs_pid_or_user
def test_attack_12_signal_and_ptrace_the_caller_and_the_runner():
    received = []
    previous = signal.signal(signal.SIGUSR1, lambda *a: received.append(a))
    try:
        program = textwrap.dedent(
            f"""
            import ctypes, os, signal
            out = []
            for pid in [{os.getpid()}, os.getppid()]:
                try:
                    os.kill(pid, signal.SIGUSR1)
                    out.append("sent")
                except OSError as exc:
                    out.append(type(exc).__name__)
                libc = ctypes.CDLL(None, use_errno=True)
                out.append(libc.ptrace(16, pid, 0, 0))  # PTRACE_ATTACH
            print(out)
            """
        )
        r = run_program(program)
        time.sleep(0.2)
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert r.status == "pass", r
    assert "sent" not in r.stdout and received == [], r.stdout
    assert r.stdout.count("-1") == 2, r.stdout


@needs_bwrap
def test_attack_13_kill_every_process_it_can():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        r = run_program("import os, signal\nos.kill(-1, signal.SIGKILL)\n")
        assert sleeper.poll() is None, "kill(-1) reached a process outside the sandbox"
        assert r.status in ("pass", "error"), r
    finally:
        sleeper.kill()
        sleeper.wait()


@pytest.mark.skipif(not (OTHER_USER or ISO.private_filesystem),
                    reason="code runs as the caller without bwrap: its writes are the caller's")
def test_attack_14_write_outside_the_scratch_dir(tmp_path):
    token = _token()
    runner = os.path.join(os.path.dirname(sandbox_module.__file__), "_sandbox_runner.py")
    with open(runner, "rb") as fh:
        runner_before = fh.read()
    targets = [str(tmp_path / token), runner]
    if ISO.private_filesystem:  # world-writable directories only in bwrap mode (documented)
        targets += [f"/tmp/{token}", f"/dev/shm/{token}", f"/var/tmp/{token}"]
    program = textwrap.dedent(
        f"""
        out = []
        for path in {targets!r}:
            try:
                with open(path, "a") as fh:
                    fh.write("pwned")
                out.append("wrote " + path)
            except OSError as exc:
                out.append(type(exc).__name__)
        print(out)
        """
    )
    r = run_program(program)
    assert r.status == "pass", r
    assert "wrote" not in r.stdout, r.stdout
    for path in targets[:1] + targets[2:]:
        assert not os.path.exists(path), path
    with open(runner, "rb") as fh:
        assert fh.read() == runner_before


@pytest.mark.skipif(not ISO.network, reason=f"no network namespace here ({ISO.reason or 'not root'})")
def test_attack_15_no_network_loopback_or_outside():
    import socket

    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(1)
    server.setblocking(False)
    port = server.getsockname()[1]
    program = textwrap.dedent(
        f"""
        import socket
        out = []
        for addr in [("127.0.0.1", {port}), ("1.1.1.1", 53), ("10.0.0.1", 80)]:
            try:
                socket.create_connection(addr, timeout=2).close()
                out.append("connected")
            except OSError as exc:
                out.append(type(exc).__name__)
        try:
            socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"x", ("8.8.8.8", 53))
            out.append("sent")
        except OSError as exc:
            out.append(type(exc).__name__)
        print(out)
        """
    )
    try:
        r = run_program(program, timeout=15.0)
        with pytest.raises(BlockingIOError):
            server.accept()
    finally:
        server.close()
    assert r.status == "pass", r
    assert "connected" not in r.stdout and "sent" not in r.stdout, r.stdout


@needs_other_user
def test_attack_16_read_root_only_files_and_regain_root():
    program = textwrap.dedent(
        """
        import os
        out = []
        for path in ["/etc/shadow", "/root"]:
            try:
                open(path).read() if path != "/root" else os.listdir(path)
                out.append("read " + path)
            except OSError as exc:
                out.append(type(exc).__name__)
        try:
            os.setuid(0)
            out.append("root")
        except OSError as exc:
            out.append(type(exc).__name__)
        status = open("/proc/self/status").read()
        out.append("nnp" if "NoNewPrivs:\\t1" in status else "no-nnp")
        out.append("groups=%s" % os.getgroups())
        print(out)
        """
    )
    r = run_program(program)
    assert r.status == "pass", r
    assert "read /etc/shadow" not in r.stdout and "'root'" not in r.stdout, r.stdout
    assert "'nnp'" in r.stdout and "groups=[]" in r.stdout, r.stdout


@needs_pid_or_user
def test_attack_17_kill_the_runner_to_escape_the_reaper():
    token = _token()
    program = _escape_program(token) + textwrap.dedent(
        """
        import signal
        try:
            os.kill(os.getppid(), signal.SIGKILL)
        except OSError:
            pass
        time.sleep(0.5)
        """
    )
    r = run_program(program, timeout=10.0)
    assert not _survivors(token), r


@pytest.mark.timeout(60)
def test_attack_18_non_daemon_thread_keeps_running_after_the_tests():
    program = "import threading\nthreading.Thread(target=lambda: [None for _ in iter(int, 1)]).start()\n"
    r = run_program(program, timeout=2.0)
    assert r.status == "timeout" and not r.passed, r


def test_attack_19_closes_stdout_and_stderr_then_passes_honestly():
    # closing fds 1 and 2 must not break the verdict channel (robustness, not a forgery)
    r = check_code("import os\nos.close(1)\nos.close(2)\n", "assert 1 + 1 == 2")
    assert r.status == "pass", r
    r = check_code("import os\nos.close(1)\nos.close(2)\n", "assert 1 + 1 == 3")
    assert r.status == "fail", r


def test_attack_20_hides_a_failure_by_catching_it_in_atexit():
    program = "import atexit, os\natexit.register(lambda: os._exit(0))\n"
    r = check_code(program, FAILING_TESTS)
    assert r.status == "fail", r


def test_attack_21_sigterm_ignored_during_timeout():
    program = "import signal, time\nsignal.signal(signal.SIGTERM, signal.SIG_IGN)\ntime.sleep(1000)\n"
    start = time.monotonic()
    r = run_program(program, timeout=1.0)
    assert r.status == "timeout", r
    assert time.monotonic() - start < 10


@pytest.mark.xfail(strict=True, reason="outside the threat model: always-equal return values (README)")
def test_attack_22_always_equal_object_is_outside_the_threat_model():
    program = "class Any:\n    def __eq__(self, other):\n        return True\ndef add(a, b):\n    return Any()\n"
    assert check_code(program, "assert add(2, 3) == 5").status == "fail"


@pytest.mark.xfail(strict=True, reason="outside the threat model: walking the runner's frames (README)")
def test_attack_23_frame_walk_to_the_verdict_writer_is_outside_the_threat_model():
    program = textwrap.dedent(
        """
        import sys
        frame = sys._getframe(1)
        while frame is not None and "report" not in frame.f_locals:
            frame = frame.f_back
        if frame is not None:
            frame.f_locals["report"]("pass {key}")
            import os
            os._exit(0)
        """
    )
    assert check_code(program, FAILING_TESTS).status == "fail"


def test_attack_24_huge_file_and_memory_are_bounded():
    r = run_program("open('f', 'wb').write(b'0' * (64 << 20))", max_file_bytes=1 << 20)
    assert r.status == "error" and "File too large" in r.detail, r
    r = run_program("x = ' ' * (4 << 30)", memory_mb=256)
    assert r.status == "error" and r.detail.startswith("MemoryError"), r


@needs_bwrap
def test_attack_25_hidden_home_and_private_tmp(tmp_path):
    marker = tmp_path / "caller-file.txt"
    marker.write_text("caller data")
    os.chmod(tmp_path, 0o755)
    home = os.path.expanduser("~")
    program = textwrap.dedent(
        f"""
        import os
        out = [os.listdir({home!r}), os.path.exists({str(marker)!r}), os.listdir("/tmp")]
        print(out)
        """
    )
    r = run_program(program)
    assert r.status == "pass", r
    assert "caller-file" not in r.stdout and "True" not in r.stdout, r.stdout


# --------------------------------------------------------------------------- DOTS acceptance


@pytest.mark.timeout(120)
@pytest.mark.parametrize(
    "program",
    [
        "while True:\n    pass",  # loops forever
        "x = []\nwhile True:\n    x.append(bytearray(1 << 20))",  # allocates without bound
        "import os, time\nfor _ in range(200):\n    try:\n        os.fork() or time.sleep(30)\n"
        "    except OSError:\n        break\nprint(42)\nimport os; os._exit(0)",  # forks, exits early
        "while True:\n    print('x' * 100000)",  # floods stdout
        "print(42)\nimport sys; sys.exit(0)\nprint(43)",  # exits early
    ],
    ids=["loop", "alloc", "fork", "flood", "exit"],
)
def test_dots_runaway_program_of_thought_is_contained_as_a_failure(program):
    start = time.monotonic()
    r = run_program(program, timeout=3.0, memory_mb=256, max_output_bytes=4096)
    assert not r.passed, r
    assert time.monotonic() - start < 3.0 + 10.0, "the sandbox did not stop the program in time"


# --------------------------------------------------------------------------- isolation modes


def test_isolation_falls_back_cleanly_without_bubblewrap(monkeypatch):
    monkeypatch.setattr(sandbox_module.shutil, "which", lambda name: None)
    with pytest.warns(RuntimeWarning, match="process mode"):
        iso = sandbox_module._isolation.__wrapped__("auto")
    assert iso.mode == "process" and "bubblewrap" in iso.reason
    assert iso.network == (os.geteuid() == 0) and not iso.pid_namespace
    with pytest.raises(RuntimeError, match="GUIDEDECODE_SANDBOX=bwrap"):
        sandbox_module._isolation.__wrapped__("bwrap")


def test_isolation_setting_is_checked(monkeypatch):
    monkeypatch.setenv("GUIDEDECODE_SANDBOX", "docker")
    with pytest.raises(ValueError, match="GUIDEDECODE_SANDBOX"):
        isolation()
