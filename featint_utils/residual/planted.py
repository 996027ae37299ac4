"""Planted data with known pairwise interactions, to check the interaction estimator against the truth.

* :func:`codes`: sparse codes like an SAE's (``k`` of ``n`` latents active, firing frequencies falling off
  as a power law) and a residual that is a linear function of the code plus noise: no pairwise structure.
  Planted pairs are added on top with :class:`featint_utils.residual.targets.AddPlanted`, as in a real run.
* :func:`activations`: activations ``x = s D + c * sum over planted pairs of s_a s_b u_ab + noise`` built from
  true sparse features ``s`` (rows of ``D`` and ``u`` random unit vectors), with the interaction worth a given
  share of ``x``'s variance. They go through the whole pipeline (an ``activations:`` npz corpus, the SAE, the
  residual), so they show how much of an interaction an SAE absorbs into its own latents.
"""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from .code_data import CodeData, code_data_from_arrays


def sparse_features(
    n_tokens: int, n_features: int, k: int, rng: np.random.Generator, zipf: float = 0.9
) -> tuple[np.ndarray, np.ndarray]:
    """``k`` distinct active features per token (more frequent ones chosen more often: Gumbel top-k on
    weights ``rank ** -zipf``) with values in [0.5, 2]; (values [n, k] float32, indices [n, k] int64)."""
    if not 0 < k < n_features:
        raise ValueError(f"need 0 < k < n_features, got k={k}, n_features={n_features}")
    log_weight = -zipf * np.log(np.arange(1, n_features + 1))
    scores = log_weight + rng.gumbel(size=(n_tokens, n_features))
    indices = np.argpartition(-scores, k, axis=1)[:, :k]
    values = rng.uniform(0.5, 2.0, size=(n_tokens, k))
    return values.astype(np.float32), indices.astype(np.int64)


def dense(values: np.ndarray, indices: np.ndarray, n_features: int) -> np.ndarray:
    out = np.zeros((len(values), n_features))
    np.put_along_axis(out, indices, values, 1)
    return out


def codes(
    n_tokens: int,
    n_latents: int = 256,
    k: int = 16,
    d: int = 32,
    linear_share: float = 0.3,
    seed: int = 0,
    doc_len: int = 64,
) -> CodeData:
    """A code and a residual ``f W + noise`` whose linear part is ``linear_share`` of its variance, scaled like
    an SAE residual in the normalised space (variance 0.2 per dimension); the inputs (for the raw-activation
    ridge) are a random projection of the code. One document per ``doc_len`` tokens."""
    rng = np.random.default_rng(seed)
    values, indices = sparse_features(n_tokens, n_latents, k, rng)
    f = dense(values, indices, n_latents)
    structure = np.random.default_rng(10_007)  # the same W and projection for every seed: one "SAE"
    weight, projection = structure.normal(size=(n_latents, d)), structure.normal(size=(n_latents, d))
    linear = f @ weight
    spread = ((linear - linear.mean(0)) ** 2).sum(1).mean() / d
    linear *= np.sqrt(0.2 * linear_share / spread)
    noise = rng.normal(0, np.sqrt(0.2 * (1 - linear_share)), size=linear.shape)
    return code_data_from_arrays(
        values,
        indices,
        linear + noise,
        inputs=f @ projection,
        groups=np.arange(n_tokens) // doc_len,
        n_latents=n_latents,
    )


class PlantedActivations(NamedTuple):
    """Activations with a planted interaction, and the truth behind them."""

    acts: np.ndarray
    """[n, d] float32 activations."""
    doc: np.ndarray
    """[n] the document of every row."""
    interaction: np.ndarray
    """[n, d] the planted interaction term (included in ``acts``)."""
    values: np.ndarray
    """[n, k] true feature values."""
    indices: np.ndarray
    """[n, k] true feature indices."""
    features: np.ndarray
    """[n_features, d] true feature directions."""
    pairs: np.ndarray
    """[n_pairs, 2] interacting feature pairs."""
    directions: np.ndarray
    """[n_pairs, d] each pair's interaction direction."""

    def save_npz(self, path: str | Path) -> Path:
        """Write ``acts`` and ``doc`` in the ``activations:PATH.npz`` corpus format."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(path, acts=self.acts, doc=self.doc)
        return path


def activations(
    n_tokens: int,
    d: int = 64,
    n_features: int = 512,
    k: int = 8,
    interaction_share: float = 0.0,
    n_pairs: int = 20,
    noise: float = 0.05,
    seed: int = 0,
    doc_len: int = 64,
    frequent: int = 48,
) -> PlantedActivations:
    """``x = s D + c * sum over pairs of s_a s_b u_ab + noise`` (see the module docstring). The pairs are drawn
    among the ``frequent`` most frequent features (so they co-fire often enough to be learnt), and ``c`` makes
    the interaction ``interaction_share`` of ``x``'s variance (0: none). ``D``, ``u`` and the pairs depend only on
    the dimensions, so datasets of different seeds share their truth."""
    if not 0 <= interaction_share < 1:
        raise ValueError(f"interaction_share must be in [0, 1), got {interaction_share}")
    rng = np.random.default_rng(seed)
    values, indices = sparse_features(n_tokens, n_features, k, rng)
    s = dense(values, indices, n_features)
    structure = np.random.default_rng(20_011 + d + n_features)
    features = structure.normal(size=(n_features, d))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    candidates = np.array([(a, b) for a in range(frequent) for b in range(a + 1, frequent)])
    pairs = candidates[np.sort(structure.choice(len(candidates), n_pairs, replace=False))]
    directions = structure.normal(size=(n_pairs, d))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    linear = s @ features
    raw = (s[:, pairs[:, 0]] * s[:, pairs[:, 1]]) @ directions
    noise_term = rng.normal(0, noise, size=linear.shape)

    def variance(a):
        return ((a - a.mean(0)) ** 2).sum(1).mean()

    scale = 0.0
    if interaction_share > 0:
        scale = np.sqrt(
            interaction_share * (variance(linear) + variance(noise_term)) / ((1 - interaction_share) * variance(raw))
        )
    interaction = scale * raw
    acts = linear + interaction + noise_term
    return PlantedActivations(
        acts.astype(np.float32),
        np.arange(n_tokens) // doc_len,
        interaction.astype(np.float32),
        values,
        indices,
        features,
        pairs,
        directions,
    )
