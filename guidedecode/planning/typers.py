"""Step typers: one small class each, mapping every reasoning step of an example to its type(s).

A typer sees examples ``{"question": str, "steps": [str], "answer": str}`` and returns, per example,
one list of type names per step (usually one name; the arithmetic typer may give several, and an
empty list means the step gets the ``assignment`` block). ``fit`` learns what the typer needs (k-means
only); ``types`` lists the names it can return (they become planning-token keys).

* :class:`LabelTyper` (``memreason``, Jin et al. arXiv 2411.13504): a leading ``[rag]:`` label is
  ``memory``, ``[reason]:`` is ``reason``; the label is removed from the step text. A step without a
  known label is an error naming the example and step.
* :class:`KMeansTyper` (``kmeans``, Wang et al. arXiv 2310.05707 Sec. 3): a step's vector is the mean
  last-layer hidden state over its tokens when the whole example ``"Question: q\\n " + steps joined by
  " \\n"`` is encoded (causal, so it depends on the question and earlier steps); token spans come from
  the tokenizer's offsets (no hard-coded newline id); ``KMeans(K, n_init=10, random_state=seed)``.
* :class:`SQVAETyper` (``sqvae``, Wang et al. Sec. 3, reference ``model/vae.py``): the same step vectors
  through a soft-quantised VAE: encoder MLP -> Gaussian (mu, log sigma^2) over K logits, z ~ N(mu, sigma^2),
  code = softmax(z) W (a 64-d soft-quantised code), decoder MLP reconstructs the step vector;
  L = 0.5 squared error + 0.1 KL(N(mu, sigma^2) || N(0, I)), with the reference's ``contrastive`` (default)
  and ``next_step`` variants (:class:`SQVAE`); Adam 1e-4, 10 epochs, one batch = the steps of one example;
  type = argmax softmax(mu), names ``vae0..vae{K-1}``.
* :class:`ArithmeticTyper` (``arith``): the operators of the step's ``<<a*b=c>>`` calculator
  annotations (GSM8K), else of its arithmetic expressions ``number op number``; ``+ - * /`` map to
  ``add sub mul div``; several operators give several types, none gives ``assignment``.
* :class:`TfidfTyper` (``tfidf``, Wang et al. Sec. 3): TF-IDF over the training steps (scikit-learn; a
  step is a document, English stop words and tokens under three letters dropped); the K words with the
  largest total TF-IDF become the types, and a step's type is its highest-TF-IDF word among them (none
  present: ``assignment``). The type is the word itself, so its new token rows start from that word's
  embedding.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from torch import nn

from guidedecode.planning.vocab import PlanningTokenError

_LABEL = re.compile(r"^\s*\[(rag|reason)\][^:\n]*:\s*", re.IGNORECASE)


class StepTyper:
    """Base class: ``types`` (names), ``fit(examples)``, ``__call__(examples) -> types per step``."""

    name = ""
    types: tuple[str, ...] = ()

    def fit(self, examples: Sequence[dict]) -> "StepTyper":
        return self

    def clean(self, step: str) -> str:
        """The step text without any label the typer reads."""
        return step.strip()

    def __call__(self, examples: Sequence[dict]) -> list[list[list[str]]]:
        raise NotImplementedError


class LabelTyper(StepTyper):
    """``[rag]: text`` -> ``memory``, ``[reason]: text`` -> ``reason`` (the first tag of a step tagged
    ``[reason] and [rag]``)."""

    name = "memreason"
    types = ("memory", "reason")
    _MAP = {"rag": "memory", "reason": "reason"}

    def label(self, step: str, where: str = "") -> str:
        match = _LABEL.match(step)
        if match is None:
            raise PlanningTokenError(f"{where}step without a [rag]/[reason] label: {step[:60]!r}")
        return self._MAP[match.group(1).lower()]

    def clean(self, step: str) -> str:
        match = _LABEL.match(step)
        return (step[match.end():] if match else step).strip()

    def __call__(self, examples):
        return [[[self.label(step, f"example {example.get('id', i)} step {j}: ")]
                 for j, step in enumerate(example["steps"])] for i, example in enumerate(examples)]


class ArithmeticTyper(StepTyper):
    """Operators of the step's calculator annotations / arithmetic expressions (see module docstring)."""

    name = "arith"
    types = ("add", "sub", "mul", "div")
    _OPS = {"+": "add", "-": "sub", "*": "mul", "x": "mul", "×": "mul", "/": "div", "÷": "div"}
    _ANNOTATION = re.compile(r"<<([^>]*)>>")
    _EXPRESSION = re.compile(r"(?<![\w.])\$?\d[\d,]*(?:\.\d+)?\s*([-+*/×÷x])\s*\$?\(?\d")
    _ANNOTATION_OP = re.compile(r"(?<=[\d)\s])([-+*/])(?=[\s\d(.])")

    def clean(self, step: str) -> str:
        return self._ANNOTATION.sub("", step).strip()

    def step_types(self, step: str) -> list[str]:
        annotations = self._ANNOTATION.findall(step)
        if annotations:
            ops = [op for a in annotations for op in self._ANNOTATION_OP.findall(a.split("=")[0])]
        else:
            ops = self._EXPRESSION.findall(step)
        found = {self._OPS[op] for op in ops}
        return [t for t in self.types if t in found]

    def __call__(self, examples):
        return [[self.step_types(step) for step in example["steps"]] for example in examples]


class _EmbeddingTyper(StepTyper):
    """Types from step vectors: :meth:`embed` gives each step the mean last-layer hidden state of ``model``
    over its tokens (see the module docstring); subclasses cluster or quantise those vectors."""

    prefix = ""

    def __init__(self, model, tokenizer, k: int = 4, *, seed: int = 0, batch_size: int = 8, max_length: int = 1024):
        if isinstance(k, bool) or not isinstance(k, int) or k < 2:
            raise PlanningTokenError(f"{self.name} needs k >= 2 types, got {k!r}")
        self.model, self.tokenizer, self.k, self.seed = model, tokenizer, k, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.types = tuple(f"{self.prefix}{i}" for i in range(k))

    def clean(self, step: str) -> str:
        return _LABEL.sub("", step, count=1).strip()

    @torch.no_grad()
    def embed(self, examples: Sequence[dict]) -> list[torch.Tensor]:
        """Per example, a ``[steps, hidden]`` tensor of mean last-layer hidden states over each step."""
        out = []
        device = next(self.model.parameters()).device
        for example in examples:
            steps = [self.clean(s) for s in example["steps"]]
            text = "Question: " + example["question"] + "\n "
            spans = []
            for j, step in enumerate(steps):
                start = len(text)
                text += step + (" \n" if j < len(steps) - 1 else "")
                spans.append((start, start + len(step)))
            enc = self.tokenizer(text, return_offsets_mapping=True, add_special_tokens=False,
                                 truncation=True, max_length=self.max_length)
            ids = torch.tensor([enc["input_ids"]], device=device)
            hidden = self.model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0].float().cpu()
            offsets = enc["offset_mapping"]
            vectors = []
            for start, end in spans:
                rows = [t for t, (a, b) in enumerate(offsets) if b > start and a < end]
                vectors.append(hidden[rows].mean(0) if rows else torch.zeros(hidden.shape[-1]))
            out.append(torch.stack(vectors) if vectors else torch.zeros(0, hidden.shape[-1]))
        return out


class KMeansTyper(_EmbeddingTyper):
    """K-means over step embeddings from ``model`` (see module docstring); types ``kmeans0..K-1``."""

    name, prefix = "kmeans", "kmeans"
    kmeans = None

    def fit(self, examples):
        from sklearn.cluster import KMeans

        vectors = torch.cat([v for v in self.embed(examples) if len(v)])
        if len(vectors) < self.k:
            raise PlanningTokenError(f"k-means with k={self.k} needs at least {self.k} steps, got {len(vectors)}")
        self.kmeans = KMeans(n_clusters=self.k, n_init=10, random_state=self.seed).fit(vectors.numpy())
        return self

    def __call__(self, examples):
        if self.kmeans is None:
            raise PlanningTokenError("KMeansTyper: call fit(examples) before typing steps")
        result = []
        for vectors in self.embed(examples):
            labels = self.kmeans.predict(vectors.numpy()) if len(vectors) else []
            result.append([[self.types[int(c)]] for c in labels])
        return result


def _mlp(n_in: int, width: int) -> nn.Sequential:
    """The reference's 3-layer MLP (``model/vae.py``: in -> width -> width -> width, ReLU between)."""
    return nn.Sequential(nn.Linear(n_in, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU(), nn.Linear(width, width))


class SQVAE(nn.Module):
    """The soft-quantised VAE of the reference (``model/vae.py``): encoder MLP -> Gaussian (mu, log sigma^2)
    over K logits, z = mu + sigma * eps, code = softmax(z) W_code (``code_dim``), decoder MLP back to the
    step vector. Per batch (the B steps of one example), with KL = KL(N(mu, sigma^2) || N(0, I)):

    * ``plain``: L = 0.5 ||x_hat - x||^2 / B + 0.1 KL / B;
    * ``contrastive`` (the reference's default): the same minus 0.1 times the squared distance of each
      inner step's code to both neighbours' (held fixed), pushing neighbouring steps to other codes;
    * ``next_step``: x_hat of step t reconstructs step t+1: L = 0.5 ||x_hat_{<B} - x_{>1}||^2 / (B - 1) + 0.1 KL / B.
    """

    VARIANTS = ("plain", "contrastive", "next_step")

    def __init__(self, dim: int, k: int, *, width: int = 512, code_dim: int = 64, variant: str = "contrastive"):
        super().__init__()
        if variant not in self.VARIANTS:
            raise PlanningTokenError(f"unknown SQ-VAE variant {variant!r}: choose one of {', '.join(self.VARIANTS)}")
        self.variant = variant
        self.encoder = _mlp(dim, width)
        self.mean, self.log_var = nn.Linear(width, k), nn.Linear(width, k)
        self.code = nn.Linear(k, code_dim, bias=False)
        self.decoder = nn.Sequential(_mlp(code_dim, width), nn.Linear(width, dim))

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        hidden = self.encoder(x)
        return self.mean(hidden), self.log_var(hidden)

    def loss(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch = x.shape[0]
        mu, log_var = self.encode(x)
        noise = torch.randn(mu.shape, generator=generator, dtype=mu.dtype)
        code = self.code(torch.softmax(mu + noise * torch.exp(0.5 * log_var), dim=-1))
        reconstruction = self.decoder(code)
        kl = -0.5 * torch.sum(1 + log_var - mu.pow(2) - log_var.exp()) / batch
        if self.variant == "next_step":
            if batch < 2:  # nothing to predict: the plain objective
                return 0.5 * (reconstruction - x).pow(2).sum() / batch + 0.1 * kl
            return 0.5 * (reconstruction[:-1] - x[1:]).pow(2).sum() / (batch - 1) + 0.1 * kl
        loss = 0.5 * (reconstruction - x).pow(2).sum() / batch + 0.1 * kl
        if self.variant == "contrastive" and batch > 2:
            inner = code[1:-1]
            apart = (inner - code[2:].detach()).pow(2).mean() + (inner - code[:-2].detach()).pow(2).mean()
            loss = loss - 0.1 * apart
        return loss


class SQVAETyper(_EmbeddingTyper):
    """SQ-VAE over step embeddings from ``model`` (see module docstring); types ``vae0..K-1``. Hand-written:
    no library ships this small model; seeded (initialisation, sampling noise, example order)."""

    name, prefix = "sqvae", "vae"
    vae = None

    def __init__(self, model, tokenizer, k: int = 4, *, seed: int = 0, epochs: int = 10, lr: float = 1e-4,
                 variant: str = "contrastive", **kwargs):
        super().__init__(model, tokenizer, k, seed=seed, **kwargs)
        if variant not in SQVAE.VARIANTS:
            raise PlanningTokenError(f"unknown SQ-VAE variant {variant!r}: choose one of {', '.join(SQVAE.VARIANTS)}")
        self.variant = variant
        if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
            raise PlanningTokenError(f"sqvae epochs must be an integer >= 1, got {epochs!r}")
        if not lr > 0:
            raise PlanningTokenError(f"sqvae lr must be > 0, got {lr!r}")
        self.epochs, self.lr = epochs, lr
        self.losses: list[float] = []  # mean training loss per epoch

    def fit(self, examples):
        batches = [v for v in self.embed(examples) if len(v)]
        if sum(len(v) for v in batches) < self.k:
            raise PlanningTokenError(f"sqvae with k={self.k} needs at least {self.k} steps")
        generator = torch.Generator().manual_seed(self.seed)
        with torch.random.fork_rng(devices=[]):  # initialisation from the seed, the global RNG untouched
            torch.manual_seed(self.seed)
            self.vae = SQVAE(batches[0].shape[-1], self.k, variant=self.variant)
        optimizer = torch.optim.Adam(self.vae.parameters(), lr=self.lr)
        self.losses = []
        for _ in range(self.epochs):
            total = 0.0
            for index in torch.randperm(len(batches), generator=generator).tolist():
                loss = self.vae.loss(batches[index], generator)
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                total += float(loss.detach())
            self.losses.append(total / len(batches))
        self.vae.eval()
        return self

    def __call__(self, examples):
        if self.vae is None:
            raise PlanningTokenError("SQVAETyper: call fit(examples) before typing steps")
        result = []
        with torch.no_grad():
            for vectors in self.embed(examples):
                labels = self.vae.encode(vectors)[0].argmax(-1).tolist() if len(vectors) else []
                result.append([[self.types[c]] for c in labels])
        return result


class TfidfTyper(StepTyper):
    """Keyword types by TF-IDF (see module docstring): the ``k`` words with the largest total TF-IDF over
    the training steps; a step's type is its highest-TF-IDF word among them, ``assignment`` if none."""

    name = "tfidf"

    def __init__(self, k: int = 4):
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            raise PlanningTokenError(f"tfidf needs k >= 1 keyword types, got {k!r}")
        self.k = k
        self.types: tuple[str, ...] = ()
        self.vectorizer = None

    def clean(self, step: str) -> str:
        return _LABEL.sub("", step, count=1).strip()

    def fit(self, examples):
        from sklearn.feature_extraction.text import TfidfVectorizer

        from guidedecode.planning.vocab import RESERVED

        steps = [self.clean(s) for example in examples for s in example["steps"]]
        vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z]{3,}\b", lowercase=True)
        try:
            weights = vectorizer.fit_transform(steps)
        except ValueError as error:  # no words at all (empty vocabulary)
            raise PlanningTokenError(f"tfidf: the training steps hold no words to type by ({error})") from error
        words = vectorizer.get_feature_names_out()
        mass = weights.sum(axis=0).A1
        order = sorted(range(len(words)), key=lambda i: (-mass[i], words[i]))  # ties by the word: deterministic
        chosen = [words[i] for i in order if words[i] not in RESERVED][: self.k]
        if len(chosen) < self.k:
            raise PlanningTokenError(f"tfidf with k={self.k} found only {len(chosen)} words in the training steps")
        self.types = tuple(chosen)
        self.vectorizer = TfidfVectorizer(stop_words="english", token_pattern=r"(?u)\b[a-zA-Z]{3,}\b",
                                          lowercase=True, vocabulary=chosen).fit(steps)
        return self

    def __call__(self, examples):
        if self.vectorizer is None:
            raise PlanningTokenError("TfidfTyper: call fit(examples) before typing steps")
        result = []
        for example in examples:
            steps = [self.clean(s) for s in example["steps"]]
            weights = self.vectorizer.transform(steps).toarray() if steps else []
            result.append([[self.types[int(row.argmax())]] if row.max() > 0 else [] for row in weights])
        return result


SCHEMES = ("memreason", "kmeans", "sqvae", "arith", "tfidf")


def make_typer(scheme: str, *, model=None, tokenizer=None, k: int = 4, seed: int = 0) -> StepTyper:
    """The typer of a ``--scheme`` name."""
    if scheme == "memreason":
        return LabelTyper()
    if scheme == "arith":
        return ArithmeticTyper()
    if scheme == "tfidf":
        return TfidfTyper(k)
    if scheme in ("kmeans", "sqvae"):
        if model is None or tokenizer is None:
            raise PlanningTokenError(f"the {scheme} scheme needs the model and tokenizer that embed the steps")
        return (KMeansTyper if scheme == "kmeans" else SQVAETyper)(model, tokenizer, k, seed=seed)
    raise PlanningTokenError(f"unknown step-typing scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
