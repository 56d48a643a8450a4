"""Tiny random-weight models of real architectures, built from a config with no download.

Tests use them instead of mocks: the forward pass, KV cache and ``generate`` are the real
transformers code paths of each architecture, only the sizes are small.
"""

from __future__ import annotations

import torch

TINY_ARCHS = ("llama", "qwen2", "mistral", "gpt2")


def tiny_config(arch: str, *, vocab_size: int = 512, **overrides):
    """The config of a 2-layer, 64-wide model of ``arch`` (``llama``, ``qwen2``, ``mistral``, ``gpt2``)."""
    from transformers import GPT2Config, LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=vocab_size, bos_token_id=0, eos_token_id=1, pad_token_id=1)
    if arch == "gpt2":
        return GPT2Config(**{**dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024), **common, **overrides})
    cls = {"llama": LlamaConfig, "qwen2": Qwen2Config, "mistral": MistralConfig}.get(arch)
    if cls is None:
        raise ValueError(f"unknown tiny architecture '{arch}': choose one of {', '.join(TINY_ARCHS)}")
    # overrides go through the constructor, so derived fields (e.g. qwen2's layer_types) follow them
    defaults = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                    num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)
    config = cls(**{**defaults, **common, **overrides})
    return config


def tiny_model(arch: str = "llama", seed: int = 0, *, vocab_size: int = 512, **overrides):
    """A random-weight causal LM of a real architecture, deterministic in ``seed``, in eval mode.

    ``vocab_size`` can be set to a real tokenizer's size (e.g. ``len(tokenizer)``) so the tiny model
    pairs with that tokenizer.
    """
    from transformers import AutoModelForCausalLM

    config = tiny_config(arch, vocab_size=vocab_size, **overrides)
    generator_state = torch.random.get_rng_state()
    try:
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
    finally:
        torch.random.set_rng_state(generator_state)
    model.generation_config.pad_token_id = config.pad_token_id
    model.generation_config.eos_token_id = config.eos_token_id
    return model.eval()


def tiny_tokenizer(vocab_size: int = 512, words: list[str] | None = None):
    """A real word-level fast tokenizer that pairs with :func:`tiny_model`: ``<s>`` = 0 (BOS), ``</s>`` = 1
    (EOS and pad, as in the tiny configs), ``<unk>`` = 2, then ``w3 .. w{vocab_size - 1}`` (or ``words``)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = list(words) if words is not None else ["<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(3, vocab_size)]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="</s>")


def random_value_model(arch: str = "llama", head: str = "v", loss: str = "bce", num_atoms: int | None = None,
                       seed: int = 5, std: float = 0.5):
    """A :class:`~guidedecode.value_model.ValueModel` on a tiny random backbone with a random head
    (``N(0, std^2)`` weights, deterministic in ``seed``): non-trivial offsets for guide tests. It records
    the fingerprint of :func:`tiny_tokenizer`."""
    from guidedecode.value_model import ValueModel

    vm = ValueModel.from_backbone(tiny_model(arch, seed=seed), head=head, loss=loss, num_atoms=num_atoms,
                                  tokenizer=tiny_tokenizer())
    generator = torch.Generator().manual_seed(seed + 100)
    with torch.no_grad():
        vm.head.weight.copy_(torch.randn(vm.head.weight.shape, generator=generator) * std)
    return vm


@torch.no_grad()
def brute_value(value_model, prefix: list[int], candidates: list[int]) -> torch.Tensor:
    """``[k, A]`` value logits of ``prefix + [c]`` for each candidate ``c``, computed the slow way: a full,
    cache-free forward of each whole unpadded sequence and the head applied by hand
    (V: ``W h_last``; Q: ``W[c] h_prefix_end``). The reference for tests of the incremental path."""
    weight = value_model.head.weight.float()
    atoms = value_model.config.num_atoms
    seqs = torch.tensor([list(prefix) + [c] for c in candidates])
    hidden = value_model.backbone(input_ids=seqs).last_hidden_state.float()  # [k, n + 1, H]
    if value_model.config.head == "v":
        return hidden[:, -1] @ weight.T
    rows = weight.view(-1, atoms, weight.shape[1])[seqs[:, -1]]  # [k, A, H]
    return torch.einsum("kah,kh->ka", rows, hidden[:, -2])
