"""Figures the notebooks show. Each function takes tidy data and returns a matplotlib Figure; :func:`save` writes
it as PNG and SVG. The look (theme, sizes, colours) is :mod:`featint_utils.style`'s, applied here, never in a
notebook. Features are named with :func:`featint_utils.feature_labels.feature_label` where a notebook passes
``labels`` (feature id -> label); without them a feature is its bare id."""

from __future__ import annotations

import functools
import math
import re
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D
from matplotlib.patches import Patch

from . import style
from .io import atomic_path

style.apply()

FORMATS = ("png", "svg")
"""What :func:`save` writes: a PNG to look at and a resolution-free SVG for papers and slides."""


def _themed(draw):
    """Apply the workbook's theme before a figure function draws (a notebook may have changed rcParams)."""

    @functools.wraps(draw)
    def themed(*args, **kwargs):
        style.apply()
        return draw(*args, **kwargs)

    return themed


def save(fig: plt.Figure, run_dir, name: str, formats: tuple[str, ...] = FORMATS) -> list[Path]:
    """Save a figure as ``<run_dir>/figures/<name>.png`` (at :data:`style.DPI`) and ``.svg`` beside it, each
    written atomically, and leave it displayed in the notebook. Returns the paths written."""
    written = []
    for fmt in formats:
        path = Path(run_dir) / "figures" / f"{name}.{fmt}"
        metadata = {"Date": None} if fmt in ("svg", "pdf") else None  # no timestamp: a rerun gives the same file
        with atomic_path(path) as tmp:
            fig.savefig(tmp, format=fmt, dpi=style.DPI, bbox_inches="tight", metadata=metadata)
        written.append(path)
    return written


# ---------------------------------------------------------------------------------------------------------------
# Shared pieces


def format_count(value: float) -> str:
    """A count as people write it: 950, 12.5k, 250k, 1M, 1.5M, 2B."""
    for size, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= size:
            return f"{value / size:.3g}{suffix}"
    return f"{value:.3g}"


COUNT_FORMATTER = mticker.FuncFormatter(lambda value, _: format_count(value))
"""Tick labels of token counts (250k, 1M) instead of a "1e6" offset."""


def model_title(name: str) -> str:
    """The name of a model as a figure shows it: the embedded default by its real name, a local directory by
    its last part, a hub name as it is."""
    from .models import EMBEDDED  # here: models pulls in torch, which drawing does not need

    if name == EMBEDDED:
        return "all-MiniLM-L6-v2 (embedded)"
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or path.is_dir():
        return path.name or name
    return name


def _text(value) -> str:
    """A string matplotlib shows literally: a token like "$" must not start mathtext."""
    return str(value).replace("$", r"\$")


def _feature(feature, labels: Mapping[int, str] | None) -> str:
    return _text((labels or {}).get(int(feature), f"#{int(feature)}"))


def _plain_log_axis(axis) -> None:
    """Log-axis ticks as plain numbers (0.05, 0.1, 0.2), the 2s and 5s labelled too when the axis spans less
    than two decades; not 6×10⁻¹."""
    low, high = sorted(abs(v) for v in axis.get_view_interval())
    few_decades = low > 0 and np.log10(high / low) < 2
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(value, _):
        mantissa = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}" if few_decades and mantissa in (2, 5) else ""

    axis.set_minor_formatter(mticker.FuncFormatter(minor))


def _wrapped(label: str, width: int = 28) -> str:
    """A long axis label over lines, so that it fits beside one small panel."""
    return _text(textwrap.fill(label, width))


def _scientific(axis) -> None:
    """Small numbers (1e-5) with one ×10⁻⁵ at the end of the axis, not a bare "1e-5"."""
    formatter = mticker.ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-3, 4))
    axis.set_major_formatter(formatter)


def _n_cols(n_panels: int, max_cols: int) -> int:
    """Columns of a grid of small multiples: near-square, a row of three for three, never above ``max_cols``."""
    return max(1, min(max_cols, n_panels, max(3, math.ceil(math.sqrt(n_panels)))))


# ---------------------------------------------------------------------------------------------------------------
# 00 · activations


@_themed
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
        fig.suptitle(_text(title))
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# 01 / 04 · sparse autoencoders


@_themed
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
    _plain_log_axis(ax.yaxis)
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
    heading = "\n".join(part for part in (_text(title), "; ".join(notes)) if part)
    if heading:
        fig.suptitle(heading)
    fig.tight_layout()
    return fig


@_themed
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
        title=_text(title) or f"feature density ({dead} of {len(firing_frequency)} latents never fire)",
    )
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
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


@_themed
def fit_curves(histories: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Fitting-set and tune-set FVU per epoch of residual models (dots: the kept, best epochs)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, history) in enumerate(histories.items()):
        color = style.PALETTE[i % len(style.PALETTE)]
        ax.plot(history["epoch"], history["fit_fvu"], color=color, lw=0.9, alpha=0.5)
        ax.plot(history["epoch"], history["tune_fvu"], color=color, lw=1.8, label=_text(name))
        best = history.loc[history["tune_fvu"].idxmin()]
        ax.plot(best["epoch"], best["tune_fvu"], "o", color=color)
    ax.xaxis.set_major_locator(mticker.MaxNLocator(integer=True))
    ax.set(
        xlabel="epoch", ylabel="residual FVU", title=_text(title) or "fit (thin) and tune (thick) FVU; dot: kept epoch"
    )
    ax.legend()
    fig.tight_layout()
    return fig


@_themed
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
    axes[0].set_yticks(np.arange(len(order)), [_text(labels[m]) for m in order])
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


@_themed
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
    ax.set_yticks(range(len(rows)), [_text(r[0]) for r in rows])
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


@_themed
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


@_themed
def top_feature_bars(attribution: pd.DataFrame, n: int = 15, labels: Mapping[int, str] | None = None) -> plt.Figure:
    """The features with the largest variance share of the first-order and of the interaction part, named by
    ``labels`` (feature id -> e.g. ``#3447 "however/but/although"``) where given."""
    parts = [p for p in ("linear", "interaction") if f"{p}_share" in attribution]
    width = 6.5 if labels else 5.5  # room for the tokens in the tick labels
    fig, axes = plt.subplots(1, len(parts), figsize=(width * len(parts), 0.3 * n + 1.5), squeeze=False)
    for ax, part in zip(axes[0], parts):
        top = attribution.nlargest(n, f"{part}_share")
        ax.barh(np.arange(len(top)), top[f"{part}_share"], color=style.KIND_COLORS[part])
        ax.set_yticks(np.arange(len(top)), [_feature(f, labels) for f in top["feature"]])
        ax.grid(axis="y", visible=False)
        ax.invert_yaxis()
        ax.set(
            xlabel="share of the part's held-out variance",
            title=f"top features of the {'first-order' if part == 'linear' else 'interaction'} part",
        )
    fig.tight_layout()
    return fig


@_themed
def interaction_matrix(strength: pd.DataFrame, labels: Mapping[int, str] | None = None) -> plt.Figure:
    """Heat map of ``<v_i, v_j>`` between the factor embeddings of the top interaction features (diagonal
    blank: ``||v_i||^2`` is no pairwise interaction, the pooling is strictly i != j)."""
    n = len(strength)
    values = strength.to_numpy(dtype=float).copy()
    np.fill_diagonal(values, np.nan)
    limit = float(np.nanmax(np.abs(values))) if np.isfinite(values).any() else 1.0
    names = [_feature(f, labels) for f in strength.index]
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
# 05 · stimuli and feature identification

EMOTION_ORDER = ["neutral", "emotional"]
REGISTER_ORDER = ["formal", "casual"]


@_themed
def _error_bars(point, low, high) -> list:
    """Error-bar lengths below and above ``point``; a percentile interval need not contain its point estimate
    (a skewed bootstrap), and a bar cannot be negative, so the side it misses is drawn as zero."""
    return [np.clip(point - low, 0, None), np.clip(high - point, 0, None)]


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
        xerr = _error_bars(rows["cohens_d"], rows["ci_low"], rows["ci_high"])
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


@_themed
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
        fig.suptitle(_text(title))
    fig.tight_layout()
    return fig


EFFECT_COLORS = {
    "interaction": style.KIND_COLORS["interaction"],
    "formality": style.REGISTER_COLORS["formal"],
    "emotion": style.ACCENT,
}


@_themed
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
                _feature(feature, labels),
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
        title=_text(title) or f"{effect}: every feature",
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
# 06 · clamping

CLAMP_KIND_LEGEND = {
    "interaction": "secondary feature (interaction path)",
    "control": "random edit of the same size (control)",
    "linear": "primary feature on the linear path",
}
CLAMP_FAMILY = {"interaction": "secondary", "linear": "primary"}  # whose labels name a clamped feature


def clamp_kind(name: str) -> str:
    """``interaction``, ``control`` or ``linear``: what a clamp group or condition (``clamping.clamp_plan``'s
    ``group``/``name``: "secondary 837", "random (size of 837)", "linear-path 3447") edits."""
    if name.startswith("random"):
        return "control"
    if name.startswith("linear"):
        return "linear"
    return "interaction"


def _clamp_name(name: str, labels: Mapping[str, Mapping[int, str]] | None) -> str:
    """A clamp group or condition with its feature's label ("secondary #837 "a/b/c" @ -1"); a control keeps
    its name (it edits no feature). ``labels``: family ("secondary", "primary") -> feature id -> label."""
    family = CLAMP_FAMILY.get(clamp_kind(name))
    match = re.search(r"\d+", name)
    label = (labels or {}).get(family, {}).get(int(match.group())) if family and match else None
    return _text(name[: match.start()] + label + name[match.end() :] if label else name)


def _register_legend() -> list[Line2D]:
    return [
        Line2D(
            [], [], color=style.REGISTER_COLORS[f], ls=style.EMOTION_LINESTYLES[e], marker="o", ms=4, label=f"{f} {e}"
        )
        for f in REGISTER_ORDER
        for e in ("emotional", "neutral")
    ]


def _facet_titles(grid: sns.FacetGrid, labels) -> None:
    for group, ax in grid.axes_dict.items():
        ax.set_title(_clamp_name(group, labels), color=style.KIND_COLORS[clamp_kind(group)], fontsize=10)


@_themed
def dose_response(
    tidy: pd.DataFrame, readout: str, labels: Mapping[str, Mapping[int, str]] | None = None, max_cols: int = 4
) -> plt.Figure:
    """Mean change of each bucket's readout (± SE over units) against clamp level, one small panel per clamp
    group (title coloured by kind: interaction path, random control, linear path), wrapped into rows."""
    groups = list(dict.fromkeys(tidy["group"]))
    grid = sns.FacetGrid(
        tidy, col="group", col_order=groups, col_wrap=_n_cols(len(groups), max_cols), height=3.0, aspect=1.2
    )

    def draw(data, **_):
        ax = plt.gca()
        for formality in REGISTER_ORDER:
            for emotion in ("emotional", "neutral"):
                b = data[data["bucket"] == f"{formality}_{emotion}"].sort_values("level")
                ax.errorbar(
                    b["level"],
                    b["mean_change"],
                    yerr=b["se"],
                    color=style.REGISTER_COLORS[formality],
                    ls=style.EMOTION_LINESTYLES[emotion],
                    marker="o",
                    ms=3,
                    capsize=2,
                )
        ax.axhline(0, color="k", lw=0.7)

    grid.map_dataframe(draw)
    grid.set_axis_labels("clamp level (× max activation)", _wrapped(f"change of {readout}"))
    _facet_titles(grid, labels)
    ticks = sorted({0.0, *tidy["level"].astype(float)})
    for ax in grid.axes.flat:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        _scientific(ax.yaxis)
    grid.add_legend(legend_data={h.get_label(): h for h in _register_legend()}, title="readout bucket")
    grid.tight_layout()  # the grid's own: it keeps the room add_legend made on the right
    return grid.figure


@_themed
def interaction_2x2(
    tidy: pd.DataFrame,
    level: float,
    readout: str,
    labels: Mapping[str, Mapping[int, str]] | None = None,
    max_cols: int = 4,
) -> plt.Figure:
    """At one clamp level, each clamp group's change per bucket as a 2x2 interaction plot (x: bucket affect;
    colour: bucket register; parallel lines: no interaction), small multiples wrapped into rows."""
    at_level = tidy[np.isclose(tidy["level"], level)]
    groups = list(dict.fromkeys(at_level["group"]))
    grid = sns.FacetGrid(
        at_level, col="group", col_order=groups, col_wrap=_n_cols(len(groups), max_cols), height=2.9, aspect=1.1
    )

    def draw(data, **_):
        ax = plt.gca()
        rows = data.set_index("bucket")
        for offset, formality in zip((-0.04, 0.04), REGISTER_ORDER):
            buckets = [f"{formality}_{e}" for e in EMOTION_ORDER]
            if not set(buckets) <= set(rows.index):
                continue
            ax.errorbar(
                np.arange(2) + offset,
                rows.loc[buckets, "mean_change"],
                yerr=rows.loc[buckets, "se"],
                color=style.REGISTER_COLORS[formality],
                marker="o",
                capsize=3,
            )
        ax.axhline(0, color="k", lw=0.6)

    grid.map_dataframe(draw)
    for ax in grid.axes.flat:
        ax.set_xticks([0, 1], EMOTION_ORDER)
        ax.set_xlim(-0.4, 1.4)
        _scientific(ax.yaxis)
    grid.set_axis_labels("readout bucket: affect", _wrapped(f"change of {readout}"))
    _facet_titles(grid, labels)
    handles = {f"{f} bucket": Line2D([], [], color=style.REGISTER_COLORS[f], marker="o") for f in REGISTER_ORDER}
    grid.add_legend(legend_data=handles, title="register")
    grid.figure.suptitle(f"clamp level {level:+g} (× max activation)")
    grid.tight_layout()
    return grid.figure


@_themed
def effect_forest(
    table: pd.DataFrame, labels: Mapping[str, Mapping[int, str]] | None = None, alpha: float = 0.05
) -> plt.Figure:
    """Mean per-unit interaction contrast with its bootstrap 95% CI for every condition, grouped by what was
    clamped and coloured by kind (interaction path, random control, linear path); filled: Holm p < ``alpha``."""
    table = table.reset_index(drop=True)
    prefix = table["condition"].str.rsplit(" @ ", n=1).str[0]
    order = {p: i for i, p in enumerate(dict.fromkeys(prefix))}
    table = table.assign(_group=prefix.map(order)).sort_values("_group", kind="stable").reset_index(drop=True)
    kinds = table["condition"].map(clamp_kind)
    fig, ax = plt.subplots(figsize=(9, 0.28 * len(table) + 1.6))
    y = np.arange(len(table))
    significant = table["holm_p"] < alpha
    for kind in CLAMP_KIND_LEGEND:
        rows = kinds == kind
        if not rows.any():
            continue
        color = style.KIND_COLORS[kind]
        t = table[rows]
        xerr = _error_bars(t["interaction_contrast"], t["ci_low"], t["ci_high"])
        ax.errorbar(t["interaction_contrast"], y[rows], xerr=xerr, fmt="none", ecolor=color, alpha=0.7, capsize=2)
        filled = rows & significant
        ax.scatter(table.loc[filled, "interaction_contrast"], y[filled], color=color, s=22, zorder=3)
        hollow = rows & ~significant
        ax.scatter(
            table.loc[hollow, "interaction_contrast"], y[hollow], facecolor="white", edgecolor=color, s=22, zorder=3
        )
    for boundary in np.flatnonzero(np.diff(table["_group"].to_numpy())):  # a rule between clamp groups
        ax.axhline(boundary + 0.5, color="0.85", lw=0.8)
    ax.axvline(0, color="k", lw=0.7)
    ax.set_yticks(y, [_clamp_name(c, labels) for c in table["condition"]], fontsize=7.5)
    ax.set_ylim(len(table) - 0.5, -0.5)
    ax.grid(axis="y", visible=False)
    _scientific(ax.xaxis)
    handles = [
        Line2D([], [], color=style.KIND_COLORS[k], marker="o", ls="", label=CLAMP_KIND_LEGEND[k])
        for k in CLAMP_KIND_LEGEND
        if (kinds == k).any()
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), title="clamped")
    ax.set_title(f"non-additive effects (filled: Holm p < {alpha:g}; hollow: not)")
    # labelpad: the long label goes below the axis's ×10ⁿ, which sits under the right end of the ticks
    ax.set_xlabel("interaction contrast (FE − FN) − (CE − CN) of the change, 95% CI", labelpad=16)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
# sweeps


@_themed
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


@_themed
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
