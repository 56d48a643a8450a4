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
* :class:`ArithmeticTyper` (``arith``): the operators of the step's ``<<a*b=c>>`` calculator
  annotations (GSM8K), else of its arithmetic expressions ``number op number``; ``+ - * /`` map to
  ``add sub mul div``; several operators give several types, none gives ``assignment``.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

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


class KMeansTyper(StepTyper):
    """K-means over step embeddings from ``model`` (see module docstring); types ``kmeans0..K-1``."""

    name = "kmeans"

    def __init__(self, model, tokenizer, k: int = 4, *, seed: int = 0, batch_size: int = 8, max_length: int = 1024):
        if k < 2:
            raise PlanningTokenError(f"k-means needs k >= 2 clusters, got {k}")
        self.model, self.tokenizer, self.k, self.seed = model, tokenizer, k, seed
        self.batch_size, self.max_length = batch_size, max_length
        self.types = tuple(f"kmeans{i}" for i in range(k))
        self.kmeans = None

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


SCHEMES = ("memreason", "kmeans", "arith")


def make_typer(scheme: str, *, model=None, tokenizer=None, k: int = 4, seed: int = 0) -> StepTyper:
    """The typer of a ``--scheme`` name."""
    if scheme == "memreason":
        return LabelTyper()
    if scheme == "arith":
        return ArithmeticTyper()
    if scheme == "kmeans":
        if model is None or tokenizer is None:
            raise PlanningTokenError("the kmeans scheme needs the model and tokenizer that embed the steps")
        return KMeansTyper(model, tokenizer, k, seed=seed)
    raise PlanningTokenError(f"unknown step-typing scheme {scheme!r}: choose one of {', '.join(SCHEMES)}")
