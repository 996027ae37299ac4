"""What every figure shares: the theme applied before each figure function draws (:func:`themed`), :func:`save`
(PNG and SVG), number formats, and how features and tokens are named on an axis.

Each figure function (one module per part of the study: :mod:`~featint_utils.plots.training`,
:mod:`~featint_utils.plots.residual_fits`, :mod:`~featint_utils.plots.stimulus_effects`,
:mod:`~featint_utils.plots.clamps`, :mod:`~featint_utils.plots.comparisons`) takes tidy data and returns a
matplotlib Figure. The look (theme, sizes, colours) is :mod:`featint_utils.plots.style`'s, applied here, never in
a notebook. Features are named with :func:`featint_utils.dictionary.feature_labels.feature_label` where a
notebook passes ``labels`` (feature id -> label); without them a feature is its bare id.
"""

from __future__ import annotations

import functools
import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

import matplotlib.pyplot as plt
import matplotlib.ticker as mticker
import numpy as np

from ..io import atomic_path
from . import style

style.apply()

FORMATS = ("png", "svg")
"""What :func:`save` writes: a PNG to look at and a resolution-free SVG for papers and slides."""


def themed(draw):
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
    from ..data.models import EMBEDDED  # here: models pulls in torch, which drawing does not need

    if name == EMBEDDED:
        return "all-MiniLM-L6-v2 (embedded)"
    path = Path(name).expanduser()
    if name.startswith(("/", ".", "~")) or path.is_dir():
        return path.name or name
    return name


def as_text(value) -> str:
    """A string matplotlib shows literally: a token like "$" must not start mathtext."""
    return str(value).replace("$", r"\$")


def feature_name(feature, labels: Mapping[int, str] | None) -> str:
    return as_text((labels or {}).get(int(feature), f"#{int(feature)}"))


def plain_log_axis(axis) -> None:
    """Log-axis ticks as plain numbers (0.05, 0.1, 0.2), the 2s and 5s labelled too when the axis spans less
    than two decades; not 6×10⁻¹."""
    low, high = sorted(abs(v) for v in axis.get_view_interval())
    few_decades = low > 0 and np.log10(high / low) < 2
    axis.set_major_formatter(mticker.FuncFormatter(lambda v, _: f"{v:g}"))

    def minor(value, _):
        mantissa = round(value / 10 ** math.floor(math.log10(value))) if value > 0 else 0
        return f"{value:g}" if few_decades and mantissa in (2, 5) else ""

    axis.set_minor_formatter(mticker.FuncFormatter(minor))


def wrapped(label: str, width: int = 28) -> str:
    """A long axis label over lines, so that it fits beside one small panel."""
    return as_text(textwrap.fill(label, width))


def scientific(axis) -> None:
    """Small numbers (1e-5) with one ×10⁻⁵ at the end of the axis, not a bare "1e-5"."""
    formatter = mticker.ScalarFormatter(useMathText=True)
    formatter.set_powerlimits((-3, 4))
    axis.set_major_formatter(formatter)


def n_cols(n_panels: int, max_cols: int) -> int:
    """Columns of a grid of small multiples: near-square, a row of three for three, never above ``max_cols``."""
    return max(1, min(max_cols, n_panels, max(3, math.ceil(math.sqrt(n_panels)))))


EMOTION_ORDER = ["neutral", "emotional"]
REGISTER_ORDER = ["formal", "casual"]


@themed
def error_bars(point, low, high) -> list:
    """Error-bar lengths below and above ``point``; a percentile interval need not contain its point estimate
    (a skewed bootstrap), and a bar cannot be negative, so the side it misses is drawn as zero."""
    return [np.clip(point - low, 0, None), np.clip(high - point, 0, None)]
