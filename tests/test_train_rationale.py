"""RATIONALYST training pipeline (guidedecode.training.rationale) on a tiny random Llama with the
embedded (real BPE, real chat template) tokenizer. Every score is checked against plain forwards."""

import functools
import json
import math
import random
from fractions import Fraction

import pytest
import torch
from click.testing import CliRunner

from guidedecode.backends import HFBackend
from guidedecode.backends.base import Completion
from guidedecode.training import rationale as R
from guidedecode.training.common import collate, held_out_loss
from guidedecode.training.rationale import (
    BOT,
    EOT,
    SFTConfig,
    TrainingError,
    align_document,
    build_example,
    edit_distance,
    edit_similarity,
    extract,
    keep_by_tau,
    masked_loss_sum,
    score_records,
    train_sft,
    usefulness,
)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Tiny models run fastest on one thread; on a loaded shared CPU, two threads thrash (10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tiny_llama_with_tokenizer):
    model, tokenizer = tiny_llama_with_tokenizer
    return model, tokenizer


@pytest.fixture(scope="module")
def backend(tiny):
    model, tokenizer = tiny
    return HFBackend(model, tokenizer, batch_size=4)


def brute_levenshtein(a, b):
    @functools.lru_cache(maxsize=None)
    def d(i, j):
        if i == 0 or j == 0:
            return i + j
        return min(d(i - 1, j) + 1, d(i, j - 1) + 1, d(i - 1, j - 1) + (a[i - 1] != b[j - 1]))

    return d(len(a), len(b))


# ------------------------------------------------------------------------------- alignment


def test_edit_distance_matches_recursive_definition():
    rng = random.Random(3)
    for _ in range(60):
        a = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 9)))
        b = "".join(rng.choice("abc ") for _ in range(rng.randint(0, 7)))
        assert edit_distance(a, b) == brute_levenshtein(a, b), (a, b)


def test_edit_distance_and_schedule_come_from_the_libraries(monkeypatch):
    # issue 8 item 19: rapidfuzz's Levenshtein and transformers' cosine warm-up, not hand-written copies
    from rapidfuzz.distance import Levenshtein
    from transformers import get_cosine_schedule_with_warmup

    calls = []
    real = Levenshtein.distance
    monkeypatch.setattr(Levenshtein, "distance", lambda a, b, **kw: calls.append((a, b)) or real(a, b, **kw))
    assert edit_distance("kitten", "sitting") == 3 and calls == [("kitten", "sitting")]
    monkeypatch.undo()

    total = 200  # 3% warm-up: 6 steps; the SFT loop (training.common.fit) builds its schedule with get_scheduler
    from transformers import get_scheduler

    fit_config = SFTConfig().fit_config()
    param = torch.nn.Parameter(torch.zeros(1))
    ours = get_scheduler(fit_config.schedule, torch.optim.SGD([param], lr=1.0),
                         num_warmup_steps=int(fit_config.warmup * total), num_training_steps=total)
    reference_optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    reference = get_cosine_schedule_with_warmup(reference_optimizer, num_warmup_steps=6, num_training_steps=total)
    for _ in range(total):
        assert ours.get_last_lr() == pytest.approx(reference.get_last_lr(), abs=1e-12)
        ours.optimizer.step()
        ours.step()
        reference_optimizer.step()
        reference.step()


def doc(text, output, id_="d0"):
    return {"id": id_, "source": "gsm8k", "text": text, "output": output}


def test_similarity_threshold_is_inclusive_at_exactly_0_9():
    text = "Tom has 3 red apples"  # 20 characters
    assert len(text) == 20
    two_edits = f"{BOT}why{EOT}Tom has 3 red appl"  # distance 2 -> 1 - 2/20 = 0.9 exactly
    three_edits = f"{BOT}why{EOT}Tom has 3 red app"  # distance 3 -> 0.85
    assert edit_similarity(text, R.strip_rationales(two_edits)) == Fraction(9, 10)
    assert align_document(doc(text, two_edits))[1] == "aligned"
    assert align_document(doc(text, three_edits))[1] == "low_similarity"
    # a threshold just above 0.9 drops the exact-0.9 document
    assert align_document(doc(text, two_edits), threshold=0.91)[1] == "low_similarity"


def test_rewritten_sentence_is_rejected():
    text = "Question: Ann has 5 pens and buys 7 more. How many pens?\nAnswer: 5 + 7 = 12.\nThe answer is 12."
    output = ("Question: Ann owns five pens, then purchases seven extra. How many?\n"
              f"Answer: {BOT}Add them.{EOT}5 + 7 = 12.\nThe answer is 12.")
    assert align_document(doc(text, output)) == ([], "low_similarity")


def test_split_into_preceding_rationale_following():
    text = "First sentence. Second sentence. Third sentence."
    output = (f"First sentence. {BOT}why two{EOT}Second sentence. {BOT} why three {EOT}Third sentence.")
    records, outcome = align_document(doc(text, output))
    assert outcome == "aligned"
    assert [(r["preceding"], r["rationale"], r["following"]) for r in records] == [
        ("First sentence.", "why two", "Second sentence."),
        ("First sentence. Second sentence.", "why three", "Third sentence."),
    ]
    assert [r["id"] for r in records] == ["d0#1", "d0#2"]


@pytest.mark.parametrize("output,outcome", [
    ("First. Second.", "no_rationale"),
    (f"First. {BOT}unclosed Second.", "malformed"),
    (f"First. {BOT}a{BOT}b{EOT} Second.", "malformed"),
    (f"First. {EOT}Second.", "malformed"),
])
def test_alignment_rejects_outputs_without_clean_rationales(output, outcome):
    assert align_document(doc("First. Second.", output)) == ([], outcome)


def test_align_counts_and_skips_empty_segments(tmp_path):
    extracted = [
        doc("A b. C d.", f"A b. {BOT}r1{EOT}C d.{BOT}r2{EOT}", "x"),  # r2 has no following text
        doc("A b. C d.", "totally different output", "y"),
    ]
    counts = R.align(extracted, tmp_path / "aligned.jsonl")
    rows = R.read_jsonl(tmp_path / "aligned.jsonl")
    assert [r["id"] for r in rows] == ["x#1"]
    assert counts["aligned"] == 1 and counts["no_rationale"] == 1
    assert counts["skipped_rationales"] == {"empty_following": 1}


# ---------------------------------------------------------------------------------- filter


def hand_decayed_following_score(model, tokenizer, user, following, gamma=0.9):
    """S = sum_i gamma^i log p(f_i | [system, user], f_<i) from one plain forward of the whole text."""
    messages = [{"role": "system", "content": R.FILTER_SYSTEM}, {"role": "user", "content": user}]
    prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    enc = tokenizer(prompt + following, add_special_tokens=False, return_offsets_mapping=True)
    ids = enc["input_ids"]
    first = min(i for i, (_, end) in enumerate(enc["offset_mapping"]) if end > len(prompt))
    assert tokenizer.decode(ids[first:]) == following
    with torch.no_grad():
        logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
    total = 0.0
    for i, t in enumerate(range(first, len(ids))):
        total += gamma**i * float(logp[t - 1, ids[t]])
    return total


FILTER_RECORDS = [
    {"id": "a#1", "source": "gsm8k", "preceding": "Question: Sam has 4 boxes of 6 eggs. How many eggs?\nAnswer:",
     "rationale": "Multiply boxes by eggs per box.", "following": "4 * 6 = 24 eggs."},
    {"id": "b#1", "source": "gsm8k", "preceding": "Mia walks 3 km a day for 5 days.",
     "rationale": "Distance is rate times days.", "following": "She walks 15 km."},
    {"id": "c#1", "source": "pile", "preceeding": "The river froze early that year.",  # legacy spelling
     "rationale": "Cold weather comes first.", "following": "Boats stayed in the harbour until March."},
    {"id": "d#1", "source": "pile", "preceding": "Prices rose by 10%.",
     "rationale": "A rise means a multiplication by 1.1.", "following": "So 50 became 55."},
]


def test_usefulness_matches_plain_forwards(backend, tiny):
    model, tokenizer = tiny
    for record in FILTER_RECORDS:
        got = usefulness(backend, record)
        preceding = R.preceding_of(record)
        s_without = hand_decayed_following_score(model, tokenizer, preceding, record["following"])
        s_with = hand_decayed_following_score(model, tokenizer, f"{preceding} <BOT>{record['rationale']}<EOT>",
                                              record["following"])
        assert got["s_without"] == pytest.approx(s_without, abs=1e-4)
        assert got["s_with"] == pytest.approx(s_with, abs=1e-4)
        assert got["delta"] == pytest.approx(s_with - s_without, abs=2e-4)


def test_filter_keeps_exactly_delta_at_least_tau(backend, tiny, tmp_path):
    model, tokenizer = tiny
    independent = {}
    for record in FILTER_RECORDS:
        preceding = R.preceding_of(record)
        independent[record["id"]] = (
            hand_decayed_following_score(model, tokenizer, f"{preceding} <BOT>{record['rationale']}<EOT>",
                                         record["following"])
            - hand_decayed_following_score(model, tokenizer, preceding, record["following"]))
    deltas = sorted(independent.values())
    assert min(b - a for a, b in zip(deltas, deltas[1:])) > 1e-3, "test needs distinct deltas"
    scored = score_records(backend, FILTER_RECORDS, tmp_path / "scored.jsonl")
    for tau in [(a + b) / 2 for a, b in zip(deltas, deltas[1:])] + [deltas[0] - 1, deltas[-1] + 1]:
        kept = {r["id"] for r in keep_by_tau(scored, default=tau)}
        assert kept == {i for i, d in independent.items() if d >= tau}
    # the boundary itself: Delta == tau is kept, the next float above drops it
    edge = scored[1]
    assert edge["id"] in {r["id"] for r in keep_by_tau(scored, default=edge["delta"])}
    assert edge["id"] not in {r["id"] for r in keep_by_tau(scored, default=math.nextafter(edge["delta"], math.inf))}
    # per-source thresholds: each record compared with its own source's tau
    taus = {"gsm8k": independent["a#1"] + 1e-3, "pile": independent["d#1"] - 1e-3}
    kept = {r["id"] for r in keep_by_tau(scored, taus)}
    assert kept == {i for i, r in zip(independent, FILTER_RECORDS) if independent[i] >= taus[r["source"]]}


def test_default_taus_come_from_the_spec():
    assert R.tau_for("gsm8k") == 1.2 and R.tau_for("ecqa") == 0.5 and R.tau_for("pile") == 0.0
    assert R.tau_for("other") == 0.0 and R.tau_for("gsm8k", default=-3.0) == -3.0
    assert R.tau_for("gsm8k", {"gsm8k": 2.0}, default=-3.0) == 2.0
    with pytest.raises(TrainingError, match="NaN"):
        keep_by_tau([{"source": "x", "delta": 1.0}], default=float("nan"))


def test_decayed_sum_weights():
    lp = [-1.0, -2.0, -0.5]
    assert R.decayed_sum(lp) == pytest.approx(-1.0 - 2.0 * 0.9 - 0.5 * 0.81)


def test_scoring_resumes_with_same_results(backend, tmp_path):
    full = score_records(backend, FILTER_RECORDS, tmp_path / "full.jsonl")
    part = tmp_path / "part.jsonl"
    score_records(backend, FILTER_RECORDS[:2], part)
    first_two = R.read_jsonl(part)
    resumed = score_records(backend, FILTER_RECORDS, part)
    assert R.read_jsonl(part)[:2] == first_two  # not recomputed
    for a, b in zip(full, resumed):
        assert a["delta"] == pytest.approx(b["delta"], abs=1e-5)


# ---------------------------------------------------------------------------------- extraction


def test_extraction_resumes_after_interruption(backend, tmp_path):
    docs = [{"id": f"g{i}", "source": "gsm8k", "text": f"Question: what is {i} + {i}?\nAnswer: {2 * i}."}
            for i in range(4)]
    extract(backend, docs, tmp_path / "full.jsonl", max_new_tokens=5, batch_size=2)
    part = tmp_path / "part.jsonl"
    extract(backend, docs[:2], part, max_new_tokens=5, batch_size=2)  # "interrupted" after one batch
    counts = extract(backend, docs, part, max_new_tokens=5, batch_size=2)
    assert counts["generated_now"] == 2 and counts["documents"] == 4
    assert R.read_jsonl(part) == R.read_jsonl(tmp_path / "full.jsonl")


def test_extraction_prompt_has_two_demos_whose_stripped_output_is_the_input():
    messages = R.extraction_messages("Some text.")
    assert [m["role"] for m in messages] == ["system", "user", "assistant", "user", "assistant", "user"]
    for plain, annotated in R.EXTRACTION_DEMOS:
        assert annotated.count(BOT) == annotated.count(EOT) >= 2
        assert R.strip_rationales(annotated) == plain


def test_gsm8k_document_drops_calculator_annotations():
    row = {"question": "Q?", "answer": "48/2 = <<48/2=24>>24 clips.\n#### 72"}
    assert R.gsm8k_document(row) == "Question: Q?\nAnswer: 48/2 = 24 clips.\nThe answer is 72."


# ----------------------------------------------------------------------- extraction, insert mode

INSERT_DOC = {
    "id": "ins0", "source": "gsm8k",
    "text": ("Question: Ann has 7 red kites and 4 blue kites. She loses 2. How many kites are left?\n"
             "Answer: Ann has 7 + 4 = 11 kites.\n"
             "After losing 2 she has 11 - 2 = 9 kites.\n"
             "The answer is 9."),
}
# the segments of INSERT_DOC, written out by hand: boundaries after "Answer: " and at each line start
INSERT_SEGMENTS = [
    "Question: Ann has 7 red kites and 4 blue kites. She loses 2. How many kites are left?\nAnswer: ",
    "Ann has 7 + 4 = 11 kites.\n",
    "After losing 2 she has 11 - 2 = 9 kites.\n",
    "The answer is 9.",
]


class ScriptedBackend(HFBackend):
    """A real HFBackend (real tokenizer and chat template) whose greedy() returns scripted completions.

    ``reply(prompt) -> (text, finish_reason)``; texts stopped by a stop string keep it, as HFBackend does.
    Every greedy() call's prompts and arguments are recorded.
    """

    def __init__(self, model, tokenizer, reply):
        super().__init__(model, tokenizer, batch_size=4)
        self.reply, self.calls = reply, []

    def greedy(self, prompts, *, max_new_tokens=256, stop=None):
        self.calls.append({"prompts": list(prompts), "max_new_tokens": max_new_tokens, "stop": stop})
        completions = []
        for prompt in prompts:
            text, finish = self.reply(prompt)
            completions.append(Completion(text=text, token_ids=self.encode(text) if text else [], finish_reason=finish))
        return completions


def preceding_in(prompt):
    """The last user message of an insertion prompt (the text the model continues from)."""
    return prompt.rsplit("<|im_start|>user\n", 1)[1].split("<|im_end|>", 1)[0]


def test_segment_boundaries():
    text = INSERT_DOC["text"]
    offsets = [len("".join(INSERT_SEGMENTS[:k])) for k in range(1, len(INSERT_SEGMENTS))]
    assert R.segment_boundaries(text) == offsets
    # blank lines and a label with nothing after it on its line give no boundary of their own
    assert R.segment_boundaries("Q?\n\nAnswer:\n2 + 3 = 5.\n") == [len("Q?\n\nAnswer:\n")]
    # a one-line text is cut at sentence starts
    assert R.segment_boundaries("One. Two!  Three? Four") == [5, 11, 18]
    assert R.segment_boundaries("No boundary here.") == []


def test_insertion_prompt_is_prefilled_and_hides_the_following_segment(tiny, tmp_path):
    model, tokenizer = tiny
    backend = ScriptedBackend(model, tokenizer, lambda prompt: ("Because.<EOT>", "stop"))
    R.extract_insert(backend, [INSERT_DOC], tmp_path / "extract.jsonl", max_rationales=None)
    (call,) = backend.calls
    assert call["stop"] == R.INSERT_STOPS and call["max_new_tokens"] == R.INSERT_MAX_NEW_TOKENS
    assert len(call["prompts"]) == len(INSERT_SEGMENTS) - 1
    for k, prompt in enumerate(call["prompts"], 1):
        preceding = "".join(INSERT_SEGMENTS[:k]).strip()
        messages = R.insertion_messages(preceding)
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        assert prompt == rendered + BOT and prompt.endswith("<|im_start|>assistant\n<BOT>")
        assert preceding_in(prompt) == preceding
        for later in INSERT_SEGMENTS[k:]:
            assert later.strip() not in prompt
    # the demos show the reply format the model is to continue: <BOT>rationale<EOT>
    assert [m["role"] for m in messages] == ["system"] + ["user", "assistant"] * len(R.INSERTION_DEMOS) + ["user"]
    assert all(m["content"].startswith(BOT) and m["content"].endswith(EOT) for m in messages[2:-1:2])


def test_assembly_puts_rationales_exactly_at_the_boundaries(tiny, tmp_path):
    model, tokenizer = tiny
    rationales = {  # keyed by the last words the model sees
        "How many kites are left?\nAnswer:": " First count all the kites. <EOT>",
        "= 11 kites.": "Losing kites means subtracting.<EOT>",
        "= 9 kites.": "The kites left answer the question.",  # ended by EOS, no <EOT>
    }

    def reply(prompt):
        (text,) = [r for end, r in rationales.items() if preceding_in(prompt).endswith(end)]
        return text, "stop" if text.endswith(EOT) else "eos"

    backend = ScriptedBackend(model, tokenizer, reply)
    counts = R.extract_insert(backend, [INSERT_DOC], tmp_path / "extract.jsonl", max_rationales=None)
    (row,) = R.read_jsonl(tmp_path / "extract.jsonl")
    s = INSERT_SEGMENTS
    expected = (s[0] + "<BOT>First count all the kites.<EOT>" + s[1] + "<BOT>Losing kites means subtracting.<EOT>"
                + s[2] + "<BOT>The kites left answer the question.<EOT>" + s[3])
    assert row["output"] == expected
    assert row["mode"] == "insert" and row["text"] == INSERT_DOC["text"]
    assert {"id", "source", "text", "output", "finish_reason"} <= set(row)
    assert counts["boundaries"] == 3 and counts["rationales"] == 3 and counts["skipped"] == {}
    # align recovers the original segments around each rationale, at similarity 1
    records, outcome = align_document(row)
    assert outcome == "aligned"
    assert [(r["preceding"], r["rationale"], r["following"]) for r in records] == [
        (s[0].strip(), "First count all the kites.", s[1].strip()),
        ((s[0] + s[1]).strip(), "Losing kites means subtracting.", s[2].strip()),
        ((s[0] + s[1] + s[2]).strip(), "The kites left answer the question.", s[3].strip()),
    ]
    assert all(r["similarity"] == 1.0 for r in records)
    # --max-rationales 2: only the first two boundaries are asked about
    backend = ScriptedBackend(model, tokenizer, reply)
    counts = R.extract_insert(backend, [INSERT_DOC], tmp_path / "two.jsonl", max_rationales=2)
    assert counts["boundaries"] == 2 and len(backend.calls[0]["prompts"]) == 2
    assert R.read_jsonl(tmp_path / "two.jsonl")[0]["output"] == expected.split(s[2])[0] + s[2] + s[3]


def test_assemble_matches_a_hand_built_string():
    assert R.assemble("abcdef", [(0, "x"), (3, "y"), (6, "z")]) == "<BOT>x<EOT>abc<BOT>y<EOT>def<BOT>z<EOT>"
    assert R.assemble("abc", []) == "abc"
    with pytest.raises(TrainingError, match="offsets"):
        R.assemble("abc", [(2, "x"), (1, "y")])


def test_degenerate_rationales_are_skipped_and_counted(tiny, tmp_path):
    model, tokenizer = tiny
    s = INSERT_SEGMENTS
    replies = iter([  # the prompts come document by document, boundary by boundary
        ("x" * (R.MAX_RATIONALE_CHARS + 1) + EOT, "stop"),  # too long
        (f"  After losing 2 she has   11 - 2 = 9 kites. {EOT}", "stop"),  # the next segment, copied
        ("The answer is about to", "length"),  # the token limit came first
        (f"Count them.{EOT}", "stop"),
        ("   <EOT>", "stop"),  # empty
        (f"a {BOT} b{EOT}", "stop"),  # a nested marker
    ])
    docs = [INSERT_DOC, {**INSERT_DOC, "id": "ins1"}]
    backend = ScriptedBackend(model, tokenizer, lambda prompt: next(replies))
    counts = R.extract_insert(backend, docs, tmp_path / "extract.jsonl", max_rationales=None, batch_size=2)
    assert len(backend.calls) == 1 and len(backend.calls[0]["prompts"]) == 6  # both documents in one call
    assert counts["boundaries"] == 6 and counts["rationales"] == 1
    assert counts["skipped"] == {"copies_next": 1, "empty": 1, "has_bot": 1, "too_long": 1, "unfinished": 1}
    assert counts["documents_with_rationale"] == 1
    assert counts["finish_reasons"] == {"stop": 5, "length": 1}
    rows = R.read_jsonl(tmp_path / "extract.jsonl")
    assert rows[0]["output"] == INSERT_DOC["text"]  # nothing kept: the text unchanged
    assert rows[1]["output"] == s[0] + "<BOT>Count them.<EOT>" + s[1] + s[2] + s[3]
    assert [i["outcome"] for i in rows[0]["insertions"]] == ["too_long", "copies_next", "unfinished"]
    assert R.align(rows, tmp_path / "aligned.jsonl")["no_rationale"] == 1


@pytest.mark.parametrize("generated,next_segment,outcome,rationale", [
    (" Why so. <EOT> tail", "Next.", "kept", "Why so."),
    ("Line one\nline two", "Next.", "kept", "Line one"),
    ("\nstarts with a break", "Next.", "empty", ""),
    ("Next.", "Next.", "copies_next", "Next."),
    ("So: Next  step. ok", "Next step.", "copies_next", "So: Next  step. ok"),
    ("Next", "Next step.", "kept", "Next"),  # a prefix of the next segment is no copy of it
])
def test_clean_rationale(generated, next_segment, outcome, rationale):
    assert R.clean_rationale(generated, next_segment) == (rationale, outcome)


def test_insert_extraction_resumes_with_identical_files(backend, tmp_path):
    docs = [{"id": f"g{i}", "source": "gsm8k",
             "text": f"Question: what is {i} + {i}?\nAnswer: {i} + {i} = {2 * i}.\nThe answer is {2 * i}."}
            for i in range(4)]
    full = R.extract_insert(backend, docs, tmp_path / "full.jsonl", max_new_tokens=5, batch_size=2)
    part = tmp_path / "part.jsonl"
    R.extract_insert(backend, docs[:2], part, max_new_tokens=5, batch_size=2)  # "interrupted" after one batch
    first_two = part.read_bytes()
    counts = R.extract_insert(backend, docs, part, max_new_tokens=5, batch_size=2)
    assert counts["generated_now"] == 2 and counts["documents"] == 4 and counts["boundaries"] == 8
    assert part.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    assert part.read_bytes().startswith(first_two)
    assert {k: v for k, v in counts.items() if k != "generated_now"} == \
        {k: v for k, v in full.items() if k != "generated_now"}
    # nothing left to do: no generation, same file
    again = R.extract_insert(ScriptedBackend(backend.model, backend.tokenizer, None), docs, part, max_new_tokens=5)
    assert again["generated_now"] == 0 and part.read_bytes() == (tmp_path / "full.jsonl").read_bytes()
    # a file from the other mode is refused by both modes
    with pytest.raises(TrainingError, match="another extraction mode"):
        extract(backend, docs, part, max_new_tokens=5)
    R.write_jsonl(tmp_path / "rewrite.jsonl", [{**docs[0], "output": docs[0]["text"], "finish_reason": "eos"}])
    with pytest.raises(TrainingError, match="another extraction mode"):
        R.extract_insert(backend, docs, tmp_path / "rewrite.jsonl")
    with pytest.raises(TrainingError, match="max-rationales"):
        R.extract_insert(backend, docs, tmp_path / "x.jsonl", max_rationales=-1)


# -------------------------------------------------------------------------------------- SFT


def test_prompt_is_masked_in_sft_labels(tiny):
    _, tokenizer = tiny
    preceding, rationale = "Ann has 3 cats and 2 dogs.", "We add the animals."
    ids, labels = build_example(tokenizer, preceding, rationale)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": preceding}], tokenize=False,
                                           add_generation_prompt=True)
    n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
    assert labels[:n_prompt] == [-100] * n_prompt
    assert labels[n_prompt:] == ids[n_prompt:]
    assert tokenizer.decode(ids[n_prompt:]) == rationale + "<|im_end|>\n"
    ids2, labels2 = build_example(tokenizer, preceding, rationale, target_template="<BOT>{rationale}<EOT>")
    assert tokenizer.decode([t for t, l in zip(ids2, labels2) if l != -100]).startswith("<BOT>We add")


def test_masked_loss_equals_per_position_cross_entropy(tiny):
    model, tokenizer = tiny
    examples = [build_example(tokenizer, "A b c.", "Why."), build_example(tokenizer, "Longer text here ok.", "R s.")]
    batch = collate(examples, tokenizer.pad_token_id)
    loss, count = masked_loss_sum(model, batch)
    expected, n = 0.0, 0
    with torch.no_grad():
        for ids, labels in examples:
            logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
            for t in range(1, len(ids)):
                if labels[t] != -100:
                    expected -= float(logp[t - 1, labels[t]])
                    n += 1
    assert count == n
    assert float(loss.detach()) == pytest.approx(expected, rel=1e-5)


def sft_records(n=7):
    return [{"id": f"r{i}", "source": "gsm8k", "preceding": f"Tom has {i} apples and buys {i + 2} more.",
             "rationale": f"To find the total we add {i} and {i + 2}.", "following": f"{2 * i + 2} apples."}
            for i in range(n)]


def fresh_tiny(tokenizer):
    from guidedecode.testing import tiny_model

    return lambda: (tiny_model("llama", seed=1, vocab_size=len(tokenizer)), tokenizer)


def weights(directory):
    from safetensors.torch import load_file

    return load_file(str(directory / "model.safetensors"))


@pytest.mark.parametrize("lora", [False, True])
def test_sft_trains_saves_and_reloads(tiny, tmp_path, lora):
    from guidedecode.models import load_model

    _, tokenizer = tiny
    config = SFTConfig(lora=lora, epochs=2, lr=1e-2, batch_size=6, dev_fraction=0.2)
    summary = train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", config)
    assert summary["train_examples"] == 6 and summary["dev_examples"] == 1 and summary["steps"] == 2
    assert [e["epoch"] for e in summary["epochs"]] == [0, 1]
    assert all(math.isfinite(e["dev_loss"]) and math.isfinite(e["train_loss"]) for e in summary["epochs"])
    model, _ = load_model(tmp_path / "sft" / "final")
    base, _ = fresh_tiny(tokenizer)()
    changed = [k for k, v in model.state_dict().items() if not torch.equal(v, base.state_dict()[k])]
    assert changed, "training changed no weight"
    if lora:
        from peft import PeftModel

        assert all("proj" in k for k in changed if "layers" in k)
        adapted = PeftModel.from_pretrained(fresh_tiny(tokenizer)()[0], tmp_path / "sft" / "adapter").eval()
        ids = torch.tensor([build_example(tokenizer, "x y z.", "w.")[0]])
        with torch.no_grad():
            torch.testing.assert_close(adapted(ids).logits, model(ids).logits, atol=1e-4, rtol=1e-4)
    # the dev loss in the summary is the dev loss of the saved model
    examples = [build_example(tokenizer, R.preceding_of(r), r["rationale"]) for r in sft_records()]
    _, dev = R.split_dev(examples, 0.2, 0)
    dev_loss = held_out_loss(model, dev, batch_size=6, collate_fn=lambda b: collate(b, tokenizer.pad_token_id))
    assert dev_loss == pytest.approx(summary["final_dev_loss"], rel=1e-4)
    # rerun: already finished, nothing retrained
    again = train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", config)
    assert again["resumed_finished"] and again["steps"] == 2


@pytest.mark.parametrize("lora", [False, True])
def test_sft_resumes_from_checkpoint_to_identical_weights(tiny, tmp_path, lora):
    _, tokenizer = tiny
    config = SFTConfig(lora=lora, epochs=2, lr=1e-2, batch_size=3, dev_fraction=0.2, save_every=100)
    train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "a", config)  # 2 epochs x 2 steps
    out = train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "b", config, stop_after_steps=1)  # mid-epoch
    assert out["interrupted"] and (tmp_path / "b" / "checkpoint-0000001").is_dir()
    assert not (tmp_path / "b" / "final").exists()
    summary = train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "b", config)
    assert summary["steps"] == 4
    a, b = weights(tmp_path / "a" / "final"), weights(tmp_path / "b" / "final")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=1e-6, rtol=1e-5)
    first = json.loads((tmp_path / "a" / "history.json").read_text())["epochs"]
    assert [e["dev_loss"] for e in summary["epochs"]] == pytest.approx([e["dev_loss"] for e in first], rel=1e-5)


def test_corrupt_checkpoint_is_reported(tiny, tmp_path):
    _, tokenizer = tiny
    config = SFTConfig(epochs=1, lr=1e-3, batch_size=2, save_every=1)
    train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", config, stop_after_steps=1)
    (checkpoint,) = (tmp_path / "sft").glob("checkpoint-*")
    (checkpoint / "optimizer.pt").write_bytes(b"not a torch file")
    with pytest.raises(TrainingError, match="damaged"):
        train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", config)
    (checkpoint / "trainable.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(TrainingError, match="damaged"):
        train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", config)


def test_sft_refuses_empty_records_and_changed_settings(tiny, tmp_path):
    _, tokenizer = tiny
    with pytest.raises(TrainingError, match="no records"):
        train_sft(fresh_tiny(tokenizer), [], tmp_path / "sft", SFTConfig())
    train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", SFTConfig(batch_size=4), stop_after_steps=1)
    with pytest.raises(TrainingError, match="other settings"):
        train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "sft", SFTConfig(batch_size=4, lr=1e-3))
    with pytest.raises(TrainingError, match="learning rate"):
        train_sft(fresh_tiny(tokenizer), sft_records(), tmp_path / "x", SFTConfig(lr=float("nan")))


# ------------------------------------------------------------------------------------- CLI


@pytest.fixture(scope="module")
def tiny_dir(tiny, tmp_path_factory):
    model, tokenizer = tiny
    directory = tmp_path_factory.mktemp("tiny-llama")
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def gsm8k_rows(data_dir):
    with open(data_dir / "gsm8k" / "train.jsonl") as handle:
        return [json.loads(next(handle)) for _ in range(5)]


def invoke(args):
    from guidedecode.cli.train_rationale import rationale

    return CliRunner().invoke(rationale, [str(a) for a in args], standalone_mode=False, catch_exceptions=True)


def annotate(text):
    """A perfect extraction: a rationale before every line after the first."""
    lines = text.split("\n")
    return "\n".join([lines[0]] + [f"{BOT}This step follows from the previous one.{EOT}{line}" for line in lines[1:]])


def test_cli_end_to_end_on_tiny_model(tiny_dir, gsm8k_rows, tmp_path):
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows))
    out = tmp_path / "run"
    # two documents already extracted (as if by an earlier, interrupted run) with good rationales
    documents = R.load_documents(data)
    R.write_jsonl(out / "extract.jsonl", [{**d, "output": annotate(d["text"]), "finish_reason": "eos"}
                                          for d in documents[:2]])
    args = ["--model", tiny_dir, "--data", data, "--out", out, "--records", 4, "--tau", "-1000",
            "--extract-mode", "rewrite", "--max-new-tokens", 4, "--batch-size", 4, "--epochs", 1, "--lr", 1e-3,
            "--quiet"]
    result = invoke(args)
    assert result.exception is None, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["extract"]["documents"] == 4 and metrics["extract"]["generated_now"] == 2
    assert metrics["align"]["documents"] == 4 and metrics["align"]["aligned"] >= 2
    n_rationales = sum(d["text"].count("\n") for d in documents[:2])
    assert metrics["align"]["records"] >= n_rationales
    assert metrics["filter"]["scored"] == metrics["align"]["records"] == metrics["filter"]["kept"]
    assert metrics["sft"]["train_examples"] + metrics["sft"]["dev_examples"] == metrics["filter"]["kept"]
    assert (out / "sft" / "final" / "config.json").is_file()
    kept = R.read_jsonl(out / "filtered.jsonl")
    assert all({"preceding", "rationale", "following", "s_with", "s_without", "delta", "tau"} <= set(r) for r in kept)
    # a rerun finds everything done and leaves the files as they were
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    assert invoke(args).exception is None
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    # the filter alone, stricter: re-thresholds the stored scores, scores nothing again
    result = invoke(["--model", tiny_dir, "--data", data, "--out", out, "--stage", "filter", "--tau", "1000", "--quiet"])
    assert result.exception is None, result.output
    assert json.loads((out / "metrics.json").read_text())["filter"]["kept"] == 0


def test_cli_help_lists_the_options():
    from guidedecode.cli.train_rationale import rationale

    result = CliRunner().invoke(rationale, ["--help"])
    assert result.exit_code == 0
    assert "rewrite" in result.output and "larger instruct models" in result.output
    for option in ("--model", "--data", "--out", "--records", "--tau", "--lora", "--full", "--epochs", "--lr",
                   "--batch-size", "--max-new-tokens", "--seed", "--device", "--stage", "--extract-mode",
                   "--max-rationales"):
        assert option in result.output


def test_cli_bad_input(tiny_dir, tmp_path):
    out = tmp_path / "run"
    result = invoke(["--model", tiny_dir, "--data", tmp_path / "missing.jsonl", "--out", out])
    assert isinstance(result.exception, TrainingError) and "not found" in str(result.exception)
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result = invoke(["--model", tiny_dir, "--data", empty, "--out", out])
    assert isinstance(result.exception, TrainingError) and "no records" in str(result.exception)
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "q", "answer": "a"}\n{not json\n')
    result = invoke(["--model", tiny_dir, "--data", bad, "--out", out])
    assert isinstance(result.exception, TrainingError) and "line 2" in str(result.exception)
    for tau in ("nan", "gsm8k=nan", "abc"):
        result = invoke(["--model", tiny_dir, "--data", bad, "--out", out, "--tau", tau])
        assert isinstance(result.exception, TrainingError), tau
    result = invoke(["--model", tiny_dir, "--out", out, "--records", 0])
    assert isinstance(result.exception, TrainingError) and "--records" in str(result.exception)
    result = invoke(["--model", tiny_dir, "--out", tmp_path / "fresh", "--stage", "sft"])
    assert isinstance(result.exception, TrainingError) and "filter" in str(result.exception)


def test_cli_reports_when_no_rationale_survives(tiny_dir, gsm8k_rows, tmp_path):
    """The random tiny model inserts no <BOT>..<EOT>: the run stops before SFT with the counts."""
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows[:2]))
    out = tmp_path / "run"
    result = invoke(["--model", tiny_dir, "--data", data, "--out", out, "--extract-mode", "rewrite",
                     "--max-new-tokens", 3, "--quiet"])
    assert isinstance(result.exception, TrainingError)
    assert "align kept 0 of 2 documents" in str(result.exception)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["align"]["no_rationale"] + metrics["align"]["malformed"] == 2


def test_cli_insert_mode_end_to_end_on_tiny_model(tiny, tiny_dir, gsm8k_rows, tmp_path):
    """Insert mode through the CLI: two documents extracted earlier (scripted, sensible rationales),
    the other two by the tiny model; align, filter and SFT run unchanged on the result."""
    model, tokenizer = tiny
    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in gsm8k_rows))
    out = tmp_path / "run"
    documents = R.load_documents(data)
    scripted = ScriptedBackend(model, tokenizer, lambda prompt: ("This step follows from the one before.<EOT>", "stop"))
    earlier = R.extract_insert(scripted, documents[:2], out / "extract.jsonl", max_rationales=3, max_new_tokens=4)
    assert earlier["rationales"] >= 2
    args = ["--model", tiny_dir, "--data", data, "--out", out, "--records", 4, "--tau", "-1000",
            "--extract-mode", "insert", "--max-rationales", 3, "--max-new-tokens", 4, "--batch-size", 4,
            "--epochs", 1, "--lr", 1e-3, "--quiet"]
    result = invoke(args)
    assert result.exception is None, result.output
    metrics = json.loads((out / "metrics.json").read_text())
    extracted = metrics["extract"]
    assert extracted["mode"] == "insert" and extracted["documents"] == 4 and extracted["generated_now"] == 2
    expected_boundaries = sum(min(3, len(R.segment_boundaries(d["text"]))) for d in documents[:4])
    assert extracted["boundaries"] == expected_boundaries
    assert extracted["rationales"] + sum(extracted["skipped"].values()) == expected_boundaries
    assert extracted["rationales"] >= earlier["rationales"]
    assert json.loads((out / "settings.json").read_text())["extract"]["mode"] == "insert"
    rows = R.read_jsonl(out / "extract.jsonl")
    assert all(R.strip_rationales(row["output"]) == row["text"] for row in rows)
    assert metrics["align"]["aligned"] == extracted["documents_with_rationale"] >= 2
    assert all(r["similarity"] == 1.0 for r in R.read_jsonl(out / "aligned.jsonl"))
    assert metrics["filter"]["scored"] == metrics["align"]["records"] == metrics["filter"]["kept"]
    assert metrics["sft"]["train_examples"] + metrics["sft"]["dev_examples"] == metrics["filter"]["kept"]
    assert (out / "sft" / "final" / "config.json").is_file()
    # a rerun finds everything done; another mode or rationale count on the same directory is refused
    before = {p.name: p.read_bytes() for p in out.glob("*.jsonl")}
    assert invoke(args).exception is None
    assert {p.name: p.read_bytes() for p in out.glob("*.jsonl")} == before
    for change in (["--extract-mode", "rewrite"], ["--max-rationales", 2]):
        result = invoke(args + change)
        assert isinstance(result.exception, TrainingError) and "other settings" in str(result.exception), change
    result = invoke(args + ["--max-rationales", -1])
    assert isinstance(result.exception, TrainingError) and "--max-rationales" in str(result.exception)
