"""Figures of stages 02 and 03: the NFM's fit curves, the baseline ladder, the interaction shares beside
the null control, the power curve, feature attribution and the pairwise interaction matrix.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import style
from .figure import as_text, feature_name, themed

# 02 / 03 · residual models and the interaction share

MODEL_KINDS = {
    "zero": "control",
    "raw_ridge": "linear",
    "code_ridge": "linear",
    "additive": "linear",
    "pair_ridge": "interaction",
    "nfm": "interaction",
    "nfm_additive": "interaction",
    "mlp": "interaction",
    "oracle": "interaction",
}
"""Which part each residual model stands for: first-order only (``linear``, the additive per-feature
non-linearity included), with pairwise or MLP terms (``interaction``), or predicting zero (``control``)."""

KIND_LEGEND = {
    "linear": "first-order (no pairs)",
    "interaction": "with pairwise / interaction terms",
    "control": "control",
}


@themed
def fit_curves(histories: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Fitting-set and tune-set FVU per epoch of residual models (dots: the kept, best epochs)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, history) in enumerate(histories.items()):
        color = style.PALETTE[i % len(style.PALETTE)]
        ax.plot(history["epoch"], history["fit_fvu"], color=color, lw=0.9, alpha=0.5)
        ax.plot(history["epoch"], history["tune_fvu"], color=color, lw=1.8, label=as_text(name))
        best = history.loc[history["tune_fvu"].idxmin()]
        ax.plot(best["epoch"], best["tune_fvu"], "o", color=color)
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set(
        xlabel="epoch",
        ylabel="residual FVU",
        title=as_text(title) or "fit (thin) and tune (thick) FVU; dot: kept epoch",
    )
    ax.legend()
    fig.tight_layout()
    return fig


@themed
def baseline_ladder(table: pd.DataFrame, labels: dict[str, str], failed: set[str] = frozenset()) -> plt.Figure:
    """Held-out residual FVU and total-activation FVU of every model (bars: mean over seeds; dots: seeds),
    coloured by the part the model stands for. Models in ``failed`` (no gain over predicting zero) are hatched."""
    order = [m for m in labels if m in set(table["model"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(order) + 1.9), sharey=True)
    colors = [style.KIND_COLORS[MODEL_KINDS.get(m, "linear")] for m in order]
    for ax, column, title in (
        (axes[0], "residual_fvu", "SAE residual: FVU of each model's prediction"),
        (axes[1], "total_fvu", "activation: FVU of SAE + the model"),
    ):
        means = table.groupby("model")[column].mean().reindex(order)
        y = np.arange(len(order))
        bars = ax.barh(y, means, color=colors, alpha=0.85)
        for bar, model in zip(bars, order):
            if model in failed:
                bar.set_hatch("//")
        for i, model in enumerate(order):
            seeds = table.loc[table["model"] == model, column]
            ax.plot(seeds, np.full(len(seeds), i), "k.", ms=4)
            ax.text(means[model], i, f" {means[model]:.4f}", va="center", fontsize=8)
        ax.set(title=title, xlabel="FVU (held-out documents; lower is better)")
        ax.set_xlim(0, means.max() * 1.18)
        ax.grid(axis="y", visible=False)
    axes[0].set_yticks(np.arange(len(order)), [as_text(labels[m]) for m in order])
    axes[0].invert_yaxis()
    kinds = list(dict.fromkeys(MODEL_KINDS.get(m, "linear") for m in order))
    handles = [Patch(color=style.KIND_COLORS[k], label=KIND_LEGEND[k]) for k in kinds]
    if failed:
        handles.append(Patch(facecolor="white", edgecolor="0.3", hatch="//", label="does not beat predicting zero"))
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), frameon=False)
    fig.tight_layout(rect=(0, 0.45 / fig.get_figheight(), 1, 1))  # the legend's row stays free below
    return fig


SHARE_LABELS = {
    "over_linear": "NFM over linear",
    "over_additive": "NFM over additive",
    "pair_ridge": "explicit pairs over linear",
    "mlp_over_linear": "MLP over linear",
    "additive_over_linear": "additive over linear\n(single-feature non-linearity)",
}

SHARE_KINDS = {"additive_over_linear": "linear"}  # a single-feature non-linearity is first-order, not a pair


@themed
def interaction_forest(shares: pd.DataFrame, control: pd.DataFrame, limit: float | None = None) -> plt.Figure:
    """Each share (held-out incremental R-squared) with its bootstrap interval, the null control's below, and
    the detection limit measured by planted interactions."""
    rows = [
        (SHARE_LABELS[name], shares.loc[name], style.KIND_COLORS[SHARE_KINDS.get(name, "interaction")])
        for name in SHARE_LABELS
        if name in shares.index
    ]
    rows += [
        (f"null control: {SHARE_LABELS.get(name, name)}", control.loc[name], style.KIND_COLORS["control"])
        for name in control.index
    ]
    fig, ax = plt.subplots(figsize=(8.5, 0.5 * len(rows) + 1.6))
    for i, (_, stats, color) in enumerate(rows):
        ax.plot([stats["ci_low"], stats["ci_high"]], [i, i], color=color, lw=2.5)
        ax.plot(stats["mean"], i, "o", color=color)
        ax.text(stats["ci_high"], i, f"  {stats['mean']:+.4f}", va="center", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    handles = [
        Line2D([], [], color=style.KIND_COLORS[k], marker="o", lw=2.5, label=label)
        for k, label in (
            ("interaction", "pairwise / interaction term"),
            ("linear", "single-feature non-linearity"),
            ("control", "null control"),
        )
        if any(color == style.KIND_COLORS[k] for _, _, color in rows)
    ]
    if limit is not None:
        ax.axvline(limit, color=style.ACCENT, ls="--", lw=1)
        handles.append(Line2D([], [], color=style.ACCENT, ls="--", lw=1, label=f"detection limit ({limit:.4f})"))
    ax.legend(handles=handles, loc="lower right")
    ax.set_yticks(range(len(rows)), [as_text(r[0]) for r in rows])
    ax.grid(axis="y", visible=False)
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.set(
        xlabel="Δ R² of the SAE residual on held-out documents (point: mean over seeds; bar: 95% interval)",
        title="what each term adds over its first-order fit",
    )
    fig.tight_layout()
    return fig


ESTIMATOR_STYLE = {
    "over_linear": ("nested NFM", style.KIND_COLORS["interaction"]),
    "pair_ridge": ("explicit-pairs ridge", style.PALETTE[5]),
}


@themed
def power_curve(power: pd.DataFrame, limits: dict[str, float | None] | None = None) -> plt.Figure:
    """What a planted interaction adds to each estimate (the nested NFM's and the explicit-pairs ridge's, over
    their un-injected estimates) against the planted share (the oracle's, which knows the planted pairs), with
    each one's detection limit; the diagonal is full recovery. Hollow markers: not detected at that size."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    x = power["oracle"]
    for column, (label, color) in ESTIMATOR_STYLE.items():
        y = power[f"{column}_excess"]
        ax.plot(x, y, "-", color=color, label=label)
        detected = power[f"{column}_detected"].astype(bool)
        ax.plot(x[detected], y[detected], "o", color=color)
        ax.plot(x[~detected], y[~detected], "o", color=color, mfc="white")
    top = float(max(x.max(), power[["over_linear_excess", "pair_ridge_excess"]].to_numpy().max())) * 1.1
    ax.plot([0, top], [0, top], color="k", lw=0.8, ls=":", label="recovers the planted share")
    ax.axhline(0, color="k", lw=0.5)
    for column, (label, color) in ESTIMATOR_STYLE.items():
        limit = (limits or {}).get(column)
        if limit is not None:
            ax.axvline(limit, color=color, ls="--", lw=1, label=f"{label}: detection limit {limit:.4f}")
    ax.set(
        xlabel="planted share (oracle fit with the planted pairs, held-out Δ R²)",
        ylabel="added to the estimate (held-out Δ R²)",
        title="power: planted interactions in this run's residual\n(hollow: not detected at that size)",
    )
    ax.legend()
    fig.tight_layout()
    return fig


@themed
def top_feature_bars(attribution: pd.DataFrame, n: int = 15, labels: Mapping[int, str] | None = None) -> plt.Figure:
    """The features with the largest variance share of the first-order and of the interaction part, named by
    ``labels`` (feature id -> e.g. ``#3447 "however/but/although"``) where given."""
    parts = [p for p in ("linear", "interaction") if f"{p}_share" in attribution]
    width = 6.5 if labels else 5.5  # room for the tokens in the tick labels
    fig, axes = plt.subplots(1, len(parts), figsize=(width * len(parts), 0.3 * n + 1.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        top = attribution.nlargest(n, f"{part}_share")
        ax.barh(np.arange(len(top)), top[f"{part}_share"], color=style.KIND_COLORS[part])
        ax.set_yticks(np.arange(len(top)), [feature_name(f, labels) for f in top["feature"]])
        ax.grid(axis="y", visible=False)
        ax.invert_yaxis()
        ax.set(
            xlabel="share of the part's held-out variance",
            title=f"top features of the {'first-order' if part == 'linear' else 'interaction'} part",
        )
    fig.tight_layout()
    return fig


@themed
def interaction_matrix(strength: pd.DataFrame, labels: Mapping[int, str] | None = None) -> plt.Figure:
    """Heat map of ``<v_i, v_j>`` between the factor embeddings of the top interaction features (diagonal
    blank: ``||v_i||^2`` is no pairwise interaction, the pooling is strictly i != j)."""
    n = len(strength)
    values = strength.to_numpy(dtype=float).copy()
    np.fill_diagonal(values, np.nan)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    names = [feature_name(f, labels) for f in strength.index]
    side = 0.32 * n + 3
    fig, ax = plt.subplots(figsize=(side + (3.5 if labels else 1), side))
    sns.heatmap(
        pd.DataFrame(values, index=names, columns=[f"#{int(f)}" for f in strength.columns]),  # tokens once, on y
        mask=np.eye(n, dtype=bool),
        cmap="vlag",
        center=0,
        vmin=-(limit or 1.0),
        vmax=limit or 1.0,
        square=True,
        linewidths=0.3,
        linecolor="white",
        cbar_kws={"label": "<v_i, v_j>", "shrink": 0.7},
        xticklabels=True,
        yticklabels=True,
        ax=ax,
    )
    ax.tick_params(axis="both", labelsize=8)
    ax.grid(False)  # the theme's grid would cross the blank diagonal
    ax.set_title("pairwise interaction strength between the top interaction features")
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
