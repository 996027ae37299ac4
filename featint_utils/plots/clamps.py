"""Figures of stage 06: dose-response of each clamp, its 2x2 interaction plot, and the effect forest of the
clamps beside their random and linear-path controls.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib.lines import Line2D

from . import style
from .figure import EMOTION_ORDER, REGISTER_ORDER, as_text, error_bars, n_cols, scientific, themed, wrapped

# 06 · clamping

CLAMP_KIND_LEGEND = {
    "layer": "no clamp: the layer's own",
    "interaction": "secondary feature (interaction path)",
    "control": "random edit of the same size (control)",
    "linear": "primary feature on the linear path",
}
CLAMP_FAMILY = {"interaction": "secondary", "linear": "primary"}  # whose labels name a clamped feature


def clamp_kind(name: str) -> str:
    """``interaction``, ``control`` or ``linear``: what a clamp group or condition (``clamping.clamp_plan``'s
    ``group``/``name``: "secondary 837", "random (size of 837)", "linear-path 3447") edits; ``layer`` for the
    layer-made table's "no clamp" row."""
    if name == "no clamp":
        return "layer"
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
    return as_text(name[: match.start()] + label + name[match.end() :] if label else name)


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


@themed
def dose_response(
    tidy: pd.DataFrame, readout: str, labels: Mapping[str, Mapping[int, str]] | None = None, max_cols: int = 4
) -> plt.Figure:
    """Mean change of each bucket's readout (± SE over units) against clamp level, one small panel per clamp
    group (title coloured by kind: interaction path, random control, linear path), wrapped into rows."""
    groups = list(dict.fromkeys(tidy["group"]))
    grid = sns.FacetGrid(
        tidy, col="group", col_order=groups, col_wrap=n_cols(len(groups), max_cols), height=3.0, aspect=1.2
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
    grid.set_axis_labels("clamp level (× max activation)", wrapped(f"change of {readout}"))
    _facet_titles(grid, labels)
    ticks = sorted({0.0, *tidy["level"].astype(float)})
    for ax in grid.axes.flat:
        ax.set_xticks(ticks, [f"{t:g}" for t in ticks])
        scientific(ax.yaxis)
    grid.add_legend(legend_data={h.get_label(): h for h in _register_legend()}, title="readout bucket")
    grid.tight_layout()  # the grid's own: it keeps the room add_legend made on the right
    return grid.figure


@themed
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
        at_level, col="group", col_order=groups, col_wrap=n_cols(len(groups), max_cols), height=2.9, aspect=1.1
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
        scientific(ax.yaxis)
    grid.set_axis_labels("readout bucket: affect", wrapped(f"change of {readout}"))
    _facet_titles(grid, labels)
    handles = {f"{f} bucket": Line2D([], [], color=style.REGISTER_COLORS[f], marker="o") for f in REGISTER_ORDER}
    grid.add_legend(legend_data=handles, title="register")
    grid.figure.suptitle(f"clamp level {level:+g} (× max activation)")
    grid.tight_layout()
    return grid.figure


@themed
def effect_forest(
    table: pd.DataFrame,
    labels: Mapping[str, Mapping[int, str]] | None = None,
    alpha: float = 0.05,
    what: str = "of the change",
) -> plt.Figure:
    """Mean per-unit interaction contrast with its bootstrap 95% CI for every condition, grouped by what was
    clamped and coloured by kind (interaction path, random control, linear path); filled: Holm p < ``alpha``.
    ``what`` says which contrast it is (06's layer-made table gives the part the layer made, and a "no clamp"
    row: the layer's own)."""
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
        xerr = error_bars(t["interaction_contrast"], t["ci_low"], t["ci_high"])
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
    scientific(ax.xaxis)
    handles = [
        Line2D([], [], color=style.KIND_COLORS[k], marker="o", ls="", label=CLAMP_KIND_LEGEND[k])
        for k in CLAMP_KIND_LEGEND
        if (kinds == k).any()
    ]
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.01, 1), title="clamped")
    ax.set_title(f"non-additive effects (filled: Holm p < {alpha:g}; hollow: not)")
    # labelpad: the long label goes below the axis's ×10ⁿ, which sits under the right end of the ticks
    ax.set_xlabel(f"interaction contrast (FE − FN) − (CE − CN) {what}, 95% CI", labelpad=16)
    fig.tight_layout()
    return fig


# ---------------------------------------------------------------------------------------------------------------
