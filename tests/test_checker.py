"""MathChecker: math-verify in a process pool, on real GSM8K/MATH golds, and its failure handling."""

import json
import os
import random
import signal
import subprocess
import sys
import threading
import time

import pytest

from guidedecode.errors import TaskError
from guidedecode.tasks import MathChecker
from guidedecode.tasks.checker import as_latex

# Big enough that sympy is still busy when the test interferes, yet interruptible by the timer.
PATHOLOGICAL = "9^{9^{9^{9}}}"


@pytest.fixture(scope="module")
def gsm8k_golds(data_dir):
    lines = (data_dir / "gsm8k" / "test.jsonl").read_text().splitlines()
    golds = [json.loads(line)["answer"].rsplit("####", 1)[1].strip() for line in lines]
    assert len(golds) == 1319
    return golds


@pytest.fixture(scope="module")
def checker():
    with MathChecker(timeout=5.0, workers=2) as c:
        yield c


def test_accepts_every_gsm8k_gold_fed_back(checker, gsm8k_golds):
    assert any("," in g for g in gsm8k_golds)  # "1,600" style golds are in there
    assert checker.verify_many([(g, g) for g in gsm8k_golds]) == [True] * len(gsm8k_golds)
    # the same values written without thousands commas, and as decimals
    assert all(checker.verify_many([(g, g.replace(",", "")) for g in gsm8k_golds]))
    assert all(checker.verify_many([(g, g.replace(",", "") + ".0") for g in gsm8k_golds[:200]]))


def test_rejects_shuffled_gsm8k_golds(checker, gsm8k_golds):
    shuffled = gsm8k_golds[:]
    random.Random(0).shuffle(shuffled)
    verdicts = checker.verify_many(list(zip(gsm8k_golds, shuffled)))
    value = lambda g: int(g.replace(",", ""))  # noqa: E731
    differ = [ok for g, s, ok in zip(gsm8k_golds, shuffled, verdicts) if value(g) != value(s)]
    equal = [ok for g, s, ok in zip(gsm8k_golds, shuffled, verdicts) if value(g) == value(s)]
    assert len(differ) > 1200 and not any(differ)
    assert equal and all(equal)


def test_math500_golds_verify_against_themselves(checker, data_dir):
    lines = (data_dir / "math500" / "test.jsonl").read_text().splitlines()
    golds = [json.loads(line)["answer"] for line in lines]
    assert all(checker.verify_many([(g, g) for g in golds]))
    assert checker.verify("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi/2)")
    assert not checker.verify("\\left( 3, \\frac{\\pi}{2} \\right)", "(3, \\pi)")


def test_half_in_three_notations(checker):
    forms = ["1/2", "0.5", "\\frac{1}{2}", "$\\dfrac{1}{2}$", ".5"]
    pairs = [(a, b) for a in forms for b in forms]
    assert checker.equivalent_many(pairs) == [True] * len(pairs)
    assert checker.equivalent("1/2", "0.5") and checker.equivalent("0.5", "\\frac{1}{2}")
    assert not checker.equivalent("1/2", "0.25")
    assert not checker.equivalent("\\frac{1}{3}", "0.5")


def test_gold_first_and_missing_predictions(checker):
    assert checker.verify("x=3", "3")  # math-verify reads the gold's assignment
    assert checker.verify("18", "\\$18")
    assert checker.verify("\\$32,\\!348", "32348")
    assert not checker.verify("18", None)
    assert not checker.verify("18", "   ")
    assert checker.verify_many([]) == []
    pairs = [("1", "1"), ("2", "3"), ("4", None), ("5", "5.0"), ("6", "6/1"), ("7", "-7")]
    assert checker.verify_many(pairs) == [True, False, False, True, True, False]


def test_as_latex_wraps_plain_answers():
    assert as_latex("1,600") == "\\boxed{1,600}"
    assert as_latex(" -3 ") == "\\boxed{-3}"
    assert as_latex("$\\frac{1}{2}$") == "$\\frac{1}{2}$"
    assert as_latex("\\$18") == "\\boxed{\\$18}"  # an escaped dollar is not a math delimiter


def test_pathological_input_is_cut_off_and_the_checker_goes_on():
    with MathChecker(timeout=1.0) as checker:
        verdicts = checker.verify_many([("5", "5"), (PATHOLOGICAL, "5"), ("7", "7")])
        assert verdicts == [True, False, True]
        assert checker.verify("3", "3")


def _kill_if_still_a_worker(checker, pid):
    """Test cleanup: kill a worker the checker has not killed (never a reaped, maybe reused pid)."""
    if pid in checker.worker_pids():
        os.kill(pid, signal.SIGKILL)


def test_worker_killed_mid_call_gives_false_and_the_pool_is_rebuilt():
    with MathChecker(timeout=60.0) as checker:
        assert checker.verify("1", "1")  # pool up, so the kill below lands inside the next call
        (pid,) = checker.worker_pids()

        def kill_soon():
            time.sleep(1.0)  # by now the worker is deep in the pathological pair (up to 60 s)
            os.kill(pid, signal.SIGKILL)

        thread = threading.Thread(target=kill_soon, daemon=True)
        thread.start()
        # Both pairs share the chunk the dead worker held.
        assert checker.verify_many([(PATHOLOGICAL, "5"), ("1", "1")]) == [False, False]
        thread.join()
        assert checker.verify_many([("2", "2"), ("2", "3")]) == [True, False]
        assert checker.worker_pids() and pid not in checker.worker_pids()


def test_hung_worker_is_killed_after_the_wall_clock_limit():
    # A stopped worker ignores the per-pair timer, like sympy stuck in C code: only the chunk's
    # wall-clock limit (timeout * pairs + slack = 1 * 2 + 1 s) gets the caller out.
    with MathChecker(timeout=1.0, slack=1.0) as checker:
        assert checker.verify("1", "1")
        (pid,) = checker.worker_pids()
        os.kill(pid, signal.SIGSTOP)
        try:
            assert checker.verify_many([("1", "1"), ("2", "2")]) == [False, False]
        finally:
            _kill_if_still_a_worker(checker, pid)
        assert checker.verify_many([("1", "1"), ("2", "2")]) == [True, True]
        assert pid not in checker.worker_pids()


def test_close_does_not_wait_for_a_stopped_worker():
    checker = MathChecker()
    assert checker.verify("1", "1")
    (pid,) = checker.worker_pids()
    os.kill(pid, signal.SIGSTOP)
    try:
        checker.close()
        assert checker.worker_pids() == []
    finally:
        _kill_if_still_a_worker(checker, pid)


def test_idle_worker_death_is_survived():
    with MathChecker() as checker:
        assert checker.verify("1", "1")
        for pid in checker.worker_pids():
            os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        assert checker.verify("1", "1")


def test_close_and_reuse():
    checker = MathChecker()
    assert checker.verify("1", "1.0")
    checker.close()
    assert checker.worker_pids() == []
    assert checker.verify("2", "2")
    checker.close()


def test_invalid_settings():
    with pytest.raises(TaskError, match="timeout must be > 0"):
        MathChecker(timeout=0)
    with pytest.raises(TaskError, match="workers must be >= 1"):
        MathChecker(workers=0)


def test_workers_exit_when_the_caller_is_killed(tmp_path):
    script = tmp_path / "caller.py"
    script.write_text(
        "import os, signal\n"
        "from guidedecode.tasks import MathChecker\n"
        "if __name__ == '__main__':\n"
        "    checker = MathChecker(workers=2)\n"
        "    assert checker.verify_many([('1', '1'), ('2', '2')]) == [True, True]\n"
        "    print(*checker.worker_pids(), flush=True)\n"
        "    os.kill(os.getpid(), signal.SIGKILL)  # no atexit, no pool shutdown\n"
    )
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert done.returncode == -signal.SIGKILL
    pids = [int(pid) for pid in done.stdout.split()]
    assert len(pids) == 2
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline and any(_alive(pid) for pid in pids):
        time.sleep(0.1)
    assert not any(_alive(pid) for pid in pids)


def _alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def test_a_script_without_a_main_guard_runs_once(tmp_path):
    # README snippets saved as a plain script: the workers must not re-import the caller's __main__
    # (spawn/forkserver did, so the script's top level ran again in every worker and it crashed).
    script = tmp_path / "snippet.py"
    script.write_text(
        "from guidedecode.tasks import MathChecker, get_task\n"
        "print('top level ran', flush=True)\n"
        "checker = MathChecker(workers=2)\n"
        "print(checker.verify_many([('1', '1'), ('2', '3'), ('1/2', '0.5')]), flush=True)\n"
        "task = get_task('synthetic')\n"
        "problem = task.load(limit=1)[0]\n"
        "print(task.check(problem.answer, problem), flush=True)\n"
    )
    done = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.count("top level ran") == 1, done.stdout
    assert "[True, False, True]" in done.stdout
    assert done.stdout.strip().endswith("True"), done.stdout
