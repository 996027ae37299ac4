"""Figures the notebooks show. Each function takes tidy data and returns a matplotlib Figure."""

from __future__ import annotations

from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd


def activation_norms(norms: pd.DataFrame, title: str = "") -> plt.Figure:
    """Token activation norms: distribution, by position in the text, and per-text mean (outliers visible).

    ``norms`` has columns ``norm``, ``position`` and ``text_index`` (see ``activations.token_norms``).
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    ax.hist(norms["norm"], bins=80, color="#4c72b0")
    ax.set(xlabel="activation L2 norm", ylabel="tokens", title="all tokens", yscale="log")

    ax = axes[1]
    position = norms["position"].clip(upper=np.percentile(norms["position"], 99))
    grouped = norms.assign(position=position).groupby("position")["norm"]
    stats = grouped.quantile([0.05, 0.5, 0.95]).unstack()
    ax.fill_between(stats.index, stats[0.05], stats[0.95], alpha=0.3, color="#4c72b0", label="5-95%")
    ax.plot(stats.index, stats[0.5], color="#4c72b0", label="median")
    ax.plot(grouped.max().index, grouped.max(), ".", color="#c44e52", ms=3, label="max")
    ax.set(xlabel="token position in text", ylabel="norm", title="by position")
    ax.legend(fontsize=8)

    ax = axes[2]
    per_text = norms.groupby("text_index")["norm"].mean()
    ax.hist(per_text, bins=50, color="#55a868")
    q1, q3 = per_text.quantile([0.25, 0.75])
    fence = q3 + 3 * (q3 - q1)
    n_out = int((per_text > fence).sum())
    ax.axvline(fence, color="#c44e52", ls="--", label=f"Q3 + 3 IQR ({n_out} texts beyond)")
    ax.set(xlabel="mean token norm of a text", ylabel="texts", title="per text")
    ax.legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def save(fig: plt.Figure, run_dir, name: str) -> None:
    """Save a figure as ``<run_dir>/figures/<name>.png`` (and leave it displayed in the notebook)."""
    out = Path(run_dir) / "figures" / f"{name}.png"
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110, bbox_inches="tight")


def manipulation_checks(scored: pd.DataFrame, effects: pd.DataFrame, probes: pd.DataFrame) -> plt.Figure:
    """Condition means of the two text scores (2x2 interaction plots, 95% CI over items), the effect
    sizes with CIs, and the probe accuracies against chance."""
    fig, axes = plt.subplots(1, 4, figsize=(18, 4))
    colors = {"emotional": "#c44e52", "neutral": "#4c72b0"}
    for ax, score, label in ((axes[0], "emotion_score", "VADER |compound|"),
                             (axes[1], "formality_score", "formality score (z)")):  # fmt: skip
        for emotion, group in scored.groupby("emotion"):
            stats = group.groupby("formality")[score].agg(["mean", "std", "count"]).loc[["casual", "formal"]]
            half = 1.96 * stats["std"] / np.sqrt(stats["count"])
            ax.errorbar(stats.index, stats["mean"], yerr=half, marker="o", capsize=4, label=emotion,
                        color=colors[emotion])  # fmt: skip
        ax.set(title=label, xlabel="register", ylabel="mean over texts")
        ax.legend(title="affect", fontsize=8)
    ax = axes[2]
    y = np.arange(len(effects))
    xerr = [effects["cohens_d"] - effects["ci_low"], effects["ci_high"] - effects["cohens_d"]]
    ax.errorbar(effects["cohens_d"], y, xerr=xerr, fmt="o", capsize=4, color="#333333")
    ax.set_yticks(y, [f"{r.factor.split(' ')[0]} → {r.score.replace('_score', '')}" for r in effects.itertuples()])
    for x in (-0.3, 0.3):
        ax.axvline(x, color="#999999", ls=":", lw=1)
    ax.axvline(0, color="#999999", lw=1)
    ax.set(title="Cohen's d (95% CI over items)", xlabel="d")
    ax = axes[3]
    ax.bar(probes["factor"], probes["accuracy_mean"], yerr=probes["accuracy_sd"], capsize=6, color="#55a868")
    ax.scatter(probes["factor"], probes["chance"], marker="_", s=600, color="#c44e52", label="chance", zorder=3)
    ax.set(ylim=(0.4, 1.0), title="linear probe on pooled embeddings\n(item-grouped CV, mean ± sd)", ylabel="accuracy")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig
