"""Planning tokens: vocabulary extension, step typers, data layout, trace parser, guide, trainer."""

import copy
import json

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from guidedecode.errors import GuideError, TrainingError
from guidedecode.guides.planning import PlanningTokenGuide
from guidedecode.planning import (
    ArithmeticTyper,
    KMeansTyper,
    LabelTyper,
    PlanningTokenError,
    PlanningVocab,
    add_planning_tokens,
    encode,
    extract_answer,
    format_trace,
    parse_trace,
    prompt_text,
    target_text,
    trace_stats,
    type_examples,
)
from guidedecode.testing import tiny_model

PAD_ROWS = 37  # embedding rows beyond len(tokenizer), as Qwen2.5's padded vocabulary


@pytest.fixture(scope="module")
def base_tokenizer():
    from guidedecode.models import load_tokenizer

    return load_tokenizer("smollm2-135m-instruct")


def _padded(arch, tokenizer, tied=False, seed=0):
    return tiny_model(arch, seed=seed, vocab_size=len(tokenizer) + PAD_ROWS, tie_word_embeddings=tied)


# ----------------------------------------------------------------------------------------- vocab


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
@pytest.mark.parametrize("tied", [False, True])
def test_add_tokens_on_padded_embeddings(base_tokenizer, arch, tied):
    tokenizer = copy.deepcopy(base_tokenizer)
    model = _padded(arch, tokenizer, tied)
    before_in = model.get_input_embeddings().weight.detach().clone()
    before_out = model.get_output_embeddings().weight.detach().clone()
    n_tok = len(tokenizer)
    vocab = add_planning_tokens(model, tokenizer, ["memory", "reason"], n_prefix=3, n_special=2)
    # 3 + 2 * (answer, assignment, memory, reason) new tokens, ids from len(tokenizer) on
    assert vocab.new_ids == list(range(n_tok, n_tok + 11)) and len(tokenizer) == n_tok + 11
    for string, token in zip(vocab.all_strings(), vocab.new_ids):
        assert tokenizer.convert_tokens_to_ids(string) == token
        assert tokenizer.decode([token]) == string
    text = "Q\n " + vocab.block_text("prefix") + vocab.block_text("memory") + " fact\n"
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert ids[2:7] == vocab.ids("prefix") + vocab.ids("memory") and tokenizer.decode(ids) == text
    inp, out = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    assert inp.shape[0] == n_tok + PAD_ROWS  # padding rows reused, matrix not shrunk or grown
    assert (out is inp) == tied
    new = vocab.new_ids
    assert not torch.equal(inp[new], before_in[new])  # the rows at the new ids were re-initialised
    old = torch.ones(inp.shape[0], dtype=torch.bool)
    old[new] = False
    assert torch.equal(inp[old], before_in[old]) and torch.equal(out[old], before_out[old])
    # init: near the mean of the init words' rows, all rows distinct
    words = tokenizer(" memory recall fact", add_special_tokens=False)["input_ids"]
    mean = before_in[words].mean(0)
    assert torch.allclose(inp[vocab.ids("memory")[0]], mean, atol=0.05 * before_in.std().item() + 1e-6)
    assert torch.cdist(inp[new], inp[new]).add(torch.eye(len(new)) * 1e9).min() > 0
    # a forward pass with the new ids uses those rows
    logits = model(input_ids=torch.tensor([new])).logits
    assert logits.shape[-1] == n_tok + PAD_ROWS and torch.isfinite(logits).all()


def test_add_tokens_resizes_a_small_matrix(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    model = tiny_model("llama", vocab_size=len(tokenizer), tie_word_embeddings=True)
    vocab = add_planning_tokens(model, tokenizer, ["memory", "reason"], n_prefix=2, n_special=1)
    assert model.get_input_embeddings().weight.shape[0] == len(tokenizer) == vocab.new_ids[-1] + 1
    assert model.get_output_embeddings().weight is model.get_input_embeddings().weight


def test_bad_vocab_settings_name_the_problem(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    with pytest.raises(PlanningTokenError, match="n_prefix must be"):
        add_planning_tokens(model, tokenizer, ["memory"], n_prefix=-1)
    with pytest.raises(PlanningTokenError, match="'Memory!' is not a lower-case identifier"):
        add_planning_tokens(model, tokenizer, ["Memory!"])
    with pytest.raises(PlanningTokenError, match="reserved"):
        add_planning_tokens(model, tokenizer, ["answer"])
    with pytest.raises(PlanningTokenError, match="duplicate"):
        add_planning_tokens(model, tokenizer, ["memory", "memory"])
    with pytest.raises(PlanningTokenError, match="init_text names unknown keys"):
        add_planning_tokens(model, tokenizer, ["memory"], init_text={"nope": "x"})
    tokenizer.add_tokens(["<memory_0>"])
    with pytest.raises(PlanningTokenError, match="<memory_0> collides"):
        add_planning_tokens(model, tokenizer, ["memory"], n_prefix=1, n_special=1)


def test_registry_round_trip(tmp_path, base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    vocab = add_planning_tokens(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ["memory", "reason"])
    vocab.save_pretrained(tmp_path)
    again = PlanningVocab.from_pretrained(tmp_path)
    assert again == vocab
    again.check_tokenizer(tokenizer)
    with pytest.raises(PlanningTokenError, match="load the tokenizer saved"):
        again.check_tokenizer(base_tokenizer)


# ----------------------------------------------------------------------------------- typers, data


def _rows():
    return [
        {"id": "a", "question": "Is water wet?", "answer": "True",
         "steps": ["[rag]: Water is a liquid.", "[reason]: Liquids make things wet."]},
        {"id": "b", "question": "Can fish fly?", "answer": "False",
         "steps": ["[reason] and [rag]: Fish swim.", "[rag]: Few fish glide."]},
    ]


def test_label_typer_and_target_layout():
    vocab = PlanningVocab(("memory", "reason"), 2, 1, 1000)
    typed = type_examples(_rows(), LabelTyper())
    assert typed[0]["types"] == [["memory"], ["reason"]] and typed[1]["types"] == [["reason"], ["memory"]]
    assert typed[0]["steps"] == ["Water is a liquid.", "Liquids make things wet."]
    expected = ("<prefix_0><prefix_1><memory_0> Water is a liquid.\n"
                "<prefix_0><prefix_1><reason_0> Liquids make things wet.\n"
                "<prefix_0><prefix_1><answer_0> The answer is: True\n")
    assert target_text(typed[0], vocab) == expected
    assert prompt_text("Is water wet?", vocab) == "Question: Is water wet?\n <prefix_0><prefix_1>"
    assert target_text(typed[0], None) == "Water is a liquid.\nLiquids make things wet.\nThe answer is: True\n"
    assert extract_answer(expected) == "True"
    with pytest.raises(PlanningTokenError, match="example x step 1: step without a \\[rag\\]/\\[reason\\] label"):
        LabelTyper()([{"id": "x", "question": "q", "steps": ["[rag]: a", "no label"], "answer": "True"}])
    with pytest.raises(PlanningTokenError, match="example e has no reasoning steps"):
        type_examples([{"id": "e", "question": "q", "steps": [], "answer": "True"}], LabelTyper())


def test_encode_masks_exactly_the_source(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    vocab = add_planning_tokens(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ["memory", "reason"])
    example = type_examples(_rows(), LabelTyper())[0]
    ids, labels = encode(tokenizer, example, vocab, eos_token_id=2)
    source = tokenizer("Question: Is water wet?\n ", add_special_tokens=False)["input_ids"]
    assert ids[:len(source)] == source and labels[:len(source)] == [-100] * len(source)
    assert labels[len(source):] == ids[len(source):] and ids[-1] == 2
    prompt = tokenizer(prompt_text(example["question"], vocab), add_special_tokens=False)["input_ids"]
    assert ids[:len(prompt)] == prompt  # inference prompt = training prefix
    assert tokenizer.decode(ids[len(source):-1]) == target_text(example, vocab)


def test_arithmetic_typer():
    typer = ArithmeticTyper()
    steps = ["He has 3*4=<<3*4=12>>12 apples.", "Then 12+5-1=<<12+5-1=16>>16.", "So he is happy.",
             "Half is 10 / 2 = 5."]
    assert typer([{"steps": steps}]) == [[["mul"], ["add", "sub"], [], ["div"]]]
    assert typer.clean(steps[0]) == "He has 3*4=12 apples."


def test_kmeans_typer_uses_offsets_and_is_seeded(base_tokenizer):
    model = tiny_model("llama", vocab_size=len(base_tokenizer))
    rows = [{"question": f"q{i}", "steps": [f"step {j} of {i}" for j in range(3)], "answer": "1"} for i in range(4)]
    a = KMeansTyper(model, base_tokenizer, k=3, seed=0).fit(rows)
    b = KMeansTyper(model, base_tokenizer, k=3, seed=0).fit(rows)
    assert a(rows) == b(rows)
    assert all(len(t) == 3 and all(x[0] in a.types for x in t) for t in a(rows))
    vectors = a.embed(rows[:1])[0]
    assert vectors.shape == (3, model.config.hidden_size)
    with pytest.raises(PlanningTokenError, match="k >= 2"):
        KMeansTyper(model, base_tokenizer, k=1)


def test_sqvae_typer_is_seeded_learns_and_types_every_step(base_tokenizer):
    from guidedecode.planning import SQVAETyper

    model = tiny_model("llama", vocab_size=len(base_tokenizer))
    rows = [{"question": f"q{i}", "steps": [f"step {j} of {i}" for j in range(3)], "answer": "1"} for i in range(5)]
    a = SQVAETyper(model, base_tokenizer, k=3, seed=0, epochs=30, lr=1e-3).fit(rows)
    b = SQVAETyper(model, base_tokenizer, k=3, seed=0, epochs=30, lr=1e-3).fit(rows)
    assert a(rows) == b(rows) and a.losses == b.losses  # seeded: init, noise and order
    assert a.types == ("vae0", "vae1", "vae2")
    assert all(len(t) == 3 and all(len(x) == 1 and x[0] in a.types for x in t) for t in a(rows))
    assert a.losses[-1] < a.losses[0]  # the VAE objective falls
    before = torch.random.get_rng_state()
    SQVAETyper(model, base_tokenizer, k=2, seed=1, epochs=1).fit(rows[:2])
    assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left alone
    with pytest.raises(PlanningTokenError, match="k >= 2"):
        SQVAETyper(model, base_tokenizer, k=1)
    with pytest.raises(PlanningTokenError, match="epochs"):
        SQVAETyper(model, base_tokenizer, k=2, epochs=0)
    with pytest.raises(PlanningTokenError, match="fit"):
        SQVAETyper(model, base_tokenizer, k=2)(rows)


@pytest.mark.parametrize("variant", ["plain", "contrastive", "next_step"])
def test_sqvae_loss_matches_a_hand_computation(variant):
    """0.5 squared error + 0.1 Gaussian KL per step (the reference's reductions), minus 0.1 x the
    neighbouring-code distance (contrastive), or reconstructing the next step (next_step)."""
    from guidedecode.planning.typers import SQVAE

    torch.manual_seed(0)
    vae = SQVAE(6, 3, width=8, code_dim=4, variant=variant)
    x = torch.randn(5, 6)
    got = vae.loss(x, torch.Generator().manual_seed(7))
    hidden = vae.encoder(x)
    mu, log_var = hidden @ vae.mean.weight.T + vae.mean.bias, hidden @ vae.log_var.weight.T + vae.log_var.bias
    z = mu + torch.randn(mu.shape, generator=torch.Generator().manual_seed(7)) * torch.exp(0.5 * log_var)
    code = torch.softmax(z, -1) @ vae.code.weight.T
    recon = vae.decoder(code)
    kl = (0.5 * (mu ** 2 + log_var.exp() - 1 - log_var)).sum() / 5
    if variant == "next_step":
        want = 0.5 * ((recon[:-1] - x[1:]) ** 2).sum() / 4 + 0.1 * kl
    else:
        want = 0.5 * ((recon - x) ** 2).sum() / 5 + 0.1 * kl
    if variant == "contrastive":
        want = want - 0.1 * (((code[1:4] - code[2:]) ** 2).mean() + ((code[1:4] - code[:3]) ** 2).mean())
    torch.testing.assert_close(got, want)
    with pytest.raises(PlanningTokenError, match="variant"):
        SQVAE(6, 3, variant="vq")


def test_tfidf_typer_picks_the_top_keywords_and_types_by_the_highest_weight():
    from guidedecode.planning import TfidfTyper

    rows = [{"question": "q", "steps": ["[rag]: The apples cost money.", "Count the apples and oranges.",
                                        "Oranges are orange.", "It is so."], "answer": "1"},
            {"question": "q", "steps": ["More apples here.", "Bananas once."], "answer": "2"}]
    typer = TfidfTyper(k=2).fit(rows)
    assert typer.types == ("apples", "oranges")  # the two largest total TF-IDF masses ("so", "it": stop words)
    typed = typer(rows)
    assert typed[0][0] == ["apples"] and typed[0][2] == ["oranges"] and typed[0][3] == []  # no keyword: assignment
    assert typed[1] == [["apples"], []]
    # both keywords once: the rarer one weighs more (apples in 3 of 6 steps, oranges in 2)
    assert typed[0][1] == ["oranges"]
    with pytest.raises(PlanningTokenError, match="k >= 1"):
        TfidfTyper(k=0)
    with pytest.raises(PlanningTokenError, match="found only"):
        TfidfTyper(k=50).fit(rows)


# ------------------------------------------------------------------------------------------ trace


VOCAB = PlanningVocab(("memory", "reason"), 2, 3, 500)
_types = st.sampled_from(["memory", "reason", "answer", "assignment", "memory+reason"])
_text = st.text(st.characters(blacklist_characters="<"), max_size=12)


@given(st.lists(st.fixed_dictionaries({"type": _types, "text": _text}), max_size=6))
@settings(max_examples=200, deadline=None)
def test_trace_round_trips(trace):
    text = format_trace(trace, VOCAB)
    assert parse_trace(text, VOCAB) == trace
    assert format_trace(parse_trace(text, VOCAB), VOCAB) == text


def test_trace_from_ids_and_stats(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    vocab = add_planning_tokens(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ["memory", "reason"],
                                n_prefix=2, n_special=2)
    text = format_trace([{"type": "memory", "text": "A fact."}, {"type": "reason", "text": "So yes."},
                         {"type": "answer", "text": "The answer is: True"}], vocab)
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    assert parse_trace(ids, vocab, tokenizer) == parse_trace(text, vocab)
    stats = trace_stats(ids, vocab, tokenizer)
    assert stats["types"] == {"memory": 1, "reason": 1, "answer": 1} and stats["malformed_blocks"] == 0
    broken = ids[:1] + ids[2:]  # drop the second token of the first general block
    assert trace_stats(broken, vocab, tokenizer)["malformed_blocks"] == 1
    cut = trace_stats(ids[:-len(tokenizer(" The answer is: True", add_special_tokens=False)["input_ids"]) - 2],
                      vocab, tokenizer)  # ends inside the answer block: cut by the budget, not malformed
    assert cut["truncated_blocks"] == 1 and cut["malformed_blocks"] == 0


# ------------------------------------------------------------------------------------------ guide


def _run_guide(guide, prompt, steps, seed, vocab_size=520, p_planning=0.5):
    """Drive the guide with random logits (planning tokens boosted) and greedy picks."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([prompt])
    for _ in range(steps):
        scores = torch.randn(1, vocab_size, generator=generator) * 3
        if torch.rand(1, generator=generator).item() < p_planning:
            scores[0, VOCAB.new_ids] += 8
        out = guide(ids, scores)
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)
    return ids[0, len(prompt):].tolist()


def _well_formed(tokens, vocab, guide_kwargs):
    """Check the block grammar and the steering rules over a generated token list."""
    table = vocab.id_table()
    trace_blocks, i, mode = [], 0, "choose"  # the prompt ends with the general block
    seen, steps, done = set(), 0, False
    while i < len(tokens):
        hit = table.get(tokens[i])
        if hit is None:
            assert mode != "choose", "text right after a general block"
            assert not (done and hit), "planning token after the answer"
            mode = "text" if not done else mode
            i += 1
            continue
        key, position = hit
        assert position == 0, f"block {key} starts at position {position}"
        size = vocab.block_size(key)
        block = tokens[i:i + size]
        assert block == vocab.ids(key)[:len(block)], f"malformed {key} block"
        assert not done
        if key == "prefix":
            assert mode == "text"
            mode = "choose"
        else:
            assert mode == "choose", f"type block {key} outside a choice point"
            if guide_kwargs.get("force_type"):
                assert key in (guide_kwargs["force_type"], "answer")
            assert key not in guide_kwargs.get("ban_types", ())
            if guide_kwargs.get("memory_before_reason") and key == "reason":
                assert "memory" in seen
            if guide_kwargs.get("max_steps") is not None and key != "answer":
                assert steps < guide_kwargs["max_steps"]
            if key == "answer":
                done = True
            else:
                steps += 1
                seen.add(key)
            mode = "after"
        i += size
    return True


STEERING = [{}, {"force_type": "memory"}, {"ban_types": ["memory"]}, {"memory_before_reason": True},
            {"max_steps": 2}, {"ban_types": ["assignment"], "memory_before_reason": True, "max_steps": 3}]


@given(seed=st.integers(0, 2**31 - 1), rules=st.sampled_from(STEERING))
@settings(max_examples=150, deadline=None)
def test_guide_never_emits_a_malformed_block(seed, rules):
    guide = PlanningTokenGuide(VOCAB, **rules)
    prompt = [5, 6, 7] + VOCAB.ids("prefix")
    tokens = _run_guide(guide, prompt, 40, seed)
    assert _well_formed(tokens, VOCAB, rules)
    assert guide.malformed_counts() == [0]


def test_guide_is_a_no_op_without_rules_and_completion():
    guide = PlanningTokenGuide(VOCAB, complete_blocks=False)
    scores = torch.randn(2, 520)
    out = guide(torch.tensor([[5, 6], [7, 8]]), scores.clone())
    assert torch.equal(out, scores)


def test_guide_forces_block_rest_and_choice():
    guide = PlanningTokenGuide(VOCAB)
    prompt = torch.tensor([[5] + VOCAB.ids("prefix")])
    out = guide(prompt, torch.zeros(1, 520))
    allowed = torch.isfinite(out[0]).nonzero().flatten().tolist()
    assert allowed == sorted(VOCAB.ids(k)[0] for k in VOCAB.type_keys)
    step = torch.cat([prompt, torch.tensor([[VOCAB.ids("memory")[0]]])], 1)
    out = guide(step, torch.zeros(1, 520))
    assert torch.isfinite(out[0]).nonzero().flatten().tolist() == [VOCAB.ids("memory")[1]]


def test_guide_bad_input():
    with pytest.raises(GuideError, match="unknown step type 'memroy'"):
        PlanningTokenGuide(VOCAB, ban_types=["memroy"])
    with pytest.raises(GuideError, match="answer block cannot be"):
        PlanningTokenGuide(VOCAB, force_type="answer")
    with pytest.raises(GuideError, match="max_steps"):
        PlanningTokenGuide(VOCAB, max_steps=-1)
    with pytest.raises(GuideError, match="planning tokens go up to id"):
        PlanningTokenGuide(VOCAB)(torch.tensor([[5, 6]]), torch.zeros(1, 400))
    guide = PlanningTokenGuide(VOCAB)
    bad_prompt = torch.tensor([[5, VOCAB.ids("prefix")[1]]])
    with pytest.raises(GuideError, match="prompt 0 has a malformed planning-token block"):
        guide(bad_prompt, torch.zeros(1, 520))


@pytest.mark.slow
def test_guide_composes_with_qsharp_in_generate(base_tokenizer):
    from guidedecode.guides import QSharpGuide
    from guidedecode.value_model import ValueModel

    tokenizer = copy.deepcopy(base_tokenizer)
    model = tiny_model("llama", seed=3, vocab_size=len(tokenizer))
    vocab = add_planning_tokens(model, tokenizer, ["memory", "reason"], n_prefix=2, n_special=2)
    value_model = ValueModel.from_backbone(tiny_model("llama", seed=5, vocab_size=len(tokenizer)), head="v",
                                         tokenizer=tokenizer)
    with torch.no_grad():
        value_model.head.weight.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():  # make the planning tokens likely so the guide has work to do
        model.lm_head.weight[vocab.new_ids] *= 0
        model.lm_head.bias = None
    prompt = tokenizer([prompt_text("Is water wet?", vocab)] * 2, return_tensors="pt", add_special_tokens=False)
    qsharp = QSharpGuide(value_model, eta=5.0, top_k=8, eos_token_id=1, pad_token_id=1)
    planning = PlanningTokenGuide(vocab, tokenizer=tokenizer, eos_token_id=1, pad_token_id=1, force_type="reason")
    torch.manual_seed(0)
    out = model.generate(**prompt, logits_processor=[qsharp, planning], do_sample=True, max_new_tokens=30,
                         pad_token_id=1, top_k=0)
    generated = out[:, prompt["input_ids"].shape[1]:].tolist()
    for row in generated:
        row = row[:row.index(1)] if 1 in row else row
        assert _well_formed(row, vocab, {"force_type": "reason"})
        assert any(t in vocab.new_ids for t in row)
    assert planning.malformed_counts() == [0, 0]
    assert qsharp.steps > 0


# ---------------------------------------------------------------------------------------- trainer


def _write_data(path, n=12):
    rows = []
    for i in range(n):
        rows.append({"question": f"Is {i} even?", "answer": "True" if i % 2 == 0 else "False",
                     "cot_steps": [f"[rag]: {i} is a number.", f"[reason]: {i} mod 2 is {i % 2}."], "split": "train"})
    path.write_text(json.dumps(rows))
    return path


def _loader(arch, tied):
    from guidedecode.models import load_tokenizer

    def load(name, device=None):
        tokenizer = copy.deepcopy(load_tokenizer("smollm2-135m-instruct"))
        return _padded(arch, tokenizer, tied, seed=4), tokenizer

    return load


@pytest.mark.slow
@pytest.mark.parametrize("arch,tied", [("llama", True), ("qwen2", False)])
def test_training_changes_only_lora_and_new_rows(tmp_path, arch, tied):
    from guidedecode.training.planner import PlannerConfig, load_planner, train_planner

    data = _write_data(tmp_path / "data.json")
    config = PlannerConfig(data=str(data), n_prefix=2, n_special=2, epochs=2, batch_size=2, grad_accum=1,
                           lr=5e-2, lora_r=4, lora_alpha=8, save_every=3)
    metrics = train_planner(config, tmp_path / "run", loader=_loader(arch, tied))
    assert metrics["train_examples"] == 11 - 0 and metrics["dev_examples"] == 1
    assert metrics["train_step_types"] == {"memory": 11, "reason": 11}
    base, tokenizer = _loader(arch, tied)("x")
    base_state = {k: v.clone() for k, v in base.state_dict().items()}
    vocab = PlanningVocab.from_pretrained(tmp_path / "run" / "merged")
    merged, merged_tok, _ = load_planner(tmp_path / "run")
    assert len(merged_tok) == len(tokenizer) + len(vocab.new_ids)
    lora_targets = ("gate_proj", "up_proj", "down_proj")
    new = torch.tensor(vocab.new_ids)
    old = torch.ones(base.get_input_embeddings().weight.shape[0], dtype=torch.bool)
    old[new] = False
    changed_new_rows = False
    for name, tensor in merged.state_dict().items():
        before = base_state[name]
        if any(t in name for t in lora_targets):
            assert not torch.equal(tensor, before), f"{name}: LoRA merged no change"
        elif name.endswith(("embed_tokens.weight", "lm_head.weight")):
            assert torch.equal(tensor[old], before[old]), f"{name}: an old or padding row changed"
            changed_new_rows |= not torch.allclose(tensor[new], before[new])
        else:
            assert torch.equal(tensor, before), f"{name} changed"
    assert changed_new_rows
    assert (merged.get_output_embeddings().weight is merged.get_input_embeddings().weight) == tied
    # the merged export equals the adapter model
    from peft import PeftModel

    base2, _ = _loader(arch, tied)("x")
    peft_model = PeftModel.from_pretrained(base2, tmp_path / "run" / "adapter").eval()
    ids = merged_tok(prompt_text("Is 3 even?", vocab) + vocab.block_text("memory") + " yes",
                     return_tensors="pt", add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        a, b = peft_model(input_ids=ids).logits, merged(input_ids=ids).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    from transformers import AutoModelForCausalLM

    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "merged", local_files_only=True)
    assert torch.allclose(plain(input_ids=ids).logits, b, atol=1e-5)


@pytest.mark.slow
def test_planner_resume_is_bit_identical(tmp_path):
    from guidedecode.training.common import trainable_state
    from guidedecode.training.planner import PlannerConfig, train_planner

    data = _write_data(tmp_path / "data.json", n=8)
    config = PlannerConfig(data=str(data), n_prefix=1, n_special=1, epochs=2, batch_size=2, grad_accum=1,
                           lr=1e-2, lora_r=2, save_every=2)
    train_planner(config, tmp_path / "a", loader=_loader("llama", False))

    class Kill(Exception):
        pass

    def kill(step):
        if step == 5:
            raise Kill

    with pytest.raises(Kill):
        train_planner(config, tmp_path / "b", loader=_loader("llama", False), on_step=kill)
    # a checkpoint of the interrupted run exports like a finished run
    from guidedecode.training.planner import export_checkpoint, load_planner

    exported = export_checkpoint(tmp_path / "b", 4, tmp_path / "exported", loader=_loader("llama", False))
    assert exported["global_step"] == 4
    model, tokenizer, vocab = load_planner(tmp_path / "exported")
    assert vocab.n_prefix == 1 and len(tokenizer) == vocab.new_ids[-1] + 1
    with pytest.raises(TrainingError, match="checkpoint-0000003 not found"):
        export_checkpoint(tmp_path / "b", 3, tmp_path / "x", loader=_loader("llama", False))
    train_planner(config, tmp_path / "b", loader=_loader("llama", False))
    from safetensors.torch import load_file

    a = load_file(str(tmp_path / "a" / "train" / "selected.safetensors"))
    b = load_file(str(tmp_path / "b" / "train" / "selected.safetensors"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert (tmp_path / "a" / "merged" / "planning_tokens.json").is_file()
    with pytest.raises(TrainingError, match="other settings"):
        train_planner(PlannerConfig(**{**config.__dict__, "lr": 0.5}), tmp_path / "a",
                      loader=_loader("llama", False))
    assert trainable_state  # imported for readers: the trainer saves exactly these tensors


def test_planner_bad_input(tmp_path):
    from guidedecode.training.planner import PlannerConfig, train_planner

    with pytest.raises(TrainingError, match="unknown scheme 'vae'"):
        train_planner(PlannerConfig(scheme="vae"), tmp_path)
    with pytest.raises(TrainingError, match="n_prefix and n_special must be >= 0"):
        train_planner(PlannerConfig(n_prefix=-1), tmp_path)
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps([{"question": "q", "answer": "True", "cot_steps": ["no label here"]}] * 3))
    with pytest.raises(PlanningTokenError, match="step without a \\[rag\\]/\\[reason\\] label"):
        train_planner(PlannerConfig(data=str(bad)), tmp_path / "r", loader=_loader("llama", False))


def test_registry_builds_the_guide(tmp_path, base_tokenizer):
    from guidedecode.registry import build_guide

    tokenizer = copy.deepcopy(base_tokenizer)
    vocab = add_planning_tokens(tiny_model("llama", vocab_size=len(tokenizer)), tokenizer, ["memory", "reason"])
    vocab.save_pretrained(tmp_path / "merged")
    guide = build_guide("planning", tokenizer, {"planner": str(tmp_path), "ban_types": "memory", "max_steps": "3"})
    assert isinstance(guide, PlanningTokenGuide) and guide.ban_types == ("memory",) and guide.max_steps == 3
    with pytest.raises(GuideError, match="unknown step type 'rag'"):
        build_guide("planning", tokenizer, {"planner": str(tmp_path), "force_type": "rag"})
    with pytest.raises(PlanningTokenError, match="not a planner directory"):
        build_guide("planning", tokenizer, {"planner": str(tmp_path / "nowhere")})


@pytest.mark.slow
@pytest.mark.parametrize("scheme", ["kmeans", "sqvae", "arith", "tfidf"])
def test_train_planner_other_schemes(tmp_path, scheme):
    from guidedecode.training.planner import PlannerConfig, train_planner

    if scheme in ("kmeans", "sqvae", "tfidf"):
        data = _write_data(tmp_path / "data.json", n=8)
    else:
        data = tmp_path / "gsm.jsonl"
        data.write_text("".join(json.dumps({"question": f"What is {i} + 2 * 3?",
                                            "answer": f"2 * 3 = <<2*3=6>>6\n{i} + 6 = <<{i}+6={i + 6}>>{i + 6}\n"
                                                      f"#### {i + 6}"}) + "\n" for i in range(8)))
    config = PlannerConfig(data=str(data), scheme=scheme, k=2, n_prefix=1, n_special=1, max_steps=1, batch_size=2,
                           grad_accum=1, lora_r=2)
    metrics = train_planner(config, tmp_path / "run", loader=_loader("llama", False))
    vocab = PlanningVocab.from_pretrained(tmp_path / "run" / "merged")
    if scheme in ("kmeans", "sqvae"):
        assert vocab.types == {"kmeans": ("kmeans0", "kmeans1"), "sqvae": ("vae0", "vae1")}[scheme]
        assert sum(metrics["train_step_types"].values()) == 2 * metrics["train_examples"]
    elif scheme == "tfidf":
        assert len(vocab.types) == 2 and all(t.isalpha() for t in vocab.types)  # keywords of the steps
        assert set(metrics["train_step_types"]) <= set(vocab.types) | {"assignment"}
    else:
        assert vocab.types == ("add", "sub", "mul", "div")
        assert metrics["train_step_types"] == {"mul": metrics["train_examples"], "add": metrics["train_examples"]}
    assert metrics["global_step"] == 1 and metrics["new_tokens"] == len(vocab.new_ids)


@given(seed=st.integers(0, 2**31 - 1), rules=st.sampled_from(STEERING))
@settings(max_examples=60, deadline=None)
def test_guide_changes_nothing_the_grammar_allows(seed, rules):
    """Allowed tokens keep their exact scores, so where the model's own greedy choice fits the
    grammar and the rules, guided greedy decoding picks the same token."""
    guide = PlanningTokenGuide(VOCAB, **rules)
    generator = torch.Generator().manual_seed(seed)
    ids = torch.tensor([[5, 6] + VOCAB.ids("prefix")])
    for _ in range(30):
        scores = torch.randn(1, 520, generator=generator) * 3
        scores[0, VOCAB.new_ids] += 6 * torch.rand(1, generator=generator).item()
        raw = scores.clone()
        out = guide(ids, scores)
        finite = torch.isfinite(out[0])
        assert torch.equal(out[0][finite], raw[0][finite])
        if finite[raw[0].argmax()]:
            assert out[0].argmax() == raw[0].argmax()
        ids = torch.cat([ids, out.argmax(-1, keepdim=True)], dim=1)


def test_bad_vocab_and_guide_options_are_named(base_tokenizer):
    tokenizer = copy.deepcopy(base_tokenizer)
    model = tiny_model("llama", vocab_size=len(tokenizer))
    for types, options, message in (
            (["memory"], {"noise": float("nan")}, "noise must be a finite number"),
            (["memory"], {"noise": -1.0}, "noise must be >= 0"),
            ("memory", {}, "types must be a list of step-type names"),
            (None, {}, "types must be a list of step-type names"),
            (["memory"], {"init_text": {"memory": 5}}, r"init_text\['memory'\] must be a string"),
            (["memory"], {"init_text": "memory"}, "init_text must be a mapping"),
            (["memory"], {"n_prefix": 10**5}, "n_prefix must be <= 1000"),
            (["memory"], {"n_special": True}, "n_special must be an integer")):
        with pytest.raises(PlanningTokenError, match=message):
            add_planning_tokens(model, tokenizer, types, **options)
    assert len(tokenizer) == len(base_tokenizer) and not torch.isnan(model.get_input_embeddings().weight).any()
    with pytest.raises(PlanningTokenError, match="base_vocab_size must be an integer"):
        PlanningVocab(("memory",), 1, 1, "x")
    with pytest.raises(PlanningTokenError, match="base_vocab_size must be >= 0"):
        PlanningVocab(("memory",), 1, 1, -5)
    with pytest.raises(PlanningTokenError, match="types must be a list"):
        PlanningVocab("memory", 1, 1, 10)
    for options, message in (({"max_steps": float("nan")}, "max_steps must be an integer"),
                             ({"max_steps": 2.5}, "max_steps must be an integer"),
                             ({"max_steps": "3"}, "max_steps must be an integer"),
                             ({"before": [("memory",)]}, r"before must be a list of \(earlier type, later type\) pairs"),
                             ({"before": "memory"}, "before must be a list"),
                             ({"ban_types": "memory"}, "ban_types must be a list of type names"),
                             ({"multi_type": 7}, "multi_type must be True/False")):
        with pytest.raises(GuideError, match=message):
            PlanningTokenGuide(VOCAB, **options)
    assert PlanningTokenGuide(VOCAB, max_steps=2, multi_type=1, before=[["memory", "reason"]]).before == (
        ("memory", "reason"),)


def test_add_planning_tokens_needs_a_model_and_a_tokenizer(base_tokenizer):
    model = tiny_model("llama", vocab_size=len(base_tokenizer))
    with pytest.raises(PlanningTokenError, match="transformers model"):
        add_planning_tokens(None, base_tokenizer, ["memory"])
    with pytest.raises(PlanningTokenError, match="transformers tokenizer"):
        add_planning_tokens(model, None, ["memory"])
