"""The trainers' data collection on a real vLLM engine (CPU, V1 runner) running the embedded model.

``train qsharp`` (roll-ins, roll-outs and the guided roll-in of round 2 through the engine's Q♯ processor),
``train rationale`` (extract greedily, filter by ``prompt_logprobs`` scores), the DOTS planner's search and
``train optune``'s attempts all take ``backend="vllm"``; each is checked against what the HF path writes
(greedy text and scores) or for what it must be (complete, resumable, bit-identical after a kill).
Runs in the vLLM virtual environment (``tools/setup-vllm-venv.sh``); skipped where vLLM is absent.
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

vllm = pytest.importorskip("vllm")

from guidedecode import ValueModel, load_model  # noqa: E402
from guidedecode.models import DEFAULT_MODEL, EMBEDDED_MODELS, converted_model_dir  # noqa: E402
from guidedecode.vllm import QSharp, VLLMBackend  # noqa: E402
from guidedecode.vllm.processors import VALUE_MODEL_ENV, VALUE_MODEL_ROOT_ENV  # noqa: E402

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_torch_thread")]

SYNTHETIC = {"task": "synthetic", "task_options": {"level": 1}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    """fp32 engine with the Q♯ processor and no default value model (requests name theirs)."""
    mp = pytest.MonkeyPatch()
    mp.delenv(VALUE_MODEL_ENV, raising=False)
    mp.setenv(VALUE_MODEL_ROOT_ENV, str(tmp_path_factory.getbasetemp()))  # value models named per request
    engine = vllm.LLM(str(converted_model_dir(EMBEDDED_MODELS[DEFAULT_MODEL])), dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=256 << 20, max_model_len=2048, seed=0, logits_processors=[QSharp])
    yield engine
    mp.undo()
    del engine


@pytest.fixture(scope="module")
def hf():
    return load_model(DEFAULT_MODEL, dtype="float32")


# ------------------------------------------------------------------------------------------ Q#
def qsharp_config(**overrides):
    from guidedecode.training.qsharp import QSharpTrainConfig

    values = dict(**SYNTHETIC, problems=4, samples=2, max_new_tokens=12, rounds=2, roll_in_eta=5.0, epochs=1,
                  batch_size=4, gen_batch_size=4, held_out=0.25, drop_no_variation=False, value_layers=1, lr=1e-3, dtype="float32",
                  backend="vllm")
    values.update(overrides)
    return QSharpTrainConfig(**values)


class Interrupt(Exception):
    pass


def test_qsharp_training_collects_on_vllm_and_resumes_bit_identical(llm, tmp_path):
    """Two rounds (round 2's roll-in guided by round 1's value model in the engine): records complete and
    EOS-cut; a run killed after its first collection chunk and rerun writes the same bytes."""
    from guidedecode.training.qsharp import run

    backend = VLLMBackend(llm)
    full = run(qsharp_config(), tmp_path / "full", progress=False, backend=backend)
    assert [r["round"] for r in full["rounds"]] == [1, 2] and full["rounds"][1]["roll_in_eta"] == 5.0
    assert full["collection"] == {"backend": "vllm", "dtype": "float32", "device": "cpu"}

    def kill_after_first_chunk(_):
        raise Interrupt

    with pytest.raises(Interrupt):
        run(qsharp_config(), tmp_path / "killed", progress=False, backend=backend, on_chunk=kill_after_first_chunk)
    assert len((tmp_path / "killed" / "round-1" / "data.jsonl").read_text().splitlines()) == 2  # 4 / 2 per chunk
    run(qsharp_config(), tmp_path / "killed", progress=False, backend=backend)
    for name in ("round-1/data.jsonl", "round-2/data.jsonl", "round-2/model/model.safetensors"):
        assert (tmp_path / "full" / name).read_bytes() == (tmp_path / "killed" / name).read_bytes(), name

    eos = set(backend.eos_token_ids)
    for line in (tmp_path / "full" / "round-2" / "data.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["roll_in_eta"] == 5.0
        for response in record["fully_guided_responses_tokenized"]:
            assert 1 <= len(response) <= 12
            assert len(response) == 12 or response[-1] in eos  # ends at EOS or the budget
            assert not eos & set(response[:-1])  # cut after the first EOS


def test_qsharp_guided_roll_in_goes_through_the_engine_processor(llm, tmp_path):
    """The same round-2 chunk collected with and without a (random-head) value model: the guided roll-ins
    differ, so the per-request value model reached the engine's processor."""
    from guidedecode.tasks import get_task
    from guidedecode.training.qsharp import VLLMPolicy, collect

    model, tok = load_model(DEFAULT_MODEL, dtype="float32")
    vm = ValueModel.from_backbone(model, tokenizer=tok, num_layers=1)
    with torch.no_grad():
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    vm.save_pretrained(tmp_path / "vm")
    policy = VLLMPolicy(VLLMBackend(llm))
    task = get_task("synthetic", level=1)
    problems = task.load(None, split="train", limit=2)
    config = qsharp_config(roll_in_eta=8.0, samples=2, max_new_tokens=16)
    plain = collect(policy, task, problems, tmp_path / "plain.jsonl", round_index=2, config=config)
    guided = collect(policy, task, problems, tmp_path / "guided.jsonl", round_index=2, config=config,
                     value_model_dir=tmp_path / "vm")
    assert [r["roll_in_eta"] for r in plain] == [0.0, 0.0] and [r["roll_in_eta"] for r in guided] == [8.0, 8.0]
    responses = [[r["fully_guided_responses_tokenized"] for r in rows] for rows in (plain, guided)]
    assert responses[0] != responses[1]
    again = collect(policy, task, problems, tmp_path / "plain-again.jsonl", round_index=2, config=config)
    assert again == plain  # seeded per prompt: the same call gives the same samples


# ------------------------------------------------------------------------------------------ RATIONALYST
def test_rationale_extract_and_filter_on_vllm_match_the_hf_path(llm, hf, tmp_path):
    """Extract (greedy insertion) and filter (scores from prompt_logprobs) on vLLM give HF's rationales and
    usefulness scores on the same GSM8K records."""
    from guidedecode.tasks.base import data_dir
    from guidedecode.training.rationale import PipelineConfig, run_pipeline

    data = data_dir() / "gsm8k" / "train.jsonl"
    runs = {}
    for name, backend in (("vllm", VLLMBackend(llm)), ("hf", None)):
        config = PipelineConfig(out=tmp_path / name, data=data, model=DEFAULT_MODEL, records=2, max_rationales=2,
                                max_new_tokens=24, default_tau=-100.0, dtype="float32", backend=name)
        metrics = run_pipeline(config, ("extract", "align", "filter"), backend=backend,
                               loader=lambda *a, **k: hf)
        runs[name] = metrics
    extracted = {name: (tmp_path / name / "extract.jsonl").read_text() for name in runs}
    assert extracted["vllm"] == extracted["hf"]
    scored = {name: [json.loads(line) for line in (tmp_path / name / "scored.jsonl").read_text().splitlines()]
              for name in runs}
    assert len(scored["vllm"]) == len(scored["hf"]) >= 1
    for a, b in zip(scored["vllm"], scored["hf"]):
        assert a["n_following"] == b["n_following"]  # the same token boundary
        for key in ("s_with", "s_without"):
            assert abs(a[key] - b[key]) < 5e-3 * max(1.0, abs(b[key])), (key, a[key], b[key])
    settings = json.loads((tmp_path / "vllm" / "settings.json").read_text())
    assert settings["extract"]["backend"] == settings["filter"]["backend"] == "vllm"


# ------------------------------------------------------------------------------------------ DOTS
def test_dots_search_runs_on_vllm(llm, tmp_path):
    from guidedecode.dots.search import SearchConfig
    from guidedecode.training.dots import DotsPlannerConfig, run_dots_pipeline

    config = DotsPlannerConfig(**SYNTHETIC, questions=2, backend="vllm",
                               search=SearchConfig(rounds=1, samples=1, keep=(), temperature=0.7, max_new_tokens=24,
                                                   max_verify_rounds=1))
    metrics = run_dots_pipeline(config, tmp_path, stages=("search",), backends={DEFAULT_MODEL: VLLMBackend(llm)})
    rounds = [json.loads(line) for line in (tmp_path / "search" / "runs.jsonl").read_text().splitlines()]
    assert len(rounds) == 2 and all(len(r["runs"]) == 12 for r in rounds)  # each trajectory once per question
    assert all(isinstance(run["pred"], str) for r in rounds for run in r["runs"])
    assert metrics["search"]["questions"] == 2
    assert json.loads((tmp_path / "search" / "settings.json").read_text())["backend"] == "vllm"


# ------------------------------------------------------------------------------------------ OpTune
def test_optune_attempts_on_vllm(llm, tmp_path):
    from guidedecode.training.optune import OpTuneTrainConfig, run

    config = OpTuneTrainConfig(model=DEFAULT_MODEL, **SYNTHETIC, questions=2, attempts=2, max_new_tokens=8,
                               drop_truncated=False, epochs=1, grad_accum=1, dev_fraction=0.0, layers=[-1],
                               save_every=1, backend="vllm")
    run(config, tmp_path, progress=False, backend=VLLMBackend(llm))
    records = [json.loads(line) for line in (tmp_path / "attempts.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(len(r["attempts"]) == 2 for r in records)
    assert {a["finish"] for r in records for a in r["attempts"]} <= {"eos", "length"}
    assert (tmp_path / "editor").is_dir()


def test_a_ready_backend_must_match_the_run_settings(llm, tmp_path):
    from guidedecode.errors import TrainingError
    from guidedecode.training.qsharp import run

    with pytest.raises(TrainingError, match="backend setting is 'hf'"):
        run(qsharp_config(backend="hf"), tmp_path / "a", progress=False, backend=VLLMBackend(llm))
    with pytest.raises(TrainingError, match="serves"):
        run(qsharp_config(model="smollm2-360m-instruct"), tmp_path / "b", progress=False, backend=VLLMBackend(llm))


# ------------------------------------------------------------------------------------------ CLI
def test_train_qsharp_cli_builds_its_own_engine_for_guided_rounds(tmp_path):
    """``guidedecode train qsharp --backend vllm`` in a fresh process, two rounds with a relative --out: the
    trainer builds its own engine with the Q# processor and round 2's roll-in reads round 1's value model."""
    command = [sys.executable, "-m", "guidedecode.cli.main", "train", "qsharp", "--task", "synthetic", "--level", "1",
               "--problems", "2", "--samples", "2", "--max-new-tokens", "8", "--epochs", "1", "--value-layers", "1",
               "--rounds", "2", "--roll-in-eta", "5", "--held-out", "0", "--keep-no-variation", "--backend", "vllm",
               "--out", "run", "--quiet"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    out = tmp_path / "run"
    assert json.loads((out / "config.json").read_text())["backend"] == "vllm"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["collection"]["backend"] == "vllm" and metrics["collection"]["dtype"] == "float32"  # as stored
    records = [json.loads(line) for line in (out / "round-2" / "data.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["roll_in_eta"] == 5.0 for r in records)


def test_a_guided_request_needs_its_processor_in_the_engine(llm):
    """vLLM ignores extra_args no processor reads: a guided roll-in or eval on an engine without the guide's
    processor is refused instead of running unguided under a guided label."""
    from guidedecode.errors import GuidedecodeError
    from guidedecode.vllm import PlanningTokens
    from guidedecode.vllm.engine import require_processor

    require_processor(llm, QSharp)  # this engine has it
    with pytest.raises(GuidedecodeError, match="without the PlanningTokens logits processor"):
        require_processor(llm, PlanningTokens)
