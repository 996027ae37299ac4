"""Per-document sums and the bootstrap behind every interval of the estimator.

**Intervals.** Each model's summed squared error is kept per test document, with each document's summed
squared deviation from the test mean; a bootstrap draws documents and seeds with replacement and recomputes
the share (percentile interval). The same draws serve every comparison, so differences are paired.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from .code_data import CodeData

# ---------------------------------------------------------------------------------------------------
# Per-document sums and the bootstrap


def document_totals(data: CodeData, batch_size: int = 8192) -> pd.DataFrame:
    """Per document of ``data``: tokens, summed squared deviation of the target from the set's mean, and the
    summed squared target (the error of predicting zero). Sorted by document."""
    documents, inverse = np.unique(data.document, return_inverse=True)
    sums = torch.zeros(len(documents), data.d_out, dtype=torch.float64)
    squares = torch.zeros(len(documents), dtype=torch.float64)
    tokens = np.bincount(inverse, minlength=len(documents))
    position = 0
    for batch in data.batches(batch_size):
        doc = torch.from_numpy(inverse[position : position + len(batch.target)])
        position += len(batch.target)
        target = batch.target.double()
        sums.index_add_(0, doc, target)
        squares.index_add_(0, doc, target.square().sum(1))
    mean = sums.sum(0) / tokens.sum()
    centred = squares - 2 * sums @ mean + torch.from_numpy(tokens).double() * (mean @ mean)
    return pd.DataFrame(
        {"document": documents, "tokens": tokens, "centred_ss": centred.numpy(), "zero_sse": squares.numpy()}
    )


class Draws(NamedTuple):
    """Bootstrap draws shared by every comparison: document weights and seed picks."""

    weights: np.ndarray
    """[n_boot, n_documents] how often each document is drawn."""
    seeds: np.ndarray
    """[n_boot, n_seeds] which seed (position) fills each seed slot."""


def bootstrap_draws(n_documents: int, n_seeds: int, n_boot: int = 2000, seed: int = 0) -> Draws:
    rng = np.random.default_rng(seed)
    weights = rng.multinomial(n_documents, np.full(n_documents, 1 / n_documents), size=n_boot).astype(float)
    return Draws(weights, rng.integers(0, n_seeds, size=(n_boot, n_seeds)))


def increments(centred: np.ndarray, base: np.ndarray, model: np.ndarray, draws: Draws | None = None) -> np.ndarray:
    """Share ``(SSE_base - SSE_model) / SS`` averaged over seeds: on the whole set (draws None: one value per
    seed, [S]) or per bootstrap draw ([n_boot]). ``base`` and ``model`` are [S, D] (or [D] for an unseeded
    model, used for every seed)."""
    base, model = np.atleast_2d(base), np.atleast_2d(model)
    diff = base - model  # [S, D]
    # a model that kept its start predicts what its base does; float summation order is not a finding
    diff = np.where(np.abs(diff) <= 1e-9 * np.abs(base), 0.0, diff)
    if draws is None:
        return diff.sum(1) / centred.sum()
    n_seeds = diff.shape[0]
    per_seed = draws.weights @ diff.T  # [B, S]
    picked = np.take_along_axis(per_seed, draws.seeds[:, :n_seeds] % n_seeds, axis=1)
    return picked.mean(1) / (draws.weights @ centred)


def interval(point_per_seed: np.ndarray, boot: np.ndarray, level: float = 0.95) -> dict:
    low, high = np.percentile(boot, [50 * (1 - level), 50 * (1 + level)])
    return {
        "mean": float(np.mean(point_per_seed)),
        "ci_low": float(low),
        "ci_high": float(high),
        "sd": float(np.std(point_per_seed, ddof=1)) if len(point_per_seed) > 1 else 0.0,
        "n_seeds": len(point_per_seed),
    }
