"""The GPU suite (benchmarks/gpu/): its dry run inside the normal test suite, so a broken import or a
package the GPU image lacks is caught on CPU CI; the random-weight stand-in models; GPU-only checks."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest
import torch

from guidedecode.bench import MODEL_CONFIGS, random_model, synthetic_tokenizer

REPO = Path(__file__).resolve().parents[1]
RUN = REPO / "benchmarks" / "gpu" / "run.sh"


def _suite():
    spec = importlib.util.spec_from_file_location("gpu_suite", REPO / "benchmarks" / "gpu" / "suite.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def _run(*args, timeout=300):
    env = dict(os.environ, PYTHON=sys.executable)
    return subprocess.run(["bash", str(RUN), *args], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def test_dry_run_lists_steps_and_checks_imports():
    suite = _suite()
    proc = _run("--dry-run")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for step in suite.steps(sys.executable):
        assert f"  {step.name} " in proc.stdout
    for script in ("bench_guidance_kernel", "bench_logprobs", "bench_qsharp", "bench_decode"):
        assert f"import ok: benchmarks/{script}.py" in proc.stdout
    assert "imports without datasets, math_verify, outlines, outlines_core, gguf" in proc.stdout
    assert proc.stdout.rstrip().endswith(": ok")


def test_dry_run_fails_on_an_import_the_device_lacks(tmp_path):
    """The check is not vacuous: a GPU-path module importing a package the image lacks fails it."""
    suite = _suite()
    bad = tmp_path / "bench_bad.py"
    bad.write_text("import datasets\n")
    plan = [suite.Step("bad", 1, [], bench=str(bad))]
    assert suite.check_imports(sys.executable, plan) != 0


def test_budgets_fit_the_device_window():
    suite = _suite()
    plan = suite.steps(sys.executable)
    assert suite.TOTAL_BUDGET_S <= 8 * 60
    assert all(0 < s.budget_s <= suite.TOTAL_BUDGET_S for s in plan)
    names = [s.name for s in plan]
    for needed in ("pytest-gpu", "guidance-kernel", "logprobs", "qsharp", "decode", "lowrank"):
        assert needed in names
    qsharp = next(s for s in plan if s.name == "qsharp")
    assert qsharp.argv[qsharp.argv.index("--reference") + 1] == "llama-3.1-8b"
    assert qsharp.argv[qsharp.argv.index("--value-model") + 1] == "llama-3.2-1b"


def test_stand_in_models_have_the_published_sizes():
    """Built on the meta device (no memory): the parameter counts of Llama-3.2-1B and Llama-3.1-8B."""
    counts = {name: sum(p.numel() for p in random_model(name, device="meta").parameters()) for name in MODEL_CONFIGS}
    assert counts["llama-3.2-1b"] == 1_235_814_400
    assert counts["llama-3.1-8b"] == 8_030_261_248
    small = random_model("llama-3.1-8b", shrink=True)
    assert small.config.vocab_size == 128256 and small.config.num_hidden_layers == 2
    assert small.config.rope_parameters["rope_type"] == "llama3"


def test_synthetic_tokenizer_round_trip():
    tok = synthetic_tokenizer(1000, pad_token_id=7, eos_token_id=9)
    assert len(tok) == 1000 and tok.pad_token_id == 7 and tok.eos_token_id == 9
    assert tok("<3> <979> <0> <97>", add_special_tokens=False)["input_ids"] == [3, 979, 0, 97]
    batch = tok(["<1> <2> <3>", "<4>"], padding=True, add_special_tokens=False)
    assert batch["input_ids"][1] == [7, 7, 4] and batch["attention_mask"][1] == [0, 0, 1]


@pytest.mark.slow
def test_smoke_run_writes_summary_and_results(tmp_path):
    """Two benchmark steps at toy sizes through the real runner: summary.json, log.txt, results.tar.gz."""
    proc = _run("--smoke", "--only", "qsharp", "decode", "--out", str(tmp_path), timeout=600)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["status"] for s in summary["steps"]] == ["ok", "ok"]
    assert {"qsharp-cpu.json", "decode-cpu.json"} <= set(summary["results"])
    decode = summary["results"]["qsharp-cpu.json"]["figures"]["decode"]
    assert {r["method"] for r in decode} == {"unguided", "qsharp-q", "qsharp-v", "reference-loop-q",
                                             "reference-loop-v"}
    with tarfile.open(tmp_path / "results.tar.gz") as tar:
        assert {"qsharp-cpu.json", "qsharp-cpu.png", "decode-cpu.json"} <= set(tar.getnames())
    assert "===== qsharp" in (tmp_path / "log.txt").read_text()


# ------------------------------------------------------------------------------------------ GPU only
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@needs_cuda
def test_gpu_guidance_bf16_logits_production_shape():
    """bf16 logits (as a bf16 model hands them over) at B=64, V=128256: compiled kernel vs the reference."""
    from guidedecode.kernels import guidance as G

    g = torch.Generator(device="cuda").manual_seed(3)
    x = (torch.randn(64, 128256, device="cuda", generator=g) * 4).to(torch.bfloat16)
    idx = torch.topk(x.float(), 20, dim=-1).indices
    off = torch.rand(64, 20, device="cuda", generator=g) * 10
    ref = G.guidance_reference(x, off, idx=idx, temperature=0.8, top_p=0.9)
    for chunks in (None, 1):
        out = torch.empty_like(x)
        got = G.fused_guidance(x, off, idx=idx, out=out, temperature=0.8, top_p=0.9, num_chunks=chunks)
        for name in ("lse_p", "lse_q", "kl", "kl_top_p"):
            torch.testing.assert_close(getattr(got, name), getattr(ref, name), atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(out, (x.float() + G.dense_offsets(x, off, idx)).to(torch.bfloat16))


@pytest.mark.gpu
@needs_cuda
def test_gpu_qsharp_guide_matches_cpu():
    """The Q# guide on CUDA (Triton epilogue) draws the same greedy tokens and KLs as on CPU (torch)."""
    from guidedecode.guides.qsharp import QSharpGuide
    from guidedecode.testing import random_value_model, tiny_model, tiny_tokenizer

    results = []
    for device in ("cpu", "cuda"):
        model = tiny_model("llama", seed=0).to(device)
        vm = random_value_model("llama", head="v").to(device)
        guide = QSharpGuide(vm, eta=3.0, top_k=8, temperature=0.7, top_p=0.9, tokenizer=tiny_tokenizer())
        ids = torch.tensor([[5, 6, 7, 8], [1, 9, 10, 11]], device=device)
        out = model.generate(ids, attention_mask=(ids != 1).long(), max_new_tokens=6, min_new_tokens=6,
                             do_sample=False, logits_processor=[guide], pad_token_id=1)
        results.append((out.cpu(), {k: v.cpu() for k, v in guide.sequence_kl().items()}))
    assert torch.equal(results[0][0], results[1][0])
    for key in ("kl", "kl_sample"):
        torch.testing.assert_close(results[0][1][key], results[1][1][key], atol=1e-4, rtol=1e-3)
