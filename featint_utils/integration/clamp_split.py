"""06 on token-aligned minimal pairs: the part of each clamp's non-additive effect that the layer made.

Every clamp condition (:mod:`featint_utils.integration.clamping`) is read twice more, with each item's
formal-emotional text at the layer's own activations and at their additive counterfactual ``x_FE* = x_FN +
(x_CE - x_CN)`` (:mod:`featint_utils.integration.counterfactual`; every token, from the float64 model), spliced
in before the decomposition reads them. The difference is the part the layer made: with no clamp, the
readout's interaction that exists because the layer is non-additive (the layer's own non-additive effect on
the output); for a clamp, the part of its change's interaction contrast that does. Where the layer is additive
both are exactly zero on every item, whatever the clamp, so no condition can be flagged without integration
(on planted models whose variants share their context: none in any null model, and the layer's own part equal
to the planted effect on the readout; ``benchmarks/planted_integration.py``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import torch

from ..data.corpus import CONDITIONS
from ..data.interventions import PrefixCache
from ..data.models import LoadedModel
from ..residual.decomposition import Clamp, Decomposition
from ..stats import CONTRASTS, RESOLUTION, bootstrap_mean_ci, holm, sign_flip_test
from .clamping import pooled_embeddings, run_clamps, text_readout, versus_controls
from .counterfactual import MinimalPairs, formal_emotional_layers


def layer_made_readout(
    loaded: LoadedModel,
    layer: int,
    texts: list[str],
    real: list[torch.Tensor],
    additive: list[torch.Tensor],
    centroids: torch.Tensor,
    decomposition: Decomposition | None = None,
    clamp: Clamp | None = None,
    control: str | None = None,
    seed: int = 0,
    prefixes: tuple[PrefixCache, PrefixCache] | None = None,
) -> np.ndarray:
    """[n_items, 4]: how much each item's encoder readout (:func:`encoder_readout`, the mean over its four
    texts) changes when its formal-emotional text's layer activations are the layer's own (``real``) instead of
    their additive counterfactual (``additive``), the decomposition spliced and clamped as given. ``texts`` are the
    formal-emotional texts, ``real`` and ``additive`` their activations
    (:func:`featint_utils.integration.counterfactual.formal_emotional_layers`), ``centroids`` [n_items, 4, d]
    theirs. Zero on every item wherever the layer is additive, whatever the clamp; ``prefixes`` (one cache per
    arm) compute the layers below the splice once across calls."""
    prefixes = prefixes or (None, None)
    cosines = [
        text_readout(
            pooled_embeddings(
                loaded, layer, texts, decomposition, clamp, control, seed=seed, prefix=prefix, substitutes=layers
            ),
            centroids,
        )
        for layers, prefix in zip((real, additive), prefixes)
    ]
    return (cosines[0] - cosines[1]) / len(CONDITIONS)  # the item readout averages its four texts


def layer_made_clamps(
    loaded: LoadedModel,
    layer: int,
    stimuli: pd.DataFrame,
    pairs: MinimalPairs,
    centroids: torch.Tensor,
    decomposition: Decomposition,
    plan: pd.DataFrame,
    references: dict[str, str] | None = None,
    seed: int = 0,
    n_permutations: int = 10_000,
    n_boot: int = 2000,
) -> tuple[pd.DataFrame, np.ndarray, dict[str, np.ndarray]]:
    """06 on token-aligned minimal pairs: every condition of ``plan`` read with each item's formal-emotional
    text at the layer's own activations and at their additive counterfactual (:func:`layer_made_readout`),
    and :func:`layer_made_statistics` of the difference. ``centroids`` are 06's, one row per stimulus text.
    Returns the table, the unclamped layer-made readout [n_items, 4] and each condition's change of it."""
    texts = stimuli["text"].to_numpy()
    rows = formal_emotional_rows(stimuli, pairs.items)
    real, additive = formal_emotional_layers(loaded, layer, pairs)
    centroids = centroids[rows]
    prefixes = (PrefixCache(), PrefixCache())

    def readout(clamp, control):
        return layer_made_readout(
            loaded, layer, list(texts[rows]), real, additive, centroids, decomposition, clamp, control, seed, prefixes
        )

    own, changes = run_clamps(readout, plan)
    clean = pooled_embeddings(loaded, layer, list(texts[rows]), prefix=prefixes[0])  # the model's own readout
    largest = float(np.abs(text_readout(clean, centroids)).max())
    table = layer_made_statistics(own, changes, largest, references, n_permutations, n_boot, seed)
    return table, own, changes


def formal_emotional_rows(stimuli: pd.DataFrame, items: np.ndarray) -> np.ndarray:
    """Positions in ``stimuli`` of each item's formal-emotional text, in the order of ``items``."""
    fe = (stimuli["condition"] == "formal_emotional").to_numpy()
    position = dict(zip(stimuli["item_id"].to_numpy()[fe], np.flatnonzero(fe)))
    return np.array([position[item] for item in items])


def _within(contrasts: np.ndarray, floor: float) -> np.ndarray:
    """Per column of per-unit contrasts [n_units, k]: within ``floor`` of zero in every unit (float32 rounding,
    not an effect: the same rounding in every unit would be "significant" to a sign-flip test)."""
    return np.abs(contrasts).max(0) <= floor


def layer_made_statistics(
    own: np.ndarray,
    changes: dict[str, np.ndarray],
    largest: float,
    references: dict[str, str] | None = None,
    n_permutations: int = 10_000,
    n_boot: int = 2000,
    seed: int = 0,
) -> pd.DataFrame:
    """The part of each clamp's non-additive effect that the layer made, from :func:`layer_made_readout`'s
    unclamped ``own`` [n_units, 4] and each condition's change of it (``changes``, as :func:`run_clamps` gives).

    The first row, ``"no clamp"``, is the layer's own non-additive effect on the readout: the interaction
    contrast of ``own``. Every other row is a condition's: the interaction contrast of its change made by the
    layer (the clamp's contrast on the real activations minus that on the additive counterfactual), its mean
    with a bootstrap 95% CI, its sign-flip p (Holm-adjusted over the conditions; 1 where every unit's value is
    within :data:`featint_utils.stats.RESOLUTION` of ``largest``, the readout's largest value: float32 rounding),
    and its ratio to the layer's own contrast. ``references`` map a condition to its control: the difference of
    their parts is sign-flip tested per unit (``vs_control_p``, Holm-adjusted; 1 where both parts are rounding).
    Where the layer is additive every part is exactly zero, so no condition and no control can be flagged."""
    floor = RESOLUTION * largest
    rng = np.random.default_rng(seed)
    names = ["no clamp", *changes]
    contrasts = np.stack([own @ CONTRASTS["interaction"]] + [changes[n] @ CONTRASTS["interaction"] for n in changes], 1)
    zero = dict(zip(names, _within(contrasts, floor)))
    p = np.where(list(zero.values()), 1.0, sign_flip_test(contrasts, n_permutations, seed))
    own_mean = contrasts[:, 0].mean()
    table = pd.DataFrame(
        {
            "condition": names,
            "interaction_contrast": contrasts.mean(0),
            **dict(zip(("ci_low", "ci_high"), bootstrap_mean_ci(contrasts, rng, n_boot))),
            "sign_flip_p": p,
            "holm_p": np.concatenate([p[:1], holm(p[1:])]),
            "share_of_own": contrasts.mean(0) / own_mean if own_mean != 0 else np.nan,
        }
    )
    return versus_controls(table, changes, references, n_permutations, seed, rounding=zero) if references else table


def _layer_made_groups(table: pd.DataFrame, plan: pd.DataFrame) -> pd.DataFrame:
    """:func:`layer_made_statistics`'s condition rows with their plan group and kind (secondary, random, linear)."""
    merged = table.merge(plan[["name", "group", "level"]], left_on="condition", right_on="name")
    kind = np.select(
        [merged["group"].str.startswith("secondary"), merged["group"].str.startswith("random")],
        ["secondary", "random"],
        "linear",
    )
    return merged.assign(kind=kind)


def layer_made_summary(table: pd.DataFrame, plan: pd.DataFrame, alpha: float = 0.05) -> str:
    """A plain-language account of :func:`layer_made_statistics`: the layer's own non-additive effect on the
    readout and, per clamped group, the part of its effect the layer made."""
    own = table.iloc[0]
    lines = [
        f"- The layer's own non-additive effect on the readout (real minus additive counterfactual, no clamp): "
        f"{own['interaction_contrast']:+.3g} (95% CI {own['ci_low']:+.3g} to {own['ci_high']:+.3g}, "
        f"sign-flip p {own['sign_flip_p']:.3g})."
    ]
    for group, rows in _layer_made_groups(table, plan).groupby("group", sort=False):
        made = int((rows["holm_p"] < alpha).sum())
        largest = rows.loc[rows["interaction_contrast"].abs().idxmax()]
        line = (
            f"- {group}: a layer-made part in {made} of {len(rows)} conditions (Holm p < {alpha}); largest "
            f"{largest['interaction_contrast']:+.3g} ({largest['condition'].rsplit(' @ ', 1)[-1]}; "
            f"{largest['share_of_own']:+.3f} of the layer's own)"
        )
        ablated = rows[rows["condition"].str.endswith("@ ablated")]
        if len(ablated):
            line += f"; ablated, {ablated['share_of_own'].iloc[0]:+.3f} of the layer's own"
        if rows["vs_control_holm_p"].notna().any():
            line += f"; larger than its random control's at {int((rows['vs_control_holm_p'] < alpha).sum())}"
        lines.append(line + ".")
    return "\n".join(lines)


def layer_made_metrics(table: pd.DataFrame | None, plan: pd.DataFrame, alpha: float = 0.05) -> dict:
    """06's headline numbers of the layer-made split, under fixed keys (``layer_made.*``), all None where it
    was not measured, so that a number measured on other stimuli never stays in ``metrics.json``: the layer's
    own contrast (interval, p) and, per kind of condition, how many have a layer-made part (Holm)."""
    kinds = ("secondary", "random", "linear")
    keys = ["own_contrast", "own_ci", "own_p", "secondary_beats_random", "secondary_conditions"]
    keys += [f"{kind}_flagged" for kind in kinds]
    if table is None:
        return {f"layer_made.{key}": None for key in keys}
    own = table.iloc[0]
    rows = _layer_made_groups(table, plan)
    flagged = rows[rows["holm_p"] < alpha]
    return {
        "layer_made.own_contrast": float(own["interaction_contrast"]),
        "layer_made.own_ci": [float(own["ci_low"]), float(own["ci_high"])],
        "layer_made.own_p": float(own["sign_flip_p"]),
        "layer_made.secondary_beats_random": int((rows["vs_control_holm_p"] < alpha).sum()),
        "layer_made.secondary_conditions": int((rows["kind"] == "secondary").sum()),
        **{f"layer_made.{kind}_flagged": int((flagged["kind"] == kind).sum()) for kind in kinds},
    }
