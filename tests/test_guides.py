"""Token guides against brute-force loops on tiny real models."""

import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from guidedecode.errors import GuideError
from guidedecode.guides import HistoryBias, PresencePenalty
from guidedecode.testing import tiny_model

EOS = 1  # tiny models: eos = pad = 1


def history_rule(history):
    """A bias that depends on the whole history: favour (sum of history * 7) mod 50, disfavour the last token."""
    return {(sum(history) * 7) % 50 + 2: 2.5, history[-1]: -1.5}


def brute_force_greedy(model, prompt, rule, steps):
    """Re-run the model on the whole unpadded sequence each step and add rule(history)."""
    ids = list(prompt)
    for _ in range(steps):
        with torch.no_grad():
            logits = model(torch.tensor([ids])).logits[0, -1].clone()
        for token, bias in rule(ids).items():
            logits[token] += bias
        ids.append(int(logits.argmax()))
        if ids[-1] == EOS:
            break
    return ids[len(prompt):]


def left_pad(prompts):
    width = max(map(len, prompts))
    ids = torch.tensor([[EOS] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    return ids, mask


def strip(row, prompt_width):
    out = row[prompt_width:].tolist()
    return out[: out.index(EOS) + 1] if EOS in out else out


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
def test_history_bias_greedy_equals_brute_force_with_left_padding(arch):
    model = tiny_model(arch, seed=7)
    prompts = [[5, 9, 33, 2, 8], [40, 3], [11, 12, 13]]
    guide = HistoryBias(history_rule, eos_token_id=EOS, pad_token_id=EOS)
    ids, mask = left_pad(prompts)
    out = model.generate(ids, attention_mask=mask, logits_processor=[guide], do_sample=False, max_new_tokens=8,
                         pad_token_id=EOS)
    for row, prompt in zip(out, prompts):
        assert strip(row, ids.shape[1]) == brute_force_greedy(model, prompt, history_rule, 8)


def test_presence_penalty_greedy_equals_brute_force():
    model = tiny_model("qwen2", seed=2)
    prompt = [7, 8, 9, 10]

    def penalty_rule(history):
        generated = history[len(prompt):]
        return {t: -3.0 for t in set(generated)}

    guide = PresencePenalty(3.0, eos_token_id=EOS, pad_token_id=EOS)
    out = model.generate(torch.tensor([prompt]), logits_processor=[guide], do_sample=False, max_new_tokens=10,
                         pad_token_id=EOS)
    assert strip(out[0], len(prompt)) == brute_force_greedy(model, prompt, penalty_rule, 10)
    with pytest.raises(GuideError, match="alpha must be >= 0"):
        PresencePenalty(-1.0)


def test_rows_that_finish_early_are_left_alone():
    model = tiny_model("mistral", seed=4)
    seen = []

    def force_eos_after_three(history):
        seen.append(len(history))
        generated = len(history) - 3
        return {EOS: 100.0} if generated >= (3 if history[0] == 20 else 6) else {}

    guide = HistoryBias(force_eos_after_three, eos_token_id=EOS, pad_token_id=EOS)
    out = model.generate(torch.tensor([[20, 21, 22], [30, 31, 32]]), logits_processor=[guide], do_sample=False,
                         max_new_tokens=10, pad_token_id=EOS)
    assert strip(out[0], 3)[-1] == EOS and len(strip(out[0], 3)) == 4
    assert len(strip(out[1], 3)) == 7
    # generate stops before showing the guide the last row's EOS; the first row's EOS was seen
    assert guide.finished.tolist() == [True, False]
    # the first row finished after 4 tokens: its history stopped growing while the other row ran on
    assert guide.state[0] == out[0, :7].tolist()
    assert max(n for n in seen) == 3 + 6 and seen.count(7) == 1  # row 0 was not adjusted after its EOS


def test_num_return_sequences_rows_track_their_own_history():
    model = tiny_model("llama", seed=5)
    guide = PresencePenalty(0.5, eos_token_id=EOS, pad_token_id=EOS)
    recorder = HistoryBias(lambda h: {}, eos_token_id=EOS, pad_token_id=EOS)
    torch.manual_seed(0)
    ids, mask = left_pad([[3, 4, 5, 6], [9, 10]])
    out = model.generate(ids, attention_mask=mask, logits_processor=[guide, recorder], do_sample=True,
                         num_return_sequences=3, max_new_tokens=6, pad_token_id=EOS)
    assert out.shape[0] == 6 and len(recorder.state) == 6
    for i, (row, history) in enumerate(zip(out, recorder.state)):
        prompt_len = int(mask[i // 3].sum())
        tokens = row[ids.shape[1] - prompt_len:].tolist()
        # the history is the unpadded prompt plus every token up to and including EOS
        expected = tokens[: tokens.index(EOS, prompt_len) + 1] if EOS in tokens[prompt_len:] else tokens
        assert history == expected[: len(history)] and len(history) >= len(expected) - 1


class StatelessHistoryBias(LogitsProcessor):
    """Reference: recompute the bias from the raw input_ids every call (no state, beam-safe)."""

    def __init__(self, rule, prompt_width):
        self.rule, self.prompt_width = rule, prompt_width

    def __call__(self, input_ids, scores):
        for row in range(input_ids.shape[0]):
            for token, bias in self.rule(input_ids[row].tolist()).items():
                scores[row, token] += bias
        return scores


def test_beam_search_reordering_matches_a_stateless_reference():
    model = tiny_model("llama", seed=11)
    prompt = torch.tensor([[4, 8, 15, 16, 23]])
    common = dict(num_beams=4, num_return_sequences=2, do_sample=False, max_new_tokens=7, pad_token_id=EOS)
    guided = model.generate(prompt, logits_processor=[HistoryBias(history_rule, eos_token_id=EOS, pad_token_id=EOS)],
                            **common)
    reference = model.generate(prompt, logits_processor=[StatelessHistoryBias(history_rule, 5)], **common)
    assert torch.equal(guided, reference)


def test_guide_composes_with_other_processors_and_is_reused_across_calls():
    model = tiny_model("gpt2", seed=1)
    guides = [PresencePenalty(2.0, eos_token_id=EOS, pad_token_id=EOS),
              HistoryBias(history_rule, eos_token_id=EOS, pad_token_id=EOS)]
    prompt = torch.tensor([[6, 7, 8]])
    first = model.generate(prompt, logits_processor=LogitsProcessorList(guides), do_sample=False, max_new_tokens=5,
                           pad_token_id=EOS)
    again = model.generate(prompt, logits_processor=LogitsProcessorList(guides), do_sample=False, max_new_tokens=5,
                           pad_token_id=EOS)
    assert torch.equal(first, again)

    def both(history):
        bias = dict(history_rule(history))
        for t in set(history[3:]):
            bias[t] = bias.get(t, 0.0) - 2.0
        return bias

    assert strip(first[0], 3) == brute_force_greedy(model, [6, 7, 8], both, 5)


def test_nan_from_a_guide_or_the_model_is_a_clear_error():
    model = tiny_model("llama", seed=0)
    nan_guide = HistoryBias(lambda h: {5: float("nan")}, eos_token_id=EOS)
    with pytest.raises(GuideError, match="HistoryBias produced NaN logits"):
        model.generate(torch.tensor([[2, 3]]), logits_processor=[nan_guide], max_new_tokens=2, pad_token_id=EOS)
    guide = PresencePenalty(1.0)
    with pytest.raises(GuideError, match="received NaN logits"):
        guide(torch.tensor([[1, 2]]), torch.tensor([[0.0, float("nan")]]))
    with pytest.raises(GuideError, match="outside the vocabulary"):
        HistoryBias(lambda h: {10**6: 1.0})(torch.tensor([[1, 2]]), torch.zeros(1, 10))
