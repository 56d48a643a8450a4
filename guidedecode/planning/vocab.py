"""Planning-token vocabulary: the token registry and the vocabulary extension of a model.

Papers: Wang et al., "Guiding Language Model Reasoning with Planning Tokens" (arXiv 2310.05707,
reference code WANGXinyiLinda/planning_tokens) and Jin et al., "Disentangling Memory and Reasoning
Ability in Large Language Models" (arXiv 2411.13504, MingyuJ666/Disentangling-Memory-and-Reasoning).

Every reasoning step is prefixed by a **general block** (``n_prefix`` tokens ``<prefix_0> ..``, the
same for every step) and a **type block** (``n_special`` tokens ``<{type}_0> ..`` of the step's type);
the final answer line gets the ``answer`` type block. Keys: ``prefix``, ``answer``, ``assignment``
(steps without a type) and every type name; ``#new tokens = n_prefix + n_special * #type keys``.

:func:`add_planning_tokens` adds the strings with ``tokenizer.add_tokens`` (not special, so
``skip_special_tokens=True`` keeps them) and gives them the ids ``range(len(tok_before),
len(tok_after))``. A model whose embedding matrix is padded beyond ``len(tokenizer)`` (Qwen2.5: 152,064
rows for ~151,665 tokens) already has rows there: they are reused after an explicit re-initialisation
(the reference code's bug was to treat ``id >= rows`` as new, so its new ids landed on untrained padding
rows). Row init: the mean embedding of the sub-tokens of a few meaningful words per key (input and, when
untied, output rows), plus a small seeded perturbation so that no two new rows are equal.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch

from guidedecode import validation
from guidedecode.errors import GuidedecodeError

REGISTRY_FILE = "planning_tokens.json"
PREFIX, ANSWER, ASSIGNMENT = "prefix", "answer", "assignment"
RESERVED = (PREFIX, ANSWER, ASSIGNMENT)
_NAME = re.compile(r"^[a-z][a-z0-9]*$")
MAX_BLOCK = 1000  # the most tokens per block (n_prefix, n_special)

# Words whose sub-token embeddings initialise each key's rows (configurable per key).
DEFAULT_INIT_TEXT = {
    PREFIX: "plan step",
    ANSWER: "answer",
    ASSIGNMENT: "assignment",
    "memory": "memory recall fact",
    "reason": "reason infer",
    "add": "add plus sum",
    "sub": "subtract minus difference",
    "mul": "multiply times product",
    "div": "divide quotient",
}


class PlanningTokenError(GuidedecodeError):
    """Bad planning-token settings or a vocabulary that cannot be extended as asked."""


@dataclass(frozen=True)
class PlanningVocab:
    """The token registry: keys -> token strings -> ids, saved as ``planning_tokens.json``.

    ``types``: the step types (memreason: ``("memory", "reason")``); the type keys are ``types``
    plus ``answer`` and ``assignment`` (unless listed as a type). ``base_vocab_size``: ``len(tokenizer)``
    before the extension; the new ids are ``range(base_vocab_size, base_vocab_size + len(new_ids))``.
    """

    types: tuple[str, ...]
    n_prefix: int
    n_special: int
    base_vocab_size: int
    init_text: Mapping[str, str] = field(default_factory=dict)

    def __post_init__(self):
        validate_settings(self.types, self.n_prefix, self.n_special)
        validation.integer("base_vocab_size", self.base_vocab_size, minimum=0, error=PlanningTokenError)

    # -- keys and strings -------------------------------------------------------------------
    @property
    def type_keys(self) -> tuple[str, ...]:
        """Keys with a type block: ``answer``, ``assignment`` (if not a type) and the types."""
        extra = tuple(k for k in (ANSWER, ASSIGNMENT) if k not in self.types)
        return extra + tuple(self.types) if self.n_special else ()

    @property
    def keys(self) -> tuple[str, ...]:
        return ((PREFIX,) if self.n_prefix else ()) + self.type_keys

    def block_size(self, key: str) -> int:
        return self.n_prefix if key == PREFIX else self.n_special

    def strings(self, key: str) -> list[str]:
        """``["<key_0>", .., "<key_{n-1}>"]``."""
        if key not in self.keys:
            raise PlanningTokenError(f"unknown planning-token key {key!r}; keys: {', '.join(self.keys)}")
        return [f"<{key}_{i}>" for i in range(self.block_size(key))]

    def all_strings(self) -> list[str]:
        return [s for key in self.keys for s in self.strings(key)]

    def block_text(self, key: str) -> str:
        """The block as text: its token strings concatenated (no spaces)."""
        return "".join(self.strings(key))

    # -- ids ------------------------------------------------------------------------------
    @property
    def new_ids(self) -> list[int]:
        return list(range(self.base_vocab_size, self.base_vocab_size + len(self.all_strings())))

    def ids(self, key: str) -> list[int]:
        """The ids of ``key``'s block, in order."""
        start = self.base_vocab_size
        for k in self.keys:
            if k == key:
                return list(range(start, start + self.block_size(k)))
            start += self.block_size(k)
        raise PlanningTokenError(f"unknown planning-token key {key!r}; keys: {', '.join(self.keys)}")

    def id_table(self) -> dict[int, tuple[str, int]]:
        """``{token id: (key, position in its block)}`` for every planning token."""
        return {token: (key, i) for key in self.keys for i, token in enumerate(self.ids(key))}

    def check_tokenizer(self, tokenizer) -> None:
        """Raise unless ``tokenizer`` maps every token string to the registry's id (and back)."""
        if len(tokenizer) < self.new_ids[-1] + 1:
            raise PlanningTokenError(f"the tokenizer has {len(tokenizer)} tokens, the planning tokens need "
                                     f"{self.new_ids[-1] + 1}: load the tokenizer saved with the planner")
        for string, token in zip(self.all_strings(), self.new_ids):
            got = tokenizer.convert_tokens_to_ids(string)
            if got != token:
                raise PlanningTokenError(f"the tokenizer maps {string} to id {got}, the planning-token registry "
                                         f"to {token}: load the tokenizer saved with the planner")

    # -- files --------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {"types": list(self.types), "n_prefix": self.n_prefix, "n_special": self.n_special,
                "base_vocab_size": self.base_vocab_size, "init_text": dict(self.init_text),
                "tokens": {key: dict(zip(self.strings(key), self.ids(key))) for key in self.keys}}

    def save_pretrained(self, directory: str | os.PathLike) -> None:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        (directory / REGISTRY_FILE).write_text(json.dumps(self.to_dict(), indent=2) + "\n")

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike) -> "PlanningVocab":
        path = Path(directory) / REGISTRY_FILE
        if not path.is_file():
            raise PlanningTokenError(f"{path} not found: not a planner directory (guidedecode train planner)")
        try:
            data = json.loads(path.read_text())
            vocab = cls(type_names(data["types"]), int(data["n_prefix"]), int(data["n_special"]),
                        int(data["base_vocab_size"]), dict(data.get("init_text") or {}))
        except (ValueError, KeyError, TypeError, PlanningTokenError) as error:
            raise PlanningTokenError(f"{path} is not a valid planning-token registry ({error})") from error
        recorded = data.get("tokens")
        if recorded is not None and recorded != vocab.to_dict()["tokens"]:
            raise PlanningTokenError(f"{path}: the recorded token ids do not match its settings")
        return vocab


def type_names(types) -> tuple[str, ...]:
    """``types`` as a tuple; a PlanningTokenError unless it is a list of names (a bare string is refused)."""
    if isinstance(types, (str, bytes)) or not isinstance(types, Iterable):
        raise PlanningTokenError(f"types must be a list of step-type names, e.g. ['memory', 'reason'], got {types!r}")
    return tuple(types)


def validate_settings(types: Sequence[str], n_prefix: int, n_special: int) -> None:
    """Raise a PlanningTokenError naming the bad setting."""
    types = type_names(types)
    for name, value in (("n_prefix", n_prefix), ("n_special", n_special)):
        validation.integer(name, value, minimum=0, maximum=MAX_BLOCK, error=PlanningTokenError)
    if n_prefix == 0 and n_special == 0:
        raise PlanningTokenError("n_prefix and n_special are both 0: there would be no planning tokens")
    for name in types:
        if not isinstance(name, str) or not _NAME.match(name):
            raise PlanningTokenError(f"type name {name!r} is not a lower-case identifier (letters, then letters or "
                                     "digits): it becomes part of the token strings <name_i>")
        if name in (PREFIX, ANSWER):
            raise PlanningTokenError(f"type name {name!r} is reserved for the general/answer block")
    if len(set(types)) != len(types):
        raise PlanningTokenError(f"duplicate type names in {list(types)}")
    if n_special and not types:
        raise PlanningTokenError("no step types given (n_special > 0 needs at least one type)")


def _words(key: str, init_text: Mapping[str, str]) -> str:
    if key in init_text:
        return init_text[key]
    if key in DEFAULT_INIT_TEXT:
        return DEFAULT_INIT_TEXT[key]
    return " ".join(re.findall(r"[a-z]+|[0-9]+", key))  # "kmeans3" -> "kmeans 3"


def add_planning_tokens(model, tokenizer, types: Sequence[str], *, n_prefix: int = 3, n_special: int = 2,
                        init_text: Mapping[str, str] | None = None, noise: float = 0.01,
                        seed: int = 0) -> PlanningVocab:
    """Add the planning tokens to ``tokenizer`` and ``model`` (in place); return the registry.

    New ids are ``range(len(tokenizer) before, len(tokenizer) after)``. The embedding matrices are
    resized to ``len(tokenizer)`` when they are smaller; when they are padded beyond it, the rows at
    the new ids are re-initialised. Row init for key k: mean of the input (and, untied, output) rows
    of the sub-tokens of ``init_text[k]`` plus ``noise`` times the embedding std times seeded normal
    noise. A tied model stays tied. Raises :class:`PlanningTokenError` for bad settings or token
    strings that the tokenizer already knows.
    """
    if not callable(getattr(model, "get_input_embeddings", None)):
        raise PlanningTokenError(f"add_planning_tokens needs a transformers model, got {type(model).__name__}")
    if not callable(getattr(tokenizer, "add_tokens", None)):
        raise PlanningTokenError(f"add_planning_tokens needs a transformers tokenizer, got {type(tokenizer).__name__}")
    if init_text is not None and not isinstance(init_text, Mapping):
        raise PlanningTokenError(f"init_text must be a mapping {{key: words}}, got {type(init_text).__name__}")
    init_text = dict(init_text or {})
    for key, words in init_text.items():
        validation.string(f"init_text[{key!r}]", words, error=PlanningTokenError)
    types = type_names(types)
    validate_settings(types, n_prefix, n_special)
    noise = validation.number("noise", noise, minimum=0, error=PlanningTokenError)
    before = len(tokenizer)
    vocab = PlanningVocab(types, n_prefix, n_special, before, init_text)
    strings = vocab.all_strings()
    known = tokenizer.get_vocab()
    for string in strings:
        pieces = tokenizer.tokenize(string)
        if string in known or len(pieces) == 1:
            raise PlanningTokenError(f"planning token {string} collides with a token the tokenizer already has: "
                                     "use other type names or a base tokenizer without planning tokens")
    unknown_init = sorted(set(init_text) - set(vocab.keys))
    if unknown_init:
        raise PlanningTokenError(f"init_text names unknown keys {unknown_init}; keys: {', '.join(vocab.keys)}")
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    tied = output_embeddings is not None and output_embeddings.weight is input_embeddings.weight
    rows_before = input_embeddings.weight.shape[0]
    if output_embeddings is not None and output_embeddings.weight.shape[0] != rows_before:
        raise PlanningTokenError(f"input ({rows_before}) and output ({output_embeddings.weight.shape[0]}) embedding "
                                 "matrices differ in rows: unsupported model")
    if rows_before < before:
        raise PlanningTokenError(f"the model has {rows_before} embedding rows for a tokenizer of {before} tokens: "
                                 "model and tokenizer do not match")
    # word ids for the init, from the tokenizer before the new tokens exist
    init_ids = {}
    for key in vocab.keys:
        ids = tokenizer(" " + _words(key, init_text), add_special_tokens=False)["input_ids"]
        if not ids:
            raise PlanningTokenError(f"init text {_words(key, init_text)!r} of key {key!r} has no tokens")
        init_ids[key] = ids

    added = tokenizer.add_tokens(strings)
    new_ids = tokenizer.convert_tokens_to_ids(strings)
    if added != len(strings) or new_ids != vocab.new_ids or len(tokenizer) != before + len(strings):
        raise PlanningTokenError(f"the tokenizer gave the planning tokens ids {new_ids[:3]}..; expected "
                                 f"{vocab.new_ids[:3]}.. (consecutive from len(tokenizer) = {before})")
    if rows_before < len(tokenizer):
        model.resize_token_embeddings(len(tokenizer), mean_resizing=False)
    input_embeddings = model.get_input_embeddings()
    output_embeddings = model.get_output_embeddings()
    if tied and output_embeddings.weight is not input_embeddings.weight:
        raise PlanningTokenError("resizing untied the input and output embeddings")  # transformers re-ties them
    if input_embeddings.weight.shape[0] < len(tokenizer):
        raise PlanningTokenError(f"after resizing the model has {input_embeddings.weight.shape[0]} embedding rows "
                                 f"for {len(tokenizer)} tokens")
    model.config.vocab_size = input_embeddings.weight.shape[0]

    generator = torch.Generator().manual_seed(seed)
    matrices = [input_embeddings.weight] + ([] if tied or output_embeddings is None else [output_embeddings.weight])
    with torch.no_grad():
        for weight in matrices:
            old = weight[:before].float()
            scale = float(old.std()) * noise
            for key in vocab.keys:
                mean = old[init_ids[key]].mean(0)
                for token in vocab.ids(key):
                    row = mean + scale * torch.randn(mean.shape, generator=generator)
                    weight[token] = row.to(weight.dtype)
            rows = weight[vocab.new_ids].float()
            if len(rows) > 1 and torch.cdist(rows, rows).add(torch.eye(len(rows)) * 1e9).min() == 0:
                raise PlanningTokenError("two new planning-token rows are identical after init: use noise > 0")
    return vocab


def trainable_token_modules(model) -> tuple[str, str | None]:
    """``(input embedding module name, output embedding module name or None when tied)``, for peft's
    ``LoraConfig(trainable_token_indices={name: ids})``."""
    inp, out = model.get_input_embeddings(), model.get_output_embeddings()
    names = {id(module): name for name, module in model.named_modules()}
    tied = out is None or out.weight is inp.weight
    return names[id(inp)].rsplit(".", 1)[-1], None if tied else names[id(out)].rsplit(".", 1)[-1]
