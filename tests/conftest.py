"""Shared fixtures: the real embedded MiniLM and tiny random causal LMs saved as local model directories."""

from __future__ import annotations

import pytest
import torch

from featint_utils import models

CORPUS_SENTENCES = [
    "the cat sat on the mat and looked out of the window",
    "a quick brown fox jumps over the lazy dog near the river",
    "we will meet at noon to discuss the plan for the week",
    "rain is expected in the north while the south stays dry",
    "she wrote a long letter to her brother about the new house",
]


def _tiny_tokenizer(bos: bool):
    """A word-level tokenizer built in-process; with ``bos`` it frames content as Llama does (<s> first)."""
    from tokenizers import Tokenizer, pre_tokenizers, processors, trainers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<s>", "</s>"]
    tok = Tokenizer(tok_models.WordLevel(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(CORPUS_SENTENCES, trainers.WordLevelTrainer(special_tokens=specials))
    if bos:
        tok.post_processor = processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", tok.token_to_id("<s>"))]
        )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def tiny_causal(arch: str, vocab_size: int = 64, n_layers: int = 2):
    """A tiny randomly initialised causal LM of a supported architecture (real code path, fake weights)."""
    from transformers import (
        GPT2Config,
        GPT2LMHeadModel,
        GPTNeoXConfig,
        GPTNeoXForCausalLM,
        LlamaConfig,
        LlamaForCausalLM,
    )

    torch.manual_seed(0)
    if arch == "gpt2":
        cfg = GPT2Config(
            n_layer=n_layers, n_embd=32, n_head=4, vocab_size=vocab_size, n_positions=64, bos_token_id=2, eos_token_id=3
        )
        return GPT2LMHeadModel(cfg).eval()
    if arch == "gpt_neox":
        cfg = GPTNeoXConfig(
            num_hidden_layers=n_layers,
            hidden_size=32,
            num_attention_heads=4,
            intermediate_size=64,
            vocab_size=vocab_size,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
        )
        return GPTNeoXForCausalLM(cfg).eval()
    if arch == "llama":
        cfg = LlamaConfig(
            num_hidden_layers=n_layers,
            hidden_size=32,
            num_attention_heads=4,
            num_key_value_heads=2,
            intermediate_size=64,
            vocab_size=vocab_size,
            max_position_embeddings=64,
            bos_token_id=2,
            eos_token_id=3,
            pad_token_id=0,
        )
        return LlamaForCausalLM(cfg).eval()
    raise ValueError(arch)


CAUSAL_ARCHS = ("gpt2", "gpt_neox", "llama")


@pytest.fixture(scope="session")
def embedded():
    return models.load_model("embedded")


@pytest.fixture(scope="session", params=CAUSAL_ARCHS)
def causal_dir(request, tmp_path_factory):
    """A tiny causal LM + tokenizer saved as a local model directory (Llama's tokenizer adds <s>)."""
    arch = request.param
    path = tmp_path_factory.mktemp(f"tiny-{arch}")
    tokenizer = _tiny_tokenizer(bos=arch == "llama")
    tiny_causal(arch, vocab_size=len(tokenizer)).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def random_store(path, n_train: int, n_val: int, d: int = 16, tokens_per_text: int = 10):
    """A store of Gaussian activations whose texts are consecutive runs of ``tokens_per_text`` tokens."""
    import numpy as np

    from featint_utils.activations import store_from_arrays

    rng = np.random.default_rng(0)
    sizes = {"train": n_train, "val": n_val}
    meta = {
        s: np.c_[np.arange(n) // tokens_per_text, np.arange(n) % tokens_per_text, np.zeros(n)] for s, n in sizes.items()
    }
    return store_from_arrays(path, {s: rng.normal(size=(n, d)) for s, n in sizes.items()}, meta=meta)
