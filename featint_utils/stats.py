"""Statistics with the stimulus item as the unit: a 2x2 within-item design, formality x emotion.

:func:`block_anova` is the within-item (repeated-measures) two-way ANOVA, one observation per item and cell,
for many response variables at once: each effect against its own interaction with the items. With every
item in all four cells the design is balanced, so the sums of squares are closed-form contrasts; a test
checks them against ``statsmodels``' ``AnovaRM`` on the same data, and :func:`block_anova_statsmodels` runs
that reference fit for any single response.

Cells are in :data:`featint_utils.data.corpus.CONDITIONS` order: formal_emotional, formal_neutral,
casual_emotional, casual_neutral.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from scipy import stats as sps

EFFECTS = ("formality", "emotion", "interaction")
RESOLUTION = 2.0**-16
"""An effect whose per-item contrast is within this fraction of a response's largest value in every item is
zero to the precision of the numbers: per-text activations are float32 (2^-24 relative), and the forward pass,
the encoder and the text mean add a few hundred roundings at most (measured: at most 1.1e-6 of the largest value
on a planted layer whose contrast is exactly zero). Tested against its own spread, such rounding can be
"significant" (p = 2e-11 there), so it gets p = 1."""
# +1/-1 contrasts over the four cells (FE, FN, CE, CN): formal - casual, emotional - neutral, and the
# difference of differences (FE - FN) - (CE - CN)
CONTRASTS = {
    "formality": np.array([1, 1, -1, -1]),
    "emotion": np.array([1, -1, 1, -1]),
    "interaction": np.array([1, -1, -1, 1]),
}


def item_contrast_test(per_item: np.ndarray, largest: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Two-sided one-sample t-test that per-item contrasts [n_items, n] have mean 0: their mean, t and p per
    column (n_items - 1 degrees of freedom). A column within :data:`RESOLUTION` of ``largest`` (the response's
    largest value) in every item is zero to the numbers' precision: t = 0, p = 1. One with the same non-zero
    value in every item has t = +-inf, p = 0."""
    per_item = np.asarray(per_item, dtype=np.float64)
    n_items = len(per_item)
    mean, sd = per_item.mean(0), per_item.std(0, ddof=1)
    zero = np.abs(per_item).max(0) <= RESOLUTION * largest
    with np.errstate(divide="ignore", invalid="ignore"):
        t = np.where(zero, 0.0, mean / (sd / np.sqrt(n_items)))
    return mean, t, np.where(zero, 1.0, 2 * sps.t.sf(np.abs(t), n_items - 1))


def block_anova(cells: np.ndarray) -> pd.DataFrame:
    """The within-item (repeated-measures) two-way ANOVA for every column of ``cells`` [n_items, 4,
    n_responses]: each effect is tested against its own interaction with the items, the variation of the
    item's contrast for that effect (``statsmodels``' ``AnovaRM``; F = t^2 of a one-sample t-test of the
    per-item contrasts, 1 and n_items - 1 degrees of freedom).

    Items differ in how much each factor moves them (each item's variants use their own words), so a pooled
    error term, which assumes they do not, puts that spread into every effect's denominator: on MiniLM's
    minimal pairs it found no interaction along any of the 4,096 encoder directions where the per-effect error
    finds 1,526 (q < 0.05). Returns one row per response with, per effect: ``F``, ``p``, partial eta-squared
    ``SS_effect / (SS_effect + SS_effect x item)``, and the signed effect (``formality``: mean formal - mean
    casual; ``emotion``: emotional - neutral; ``interaction``: (FE - FN) - (CE - CN), averaged over items).
    Responses that do not vary, and effects that are zero to the numbers' precision (:data:`RESOLUTION`), get
    p = 1 and eta-squared 0; an effect that is the same non-zero amount in every item gets F = inf and p = 0."""
    cells = np.asarray(cells, dtype=np.float64)
    if cells.ndim == 2:
        cells = cells[:, :, None]
    if cells.ndim != 3 or cells.shape[1] != 4:
        raise ValueError(f"cells must be [n_items, 4, n_responses], got {cells.shape}")
    n_items = cells.shape[0]
    if n_items < 2:
        raise ValueError("the within-item ANOVA needs at least two items")
    grand = cells.mean(axis=(0, 1))
    ss_total = ((cells - grand) ** 2).sum(axis=(0, 1))
    constant = ss_total <= 1e-12 * np.maximum(1.0, np.abs(grand) ** 2 * 4 * n_items)
    largest = np.abs(cells).max(axis=(0, 1))
    out = {}
    for effect, contrast in CONTRASTS.items():
        per_item = np.einsum("c,icf->if", contrast, cells)  # each item's +-sum of its four cells
        estimate, t, p = item_contrast_test(per_item, largest)  # F = t^2 against the effect x item interaction
        F = np.where(constant, 0.0, t**2)
        with np.errstate(invalid="ignore"):
            eta = np.where(np.isinf(F), 1.0, F / (F + n_items - 1))  # SS_effect / (SS_effect + SS_effect x item)
        out[f"{effect}_effect"] = estimate / (2 if effect != "interaction" else 1)
        out[f"{effect}_F"] = F
        out[f"{effect}_p"] = np.where(constant, 1.0, p)
        out[f"{effect}_eta2"] = eta
    return pd.DataFrame(out)


def block_anova_statsmodels(cells_one: np.ndarray) -> pd.DataFrame:
    """The reference fit for one response [n_items, 4]: ``statsmodels``' repeated-measures ANOVA (``AnovaRM``)
    with item as the subject and formality and emotion within items."""
    from statsmodels.stats.anova import AnovaRM

    cells_one = np.asarray(cells_one, dtype=np.float64)
    n_items = len(cells_one)
    frame = pd.DataFrame(
        {
            "y": cells_one.ravel(),
            "item": np.repeat(np.arange(n_items), 4),
            "formality": np.tile(["formal", "formal", "casual", "casual"], n_items),
            "emotion": np.tile(["emotional", "neutral", "emotional", "neutral"], n_items),
        }
    )
    return AnovaRM(frame, "y", "item", within=["formality", "emotion"]).fit().anova_table


def _multipletests_ignoring_nan(p: np.ndarray, method: str) -> np.ndarray:
    """``statsmodels``' adjusted p-values over the non-NaN entries of ``p``, same shape; NaN stays NaN.

    NaN is dropped first: passed through, it makes every BH value NaN and counts as a test in Holm's ``n``."""
    from statsmodels.stats.multitest import multipletests

    p = np.asarray(p, dtype=np.float64)
    adjusted = np.full_like(p, np.nan)
    tested = ~np.isnan(p)
    if tested.any():
        adjusted[tested] = multipletests(p[tested], method=method)[1]
    return adjusted


def benjamini_hochberg(p: np.ndarray) -> np.ndarray:
    """Benjamini-Hochberg adjusted p-values (q-values), same order as ``p``; NaN stays NaN."""
    return _multipletests_ignoring_nan(p, "fdr_bh")


def holm(p: np.ndarray) -> np.ndarray:
    """Holm-Bonferroni adjusted p-values, same order as ``p``; NaN stays NaN."""
    return _multipletests_ignoring_nan(p, "holm")


def bootstrap_mean_ci(contrasts: np.ndarray, rng: np.random.Generator, n_boot: int) -> np.ndarray:
    """[2, k] percentile 95% interval of the mean of each column of per-unit contrasts [n_units, k]."""
    contrasts = np.asarray(contrasts, dtype=np.float64).reshape(len(contrasts), -1)
    boot = rng.integers(0, len(contrasts), size=(n_boot, len(contrasts)))
    return np.percentile(contrasts[boot].mean(1), [2.5, 97.5], axis=0)


def sign_flip_test(contrasts: np.ndarray, n_permutations: int = 10_000, seed: int = 0) -> np.ndarray:
    """Two-sided sign-flip permutation p-value of the mean of per-item contrasts [n_items, n_tests] being 0.

    Under the null each item's contrast is symmetric about zero, so flipping signs at random gives the
    null distribution of the mean. p = (1 + #{|flipped mean| >= |observed|}) / (1 + n_permutations)."""
    contrasts = np.asarray(contrasts, dtype=np.float64)
    if contrasts.ndim == 1:
        contrasts = contrasts[:, None]
    rng = np.random.default_rng(seed)
    observed = np.abs(contrasts.mean(0))
    exceed = np.zeros(contrasts.shape[1])
    for start in range(0, n_permutations, 1000):
        signs = rng.choice([-1.0, 1.0], size=(min(1000, n_permutations - start), len(contrasts)))
        flipped = np.abs(signs @ contrasts / len(contrasts))
        exceed += (flipped >= observed - 1e-12).sum(0)
    return (1 + exceed) / (1 + n_permutations)
