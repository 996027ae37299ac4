"""TopK sparse autoencoder: the model, its sparse encode/decode, and its own on-disk format (the SAELens layout is
:mod:`featint_utils.dictionary.saelens`).

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
import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_path, write_json

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
