"""guidedecode.vllm logits processors against vLLM's real interface classes (no engine).

Batch churn (requests added, removed, moved, swapped; preemption with replayed tokens; guided and
unguided rows mixed) is driven through vLLM's own ``BatchUpdate`` (V1 runner) and ``LogitsContext``
(Model Runner V2) with hand-built contexts; every guided row must equal the HF guide
(:class:`~guidedecode.QSharpGuide`) run on that request alone, every unguided row must be untouched.
Runs in the vLLM virtual environment (``tools/setup-vllm-venv.sh``); skipped where vLLM is absent.
"""

from __future__ import annotations

import os
import random
from types import SimpleNamespace

import pytest
import torch

vllm = pytest.importorskip("vllm")

from vllm import SamplingParams  # noqa: E402
from vllm.v1.sample.logits_processor import BatchUpdate, MoveDirectionality  # noqa: E402
from vllm.v1.sample.logits_processor import LogitsProcessor as V1LogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsContext  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2LogitsProcessor  # noqa: E402
from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcRequestState  # noqa: E402

from guidedecode.guides.qsharp import QSharpGuide  # noqa: E402
from guidedecode.testing import random_value_model  # noqa: E402
from guidedecode.vllm import QSharp, require_vllm  # noqa: E402
from guidedecode.vllm.processors import VALUE_MODEL_ENV  # noqa: E402

VOCAB = 512


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def value_model_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("vm")
    random_value_model("llama", head="v", std=1.0).save_pretrained(directory)
    return directory


@pytest.fixture
def env(value_model_dir, monkeypatch):
    monkeypatch.setenv(VALUE_MODEL_ENV, str(value_model_dir))
    return value_model_dir


def config():
    return SimpleNamespace(model_config=None)


def params(eta=None, **extra):
    args = dict(extra)
    if eta is not None:
        args["qsharp_eta"] = eta
    return SamplingParams(temperature=0.8, top_p=0.9, extra_args=args or None)


def expected_row(value_model, sampling_params, history, logits_row):
    """The HF guide on this request alone, fed its tokens one step at a time up to ``history``."""
    options = QSharp.options(dict(sampling_params.extra_args or {}))
    if options is None:
        return logits_row
    guide = QSharpGuide(value_model, eta=options["eta"], mode=options["mode"], top_k=options["top_k"], tail=options["tail"],
                        temperature=sampling_params.temperature, top_p=sampling_params.top_p)
    return guide(torch.tensor([history]), logits_row[None].clone())[0]


class Request:
    def __init__(self, rid, sampling_params, rng, prompt=None):
        self.rid = rid
        self.params = sampling_params
        self.prompt = prompt if prompt is not None else [rng.randrange(3, VOCAB) for _ in range(rng.randrange(2, 7))]
        self.output: list[int] = []


class Method:
    """One processor class under batch churn: how to build it (V1 / V2), random per-request settings and
    prompts, and the HF guide each row must equal (a fresh guide fed that request's history alone)."""

    def __init__(self, name, processor, vllm_config, vocab, random_params, reference, random_prompt=None):
        self.name, self.processor, self.vllm_config, self.vocab = name, processor, vllm_config, vocab
        self.random_params, self.reference, self.random_prompt = random_params, reference, random_prompt

    def v1(self):
        return self.processor(self.vllm_config, torch.device("cpu"), False)

    def v2(self, states):
        return self.processor(self.vllm_config, states)

    def request(self, rid, rng):
        prompt = self.random_prompt(rng) if self.random_prompt else None
        return Request(rid, self.random_params(rng), rng, prompt)

    def expected(self, request, logits_row):
        guide = self.reference(request.params)
        if guide is None:
            return logits_row
        return guide(torch.tensor([request.prompt + request.output]), logits_row[None].clone())[0]

    def resume(self, request, rng, steps):
        """Output tokens a preempted request already has: sampled under its own guide (a constrained guide's
        history is always one it allowed), to be replayed by the processor when the request comes back."""
        gen = torch.Generator().manual_seed(rng.randrange(1 << 30))
        for _ in range(steps):
            row = self.expected(request, torch.randn(self.vocab, generator=gen))
            request.output.append(int(torch.argmax(row)))

    def guided(self, request) -> bool:
        return self.processor.options(dict(request.params.extra_args or {})) is not None


def qsharp_method(value_model_dir):
    from guidedecode.value_model import ValueModel

    value_model = ValueModel.from_pretrained(value_model_dir)

    def random_params(rng):
        eta = rng.choice([None, 0.0, 2.0, 6.0])
        extra = {}
        if eta and rng.random() < 0.3:
            extra = {"qsharp_mode": "cd"}
        elif eta and rng.random() < 0.3:
            extra = {"qsharp_tail": "mask"}
        return params(eta, **extra)

    def reference(sampling_params):
        options = QSharp.options(dict(sampling_params.extra_args or {}))
        if options is None:
            return None
        return QSharpGuide(value_model, eta=options["eta"], mode=options["mode"], top_k=options["top_k"],
                           tail=options["tail"], temperature=sampling_params.temperature, top_p=sampling_params.top_p)

    return Method("qsharp", QSharp, config(), VOCAB, random_params, reference)


def planning_method(directory):
    from guidedecode.guides.planning import PlanningTokenGuide
    from guidedecode.planning import PlanningVocab
    from guidedecode.vllm import PlanningTokens

    vocab = PlanningVocab(("memory", "reason"), 2, 2, 300)
    vocab.save_pretrained(directory)
    settings = [None, {"planning": 1}, {"planning_force_type": "memory", "planning_max_steps": 2},
                {"planning_ban_types": ["reason"]}, {"planning_memory_before_reason": 1, "planning_max_steps": 3}]

    def random_params(rng):
        return SamplingParams(temperature=0.8, extra_args=rng.choice(settings))

    def reference(sampling_params):
        options = PlanningTokens.options(dict(sampling_params.extra_args or {}))
        return None if options is None else PlanningTokenGuide(vocab, **options)

    new_ids = list(vocab.new_ids)

    def random_prompt(rng):  # some prompts end inside an opened block, which the guide must complete
        prompt = [rng.randrange(3, 300) for _ in range(rng.randrange(2, 6))]
        return prompt + ([new_ids[0]] if rng.random() < 0.4 else [])

    return Method("planning", PlanningTokens, config(), 300 + len(new_ids), random_params, reference, random_prompt)


def action_line_method():
    from guidedecode.dots.action_line import ActionLineGuide
    from guidedecode.dots.actions import ACTION_LINE_TRIGGER
    from guidedecode.models import load_tokenizer, model_source
    from guidedecode.vllm import ActionLine

    tok = load_tokenizer("smollm2-135m-instruct")
    trigger = tok("Plan.\n" + ACTION_LINE_TRIGGER, add_special_tokens=False)["input_ids"]

    def random_params(rng):
        return SamplingParams(temperature=0.8, extra_args=rng.choice([None, {"dots_action_line": 1}]))

    def reference(sampling_params):
        return ActionLineGuide(tok) if ActionLine.options(dict(sampling_params.extra_args or {})) is not None else None

    def random_prompt(rng):  # half of them end at the trigger: the action line is constrained from the start
        prompt = [rng.randrange(3, 20000) for _ in range(rng.randrange(2, 6))]
        return prompt + (trigger if rng.random() < 0.5 else [])

    vllm_config = SimpleNamespace(model_config=SimpleNamespace(tokenizer=model_source()))
    return Method("action_line", ActionLine, vllm_config, len(tok), random_params, reference, random_prompt)


@pytest.fixture(params=["qsharp", "planning", "action_line"])
def method(request, value_model_dir, tmp_path, monkeypatch):
    from guidedecode.vllm.processors import PLANNER_ENV

    if request.param == "qsharp":
        monkeypatch.setenv(VALUE_MODEL_ENV, str(value_model_dir))
        return qsharp_method(value_model_dir)
    if request.param == "planning":
        monkeypatch.setenv(PLANNER_ENV, str(tmp_path))
        return planning_method(tmp_path)
    return action_line_method()


def test_subclasses_both_real_interfaces_and_version():
    assert issubclass(QSharp, V1LogitsProcessor) and issubclass(QSharp, V2LogitsProcessor)
    assert require_vllm().startswith("0.3")


def test_validate_params_rejects_bad_values_with_clear_messages(env):
    QSharp.validate_params(params())  # unguided
    QSharp.validate_params(params(3.0, qsharp_mode="cd", qsharp_top_k=5))
    for bad, needle in [
        (params("3"), "qsharp_eta"), (params(float("nan")), "qsharp_eta"), (params(-1.0), "qsharp_eta"),
        (params(True), "qsharp_eta"), (params(2.0, qsharp_mode="greedy"), "qsharp_mode"),
        (params(2.0, qsharp_top_k=0), "qsharp_top_k"), (params(2.0, qsharp_top_k=2.5), "qsharp_top_k"),
        (params(2.0, qsharp_typo=1), "qsharp_typo"), (params(None, qsharp_mode="cd"), "qsharp_eta"),
    ]:
        with pytest.raises(ValueError, match=needle):
            QSharp.validate_params(bad)


def test_guided_request_without_value_model_is_refused_at_admission(monkeypatch):
    monkeypatch.delenv(VALUE_MODEL_ENV, raising=False)
    with pytest.raises(ValueError, match=VALUE_MODEL_ENV):
        QSharp.validate_params(params(3.0))
    QSharp.validate_params(params())  # unguided requests are fine


def test_v1_batch_churn_matches_hf_guide_per_request(method):
    """Added, removed, moved (condensed) and swapped requests, resumed requests that arrive with output
    tokens (preemption), guided and unguided rows mixed: every row equals the HF guide on its request alone."""
    proc = method.v1()
    rng = random.Random(0)
    gen = torch.Generator().manual_seed(0)
    batch: list[Request | None] = []
    next_id = 0
    checked = guided = 0
    for step in range(24):
        removed, added, moved = [], [], []
        for i, req in enumerate(batch):  # remove some requests
            if req is not None and rng.random() < 0.15:
                removed.append(i)
                batch[i] = None
        for _ in range(rng.randrange(0, 3)):  # add into holes first, then append
            next_id += 1
            req = method.request(next_id, rng)
            if rng.random() < 0.2 and step > 2:  # a preempted request resumed with tokens already generated
                method.resume(req, rng, rng.randrange(1, 4))
            holes = [i for i, r in enumerate(batch) if r is None]
            index = holes[0] if holes else len(batch)
            if index == len(batch):
                batch.append(None)
            batch[index] = req
            added.append((index, req.params, req.prompt, req.output))
        # condense: move the last live request into the first hole (UNIDIRECTIONAL), sometimes swap two
        holes = [i for i, r in enumerate(batch) if r is None]
        if holes:
            last = max(i for i, r in enumerate(batch) if r is not None) if any(batch) else -1
            if last > holes[0]:
                moved.append((last, holes[0], MoveDirectionality.UNIDIRECTIONAL))
                batch[holes[0]], batch[last] = batch[last], None
        live = [i for i, r in enumerate(batch) if r is not None]
        if len(live) >= 2 and rng.random() < 0.5:
            a, b = rng.sample(live, 2)
            moved.append((a, b, MoveDirectionality.SWAP))
            batch[a], batch[b] = batch[b], batch[a]
        while batch and batch[-1] is None:
            batch.pop()
        proc.update_state(BatchUpdate(batch_size=len(batch), removed=removed, added=added, moved=moved)
                          if (removed or added or moved) else None)
        if not batch:
            continue
        logits = torch.randn(len(batch), method.vocab, generator=gen)
        original = logits.clone()
        out = proc.apply(logits)
        for i, req in enumerate(batch):
            if req is None:
                continue
            torch.testing.assert_close(out[i], method.expected(req, original[i]), rtol=1e-5, atol=1e-5)
            if method.guided(req):
                guided += 1
            else:
                assert torch.equal(out[i], original[i])  # unguided rows untouched, bit for bit
            checked += 1
            req.output.append(int(torch.argmax(out[i])))  # the live output list grows, as in vLLM
    assert checked > 40 and 10 < guided < checked, (checked, guided)


def hand_built_states(max_reqs, max_len):
    holder = lambda t: SimpleNamespace(gpu=t, cpu=t, np=t.numpy())  # noqa: E731 - the .gpu view the runner exposes
    return LogitsProcRequestState(
        device=torch.device("cpu"), max_num_reqs=max_reqs, vocab_size=VOCAB,
        all_token_ids=holder(torch.zeros(max_reqs, max_len, dtype=torch.int32)),
        prompt_len=holder(torch.zeros(max_reqs, dtype=torch.int32)),
        prefill_len=holder(torch.zeros(max_reqs, dtype=torch.int32)),
        total_len=holder(torch.zeros(max_reqs, dtype=torch.int32)),
    )


def test_v2_slots_rows_and_preemption_match_hf_guide_per_request(method):
    """Model Runner V2: recycled slots, rows reordered every step through ``expanded_idx_mapping``, resumed
    requests recomputed into their slot; every row equals the HF guide on its request alone."""
    states = hand_built_states(6, 64)
    proc = method.v2(states)
    rng = random.Random(1)
    gen = torch.Generator().manual_seed(1)
    slots: dict[int, Request] = {}
    free = list(range(6))
    checked = guided = 0
    for step in range(20):
        # finish some requests (no removal hook in V2: the slot is simply recycled later)
        for slot in list(slots):
            if rng.random() < 0.2 or len(slots[slot].prompt + slots[slot].output) >= 60:
                del slots[slot]
                free.append(slot)
        for _ in range(rng.randrange(0, 3)):
            if not free:
                break
            slot = free.pop(rng.randrange(len(free)))
            req = method.request(step * 10 + slot, rng)
            if rng.random() < 0.3:  # resumed after preemption: output tokens recomputed into the slot
                method.resume(req, rng, 3)
            slots[slot] = req
            assert proc.add_request(slot, req.params) == method.guided(req)
        if not slots:
            continue
        order = list(slots)
        rng.shuffle(order)  # rows are reordered every step
        for slot in order:
            history = slots[slot].prompt + slots[slot].output
            states.all_token_ids.gpu[slot, : len(history)] = torch.tensor(history, dtype=torch.int32)
            states.total_len.gpu[slot] = len(history)
        ctx = LogitsContext(
            expanded_idx_mapping=torch.tensor(order), idx_mapping=torch.tensor(order),
            idx_mapping_np=torch.tensor(order).numpy(), expanded_local_pos=torch.zeros(len(order), dtype=torch.long),
            input_ids=torch.tensor([(slots[s].prompt + slots[s].output)[-1] for s in order]),
            pos=torch.tensor([len(slots[s].prompt + slots[s].output) - 1 for s in order]),
            seq_lens_upper_bound_np=torch.tensor([len(slots[s].prompt + slots[s].output) for s in order]).numpy(),
        )
        logits = torch.randn(len(order), method.vocab, generator=gen)
        original = logits.clone()
        out = proc.apply(logits, ctx)
        for row, slot in enumerate(order):
            req = slots[slot]
            torch.testing.assert_close(out[row], method.expected(req, original[row]), rtol=1e-5, atol=1e-5)
            guided += method.guided(req)
            checked += 1
            req.output.append(int(torch.argmax(out[row])))
    assert checked > 30 and 5 < guided < checked, (checked, guided)


def test_guided_rows_change_and_unguided_rows_do_not(env):
    proc = QSharp(config(), torch.device("cpu"), False)
    guided, plain = params(8.0), params()
    proc.update_state(BatchUpdate(batch_size=2, removed=[], added=[(0, guided, [5, 6, 7], []), (1, plain, [5, 6, 7], [])],
                                  moved=[]))
    logits = torch.randn(2, VOCAB, generator=torch.Generator().manual_seed(3))
    original = logits.clone()
    out = proc.apply(logits)
    assert not torch.allclose(out[0], original[0])
    assert torch.equal(out[1], original[1])


def test_a_broken_default_value_model_is_an_error_at_engine_start(monkeypatch, tmp_path):
    from guidedecode.errors import GuidedecodeError

    monkeypatch.setenv(VALUE_MODEL_ENV, str(tmp_path / "missing"))
    with pytest.raises(GuidedecodeError, match="missing"):
        QSharp(config(), torch.device("cpu"), False)


def test_per_request_value_model_without_an_engine_default(monkeypatch, value_model_dir, tmp_path):
    """``qsharp_value_model`` names the value model per request (the Q# trainer's guided roll-in uses it):
    no default needed at engine start; a bad directory is refused at admission, naming it."""
    from guidedecode.value_model import ValueModel

    from guidedecode.vllm.processors import VALUE_MODEL_ROOT_ENV

    monkeypatch.delenv(VALUE_MODEL_ENV, raising=False)
    monkeypatch.delenv(VALUE_MODEL_ROOT_ENV, raising=False)
    proc = QSharp(config(), torch.device("cpu"), False)
    with pytest.raises(ValueError, match=VALUE_MODEL_ROOT_ENV):  # off unless the operator allows it
        QSharp.validate_params(params(3.0, qsharp_value_model=str(value_model_dir)))
    monkeypatch.setenv(VALUE_MODEL_ROOT_ENV, str(value_model_dir.parent))
    with pytest.raises(ValueError, match="not under"):  # a client cannot name paths outside the root
        QSharp.validate_params(params(3.0, qsharp_value_model=str(value_model_dir / ".." / "..")))
    with pytest.raises(ValueError, match="not a saved ValueModel"):
        QSharp.validate_params(params(3.0, qsharp_value_model=str(value_model_dir.parent)))
    with pytest.raises(ValueError, match="qsharp_value_model"):
        QSharp.validate_params(params(3.0, qsharp_value_model=7))
    guided = params(3.0, qsharp_value_model=str(value_model_dir))
    QSharp.validate_params(guided)
    rng = random.Random(5)
    prompt = [rng.randrange(3, VOCAB) for _ in range(4)]
    output: list[int] = []
    proc.update_state(BatchUpdate(batch_size=1, added=[(0, guided, prompt, output)], removed=[], moved=[]))
    logits = torch.randn(1, VOCAB)
    out = proc.apply(logits.clone())
    value_model = ValueModel.from_pretrained(value_model_dir)
    torch.testing.assert_close(out[0], expected_row(value_model, guided, prompt, logits[0].clone()))
    assert list(proc.value_models) == [os.path.realpath(value_model_dir)]  # loaded once, kept for later requests


def test_import_touches_no_cuda():
    import subprocess
    import sys

    code = ("import torch, guidedecode.vllm.processors, guidedecode.vllm.backend; "
            "assert not torch.cuda.is_initialized(); print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip().endswith("ok")


# ------------------------------------------------------------------------------ action line, planning tokens
def drive_v1(proc, requests, steps, vocab_size, make_reference, seed=0):
    """Feed ``requests`` [(params, prompt)] through the V1 interface for ``steps`` steps; each row must equal
    ``make_reference(params)`` (a fresh HF guide, or None for unguided) run on that request's history alone."""
    proc.update_state(BatchUpdate(batch_size=len(requests), removed=[], moved=[],
                                  added=[(i, p, list(prompt), out) for i, (p, prompt, out) in enumerate(requests)]))
    gen = torch.Generator().manual_seed(seed)
    references = [make_reference(p) for p, _, _ in requests]
    for _ in range(steps):
        logits = torch.randn(len(requests), vocab_size, generator=gen)
        original = logits.clone()
        out = proc.apply(logits)
        for i, (p, prompt, output) in enumerate(requests):
            if references[i] is None:
                assert torch.equal(out[i], original[i])
            else:
                want = references[i](torch.tensor([list(prompt) + output]), original[i][None].clone())[0]
                assert torch.equal(out[i], want)
            output.append(int(torch.argmax(out[i])))
    return requests


def test_action_line_processor_matches_the_hf_guide_and_yields_an_action(tmp_path):
    from guidedecode.dots.action_line import ActionLineGuide
    from guidedecode.dots.actions import ACTION_LINE_TRIGGER, ACTION_LINES
    from guidedecode.models import load_tokenizer, model_source
    from guidedecode.vllm import ActionLine

    tok = load_tokenizer("smollm2-135m-instruct")
    proc = ActionLine(SimpleNamespace(model_config=SimpleNamespace(tokenizer=model_source())), torch.device("cpu"), False)
    prompt = tok("Plan the solution.\n" + ACTION_LINE_TRIGGER, add_special_tokens=False)["input_ids"]
    on, off = SamplingParams(extra_args={"dots_action_line": 1}), SamplingParams()
    requests = [(on, prompt, []), (off, prompt, []), (on, prompt, [])]
    drive_v1(proc, requests, 16, len(tok), lambda p: ActionLineGuide(tok) if p.extra_args else None)
    for params, prompt_ids, output in requests:
        if params.extra_args:
            text = tok.decode(output)
            assert any(text.startswith(f" {line}\n") for line in ACTION_LINES), text
    for bad in ({"dots_action_line": "yes"}, {"dots_action_line": 2}, {"dots_actionline": 1}):
        with pytest.raises(ValueError, match="dots_action"):
            ActionLine.validate_params(SamplingParams(extra_args=bad))


def test_planning_tokens_processor_matches_the_hf_guide_and_checks_type_names(tmp_path, monkeypatch):
    from guidedecode.guides.planning import PlanningTokenGuide
    from guidedecode.planning import PlanningVocab
    from guidedecode.vllm import PlanningTokens
    from guidedecode.vllm.processors import PLANNER_ENV

    vocab = PlanningVocab(("memory", "reason"), 2, 2, 300)
    vocab.save_pretrained(tmp_path)
    monkeypatch.setenv(PLANNER_ENV, str(tmp_path))
    proc = PlanningTokens(config(), torch.device("cpu"), False)
    forced = SamplingParams(extra_args={"planning_force_type": "memory", "planning_max_steps": 2})
    blocks = SamplingParams(extra_args={"planning": 1})
    requests = [(forced, [5, 6], []), (SamplingParams(), [5, 6], []), (blocks, [7], [])]
    vocab_size = 300 + len(vocab.new_ids)

    def reference(p):
        options = PlanningTokens.options(dict(p.extra_args or {}))
        return None if options is None else PlanningTokenGuide(vocab, **options)

    drive_v1(proc, requests, 20, vocab_size, reference)
    table = vocab.id_table()
    typed = [table[t][0] for t in requests[0][2] if t in table and table[t][1] == 0 and table[t][0] != "prefix"]
    assert "reason" not in typed  # force_type=memory holds
    for bad, needle in [({"planning_force_type": "planning"}, "unknown step type"),
                        ({"planning_max_steps": -1}, "planning_max_steps"),
                        ({"planning_ban_types": [3]}, "planning_ban_types"), ({"planning_typo": 1}, "planning_typo")]:
        with pytest.raises(ValueError, match=needle):
            PlanningTokens.validate_params(SamplingParams(extra_args=bad))
