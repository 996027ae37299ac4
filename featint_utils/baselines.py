"""Baselines for "the NFM explains X% of the SAE residual", fitted to the same residual and split.

* :func:`fit_ridge` from the SAE code (``source="codes"``): the best linear map from the code, closed form.
* :func:`fit_ridge` from the raw activation (``source="inputs"``): the "dark matter" baseline (Engels et
  al. 2024): much of an SAE's error is a linear function of the activation itself.
* :class:`CodeMLP`: a one-hidden-layer MLP on the code with as many parameters as the NFM
  (:func:`matched_hidden`): is the factorised pairwise form special, or would any non-linear model do?
* The linear and additive per-feature models trained by gradient, and the shuffled-pair control, are
  forms of :class:`featint_utils.nfm.NFM` (``form="first_order"``, ``knots``) and
  :meth:`featint_utils.residuals.CodeData.with_shuffled_pairs`, fitted by the same trainer as the NFM.

Ridge: the intercept is unpenalised (centred normal equations); the penalty is ``alpha`` times the mean
diagonal of the centred Gram matrix, with ``alpha`` picked on the tune documents.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .nfm_training import residual_fvu
from .progress import progress
from .residuals import CodeData

RIDGE_ALPHAS = tuple(10.0**e for e in range(-6, 4))  # up to a penalty that all but zeroes W


class RidgeModel(nn.Module):
    """``y = W z + b`` with ``z`` the code (sparse, an embedding bag) or the activation (dense)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, source: str, alpha: float):
        super().__init__()
        self.weight = nn.Parameter(weight.float(), requires_grad=False)
        self.bias = nn.Parameter(bias.float(), requires_grad=False)
        self.source, self.alpha = source, alpha

    def predict(self, batch) -> torch.Tensor:
        if self.source == "codes":
            return F.embedding_bag(batch.indices, self.weight, per_sample_weights=batch.values, mode="sum") + self.bias
        return batch.inputs @ self.weight + self.bias


def _normal_equations(data: CodeData, source: str, batch_size: int = 8192):
    """float64 sums for ridge: Gram matrix, cross-products with the target, input and target sums."""
    width = data.n_latents if source == "codes" else data.inputs.shape[1]
    gram = torch.zeros(width, width, dtype=torch.float64)
    cross = torch.zeros(width, data.d_out, dtype=torch.float64)
    z_sum, y_sum = torch.zeros(width, dtype=torch.float64), torch.zeros(data.d_out, dtype=torch.float64)
    for batch in progress(data.batches(batch_size), total=-(-len(data) // batch_size), desc=f"ridge ({source})"):
        y = batch.target.double()
        y_sum += y.sum(0)
        if source == "codes":
            values, indices = batch.values.double(), batch.indices
            # Gram += sum over tokens of the outer product of the k active entries: k^2 scatter-adds a token
            pair_keys = (indices.unsqueeze(2) * width + indices.unsqueeze(1)).flatten()
            gram.view(-1).index_add_(0, pair_keys, (values.unsqueeze(2) * values.unsqueeze(1)).flatten())
            cross.index_add_(0, indices.flatten(), (values.unsqueeze(2) * y.unsqueeze(1)).flatten(0, 1))
            z_sum.index_add_(0, indices.flatten(), values.flatten())
        else:
            z = batch.inputs.double()
            gram += z.T @ z
            cross += z.T @ y
            z_sum += z.sum(0)
    return gram, cross, z_sum, y_sum, len(data)


def fit_ridge(fit: CodeData, tune: CodeData, source: str = "codes", alphas=RIDGE_ALPHAS) -> RidgeModel:
    """Closed-form ridge from the code or the activation to the residual, ``alpha`` chosen on ``tune``."""
    if source not in ("codes", "inputs"):
        raise ValueError(f"source must be 'codes' or 'inputs', got {source!r}")
    gram, cross, z_sum, y_sum, n = _normal_equations(fit, source)
    z_mean, y_mean = z_sum / n, y_sum / n
    gram_c = gram - n * torch.outer(z_mean, z_mean)
    cross_c = cross - n * torch.outer(z_mean, y_mean)
    scale = float(gram_c.diagonal().mean()) or 1.0
    best = None
    for alpha in alphas:
        system = gram_c + alpha * scale * torch.eye(len(gram_c), dtype=torch.float64)
        factor, info = torch.linalg.cholesky_ex(system)
        if int(info):
            continue  # not positive definite at this penalty (latents that never fire, tiny alpha)
        weight = torch.cholesky_solve(cross_c, factor)
        model = RidgeModel(weight, y_mean - z_mean @ weight, source, alpha)
        score = residual_fvu(model, tune)
        if best is None or score < best[0]:
            best = (score, model)
    if best is None:
        raise ValueError(f"ridge from {source}: no penalty in {alphas} gave a solvable system")
    return best[1]


class CodeMLP(nn.Module):
    """``Linear(H, d)(ReLU(W f + c))`` on the sparse code: the first layer is an embedding bag."""

    def __init__(self, n_latents: int, d_out: int, hidden: int, seed: int = 0):
        super().__init__()
        generator = torch.Generator().manual_seed(seed)
        self.n_latents = n_latents
        self.first = nn.Parameter(torch.randn(n_latents, hidden, generator=generator) * hidden**-0.5)
        self.first_bias = nn.Parameter(torch.zeros(hidden))
        self.out = nn.Linear(hidden, d_out)
        with torch.no_grad():
            self.out.weight.copy_(torch.randn(self.out.weight.shape, generator=generator) * hidden**-0.5 * 0.1)
            self.out.bias.zero_()

    def predict(self, batch) -> torch.Tensor:
        hidden = F.embedding_bag(batch.indices, self.first, per_sample_weights=batch.values, mode="sum")
        return self.out(torch.relu(hidden + self.first_bias))


def matched_hidden(n_parameters: int, n_latents: int, d_out: int) -> int:
    """Hidden width at which :class:`CodeMLP` has (about) ``n_parameters`` parameters."""
    return max(1, round((n_parameters - d_out) / (n_latents + 1 + d_out)))
