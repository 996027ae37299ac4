"""Where an SAE hides interactions: how much of a pairwise interaction in the activations the dictionary
absorbs into its own latents, and which latents look like conjunctions of two others.

**Absorbed fraction.** Add an interaction ``I`` to the activations, train an SAE on them, and compare its
residual with that of an SAE trained the same way on the activations without ``I``:

    absorbed = 1 - sum_t <e_with(t) - e_without(t), I(t)> / sum_t ||I(t)||^2     (held-out tokens)

If the SAE ignored ``I``, all of it would appear in its residual (absorbed 0); if it reconstructs ``I`` as
well as everything else, none does (absorbed 1). Whatever is absorbed is invisible to any model of the
residual, so a residual-only interaction share says nothing about absorbed interactions.
:func:`sensitivity_run` does this on a run's own activations, with an interaction built from the primary
SAE's own frequently co-firing latents.

**Conjunction latents** (:func:`conjunction_latents`). A latent ``c`` whose activation is predicted far better
by the product ``g_a g_b`` of two other latents' presences than by ``g_a`` and ``g_b`` linearly (R-squared
over tokens, zeros included), and whose decoder direction lies largely outside the span of ``a``'s and
``b``'s: a latent that stands for "a and b together", i.e. an absorbed interaction. A latent's *presence*
``g`` is the input's projection on its unit decoder direction (among the ``2k`` largest), not its code: when
``c`` absorbs "a and b", the SAE keeps ``a``'s and ``b``'s own latents quiet where both are there (measured on
planted data: they fire with their conjunction latent in 0-30% of its tokens, and their encoders learn the
exclusion too), so neither their codes nor their pre-activations show that ``a`` and ``b`` are present.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import torch
import torch.nn.functional as F

from .activations import ActivationStore, derived_store
from .baselines import PairLookup
from .decomposition import Decomposition
from .distributed import SINGLE, Dist
from .interaction import random_pairs
from .io import state_digest, write_json
from .residuals import code_data_from_arrays, split_fit_tune
from .sae import TopKSAE
from .sae_training import SAETrainer, TrainConfig


def absorbed_fraction(residual_without: np.ndarray, residual_with: np.ndarray, interaction: np.ndarray) -> float:
    """``1 - sum <e_with - e_without, I> / sum ||I||^2`` (see the module docstring); float64."""
    change = np.asarray(residual_with, np.float64) - np.asarray(residual_without, np.float64)
    interaction = np.asarray(interaction, np.float64)
    size = float((interaction**2).sum())
    if not size > 0:
        raise ValueError("the interaction is zero on these tokens: nothing to absorb")
    return 1.0 - float((change * interaction).sum()) / size


@torch.no_grad()
def raw_residual(sae: TopKSAE, acts: np.ndarray, batch_size: int = 8192) -> np.ndarray:
    """``x - SAE(x)`` in the activations' own (raw) units, float32."""
    out = np.empty_like(np.asarray(acts, np.float32))
    for start in range(0, len(acts), batch_size):
        x = torch.from_numpy(np.asarray(acts[start : start + batch_size], np.float32))
        out[start : start + len(x)] = sae.residual_raw(x).numpy()
    return out


class PairInteraction:
    """``I(x) = scale * sum over pairs of f_a(x) f_b(x) u_ab`` in raw units, ``f`` the code of a fixed SAE."""

    def __init__(self, sae: TopKSAE, pairs: np.ndarray, directions: torch.Tensor, scale: float = 1.0):
        self.code, self.pairs, self.directions, self.scale = Decomposition(sae.eval()), pairs, directions, scale
        self.lookup = PairLookup(pairs, sae.cfg.n_latents)

    @torch.no_grad()
    def __call__(self, x_raw: torch.Tensor) -> torch.Tensor:
        values, indices = self.code.primary_code(x_raw)
        column, product = self.lookup.active(values, indices)
        return self.scale * F.embedding_bag(column, self.directions, per_sample_weights=product, mode="sum")


def _variance(store: ActivationStore, split: str, fn=None) -> float:
    """Total variance per token of a split's raw activations (or of ``fn`` of them), float64."""
    total, square, n = 0.0, 0.0, 0
    for x in store.batches(split, 8192, shuffle=False, normalize=False):
        y = (fn(x) if fn else x).double()
        total = total + y.sum(0)
        square += float(y.square().sum())
        n += len(y)
    return (square - float(total @ total) / n) / n


def sensitivity_run(
    store: ActivationStore,
    sae: TopKSAE,
    out_dir: str | Path,
    share: float = 0.02,
    n_pairs: int = 16,
    candidates: int = 256,
    train_tokens: int = 0,
    seed: int = 0,
    resume: bool = True,
    dist: Dist = SINGLE,
) -> dict:
    """Inject an interaction into a run's activations before SAE training and measure what the SAE absorbs.

    The interaction uses ``n_pairs`` random pairs among the ``candidates`` most frequently co-firing pairs of
    ``sae``'s code on the training split, random unit directions, and is worth ``share`` of the activations'
    variance. An SAE with ``sae``'s settings (``train_tokens`` overrides its budget; 0 keeps it) is trained on
    the injected store, and, for a fair reference, one on the original store unless the budget is ``sae``'s
    own (then ``sae`` is the reference), on the device of ``dist``. Returns the absorbed fraction on the held-out
    split and the details."""
    out_dir = Path(out_dir)
    published = "train" not in sae.cfg.extra  # installed from SAELens: how it was trained is not known
    train_cfg = _default_training() if published else TrainConfig(**sae.cfg.extra["train"])
    budget = train_tokens or train_cfg.train_tokens
    pairs, directions = random_pairs(_code_data(store, sae, "train"), n_pairs, candidates, store.d_model, seed + 31_337)
    unit = PairInteraction(sae, pairs, directions)
    scale = float(np.sqrt(share / (1 - share) * _variance(store, "train") / _variance(store, "train", unit)))
    interaction = PairInteraction(sae, pairs, directions, scale)
    request = {
        "injected": {"share": share, "pairs": pairs.tolist(), "scale": scale, "seed": seed, "sae": state_digest(sae)}
    }
    injected = derived_store(store, lambda x: x + interaction(x), out_dir / "activations", request)
    settings = asdict(train_cfg) | {"train_tokens": budget}
    trained = SAETrainer(
        injected, sae.cfg.n_latents, sae.cfg.k, TrainConfig(**settings), out_dir / "sae_injected", dist
    )
    sae_with = trained.train(resume=resume)
    if budget == train_cfg.train_tokens and not published:
        sae_without = sae
    else:
        reference = SAETrainer(
            store, sae.cfg.n_latents, sae.cfg.k, TrainConfig(**settings), out_dir / "sae_reference", dist
        )
        sae_without = reference.train(resume=resume)
    clean = store.load("val")
    term = interaction(torch.from_numpy(clean)).numpy()
    absorbed = absorbed_fraction(raw_residual(sae_without, clean), raw_residual(sae_with, injected.load("val")), term)
    result = {
        "absorbed_fraction": absorbed,
        "injected_share": share,
        "n_pairs": n_pairs,
        "train_tokens": budget,
        "reference": "primary SAE"
        if sae_without is sae
        else "retrained on the original activations"
        + (" (the primary SAE is published: both trained with stage 01's default settings)" if published else ""),
        "interaction_variance_share_val": float(_share_of(clean + term, term)),
    }
    write_json(out_dir / "absorption.json", result | {"pairs": pairs.tolist()})
    np.save(out_dir / "directions.npy", directions.numpy())
    return result


def injected_conjunctions(out_dir: str | Path, candidates: int = 10, min_cosine: float = 0.5) -> dict:
    """The conjunction search's positive control, on a :func:`sensitivity_run`'s SAE: of the injected interaction
    directions, how many have a latent of that SAE along them (``|cos| >= min_cosine``: a conjunction latent's
    decoder also carries the directions it absorbed, so it does not meet its interaction direction at 1), and
    how many of those latents :func:`conjunction_latents` flags as conjunctions."""
    out_dir = Path(out_dir)
    store, sae = ActivationStore(out_dir / "activations"), TopKSAE.load(out_dir / "sae_injected" / "sae")
    directions = torch.from_numpy(np.load(out_dir / "directions.npy")).double()
    table = conjunction_latents(store, sae, "val", candidates=candidates)
    cosine = (F.normalize(directions, dim=1) @ F.normalize(sae.W_dec.detach().double(), dim=1).T).abs()  # [P, n]
    flagged = torch.zeros(sae.cfg.n_latents, dtype=torch.bool)
    flagged[torch.tensor(table.loc[table["conjunction"], "latent"].to_numpy(), dtype=torch.long)] = True
    return {
        "injected_directions": len(directions),
        "with_a_latent": int((cosine.max(1).values >= min_cosine).sum()),
        "as_conjunction_latent": int(((cosine >= min_cosine) & flagged).any(1).sum()),
    }


def _default_training() -> TrainConfig:
    """Stage 01's default training settings, for an SAE that carries no record of its own training."""
    from .params import defaults

    p = defaults("01_primary_sae")
    return TrainConfig(
        train_tokens=p["sae_train_tokens"],
        batch_size=p["sae_batch_size"],
        lr=p["sae_lr"],
        dead_tokens=p["sae_dead_tokens"],
    )


def _share_of(total: np.ndarray, part: np.ndarray) -> float:
    def variance(a):
        return float(((a - a.mean(0)) ** 2).sum())

    return variance(part) / variance(total)


@torch.no_grad()
def _code_data(store: ActivationStore, sae: TopKSAE, split: str, presence_k: int = 0, max_tokens: int = 100_000):
    """The SAE's code of (up to ``max_tokens`` of) a split as :class:`CodeData` (targets unused); with
    ``presence_k``, each token's presence code (:meth:`TopKSAE.presence`) follows as latents ``n .. 2n - 1``."""
    values, indices = [], []
    n, seen = sae.cfg.n_latents, 0
    documents = store.token_groups(split)
    for x in store.batches(split, 8192, shuffle=False, normalize=False):
        x = x * sae.cfg.input_scale
        code = sae.encode(x)
        parts = [(code.values, code.indices)]
        if presence_k:
            present = sae.presence(x, presence_k)
            parts.append((present.values, present.indices + n))
        values.append(torch.cat([p[0] for p in parts], 1).numpy())
        indices.append(torch.cat([p[1] for p in parts], 1).numpy())
        seen += len(x)
        if seen >= max_tokens:
            break
    values, indices = np.concatenate(values), np.concatenate(indices)
    width = 2 * n if presence_k else n
    return code_data_from_arrays(
        values, indices, np.zeros((len(values), 1), np.float32), groups=documents[: len(values)], n_latents=width
    )


def conjunction_latents(
    store: ActivationStore,
    sae: TopKSAE,
    split: str = "val",
    candidates: int = 10,
    max_tokens: int = 100_000,
    min_r2: float = 0.3,
    min_gain: float = 0.2,
    min_outside: float = 0.5,
    seed: int = 0,
) -> pd.DataFrame:
    """For every latent ``c`` that fires: of the pairs among the ``candidates`` latents whose presence correlates
    most with ``f_c``, the one whose presence product ``g_a g_b`` best predicts ``f_c`` beyond ``g_a`` and ``g_b``
    linearly; with the R-squared of the product alone, of the better single presence, of both together
    (linear), the product's gain over that, and the share of ``c``'s unit decoder direction outside the span of
    ``a``'s and ``b``'s (see the module docstring). ``conjunction`` marks ``r2_product >= min_r2``,
    ``gain >= min_gain`` and ``outside_span >= min_outside``. Best gain first.

    Choosing among thousands of latents and pairs on the same tokens that score the choice finds
    "conjunctions" in noise, so the split's documents (up to ``max_tokens`` tokens) are halved: candidates and
    each latent's pair are chosen on one half, and every reported number is measured on the other."""
    n, k = sae.cfg.n_latents, sae.cfg.k
    if not 2 <= candidates < n:
        raise ValueError(f"candidates must be in [2, {n}), got {candidates}")
    data = _code_data(store, sae, split, presence_k=2 * k, max_tokens=max_tokens)
    choose, score = split_fit_tune(data, 0.5, seed)
    moments = _moments(choose, n, k)
    corr = moments["corr_fg"].copy()
    np.fill_diagonal(corr, -np.inf)  # c's own presence is not a candidate
    top = np.argsort(-corr, axis=1)[:, :candidates]
    slot_a, slot_b = np.triu_indices(candidates, 1)
    pair_a, pair_b = top[:, slot_a], top[:, slot_b]  # [n, M]: each latent's candidate pairs
    gain = _pair_scores(choose, moments, pair_a, pair_b)[2]
    best = np.argmax(gain, axis=1)
    a, b = pair_a[np.arange(n), best], pair_b[np.arange(n), best]
    held_out = _moments(score, n, k)
    product, additive, gain, r_ca, r_cb = (v[:, 0] for v in _pair_scores(score, held_out, a[:, None], b[:, None]))
    unit = F.normalize(sae.W_dec.detach().double(), dim=1)
    basis = torch.stack([unit[a], unit[b]], 2)  # [n, d, 2]
    inside = (basis @ torch.linalg.lstsq(basis, unit.unsqueeze(2)).solution).squeeze(2).square().sum(1)
    table = pd.DataFrame(
        {
            "latent": np.arange(n),
            "a": a,
            "b": b,
            "r2_product": product,
            "r2_single": np.maximum(r_ca**2, r_cb**2),
            "r2_additive": additive,
            "gain": gain,
            "outside_span": (1 - inside).clamp(min=0).numpy(),
        }
    )
    table = table[np.isfinite(table["gain"]) & (held_out["f_sd"] > 0)]
    table["conjunction"] = (
        (table["r2_product"] >= min_r2) & (table["gain"] >= min_gain) & (table["outside_span"] >= min_outside)
    )
    return table.sort_values("gain", ascending=False).reset_index(drop=True)


def _moments(data, n: int, k: int) -> dict:
    """Means and SDs of codes ``f`` and presences ``g``, and their correlations ``corr(f_c, g_j)`` [n, n]."""
    f_sum, f_sq, g_sum, g_sq = (np.zeros(n) for _ in range(4))
    cross = np.zeros((n, n))
    for batch in data.batches(8192):
        f, g = _split_sparse(batch, n, k)
        product = (f.T @ g).tocoo()
        cross[product.row, product.col] += product.data
        f_sum += np.asarray(f.sum(0)).ravel()
        f_sq += np.asarray(f.multiply(f).sum(0)).ravel()
        g_sum += np.asarray(g.sum(0)).ravel()
        g_sq += np.asarray(g.multiply(g).sum(0)).ravel()
    tokens = len(data)
    out = {"tokens": tokens, "f_mean": f_sum / tokens, "g_mean": g_sum / tokens}
    out["f_sd"] = np.sqrt(np.maximum(f_sq / tokens - out["f_mean"] ** 2, 0))
    out["g_sd"] = np.sqrt(np.maximum(g_sq / tokens - out["g_mean"] ** 2, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["corr_fg"] = np.nan_to_num(
            (cross / tokens - np.outer(out["f_mean"], out["g_mean"])) / np.outer(out["f_sd"], out["g_sd"])
        )
    return out


def _pair_scores(data, moments: dict, pair_a: np.ndarray, pair_b: np.ndarray, batch_size: int = 1024):
    """For latent ``c`` and its pairs ``(pair_a[c, j], pair_b[c, j])``: R-squared of ``f_c`` on ``g_a g_b``, on
    ``g_a`` and ``g_b`` linearly, the product's gain, and ``corr(f_c, g_a)``, ``corr(f_c, g_b)``; [n, M] each."""
    n = len(pair_a)
    k = data.values.shape[1] // 3  # the code's k, then 2k presences
    p_sum, p_sq, cross = (np.zeros(pair_a.shape) for _ in range(3))
    chunk = max(1, 2**22 // (batch_size * pair_a.shape[1]))
    for batch in data.batches(batch_size):
        f, g = (torch.from_numpy(m.toarray()) for m in _split_sparse(batch, n, k))
        for start in range(0, n, chunk):
            latents = slice(start, start + chunk)
            products = g[:, pair_a[latents]] * g[:, pair_b[latents]]  # [B, C, M]
            p_sum[latents] += products.sum(0).double().numpy()
            p_sq[latents] += products.square().sum(0).double().numpy()
            cross[latents] += torch.einsum("bc,bcm->cm", f[:, latents], products).double().numpy()
    tokens, f_mean, f_sd, g_mean, g_sd = (moments[key] for key in ("tokens", "f_mean", "f_sd", "g_mean", "g_sd"))
    p_mean = p_sum / tokens
    p_sd = np.sqrt(np.maximum(p_sq / tokens - p_mean**2, 0))
    rows = np.arange(n)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r_cp = (cross / tokens - f_mean[:, None] * p_mean) / (f_sd[:, None] * p_sd)
        r_ab = (p_mean - g_mean[pair_a] * g_mean[pair_b]) / (g_sd[pair_a] * g_sd[pair_b])
        r_ca, r_cb = moments["corr_fg"][rows, pair_a], moments["corr_fg"][rows, pair_b]
        additive = (r_ca**2 + r_cb**2 - 2 * r_ca * r_cb * r_ab) / (1 - r_ab**2)
    product = r_cp**2
    gain = np.where(np.isfinite(product) & np.isfinite(additive), product - additive, -np.inf)
    return product, additive, gain, r_ca, r_cb


def _split_sparse(batch, n: int, k: int):
    """A :func:`_code_data` batch as two sparse [batch, n] matrices: the code and the presences."""

    def matrix(values, indices):
        values, indices = values.double().numpy(), indices.numpy()
        token = np.broadcast_to(np.arange(len(values))[:, None], values.shape)
        keep = values != 0
        return scipy.sparse.csr_matrix((values[keep], (token[keep], indices[keep])), shape=(len(values), n))

    return matrix(batch.values[:, :k], batch.indices[:, :k]), matrix(batch.values[:, k:], batch.indices[:, k:] - n)
