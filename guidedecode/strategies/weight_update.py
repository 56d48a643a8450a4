"""Attempts with test-time weight updates from feedback: OpTune and FTTT / FTTT+ (arXiv 2502.15771).

Li, Lyu, Wang, "Learning to Reason from Feedback at Test-Time" (ACL 2025; reference LaVi-Lab/FTTT). Each
attempt sees only the question (the context never grows, unlike revision); what the model learnt from its
failed attempts lives in a per-question weight delta, applied through
:class:`~guidedecode.deltas.DeltaInjector` so that every question of a batch carries its own delta:

* :class:`OpTune`: after a failed attempt ``y`` the learned editor maps the gradient factors of the NLL of
  ``chat(q) ‖ y ‖ feedback`` to ``ΔW`` (computed at the base weights). ``schedule="alternate"`` (the
  reference evaluator) samples even attempts with the latest edit and odd ones without;
  ``"always_edit"`` uses it on every attempt after the first failure. ``edit_accumulation="replace"``
  (reference) keeps only the latest edit, ``"accumulate"`` sums them (factors concatenated).
* :class:`FTTT`: a fresh per-question LoRA (r = 4, alpha = 16, on q_proj / v_proj of all layers; A drawn
  as peft initialises it, B = 0) gets one AdamW step (lr 1e-5) on the feedback NLL after each failure:
  ``loss = NLL(f | q, y)`` where ``f`` is the end of the assistant turn plus the user turn "Your answer is
  incorrect." and ``(q, y)`` run once into a KV cache without gradient (constants). ``reflection=True``
  (FTTT+) first samples a reflection with the adapter disabled ("... summarize all mistakes in short ...")
  and trains on ``f = <end of turn> + user("Your answer is incorrect. " + reflection)`` with
  ``loss = mean NLL(feedback tokens) + mean NLL(reflection tokens)``.

Verdicts come from an oracle ``check(text, gold)``; feedback follows the verdict (a correct attempt ends the
question, it never gets "incorrect" feedback). Every attempt record carries ``edited`` (whether a delta was
applied); the cost of edits and training is added to the backend's counters (``forward_passes``,
``prompt_tokens``) and to ``backend.stats.extra`` (``backward_passes``, ``backward_tokens``).

Deviations from the reference, on purpose: the LoRA has no dropout (one step per failure; the injector
applies the LoRA as a plain factored delta); AdamW runs at a constant lr without the 3% warm-up (with a
handful of steps per question, warm-up would zero the first ones); truncated attempts count as attempts
(the reference resamples them, up to 8 times), as for every baseline here.
"""

from __future__ import annotations

import inspect
import math
import zlib
from collections.abc import Callable

import torch

from guidedecode.backends.hf import left_pad
from guidedecode.deltas.injector import DeltaInjector, LowRankDelta, find_targets
from guidedecode.deltas.optune import INCORRECT, OpTuneEditor
from guidedecode import validation
from guidedecode.errors import StrategyError
from guidedecode.strategies.base import StepStrategy
from guidedecode.strategies.budget import AttemptLog, check_budget, oracle_golds
from guidedecode.strategies.revision import as_messages, generate

REFLECT = ("Your answer is incorrect. Please carefully check the solution and summarize all mistakes in short. "
           "Do NOT provide the corrected solution. Do NOT say \"my solution\".")
SCHEDULES = ("alternate", "always_edit")
ACCUMULATION = ("replace", "accumulate")


class WeightUpdateStrategy(StepStrategy):
    """The shared attempt loop: generate with per-question deltas, judge, update after failures.

    Subclasses implement :meth:`delta_for` (the delta of question ``i`` at ``attempt``, or None) and
    :meth:`update` (learn from the failed attempts of this round).
    """

    takes_messages = True

    def __init__(self, k: int = 32, *, check: Callable[[str, str], bool] | None = None, feedback: str = INCORRECT,
                 temperature: float = 0.6, top_p: float = 0.95, stop=None, seed: int | None = None, **options):
        super().__init__(**options)
        self.k = check_budget(k, "k", type(self).__name__)
        if not isinstance(feedback, str) or not feedback.strip():
            raise StrategyError(f"{type(self).__name__} needs a non-empty feedback text")
        if temperature < 0:
            raise StrategyError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        self.check, self.feedback = check, feedback
        self.temperature, self.top_p, self.stop, self.seed = temperature, top_p, stop, seed

    @property
    def max_attempts(self) -> int:
        return self.k

    # -- subclass interface
    def start(self, backend, rendered: list[str]) -> None:
        """Fresh per-question state for the questions whose rendered prompts are ``rendered``."""
        raise NotImplementedError

    def delta_for(self, i: int, attempt: int) -> dict[str, LowRankDelta] | None:
        raise NotImplementedError

    def update(self, backend, failed: list[tuple[int, list[dict], str]], attempt: int) -> None:
        """Learn from ``(question index, chat messages, attempt text)`` of this round's failures."""
        raise NotImplementedError

    # -- the loop
    def run(self, backend, prompts, *, golds=None):
        name = type(self).__name__
        if not hasattr(backend, "model"):
            raise StrategyError(f"{name} updates weights with backpropagation: it needs an HFBackend")
        if self.check is None:
            raise StrategyError(f"{name} learns from verdicts: it needs an oracle check(text, gold) (FeedbackLoop "
                                "with Verifier.oracle(), or -p oracle=1 in guidedecode eval)")
        golds = oracle_golds(prompts, golds, self.check, name)
        if any(g is None for g in golds):
            raise StrategyError(f"{name} needs a gold answer for every question (the oracle's feedback)")
        histories = [as_messages(backend, prompt, name) for prompt in prompts]
        rendered = [backend.chat_prompt(h) for h in histories]
        logs = [AttemptLog(self.k, check=self.check, gold=gold) for gold in golds]
        self.start(backend, rendered)
        for attempt in range(1, self.k + 1):
            active = [i for i, log in enumerate(logs) if not log.done]
            if not active:
                break
            deltas = [self.delta_for(i, attempt) for i in active]
            completions = self._generate(backend, [rendered[i] for i in active], attempt, deltas)
            failed = []
            for i, completion, delta in zip(active, completions, deltas):
                logs[i].add(completion, edited=delta is not None)
                if not logs[i].done:
                    failed.append((i, histories[i], completion.text))
            if failed:
                self.update(backend, failed, attempt)
        return [log.result(log.attempts[-1], generated_tokens=sum(c.num_tokens for c in log.attempts))
                for log in logs]

    def _generate(self, backend, rendered, attempt, deltas):
        if all(d is None for d in deltas):
            return generate(self, backend, rendered, attempt)
        targets = sorted({t for d in deltas if d is not None for t in d})
        with torch.no_grad():
            injector = DeltaInjector(backend.model, {t: [None if d is None else d.get(t) for d in deltas]
                                                      for t in targets})
        saved, backend.deltas = getattr(backend, "deltas", None), injector
        try:
            with injector:
                return generate(self, backend, rendered, attempt)
        finally:
            backend.deltas = saved


def _count(backend, *, forward_tokens: int = 0, forwards: int = 0, backward_tokens: int = 0,
           backwards: int = 0) -> None:
    stats = backend.stats
    stats.prompt_tokens += forward_tokens
    stats.forward_passes += forwards
    stats.extra["backward_passes"] = stats.extra.get("backward_passes", 0) + backwards
    stats.extra["backward_tokens"] = stats.extra.get("backward_tokens", 0) + backward_tokens


# ---------------------------------------------------------------------------------------------- OpTune


class OpTune(WeightUpdateStrategy):
    """OpTune attempts (see the module docstring): ``editor`` is a trained :class:`OpTuneEditor`."""

    def __init__(self, k: int = 32, *, editor: OpTuneEditor, schedule: str = "alternate",
                 edit_accumulation: str = "replace", **options):
        if not isinstance(editor, OpTuneEditor):
            raise StrategyError(f"OpTune needs editor=OpTuneEditor (trained, or for_model at init), "
                                f"got {type(editor).__name__}")
        if schedule not in SCHEDULES:
            raise StrategyError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")
        if edit_accumulation not in ACCUMULATION:
            raise StrategyError(f"edit_accumulation must be one of {', '.join(ACCUMULATION)}, got {edit_accumulation!r}")
        options.setdefault("feedback", editor.config.feedback)
        super().__init__(k, **options)
        self.editor = editor.eval()
        self.schedule, self.edit_accumulation = schedule, edit_accumulation

    def start(self, backend, rendered):
        self.editor.check_model(backend.model)
        self.editor.to(backend.device)
        self.edits: list[dict | None] = [None] * len(rendered)

    def _uses_edit(self, attempt: int) -> bool:
        return self.schedule == "always_edit" or attempt % 2 == 0  # alternate: attempts 2, 4, ... edited

    def delta_for(self, i, attempt):
        return self.edits[i] if self._uses_edit(attempt) else None

    def update(self, backend, failed, attempt):
        if attempt >= self.k:
            return
        if self.edit_accumulation == "replace" and not self._uses_edit(attempt + 1):
            return  # the next attempt is unedited and this edit would be replaced before any use
        tokenizer = backend.tokenizer
        sequences = [self.editor.edit_sequence(tokenizer, messages, text, self.feedback) for _, messages, text in failed]
        for start in range(0, len(failed), backend.batch_size):
            chunk = sequences[start:start + backend.batch_size]
            ids, mask = left_pad(chunk, backend.pad_token_id, backend.device)
            captured = self.editor.capture(backend.model, ids, mask)  # at the base weights: no injector attached
            with torch.no_grad():
                edits = [{name: _detached(d) for name, d in edit.items()} for edit in self.editor.deltas_from(captured)]
            _count(backend, forward_tokens=int(mask.sum()), forwards=1, backward_tokens=int(mask.sum()), backwards=1)
            for (i, _, _), edit in zip(failed[start:start + backend.batch_size], edits):
                old = self.edits[i]
                self.edits[i] = edit if old is None or self.edit_accumulation == "replace" else {
                    name: concat(old[name], edit[name]) for name in edit}


def _detached(delta: LowRankDelta) -> LowRankDelta:
    scale = delta.scale.detach() if torch.is_tensor(delta.scale) else delta.scale
    return LowRankDelta(delta.A.detach(), delta.B.detach(), scale)


def concat(a: LowRankDelta, b: LowRankDelta) -> LowRankDelta:
    """``ΔW_a + ΔW_b`` as one factored delta (ranks add)."""
    sa = a.scale.float() if torch.is_tensor(a.scale) else a.scale
    sb = b.scale.float() if torch.is_tensor(b.scale) else b.scale
    return LowRankDelta(torch.cat([a.A, b.A]), torch.cat([a.B * sa, b.B * sb], dim=1), 1.0)


# ---------------------------------------------------------------------------------------------- FTTT


class FTTT(WeightUpdateStrategy):
    """FTTT (``reflection=False``) and FTTT+ (``reflection=True``) attempts (see the module docstring)."""

    def __init__(self, k: int = 32, *, reflection: bool = False, rank: int = 4, alpha: float = 16.0,
                 modules=("q_proj", "v_proj"), layers=None, lr: float = 1e-5, reflection_weight: float = 1.0,
                 reflection_tokens: int = 256, **options):
        super().__init__(k, **options)
        self.reflection = bool(reflection)
        self.rank = validation.positive_int("rank", rank, error=StrategyError)
        self.alpha = validation.number("alpha", alpha, above=0, error=StrategyError)
        self.lr = validation.number("lr", lr, above=0, error=StrategyError)
        self.modules, self.layers = modules, layers
        self.reflection_weight, self.reflection_tokens = float(reflection_weight), int(reflection_tokens)

    def start(self, backend, rendered):
        model = backend.model
        self.targets = find_targets(model, self.modules, self.layers)
        modules = dict(model.named_modules())
        self.adapters = []  # per question: {target: (A, B)} leaf tensors, fresh for each question
        for prompt in rendered:
            # A seeded by (seed, question): a question's adapter does not depend on the batch it runs in
            seed = zlib.crc32(prompt.encode()) + 1_000_003 * (0 if self.seed is None else self.seed)
            generator = torch.Generator().manual_seed(seed)
            adapter = {}
            for name in self.targets:
                m = modules[name]
                A = torch.empty(self.rank, m.in_features)
                _kaiming_uniform_(A, generator)  # peft's default LoRA A init; B = 0: the first attempt is the base model
                adapter[name] = (A.to(m.weight.device).requires_grad_(True),
                                 torch.zeros(m.out_features, self.rank, device=m.weight.device, requires_grad=True))
            self.adapters.append(adapter)
        params = [t for adapter in self.adapters for pair in adapter.values() for t in pair]
        # one AdamW over every question's adapter: the update is elementwise, so it equals one optimiser per
        # question as long as only the failing questions' tensors carry gradients (others have grad None)
        self.optimizer = torch.optim.AdamW(params, lr=self.lr, weight_decay=0.0)
        self.steps = [0] * len(rendered)

    def delta_for(self, i, attempt):
        if self.steps[i] == 0:
            return None  # B = 0: the adapter is the identity until its first step
        return self.lora_delta(i, detach=True)

    def lora_delta(self, i: int, *, detach: bool = False) -> dict[str, LowRankDelta]:
        scale = self.alpha / self.rank
        return {name: LowRankDelta(A.detach() if detach else A, B.detach() if detach else B, scale)
                for name, (A, B) in self.adapters[i].items()}

    def update(self, backend, failed, attempt):
        if attempt >= self.k:
            return
        reflections = self._reflections(backend, failed, attempt) if self.reflection else [None] * len(failed)
        for start in range(0, len(failed), backend.batch_size):
            chunk = failed[start:start + backend.batch_size]
            pieces = [self.feedback_pieces(backend.tokenizer, messages, text, reflection)
                      for (_, messages, text), reflection in zip(chunk, reflections[start:start + len(chunk)])]
            rows = [i for i, _, _ in chunk]
            loss = self.feedback_loss(backend, rows, pieces)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            for i in rows:
                self.steps[i] += 1

    # -- pieces
    def feedback_pieces(self, tokenizer, messages, attempt_text, reflection=None) -> dict:
        """Token ids: ``context`` = chat(q) ‖ y (the attempt as generated), ``feedback`` = the rest of
        chat(q, y, user(feedback)), with per-token weights (FTTT+: reflection tokens weighted separately)."""
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        text = (f"{self.feedback} {reflection}".strip() if reflection is not None else self.feedback)
        full = tokenizer.apply_chat_template(messages + [{"role": "assistant", "content": attempt_text},
                                                         {"role": "user", "content": text}], tokenize=False)
        if not tokenizer.is_fast:
            raise StrategyError("FTTT needs a fast tokenizer (token offsets split the feedback turn)")
        enc = tokenizer(full, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = enc["input_ids"], enc["offset_mapping"]
        body = attempt_text.strip()  # chat templates may strip the assistant turn
        found = full.find(body, len(prompt) - 1) if body else len(prompt)
        if found < 0 or not full.startswith(prompt[: max(len(prompt) - 1, 0)]):
            raise StrategyError("the attempt does not follow the prompt in the rendered conversation: the chat "
                                "template rewrites assistant turns, so the (q, y) context cannot be rebuilt")
        context_end = found + len(body)
        split = next((k for k, (s, e) in enumerate(offsets) if e > context_end), len(ids))
        split = max(split, 1)
        reflection_span = None
        if reflection is not None and reflection:
            r0 = full.rfind(reflection)
            reflection_span = (r0, r0 + len(reflection))
        kinds = []
        for s, e in offsets[split:]:
            inside = reflection_span is not None and e > reflection_span[0] and s < reflection_span[1]  # overlaps
            kinds.append("reflection" if inside else "feedback")
        return {"context": ids[:split], "feedback": ids[split:], "kinds": kinds}

    def feedback_loss(self, backend, rows: list[int], pieces: list[dict]) -> torch.Tensor:
        """Σ over questions of the feedback NLL with the (q, y) KV cache as constants (see the module docstring).

        Feedback tokens ``f_1..f_m`` are fed after the cached context; ``f_{j+1}`` is predicted from ``f_j``
        (``f_1`` itself, predicted by the context's last state, carries no gradient to the adapter through
        the fed tokens and is left out, as when only f's tokens are fed).
        """
        model, device = backend.model, backend.device
        contexts = [p["context"] for p in pieces]
        ctx_ids, ctx_mask = left_pad(contexts, backend.pad_token_id, device)
        width = max(len(p["feedback"]) for p in pieces)
        if width < 2:
            raise StrategyError("the feedback turn has fewer than two tokens: nothing to train on")
        fb = torch.full((len(rows), width), backend.pad_token_id, dtype=torch.long)
        fb_mask = torch.zeros((len(rows), width), dtype=torch.long)
        weights = torch.zeros((len(rows), width))
        for r, p in enumerate(pieces):
            n = len(p["feedback"])
            fb[r, :n] = torch.tensor(p["feedback"])
            fb_mask[r, :n] = 1
            kinds = p["kinds"][1:]  # targets f_2..f_m
            n_ref = sum(k == "reflection" for k in kinds)
            n_fb = len(kinds) - n_ref
            for j, kind in enumerate(kinds):
                weights[r, j] = (self.reflection_weight / n_ref) if kind == "reflection" else 1.0 / n_fb
        fb, fb_mask, weights = fb.to(device), fb_mask.to(device), weights.to(device)
        positions = (ctx_mask.cumsum(-1) - 1).clamp(min=0)
        fb_positions = ctx_mask.sum(1, keepdim=True) + torch.arange(width, device=device)[None]
        cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        deltas = {t: [self.lora_delta(i)[t] for i in rows] for t in self.targets}
        with torch.no_grad():
            with DeltaInjector(model, {t: [LowRankDelta(d.A.detach(), d.B.detach(), d.scale) for d in ds]
                                       for t, ds in deltas.items()}):
                cache = model(input_ids=ctx_ids, attention_mask=ctx_mask, position_ids=positions,
                              use_cache=True).past_key_values
        with DeltaInjector(model, deltas):
            logits = model(input_ids=fb, attention_mask=torch.cat([ctx_mask, fb_mask], 1), position_ids=fb_positions,
                           use_cache=True, **{cache_kw: cache}).logits
        nll = torch.nn.functional.cross_entropy(logits[:, :-1].float().transpose(1, 2), fb[:, 1:], reduction="none")
        loss = (nll * weights[:, : width - 1] * fb_mask[:, 1:]).sum()
        tokens = int(ctx_mask.sum()) + int(fb_mask.sum())
        _count(backend, forward_tokens=tokens, forwards=2, backward_tokens=int(fb_mask.sum()), backwards=1)
        return loss

    def _reflections(self, backend, failed, attempt) -> list[str]:
        """FTTT+: a reflection per failed attempt, sampled from the base model (adapter disabled)."""
        prompts = [backend.chat_prompt(messages + [{"role": "assistant", "content": text},
                                                   {"role": "user", "content": REFLECT}])
                   for _, messages, text in failed]
        saved = self.max_new_tokens
        self.max_new_tokens = self.reflection_tokens
        try:
            completions = generate(self, backend, prompts, 10_000 + attempt)
        finally:
            self.max_new_tokens = saved
        return [c.text.strip() or "." for c in completions]


def _kaiming_uniform_(tensor: torch.Tensor, generator: torch.Generator) -> None:
    """``nn.init.kaiming_uniform_(a=sqrt(5))`` (peft's LoRA A init) from a seeded generator."""
    fan_in = tensor.shape[1]
    bound = math.sqrt(6.0 / ((1 + 5.0) * fan_in))
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)
