"""Figures of stages 00, 01 and 04: activation norms, an SAE's training curves, feature firing density."""

from __future__ import annotations

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns

from . import style
from .figure import COUNT_FORMATTER, as_text, plain_log_axis, themed

# 00 · activations


@themed
def activation_norms(norms: pd.DataFrame, title: str = "") -> plt.Figure:
    """Token activation norms: distribution, by position in the text, and per-text mean (outliers visible).

    ``norms`` has columns ``norm``, ``position`` and ``text_index`` (see ``activations.token_norms``).
    """
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    color = style.PALETTE[0]
    ax = axes[0]
    sns.histplot(x=norms["norm"].to_numpy(), bins=80, color=color, ax=ax, element="step", alpha=0.6)
    ax.set(xlabel="activation L2 norm", ylabel="tokens", title="all tokens", yscale="log")

    ax = axes[1]
    position = norms["position"].clip(upper=np.percentile(norms["position"], 99))
    grouped = norms.assign(position=position).groupby("position")["norm"]
    stats = grouped.quantile([0.05, 0.5, 0.95]).unstack()
    ax.fill_between(stats.index, stats[0.05], stats[0.95], alpha=0.3, color=color, label="5-95%")
    ax.plot(stats.index, stats[0.5], color=color, label="median")
    ax.plot(grouped.max().index, grouped.max(), ".", color=style.ACCENT, ms=4, label="max")
    ax.set(xlabel="token position in text", ylabel="norm", title="by position")
    ax.legend()

    ax = axes[2]
    per_text = norms.groupby("text_index")["norm"].mean()
    sns.histplot(x=per_text.to_numpy(), bins=50, color=color, ax=ax, element="step", alpha=0.6)
    q1, q3 = per_text.quantile([0.25, 0.75])
    fence = q3 + 3 * (q3 - q1)
    n_out = int((per_text > fence).sum())
    ax.axvline(fence, color=style.ACCENT, ls="--", label=f"Q3 + 3 IQR ({n_out} texts beyond)")
    ax.set(xlabel="mean token norm of a text", ylabel="texts", title="per text")
    ax.legend()
    if title:
        fig.suptitle(as_text(title))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 01 / 04 · sparse autoencoders


@themed
def training_curves(history: pd.DataFrame, title: str = "") -> plt.Figure:
    """Training FVU (per batch) and held-out FVU against training tokens; L0 and the dead fraction get a panel
    only when they change (a TopK SAE's L0 is k at every step): otherwise their value is stated in the title."""
    l0 = history["l0"].to_numpy(dtype=float) if "l0" in history else np.array([])
    dead = 100 * history["dead_fraction"].to_numpy(dtype=float) if "dead_fraction" in history else np.array([])
    show_l0 = len(l0) > 0 and np.nanmax(l0) - np.nanmin(l0) > 1e-6
    show_dead = len(dead) > 0 and np.nanmax(dead) > 0
    notes = []
    if len(l0) and not show_l0:
        notes.append(f"L0 = {l0[0]:g} at every step (TopK)")
    if len(dead) and not show_dead:
        notes.append("no latent died")
    n_panels = 1 + show_l0 + show_dead
    fig, axes = plt.subplots(1, n_panels, figsize=(4.2 + 4.6 * (n_panels - 1) + 1.2, 3.8), squeeze=False)
    axes = list(axes[0])

    ax = axes[0]
    ax.plot(history["tokens"], history["fvu"], lw=0.9, alpha=0.7, color=style.PALETTE[0], label="train batch")
    held_out = history.dropna(subset=["val_fvu"]) if "val_fvu" in history else history.iloc[:0]
    ax.plot(held_out["tokens"], held_out["val_fvu"], "o-", ms=3.5, color=style.PALETTE[1], label="held-out")
    ax.set(ylabel="FVU", yscale="log", title="fraction of variance unexplained")
    ax.legend()
    plain_log_axis(ax.yaxis)
    panel = 1
    if show_l0:
        axes[panel].plot(history["tokens"], l0, color=style.PALETTE[2])
        axes[panel].set(ylabel="L0", title="active latents per token")
        panel += 1
    if show_dead:
        ax = axes[panel]
        ax.plot(history["tokens"], dead, color=style.ACCENT)
        ax.set_ylim(0, np.nanmax(dead) * 1.15)
        ax.yaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:.2g}%"))
        ax.set(ylabel="latents", title=f"dead latents (at most {np.nanmax(dead):.2g}%; AuxK revives them)")
    for ax in axes:
        ax.xaxis.set_major_formatter(COUNT_FORMATTER)
        ax.set_xlabel("training tokens")
    heading = "\n".join(part for part in (as_text(title), "; ".join(notes)) if part)
    if heading:
        fig.suptitle(heading)
    fig.tight_layout()
    return fig


@themed
def feature_density(firing_frequency: np.ndarray, title: str = "") -> plt.Figure:
    """Histogram of firing frequency (log axis); dead latents counted apart; 1% and 10% density lines."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    firing_frequency = np.asarray(firing_frequency, dtype=float)
    alive = firing_frequency[firing_frequency > 0]
    dead = int((firing_frequency == 0).sum())
    if len(alive):
        sns.histplot(x=alive, bins=60, log_scale=True, color=style.PALETTE[0], ax=ax, element="step", alpha=0.6)
    else:
        ax.text(0.5, 0.5, "no latent fires", transform=ax.transAxes, ha="center", color="0.4")
        ax.set_xscale("log")
        ax.set_xlim(1e-4, 1)
    ax.xaxis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{100 * v:g}%"))
    for level in (0.01, 0.1):
        ax.axvline(level, color=style.ACCENT, ls="--", lw=1)
        ax.text(
            level, 0.97, f" {level:.0%}", color=style.ACCENT, va="top", fontsize=8, transform=ax.get_xaxis_transform()
        )
    ax.set(
        xlabel="firing frequency (share of held-out tokens, log scale)",
        ylabel="latents",
        title=as_text(title) or f"feature density ({dead} of {len(firing_frequency)} latents never fire)",
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
