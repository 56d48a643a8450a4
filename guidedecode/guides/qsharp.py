"""Q♯ value-guided sampling as a token guide (an HF ``LogitsProcessor``).

Paper: Zhou et al., "Q♯: Provably Optimal Distributional RL for LLM Post-Training", arXiv 2502.20548
(reference code ``jinpz/q_sharp``). The ``cd`` mode is Controlled Decoding (Mudgal et al., arXiv 2310.17022).

Eta convention: ``eta = 1 / eta_paper`` (guidance strength, default 10); ``kl_coef = eta_paper`` is an alias.

Per decode step and row, with raw (un-tempered) reference logits ``l``:

1. rows with ``eta = 0`` are untouched; if every row has ``eta = 0`` the value model is never run;
2. candidates ``C`` = top-``k`` of ``l`` (default ``k = 20``; ``k = -1``: the whole vocabulary);
3. the value model scores ``prefix + v`` for each ``v ∈ C``: logit ``z_v`` (``num_atoms`` logits in ``mle``);
4. offsets ``o_v`` (:func:`qsharp_offsets`) are added to the ``k`` candidate logits only; the tail keeps
   ``l`` (offset 0), nothing is masked (``tail="mask"``, a named deviation, and ``fudge`` mode drop the
   tail instead: ``-inf`` outside ``C``);
5. HF's own warpers follow (temperature ``T``, then top-p), so tokens are drawn from
   ``TopP(softmax((l + o) / T))``. Pass ``top_k=0`` to ``generate`` for the reference behaviour (HF's
   default top-50 would otherwise truncate too).

The offsets-add and the KL accounting run in one pass of :func:`guidedecode.kernels.guidance.guidance`
(Triton on GPU, torch reference on CPU). Per generated token (every step at which a row is still alive,
the EOS step included) the guide adds ``KL(softmax((l+o)/T) || softmax(l/T))`` to ``kl`` and the KL of the
distribution actually sampled, ``TopP(softmax((l+o)/T))`` (``eta = 0`` still gives
``-log(nucleus mass) > 0``), to ``kl_sample``; :meth:`QSharpGuide.sequence_kl` returns both per row.
Inside ``generate`` the guide reads the temperature and top-p that ``generate`` applies after it (its
:class:`~guidedecode.guides.generate_call.GenerateCall`), so the sampling settings live in one place; a
``temperature``/``top_p`` given to the guide must equal them, and any other warper after the guide (HF's
default top-50 when ``top_k=0`` is not passed, min-p, ...) is an error instead of a silently wrong KL.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from guidedecode.errors import GuideError
from guidedecode.guides.base import TokenGuide
from guidedecode.kernels.guidance import guidance, guidance_torch
from guidedecode.value_model import ValueModel, ValueState

__all__ = ["MODES", "qsharp_offsets", "QSharpGuide"]

MODES = ("bernoulli", "cd", "expectation", "mle", "fudge")
TAILS = ("zero", "mask")
DEFAULT_ETA = 10.0


def _eta_column(eta, like: torch.Tensor) -> torch.Tensor:
    """eta as a ``[B, 1]`` fp32 column (from a float or a ``[B]`` tensor)."""
    if isinstance(eta, torch.Tensor):
        return eta.to(device=like.device, dtype=torch.float32).reshape(-1, 1)
    return torch.full((1, 1), float(eta), dtype=torch.float32, device=like.device)


def qsharp_offsets(z: torch.Tensor, mode: str = "bernoulli", eta=DEFAULT_ETA, *,
                   atoms: torch.Tensor | None = None) -> torch.Tensor:
    """Guidance offsets ``o [B, k]`` from value logits ``z`` (``[B, k]``; ``[B, k, A]`` for ``mle``).

    With ``p = sigmoid(z)`` and ``eta`` a float or a ``[B]`` tensor (``eta = 1/eta_paper``):

    * ``bernoulli`` (Q♯): ``o = log(1 - p + p e^eta) = softplus(eta + z) - softplus(z)``, in ``[0, eta]``,
      exactly 0 at ``eta = 0``;
    * ``cd`` (Controlled Decoding): ``o = eta · p``;
    * ``expectation``: ``o = log sigmoid(z)`` (the classifier predicts ``E[exp(eta (r - 1))]``; eta is baked
      in at training, so it is unused here);
    * ``mle``: ``l_v = logsumexp_j(log_softmax(z_v)_j + eta a_j)``, ``o_v = l_v - min_{u ∈ C} l_u`` (``≥ 0``,
      minimum exactly 0 per row); ``atoms`` default ``linspace(0, 1, A)``;
    * ``fudge`` (FUDGE, Yang & Klein 2021): ``o = log sigmoid(z)``, so ``π ∝ π_ref · p`` on ``C`` (the
      large-eta limit of ``bernoulli`` up to a constant); the guide drops the tokens outside ``C``.
    """
    if mode not in MODES:
        raise GuideError(f"unknown Q# mode '{mode}': choose one of {', '.join(MODES)}")
    z = z.float()
    if mode == "mle":
        if z.dim() != 3:
            raise GuideError(f"mode 'mle' needs value logits [B, k, num_atoms], got shape {tuple(z.shape)}")
        if atoms is None:
            atoms = torch.linspace(0.0, 1.0, z.shape[-1], device=z.device)
        atoms = atoms.to(device=z.device, dtype=torch.float32)
        if atoms.shape != (z.shape[-1],):
            raise GuideError(f"atoms must have shape ({z.shape[-1]},), got {tuple(atoms.shape)}")
        eta3 = _eta_column(eta, z)[..., None]  # [B or 1, 1, 1]
        level = torch.logsumexp(torch.log_softmax(z, dim=-1) + eta3 * atoms, dim=-1)  # [B, k]
        return level - level.min(dim=-1, keepdim=True).values
    if z.dim() == 3:
        if z.shape[-1] != 1:
            raise GuideError(f"mode '{mode}' needs one value logit per candidate, got {z.shape[-1]} atoms "
                             "(an mle value model uses mode 'mle')")
        z = z[..., 0]
    e = _eta_column(eta, z)
    if mode == "bernoulli":
        zero = torch.zeros((), dtype=z.dtype, device=z.device)
        o = torch.logaddexp(e + z, zero) - torch.logaddexp(z, zero)
        return torch.minimum(o.clamp_min(0.0), e.expand_as(o))  # rounding only: the exact value lies in [0, eta]
    if mode == "cd":
        return e * torch.sigmoid(z)
    return torch.nn.functional.logsigmoid(z)  # expectation, fudge


def _guidance(scores, *args, **kwargs):
    """The fused Triton epilogue for CUDA logits; on CPU its eager torch counterpart ``guidance_torch``
    (closed-form KL, sparse offsets, nucleus from a top-k; also under ``TRITON_INTERPRET=1``, which is for
    testing the kernel itself: the interpreter is far too slow for a decode loop). Both are tested against
    ``guidance_reference`` in ``tests/test_kernel_guidance.py``."""
    fn = guidance if scores.is_cuda else guidance_torch
    return fn(scores, *args, **kwargs)


@dataclass
class _State:
    value: ValueState | None  # None when every row has eta = 0 (the value model is never run)
    eta: torch.Tensor  # [B] fp32
    kl: torch.Tensor  # [B] fp32, summed over generated tokens
    kl_sample: torch.Tensor  # [B] fp32


class QSharpGuide(TokenGuide):
    """Q♯ / CD value guidance: offsets from ``value_model`` on the reference model's top-``k`` candidates.

    ``eta`` (default 10) is a float or one value per row of the ``generate`` batch (rows = prompts x
    ``num_return_sequences``; a sequence with one value per prompt is repeated over its return sequences).
    ``mode`` defaults to ``"mle"`` for an mle value model and ``"bernoulli"`` otherwise.
    ``tail``: ``"zero"`` (the reference: tokens outside ``C`` keep their logit) or ``"mask"`` (a deliberate
    deviation: guided rows sample from ``C`` only; ``fudge`` mode implies it). With ``"mask"`` the KL uses
    ``KL(π_g || π_ref) = KL(π_g || π_ref|C) - log π_ref(C)``, ``π_ref|C`` the reference renormalised on ``C``.
    Use it as ``model.generate(..., logits_processor=[guide], do_sample=True, temperature=T, top_p=p,
    top_k=0)``: the KL accounting uses the ``T`` and ``p`` that ``generate`` applies (``temperature`` /
    ``top_p`` given here are checked against them; called outside ``generate`` they default to 1).
    The guide finds each row's prompt by its leading pad tokens: the pad id is ``pad_token_id``, else the
    ``tokenizer``'s, else the one ``generate`` pads with; a batch whose prompts differ with no pad id known is
    refused. Rows finish on the EOS ids ``generate`` stops on (``eos_token_id`` / the tokenizer's outside it).
    Rows are tracked by content (:class:`TokenGuide`), so sampling, greedy, ``num_return_sequences``, rows
    that finish early and beam search (reordered rows: :meth:`ValueModel.select`) are all supported.
    """

    def __init__(self, value_model: ValueModel, *, eta=None, kl_coef: float | None = None, mode: str | None = None,
                 top_k: int = 20, tokenizer=None, temperature: float | None = None, top_p: float | None = None,
                 tail: str | None = None, eos_token_id=None, pad_token_id: int | None = None):
        if not isinstance(value_model, ValueModel):
            raise GuideError(f"QSharpGuide needs a guidedecode ValueModel, got {type(value_model).__name__}")
        if eta is not None and kl_coef is not None:
            raise GuideError("give either eta (= 1/eta_paper) or kl_coef (= eta_paper), not both")
        if kl_coef is not None:
            if not (isinstance(kl_coef, (int, float)) and kl_coef > 0):
                raise GuideError(f"kl_coef must be a number > 0, got {kl_coef!r}")
            eta = 1.0 / float(kl_coef)
        self.eta = self._check_eta(DEFAULT_ETA if eta is None else eta)
        config = value_model.config
        if mode is None:
            mode = "mle" if config.loss == "mle" else "bernoulli"
        if mode not in MODES:
            raise GuideError(f"unknown Q# mode '{mode}': choose one of {', '.join(MODES)}")
        if tail is None:
            tail = "mask" if mode == "fudge" else "zero"
        if tail not in TAILS:
            raise GuideError(f"unknown tail '{tail}': choose one of {', '.join(TAILS)}")
        if mode == "fudge" and tail != "mask":
            raise GuideError("mode 'fudge' drops the tokens outside the candidates (tail='mask'); "
                             "log-sigmoid offsets with the tail kept are mode 'expectation'")
        if (mode == "mle") != (config.loss == "mle"):
            raise GuideError(f"mode '{mode}' does not fit a value model trained with loss '{config.loss}' "
                             "(mle value models use mode 'mle', and only they do)")
        if not isinstance(top_k, int) or isinstance(top_k, bool) or not (top_k == -1 or top_k >= 1):
            raise GuideError(f"top_k must be a positive number of candidates or -1 (whole vocabulary), got {top_k!r}")
        if top_k > config.vocab_size:
            raise GuideError(f"top_k={top_k} exceeds the vocabulary size {config.vocab_size}")
        if temperature is not None and not (isinstance(temperature, (int, float)) and temperature > 0
                                            and math.isfinite(temperature)):
            raise GuideError(f"temperature must be a finite number > 0, got {temperature!r}")
        if top_p is not None and not (isinstance(top_p, (int, float)) and 0 < top_p <= 1):
            raise GuideError(f"top_p must be in (0, 1], got {top_p!r}")
        if tokenizer is not None:
            value_model.check_tokenizer(tokenizer)
            if pad_token_id is None:
                pad_token_id = tokenizer.pad_token_id
            if eos_token_id is None:
                eos_token_id = tokenizer.eos_token_id
        self.value_model = value_model
        self.mode = mode
        self.tail = tail
        self.top_k = top_k
        self._given_sampling = {"temperature": temperature, "top_p": top_p}
        self.temperature = 1.0 if temperature is None else float(temperature)  # in force: see _follow_sampling
        self.top_p = 1.0 if top_p is None else float(top_p)
        self.atoms = config.atoms() if mode == "mle" else None
        super().__init__(eos_token_id=eos_token_id, pad_token_id=pad_token_id)

    @staticmethod
    def _check_eta(eta) -> torch.Tensor | float:
        if isinstance(eta, (int, float)) and not isinstance(eta, bool):
            values = torch.tensor([float(eta)])
        elif isinstance(eta, (torch.Tensor, Sequence)) and not isinstance(eta, (str, bytes)):
            try:
                values = torch.as_tensor(eta, dtype=torch.float32).reshape(-1)
            except (TypeError, ValueError, RuntimeError):
                raise GuideError(f"eta must be a number or one number per row, got {eta!r}") from None
            if values.numel() == 0:
                raise GuideError("eta is an empty sequence: give a number or one value per row")
        else:
            raise GuideError(f"eta must be a number or one number per row, got {eta!r} ({type(eta).__name__})")
        if not bool(torch.isfinite(values).all()) or bool((values < 0).any()):
            raise GuideError(f"eta (= 1/eta_paper) must be finite and >= 0, got {values.tolist()}")
        return float(values[0]) if isinstance(eta, (int, float)) else values.float()

    # ------------------------------------------------------------------------------------------ hooks
    def _row_eta(self, rows: int, device) -> torch.Tensor:
        eta = self.eta
        if not isinstance(eta, torch.Tensor):
            return torch.full((rows,), eta, dtype=torch.float32, device=device)
        n = eta.numel()
        if n == rows:
            return eta.to(device)
        if n and rows % n == 0:  # one value per prompt, num_return_sequences rows each (HF interleaves them)
            return eta.to(device).repeat_interleave(rows // n)
        raise GuideError(f"eta has {n} values but generate runs {rows} rows (give one per row or one per prompt)")

    def init_state(self, prompt_ids, prompt_mask):
        rows = prompt_ids.shape[0]
        if self._pad is None and rows > 1 and not bool((prompt_ids == prompt_ids[:1]).all()):
            raise GuideError("QSharpGuide got prompts that differ (so they may be left-padded) but knows no pad "
                             "token id: give pad_token_id= or tokenizer=, or pass pad_token_id to generate")
        eta = self._row_eta(rows, prompt_ids.device)
        value = None
        if bool((eta > 0).any()):
            value = self.value_model.start(prompt_ids, prompt_mask.long())
        zeros = torch.zeros(rows, dtype=torch.float32, device=prompt_ids.device)
        return _State(value=value, eta=eta, kl=zeros, kl_sample=zeros.clone())

    def update_state(self, state, tokens, alive):
        if state.value is not None:
            self.value_model.advance(state.value, tokens, alive)
        return state

    def select_state(self, state, rows):
        value = None if state.value is None else self.value_model.select(state.value, rows)
        return _State(value=value, eta=state.eta[rows], kl=state.kl[rows], kl_sample=state.kl_sample[rows])

    def adjust(self, scores, state, active):
        vocab = scores.shape[-1]
        if self.steps == 0 and vocab > self.value_model.config.vocab_size:
            raise GuideError(f"the reference model scores {vocab} tokens but the value model knows only "
                             f"{self.value_model.config.vocab_size}")
        if self.steps == 0:
            self._follow_sampling(vocab)
        if self.top_k > vocab:
            raise GuideError(f"top_k={self.top_k} exceeds the reference vocabulary size {vocab}")
        top_p = None if self.top_p >= 1.0 else self.top_p
        guided = active & (state.eta > 0)
        if state.value is None:  # every row has eta = 0: an exact no-op, only the KL is recorded
            stats = _guidance(scores, temperature=self.temperature, top_p=top_p)
            result = scores
        else:
            k = vocab if self.top_k == -1 else self.top_k
            candidates = scores.topk(k, dim=-1).indices
            z = self.value_model.candidate_logits(state.value, candidates)
            if bool(torch.isnan(z).any()):
                raise GuideError(f"the value model produced NaN logits (decode step {self.steps})")
            offsets = qsharp_offsets(z, self.mode, state.eta, atoms=self.atoms)
            offsets = torch.where(guided[:, None], offsets, torch.zeros((), device=offsets.device))
            if self.tail == "mask":
                result, stats = self._masked(scores, candidates, offsets.to(scores.device), top_p)
                if not bool(guided.all()):  # unguided rows keep the full reference: their KLs come unmasked
                    plain = _guidance(scores, temperature=self.temperature, top_p=top_p)
                    stats = stats._replace(**{
                        name: torch.where(guided, getattr(stats, name), getattr(plain, name))
                        for name in ("kl", "kl_top_p") if getattr(stats, name) is not None})
            else:
                result = torch.empty_like(scores)  # never edit `scores` in place: it may be HF's stored raw logits
                stats = _guidance(scores, offsets.to(scores.device), idx=candidates, out=result,
                                  temperature=self.temperature, top_p=top_p)
            result = torch.where(guided[:, None], result, scores)  # unguided rows: bit-exact originals
        zero = torch.zeros((), device=scores.device)
        state.kl += torch.where(active, stats.kl, zero)
        state.kl_sample += torch.where(active, stats.kl if top_p is None else stats.kl_top_p, zero)
        return result

    def _follow_sampling(self, vocab: int) -> None:
        """Put in force the temperature and top-p that ``generate`` applies after the guide; a setting given to
        the guide that differs, or another warper there, is a GuideError (never a silently wrong KL)."""
        if self.generate_call is None:  # called directly: the given settings (default 1) are the caller's
            return
        applied = dict(zip(("temperature", "top_p"), self.generate_call.sampling(vocab, "QSharpGuide")))
        for name, value in applied.items():
            given = self._given_sampling[name]
            if given is not None and not math.isclose(given, value, rel_tol=1e-6):
                raise GuideError(f"QSharpGuide was given {name}={given} but generate applies {name}={value} after "
                                 f"it: pass the same {name} to both, or leave it out of the guide")
        self.temperature, self.top_p = applied["temperature"], applied["top_p"]

    def _masked(self, scores, candidates, offsets, top_p):
        """``tail="mask"``: guided logits ``l + o`` on ``C`` and ``-inf`` elsewhere; the guidance epilogue runs
        on the ``[B, k]`` candidate logits, and ``-log π_ref(C)`` turns its KLs (against the reference
        renormalised on ``C``) into KLs against the full reference."""
        sub = scores.gather(-1, candidates).float()
        guided_sub = torch.empty_like(sub)
        stats = _guidance(sub, offsets, out=guided_sub, temperature=self.temperature, top_p=top_p)
        tempered = scores.float() / self.temperature
        log_mass_c = torch.logsumexp(sub / self.temperature, -1) - torch.logsumexp(tempered, -1)  # log π_ref(C)
        result = torch.full_like(scores, float("-inf"))
        result.scatter_(-1, candidates, guided_sub.to(scores.dtype))
        kl_top_p = None if stats.kl_top_p is None else stats.kl_top_p - log_mass_c
        return result, stats._replace(kl=stats.kl - log_mass_c, kl_top_p=kl_top_p)

    # ------------------------------------------------------------------------------------------ results
    def sequence_kl(self) -> dict[str, torch.Tensor]:
        """Per row of the last ``generate`` call (prompts x ``num_return_sequences``, output order):
        ``kl`` = Σ over generated tokens of KL(guided || reference) before top-p, both at temperature ``T``;
        ``kl_sample`` = the same for the post-top-p distribution that was sampled."""
        if self.state is None:
            raise GuideError("sequence_kl() needs a finished generate call with this guide")
        return {"kl": self.state.kl.clone(), "kl_sample": self.state.kl_sample.clone()}
