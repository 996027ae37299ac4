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
    for ax, score, label in (
        (axes[0], "emotion_score", "VADER |compound|"),
        (axes[1], "formality_score", "formality score (z)"),
    ):
        for emotion, group in scored.groupby("emotion"):
            stats = group.groupby("formality")[score].agg(["mean", "std", "count"]).loc[["casual", "formal"]]
            half = 1.96 * stats["std"] / np.sqrt(stats["count"])
            ax.errorbar(
                stats.index, stats["mean"], yerr=half, marker="o", capsize=4, label=emotion, color=colors[emotion]
            )
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


def training_curves(history: pd.DataFrame, title: str = "") -> plt.Figure:
    """Training FVU (per batch) and held-out FVU, L0 and dead fraction against training tokens."""
    fig, axes = plt.subplots(1, 3, figsize=(15, 3.8))
    ax = axes[0]
    ax.plot(history["tokens"], history["fvu"], lw=0.8, alpha=0.6, label="train batch")
    held_out = history.dropna(subset=["val_fvu"]) if "val_fvu" in history else history.iloc[:0]
    ax.plot(held_out["tokens"], held_out["val_fvu"], "o-", ms=3, label="held-out")
    ax.set(xlabel="training tokens", ylabel="FVU", yscale="log", title="fraction of variance unexplained")
    ax.legend(fontsize=8)
    axes[1].plot(history["tokens"], history["l0"], color="#55a868")
    axes[1].set(xlabel="training tokens", ylabel="L0", title="active latents per token")
    axes[2].plot(history["tokens"], 100 * history["dead_fraction"], color="#c44e52")
    axes[2].set(xlabel="training tokens", ylabel="% of latents", title="dead latents (AuxK revives them)")
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def feature_density(firing_frequency: np.ndarray, title: str = "") -> plt.Figure:
    """Histogram of log10 firing frequency; dead latents counted apart; 1% and 10% density lines."""
    fig, ax = plt.subplots(figsize=(7, 3.8))
    alive = firing_frequency[firing_frequency > 0]
    ax.hist(np.log10(alive), bins=60, color="#4c72b0")
    for level in (0.01, 0.1):
        ax.axvline(np.log10(level), color="#c44e52", ls="--", lw=1)
        ax.text(np.log10(level), ax.get_ylim()[1] * 0.95, f" {level:.0%}", color="#c44e52", va="top", fontsize=8)
    dead = int((firing_frequency == 0).sum())
    ax.set(
        xlabel="log10 firing frequency (held-out tokens)",
        ylabel="latents",
        title=title or f"feature density ({dead} of {len(firing_frequency)} latents never fire)",
    )
    fig.tight_layout()
    return fig


def fit_curves(histories: dict[str, pd.DataFrame], title: str = "") -> plt.Figure:
    """Fitting-set and tune-set FVU per epoch of residual models (dots: the kept, best epochs)."""
    fig, ax = plt.subplots(figsize=(8, 4))
    for i, (name, history) in enumerate(histories.items()):
        color = f"C{i}"
        ax.plot(history["epoch"], history["fit_fvu"], color=color, lw=0.9, alpha=0.5)
        ax.plot(history["epoch"], history["tune_fvu"], color=color, lw=1.6, label=name)
        best = history.loc[history["tune_fvu"].idxmin()]
        ax.plot(best["epoch"], best["tune_fvu"], "o", color=color)
    ax.set(xlabel="epoch", ylabel="residual FVU", title=title or "fit (thin) and tune (thick) FVU; dot: kept epoch")
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def baseline_ladder(table: pd.DataFrame, labels: dict[str, str], failed: set[str] = frozenset()) -> plt.Figure:
    """Held-out residual FVU and total-activation FVU of every model (bars: mean over seeds; dots: seeds).
    Models in ``failed`` (no gain over predicting zero) are drawn hatched."""
    order = [m for m in labels if m in set(table["model"])]
    fig, axes = plt.subplots(1, 2, figsize=(13, 0.45 * len(order) + 1.6), sharey=True)
    for ax, column, title in (
        (axes[0], "residual_fvu", "SAE residual: FVU of each model's prediction"),
        (axes[1], "total_fvu", "activation: FVU of SAE + the model"),
    ):
        means = table.groupby("model")[column].mean().reindex(order)
        y = np.arange(len(order))
        bars = ax.barh(y, means, color=["#8c8c8c" if m == "zero" else "#4c72b0" for m in order], alpha=0.8)
        for bar, model in zip(bars, order):
            if model in failed:
                bar.set_hatch("//")
        for i, model in enumerate(order):
            seeds = table.loc[table["model"] == model, column]
            ax.plot(seeds, np.full(len(seeds), i), "k.", ms=4)
            ax.text(means[model], i, f" {means[model]:.4f}", va="center", fontsize=8)
        ax.set(title=title, xlabel="FVU (held-out documents; lower is better)")
        ax.set_xlim(0, means.max() * 1.18)
    axes[0].set_yticks(np.arange(len(order)), [labels[m] for m in order])
    axes[0].invert_yaxis()
    if failed:
        axes[0].text(0, -0.9, "hatched: does not beat predicting zero", fontsize=8, va="bottom")
    fig.tight_layout()
    return fig


SHARE_LABELS = {
    "over_linear": "NFM over linear",
    "over_additive": "NFM over additive",
    "pair_ridge": "explicit pairs over linear",
    "mlp_over_linear": "MLP over linear",
    "additive_over_linear": "additive over linear\n(single-feature non-linearity)",
}


def interaction_forest(shares: pd.DataFrame, control: pd.DataFrame, limit: float | None = None) -> plt.Figure:
    """Each share (held-out incremental R-squared) with its bootstrap interval, the null control's below, and
    the detection limit measured by planted interactions."""
    rows = [(SHARE_LABELS[name], shares.loc[name], "#55a868") for name in SHARE_LABELS if name in shares.index]
    rows += [(f"null control: {SHARE_LABELS[name]}", control.loc[name], "#c44e52") for name in control.index]
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.4))
    for i, (_, stats, color) in enumerate(rows):
        ax.plot([stats["ci_low"], stats["ci_high"]], [i, i], color=color, lw=2.5)
        ax.plot(stats["mean"], i, "o", color=color)
        ax.text(stats["ci_high"], i, f"  {stats['mean']:+.4f}", va="center", fontsize=8)
    ax.axvline(0, color="k", lw=0.8)
    if limit is not None:
        ax.axvline(limit, color="#8172b2", ls="--", lw=1, label=f"NFM's detection limit in this run ({limit:.4f})")
        ax.legend(fontsize=8, loc="lower right")
    ax.set_yticks(range(len(rows)), [r[0] for r in rows], fontsize=9)
    ax.invert_yaxis()
    ax.margins(x=0.25)
    ax.set(
        xlabel="Δ R² of the SAE residual on held-out documents (point: mean over seeds; bar: 95% interval)",
        title="what each term adds over its first-order fit",
    )
    fig.tight_layout()
    return fig


def power_curve(power: pd.DataFrame, limits: dict[str, float | None] | None = None) -> plt.Figure:
    """What a planted interaction adds to each estimate (the nested NFM's and the explicit-pairs ridge's, over
    their un-injected estimates) against the planted share (the oracle's, which knows the planted pairs), with
    each one's detection limit; the diagonal is full recovery. Hollow markers: not detected at that size."""
    fig, ax = plt.subplots(figsize=(6.5, 5))
    x = power["oracle"]
    for column, label, color in (
        ("over_linear", "nested NFM", "#4c72b0"),
        ("pair_ridge", "explicit-pairs ridge", "#dd8452"),
    ):
        y = power[f"{column}_excess"]
        ax.plot(x, y, "-", color=color, label=label)
        detected = power[f"{column}_detected"].astype(bool)
        ax.plot(x[detected], y[detected], "o", color=color)
        ax.plot(x[~detected], y[~detected], "o", color=color, mfc="white")
    top = float(max(x.max(), power[["over_linear_excess", "pair_ridge_excess"]].to_numpy().max())) * 1.1
    ax.plot([0, top], [0, top], color="k", lw=0.8, ls=":", label="recovers the planted share")
    ax.axhline(0, color="k", lw=0.5)
    for column, color in (("over_linear", "#4c72b0"), ("pair_ridge", "#dd8452")):
        limit = (limits or {}).get(column)
        if limit is not None:
            ax.axvline(limit, color=color, ls="--", lw=1, label=f"detection limit {limit:.4f}")
    ax.set(
        xlabel="planted share (oracle fit with the planted pairs, held-out Δ R²)",
        ylabel="added to the estimate (held-out Δ R²)",
        title="power: planted interactions in this run's residual\n(hollow: not detected at that size)",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def top_feature_bars(attribution: pd.DataFrame, n: int = 15) -> plt.Figure:
    """The features with the largest variance share of the first-order and of the interaction part."""
    parts = [p for p in ("linear", "interaction") if f"{p}_share" in attribution]
    fig, axes = plt.subplots(1, len(parts), figsize=(6 * len(parts), 0.28 * n + 1.5))
    axes = np.atleast_1d(axes)
    for ax, part in zip(axes, parts):
        top = attribution.nlargest(n, f"{part}_share")
        ax.barh(np.arange(len(top)), top[f"{part}_share"], color="#4c72b0" if part == "linear" else "#55a868")
        ax.set_yticks(np.arange(len(top)), [f"#{f}" for f in top["feature"]])
        ax.invert_yaxis()
        ax.set(
            xlabel="share of the part's held-out variance",
            title=f"top features of the {'first-order' if part == 'linear' else 'interaction'} part",
        )
    fig.tight_layout()
    return fig


def interaction_matrix(strength: pd.DataFrame) -> plt.Figure:
    """Heat map of ``<v_i, v_j>`` between the factor embeddings of the top interaction features."""
    fig, ax = plt.subplots(figsize=(7, 6))
    values = strength.to_numpy().copy()
    np.fill_diagonal(values, np.nan)  # ||v_i||^2 is no pairwise interaction (pooling is strictly i != j)
    limit = np.nanmax(np.abs(values)) or 1.0
    image = ax.imshow(values, cmap="RdBu_r", vmin=-limit, vmax=limit)
    ax.set_xticks(range(len(strength)), [f"#{c}" for c in strength.columns], rotation=90, fontsize=7)
    ax.set_yticks(range(len(strength)), [f"#{c}" for c in strength.index], fontsize=7)
    fig.colorbar(image, ax=ax, label="<v_i, v_j>")
    ax.set_title("pairwise interaction strength between the top interaction features")
    fig.tight_layout()
    return fig


def feature_panel(per_text: np.ndarray, condition_means: dict[str, float], title: str = "") -> plt.Figure:
    """One feature on the stimulus set: histogram of its per-text activation and the 2x2 condition means."""
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.4))
    axes[0].hist(per_text, bins=40, color="#4c72b0")
    silent = float((per_text == 0).mean())
    axes[0].set(xlabel="mean activation over a text's tokens", ylabel="texts", title=f"per text ({silent:.0%} silent)")
    for formality, color in (("formal", "#4c72b0"), ("casual", "#dd8452")):
        means = [condition_means[f"{formality}_{emotion}"] for emotion in ("neutral", "emotional")]
        axes[1].plot([0, 1], means, "o-", color=color, label=formality)
    axes[1].set_xticks([0, 1], ["neutral", "emotional"])
    axes[1].set(ylabel="mean activation", title="condition means (parallel lines: no interaction)")
    axes[1].legend(fontsize=8)
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    return fig


def effect_volcano(effects: pd.DataFrame, effect: str = "interaction", q: float = 0.05, title: str = "") -> plt.Figure:
    """Signed effect against significance for every feature of a family; BH-significant ones highlighted."""
    fig, ax = plt.subplots(figsize=(7, 4))
    p = effects[f"{effect}_p"].clip(lower=1e-300)
    x = effects[f"{effect}_effect"]
    significant = effects[f"{effect}_q"] < q
    ax.scatter(x[~significant], -np.log10(p[~significant]), s=5, color="#8c8c8c", alpha=0.5)
    ax.scatter(
        x[significant],
        -np.log10(p[significant]),
        s=8,
        color="#c44e52",
        label=f"q < {q} ({int(significant.sum())} of {len(effects)})",
    )
    label = {"interaction": "(FE − FN) − (CE − CN)", "formality": "formal − casual", "emotion": "emotional − neutral"}
    ax.set(
        xlabel=f"{effect} effect on the mean activation: {label[effect]}",
        ylabel="-log10 p",
        title=title or f"{effect}: every feature",
    )
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


BUCKET_STYLE = {
    "formal_emotional": ("#c44e52", "-"),
    "formal_neutral": ("#4c72b0", "-"),
    "casual_emotional": ("#c44e52", "--"),
    "casual_neutral": ("#4c72b0", "--"),
}


def dose_response(tidy: pd.DataFrame, readout: str) -> plt.Figure:
    """Mean change of each bucket's readout (± SE over units) against clamp level, one panel per group."""
    groups = list(dict.fromkeys(tidy["group"]))
    n_cols = min(4, len(groups))
    n_rows = -(-len(groups) // n_cols)
    fig, axes = plt.subplots(n_rows, n_cols, figsize=(3.6 * n_cols, 3.4 * n_rows), sharey=True, squeeze=False)
    for ax in axes.flat[len(groups) :]:
        ax.set_visible(False)
    for ax, group in zip(axes.flat, groups):
        rows = tidy[tidy["group"] == group]
        for bucket, (color, style) in BUCKET_STYLE.items():
            b = rows[rows["bucket"] == bucket].sort_values("level")
            ax.errorbar(
                b["level"],
                b["mean_change"],
                yerr=b["se"],
                color=color,
                ls=style,
                marker="o",
                ms=3,
                capsize=2,
                label=bucket.replace("_", " "),
            )
        ax.axhline(0, color="k", lw=0.7)
        ax.set(title=group, xlabel="clamp level (× max activation)")
    for row in axes:
        row[0].set_ylabel(f"change of {readout}")
    axes.flat[len(groups) - 1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def interaction_2x2(tidy: pd.DataFrame, level: float, readout: str) -> plt.Figure:
    """At one clamp level, each group's change per bucket as a 2x2 interaction plot."""
    groups = list(dict.fromkeys(tidy["group"]))
    fig, axes = plt.subplots(1, len(groups), figsize=(3.2 * len(groups), 3.2), sharey=True, squeeze=False)
    for ax, group in zip(axes[0], groups):
        rows = tidy[(tidy["group"] == group) & np.isclose(tidy["level"], level)].set_index("bucket")
        for formality, color in (("formal", "#4c72b0"), ("casual", "#dd8452")):
            means = [rows.loc[f"{formality}_{e}", "mean_change"] for e in ("neutral", "emotional")]
            errors = [rows.loc[f"{formality}_{e}", "se"] for e in ("neutral", "emotional")]
            ax.errorbar([0, 1], means, yerr=errors, color=color, marker="o", capsize=3, label=f"{formality} bucket")
        ax.set_xticks([0, 1], ["neutral", "emotional"])
        ax.set(title=f"{group}, level {level:+g}")
    axes[0][0].set_ylabel(f"change of {readout}")
    axes[0][-1].legend(fontsize=7)
    fig.tight_layout()
    return fig


def effect_forest(table: pd.DataFrame) -> plt.Figure:
    """Mean per-unit interaction contrast with its bootstrap 95% CI for every condition (Holm p < .05 in red)."""
    fig, ax = plt.subplots(figsize=(8, 0.28 * len(table) + 1.2))
    y = np.arange(len(table))
    colors = np.where(table["holm_p"] < 0.05, "#c44e52", "#4c72b0")
    ax.errorbar(
        table["interaction_contrast"],
        y,
        xerr=[table["interaction_contrast"] - table["ci_low"], table["ci_high"] - table["interaction_contrast"]],
        fmt="none",
        ecolor="#8c8c8c",
        capsize=2,
    )
    ax.scatter(table["interaction_contrast"], y, c=colors, zorder=3, s=14)
    ax.axvline(0, color="k", lw=0.7)
    ax.set_yticks(y, table["condition"], fontsize=7)
    ax.invert_yaxis()
    ax.set(xlabel="interaction contrast (FE − FN) − (CE − CN) of the change, 95% CI", title="non-additive effects")
    fig.tight_layout()
    return fig


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
        color = f"C{i}"
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
    axes[0].legend(fontsize=8)
    axes[1].set_ylim(0, 1.05)
    fig.tight_layout()
    return fig
