"""The decomposition of a layer that every stage shares, and the clamp that edits it.

**The splice** (:meth:`Decomposition.edit`, at exactly the primary SAE's layer, in its normalised space): the
layer output ``x`` becomes ``SAE(x) + NFM'(f) + error`` with ``error = x - SAE(x) - NFM(f)`` from the same
clean ``x``; with no clamp the model is reproduced exactly. See :mod:`featint_utils.integration.clamping` for the paths
a :class:`Clamp` edits and the readouts.

**Devices.** The parts live on one device (:meth:`Decomposition.to`); every method takes its input on any
device and answers on the input's: hidden states of a model on the same GPU never leave it, and store
batches from the host come back to the host.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch

from ..dictionary.sae import TopKSAE
from .nfm import NFM, NFMOutput

MODES = ("set", "multiply", "add")


@dataclass(frozen=True)
class Clamp:
    """One edit of one feature (see the module docstring)."""

    path: str
    """"secondary" (a feature of the NFM vector) or "linear" (a primary feature in the first-order term)."""
    feature: int
    mode: str
    """"set", "multiply" or "add"."""
    value: float

    def __post_init__(self):
        if self.path not in ("secondary", "linear"):
            raise ValueError(f"clamp path must be 'secondary' or 'linear', got {self.path!r}")
        if self.mode not in MODES:
            raise ValueError(f"clamp mode must be one of {MODES}, got {self.mode!r}")

    def apply(self, current: torch.Tensor) -> torch.Tensor:
        if self.mode == "set":
            return torch.full_like(current, self.value)
        return current * self.value if self.mode == "multiply" else current + self.value


class Decomposed(NamedTuple):
    """A splice's clean parts for some tokens (normalised units): :meth:`Decomposition.decompose`."""

    values: torch.Tensor
    """[tokens, k] primary code."""
    indices: torch.Tensor
    reconstruction: torch.Tensor
    """[tokens, d] the primary SAE's reconstruction."""
    parts: NFMOutput
    """The NFM's forward on the code."""
    error: torch.Tensor
    """[tokens, d] what neither models: ``x - reconstruction - parts.output``."""


@dataclass
class Decomposition:
    """A layer's activations as the workbook decomposes them: primary SAE code (after the input scale), the
    NFM's first-order and pairwise parts of what the SAE misses, and the secondary SAE's code of the NFM
    vector. The only place these are composed: every stage encodes through it."""

    primary: TopKSAE
    nfm: NFM | None = None
    secondary: TopKSAE | None = None

    def __post_init__(self):
        if self.nfm is None:
            if self.secondary is not None:
                raise ValueError("a secondary SAE reads the NFM's vector: give the NFM too")
            return
        self.nfm.eval()
        if self.nfm.cfg.n_latents != self.primary.cfg.n_latents or self.nfm.cfg.d_out != self.primary.cfg.d_in:
            raise ValueError("the NFM does not fit the primary SAE (latents or width differ)")
        if self.secondary is not None:
            if self.nfm.hidden is None:
                raise ValueError(f"an NFM of form {self.nfm.cfg.form!r} has no Linear(K,K) vector to decompose")
            if self.secondary.cfg.d_in != self.nfm.cfg.k_embed:
                raise ValueError(
                    f"the secondary SAE takes d_in={self.secondary.cfg.d_in} but the NFM vector is "
                    f"{self.nfm.cfg.k_embed} wide"
                )

    @property
    def device(self) -> torch.device:
        return self.primary.W_enc.device

    def to(self, device: torch.device | str) -> Decomposition:
        """Move every part to ``device``; returns self."""
        for part in (self.primary, self.nfm, self.secondary):
            if part is not None:
                part.to(device)
        return self

    def _require(self, part: str) -> None:
        if getattr(self, part) is None:
            raise ValueError(f"this decomposition has no {part}")

    @torch.no_grad()
    def primary_code(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the primary SAE for raw activations [tokens, d]."""
        values, indices = self.primary.encode(x_raw.to(self.device).float() * self.primary.cfg.input_scale)
        return values.to(x_raw.device), indices.to(x_raw.device)

    @torch.no_grad()
    def primary_pre_activation(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Every primary latent's encoder pre-activation ``W_enc (x - b_dec) + b_enc`` for raw activations, as a
        dense code (values [tokens, n], indices ``0..n-1`` in every row): the layer read along each feature's
        encoder direction, linear in the activation (no ReLU, no top-k)."""
        values = self.primary.pre_activation(x_raw.to(self.device).float() * self.primary.cfg.input_scale)
        indices = torch.arange(self.primary.cfg.n_latents, device=values.device).expand_as(values)
        return values.to(x_raw.device), indices.to(x_raw.device)

    @torch.no_grad()
    def nfm_vector(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The NFM's post-Linear(K,K), pre-ReLU vector ``h`` of primary codes (eval mode): the secondary input."""
        self._require("nfm")
        if self.nfm.hidden is None:
            raise ValueError(f"an NFM of form {self.nfm.cfg.form!r} has no Linear(K,K) vector")
        self.nfm.eval()
        return self.nfm(values.to(self.device), indices.to(self.device)).hidden_pre.to(values.device)

    @torch.no_grad()
    def secondary_code_of_vector(self, h: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the secondary SAE for NFM vectors ``h``."""
        self._require("secondary")
        values, indices = self.secondary.encode(h.to(self.device) * self.secondary.cfg.input_scale)
        return values.to(h.device), indices.to(h.device)

    @torch.no_grad()
    def secondary_code(self, x_raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values, indices) of the secondary SAE for raw activations, through the primary SAE and the NFM."""
        return self.secondary_code_of_vector(self.nfm_vector(*self.primary_code(x_raw)))

    @torch.no_grad()
    def decompose(self, x_raw: torch.Tensor) -> Decomposed:
        """The unedited splice's parts for clean outputs ``x_raw`` [tokens, d] (normalised units): what every
        clamp of the same tokens shares (:meth:`edit` takes it to skip recomputing it)."""
        self._require("nfm")
        x = x_raw.to(self.device).float() * self.primary.cfg.input_scale
        values, indices = self.primary.encode(x)
        reconstruction = self.primary.decode(values, indices)
        parts = self.nfm(values, indices)
        return Decomposed(values, indices, reconstruction, parts, x - reconstruction - parts.output)

    @torch.no_grad()
    def edit(
        self,
        x_raw: torch.Tensor,
        clamp: Clamp | None = None,
        control: str | None = None,
        generator: torch.Generator | None = None,
        clean: Decomposed | None = None,
    ) -> torch.Tensor:
        """The spliced layer output (raw units) for clean outputs ``x_raw`` [tokens, d]; ``clean`` is
        :meth:`decompose` of the same ``x_raw`` where the caller kept it."""
        values, indices, reconstruction, parts, error = clean if clean is not None else self.decompose(x_raw)
        edited = parts.output
        if clamp is not None:
            edited = parts.output + self._change(clamp, values, indices, parts)
            if control == "random":
                change = edited - parts.output
                # drawn on the host: the same draws whatever the device
                noise = torch.randn(change.shape, generator=generator).to(change.device)
                noise *= change.norm(dim=-1, keepdim=True) / noise.norm(dim=-1, keepdim=True).clamp_min(1e-12)
                edited = parts.output + noise
            elif control is not None:
                raise ValueError(f"control must be None or 'random', got {control!r}")
        return ((reconstruction + edited + error) / self.primary.cfg.input_scale).to(x_raw.device)

    def _change(self, clamp: Clamp, values, indices, parts) -> torch.Tensor:
        """How the NFM output moves under ``clamp`` (normalised units)."""
        if clamp.path == "linear":
            current = (values * (indices == clamp.feature)).sum(1)
            target = clamp.apply(current)
            slot = torch.full((len(values), 1), clamp.feature, dtype=indices.dtype, device=indices.device)
            return self.nfm.first_order(target[:, None], slot) - self.nfm.first_order(current[:, None], slot)
        if self.secondary is None or parts.hidden_pre is None:
            raise ValueError("a secondary clamp needs a secondary SAE and an NFM with a Linear(K,K) layer")
        h = parts.hidden_pre
        s_values, s_indices = self.secondary_code_of_vector(h)
        current = (s_values * (s_indices == clamp.feature)).sum(1)
        delta = clamp.apply(current) - current
        h_edited = h + delta[:, None] * self.secondary.W_dec[clamp.feature] / self.secondary.cfg.input_scale
        return self.nfm.interaction_from_hidden(h_edited) - parts.interaction
