"""Neural Factorization Machine on SAE codes (He & Chua, 2017), computed from the active latents only.

``y = b + sum_i f_i w_i + MLP(f_BI)``, with the bi-interaction pooling
``f_BI = 0.5 * ((sum_i f_i v_i)^2 - sum_i (f_i v_i)^2)`` (elementwise; exactly the sum over pairs i < j of
``f_i f_j v_i * v_j``). The input is a sparse code ``(values, indices)``, [batch, n_active] each; both sums
are embedding bags over the active rows, so the cost is O(batch x n_active x K) and no dense
batch x n_latents (x K) tensor is ever built. One forward serves training, analysis and intervention: it
returns the pooled vector and the post-Linear(K,K), pre-ReLU vector (the secondary SAE's input).

The same class, by its ``form`` and ``knots``, is also the additive first-order baseline (per-feature
hinges) and the factorization machine, so every gradient-trained model of the ladder is fitted by the same
trainer and compared on the same forward.

Nested fits (:meth:`NFM.start_from`): the first-order part is copied from a converged first-order fit (the
closed-form ridge, or a trained additive model) and kept fixed, and the interaction output starts at exactly
zero, so the untrained NFM *is* that first-order model and whatever training adds is the pairwise term's
increment over it (:meth:`NFM.calibrate` sets the branch's starting scale from the data).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from ..io import atomic_path, write_json


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
    """"nfm" (first-order + pooling -> dropout -> Linear(K,K) -> ReLU -> Linear(K,d)), "fm" (first-order + a
    linear map of the pooled vector: a factorization machine), "interaction" (nfm without the first-order
    term) or "first_order" (no pairwise term at all: the linear or additive baseline)."""
    knots: int = 0
    """First-order term per feature: 0 is linear (``f_i w_i``); m > 0 adds a hinge ``relu(f_i - t) u_i,t``
    at each of m knots (``t`` = 0.5, 1, 2, ... times the feature's mean active value): an additive
    per-feature non-linear model."""
    batch_norm: bool = False
    """Batch norm on the pooled vector (as in the original NFM)."""
    dropout: float = 0.15
    """Dropout on the pooled vector while training."""
    embed_init_std: float = 0.05
    """Standard deviation of the factor embeddings at initialisation."""

    def __post_init__(self):
        if self.form not in FORMS:
            raise ValueError(f"form must be one of {FORMS}, got {self.form!r}")
        for name in ("n_latents", "d_out", "k_embed"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.knots < 0:
            raise ValueError(f"knots must be >= 0, got {self.knots}")

    @property
    def has_pairs(self) -> bool:
        return self.form != "first_order"

    @property
    def has_first_order(self) -> bool:
        return self.form != "interaction"


FORMS = ("nfm", "fm", "interaction", "first_order")


class NFMOutput(NamedTuple):
    """Every part of one NFM forward."""

    output: torch.Tensor
    """[batch, d_out] prediction: first-order + interaction."""
    linear: torch.Tensor
    """[batch, d_out] first-order part (bias included); zeros in the "interaction" form."""
    interaction: torch.Tensor
    """[batch, d_out] interaction part; zeros in the "first_order" form."""
    pooled: torch.Tensor | None
    """[batch, K] bi-interaction pooled vector (after batch norm, before dropout); None in "first_order"."""
    hidden_pre: torch.Tensor | None
    """[batch, K] post-Linear(K,K), pre-ReLU vector (None in the "fm" and "first_order" forms)."""


def bi_interaction(values: torch.Tensor, indices: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
    """``0.5 * ((sum f_i v_i)^2 - sum (f_i v_i)^2)`` from two embedding bags over the active rows."""
    total = F.embedding_bag(indices, embeddings, per_sample_weights=values, mode="sum")
    squares = F.embedding_bag(indices, embeddings.square(), per_sample_weights=values.square(), mode="sum")
    return 0.5 * (total.square() - squares)


KNOT_MULTIPLES = (0.5, 1.0, 2.0, 4.0, 8.0)


class NFM(nn.Module):
    """See the module docstring; :meth:`forward` takes a sparse code."""

    def __init__(self, cfg: NFMConfig, seed: int = 0):
        super().__init__()
        if cfg.knots > len(KNOT_MULTIPLES):
            raise ValueError(f"at most {len(KNOT_MULTIPLES)} knots, got {cfg.knots}")
        self.cfg = cfg
        generator = torch.Generator().manual_seed(seed)
        K, n, d = cfg.k_embed, cfg.n_latents, cfg.d_out
        if cfg.has_first_order:
            # one weight row per (feature, basis function): f, then relu(f - t) per knot
            self.linear_weight = nn.Parameter(torch.zeros(n * (1 + cfg.knots), d))
            self.bias = nn.Parameter(torch.zeros(d))
            self.register_buffer("knot_values", torch.ones(n, 1) * torch.tensor(KNOT_MULTIPLES[: cfg.knots]))
        # the interaction output is out(...) * output_scale: a fixed unit (see calibrate), 1 until calibrated
        self.register_buffer("output_scale", torch.ones(()))
        if cfg.has_pairs:
            self.embeddings = nn.Parameter(torch.randn(n, K, generator=generator) * cfg.embed_init_std)
            self.norm = nn.BatchNorm1d(K) if cfg.batch_norm else nn.Identity()
            self.dropout = nn.Dropout(cfg.dropout)
            self.hidden = None if cfg.form == "fm" else nn.Linear(K, K)
            self.out = nn.Linear(K, d)
            with torch.no_grad():  # seeded like the embeddings, so a seed fixes the whole initial model
                for layer in (self.hidden, self.out):
                    if layer is not None:
                        bound = layer.in_features**-0.5
                        layer.weight.copy_(torch.rand(layer.weight.shape, generator=generator) * 2 * bound - bound)
                        layer.bias.copy_(torch.rand(layer.bias.shape, generator=generator) * 2 * bound - bound)

    def set_knots(self, feature_scale: np.ndarray | torch.Tensor) -> None:
        """Place each feature's knots at multiples of its mean active value (from the fitting data)."""
        if self.cfg.knots and self.cfg.has_first_order:
            scale = torch.as_tensor(feature_scale, dtype=torch.float32).reshape(-1, 1)
            self.knot_values.copy_(scale * torch.tensor(KNOT_MULTIPLES[: self.cfg.knots]))

    def _check(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        if values.shape != indices.shape or values.dim() != 2:
            raise ValueError(
                f"values {tuple(values.shape)} and indices {tuple(indices.shape)} must both be [batch, n_active]"
            )
        if indices.numel() and (int(indices.max()) >= self.cfg.n_latents or int(indices.min()) < 0):
            raise ValueError(
                f"latent index {int(indices.max())} out of range for an NFM of {self.cfg.n_latents} latents"
            )

    def first_order_terms(self, values: torch.Tensor, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Basis values and weight rows of the first-order term, [batch, n_active * (1 + knots)] each."""
        if not self.cfg.knots:
            return values, indices
        hinges = torch.relu(values.unsqueeze(-1) - self.knot_values[indices])  # knots > 0: silent when off
        basis = torch.cat([values.unsqueeze(-1), hinges], dim=-1)
        rows = indices.unsqueeze(-1) * (1 + self.cfg.knots) + torch.arange(1 + self.cfg.knots)
        return basis.flatten(1), rows.flatten(1)

    def first_order(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The first-order part (bias included): a sum of per-feature terms, one embedding bag."""
        basis, rows = self.first_order_terms(values, indices)
        return F.embedding_bag(rows, self.linear_weight, per_sample_weights=basis, mode="sum") + self.bias

    def interaction_from_pooled(self, pooled: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(interaction output, pre-ReLU hidden vector) from a pooled vector (after batch norm)."""
        dropped = self.dropout(pooled)
        if self.hidden is None:
            return self.out(dropped) * self.output_scale, None
        hidden_pre = self.hidden(dropped)
        return self.interaction_from_hidden(hidden_pre), hidden_pre

    def interaction_from_hidden(self, hidden_pre: torch.Tensor) -> torch.Tensor:
        """The rest of the interaction path from a (possibly edited) pre-ReLU vector: Linear(K,d)(ReLU(h))."""
        return self.out(torch.relu(hidden_pre)) * self.output_scale

    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> NFMOutput:
        """The one forward, from a sparse code ``(values, indices)``."""
        self._check(values, indices)
        zeros = values.new_zeros(len(values), self.cfg.d_out)
        linear = self.first_order(values, indices) if self.cfg.has_first_order else zeros
        if not self.cfg.has_pairs:
            return NFMOutput(linear, linear, zeros, None, None)
        pooled = self.norm(bi_interaction(values, indices, self.embeddings))
        interaction, hidden_pre = self.interaction_from_pooled(pooled)
        return NFMOutput(linear + interaction, linear, interaction, pooled, hidden_pre)

    def predict(self, batch) -> torch.Tensor:
        """Prediction of the residual for a :class:`featint_utils.residual.code_data.CodeBatch`."""
        return self(batch.values, batch.indices).output

    @torch.no_grad()
    def start_from(self, weight: torch.Tensor, bias: torch.Tensor, knot_values: torch.Tensor | None = None) -> NFM:
        """Make the untrained model equal a converged first-order fit and keep that fit fixed: copy its
        first-order part and freeze it, and zero the interaction output. ``weight`` has one row per latent (a
        linear fit; this model's hinge rows, if any, start at zero and are the only first-order rows that
        train: the additive model over the linear one) or this model's rows (an additive fit; all frozen)."""
        if not self.cfg.has_first_order:
            raise ValueError("an 'interaction'-form NFM has no first-order part to start from")
        n, rows = self.cfg.n_latents, self.linear_weight.shape[0]
        weight, bias = weight.to(self.linear_weight.device), bias.to(self.linear_weight.device)
        trainable = torch.zeros(rows, 1)
        if weight.shape == (n, self.cfg.d_out):
            self.linear_weight.zero_()
            self.linear_weight[:: 1 + self.cfg.knots] = weight.float()
            trainable.fill_(1.0)
            trainable[:: 1 + self.cfg.knots] = 0.0
        elif weight.shape == (rows, self.cfg.d_out):
            self.linear_weight.copy_(weight.float())
            if knot_values is not None:
                self.knot_values.copy_(knot_values)
        else:
            raise ValueError(
                f"a first-order weight of shape {tuple(weight.shape)} does not fit this NFM "
                f"({n} latents, {self.cfg.knots} knots, d_out {self.cfg.d_out})"
            )
        self.bias.copy_(bias.float())
        self.bias.requires_grad_(False)
        if trainable.any():  # only the hinge rows move: their gradient passes, the copied rows' is zeroed
            self.linear_weight.register_hook(lambda grad: grad * trainable.to(grad.device))
        else:
            self.linear_weight.requires_grad_(False)
        if self.cfg.has_pairs:
            self.out.weight.zero_()
            self.out.bias.zero_()
        return self

    @torch.no_grad()
    def calibrate(self, values: torch.Tensor, indices: torch.Tensor, target_rms: float, pooled_rms: float = 0.01):
        """Data-dependent start of the pairwise branch, so that one learning rate suits any code or residual
        scale: the embeddings are rescaled so that the pooled vector has RMS ``pooled_rms`` on this sample of
        codes, and the interaction output is measured in units of ``target_rms`` (the RMS of what it fits).
        A small pooled start matters: a factorised model grown from near zero learns its strongest consistent
        pairwise structure first, whereas one started at unit scale is a random-feature model that fits the
        fitting set's noise before it finds sparse pairs (measured on planted data)."""
        if self.cfg.has_pairs:
            rms = float(bi_interaction(values, indices, self.embeddings).square().mean().sqrt())
            if rms > 0:
                self.embeddings.mul_((pooled_rms / rms) ** 0.5)  # the pooling is quadratic in the embeddings
        if not target_rms > 0:
            raise ValueError(f"the target's RMS must be positive, got {target_rms}")
        self.output_scale.fill_(target_rms)
        return self

    def linear_part(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The linear rows of the first-order part, bias included (hinges, if any, excluded)."""
        rows = self.linear_weight[:: 1 + self.cfg.knots]
        return F.embedding_bag(indices, rows, per_sample_weights=values, mode="sum") + self.bias

    @torch.no_grad()
    def set_linear(self, weight: torch.Tensor, bias: torch.Tensor) -> None:
        """Replace the linear rows of the first-order part and the bias (hinges and the branch are kept)."""
        self.linear_weight[:: 1 + self.cfg.knots] = weight.to(self.linear_weight.device, torch.float32)
        self.bias.copy_(bias.float())

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def save(self, directory: str | Path, extra: dict | None = None) -> None:
        """``nfm.safetensors`` + ``cfg.json``, each written atomically."""
        directory = Path(directory)
        with atomic_path(directory / "nfm.safetensors") as tmp:
            save_file({k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}, str(tmp))
        write_json(directory / "cfg.json", {"format": "featint-nfm", **asdict(self.cfg), "extra": extra or {}})

    @classmethod
    def load(cls, directory: str | Path) -> NFM:
        directory = Path(directory)
        for name in ("cfg.json", "nfm.safetensors"):
            if not (directory / name).exists():
                raise FileNotFoundError(f"no NFM at {str(directory)!r}: {name} is missing")
        raw = json.loads((directory / "cfg.json").read_text())
        if raw.pop("format", None) != "featint-nfm":
            raise ValueError(f"{directory / 'cfg.json'} is not a featint NFM config")
        extra = raw.pop("extra", None) or {}
        model = cls(NFMConfig(**raw))
        model.load_state_dict(load_file(str(directory / "nfm.safetensors")))
        model.extra = extra  # what was saved with it: the fit's summary for a trained NFM
        return model.eval()

    @property
    def learnt(self) -> bool:
        """Whether its fit moved it from its (nested) start and kept the move; an NFM without a fit record (built
        directly, or saved before fits were recorded) counts as learnt."""
        extra = getattr(self, "extra", {})
        return bool(extra.get("improved_on_start", True)) and not extra.get("kept_start", False)
