"""TopK sparse autoencoder: the model, its sparse encode/decode, and its on-disk formats.

Conventions of the SAE tools (EleutherAI sparsify, SAELens, OpenAI's TopK code):
``z = topk(relu(W_enc (x - b_dec) + b_enc))``, ``x_hat = W_dec^T z + b_dec``; ``W_enc`` starts as ``W_dec``;
decoder rows are unit-norm during training. Inputs are *normalised* activations: raw activations times
``cfg.input_scale`` (so that E||x||^2 = d_in on the training split); the scale is saved with the SAE and
:meth:`TopKSAE.reconstruct_raw` / :meth:`TopKSAE.residual_raw` undo it, so every stage sees one definition.

Only the k active rows are touched outside the dense encoder matmul: decoding is an embedding bag over
the selected rows, and the encoder's backward pass scatters into the selected rows only.
"""

from __future__ import annotations

import copy
import hashlib
import json
import re
import warnings
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from .io import atomic_path, from_repository, write_json

WEIGHTS_FILE = "sae.safetensors"
ENCODER_INIT_SCALE = 0.5
CONFIG_FILE = "cfg.json"


@dataclass
class SAEConfig:
    """Shape, sparsity and provenance of a TopK SAE."""

    d_in: int
    """Width of the activations (the model's d_model)."""
    n_latents: int
    """Dictionary size."""
    k: int
    """Active latents per token."""
    input_scale: float = 1.0
    """Raw activations are multiplied by this before encoding (E||scale * x||^2 = d_in on train)."""
    model: str = ""
    """The model the activations came from."""
    layer: int = -1
    """``hidden_states`` index the SAE reads."""
    hook: str = ""
    """Qualified name of the module whose output is that hidden state."""
    extra: dict = field(default_factory=dict)
    """Free-form provenance (store path, git commit, training settings)."""

    def __post_init__(self):
        for name in ("d_in", "n_latents", "k"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if self.k >= self.n_latents:
            raise ValueError(f"k={self.k} must be smaller than the number of latents ({self.n_latents})")
        if not self.input_scale > 0:
            raise ValueError(f"input_scale must be positive, got {self.input_scale}")


class TopKCode(NamedTuple):
    """The sparse code of a batch: the k largest latent activations of each row and their indices."""

    values: torch.Tensor
    """[batch, k] activations (>= 0; zero where fewer than k latents are positive)."""
    indices: torch.Tensor
    """[batch, k] latent indices."""


class _TopKEncode(torch.autograd.Function):
    """Dense encoder matmul forward; backward touches only the selected rows of ``W_enc``/``b_enc``.

    Optionally also selects the ``k_aux`` largest pre-activations among ``dead`` latents (AuxK), sharing
    the one matmul. A dense backward would cost batch x n_latents x d_in; this one batch x k x d_in.
    """

    @staticmethod
    def forward(ctx, x_centered, W_enc, b_enc, k: int, dead: torch.Tensor | None, k_aux: int, bf16: bool):
        if bf16:  # mixed precision: bf16 operands, fp32 accumulation (AMX / tensor cores); fp32 master weights
            pre = torch.addmm(b_enc.bfloat16(), x_centered.bfloat16(), W_enc.bfloat16().t())
        else:
            pre = torch.addmm(b_enc, x_centered, W_enc.t())
        values, indices = pre.topk(k, dim=-1, sorted=False)
        values = values.float().relu_()  # relu is monotone: topk then relu equals relu then topk, one pass fewer
        if dead is not None and k_aux > 0:
            aux_values, aux_indices = pre.masked_fill_(~dead, float("-inf")).topk(k_aux, dim=-1, sorted=False)
            aux_values = aux_values.float().relu_()
        else:
            aux_values = aux_indices = x_centered.new_empty((x_centered.shape[0], 0))
            aux_indices = aux_indices.long()
        ctx.save_for_backward(x_centered, W_enc, indices, values, aux_indices, aux_values)
        ctx.mark_non_differentiable(indices, aux_indices)
        return values, indices, aux_values, aux_indices

    @staticmethod
    def backward(ctx, grad_values, _grad_indices, grad_aux, _grad_aux_indices):
        x_centered, W_enc, indices, values, aux_indices, aux_values = ctx.saved_tensors
        grads, idx = [grad_values * (values > 0)], [indices]  # relu: no gradient where the value is 0
        if aux_indices.shape[1] and grad_aux is not None:
            grads.append(grad_aux * (aux_values > 0))
            idx.append(aux_indices)
        grad = torch.cat(grads, dim=1)
        index = torch.cat(idx, dim=1)
        grad_x = grad_W = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = F.embedding_bag(index, W_enc, per_sample_weights=grad, mode="sum")
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            # grad W_enc[j] = sum over (row, slot) selecting latent j of grad * x[row]: sort the selections by
            # latent and let an embedding bag sum the input rows of each latent's segment.
            flat = index.reshape(-1)
            order = flat.argsort()
            counts = torch.bincount(flat, minlength=W_enc.shape[0])
            rows = torch.div(order, index.shape[1], rounding_mode="floor")
            grad_W = F.embedding_bag(
                rows,
                x_centered,
                torch.cumsum(counts, 0) - counts,
                per_sample_weights=grad.reshape(-1)[order],
                mode="sum",
            )
            grad_b = torch.zeros(W_enc.shape[0], dtype=grad.dtype, device=grad.device).index_add_(
                0, flat, grad.reshape(-1)
            )
        return grad_x, grad_W, grad_b, None, None, None, None


class TopKSAE(nn.Module):
    """A TopK sparse autoencoder on normalised activations (see the module docstring)."""

    def __init__(self, cfg: SAEConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        W_dec = torch.randn(cfg.n_latents, cfg.d_in, generator=generator)
        W_dec /= W_dec.norm(dim=1, keepdim=True)
        self.W_dec = nn.Parameter(W_dec)
        # W_enc = W_dec^T at init (rows here: [n_latents, d_in]), at half the scale: with inputs at
        # E||x||^2 = d_in, full-scale rows make the first reconstructions mostly noise. Measured on MiniLM
        # activations (benchmarks/sae_train.py setting, 400k tokens): held-out FVU 0.277 at scale 1.0,
        # 0.226-0.231 at 0.2-0.58.
        self.W_enc = nn.Parameter(W_dec * ENCODER_INIT_SCALE)
        self.b_enc = nn.Parameter(torch.zeros(cfg.n_latents))
        self.b_dec = nn.Parameter(torch.zeros(cfg.d_in))

    # -- core ---------------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> TopKCode:
        """Sparse code of normalised activations ``x`` [batch, d_in]."""
        values, indices, _, _ = self.encode_with_aux(x)
        return TopKCode(values, indices)

    def encode_with_aux(self, x: torch.Tensor, dead: torch.Tensor | None = None, k_aux: int = 0, bf16: bool = False):
        """Code plus the ``k_aux`` strongest *dead* latents (for AuxK): values, indices, aux values, aux indices.

        ``bf16`` runs the encoder matmul in bfloat16 (a training-speed option; analysis uses float32)."""
        if x.shape[-1] != self.cfg.d_in:
            raise ValueError(f"input width {x.shape[-1]} does not match the SAE's d_in={self.cfg.d_in}")
        return _TopKEncode.apply(x - self.b_dec, self.W_enc, self.b_enc, self.cfg.k, dead, k_aux, bf16)

    @torch.no_grad()
    def pre_activation(self, x: torch.Tensor) -> torch.Tensor:
        """Every latent's encoder pre-activation ``W_enc (x - b_dec) + b_enc`` for normalised ``x`` (before ReLU and
        top-k, float32): what the encoder reads of the input, linear in it."""
        return torch.addmm(self.b_enc, x - self.b_dec, self.W_enc.t())

    @torch.no_grad()
    def presence(self, x: torch.Tensor, k: int) -> TopKCode:
        """The ``k`` largest positive projections of ``x - b_dec`` on the unit decoder directions (``k`` may exceed
        the SAE's own): how much of each latent's direction the input holds, whatever the encoder does with it.
        Where a latent has absorbed "a and b together", the encoder learns to keep ``a``'s and ``b``'s own latents
        quiet when both are there, so neither their codes nor their pre-activations show that they are."""
        projection = (x - self.b_dec) @ F.normalize(self.W_dec, dim=1).t()
        values, indices = projection.topk(min(k, self.cfg.n_latents), dim=-1, sorted=False)
        return TopKCode(values.relu_(), indices)

    def decode(self, values: torch.Tensor, indices: torch.Tensor, bias: bool = True) -> torch.Tensor:
        """``sum_j values_j W_dec[indices_j] (+ b_dec)``: an embedding bag over the k active rows."""
        out = F.embedding_bag(indices, self.W_dec, per_sample_weights=values, mode="sum")
        return out + self.b_dec if bias else out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Reconstruction of normalised activations."""
        return self.decode(*self.encode(x))

    # -- raw-activation space -------------------------------------------------------------------------
    def reconstruct_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """``SAE(x)`` for raw (un-normalised) activations, returned in raw units, float32 (a model's bf16 hidden
        states are encoded in float32), on the input's device (the SAE computes on its own)."""
        x = x_raw.to(self.W_enc.device, torch.float32)
        return (self(x * self.cfg.input_scale) / self.cfg.input_scale).to(x_raw.device)

    def residual_raw(self, x_raw: torch.Tensor) -> torch.Tensor:
        """The SAE error ``x - SAE(x)`` in raw units: the target of the NFM stage."""
        return x_raw - self.reconstruct_raw(x_raw)

    @torch.no_grad()
    def with_input_scale(self, scale: float) -> TopKSAE:
        """A copy that reads activations at ``input_scale=scale`` and has the same codes and raw-unit
        reconstructions: with ``r = scale / input_scale``, ``W_enc / r``, ``b_dec * r``, ``W_dec * r``."""
        r = scale / self.cfg.input_scale
        out = copy.deepcopy(self)
        out.cfg = replace(out.cfg, input_scale=scale)
        out.W_enc.div_(r)
        out.W_dec.mul_(r)
        out.b_dec.mul_(r)
        return out

    # -- decoder geometry -----------------------------------------------------------------------------
    @torch.no_grad()
    def normalize_decoder(self) -> None:
        """Rescale decoder rows to unit norm."""
        self.W_dec /= self.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-12)

    @torch.no_grad()
    def remove_parallel_gradient(self) -> None:
        """Drop the component of each decoder row's gradient along the row (it would only change the norm)."""
        if self.W_dec.grad is not None:
            parallel = (self.W_dec.grad * self.W_dec).sum(dim=1, keepdim=True)
            self.W_dec.grad -= parallel * self.W_dec

    # -- saving -----------------------------------------------------------------------------------------
    def save(self, directory: str | Path) -> None:
        """``sae.safetensors`` + ``cfg.json``, each written atomically."""
        directory = Path(directory)
        with atomic_path(directory / WEIGHTS_FILE) as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        write_json(directory / CONFIG_FILE, {"format": "featint-topk-sae", **asdict(self.cfg)})

    @classmethod
    def load(cls, directory: str | Path) -> TopKSAE:
        directory = Path(directory)
        for name in (CONFIG_FILE, WEIGHTS_FILE):
            if not (directory / name).exists():
                raise FileNotFoundError(f"no SAE at {str(directory)!r}: {name} is missing")
        raw = json.loads((directory / CONFIG_FILE).read_text())
        if raw.pop("format", None) != "featint-topk-sae":
            raise ValueError(f"{directory / CONFIG_FILE} is not a featint SAE config (SAELens? use from_saelens)")
        sae = cls(SAEConfig(**raw))
        state = load_file(str(directory / WEIGHTS_FILE))
        expected = {k: tuple(v.shape) for k, v in sae.state_dict().items()}
        actual = {k: tuple(v.shape) for k, v in state.items()}
        if expected != actual:
            raise ValueError(f"{directory / WEIGHTS_FILE} does not match cfg.json: expected {expected}, got {actual}")
        sae.load_state_dict(state)
        return sae


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
    qualified module name of a :data:`featint_utils.models.ARCHITECTURES` model): whether the model is a
    post-norm encoder, and whether the module is a causal LM's final norm. ``(False, False)`` if unknown."""
    from .models import ARCHITECTURES

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
    :class:`~featint_utils.activations.ActivationStore`), with its provenance (``source`` as given, the sha256
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
