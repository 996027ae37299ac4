"""Figures the notebooks show. Each function takes tidy data and returns a matplotlib Figure."""

from __future__ import annotations

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
