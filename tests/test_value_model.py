"""ValueModel against brute-force full forwards on tiny real architectures."""

import json

import pytest
import torch

from guidedecode.errors import GuideError, ModelLoadError
from guidedecode.backends.hf import left_pad as pad_rows
from guidedecode.testing import brute_value, random_value_model, tiny_model, tiny_tokenizer
from guidedecode.value_model import ValueModel, ValueModelConfig, tokenizer_fingerprint

PAD = 1
TOK = tiny_tokenizer()  # the tokenizer every tiny 512-token model pairs with


def left_pad(prompts):
    return pad_rows(prompts, PAD)


def cache_snapshot(cache):
    return [(layer.keys.clone(), layer.values.clone()) for layer in cache.layers]


CASES = [("llama", "v", "bce", None), ("llama", "q", "bce", None), ("gpt2", "v", "mse", None),
         ("gpt2", "q", "mle", 5), ("qwen2", "v", "mle", 3), ("mistral", "v", "bce", None)]


@pytest.mark.parametrize("arch,head,loss,atoms", CASES)
def test_incremental_candidate_logits_equal_full_recompute(arch, head, loss, atoms):
    """Left-padded rows, one finishing early: every step's candidate logits equal a cache-free forward of
    prefix + candidate, and the candidate pass leaves the cache exactly as it was (length and contents)."""
    vm = random_value_model(arch, head, loss, atoms)
    prompts = [[5, 9, 33, 2, 8], [40, 3], [11, 12, 13]]
    ids, mask = left_pad(prompts)
    state = vm.start(ids, mask)
    histories = [list(p) for p in prompts]
    alive = torch.tensor([True, True, True])
    gen = torch.Generator().manual_seed(0)
    for step in range(4):
        cands = torch.randint(2, 512, (3, 7), generator=gen)
        before = cache_snapshot(state.cache)
        z = vm.candidate_logits(state, cands)
        assert z.shape == (3, 7, vm.config.num_atoms) and z.dtype == torch.float32
        after = cache_snapshot(state.cache)
        assert state.cache.get_seq_length() == state.length == ids.shape[1] + step
        assert len(before) == len(after)
        for (k0, v0), (k1, v1) in zip(before, after):
            assert torch.equal(k0, k1) and torch.equal(v0, v1)
        for row in range(3):
            if alive[row]:
                expected = brute_value(vm, histories[row], cands[row].tolist())
                torch.testing.assert_close(z[row], expected, atol=1e-5, rtol=1e-5)
        tokens = torch.randint(2, 512, (3,), generator=gen)
        if step == 1:
            alive = torch.tensor([True, False, True])  # row 1 finished: its next tokens are padding
        tokens = torch.where(alive, tokens, torch.tensor(PAD))
        vm.advance(state, tokens, alive)
        for row in range(3):
            if alive[row]:
                histories[row].append(int(tokens[row]))


@pytest.mark.parametrize("arch,head,loss,atoms", CASES[:5])
def test_token_logits_equal_candidate_logits(arch, head, loss, atoms):
    """Training path (one forward over left-padded sequences) = inference path (cache + candidates)."""
    vm = random_value_model(arch, head, loss, atoms, seed=9)
    ids, mask = left_pad([[5, 9, 33, 2, 8, 17], [40, 3, 77], [11, 12, 13, 14]])
    with torch.no_grad():
        train = vm.token_logits(ids, mask)
    assert train.shape == (3, ids.shape[1], vm.config.num_atoms)
    if head == "q":
        assert torch.equal(train[:, 0], torch.zeros_like(train[:, 0]))
    for t in range(1, ids.shape[1]):
        rows = (mask[:, :t].sum(-1) > 0) & (mask[:, t] == 1)
        if not rows.any():
            continue
        state = vm.start(ids[rows, :t], mask[rows, :t])
        infer = vm.candidate_logits(state, ids[rows, t:t + 1])[:, 0]
        torch.testing.assert_close(train[rows, t], infer, atol=1e-5, rtol=1e-5)


def test_select_duplicates_rows():
    vm = random_value_model("llama", "v")
    ids, mask = left_pad([[5, 9, 33], [40, 3]])
    state = vm.start(ids, mask)
    state = vm.select(state, torch.tensor([1, 1, 0]))
    vm.advance(state, torch.tensor([7, 8, 9]))
    cands = [[4, 5], [4, 5], [6, 2]]
    z = vm.candidate_logits(state, torch.tensor(cands))
    for row, prefix in enumerate([[40, 3, 7], [40, 3, 8], [5, 9, 33, 9]]):
        torch.testing.assert_close(z[row], brute_value(vm, prefix, cands[row]), atol=1e-5, rtol=1e-5)


def test_q_head_reuse_init_reproduces_the_lm_head():
    """init='reuse': Q(prefix, v) = the reference model's logit of v after the prefix (each atom)."""
    ref = tiny_model("llama", seed=3)
    vm = ValueModel.from_backbone(ref, head="q", loss="mle", num_atoms=3, init="reuse", tokenizer=TOK)
    ids = torch.tensor([[5, 9, 33, 2, 8]])
    with torch.no_grad():
        logits = ref(ids).logits[0]
        train = vm.token_logits(ids)[0]
    expected = logits[:-1].gather(1, ids[0, 1:, None])  # logit of token t at position t-1
    torch.testing.assert_close(train[1:], expected.expand(-1, 3), atol=1e-5, rtol=1e-5)
    # the value model owns a copy: training it leaves the reference model alone
    with torch.no_grad():
        vm.backbone.get_input_embeddings().weight.zero_()
    assert ref.get_input_embeddings().weight.abs().sum() > 0


@pytest.mark.parametrize("arch,head,loss,atoms", [("llama", "v", "bce", None), ("gpt2", "q", "mle", 5)])
def test_save_load_round_trip(tmp_path, arch, head, loss, atoms):
    vm = random_value_model(arch, head, loss, atoms)
    vm.save_pretrained(tmp_path / "vm")
    assert sorted(p.name for p in (tmp_path / "vm").iterdir()) == ["config.json", "model.safetensors"]
    loaded = ValueModel.from_pretrained(tmp_path / "vm")
    assert loaded.config == vm.config
    assert json.loads((tmp_path / "vm" / "config.json").read_text())["eta_convention"] == "eta = 1/eta_paper"
    ids, mask = left_pad([[5, 9, 33, 2], [40, 3]])
    with torch.no_grad():
        assert torch.equal(loaded.token_logits(ids, mask), vm.token_logits(ids, mask))
    cands = torch.tensor([[3, 4, 5], [6, 7, 8]])
    assert torch.equal(loaded.candidate_logits(loaded.start(ids, mask), cands),
                       vm.candidate_logits(vm.start(ids, mask), cands))


def test_corrupt_checkpoints_give_clear_errors(tmp_path):
    vm = random_value_model("llama", "v")
    with pytest.raises(ModelLoadError, match="missing config.json"):
        ValueModel.from_pretrained(tmp_path / "nothing")
    good = tmp_path / "good"
    vm.save_pretrained(good)

    bad_json = tmp_path / "bad_json"
    vm.save_pretrained(bad_json)
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="not valid JSON"):
        ValueModel.from_pretrained(bad_json)

    truncated = tmp_path / "truncated"
    vm.save_pretrained(truncated)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        ValueModel.from_pretrained(truncated)

    mismatch = tmp_path / "mismatch"
    vm.save_pretrained(mismatch)
    raw = json.loads((mismatch / "config.json").read_text())
    raw.update(loss="mle", num_atoms=4)  # head of 4 outputs, weights hold 1
    (mismatch / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="do not match"):
        ValueModel.from_pretrained(mismatch)

    unknown = tmp_path / "unknown"
    vm.save_pretrained(unknown)
    raw = json.loads((unknown / "config.json").read_text())
    raw["scale_reward"] = 2.0
    (unknown / "config.json").write_text(json.dumps(raw))
    with pytest.raises(ModelLoadError, match="unknown entries"):
        ValueModel.from_pretrained(unknown)

    missing_weights = tmp_path / "missing_weights"
    vm.save_pretrained(missing_weights)
    (missing_weights / "model.safetensors").unlink()
    with pytest.raises(ModelLoadError, match="missing model.safetensors"):
        ValueModel.from_pretrained(missing_weights)


def word_tokenizer(words):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def test_tokenizer_with_same_length_but_different_mapping_is_refused(tmp_path):
    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(509)]
    swapped = list(words)
    swapped[10], swapped[11] = swapped[11], swapped[10]
    tok_a, tok_b = word_tokenizer(words), word_tokenizer(swapped)
    assert len(tok_a) == len(tok_b) == 512
    assert tokenizer_fingerprint(tok_a) != tokenizer_fingerprint(tok_b)
    assert tokenizer_fingerprint(tok_a) == tokenizer_fingerprint(word_tokenizer(words))
    vm = ValueModel.from_backbone(tiny_model("llama", seed=1), tokenizer=tok_a)
    vm.check_tokenizer(tok_a)
    with pytest.raises(GuideError, match="tokenizer mismatch"):
        vm.check_tokenizer(tok_b)
    from guidedecode.guides.qsharp import QSharpGuide

    with pytest.raises(GuideError, match="tokenizer mismatch"):
        QSharpGuide(vm, tokenizer=tok_b)
    assert QSharpGuide(vm, tokenizer=tok_a).pad_token_id == tok_a.pad_token_id == 1
    vm.save_pretrained(tmp_path / "vm")  # the fingerprint survives the round trip
    with pytest.raises(GuideError, match="tokenizer mismatch"):
        ValueModel.from_pretrained(tmp_path / "vm").check_tokenizer(tok_b)
    big = word_tokenizer(words + ["extra"])
    with pytest.raises(GuideError, match="513 tokens"):
        vm.check_tokenizer(big)


def test_bad_configurations_are_refused():
    model = tiny_model("llama", seed=1)
    with pytest.raises(GuideError, match="unknown value head"):
        ValueModel.from_backbone(model, head="x", tokenizer=TOK)
    with pytest.raises(GuideError, match="unknown value loss"):
        ValueModel.from_backbone(model, loss="hinge", tokenizer=TOK)
    with pytest.raises(GuideError, match="num_atoms must be 1"):
        ValueModel.from_backbone(model, loss="bce", num_atoms=3, tokenizer=TOK)
    with pytest.raises(GuideError, match="needs num_atoms >= 2"):
        ValueModel.from_backbone(model, loss="mle", num_atoms=1, tokenizer=TOK)
    with pytest.raises(GuideError, match="V head takes"):
        ValueModel.from_backbone(model, head="v", init="reuse", tokenizer=TOK)
    with pytest.raises(GuideError, match="bare base model"):
        ValueModel.from_backbone(model.model, head="q", init="reuse", tokenizer=TOK)
    with pytest.raises(GuideError, match="unknown head init"):
        ValueModel.from_backbone(model, init="xavier", tokenizer=TOK)
    with pytest.raises(GuideError, match="v_max must exceed"):
        ValueModelConfig(loss="mle", num_atoms=3, v_min=1.0, v_max=1.0, vocab_size=8).validate()
    vm = ValueModel.from_backbone(model.model, head="q", tokenizer=TOK)  # a bare LlamaModel works as a backbone
    assert vm.head.weight.shape == (512, 64) and vm.head.weight.abs().sum() == 0
    assert ValueModel.from_backbone(model, loss="mle", tokenizer=TOK).config.num_atoms == 11


@pytest.mark.parametrize("arch", ["llama", "qwen2", "gpt2"])
def test_truncated_backbone_equals_the_first_layers_of_the_full_model(tmp_path, arch):
    layers = {"n_layer": 3} if arch == "gpt2" else {"num_hidden_layers": 3}
    model = tiny_model(arch, seed=5, **layers)
    vm = ValueModel.from_backbone(model, head="v", init="normal", num_layers=2, tokenizer=TOK)
    ids = torch.randint(2, 500, (2, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        base = model.base_model
        states = base(input_ids=ids, attention_mask=mask, position_ids=positions, output_hidden_states=True).hidden_states
        final_norm = base.ln_f if arch == "gpt2" else base.norm
        expected = final_norm(states[2]) @ vm.head.weight.T  # after 2 of 3 layers, then the final norm
        got = vm.token_logits(ids, mask)
    assert torch.allclose(got[mask.bool()], expected[mask.bool()], atol=1e-5)
    assert len(list(model.base_model.parameters())) > len(list(vm.backbone.parameters()))  # the reference is intact
    vm.save_pretrained(tmp_path / "vm")
    loaded = ValueModel.from_pretrained(tmp_path / "vm")
    with torch.no_grad():
        assert torch.equal(loaded.token_logits(ids, mask), got)
    with pytest.raises(GuideError, match="num_layers"):
        ValueModel.from_backbone(model, num_layers=4, tokenizer=TOK)


def test_freeze_backbone_trains_only_the_head_and_top_layers():
    model = tiny_model("llama", seed=2, num_hidden_layers=3)
    vm = ValueModel.from_backbone(model, head="v", init="normal", tokenizer=TOK)
    before = {name: p.detach().clone() for name, p in vm.named_parameters()}
    trainable = vm.freeze_backbone(1)
    optimizer = torch.optim.SGD(trainable, lr=0.1)
    ids = torch.randint(2, 500, (2, 6), generator=torch.Generator().manual_seed(1))
    vm.token_logits(ids).sum().backward()
    optimizer.step()
    changed = {name for name, p in vm.named_parameters() if not torch.equal(p, before[name])}
    assert changed and all(name.startswith(("head", "backbone.layers.2.", "backbone.norm")) for name in changed)
    assert "head.weight" in changed and any(name.startswith("backbone.layers.2.") for name in changed)
    assert vm.freeze_backbone(0) == [vm.head.weight]
    assert len(vm.freeze_backbone(None)) == len(list(vm.parameters()))
    with pytest.raises(GuideError, match="trainable_layers"):
        vm.freeze_backbone(4)


def test_from_backbone_takes_the_saved_tokenizer_or_requires_one(tmp_path):
    """Without tokenizer= the fingerprint comes from the tokenizer saved with the backbone; a backbone with
    none is refused (before: an empty fingerprint, so a permuted tokenizer was accepted later)."""
    words = ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, 512)]
    permuted = words[:3] + words[4:5] + words[3:4] + words[5:]
    model = tiny_model("llama", seed=1)
    with pytest.raises(GuideError, match="needs tokenizer="):
        ValueModel.from_backbone(model)
    model.save_pretrained(tmp_path / "ref")
    tiny_tokenizer(words=words).save_pretrained(tmp_path / "ref")
    from guidedecode.models import load_model

    saved, tokenizer = load_model(tmp_path / "ref")
    vm = ValueModel.from_backbone(saved)  # no tokenizer=: the one in the model's directory
    assert vm.config.tokenizer_fingerprint == tokenizer_fingerprint(tokenizer) != ""
    vm.check_tokenizer(tiny_tokenizer(words=words))
    with pytest.raises(GuideError, match="tokenizer mismatch"):
        vm.check_tokenizer(tiny_tokenizer(words=permuted))


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_value_model_passes_the_cache_under_the_supported_name(arch):
    """transformers 5.24 deprecates forward(past_key_values=...) for cache= (removal announced for 5.40):
    every backbone forward of the inference path uses the name the installed forward declares."""
    import inspect

    vm = random_value_model(arch, "v")
    declared = inspect.signature(vm.backbone.forward).parameters
    expected = "cache" if "cache" in declared else "past_key_values"
    seen = []
    vm.backbone.register_forward_pre_hook(lambda module, args, kwargs: seen.append(set(kwargs)), with_kwargs=True)
    ids, mask = left_pad([[5, 9, 33], [40, 3]])
    state = vm.start(ids, mask)
    vm.advance(state, torch.tensor([7, 8]))
    vm.candidate_logits(state, torch.tensor([[3, 4], [5, 6]]))
    assert len(seen) == 3 and all(expected in keys for keys in seen)
    if expected == "cache":
        assert not any("past_key_values" in keys for keys in seen)


def test_installed_transformers_is_inside_the_pinned_range():
    """pyproject pins the transformers releases the suite was run with; the installed one must be among them."""
    import tomllib
    from pathlib import Path

    import transformers
    from packaging.requirements import Requirement

    pyproject = tomllib.loads((Path(__file__).resolve().parents[1] / "pyproject.toml").read_text())
    (pin,) = [Requirement(r) for r in pyproject["project"]["dependencies"] if Requirement(r).name == "transformers"]
    assert pin.specifier.contains(transformers.__version__), (pin, transformers.__version__)
    assert not pin.specifier.contains("5.40.0")  # the release that removes what 5.24 deprecates
