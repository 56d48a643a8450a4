"""LoRA export of an OpTune edit: the PEFT adapter loaded by peft reproduces the injector (full rank) and the
log-prob error shrinks with the rank."""

import copy
import json

import torch

from guidedecode.deltas import DeltaInjector, LowRankDelta, OpTuneEditor
from guidedecode.deltas.export import compress, export_lora
from guidedecode.testing import tiny_model


def _edit(model, tokens=20):
    editor = OpTuneEditor.for_model(model, eta_init=0.3).eval()
    ids = torch.randint(2, 512, (1, tokens), generator=torch.Generator().manual_seed(0))
    (edit,) = editor.edit(model, ids)
    return edit, ids


def test_compress_is_the_truncated_svd():
    g = torch.Generator().manual_seed(1)
    delta = LowRankDelta(torch.randn(9, 40, generator=g), torch.randn(30, 9, generator=g), -0.7)
    dense = delta.dense()
    assert (compress(delta, 9).dense() - dense).abs().max() <= 1e-4  # full rank: exact
    s = torch.linalg.svdvals(dense)
    for r in (1, 3, 6):
        err = torch.linalg.matrix_norm(compress(delta, r, niter=6).dense() - dense, ord=2)
        assert err <= s[r] * 1.01 + 1e-5  # Eckart-Young: the spectral error of the best rank-r approximation


def test_exported_lora_matches_the_injector_at_full_rank_and_error_falls_with_rank(tmp_path):
    from peft import PeftModel

    model = tiny_model("llama", seed=1, num_hidden_layers=3)
    edit, ids = _edit(model)
    with torch.no_grad(), DeltaInjector(model, edit):
        reference = torch.log_softmax(model(input_ids=ids).logits, -1)
    errors = {}
    for rank in (1, 4, 20):
        directory = export_lora(edit, tmp_path / f"r{rank}", rank)
        config = json.loads((directory / "adapter_config.json").read_text())
        assert config["r"] == config["lora_alpha"] == rank
        assert sorted(config["target_modules"]) == ["q_proj", "v_proj"] and config["layers_to_transform"] == [1, 2]
        peft_model = PeftModel.from_pretrained(copy.deepcopy(model), str(directory)).eval()
        with torch.no_grad():
            logprobs = torch.log_softmax(peft_model(input_ids=ids).logits, -1)
        errors[rank] = (logprobs - reference).abs().max().item()
    assert errors[20] <= 1e-4  # rank >= tokens: the edit itself
    assert errors[1] > errors[4] > errors[20]


def test_bad_export_input_is_named(tmp_path):
    import pytest

    from guidedecode.deltas import DeltaError

    g = torch.Generator().manual_seed(1)
    edit = {"model.layers.0.self_attn.q_proj": LowRankDelta(torch.randn(3, 64, generator=g),
                                                            torch.randn(64, 3, generator=g))}
    (tmp_path / "afile").write_text("x")
    for options, message in (({"rank": "4"}, "rank must be an integer"), ({"rank": 2.5}, "rank must be an integer"),
                             ({"rank": 2, "niter": -1}, "niter must be >= 0"),
                             ({"rank": 2, "directory": tmp_path / "afile"}, "is a file, not a directory")):
        with pytest.raises(DeltaError, match=message):
            export_lora(edit, options.pop("directory", tmp_path / "out"), **options)
    with pytest.raises(DeltaError, match="needs a mapping"):
        export_lora([edit], tmp_path / "out", 2)
    nan = {"model.layers.0.self_attn.q_proj": LowRankDelta(torch.full((3, 64), float("nan")), torch.ones(64, 3))}
    with pytest.raises(DeltaError, match="'model.layers.0.self_attn.q_proj'.*non-finite"):
        export_lora(nan, tmp_path / "out", 2)
    assert not (tmp_path / "out").exists()
