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

**Conjunction latents** (:func:`conjunction_latents`). A latent ``c`` that stands for "a and b together", i.e.
an absorbed interaction: its encoder pre-activation ``y_c`` depends on the product ``g_a g_b`` of two other
latents' presences beyond any additive function of the two, and its decoder direction lies largely outside the
span of ``a``'s and ``b``'s. A latent's *presence* ``g`` is the input's projection on its unit decoder direction
(among the ``2k`` largest), not its code: when ``c`` absorbs "a and b", the SAE keeps ``a``'s and ``b``'s own
latents quiet where both are there (measured on planted data: they fire with their conjunction latent in 0-30%
of its tokens, and their encoders learn the exclusion too), so neither their codes nor their pre-activations
show that ``a`` and ``b`` are present. The response is the pre-activation, not the code: it is linear in the
input, so a product dependence means the input holds a direction that comes with ``a`` and ``b`` together,
whereas the code's top-k threshold makes it depend on pairs of presences with no such direction (measured on
planted activations with no interaction: the code's product R-squared beat the linear one by up to 0.34, and
161 of 252 latents passed a test of the code against an additive null). Each latent's product term is tested
against surrogates with its additive dependence, its co-firing and no product structure (:func:`_product_test`),
and must add a stated share of the pre-activation's variance: fixed thresholds on the code's R-squared flagged
24% of WikiText-2's latents, with no null to say what that count means.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import scipy.sparse
import scipy.stats
import torch
import torch.nn.functional as F

from ..data.activation_store import ActivationStore
from ..data.distributed import SINGLE, Dist
from ..data.extraction import derived_store
from ..dictionary.sae import TopKSAE
from ..dictionary.sae_training import SAETrainer, TrainConfig
from ..io import state_digest, write_json
from ..stats import benjamini_hochberg
from .baselines import PairLookup
from .code_data import code_data_from_arrays, split_fit_tune
from .decomposition import Decomposition
from .targets import random_pairs


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
    from ..params import defaults

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
    """The SAE's code of (up to ``max_tokens`` of) a split as :class:`CodeData` (targets unused, inputs the
    normalised activations); with ``presence_k``, each token's presence code (:meth:`TopKSAE.presence`) follows
    as latents ``n .. 2n - 1``."""
    values, indices, inputs = [], [], []
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
        inputs.append(x.numpy())
        seen += len(x)
        if seen >= max_tokens:
            break
    values, indices = np.concatenate(values), np.concatenate(indices)
    width = 2 * n if presence_k else n
    return code_data_from_arrays(
        values,
        indices,
        np.zeros((len(values), 1), np.float32),
        inputs=np.concatenate(inputs),
        groups=documents[: len(values)],
        n_latents=width,
    )


def conjunction_latents(
    store: ActivationStore,
    sae: TopKSAE,
    split: str = "val",
    candidates: int = 10,
    max_tokens: int = 100_000,
    fdr: float = 0.05,
    min_increment: float = 0.01,
    min_outside: float = 0.5,
    n_null: int = 200,
    seed: int = 0,
) -> pd.DataFrame:
    """For every latent ``c`` that fires: of the pairs among the ``candidates`` latents whose presence correlates
    most with its pre-activation ``y_c``, the one whose presence product ``g_a g_b`` best predicts ``y_c`` beyond
    ``g_a`` and ``g_b`` linearly; with the R-squared of the product alone, of the better single presence, of both
    together (linear), the product's gain over that, the R-squared the product adds beyond any additive function
    of the two presences (``increment``), its test of ``increment > min_increment`` against surrogates with no
    product structure (``z``, ``p_value``, BH ``q_value`` across the latents; :func:`_product_test`), and the
    share of ``c``'s unit decoder direction outside the span of ``a``'s and ``b``'s (see the module docstring).
    ``conjunction`` marks ``q_value < fdr`` and ``outside_span >= min_outside`` (a conjunction stands for a
    direction of its own). Most significant first.

    Choosing among thousands of latents and pairs on the same tokens that score the choice finds
    "conjunctions" in noise, so the split's documents (up to ``max_tokens`` tokens) are halved: candidates and
    each latent's pair are chosen on one half, and every reported number is measured on the other. The
    ``null_`` columns score one more surrogate per latent the same way: ``null_conjunction`` is what this
    procedure flags on data with nothing to find."""
    n, k = sae.cfg.n_latents, sae.cfg.k
    if not 2 <= candidates < n:
        raise ValueError(f"candidates must be in [2, {n}), got {candidates}")
    if not 0 < fdr < 1:
        raise ValueError(f"fdr must be in (0, 1), got {fdr}")
    data = _code_data(store, sae, split, presence_k=2 * k, max_tokens=max_tokens)
    choose, score = split_fit_tune(data, 0.5, seed)
    moments = _moments(choose, sae)
    corr = moments["corr_fg"].copy()
    np.fill_diagonal(corr, -np.inf)  # c's own presence is not a candidate
    top = np.argsort(-corr, axis=1)[:, :candidates]
    slot_a, slot_b = np.triu_indices(candidates, 1)
    pair_a, pair_b = top[:, slot_a], top[:, slot_b]  # [n, M]: each latent's candidate pairs
    gain = _pair_scores(choose, sae, moments, pair_a, pair_b)[2]
    best = np.argmax(gain, axis=1)
    a, b = pair_a[np.arange(n), best], pair_b[np.arange(n), best]
    held_out = _moments(score, sae)
    scores = _pair_scores(score, sae, held_out, a[:, None], b[:, None])
    product, additive, gain, r_ca, r_cb = (v[:, 0] for v in scores)
    unit = F.normalize(sae.W_dec.detach().double(), dim=1)
    basis = torch.stack([unit[a], unit[b]], 2)  # [n, d, 2]
    inside = (basis @ torch.linalg.lstsq(basis, unit.unsqueeze(2)).solution).squeeze(2).square().sum(1)
    firing = np.isfinite(gain) & (held_out["fires"] > 0)
    test = _product_test(score, sae, a, b, np.flatnonzero(firing), min_increment, n_null, seed)
    table = pd.DataFrame(
        {
            "latent": np.arange(n),
            "a": a,
            "b": b,
            "r2_product": product,
            "r2_single": np.maximum(r_ca**2, r_cb**2),
            "r2_additive": additive,
            "gain": gain,
            "increment": test["increment"],
            "z": test["z"],
            "null_z": test["null_z"],
            "outside_span": (1 - inside).clamp(min=0).numpy(),
        }
    )
    table = table[firing].copy()
    for prefix in ("", "null_"):
        table[f"{prefix}p_value"] = scipy.stats.norm.sf(table[f"{prefix}z"].fillna(-np.inf).to_numpy())
        table[f"{prefix}q_value"] = benjamini_hochberg(table[f"{prefix}p_value"].to_numpy())
        table[f"{prefix}conjunction"] = (table[f"{prefix}q_value"] < fdr) & (table["outside_span"] >= min_outside)
    return table.sort_values("z", ascending=False, na_position="last").reset_index(drop=True)


def _product_test(
    data, sae: TopKSAE, a, b, latents: np.ndarray, min_increment: float, n_draws: int, seed: int, knots: int = 4
) -> dict:
    """Does each latent's pre-activation ``y_c`` depend on the product of its pair's presences beyond any additive
    function of the two, ``y_c = h_a(g_a) + h_b(g_b) + r``? On ``data`` (the scoring half).

    ``h_a`` and ``h_b`` are piecewise linear (a jump where the latent is present, its value, and hinges at
    ``knots`` quantiles of its present values: :func:`_hinges`), fitted by least squares: every non-linearity of
    ``y_c`` in each presence on its own, which a bare product would otherwise pass for (a saturating ``h`` makes
    ``g_a g_b`` beat ``g_a + g_b`` with no interaction at all). The statistic is the product's covariance with
    ``y_c`` once both are orthogonal to that additive fit (Frisch-Waugh); ``increment`` is the R-squared it adds.
    The test is of ``increment > min_increment``: the statistic against its null shifted to where the product
    would add exactly ``min_increment``.

    Its null: surrogates ``h_a(g_a) + h_b(g_b)`` plus the fit's residuals resampled among tokens of the same
    co-firing pattern (neither, a alone, b alone, both), each pattern's mean residual removed (Freedman & Lane,
    as the interaction estimator's null control): a surrogate keeps the latent's additive dependence on each
    presence, its co-firing with them and how spread it is in each pattern, and has no product structure.
    ``z`` is the statistic against ``n_draws`` surrogates' mean and sd (a latent's p-value is its upper normal
    tail: thousands of latents under BH need p-values far below what a few hundred draws resolve); ``null_z``
    is one more surrogate's, scored the same way. Latents not in ``latents`` get NaN."""
    n, k, tokens = sae.cfg.n_latents, sae.cfg.k, len(data)
    everything = data.batch(np.arange(tokens))
    g = _split_sparse(everything, n, k)[1].tocsc()
    x = (everything.inputs - sae.b_dec.detach()).double().numpy()
    encoder, bias = sae.W_enc.detach().double().numpy(), sae.b_enc.detach().double().numpy()
    rng = np.random.default_rng(seed + 92_821)
    out = {key: np.full(n, np.nan) for key in ("increment", "z", "null_z")}
    for c in latents:
        y = x @ encoder[c] + bias[c]  # TopKSAE.pre_activation of this latent, in float64
        ga, gb = (g[:, j].toarray().ravel() for j in (a[c], b[c]))
        present = np.flatnonzero((ga > 0) | (gb > 0))  # the presences and their product are zero elsewhere
        if not len(present):
            continue
        design = np.hstack([np.ones((len(present), 1)), _hinges(ga[present], knots), _hinges(gb[present], knots)])
        # least squares over every token, where the hinges are zero off ``present``: the intercept is fitted by
        # the tokens with neither presence alone, so each fit is its own on ``present`` plus that constant
        gram = design.T @ design
        gram[0, 0] = tokens

        def fit(values, design=design, gram=gram, present=present):
            rhs = design.T @ values[present]
            rhs[0] = values.sum()
            return np.linalg.lstsq(gram, rhs, rcond=None)[0]

        product = ga * gb
        product_left = product[present] - design @ fit(product)  # zero where neither is present, up to rounding
        coef = fit(y)
        residual = y - coef[0]
        residual[present] = y[present] - design @ coef
        statistic = float(product_left @ residual[present])
        pattern = 2 * (ga[present] > 0) + (gb[present] > 0)
        draws = np.empty((n_draws + 1, len(present)))
        for value in (1, 2, 3):
            members = np.flatnonzero(pattern == value)
            if len(members):
                pool = residual[present[members]] - residual[present[members]].mean()
                draws[:, members] = pool[rng.integers(0, len(members), size=(n_draws + 1, len(members)))]
        null = draws @ product_left  # the surrogates' additive parts are orthogonal to product_left
        centre, spread = null[1:].mean(), null[1:].std(ddof=1)
        total = ((y - y.mean()) ** 2).sum()
        if not (total > 0 and spread > 0):
            continue
        scale = np.sqrt((product_left**2).sum() * total)  # statistic / scale is the product's partial correlation
        boundary = np.sqrt(min_increment) * scale
        out["increment"][c] = (statistic / scale) ** 2
        out["z"][c] = (statistic - boundary - centre) / spread
        out["null_z"][c] = (null[0] - boundary - centre) / spread
    return out


def _hinges(presence: np.ndarray, knots: int) -> np.ndarray:
    """A presence's additive basis: present (0/1), its value, and hinges ``(g - q)_+`` at ``knots`` quantiles of
    its present values; zero where absent. [tokens, knots + 2]"""
    on = presence > 0
    out = np.zeros((len(presence), knots + 2))
    if on.any():
        edges = np.quantile(presence[on], np.linspace(0, 1, knots + 2)[1:-1])
        out[on, 0], out[on, 1] = 1.0, presence[on]
        out[on, 2:] = np.maximum(presence[on, None] - edges, 0.0)
    return out


def _moments(data, sae: TopKSAE) -> dict:
    """Per latent: how often it fires, the means and SDs of its pre-activation ``y`` and its presence ``g``, and
    the correlations ``corr(y_c, g_j)`` [n, n]."""
    n, k = sae.cfg.n_latents, sae.cfg.k
    y_sum, y_sq, g_sum, g_sq, fires = (np.zeros(n) for _ in range(5))
    cross = np.zeros((n, n))
    for batch in data.batches(8192):
        f, g = _split_sparse(batch, n, k)
        y = sae.pre_activation(batch.inputs).double().numpy()
        cross += (g.T @ y).T
        y_sum += y.sum(0)
        y_sq += (y * y).sum(0)
        g_sum += np.asarray(g.sum(0)).ravel()
        g_sq += np.asarray(g.multiply(g).sum(0)).ravel()
        fires += np.bincount(f.indices, minlength=n)
    tokens = len(data)
    out = {"tokens": tokens, "fires": fires, "y_mean": y_sum / tokens, "g_mean": g_sum / tokens}
    out["y_sd"] = np.sqrt(np.maximum(y_sq / tokens - out["y_mean"] ** 2, 0))
    out["g_sd"] = np.sqrt(np.maximum(g_sq / tokens - out["g_mean"] ** 2, 0))
    with np.errstate(divide="ignore", invalid="ignore"):
        out["corr_fg"] = np.nan_to_num(
            (cross / tokens - np.outer(out["y_mean"], out["g_mean"])) / np.outer(out["y_sd"], out["g_sd"])
        )
    return out


def _pair_scores(data, sae: TopKSAE, moments: dict, pair_a: np.ndarray, pair_b: np.ndarray, batch_size: int = 8192):
    """For latent ``c`` and its pairs ``(pair_a[c, j], pair_b[c, j])``: R-squared of its pre-activation ``y_c`` on
    ``g_a g_b``, on ``g_a`` and ``g_b`` linearly, the product's gain, and ``corr(y_c, g_a)``, ``corr(y_c, g_b)``;
    [n, M] each."""
    n = sae.cfg.n_latents
    p_sum, p_sq, cross = _pair_sums(data, sae, pair_a, pair_b, batch_size)
    tokens, y_mean, y_sd, g_mean, g_sd = (moments[key] for key in ("tokens", "y_mean", "y_sd", "g_mean", "g_sd"))
    p_mean = p_sum / tokens
    p_sd = np.sqrt(np.maximum(p_sq / tokens - p_mean**2, 0))
    rows = np.arange(n)[:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        r_cp = (cross / tokens - y_mean[:, None] * p_mean) / (y_sd[:, None] * p_sd)
        r_ab = (p_mean - g_mean[pair_a] * g_mean[pair_b]) / (g_sd[pair_a] * g_sd[pair_b])
        r_ca, r_cb = moments["corr_fg"][rows, pair_a], moments["corr_fg"][rows, pair_b]
        additive = (r_ca**2 + r_cb**2 - 2 * r_ca * r_cb * r_ab) / (1 - r_ab**2)
    product = r_cp**2
    gain = np.where(np.isfinite(product) & np.isfinite(additive), product - additive, -np.inf)
    return product, additive, gain, r_ca, r_cb


def _pair_sums(data, sae: TopKSAE, pair_a: np.ndarray, pair_b: np.ndarray, batch_size: int = 8192):
    """Over ``data``'s tokens, for latent ``c`` and its pairs: the sums of ``g_a g_b``, of its square, and of
    ``y_c g_a g_b``; [n, M] each, float64. A product of two presences is non-zero only where both latents are
    present, so each pair slot is one sparse elementwise product (a dense [batch, n, M] tensor of products was
    most of the conjunction search's time)."""
    n, k = sae.cfg.n_latents, sae.cfg.k
    p_sum, p_sq, cross = (np.zeros(pair_a.shape) for _ in range(3))
    for batch in data.batches(batch_size):
        g = _split_sparse(batch, n, k)[1].tocsc()
        y = sae.pre_activation(batch.inputs).double().numpy()
        for j in range(pair_a.shape[1]):
            # column c: the product of c's j-th pair's presences
            product = g[:, pair_a[:, j]].multiply(g[:, pair_b[:, j]]).tocoo()
            p_sum[:, j] += np.bincount(product.col, product.data, n)
            p_sq[:, j] += np.bincount(product.col, product.data**2, n)
            cross[:, j] += np.bincount(product.col, product.data * y[product.row, product.col], n)
    return p_sum, p_sq, cross


def _split_sparse(batch, n: int, k: int):
    """A :func:`_code_data` batch as two sparse [batch, n] matrices: the code and the presences."""

    def matrix(values, indices):
        values, indices = values.double().numpy(), indices.numpy()
        token = np.broadcast_to(np.arange(len(values))[:, None], values.shape)
        keep = values != 0
        return scipy.sparse.csr_matrix((values[keep], (token[keep], indices[keep])), shape=(len(values), n))

    return matrix(batch.values[:, :k], batch.indices[:, :k]), matrix(batch.values[:, k:], batch.indices[:, k:] - n)
