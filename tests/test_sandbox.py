"""Tests for guidedecode.tasks.sandbox: real child processes, no mocks.

Timing assertions are only generous upper bounds proving that a runaway program was stopped.
"""

from __future__ import annotations

import json
import os
import signal
import textwrap
import time

import pytest

from guidedecode.tasks.sandbox import SandboxResult, check_code, run_program

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


def test_forked_child_spinning_is_killed():
    program = textwrap.dedent(
        """
        import os
        pid = os.fork()
        if pid == 0:
            while True:
                pass
        print(pid, flush=True)
        assert True
        """
    )
    r = run_program(program, timeout=10.0)
    assert r.status == "pass", r
    child = int(r.stdout.split()[0])
    assert _dead(child), f"forked child {child} outlived run_program"


def test_subprocess_child_is_killed():
    program = textwrap.dedent(
        """
        import subprocess
        p = subprocess.Popen(["sleep", "1000"])
        print(p.pid, flush=True)
        """
    )
    r = run_program(program, timeout=10.0)
    assert r.status == "pass", r
    child = int(r.stdout.split()[0])
    assert _dead(child), f"subprocess {child} outlived run_program"


def test_children_killed_on_timeout_too():
    program = textwrap.dedent(
        """
        import subprocess, time
        p = subprocess.Popen(["sleep", "1000"])
        print(p.pid, flush=True)
        time.sleep(1000)
        """
    )
    r = run_program(program, timeout=1.0)
    assert r.status == "timeout", r
    assert _dead(int(r.stdout.split()[0]))


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
    r = run_program("import os, shutil\nshutil.rmtree(os.getcwd())")
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
        os.kill(os.getppid(), 0)
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
