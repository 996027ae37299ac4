"""Figures across runs: a sweep's comparison table, and the planted benchmark's flag rates."""

from __future__ import annotations

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from . import style
from .figure import themed

# sweeps


@themed
def sweep_comparison(table: pd.DataFrame, keys: list[str]) -> plt.Figure:
    """A sweep's headline numbers against its first swept parameter, one line per combination of the others:
    the NFM's interaction share over the linear fit (bars: its interval; dashed, hollow: the detection limit
    of that run), the fraction of a planted interaction the SAE absorbs, and the SAE's held-out FVU."""
    x, others = keys[0], keys[1:]
    levels = sorted(table[x].unique(), key=lambda v: (isinstance(v, str), v))
    groups = list(table.groupby(others, sort=True)) if others else [((), table)]
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    panels = (
        ("interaction_share", "interaction share over the linear fit\n(held-out ΔR² of the residual; bars: 95% CI)"),
        ("absorbed_fraction", "fraction of a planted interaction\nthe retrained SAE absorbs"),
        ("sae_fvu", "primary SAE: held-out FVU"),
    )
    for i, (key, group) in enumerate(groups):
        key = key if isinstance(key, tuple) else (key,)
        label = ", ".join(f"{k}={v}" for k, v in zip(others, key)) or None
        group = group.set_index(x).reindex(levels)
        offset = (i - (len(groups) - 1) / 2) * 0.06  # side by side, so that intervals do not hide each other
        pos = np.arange(len(levels)) + offset
        color = style.PALETTE[i % len(style.PALETTE)]
        share = group["interaction_share"]
        low, high = share - group["interaction_share_low"], group["interaction_share_high"] - share
        axes[0].errorbar(pos, share, yerr=[low, high], fmt="o-", color=color, capsize=3, label=label)
        axes[0].plot(pos, group["detection_limit"], "o--", color=color, mfc="white", lw=1)
        axes[1].plot(pos, group["absorbed_fraction"], "o-", color=color, label=label)
        axes[2].plot(pos, group["sae_fvu"], "o-", color=color, label=label)
    for ax, (column, title) in zip(axes, panels):
        ax.set_xticks(np.arange(len(levels)), [str(v) for v in levels])
        ax.set(xlabel=x, title=title)
        if table[column].isna().all():
            ax.text(0.5, 0.5, "not run in this sweep", transform=ax.transAxes, ha="center", color="0.4")
    axes[0].axhline(0, color="k", lw=0.5)
    axes[0].set_yscale("symlog", linthresh=1e-4)  # shares and detection limits differ by orders of magnitude
    axes[0].plot([], [], "o--", color="0.4", mfc="white", lw=1, label="detection limit")
    axes[0].legend()
    axes[1].set_ylim(0, 1.05)
    fig.tight_layout()
    return fig


@themed
def flag_rates(rates: pd.DataFrame) -> plt.Figure:
    """How often each test flags something, against the planted integration's size, one panel per noise level
    (``rates``: noise, size, test, share of models, models). At size 0 every flag is false: the dotted line is
    the 5% a calibrated test may reach there; above 0, the share is the test's power."""
    panels = sorted(rates["noise"].unique())
    fig, axes = plt.subplots(1, len(panels), figsize=(5.2 * len(panels), 4.2), sharey=True, squeeze=False)
    for ax, noise in zip(axes[0], panels):
        tests = list(rates[rates["noise"] == noise].groupby("test", sort=False))
        step = 0.012 * float(rates["size"].max() or 1)  # side by side, so that lines at the same share stay visible
        for i, (test, rows) in enumerate(tests):
            rows = rows.sort_values("size")
            ax.plot(
                rows["size"] + (i - (len(tests) - 1) / 2) * step,
                rows["share"],
                marker="osD^v"[i % 5],
                color=style.PALETTE[i % len(style.PALETTE)],
                ms=6,
                label=test,
            )
        ax.axhline(0.05, color="k", lw=0.8, ls=":", label="5%: at most this with nothing planted")
        models = int(rates.loc[rates["noise"] == noise, "models"].min())
        ax.set(
            xlabel="planted integration g (size a*b*g along u_AB)",
            title=f"per-text context noise {noise:g} ({models} models a size)",
            ylim=(-0.03, 1.05),
        )
    axes[0][0].set_ylabel("share of planted models with a flag")
    handles, labels = axes[0][0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=3, fontsize=8, bbox_to_anchor=(0.5, -0.02))
    fig.tight_layout(rect=(0, 0.12, 1, 1))
    return fig
