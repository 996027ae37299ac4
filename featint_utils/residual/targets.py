"""The targets the estimator fits besides the residual itself (:mod:`featint_utils.residual.interaction`).

**Null control** (Freedman & Lane, 1983). ``y* = yhat(f_t) + r(pi(t))`` with ``yhat`` the first-order fit,
``r = y - yhat`` and ``pi`` a random permutation of the tokens within each of fit, tune and test. Every token
keeps its own code and the whole first-order part of its target; only what the first-order model leaves
(where pairwise structure would be) is detached from the code. The same pipeline (first-order refit, the same
nested fits, learning rates and seeds) runs on ``y*``. If the residual holds no pairwise structure, the real
and control shares have the same distribution, so the control shows, in this run and at this size, what
the estimator reports when there is nothing to find. (The shuffled-pair control it replaces fed the pairwise
branch another token's code: that also removed the token's own first-order information, so a pairwise
branch that merely re-learned first-order signal beat it.)

**Power.** Planted interactions ``c * sum over (a, b) in S of f_a f_b u_ab`` (``S``: random pairs among the most
frequently co-firing ones in the fit set, ``u`` random unit directions), their linear shadow on the code
removed, are added to the run's own residual at sizes given as a share of its variance; every estimator and
an oracle ridge that knows ``S`` run on each. An estimator detects a size when what the planted interaction
adds to its estimate (paired bootstrap over test documents and seeds) has an interval above zero; its
detection limit is the smallest planted share (the oracle's increment) it detects at that size and every
larger one.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch
import torch.nn.functional as F

from .baselines import (
    PairLookup,
    SparseDesign,
    cofiring_pairs,
)
from .code_data import CodeBatch, CodeData, device_of, predict
from .resampling import document_totals

# ---------------------------------------------------------------------------------------------------
# Targets: the null control and planted interactions


class _Transform:
    """Base of the target transforms: reads the base set's own target (which may itself be computed)."""

    def __init__(self, base: CodeData):
        self.base = base

    def base_target(self, at: np.ndarray, batch: CodeBatch) -> torch.Tensor:
        if self.base.target_transform is None:
            return batch.target
        return self.base.target_transform(at, batch)


class PermutedRemainder(_Transform):
    """The null control's target ``yhat(f_t) + (y - yhat)(pi(t))`` (see the module docstring)."""

    def __init__(self, base: CodeData, sets: dict[str, CodeData], first_order: torch.nn.Module, seed: int):
        super().__init__(base)
        self.first_order = first_order.eval()
        self.source = np.arange(len(base.values))
        rng = np.random.default_rng(seed + 104_729)
        for data in sets.values():  # within each set: no token moves across fit / tune / test
            self.source[data.rows] = data.rows[rng.permutation(len(data.rows))]

    @torch.no_grad()
    def __call__(self, at: np.ndarray, batch: CodeBatch) -> torch.Tensor:
        src = self.source[at]
        moved = self.base.stored(src)
        remainder = self.base_target(src, moved) - predict(self.first_order, moved)
        return predict(self.first_order, batch) + remainder


class WithoutNonLinearPart(_Transform):
    """The target minus what a model adds beyond its linear rows: what a first-order refit is fitted to."""

    def __init__(self, base: CodeData, model: torch.nn.Module):
        super().__init__(base)
        self.model = model.eval()

    @torch.no_grad()
    def __call__(self, at: np.ndarray, batch: CodeBatch) -> torch.Tensor:
        on_model = batch.to(device_of(self.model))
        beyond = self.model.predict(on_model) - self.model.linear_part(on_model.values, on_model.indices)
        return self.base_target(at, batch) - beyond.to(batch.target.device)


class PlantedPairs(NamedTuple):
    """A planted pairwise interaction: ``scale * (sum over pairs of f_a f_b direction - (f W + b))``, the products'
    own linear projection on the code (``W``, ``b``, fitted on the fit set) removed, so that all of it is
    pairwise and none of it is something a first-order fit could take."""

    pairs: np.ndarray
    """[P, 2] latent pairs."""
    directions: torch.Tensor
    """[P, d] unit directions, one per pair."""
    scale: float
    """Multiplier that gives the planted term its size."""
    share: float
    """Its variance on the fit set as a share of the residual's (the nominal size)."""
    linear_weight: torch.Tensor | None = None
    """[n_latents, d] ``W``: the products' ridge projection on the code (None: not removed)."""
    linear_bias: torch.Tensor | None = None
    """[d] ``b``."""


class AddPlanted(_Transform):
    """The target plus a planted interaction of the code's own latents."""

    def __init__(self, base: CodeData, planted: PlantedPairs):
        super().__init__(base)
        self.planted = planted
        self.lookup = PairLookup(planted.pairs, base.n_latents)

    def term(self, batch: CodeBatch) -> torch.Tensor:
        column, product = self.lookup.active(batch.values, batch.indices)
        term = F.embedding_bag(column, self.planted.directions, per_sample_weights=product, mode="sum")
        if self.planted.linear_weight is not None:
            term = (
                term
                - F.embedding_bag(
                    batch.indices, self.planted.linear_weight, per_sample_weights=batch.values, mode="sum"
                )
                - self.planted.linear_bias
            )
        return self.planted.scale * term

    def __call__(self, at: np.ndarray, batch: CodeBatch) -> torch.Tensor:
        return self.base_target(at, batch) + self.term(batch)


def random_pairs(codes: CodeData, n_pairs: int, candidates: int, d: int, seed: int) -> tuple[np.ndarray, torch.Tensor]:
    """``n_pairs`` random pairs among the ``candidates`` most frequently co-firing ones of ``codes``, each with a
    random unit direction in ``d`` dimensions: where a planted interaction goes."""
    pool = cofiring_pairs(codes, candidates)
    if len(pool) < n_pairs:
        raise ValueError(f"only {len(pool)} co-firing pairs in this code; cannot plant {n_pairs}")
    rng = np.random.default_rng(seed)
    pairs = pool[np.sort(rng.choice(len(pool), n_pairs, replace=False))]
    directions = torch.from_numpy(rng.normal(size=(n_pairs, d))).float()
    return pairs, directions / directions.norm(dim=1, keepdim=True)


def plant_pairs(
    fit: CodeData,
    share: float,
    design: SparseDesign,
    penalty: float,
    n_planted: int = 16,
    candidates: int = 256,
    seed: int = 0,
) -> PlantedPairs:
    """``n_planted`` random pairs among the ``candidates`` most frequently co-firing ones of ``fit``, random unit
    directions, minus the products' own projection on the code (a first-order ridge: ``design``'s code block,
    ``penalty``), scaled to ``share`` of the residual's variance on ``fit``. The products of frequent latents
    are largely first-order; planting them whole would inflate the target with variance any first-order fit
    takes, and shrink every share measured against it."""
    if not share > 0:
        raise ValueError(f"a planted share must be positive, got {share}")
    pairs, directions = random_pairs(fit, n_planted, candidates, fit.d_out, seed + 7_919)
    products = AddPlanted(fit, PlantedPairs(pairs, directions, 1.0, share))
    gram, cross, z_mean, y_mean = design.centred(*design.cross(fit.with_target(lambda at, b: products.term(b))))
    code = slice(0, fit.n_latents)
    factor, info = design.code_factor(penalty)
    if info:
        raise torch.linalg.LinAlgError(f"the code block plus the first-order penalty is not positive definite ({info})")
    weight = torch.cholesky_solve(cross[code], factor)
    bias = y_mean - z_mean[code] @ weight
    unit = PlantedPairs(pairs, directions, 1.0, share, weight.float().contiguous(), bias.float())
    planted = AddPlanted(fit, unit)
    planted_ss = float(document_totals(fit.with_target(lambda at, b: planted.term(b)))["centred_ss"].sum())
    if not planted_ss > 1e-12:
        raise ValueError("the chosen pairs' products are first-order on the fit set: nothing pairwise to plant")
    residual_ss = float(document_totals(fit.with_target(products.base_target))["centred_ss"].sum())
    return unit._replace(scale=float(np.sqrt(share * residual_ss / planted_ss)))
