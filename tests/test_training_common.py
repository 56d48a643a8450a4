"""The shared trainer pieces: resumable collection, settings, dev split, the checkpointed loop."""

import json

import pytest
import torch

from guidedecode.errors import TrainingError
from guidedecode.testing import tiny_model
from guidedecode.training.common import (
    FitConfig,
    LMExample,
    check_settings,
    collate,
    collect_resumable,
    fit,
    masked_loss_sum,
    split_dev,
    trainable_state,
)


def _examples(n=10, seed=0):
    generator = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        length = 5 + i % 4
        ids = torch.randint(2, 500, (length,), generator=generator).tolist()
        out.append(LMExample(ids, [-100, -100] + ids[2:]))
    return out


def _lora_model():
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    model = tiny_model("llama", seed=1)
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["gate_proj"]))


class _Kill(Exception):
    pass


def _kill_at(step):
    def on_step(global_step):
        if global_step == step:
            raise _Kill

    return on_step


def test_fit_resumes_bit_identical_after_a_kill(tmp_path):
    examples = _examples()
    train, dev = split_dev(examples, 0.2, seed=0)
    config = FitConfig(epochs=3, batch_size=2, grad_accum=2, lr=1e-2, save_every=1)
    straight = _lora_model()
    result = fit(straight, train, dev, tmp_path / "a", config, pad_token_id=1)
    assert result.global_step == result.total_steps == 3 * 2
    assert [h["epoch"] for h in result.history] == [0, 1, 2]
    assert all(h["dev_loss"] is not None for h in result.history)

    # killed after step 3 (checkpoint 3 written), then again after step 5 with save_every=2: the
    # second resume starts from checkpoint 4 and redoes step 5
    killed = _lora_model()
    with pytest.raises(_Kill):
        fit(killed, train, dev, tmp_path / "b", config, pad_token_id=1, on_step=_kill_at(3))
    again = _lora_model()
    sparse = FitConfig(**{**config.__dict__, "save_every": 2})
    with pytest.raises(_Kill):
        fit(again, train, dev, tmp_path / "b", sparse, pad_token_id=1, on_step=_kill_at(5))
    resumed = _lora_model()
    result_b = fit(resumed, train, dev, tmp_path / "b", sparse, pad_token_id=1)
    assert result_b.history == result.history
    assert result_b.selected_epoch == result.selected_epoch
    a, b = trainable_state(straight), trainable_state(resumed)
    assert set(a) == set(b) and a
    for name in a:
        assert torch.equal(a[name], b[name]), name

    # a finished run reloads its selected weights
    fresh = _lora_model()
    again_result = fit(fresh, train, dev, tmp_path / "a", config, pad_token_id=1)
    assert again_result.resumed_finished
    for name, tensor in trainable_state(fresh).items():
        assert torch.equal(tensor, a[name])


def test_fit_selects_the_best_dev_epoch(tmp_path):
    examples = _examples(8)
    train, dev = split_dev(examples, 0.25, seed=1)
    model = _lora_model()
    # a huge learning rate makes later epochs worse on dev: the selected epoch is the best one
    result = fit(model, train, dev, tmp_path, FitConfig(epochs=3, batch_size=2, lr=0.5, schedule="constant"),
                 pad_token_id=1)
    losses = [h["dev_loss"] for h in result.history]
    assert result.selected_epoch == losses.index(min(losses))
    from guidedecode.training.common import held_out_loss

    now = held_out_loss(model, dev, batch_size=2, collate_fn=lambda b: collate(b, 1))
    assert now == pytest.approx(min(losses), rel=1e-5)


def test_fit_max_steps_and_refuses_other_settings(tmp_path):
    train, dev = split_dev(_examples(), 0.2, seed=0)
    model = _lora_model()
    result = fit(model, train, dev, tmp_path, FitConfig(epochs=5, batch_size=2, max_steps=3), pad_token_id=1)
    assert result.global_step == 3 and len(result.history) == 1 and result.history[0]["steps"] == 3
    with pytest.raises(TrainingError, match="other settings"):
        fit(_lora_model(), train, dev, tmp_path, FitConfig(epochs=5, batch_size=2, max_steps=4), pad_token_id=1)


def test_fit_bad_input(tmp_path):
    with pytest.raises(TrainingError, match="grad_accum"):
        FitConfig(grad_accum=0).validate()
    with pytest.raises(TrainingError, match="schedule"):
        FitConfig(schedule="wobbly").validate()
    with pytest.raises(TrainingError, match="no training examples"):
        fit(_lora_model(), [], [], tmp_path, FitConfig(), pad_token_id=1)
    frozen = tiny_model("llama").requires_grad_(False)
    with pytest.raises(TrainingError, match="no trainable parameters"):
        fit(frozen, _examples(2), [], tmp_path, FitConfig(), pad_token_id=1)
    with pytest.raises(TrainingError, match="no target tokens"):
        masked_loss_sum(frozen, collate([LMExample([3, 4], [-100, -100])], 1))


def test_collect_resumable_skips_done_chunks(tmp_path):
    calls = []

    def work(chunk, index):
        calls.append(index)
        return [{"id": str(x), "square": x * x, "chunk": index} for x in chunk]

    path = tmp_path / "data.jsonl"
    first = collect_resumable(list(range(5)), path, work, key=str, chunk_size=2)
    assert [r["square"] for r in first] == [0, 1, 4, 9, 16] and calls == [0, 1, 2]
    # a torn last line is dropped and that chunk recomputed; the others are read back
    text = path.read_text().splitlines(keepends=True)
    path.write_text("".join(text[:-1]) + text[-1][:5])
    calls.clear()
    second = collect_resumable(list(range(5)), path, work, key=str, chunk_size=2)
    assert second == first and calls == [2]
    with pytest.raises(TrainingError, match="expected"):
        collect_resumable([7], tmp_path / "x.jsonl", lambda c, i: [{"id": "wrong"}], key=str)


def test_check_settings_and_split_dev(tmp_path):
    path = tmp_path / "settings.json"
    check_settings(path, {"a": 1, "b": 2})
    check_settings(path, {"a": 5, "b": 2})  # nothing written beside it yet (a run stopped by a bad input): replaced
    (tmp_path / "records.jsonl").write_text("{}\n")  # the run has output now: it resumes only as itself
    check_settings(path, {"a": 5, "b": 3}, may_change=("b",))
    with pytest.raises(TrainingError, match=r"other settings \(a\)"):
        check_settings(path, {"a": 2, "b": 3})
    assert json.loads(path.read_text()) == {"a": 5, "b": 3}
    train, dev = split_dev(range(10), 0.1, seed=3)
    assert len(dev) == 1 and sorted(train + dev) == list(range(10))
    assert split_dev(range(10), 0.1, seed=3) == (train, dev)
    assert split_dev([1], 0.5, seed=0) == ([1], [])
    with pytest.raises(TrainingError, match="dev fraction"):
        split_dev([1, 2], 1.0, seed=0)


def test_collect_resumable_on_chunk_runs_after_the_chunk_is_on_disk_and_lost_records_are_refused(tmp_path,
                                                                                                  monkeypatch):
    from guidedecode.training import common

    path = tmp_path / "data.jsonl"
    on_disk = []
    collect_resumable(list(range(5)), path, lambda chunk, i: [{"id": str(x)} for x in chunk], key=str, chunk_size=2,
                      on_chunk=lambda index: on_disk.append((index, len(path.read_text().splitlines()))))
    assert on_disk == [(0, 2), (1, 4), (2, 5)]
    real_append = common.append_jsonl  # an append that loses records: the end-of-run check names the file
    monkeypatch.setattr(common, "append_jsonl", lambda p, records: real_append(p, records[:1]))
    with pytest.raises(TrainingError, match="lacks 2 of 4 expected records"):
        collect_resumable(list(range(4)), tmp_path / "lossy.jsonl", lambda chunk, i: [{"id": str(x)} for x in chunk],
                          key=str, chunk_size=2)


def test_fit_stop_after_steps_checkpoints_and_a_rerun_finishes_identically(tmp_path):
    train = _examples(8)
    config = FitConfig(epochs=1, batch_size=2, lr=1e-2, save_every=100, select="last")
    straight = _lora_model()
    fit(straight, train, [], tmp_path / "a", config, pad_token_id=1)
    stopped = _lora_model()
    assert fit(stopped, train, [], tmp_path / "b", config, pad_token_id=1, stop_after_steps=1) is None
    assert [p.name for p in (tmp_path / "b").glob("checkpoint-*")] == ["checkpoint-0000001"]
    steps = []
    resumed = _lora_model()
    result = fit(resumed, train, [], tmp_path / "b", config, pad_token_id=1, on_step=steps.append)
    assert steps == [2, 3, 4] and result.global_step == 4
    for name, tensor in trainable_state(straight).items():
        assert torch.equal(tensor, trainable_state(resumed)[name]), name


def test_fit_decay_1d_decays_norm_weights_and_is_listed_only_when_on(tmp_path):
    assert "decay_1d" not in FitConfig().settings()  # runs made before the option resume unchanged
    assert FitConfig(decay_1d=True).settings()["decay_1d"] is True
    norms = []
    for decay_1d in (False, True):
        model = tiny_model("llama", seed=1)
        config = FitConfig(batch_size=4, lr=1e-2, weight_decay=0.5, decay_1d=decay_1d, schedule="constant", warmup=0)
        fit(model, _examples(4), [], tmp_path / str(decay_1d), config, pad_token_id=1)
        norms.append(model.model.norm.weight.detach().clone())
    # AdamW's decoupled decay scales the weight by (1 - lr * wd) before the Adam step: only with decay_1d
    assert not torch.equal(norms[0], norms[1])
    initial = tiny_model("llama", seed=1).model.norm.weight.detach()
    torch.testing.assert_close(norms[1], norms[0] - 1e-2 * 0.5 * initial, atol=1e-6, rtol=0)


# --------------------------------------------------------------------------------------------- collection backend
TRAINER_CONFIGS = {
    "qsharp": ("guidedecode.training.qsharp", "QSharpTrainConfig"),
    "optune": ("guidedecode.training.optune", "OpTuneTrainConfig"),
    "dots": ("guidedecode.training.dots", "DotsPlannerConfig"),
}


@pytest.mark.parametrize("trainer", sorted(TRAINER_CONFIGS))
def test_trainer_backend_is_checked_before_any_model_loads(trainer, monkeypatch):
    """An unknown backend is a TrainingError; ``vllm`` without a supported vLLM is a clear install error
    (the real vLLM case runs in tests/vllm/test_vllm_trainers.py)."""
    import importlib
    import sys

    from guidedecode.vllm import VLLMUnavailableError

    module, name = TRAINER_CONFIGS[trainer]
    config_class = getattr(importlib.import_module(module), name)
    with pytest.raises(TrainingError, match="unknown backend 'tgi'"):
        config_class(backend="tgi").validate()
    monkeypatch.setitem(sys.modules, "vllm", None)  # vLLM absent (also where the vLLM venv runs this suite)
    with pytest.raises(VLLMUnavailableError, match="vLLM is not installed"):
        config_class(backend="vllm").validate()
    config_class(backend="hf").validate()


def test_rationale_backend_is_checked_before_any_model_loads(tmp_path, monkeypatch):
    import sys

    from guidedecode.training.rationale import PipelineConfig, run_pipeline
    from guidedecode.vllm import VLLMUnavailableError

    def loader(*args, **kwargs):
        raise AssertionError("no model may load for a bad backend")

    with pytest.raises(TrainingError, match="unknown backend"):
        run_pipeline(PipelineConfig(out=tmp_path, data=tmp_path / "x.jsonl", model="m", backend="tgi"), loader=loader)
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(VLLMUnavailableError, match="vLLM is not installed"):
        run_pipeline(PipelineConfig(out=tmp_path, data=tmp_path / "x.jsonl", model="m", backend="vllm"), loader=loader)


@pytest.mark.parametrize("trainer", ["qsharp", "rationale", "optune", "planner --method dots"])
def test_trainer_cli_offers_the_vllm_backend(trainer):
    from click.testing import CliRunner

    from guidedecode.cli.main import app

    result = CliRunner().invoke(app, ["train", *trainer.split(), "--help"])
    assert result.exit_code == 0, result.output
    assert "--backend [hf|vllm]" in result.output


def test_runs_recorded_before_the_backend_setting_resume_as_hf(tmp_path):
    from guidedecode.training.common import check_settings

    path = tmp_path / "config.json"
    (tmp_path / "attempts.jsonl").write_text("{}\n")  # the old run's output
    path.write_text(json.dumps({"model": "m", "seed": 0}))  # written before "backend" existed
    check_settings(path, {"model": "m", "seed": 0, "backend": "hf"})
    path.write_text(json.dumps({"model": "m", "seed": 0}))
    with pytest.raises(TrainingError, match="backend"):
        check_settings(path, {"model": "m", "seed": 0, "backend": "vllm"})


@pytest.mark.parametrize("mask_supported", [True, False])
def test_kept_logits_equal_the_full_logits_at_the_mask(mask_supported, monkeypatch):
    """Both ways of computing only the kept logits (a boolean ``logits_to_keep`` where transformers takes one,
    the union of positions before) give the full forward's logits at the masked positions, row-major."""
    from transformers import modeling_utils

    from guidedecode.hf_compat import kept_logits

    if not mask_supported:
        monkeypatch.delattr(modeling_utils, "slice_logits_to_keep", raising=False)
    elif not hasattr(modeling_utils, "slice_logits_to_keep"):
        pytest.skip("this transformers release has no boolean logits_to_keep")
    model = tiny_model("llama", seed=3, vocab_size=40)
    ids = torch.randint(3, 40, (3, 9), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    keep = torch.zeros_like(ids, dtype=torch.bool)
    keep[0, 5:8] = True
    keep[1, 2] = True
    keep[2, 6:] = True
    with torch.no_grad():
        full = model(input_ids=ids, attention_mask=mask).logits
        got = kept_logits(model, ids, mask, keep)
    torch.testing.assert_close(got, full[keep], rtol=1e-5, atol=1e-5)


def test_stages_that_generate_nothing_need_no_vllm(tmp_path, monkeypatch):
    """A run collected on vLLM finishes its training stages in an environment without vLLM."""
    import sys

    from guidedecode.training.dots import DotsPlannerConfig
    from guidedecode.training.rationale import PipelineConfig, run_pipeline
    from guidedecode.vllm import VLLMUnavailableError

    monkeypatch.setitem(sys.modules, "vllm", None)
    DotsPlannerConfig(backend="vllm").validate(stages=("sft", "train"))
    with pytest.raises(VLLMUnavailableError):
        DotsPlannerConfig(backend="vllm").validate(stages=("explain",))
    config = PipelineConfig(out=tmp_path, data=tmp_path / "x.jsonl", model="m", backend="vllm")
    with pytest.raises(TrainingError, match="run the 'filter' stage first"):  # got past the backend check
        run_pipeline(config, ("sft",), loader=lambda *a, **k: None)


@pytest.mark.parametrize("trainer, bad, needle", [
    ("optune", {"eta_init": float("nan")}, "eta_init"),
    ("optune", {"lr": float("inf")}, "lr"),
    ("optune", {"include_correct": True, "positive_feedback": ""}, "positive_feedback"),
    ("optune", {"modules": []}, "modules"),
    ("optune", {"modules": [""]}, "modules"),
    ("optune", {"layers": []}, "layers"),
    ("optune", {"layers": ["0"]}, "layers"),
    ("optune", {"temperature": float("nan")}, "temperature"),
    ("optune", {"top_p": 0}, "top_p"),
    ("optune", {"dropout": 1.5}, "dropout"),
    ("dots", {"lora_r": 0}, "lora_r"),
    ("dots", {"lr": -1.0}, "lr"),
    ("dots", {"dev_fraction": 1.5}, "dev_fraction"),
    ("dots", {"grad_accum": 0}, "grad_accum"),
    ("dots", {"search": {"rounds": 2}}, "SearchConfig"),
    ("planner", {"k": -3}, "k"),
])
def test_trainer_settings_are_checked_before_anything_runs(trainer, bad, needle):
    """Checked in validate(), before a model loads or a stage writes (they used to fail hours later)."""
    from guidedecode.training.dots import DotsPlannerConfig
    from guidedecode.training.optune import OpTuneTrainConfig
    from guidedecode.training.planner import PlannerConfig

    config = {"optune": OpTuneTrainConfig, "dots": DotsPlannerConfig, "planner": PlannerConfig}[trainer](**bad)
    with pytest.raises(TrainingError, match=needle):
        config.validate()


def test_output_directories_that_are_files_are_refused(tmp_path):
    from guidedecode.training.common import atomic_dir

    a_file = tmp_path / "f"
    a_file.write_text("x")
    with pytest.raises(TrainingError, match="is a file"):
        atomic_dir(a_file, lambda staging: None)
    with pytest.raises(TrainingError, match="is a file"):
        atomic_dir(a_file / "sub", lambda staging: None)


def test_build_sft_names_bad_records():
    from guidedecode.training.dots import build_sft

    with pytest.raises(TrainingError, match="lacks"):
        build_sft([{"id": "q1", "question": "?"}])
    with pytest.raises(TrainingError, match="upsample"):
        build_sft([], upsample=0)


def test_empty_data_files_and_contradictory_dots_settings_are_named(tmp_path):
    from guidedecode.errors import TaskError
    from guidedecode.tasks.base import read_rows
    from guidedecode.training.dots import DotsPlannerConfig

    for text in ("", "[]\n", "  \n"):
        (tmp_path / "d.json").write_text(text)
        with pytest.raises(TaskError, match="holds no rows"):
            read_rows(tmp_path / "d.json")
    with pytest.raises(TrainingError, match="internal format only"):
        DotsPlannerConfig(format="external", target="full_dialogue").validate()
