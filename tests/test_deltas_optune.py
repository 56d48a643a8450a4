"""OpTune editor: captured factors vs autograd, identity at init, statistics, save/load, bad input."""

import copy

import pytest
import torch

from guidedecode.deltas import DeltaError, DeltaInjector
from guidedecode.deltas.optune import OpTuneEditor, RunningStats, sequence_nll
from guidedecode.testing import tiny_model


def _padded(seed=0, lengths=(12, 7)):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), 1)
    mask = torch.zeros((len(lengths), width), dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, width - n:] = torch.randint(2, 512, (n,), generator=g)
        mask[i, width - n:] = 1
    return ids, mask


def _autograd_grads(model, ids, mask, names):
    model.zero_grad(set_to_none=True)
    loss = sequence_nll(model(input_ids=ids, attention_mask=mask).logits, ids, mask).sum()
    loss.backward()
    modules = dict(model.named_modules())
    grads = {n: modules[n].weight.grad.clone() for n in names}
    model.zero_grad(set_to_none=True)
    return grads


@pytest.mark.parametrize("arch", ["llama", "qwen2"])
def test_captured_factors_reproduce_autograd_and_init_edit_is_eta_times_gradient(arch):
    model = tiny_model(arch, seed=1, num_hidden_layers=3)
    editor = OpTuneEditor.for_model(model).eval()
    names = list(editor.config.targets)
    assert names == [f"model.layers.{i}.self_attn.{p}_proj" for i in (1, 2) for p in ("q", "v")]
    ids, mask = _padded()
    captured = editor.capture(model, ids, mask)
    assert all(p.grad is None for p in model.parameters())  # no base parameter got a gradient
    assert all(p.requires_grad for p in model.parameters())  # and their flags are restored
    edits = editor.deltas_from(captured)
    for row in range(2):  # per sample: equals that sample's own batch-1 gradient
        keep = mask[row].bool()
        one_ids = ids[row][keep][None]
        grads = _autograd_grads(model, one_ids, torch.ones_like(one_ids), names)
        for name in names:
            x, delta = captured.tokens(name, row)
            assert x.shape[0] == int(keep.sum())
            assert (delta.T @ x - grads[name]).abs().max() <= 1e-5 * max(1.0, grads[name].abs().max().item())
            edit = edits[row][name]
            assert edit.rank == x.shape[0]  # factored: rank = tokens
            expected = editor.config.eta_init * grads[name]
            assert (edit.dense() - expected).abs().max() <= 1e-5 * expected.abs().max() + 1e-12
    # the batch gradient is the sum of the per-sample ones
    full = _autograd_grads(model, ids, mask, names)
    for name in names:
        assert (captured.weight_gradient(name) - full[name]).abs().max() <= 1e-5 * max(1.0, full[name].abs().max())


def test_edit_changes_the_model_and_lower_layers_are_untouched():
    model = tiny_model("llama", seed=2, num_hidden_layers=3)
    editor = OpTuneEditor.for_model(model, eta_init=1.0).eval()
    ids, mask = _padded(seed=1, lengths=(9,))
    (edit,) = editor.edit(model, ids, mask)
    with torch.no_grad():
        base_out = model(input_ids=ids, output_hidden_states=True)
        with DeltaInjector(model, edit):
            out = model(input_ids=ids, output_hidden_states=True)
    assert torch.equal(out.hidden_states[1], base_out.hidden_states[1])  # below the first edited layer
    assert not torch.equal(out.logits, base_out.logits)
    # a gradient step "along +grad" of the NLL raises the NLL of the edit sequence (small step)
    small = OpTuneEditor.for_model(model, eta_init=1e-2).eval()
    (edit,) = small.edit(model, ids, mask)
    with torch.no_grad():
        before = sequence_nll(base_out.logits, ids, mask)
        with DeltaInjector(model, edit):
            after = sequence_nll(model(input_ids=ids).logits, ids, mask)
    assert after > before


def test_running_statistics_equal_batch_mean_and_std():
    g = torch.Generator().manual_seed(0)
    data = torch.randn(50, 6, generator=g) * 3 + 1
    stats = RunningStats(6)
    for chunk in (data[:7], data[7:8], data[8:31], data[31:]):
        stats.update(chunk)
    assert torch.allclose(stats.mean, data.mean(0), atol=1e-5)
    assert torch.allclose(stats.std, data.std(0), atol=1e-5)
    assert torch.allclose(stats.normalise(data), (data - data.mean(0)) / data.std(0), atol=1e-4)


def test_statistics_update_in_training_only_and_transform_is_identity_at_init():
    model = tiny_model("llama", seed=3)
    editor = OpTuneEditor.for_model(model, layers=[-1])
    ids, mask = _padded(seed=2)
    captured = editor.capture(model, ids, mask)
    editor.eval()
    editor.deltas_from(captured)
    assert all(t.stats_x.count == 0 for t in editor.transforms.values())
    editor.train()
    editor.deltas_from(captured)
    assert all(t.stats_x.count == int(mask.sum()) for t in editor.transforms.values())
    editor.eval()
    name = next(iter(editor.config.targets))
    transform = editor.transforms["x".join(map(str, editor.config.targets[name]))]
    x, delta = captured.tokens(name, 0)
    x_t, d_t = transform(x, delta)
    assert torch.allclose(x_t, transform.stats_x.normalise(x)) and torch.allclose(d_t, transform.stats_delta.normalise(delta))


def test_save_load_roundtrip_and_wrong_model(tmp_path):
    model = tiny_model("llama", seed=4)
    editor = OpTuneEditor.for_model(model)
    with torch.no_grad():
        for p in editor.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    editor.save_pretrained(tmp_path / "ed")
    loaded = OpTuneEditor.from_pretrained(tmp_path / "ed", model)
    for (k, a), (_, b) in zip(editor.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), k
    other = tiny_model("llama", seed=4, hidden_size=96, num_attention_heads=4)
    with pytest.raises(DeltaError, match="made for another model"):
        OpTuneEditor.from_pretrained(tmp_path / "ed", other)
    with pytest.raises(DeltaError, match="made for another model"):
        loaded.capture(other, torch.ones(1, 4, dtype=torch.long))
    with pytest.raises(DeltaError, match="not a saved OpTune editor"):
        OpTuneEditor.from_pretrained(tmp_path / "nothing")


def test_default_config_for_llama_8b_is_under_2mb(tmp_path):
    """The paper's setting: q/v of layers 30, 31 of Llama-3.1-8B (built on the meta device: shapes only)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    config = LlamaConfig(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                         num_key_value_heads=8, vocab_size=128256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    editor = OpTuneEditor.for_model(model)
    assert list(editor.config.targets) == [f"model.layers.{i}.self_attn.{p}_proj" for i in (30, 31) for p in "qv"]
    assert sum(p.numel() for p in editor.parameters()) == 270_336 + 168_960 + 4  # spec: about 0.44M
    editor.save_pretrained(tmp_path)
    size = sum(f.stat().st_size for f in tmp_path.iterdir())
    assert size < 2 * 1024 * 1024, size


def test_nan_gradient_is_a_clear_error():
    model = copy.deepcopy(tiny_model("llama", seed=5))
    editor = OpTuneEditor.for_model(model)
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[0, 0] = float("nan")
    with pytest.raises(DeltaError, match="non-finite"):
        editor.capture(model, torch.randint(2, 512, (1, 6)))
    with pytest.raises(DeltaError, match="at least two tokens"):
        editor.capture(tiny_model("llama", seed=5), torch.ones(1, 1, dtype=torch.long))


def test_edit_sequence_has_one_bos_and_matches_the_rendered_chat():
    from guidedecode.models import load_tokenizer

    tokenizer = load_tokenizer("smollm2-135m-instruct")
    model = tiny_model("llama", seed=0, vocab_size=len(tokenizer))
    editor = OpTuneEditor.for_model(model)
    ids = editor.edit_sequence(tokenizer, "What is 2 + 3?", "2 + 3 = 6. The answer is 6.")
    text = tokenizer.decode(ids)
    assert text.count("Your answer is incorrect.") == 1 and text.index("The answer is 6") < text.index("incorrect")
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "What is 2 + 3?"}, {"role": "assistant", "content": "2 + 3 = 6. The answer is 6."},
         {"role": "user", "content": "Your answer is incorrect."}], tokenize=False)
    assert ids == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    # no BOS beyond the ones the template writes (SmolLM2's BOS is its turn marker <|im_start|>: one per turn, system included)
    assert ids.count(tokenizer.bos_token_id) == rendered.count(tokenizer.bos_token) == 4
    assert ids[0] == tokenizer.bos_token_id


def test_bad_options_feedback_and_damaged_files_are_named(tmp_path):
    model = tiny_model("llama", seed=4)
    for options, message in (({"dropout": 1.5}, "dropout must be <= 1"), ({"eta_init": "x"}, "eta_init must be a number"),
                             ({"eta_init": float("nan")}, "eta_init must be a finite"),
                             ({"eta_init": float("inf")}, "eta_init must be a finite"),
                             ({"eta_init": 0.0}, "eta_init must be > 0"), ({"rank": 2.5}, "rank must be an integer"),
                             ({"feedback": " "}, "feedback must not be empty"), ({"bogus": 1}, "bogus")):
        with pytest.raises(DeltaError, match=message):
            OpTuneEditor.for_model(model, **options)
    editor = OpTuneEditor.for_model(model)

    class Tok:
        chat_template = "x"

        def apply_chat_template(self, messages, **kw):
            return messages[-1]["content"]

        def __call__(self, text, **kw):
            return {"input_ids": list(text.encode())}

    assert editor.edit_sequence(Tok(), "q", "a") == list(editor.config.feedback.encode())
    with pytest.raises(DeltaError, match="feedback must not be empty"):
        editor.edit_sequence(Tok(), "q", "a", "")
    editor.save_pretrained(tmp_path / "ed")
    weights = tmp_path / "ed" / "optune.safetensors"
    weights.write_bytes(b"xx")
    with pytest.raises(DeltaError, match="optune.safetensors is not a readable safetensors file"):
        OpTuneEditor.from_pretrained(tmp_path / "ed")
    with torch.no_grad():
        next(iter(editor.etas.values())).fill_(float("nan"))
    editor.save_pretrained(tmp_path / "ed")
    with pytest.raises(DeltaError, match="optune.safetensors holds non-finite values"):
        OpTuneEditor.from_pretrained(tmp_path / "ed")


def test_capture_refuses_float_or_out_of_vocabulary_ids():
    model = tiny_model("llama", seed=0, vocab_size=40)
    editor = OpTuneEditor.for_model(model, layers=[-1])
    with pytest.raises(DeltaError, match="integer tensor"):
        editor.edit(model, torch.ones(1, 4))
    with pytest.raises(DeltaError, match="outside the model's vocabulary"):
        editor.edit(model, torch.tensor([[1, 2, 40]]))
    with pytest.raises(DeltaError, match="nn.Module"):
        DeltaInjector(None)
