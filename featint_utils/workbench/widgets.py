"""A feature browser: choose a feature, see where it fires on the stimulus set and what drives it.

:class:`FeatureFamily` gathers what one family of features (primary or secondary) needs; :func:`panel`
renders one feature as HTML plus a figure (top texts with token highlighting, activation histogram, 2x2
condition means, and for secondary features the driving primary features and pairs). :func:`browser`
wraps panels in ipywidgets for JupyterLab; :func:`show_static` shows the same panels for a list of
features, for headless runs and rendered reports.
"""

from __future__ import annotations

import html
from collections.abc import Callable
from dataclasses import dataclass

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from ..data.corpus import CONDITIONS
from ..plots import stimulus_effects


@dataclass
class FeatureFamily:
    """Everything a panel shows for one family of features."""

    name: str
    per_text: np.ndarray
    """[n_texts, n_features] mean activation over each stimulus text's real tokens."""
    stimuli: pd.DataFrame
    """The stimulus rows, in ``per_text`` order."""
    effects: pd.DataFrame
    """:func:`featint_utils.integration.identification.feature_effects` of the family."""
    token_activations: Callable[[str, int], pd.DataFrame]
    """(text, feature) -> one row per real token: ``token``, ``activation``."""
    drivers: Callable[[int], tuple[pd.DataFrame, pd.DataFrame]] | None = None
    """feature -> (pairs, primary features) driving it; secondary features only."""


def highlight(tokens: pd.DataFrame, peak: float) -> str:
    """HTML of a text's tokens, each shaded by its activation relative to ``peak``."""
    spans = []
    for token, activation in zip(tokens["token"], tokens["activation"]):
        alpha = 0.0 if peak <= 0 else min(1.0, max(0.0, activation / peak))
        text = html.escape(token.replace("##", "") if token.startswith("##") else " " + token)
        spans.append(f'<span title="{activation:.3f}" style="background: rgba(220, 80, 60, {alpha:.2f})">{text}</span>')
    return "".join(spans)


def panel(family: FeatureFamily, feature: int, n_texts: int = 5) -> tuple[str, plt.Figure]:
    """HTML (statistics, top texts highlighted, drivers) and a figure for one feature."""
    if not 0 <= feature < family.per_text.shape[1]:
        raise ValueError(f"{family.name} feature {feature} does not exist (0..{family.per_text.shape[1] - 1})")
    row = family.effects.set_index("feature").loc[feature]
    values = family.per_text[:, feature]
    top = np.argsort(-values)[:n_texts]
    token_tables = [family.token_activations(family.stimuli["text"].iloc[i], feature) for i in top]
    peak = max([float(t["activation"].max()) for t in token_tables] + [0.0])
    parts = [
        f"<h4>{html.escape(family.name)} feature {feature}</h4>",
        "<p>"
        + "; ".join(
            f"{effect}: η²={row[f'{effect}_eta2']:.3f}, q={row[f'{effect}_q']:.2g}"
            for effect in ("formality", "emotion", "interaction")
        )
        + "</p>",
        "<ol>",
    ]
    for i, tokens in zip(top, token_tables):
        condition = family.stimuli["condition"].iloc[i]
        parts.append(f"<li><b>{values[i]:.3f}</b> <i>{condition}</i>: {highlight(tokens, peak)}</li>")
    parts.append("</ol>")
    if family.drivers is not None:
        pairs, features = family.drivers(feature)
        parts.append("<p>Driving primary features (mean contribution to the pre-activation):</p>")
        parts.append(features.head(8).to_html(index=False, float_format="{:.4f}".format))
        parts.append("<p>Driving pairs:</p>")
        parts.append(pairs.head(8).to_html(index=False, float_format="{:.4f}".format))
    means = {c: float(row[f"mean_{c}"]) for c in CONDITIONS}
    fig = stimulus_effects.feature_panel(values, means, title=f"{family.name} feature {feature}")
    return "\n".join(parts), fig


def show_static(family: FeatureFamily, features: list[int], n_texts: int = 5) -> None:
    """Display the panels of ``features`` one after another (headless runs and reports)."""
    from IPython.display import HTML, display

    for feature in features:
        text, fig = panel(family, int(feature), n_texts)
        display(HTML(text))
        display(fig)
        plt.close(fig)


def browser(families: dict[str, FeatureFamily], suggested: dict[str, list[int]], n_texts: int = 5):
    """An ipywidgets browser: pick a family and a feature (suggested ones listed first, any index allowed)."""
    import ipywidgets as w
    from IPython.display import HTML, display

    family_choice = w.Dropdown(options=list(families), description="family")
    feature_choice = w.Combobox(placeholder="feature index", description="feature", ensure_option=False)
    output = w.Output()

    def refresh_options(*_):
        feature_choice.options = [str(f) for f in suggested.get(family_choice.value, [])]
        feature_choice.value = feature_choice.options[0] if feature_choice.options else ""

    def render(*_):
        output.clear_output(wait=True)
        if not feature_choice.value.strip().isdigit():
            return
        with output:
            try:
                text, fig = panel(families[family_choice.value], int(feature_choice.value), n_texts)
            except ValueError as err:
                display(HTML(f"<p style='color: #c44e52'>{html.escape(str(err))}</p>"))
                return
            display(HTML(text))
            display(fig)
            plt.close(fig)

    family_choice.observe(refresh_options, names="value")
    feature_choice.observe(render, names="value")
    refresh_options()  # its first feature's value change draws the first panel (once)
    return w.VBox([w.HBox([family_choice, feature_choice]), output])
