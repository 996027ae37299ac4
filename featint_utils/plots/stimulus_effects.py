"""Figures of stage 05: the stimulus set's manipulation checks, one feature's response per condition, and
the effect volcano of every feature.
"""

from __future__ import annotations

from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.ticker import MaxNLocator

from . import style
from .figure import EMOTION_ORDER, REGISTER_ORDER, as_text, error_bars, feature_name, themed

# 05 · stimuli and feature identification


def manipulation_checks(scored: pd.DataFrame, effects: pd.DataFrame, probes: pd.DataFrame) -> plt.Figure:
    """Condition means of the two text scores (2x2 interaction plots, 95% CI over items), the probe accuracies
    against chance, and Cohen's d with CIs: each factor on its own score and the cross effects, each on its own
    scale (a large intended d would otherwise squash the small cross effects to a dot at 0)."""
    fig, axes = plt.subplot_mosaic(
        [
            ["emotion", "emotion", "formality", "formality", "probe", "probe"],
            ["own", "own", "own", "cross", "cross", "cross"],
        ],
        figsize=(14, 7.5),
        height_ratios=[1.15, 1],
    )
    for key, score, label in (
        ("emotion", "emotion_score", "emotion score: VADER |compound|"),
        ("formality", "formality_score", "formality score (z)"),
    ):
        ax = axes[key]
        sns.pointplot(
            data=scored,
            x="emotion",
            y=score,
            hue="formality",
            order=EMOTION_ORDER,
            hue_order=REGISTER_ORDER,
            palette=style.REGISTER_COLORS,
            errorbar=("se", 1.96),  # mean ± 1.96 SE over texts: one text per item and condition
            capsize=0.08,
            dodge=0.08,
            ax=ax,
        )
        ax.set(title=label, xlabel="affect", ylabel="mean over texts")
        ax.legend(title="register")
    ax = axes["probe"]
    ax.bar(probes["factor"], probes["accuracy_mean"], yerr=probes["accuracy_sd"], capsize=6, color=style.PALETTE[0])
    ax.scatter(
        probes["factor"], probes["chance"], marker="_", s=700, lw=2, color=style.ACCENT, label="chance", zorder=3
    )
    ax.set(ylim=(0.4, 1.0), title="linear probe on pooled embeddings\n(item-grouped CV, mean ± sd)", ylabel="accuracy")
    ax.grid(axis="x", visible=False)
    ax.legend(loc="lower right")

    intended = effects["intended"].astype(bool) if "intended" in effects else effects.apply(_is_intended, axis=1)
    for key, rows, title, band in (
        ("own", effects[intended], "each factor on its own score (want |d| ≥ 1)", 1.0),
        ("cross", effects[~intended], "cross effects (want |d| ≤ 0.3)", 0.3),
    ):
        ax = axes[key]
        y = np.arange(len(rows))
        xerr = error_bars(rows["cohens_d"], rows["ci_low"], rows["ci_high"])
        ax.errorbar(rows["cohens_d"], y, xerr=xerr, fmt="o", capsize=4, color="#333333")
        ax.set_yticks(y, [f"{r.factor.split(' ')[0]} → {r.score.replace('_score', '')}" for r in rows.itertuples()])
        if key == "cross":
            ax.axvspan(-band, band, color=style.KIND_COLORS["control"], alpha=0.15, lw=0, label="|d| ≤ 0.3")
            reach = max(0.5, float(np.abs(rows[["ci_low", "ci_high"]].to_numpy()).max(initial=0)) * 1.2)
            ax.set_xlim(-reach, reach)
        else:
            for x in (-band, band):
                ax.axvline(x, color=style.ACCENT, ls=":", lw=1.2)
            ax.set_xlim(
                min(0.0, np.min(rows["ci_low"].to_numpy(), initial=0)) - 0.5,
                max(1.0, np.max(rows["ci_high"].to_numpy(), initial=1)) * 1.1 + 0.5,
            )
        ax.axvline(0, color="0.5", lw=1)
        ax.set_ylim(-0.6, len(rows) - 0.4)
        ax.grid(axis="y", visible=False)
        ax.invert_yaxis()
        ax.set(title=f"Cohen's d, 95% CI over items: {title}", xlabel="d")
    fig.tight_layout()
    return fig


def _is_intended(row) -> bool:
    return row["factor"].split(" ")[0] == row["score"].replace("_score", "")


@themed
def feature_panel(per_text: np.ndarray, condition_means: dict[str, float], title: str = "") -> plt.Figure:
    """One feature on the stimulus set: histogram of its per-text activation and the 2x2 condition means."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    per_text = np.asarray(per_text, dtype=float)
    sns.histplot(x=per_text, bins=40, color=style.PALETTE[0], ax=axes[0], element="step", alpha=0.6)
    silent = float((per_text == 0).mean())
    axes[0].set(xlabel="mean activation over a text's tokens", ylabel="texts", title=f"per text ({silent:.0%} silent)")
    for formality in REGISTER_ORDER:
        means = [condition_means[f"{formality}_{emotion}"] for emotion in EMOTION_ORDER]
        axes[1].plot([0, 1], means, "o-", color=style.REGISTER_COLORS[formality], label=formality)
    axes[1].set_xticks([0, 1], EMOTION_ORDER)
    axes[1].set_xlim(-0.3, 1.3)
    axes[1].set(ylabel="mean activation", title="condition means (parallel lines: no interaction)")
    axes[1].legend(title="register")
    if title:
        fig.suptitle(as_text(title))
    fig.tight_layout()
    return fig


EFFECT_COLORS = {
    "interaction": style.KIND_COLORS["interaction"],
    "formality": style.REGISTER_COLORS["formal"],
    "emotion": style.ACCENT,
}


@themed
def effect_volcano(
    effects: pd.DataFrame,
    effect: str = "interaction",
    q: float = 0.05,
    title: str = "",
    labels: Mapping[int, str] | None = None,
) -> plt.Figure:
    """Signed effect against significance for every feature of a family; BH-significant ones highlighted. The
    features in ``labels`` (feature id -> label, e.g. the strongest ones with their top tokens) are circled and
    named in a column beside the plot, so that the names never overlap."""
    named = [f for f in (labels or {}) if f in set(effects["feature"].astype(int))]
    fig, ax = plt.subplots(figsize=(10.5 if named else 7.5, 4.5))
    p = effects[f"{effect}_p"].clip(lower=1e-300)
    x = effects[f"{effect}_effect"]
    y = -np.log10(p)
    significant = effects[f"{effect}_q"] < q
    ax.scatter(x[~significant], y[~significant], s=6, color=style.MUTED, alpha=0.5, lw=0, label="not significant")
    ax.scatter(
        x[significant],
        y[significant],
        s=10,
        color=EFFECT_COLORS.get(effect, style.ACCENT),
        lw=0,
        label=f"q < {q} ({int(significant.sum())} of {len(effects)})",
    )
    if named:
        rows = (
            effects.assign(_y=y).set_index(effects["feature"].astype(int)).loc[named].sort_values("_y", ascending=False)
        )
        ax.scatter(rows[f"{effect}_effect"], rows["_y"], s=60, facecolor="none", edgecolor="k", lw=1, label="named")
        for slot, (feature, row) in zip(_label_slots(ax, rows["_y"].to_numpy()), rows.iterrows()):
            ax.annotate(
                feature_name(feature, labels),
                xy=(row[f"{effect}_effect"], row["_y"]),
                xytext=(1.03, slot),
                textcoords="axes fraction",
                va="center",
                fontsize=8,
                arrowprops={"arrowstyle": "-", "color": "0.5", "lw": 0.6, "shrinkA": 0, "shrinkB": 4},
                annotation_clip=False,
            )
    label = {"interaction": "(FE − FN) − (CE − CN)", "formality": "formal − casual", "emotion": "emotional − neutral"}
    ax.axvline(0, color="0.5", lw=0.8)
    ax.set(
        xlabel=f"{effect} effect on the mean activation: {label[effect]}",
        ylabel="−log10 p",
        title=as_text(title) or f"{effect}: every feature",
    )
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=3, frameon=False)
    fig.tight_layout()
    return fig


def _label_slots(ax: plt.Axes, ys: np.ndarray, gap: float = 0.075) -> np.ndarray:
    """Heights (axes fraction) for labels beside the plot: each at its point's height, pushed apart to at least
    ``gap`` (``ys`` sorted from the top), so that leader lines stay short and never cross."""
    low, high = ax.get_ylim()
    slots = np.clip((np.asarray(ys, dtype=float) - low) / (high - low), 0.0, 1.0)
    for i in range(1, len(slots)):
        slots[i] = min(slots[i], slots[i - 1] - gap)
    if len(slots) and slots[-1] < 0.0:  # pushed below the axes: shift the column up, keeping the spacing
        slots = slots - slots[-1]
    return slots


# ---------------------------------------------------------------------------------------------------------------


@themed
def interaction_split(effects: Mapping[str, pd.DataFrame], q: float = 0.05) -> plt.Figure:
    """Per family, every feature's interaction contrast split on the additive counterfactual: what the
    instrument makes from an additive layer (x) against what the layer made (y); features whose layer-made
    part is significant (BH, q < ``q``) in colour. An instrument that only reshapes an additive layer puts
    its features on the x axis; a layer that integrates lifts them off it."""
    fig, axes = plt.subplots(1, len(effects), figsize=(4.2 * len(effects), 4.0), squeeze=False)
    for ax, (family, table) in zip(axes[0], effects.items()):
        flagged = table["layer_made_q"] < q
        x, y = table["instrument_made_effect"], table["layer_made_effect"]
        ax.scatter(x[~flagged], y[~flagged], s=6, color=style.MUTED, alpha=0.6, lw=0, label="layer-made part n.s.")
        ax.scatter(x[flagged], y[flagged], s=9, color=style.ACCENT, lw=0, label=f"layer-made part q < {q}")
        ax.axhline(0, color="0.5", lw=0.8)
        ax.axvline(0, color="0.5", lw=0.8)
        ax.xaxis.set_major_locator(MaxNLocator(5))  # four-decimal ticks stay apart on a 4-inch panel
        ax.set(
            xlabel="made by the instrument",
            title=f"{family}: {int(flagged.sum())} of {len(table)} layer-made",
        )
    axes[0][0].set_ylabel("made by the layer")
    fig.suptitle(
        "interaction contrast = layer-made f(FE) − f(FE*) + instrument-made f(FE*) − f(FN) − f(CE) + f(CN)",
        fontsize=9,
    )
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=2, frameon=False)
    fig.tight_layout(rect=(0, 0.07, 1, 1))
    return fig
