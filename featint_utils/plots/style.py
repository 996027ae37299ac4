"""One look for every figure: a seaborn theme, font sizes, a colour-blind-safe palette, and fixed colours for
the things the workbook compares (linear vs interaction vs control; formal vs casual; emotional vs neutral).

:func:`apply` sets it; :mod:`featint_utils.plots.figure` applies it on import and again in every figure function, so a
notebook never styles a figure itself and no later ``rcParams`` change makes two figures of a run differ.
"""

from __future__ import annotations

import matplotlib as mpl
import seaborn as sns

PALETTE = sns.color_palette("colorblind").as_hex()
"""seaborn's colour-blind-safe palette (Okabe-Ito-like): blue, orange, green, vermilion, purple, brown, pink,
grey, yellow, light blue."""

KIND_COLORS = {
    "linear": PALETTE[0],  # blue
    "interaction": PALETTE[1],  # orange
    "control": PALETTE[7],  # grey: a control is a reference, not a finding
    "layer": PALETTE[3],  # the layer's own non-additive effect (06's layer-made table), what clamps are read against
}
"""The colour of each part of the decomposition, the same in every figure: the first-order (linear) part, the
pairwise (interaction) part, and controls (null control, random edits, predicting zero)."""

REGISTER_COLORS = {"formal": PALETTE[4], "casual": PALETTE[2]}  # purple, green: apart from the kind colours
"""Colour of each level of the formality factor (the hue of every 2x2 plot)."""

EMOTION_LINESTYLES = {"emotional": "-", "neutral": "--"}
"""Line style of each level of the emotion factor where colour already shows the register."""

ACCENT = PALETTE[3]  # vermilion: thresholds and reference lines that must stand out
MUTED = "#8c8c8c"  # points and bars that are context, not the finding

DPI = 170
"""Resolution of saved PNGs (the SVG beside each is resolution-free)."""

RC = {
    "figure.dpi": 100,  # on screen; saving uses DPI
    "axes.titlesize": 11,
    "axes.labelsize": 10,
    "xtick.labelsize": 9,
    "ytick.labelsize": 9,
    "legend.fontsize": 8.5,
    "legend.title_fontsize": 9,
    "figure.titlesize": 12,
    "axes.titlelocation": "center",
    "savefig.bbox": "tight",
    "svg.fonttype": "path",  # text as outlines: the SVG looks the same without the fonts installed
    "svg.hashsalt": "featint",  # fixed element ids: a rerun writes the same SVG (default: random per save)
}


def apply() -> None:
    """Set the workbook's theme globally (idempotent and cheap)."""
    sns.set_theme(context="notebook", style="whitegrid", palette=PALETTE, rc=RC)
    mpl.rcParams.update(RC)  # set_theme's context scales some of these; the sizes above are the ones meant
