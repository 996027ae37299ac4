"""Neural Factorization Machine on SAE codes (He & Chua, 2017), computed from the active latents only.

``y = b + sum_i f_i w_i + MLP(f_BI)``, with the bi-interaction pooling
``f_BI = 0.5 * ((sum_i f_i v_i)^2 - sum_i (f_i v_i)^2)`` (elementwise; exactly the sum over pairs i < j of
``f_i f_j v_i * v_j``). The input is a sparse code ``(values, indices)``, [batch, n_active] each; both sums
are embedding bags over the active rows, so the cost is O(batch x n_active x K) and no dense
batch x n_latents (x K) tensor is ever built. One forward serves training, analysis and intervention: it
returns the pooled vector and the post-Linear(K,K), pre-ReLU vector (the secondary SAE's input).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn


@dataclass
class NFMConfig:
    """Shape and form of an NFM."""

    n_latents: int
    """Input width: the SAE's dictionary size."""
    d_out: int
    """Output width: the residual's dimension (d_model)."""
    k_embed: int = 256
    """K: width of the factor embeddings and of the interaction MLP."""
    form: str = "nfm"
    """"nfm" (linear + pooling -> dropout -> Linear(K,K) -> ReLU -> Linear(K,d)), "fm" (linear + a
    linear map of the pooled vector: a factorization machine), or "interaction" (nfm without the linear term)."""
    batch_norm: bool = False
    """Batch norm on the pooled vector (as in the original NFM)."""
    dropout: float = 0.15
    """Dropout on the pooled vector while training."""
    embed_init_std: float = 0.05
    """Standard deviation of the factor embeddings at initialisation."""

    def __post_init__(self):
        if self.form not in ("nfm", "fm", "interaction"):
            raise ValueError(f"form must be 'nfm', 'fm' or 'interaction', got {self.form!r}")
        for name in ("n_latents", "d_out", "k_embed"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")


class NFMOutput(NamedTuple):
    """Every part of one NFM forward."""

    output: torch.Tensor
    """[batch, d_out] prediction: linear + interaction."""
    linear: torch.Tensor
    """[batch, d_out] linear part (bias included); zeros in the "interaction" form."""
    interaction: torch.Tensor
    """[batch, d_out] interaction part."""
    pooled: torch.Tensor
    """[batch, K] bi-interaction pooled vector (after batch norm, before dropout)."""
    hidden_pre: torch.Tensor | None
    """[batch, K] post-Linear(K,K), pre-ReLU vector (None in the "fm" form)."""


def bi_interaction(values: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``0.5 * ((sum f_i v_i)^2 - sum (f_i v_i)^2)`` from two embedding bags over the active rows."""
    total = F.embedding_bag(indices, embeddings, per_sample_weights=values, mode="sum")
    squares = F.embedding_bag(indices, embeddings.square(), per_sample_weights=values.square(), mode="sum")
    return 0.5 * (total.square() - squares)


class NFM(nn.Module):
    """See the module docstring; :meth:`forward` takes a sparse code."""

    def __init__(self, cfg: NFMConfig, seed: int = 0):
        super().__init__()
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        K = cfg.k_embed
        self.embeddings = nn.Parameter(torch.randn(cfg.n_latents, K, generator=generator) * cfg.embed_init_std)
        self.linear_weight = nn.Parameter(torch.zeros(cfg.n_latents, cfg.d_out))
        self.bias = nn.Parameter(torch.zeros(cfg.d_out))
        self.norm = nn.BatchNorm1d(K) if cfg.batch_norm else nn.Identity()
        self.dropout = nn.Dropout(cfg.dropout)
        if cfg.form == "fm":
            self.hidden = None
            self.out = nn.Linear(K, cfg.d_out)
        else:
            self.hidden = nn.Linear(K, K)
            self.out = nn.Linear(K, cfg.d_out)

    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> NFMOutput:
        if values.shape != indices.shape or values.dim() != 2:
            raise ValueError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [batch, n_active]"
            )
        if len(indices) and int(indices.max()) >= self.cfg.n_latents:
            raise ValueError(
                f"latent index {int(indices.max())} out of range for an NFM of {self.cfg.n_latents} latents"
            )
        pooled = self.norm(bi_interaction(values, indices, self.embeddings))
        dropped = self.dropout(pooled)
        if self.hidden is None:
            hidden_pre = None
            interaction = self.out(dropped)
        else:
            hidden_pre = self.hidden(dropped)
            interaction = self.out(torch.relu(hidden_pre))
        if self.cfg.form == "interaction":
            linear = torch.zeros_like(interaction)
        else:
            linear = F.embedding_bag(indices, self.linear_weight, per_sample_weights=values, mode="sum") + self.bias
        return NFMOutput(linear + interaction, linear, interaction, pooled, hidden_pre)
