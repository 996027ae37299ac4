"""The SAELens layout of a TopK SAE (``cfg.json`` + ``sae_weights.safetensors``, ``W_enc`` [d_in, d_sae],
raw activations in and out): ours exported with the SAELens hook name, a published TopK SAE imported as a
run's primary SAE (checked against the run's store and layer), and the hook-name conventions between the two.
"""

from __future__ import annotations

import hashlib
import json
import re
import warnings
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ..io import atomic_path, from_repository, write_json
from .sae import SAEConfig, TopKSAE

# ---------------------------------------------------------------------------------------------------
# SAELens interop: cfg.json + sae_weights.safetensors, W_enc [d_in, d_sae], raw activations in and out.
#
# Hook names. Our layer L reads ``hidden_states[L]`` of a Hugging Face model: the embedding output (L=0) or
# the output of block L-1. TransformerLens (whose names SAELens records) calls block i's input
# ``blocks.{i}.hook_resid_pre`` (= hidden_states[i]) and, in pre-norm models (GPT-2, Pythia, Llama), its output
# ``blocks.{i}.hook_resid_post`` (= hidden_states[i+1]). Two exceptions: a causal LM's last hidden state has the
# final norm applied, which no residual hook sees; and post-norm encoders (BERT/MiniLM) normalise after the
# residual sum, so their block output is ``hook_normalized_resid_post`` and ``hook_resid_post`` is no hidden state.

SAELENS_WEIGHTS = "sae_weights.safetensors"
SAELENS_RELEASE = "saelens:"
"""Prefix of a SAELens release SAE, ``saelens:RELEASE/SAE_ID`` (downloaded by ``sae_lens`` from the Hub)."""
POST_NORM_MODEL_TYPES = frozenset({"bert"})
"""``transformers`` model types whose blocks apply their LayerNorm after the residual sum."""
RESIDUAL_HOOKS = (
    "blocks.{i}.hook_resid_pre (hidden_states[i]), blocks.{i}.hook_resid_post (hidden_states[i+1] of a pre-norm "
    "model: GPT-2, Pythia, Llama) and blocks.{i}.hook_normalized_resid_post (hidden_states[i+1] of a post-norm "
    "encoder: BERT/MiniLM)"
)
_RESIDUAL_HOOK = re.compile(r"blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_normalized_resid_post)")


def saelens_hook_to_layer(hook_name: str, post_norm: bool = False, n_layers: int | None = None) -> int:
    """The ``hidden_states`` index that the SAELens (TransformerLens) hook ``hook_name`` reads.

    ``post_norm``: the model is a post-norm encoder (BERT), where ``hook_resid_post`` is refused (it precedes
    the block's last LayerNorm). ``n_layers``: the blocks of a causal LM, given when its last hidden state is
    the one in question; that state has the final norm applied, so the last block's ``hook_resid_post`` is
    refused. Any hook off the residual stream (attention or MLP outputs, ``hook_resid_mid``, ...) is refused."""
    match = _RESIDUAL_HOOK.fullmatch(hook_name or "")
    if match is None:
        raise ValueError(f"SAELens hook {hook_name!r} is not on the residual stream; supported: {RESIDUAL_HOOKS}")
    block, point = int(match[1]), match[2]
    if point == "hook_resid_pre":
        layer = block
    elif point == "hook_resid_post" and post_norm:
        raise ValueError(
            f"{hook_name} of a post-norm encoder (BERT) is the residual sum before the block's LayerNorm, not "
            f"a hidden state: its block output is blocks.{block}.hook_normalized_resid_post (= hidden_states"
            f"[{block + 1}])"
        )
    else:
        layer = block + 1
    if n_layers is not None and not post_norm and layer >= n_layers:
        raise ValueError(
            f"{hook_name} reads the output of block {layer - 1}, but hidden_states[{n_layers}] of this "
            f"{n_layers}-block causal LM has the final norm applied, which no residual hook sees: choose an SAE "
            f"of a layer below {n_layers}"
        )
    return layer


def layer_to_saelens_hook(layer: int, post_norm: bool = False, final_norm: bool = False) -> str:
    """The SAELens hook name of ``hidden_states[layer]``: ``blocks.0.hook_resid_pre`` for 0, else block
    ``layer-1``'s output (``hook_resid_post``; ``hook_normalized_resid_post`` in a ``post_norm`` encoder).
    ``final_norm``: ``hidden_states[layer]`` is a causal LM's final-norm output, which has no hook name."""
    if not isinstance(layer, int) or layer < 0:
        raise ValueError(f"layer must be a hidden_states index >= 0, got {layer!r}")
    if final_norm:
        raise ValueError(
            f"hidden_states[{layer}] is the causal LM's final-norm output: no SAELens residual hook reads it "
            f"(blocks.{layer - 1}.hook_resid_post is the residual before that norm)"
        )
    if layer == 0:
        return "blocks.0.hook_resid_pre"
    return f"blocks.{layer - 1}.hook_{'normalized_' if post_norm else ''}resid_post"


def hf_hook_conventions(hf_hook: str, model_type: str = "") -> tuple[bool, bool]:
    """``(post_norm, final_norm)`` of the module whose output a featint SAE or store reads (its ``hook``, a
    qualified module name of a :data:`featint_utils.data.models.ARCHITECTURES` model): whether the model is a
    post-norm encoder, and whether the module is a causal LM's final norm. ``(False, False)`` if unknown."""
    from ..data.models import ARCHITECTURES

    def paths(entry) -> list[str]:  # an entry is a path, a tuple of candidate paths, or None
        return [re.escape(path) for path in (entry if isinstance(entry, tuple) else (entry,)) if path]

    def ends_with(patterns: list[str]) -> bool:
        return any(re.search(rf"(^|\.){pattern}$", hf_hook) for pattern in patterns)

    candidates = {model_type: ARCHITECTURES[model_type]} if model_type in ARCHITECTURES else ARCHITECTURES
    for name, (blocks, embedding, final) in candidates.items():
        post_norm = name in POST_NORM_MODEL_TYPES
        if ends_with(paths(final)):
            return post_norm, True  # the module after the last block: a final norm (or OPT's projection)
        if ends_with([re.escape(blocks) + r"\.\d+", *paths(embedding)]):
            return post_norm, False
    return model_type in POST_NORM_MODEL_TYPES, False


def same_model(recorded: str, *names: str) -> bool:
    """Whether the model name an SAE records is one of ``names``, ignoring case, an ``org/`` or directory
    prefix, and our name for the embedded model (``embedded`` is all-MiniLM-L6-v2)."""

    def base(name: str) -> str:
        name = name.strip().rstrip("/").lower()
        return "all-minilm-l6-v2" if name == "embedded" else name.rsplit("/", 1)[-1]

    return base(recorded) in {base(n) for n in names if n}


def to_saelens(sae: TopKSAE, directory: str | Path) -> None:
    """Write the SAELens on-disk layout of a TopK SAE, with our input scale folded into the weights so
    it takes and returns raw activations (``normalize_activations="none"``). ``metadata.hook_name`` is the
    SAELens name of the SAE's layer (None when the layer is unknown); our module name is in
    ``metadata.featint``."""
    s = sae.cfg.input_scale
    weights = {
        "W_enc": (sae.W_enc.detach() * s).t().contiguous(),  # (x*s - b) W^T  =  (x - b/s) (s W)^T
        "b_enc": sae.b_enc.detach().clone(),
        "W_dec": (sae.W_dec.detach() / s).contiguous(),
        "b_dec": (sae.b_dec.detach() / s).contiguous(),
    }
    hook_name = None
    if sae.cfg.layer >= 0:
        hook_name = layer_to_saelens_hook(sae.cfg.layer, *hf_hook_conventions(sae.cfg.hook))
    cfg = {
        "architecture": "topk",
        "d_in": sae.cfg.d_in,
        "d_sae": sae.cfg.n_latents,
        "k": sae.cfg.k,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "rescale_acts_by_decoder_norm": False,
        # SAELens reads a cfg without metadata.sae_lens_version as a pre-6 one, whose names are at the top level
        "model_name": sae.cfg.model,
        "hook_name": hook_name,
        "metadata": {
            "model_name": sae.cfg.model,
            "hook_name": hook_name,
            "hook_layer": sae.cfg.layer,
            "prepend_bos": False,
            "sae_lens_training_version": None,
            "featint": {"input_scale_folded": s, "hidden_states_index": sae.cfg.layer, "hf_module": sae.cfg.hook},
        },
    }
    directory = Path(directory)
    with atomic_path(directory / SAELENS_WEIGHTS) as tmp:
        save_file(weights, str(tmp))
    write_json(directory / "cfg.json", cfg)


def from_saelens(
    directory: str | Path, layer: int = -1, model: str = "", post_norm: bool = False, n_layers: int | None = None
) -> TopKSAE:
    """Load a TopK SAE saved in the SAELens layout (a published SAE can serve as the primary SAE).

    The SAE's layer is the ``hidden_states`` index its ``metadata.hook_name`` reads (see
    :func:`saelens_hook_to_layer`, which ``post_norm`` and ``n_layers`` are for); a ``layer`` given must be
    that one. The loaded SAE takes raw activations (``input_scale`` 1); its decoder rows need not be
    unit-norm. SAELens's ``rescale_acts_by_decoder_norm`` and ``apply_b_dec_to_input=False`` are folded into
    the weights exactly (the same codes and reconstructions).
    """
    directory = Path(directory)
    for name in ("cfg.json", SAELENS_WEIGHTS):
        if not (directory / name).is_file():
            raise FileNotFoundError(f"no SAELens SAE at {str(directory)!r}: {name} is missing")
    cfg = json.loads((directory / "cfg.json").read_text())
    architecture = cfg.get("architecture", "standard")
    if architecture not in ("topk", "batchtopk"):
        raise ValueError(f"{directory}: SAELens architecture {architecture!r} is not TopK; only TopK SAEs load")
    if cfg.get("normalize_activations", "none") not in ("none", None):
        raise ValueError(f"{directory}: normalize_activations={cfg['normalize_activations']!r} is not supported")
    if cfg.get("reshape_activations", "none") not in ("none", None):
        raise ValueError(f"{directory}: reshape_activations={cfg['reshape_activations']!r} is not supported")
    k = cfg.get("k") or cfg.get("activation_fn_kwargs", {}).get("k")
    if not k:
        raise ValueError(f"{directory}/cfg.json has no k")
    meta = cfg.get("metadata") or {}
    hook_name = meta.get("hook_name") or cfg.get("hook_name")  # SAELens < 6 kept it at the top level
    ours = (meta.get("featint") or {}).get("hidden_states_index")
    if ours is not None and ours >= 0:
        derived = int(ours)  # written by to_saelens: exact, whatever the architecture
    elif hook_name:
        derived = saelens_hook_to_layer(hook_name, post_norm, n_layers)
    else:
        derived = -1
    if layer >= 0 and derived >= 0 and layer != derived:
        raise ValueError(
            f"{directory}: the SAE's hook {hook_name!r} reads hidden_states[{derived}], not hidden_states[{layer}]"
        )
    weights = {name: w.float() for name, w in load_file(str(directory / SAELENS_WEIGHTS)).items()}
    missing = {"W_enc", "b_enc", "W_dec", "b_dec"} - set(weights)
    if missing:
        raise ValueError(f"{directory / SAELENS_WEIGHTS} has no {sorted(missing)}: not a TopK SAE's weights")
    d_in, d_sae = cfg["d_in"], cfg["d_sae"]
    expected = {"W_enc": (d_in, d_sae), "b_enc": (d_sae,), "W_dec": (d_sae, d_in), "b_dec": (d_in,)}
    actual = {name: tuple(weights[name].shape) for name in expected}
    if actual != expected:
        raise ValueError(f"{directory}: weights have shapes {actual}, cfg.json says {expected}")
    W_enc, b_enc, W_dec = weights["W_enc"].t(), weights["b_enc"], weights["W_dec"]
    if not cfg.get("apply_b_dec_to_input", True):  # SAELens encodes x, we encode x - b_dec: move b_dec into b_enc
        b_enc = b_enc + weights["b_dec"] @ weights["W_enc"]
    if cfg.get("rescale_acts_by_decoder_norm", False):
        # SAELens ranks pre-activations times the decoder norms and decodes codes divided by them: the same
        # as unit decoder rows with the norms folded into the encoder
        norms = W_dec.norm(dim=1)
        W_enc, b_enc, W_dec = W_enc * norms[:, None], b_enc * norms, W_dec / norms[:, None]
    sae = TopKSAE(
        SAEConfig(
            d_in,
            d_sae,
            int(k),
            1.0,
            model or meta.get("model_name") or cfg.get("model_name") or "",
            layer if layer >= 0 else derived,
            (meta.get("featint") or {}).get("hf_module", ""),
            {"saelens_hook_name": hook_name},
        )
    )
    with torch.no_grad():
        sae.W_enc.copy_(W_enc)
        sae.b_enc.copy_(b_enc)
        sae.W_dec.copy_(W_dec)
        sae.b_dec.copy_(weights["b_dec"])
    return sae


def saelens_digest(directory: str | Path) -> str:
    """sha256 of a SAELens SAE's ``cfg.json`` and weights file (the provenance a run records for it)."""
    digest = hashlib.sha256()
    for name in ("cfg.json", SAELENS_WEIGHTS):
        digest.update(name.encode())
        with open(Path(directory) / name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def fetch_saelens_release(source: str, directory: str | Path) -> Path:
    """Download ``saelens:RELEASE/SAE_ID`` with ``sae_lens`` (Hub access needed) and save it in the SAELens
    layout under ``directory``; returns that directory."""
    release, _, sae_id = source.removeprefix(SAELENS_RELEASE).partition("/")
    if not release or not sae_id:
        raise ValueError(f"{source!r}: a SAELens release SAE is written saelens:RELEASE/SAE_ID")
    try:
        from sae_lens import SAE
    except ImportError as err:
        raise ImportError(
            f"{source!r} needs the sae_lens package to download it (pip install sae-lens), or save the SAE in "
            "the SAELens layout (cfg.json + sae_weights.safetensors) and pass its directory"
        ) from err
    try:
        lens = SAE.from_pretrained(release, sae_id, device="cpu")
    except OSError as err:
        raise OSError(
            f"could not download {source!r} ({err.__class__.__name__}: {err}); no Hub access on this machine? "
            "Save the SAE in the SAELens layout elsewhere and pass its directory"
        ) from err
    lens.save_model(directory)
    return Path(directory)


def locate_pretrained(source: str, scratch: Path) -> tuple[Path, str]:
    """The SAELens directory that ``primary_sae=source`` names and the source to record for it: a directory
    (relative: from the repository) as its absolute path, or ``saelens:RELEASE/SAE_ID`` as given, downloaded
    into ``scratch``."""
    if source.startswith(SAELENS_RELEASE):
        return fetch_saelens_release(source, scratch), source
    path = from_repository(source)
    if not path.is_dir():
        raise FileNotFoundError(
            f"primary_sae={source!r}: no directory {str(path)!r}; give a directory holding a SAELens SAE (cfg.json "
            "+ sae_weights.safetensors), saelens:RELEASE/SAE_ID, or '' to train the SAE"
        )
    return path, str(path)


def pretrained_primary(directory: str | Path, source: str, store) -> tuple[TopKSAE, dict]:
    """The SAELens SAE in ``directory`` made ready to be a run's primary SAE on ``store`` (an
    :class:`~featint_utils.data.activation_store.ActivationStore`), with its provenance (``source`` as given, the sha256
    of its files).

    Refused unless its width is the store's and its hook reads the store's layer (when the store records one;
    activations from a file do not, and then only the width is checked). A different model name only warns:
    SAELens records TransformerLens names, which differ from Hugging Face ones (``gpt2-small`` / ``gpt2``).
    The SAE gets the store's input scale (folded into its weights: the same codes and reconstructions), so it
    reads normalised activations like a trained one."""
    manifest = store.manifest
    post_norm, final_norm = hf_hook_conventions(manifest.get("hook", ""), manifest.get("model_type", ""))
    try:
        sae = from_saelens(
            directory,
            layer=store.layer,
            post_norm=post_norm,
            n_layers=store.layer if final_norm else None,  # the store's layer is a causal LM's last
        )
    except ValueError as err:
        raise ValueError(
            f"primary_sae={source!r} cannot be this run's primary SAE: {err} (the run's activations are "
            f"hidden_states[{store.layer}], stage 00's layer)"
        ) from err
    if sae.cfg.d_in != store.d_model:
        raise ValueError(
            f"primary_sae={source!r} reads {sae.cfg.d_in}-wide activations, but this run's store holds "
            f"{store.d_model}-wide ones (model {manifest.get('model')!r}): choose an SAE of that model"
        )
    if store.layer < 0:
        warnings.warn(
            f"the run's activations come from a file with no layer recorded: primary_sae={source!r} (hook "
            f"{sae.cfg.extra['saelens_hook_name']!r}) is taken to read the same layer; only its width is checked",
            stacklevel=2,
        )
    recorded = sae.cfg.model
    names = (manifest.get("model", ""), manifest.get("model_source", ""))
    if store.layer >= 0 and recorded and not same_model(recorded, *names):  # a file's store names no model
        warnings.warn(
            f"primary_sae={source!r} was trained on model {recorded!r}, this run's activations come from "
            f"{manifest.get('model')!r}; going on (SAELens and Hugging Face name models differently), but check "
            "that they are the same model",
            stacklevel=2,
        )
    provenance = {"source": source, "sha256": saelens_digest(directory)}
    installed = sae.with_input_scale(store.scale)
    installed.cfg.model = manifest.get("model", recorded)  # the model the activations come from, as ours record it
    installed.cfg.hook = manifest.get("hook", "")
    installed.cfg.extra |= {
        "pretrained": provenance,
        "saelens_model_name": recorded,
        "store_fingerprint": store.fingerprint,
    }
    return installed, provenance
