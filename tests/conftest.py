"""Shared fixtures: the real embedded MiniLM, tiny random causal LMs saved as local model directories, and one
tiny run of every stage; and how the suite is spread over the CPU's cores (pytest-xdist, one thread each)."""

from __future__ import annotations

import contextlib
import os
import sys
from pathlib import Path
from typing import NamedTuple

# One compute thread per test process (xdist worker, notebook kernel, torchrun rank; the children inherit it),
# set before torch is imported: the tests' tensors are small, so a second thread buys little (the planted
# estimator fixture: 128 s at one thread, 117 s at two), while two workers of two threads each on two cores
# spin against each other (the whole suite 18 min 46 s, against 15 min 0 s in one process).
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from featint_utils.data import models  # noqa: E402

# The test files that take longest (each runs whole in one worker), in the order the workers start them: first,
# so that no worker is left alone with a long one at the end.
LONGEST_FIRST = (
    "test_pipeline.py",
    "test_distributed.py",
    "test_sweeps.py",
    "test_interaction.py",
    "test_runner.py",
    "test_absorption.py",
)


def pytest_collection_modifyitems(items):
    def rank(item):
        name = item.path.name
        return LONGEST_FIRST.index(name) if name in LONGEST_FIRST else len(LONGEST_FIRST)

    items.sort(key=rank)  # stable: within a file, its own order


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


def count_forwards_below(model, layer: int):
    """A one-element list counting the forwards of every submodule of the blocks below ``layer`` (a block a
    PrefixCache replays runs none of them), and the hooks' handles."""
    calls = [0]
    blocks, _ = models.prefix_modules(model, layer)
    handles = [
        module.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
        for block in blocks
        for module in block.modules()
        if module is not block
    ]
    return calls, handles


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

    from featint_utils.data.extraction import store_from_arrays

    rng = np.random.default_rng(0)
    sizes = {"train": n_train, "val": n_val}
    meta = {
        s: np.c_[np.arange(n) // tokens_per_text, np.arange(n) % tokens_per_text, np.zeros(n)] for s, n in sizes.items()
    }
    return store_from_arrays(path, {s: rng.normal(size=(n, d)) for s, n in sizes.items()}, meta=meta)


# Every stage of the embedded profile at sizes that keep each notebook to seconds.
TINY_RUN = {
    "max_groups": "12",
    "batch_size": "16",
    "val_fraction": "0.25",
    "n_boot": "50",
    "probe_folds": "3",
    "sae_latents": "256",
    "sae_train_tokens": "4096",
    "sae_batch_size": "256",
    "splice_texts": "8",
    "nfm_batch_size": "64",
    "nfm_k_embed": "16",
    "nfm_max_epochs": "3",
    "nfm_lr_grid": "3e-3",
    "pair_ridge_pairs": "64",
    "power_shares": "0.01,0.05",
    "power_pairs": "4",
    "conjunction_candidates": "4",
    "absorption_pairs": "4",
    "nfm_seeds": "0,1",
    "n_top_features": "5",
    "secondary_latents": "64",
    "secondary_k": "4",
    "secondary_train_tokens": "2048",
    "secondary_batch_size": "256",
    "n_panels": "1",
    "clamp_features": "1",
    "clamp_levels": "-1,1",
    "max_items": "12",
    "n_permutations": "199",
}


class TinyRun(NamedTuple):
    """A finished run of every stage and what the runner printed to the terminal while making it."""

    root: Path
    terminal: str


@contextlib.contextmanager
def stderr_into(path: Path):
    """``sys.stderr`` and file descriptor 2 (which child processes, kernels among them, inherit) into ``path``:
    what a terminal would have shown on its error stream."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(path, "w") as f:
        os.dup2(f.fileno(), 2)
        try:
            with contextlib.redirect_stderr(f):
                yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, 2)
            os.close(saved)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory) -> TinyRun:
    """The real pipeline once, through papermill, reports rendered: the smoke, stale-artifact and relocation
    tests each read it, and any test that changes a run changes a copy of it."""
    from featint_utils.workbench import runner

    where = tmp_path_factory.mktemp("tiny_run")
    with stderr_into(where / "terminal.txt"):
        root = runner.run("embedded", overrides=TINY_RUN, runs_dir=where)
    return TinyRun(root, (where / "terminal.txt").read_text())
