"""Figures: every figure function draws what the notebooks pass it, with the properties issue #15 asked for
(readable grids, no wasted panels, readable token axes, legends, named features, PNG + SVG at a set dpi)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

from featint_utils.dictionary import feature_labels  # noqa: E402
from featint_utils.dictionary.feature_labels import feature_label  # noqa: E402
from featint_utils.plots import (  # noqa: E402
    clamps,
    comparisons,
    figure,
    residual_fits,
    stimulus_effects,
    style,
    training,
)
from featint_utils.residual import interaction  # noqa: E402

FIGURE_MODULES = (training, residual_fits, stimulus_effects, clamps, comparisons)

RNG = np.random.default_rng(0)
CONDITIONS = ["formal_emotional", "formal_neutral", "casual_emotional", "casual_neutral"]


@pytest.fixture(autouse=True)
def close_figures():
    yield
    plt.close("all")


# --- synthetic inputs shaped like the notebooks' ------------------------------------------------------------


def topk_history(steps: int = 60, k: int = 32, tokens_per_step: int = 16_384) -> pd.DataFrame:
    """A TopK SAE's history (sae_training.history_frame): L0 is k at every step, no latent dies."""
    tokens = tokens_per_step * np.arange(1, steps + 1)
    val = np.full(steps, np.nan)
    val[9::10] = np.linspace(0.4, 0.2, len(val[9::10]))
    return pd.DataFrame(
        {
            "fvu": np.geomspace(0.6, 0.04, steps),
            "aux_loss": 0.0,
            "l0": float(k),
            "dead_fraction": 0.0,
            "lr": 1e-3,
            "step": np.arange(1, steps + 1),
            "tokens": tokens,
            "val_fvu": val,
        }
    )


def clamp_tidy(features=(837, 518, 725), linear=3447, levels=(-1.0, -0.5, 0.5, 1.0)) -> pd.DataFrame:
    """clamping.tidy_changes' shape: one row per (condition, bucket), groups named as clamping.clamp_plan does."""
    groups = []
    for f in features:
        groups += [
            (f"secondary {f}", f"secondary {f} @ {{:+g}}"),
            (f"random (size of {f})", f"random, matched to {f} @ {{:+g}}"),
        ]
    groups.append((f"linear-path {linear}", f"linear {linear} @ {{:+g}}"))
    rows = [
        {
            "name": name.format(level),
            "group": group,
            "level": level,
            "bucket": bucket,
            "mean_change": RNG.normal() * 1e-5 * level,
            "se": 1e-6,
        }
        for group, name in groups
        for level in levels
        for bucket in CONDITIONS
    ]
    return pd.DataFrame(rows)


def clamp_statistics(tidy: pd.DataFrame) -> pd.DataFrame:
    """clamping.clamp_statistics' shape (the columns the forest reads), in plan order, some not significant."""
    names = list(dict.fromkeys(tidy["name"]))
    contrast = RNG.normal(size=len(names)) * 1e-5
    return pd.DataFrame(
        {
            "condition": names,
            "interaction_contrast": contrast,
            "ci_low": contrast - 2e-6,
            "ci_high": contrast + 2e-6,
            "holm_p": np.where(np.arange(len(names)) % 3 == 0, 0.5, 0.001),
        }
    )


def feature_effects(n: int = 300) -> pd.DataFrame:
    p = RNG.uniform(size=n) ** 3
    return pd.DataFrame(
        {
            "feature": np.arange(n),
            "interaction_effect": RNG.normal(size=n) * 0.01,
            "interaction_p": p,
            "interaction_q": np.minimum(1, p * 20),
            "interaction_eta2": RNG.uniform(size=n),
        }
    )


def stimuli_scores(n_items: int = 12) -> pd.DataFrame:
    rows = []
    for item in range(n_items):
        for condition in CONDITIONS:
            formality, emotion = condition.split("_")
            rows.append(
                {
                    "item_id": f"item_{item}",
                    "condition": condition,
                    "formality": "formal" if formality == "formal" else "casual",
                    "emotion": emotion,
                    "emotion_score": (0.7 if emotion == "emotional" else 0.0) + RNG.normal() * 0.02,
                    "formality_score": (0.4 if formality == "formal" else -0.4) + RNG.normal() * 0.05,
                }
            )
    return pd.DataFrame(rows)


def manipulation_effects() -> pd.DataFrame:
    rows = [
        ("emotion_score", "emotion (emotional - other)", True, 11.6),
        ("emotion_score", "formality (formal - other)", False, 0.04),
        ("formality_score", "emotion (emotional - other)", False, 0.05),
        ("formality_score", "formality (formal - other)", True, 2.4),
    ]
    return pd.DataFrame(
        [
            {"score": s, "factor": f, "intended": i, "cohens_d": d, "ci_low": d - 0.3, "ci_high": d + 0.3}
            for s, f, i, d in rows
        ]
    )


def figure_calls():
    """(name, zero-argument call) for every figure function, with inputs shaped like the notebooks' calls."""

    norms = pd.DataFrame(
        {
            "norm": RNG.normal(11, 1, 2000),
            "position": np.tile(np.arange(40), 50),
            "text_index": np.repeat(np.arange(50), 40),
        }
    )
    histories = {
        name: pd.DataFrame(
            {"epoch": np.arange(6), "fit_fvu": np.linspace(1, 0.9, 6), "tune_fvu": np.linspace(1, 0.95, 6)}
        )
        for name in ("additive", "nfm", "nfm_additive", "mlp")
    }
    ladder = pd.DataFrame(
        [
            {"target": "residual", "model": m, "seed": s, "residual_fvu": 0.96 + 0.01 * s, "total_fvu": 0.19}
            for m in interaction.MODELS
            if m != "oracle"
            for s in (0, 1)
        ]
    )
    stats = lambda mean: {"mean": mean, "ci_low": mean - 1e-4, "ci_high": mean + 1e-4}  # noqa: E731
    shares = pd.DataFrame({name: stats(2e-4) for name in residual_fits.SHARE_LABELS}).T
    control = pd.DataFrame({"over_linear": stats(0.0), "pair_ridge": stats(0.0)}).T
    power = pd.DataFrame(
        {
            "nominal_share": [0.001, 0.01, 0.05],
            "oracle": [0.001, 0.01, 0.05],
            "over_linear_excess": [0.0005, 0.008, 0.045],
            "over_linear_detected": [False, True, True],
            "pair_ridge_excess": [0.0008, 0.009, 0.048],
            "pair_ridge_detected": [False, True, True],
        }
    )
    attribution = pd.DataFrame(
        {
            "feature": np.arange(200),
            "firing_frequency": RNG.uniform(size=200),
            "linear_share": RNG.uniform(size=200),
            "interaction_share": RNG.uniform(size=200),
        }
    )
    top = list(range(10))
    strength = pd.DataFrame(RNG.normal(size=(10, 10)), index=top, columns=top)
    probes = pd.DataFrame(
        {
            "factor": ["formality", "emotion"],
            "accuracy_mean": [0.93, 0.96],
            "accuracy_sd": [0.01, 0.01],
            "chance": [0.5, 0.5],
        }
    )
    tidy = clamp_tidy()
    sweep = pd.DataFrame(
        [
            {
                "layer": layer,
                "sae_k": k,
                "interaction_share": 1e-4,
                "interaction_share_low": 0.0,
                "interaction_share_high": 2e-4,
                "detection_limit": 1e-3,
                "absorbed_fraction": 0.5,
                "sae_fvu": 0.2,
            }
            for layer in (2, 3, 4)
            for k in (16, 32)
        ]
    )
    return [
        ("activation_norms", lambda: training.activation_norms(norms, title="model · hidden_states[3] · train split")),
        ("training_curves", lambda: training.training_curves(topk_history(), title="TopK SAE: 4096 latents, k=32")),
        ("feature_density", lambda: training.feature_density(np.r_[np.zeros(5), RNG.uniform(1e-4, 0.2, 500)])),
        ("fit_curves", lambda: residual_fits.fit_curves(histories, title="seed 0")),
        ("baseline_ladder", lambda: residual_fits.baseline_ladder(ladder, interaction.MODELS, {"mlp"})),
        ("interaction_forest", lambda: residual_fits.interaction_forest(shares, control, 1e-3)),
        ("power_curve", lambda: residual_fits.power_curve(power, {"over_linear": 0.01, "pair_ridge": None})),
        ("top_feature_bars", lambda: residual_fits.top_feature_bars(attribution, 20)),
        ("interaction_matrix", lambda: residual_fits.interaction_matrix(strength)),
        (
            "manipulation_checks",
            lambda: stimulus_effects.manipulation_checks(stimuli_scores(), manipulation_effects(), probes),
        ),
        (
            "feature_panel",
            lambda: stimulus_effects.feature_panel(
                RNG.uniform(size=48), dict(zip(CONDITIONS, [0.1, 0.2, 0.3, 0.2])), title="secondary feature 3"
            ),
        ),
        (
            "effect_volcano",
            lambda: stimulus_effects.effect_volcano(feature_effects(), "interaction", 0.05, title="secondary features"),
        ),
        ("interaction_split", lambda: stimulus_effects.interaction_split(interaction_splits(), 0.05)),
        ("dose_response", lambda: clamps.dose_response(tidy, "cosine to the condition centroid")),
        ("effect_forest", lambda: clamps.effect_forest(clamp_statistics(tidy))),
        ("interaction_2x2", lambda: clamps.interaction_2x2(tidy, -1.0, "cosine to the condition centroid")),
        ("sweep_comparison", lambda: comparisons.sweep_comparison(sweep, ["layer", "sae_k"])),
        ("flag_rates", lambda: comparisons.flag_rates(flag_rates())),
    ]


def interaction_splits() -> dict[str, pd.DataFrame]:
    def table(n, layer_scale):
        q = RNG.uniform(size=n)
        return pd.DataFrame(
            {
                "feature": np.arange(n),
                "layer_made_effect": RNG.normal(scale=layer_scale, size=n),
                "instrument_made_effect": RNG.normal(size=n),
                "layer_made_q": q,
            }
        )

    return {"primary": table(64, 0.1), "primary_pre": table(64, 1.0), "secondary": table(32, 0.0)}


def test_interaction_split_colours_the_layer_made_features_and_counts_them_per_family():
    tables = interaction_splits()
    fig = stimulus_effects.interaction_split(tables, 0.05)
    assert len(fig.axes) == 3
    for ax, (family, table) in zip(fig.axes, tables.items()):
        flagged = int((table["layer_made_q"] < 0.05).sum())
        assert ax.get_title() == f"{family}: {flagged} of {len(table)} layer-made"
        assert [len(c.get_offsets()) for c in ax.collections] == [len(table) - flagged, flagged]


def flag_rates() -> pd.DataFrame:
    return pd.DataFrame(
        [
            {"noise": noise, "size": size, "test": test, "share": share, "models": 5}
            for noise in (0.0, 1.0)
            for size in (0.0, 0.05, 0.2)
            for test, share in (("calibrated", float(size > 0)), ("instrument-made", 1.0))
        ]
    )


def test_flag_rates_draw_a_panel_per_noise_level_and_a_line_per_test_side_by_side():
    fig = comparisons.flag_rates(flag_rates())
    assert len(fig.axes) == 2
    lines = {line.get_label(): line for line in fig.axes[1].lines}
    assert {"calibrated", "instrument-made"} <= set(lines)
    # two tests at the same share are drawn side by side, not on top of each other
    assert (lines["calibrated"].get_xdata() < lines["instrument-made"].get_xdata()).all()
    np.testing.assert_array_equal(lines["calibrated"].get_ydata(), [0.0, 1.0, 1.0])


CALLS = figure_calls()


@pytest.mark.parametrize("call", [c for _, c in CALLS], ids=[name for name, _ in CALLS])
def test_every_figure_function_draws_the_notebooks_inputs(call):
    fig = call()
    assert isinstance(fig, plt.Figure)
    fig.canvas.draw()  # layout and tick labels are made at draw time: errors show here
    assert any(ax.has_data() or ax.images or ax.collections for ax in fig.axes)


def test_every_public_figure_function_is_exercised():
    drawn = {name for name, _ in CALLS}
    helpers = {"clamp_kind"}  # figure.py holds the shared helpers (save, format_count, model_title)
    public = {
        name
        for module in FIGURE_MODULES
        for name, value in vars(module).items()
        if callable(value) and not name.startswith("_") and getattr(value, "__module__", "") == module.__name__
    }
    assert public - helpers == drawn


# --- layout ---------------------------------------------------------------------------------------------------


def _columns(fig) -> int:
    return len({round(ax.get_position().x0, 3) for ax in fig.axes if ax.get_visible() and ax.has_data()})


@pytest.mark.parametrize("n_features", [1, 3, 7])
def test_interaction_2x2_is_a_wrapped_grid_of_readable_size(n_features):
    tidy = clamp_tidy(features=tuple(range(100, 100 + n_features)))
    n_groups = 2 * n_features + 1
    fig = clamps.interaction_2x2(tidy, -1.0, "cosine to the condition centroid")
    panels = [ax for ax in fig.axes if ax.has_data()]
    assert len(panels) == n_groups
    assert _columns(fig) <= 4
    width, height = fig.get_size_inches() * style.DPI
    assert width <= 2600 and height <= 2600
    assert width / height <= 4  # the old 7 panels in one row were 2449 x 342 (7:1)
    panel_width = min(ax.get_window_extent().width for ax in panels) * style.DPI / fig.dpi
    assert panel_width >= 250  # each panel big enough to read


def test_dose_response_wraps_into_rows_too():
    fig = clamps.dose_response(clamp_tidy(features=tuple(range(7))), "readout")
    assert _columns(fig) <= 4
    assert len({round(ax.get_position().y0, 3) for ax in fig.axes if ax.has_data()}) >= 3


# --- training curves ----------------------------------------------------------------------------------------


def _panel_titles(fig) -> list[str]:
    return [ax.get_title() for ax in fig.axes]


def test_topk_training_curves_have_no_constant_panels_but_state_the_constants():
    fig = training.training_curves(topk_history(k=32))
    assert len(fig.axes) == 1
    assert not any("active latents" in t or "dead" in t for t in _panel_titles(fig))
    assert "L0 = 32" in fig._suptitle.get_text() and "no latent died" in fig._suptitle.get_text()


def test_changing_l0_and_dead_latents_get_their_panels_with_a_zero_based_dead_axis():
    history = topk_history()
    history["l0"] = np.linspace(200, 40, len(history))
    history.loc[40:, "dead_fraction"] = 0.001
    fig = training.training_curves(history)
    titles = _panel_titles(fig)
    assert len(fig.axes) == 3 and any("active latents" in t for t in titles) and any("dead" in t for t in titles)
    dead_ax = next(ax for ax in fig.axes if "dead" in ax.get_title())
    assert dead_ax.get_ylim()[0] == 0 and dead_ax.get_ylim()[1] < 0.2  # not a ±0.04% axis around 0


def test_token_axes_read_250k_and_1M_not_1e6():
    fig = training.training_curves(topk_history(steps=62, tokens_per_step=16_384))  # up to ~1M tokens
    fig.canvas.draw()
    ax = fig.axes[0]
    labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
    assert any(label.endswith("k") for label in labels) and "1M" in labels
    assert not any("e" in label for label in labels)
    assert ax.xaxis.get_offset_text().get_text() == ""


def test_format_count():
    assert [figure.format_count(v) for v in (0, 950, 12_500, 250_000, 1e6, 1.5e6, 2e9)] == [
        "0",
        "950",
        "12.5k",
        "250k",
        "1M",
        "1.5M",
        "2B",
    ]


# --- colours, legends, scales -------------------------------------------------------------------------------


def _points(ax) -> list:
    return [c for c in ax.collections if isinstance(c, matplotlib.collections.PathCollection)]


def test_effect_forest_has_one_legend_entry_per_kind_and_kind_colours():
    tidy = clamp_tidy()
    fig = clamps.effect_forest(clamp_statistics(tidy))
    legend = fig.axes[0].get_legend()
    texts = [t.get_text() for t in legend.get_texts()]
    assert texts == [clamps.CLAMP_KIND_LEGEND[k] for k in ("interaction", "control", "linear")]
    point_colours = {tuple(np.round(c.get_edgecolor()[0][:3], 3)) for c in _points(fig.axes[0]) if len(c.get_offsets())}
    assert len(point_colours) == 3  # not every point red
    without_linear = clamp_statistics(tidy).query("not condition.str.startswith('linear')")
    fig = clamps.effect_forest(without_linear)
    assert len(fig.axes[0].get_legend().get_texts()) == 2
    # 06's layer-made table leads with the layer's own row ("no clamp"), drawn in a colour of its own
    layer_made = pd.concat([clamp_statistics(tidy).iloc[:1].assign(condition="no clamp"), clamp_statistics(tidy)])
    fig = clamps.effect_forest(layer_made, what="the part the layer made")
    assert [t.get_text() for t in fig.axes[0].get_legend().get_texts()] == list(clamps.CLAMP_KIND_LEGEND.values())
    assert fig.axes[0].get_yticklabels()[0].get_text() == "no clamp"
    assert "the part the layer made" in fig.axes[0].get_xlabel()


def test_effect_forest_marks_significance_by_fill():
    table = clamp_statistics(clamp_tidy(features=(1,)))
    fig = clamps.effect_forest(table)
    faces = [c.get_facecolor() for c in _points(fig.axes[0]) if len(c.get_offsets())]
    white = [f for f in faces if np.allclose(f[0][:3], 1.0)]
    assert white and len(white) < len(faces)  # some hollow (not significant), some filled


def test_clamp_kinds_follow_the_plan_names():
    assert clamps.clamp_kind("secondary 837 @ -1") == "interaction"
    assert clamps.clamp_kind("random (size of 837)") == "control"
    assert clamps.clamp_kind("random, matched to 837 @ +1") == "control"
    assert clamps.clamp_kind("linear-path 3447") == "linear" == clamps.clamp_kind("linear 3447 @ -0.5")


def test_cross_effects_get_their_own_scale():
    probes = pd.DataFrame(
        {
            "factor": ["formality", "emotion"],
            "accuracy_mean": [0.9, 0.9],
            "accuracy_sd": [0.0, 0.0],
            "chance": [0.5, 0.5],
        }
    )
    fig = stimulus_effects.manipulation_checks(stimuli_scores(), manipulation_effects(), probes)
    own = next(ax for ax in fig.axes if "own score" in ax.get_title())
    cross = next(ax for ax in fig.axes if "cross effects" in ax.get_title())
    assert own.get_xlim()[1] > 11.9  # the emotion → emotion d of 11.6 and its CI fit
    assert cross.get_xlim()[1] - cross.get_xlim()[0] <= 2  # d ≈ 0.05 readable, not squashed on a 0-12 axis


def test_one_palette_and_kind_colours_everywhere():
    assert style.KIND_COLORS.keys() == {"linear", "interaction", "control", "layer"}
    assert len(set(style.KIND_COLORS.values())) == 4
    assert all(c in style.PALETTE for c in style.KIND_COLORS.values())
    fig = residual_fits.top_feature_bars(figure_calls_attribution(), 5)
    colours = [matplotlib.colors.to_hex(ax.patches[0].get_facecolor()) for ax in fig.axes]
    assert colours == [style.KIND_COLORS["linear"], style.KIND_COLORS["interaction"]]


def figure_calls_attribution() -> pd.DataFrame:
    return pd.DataFrame(
        {"feature": np.arange(30), "linear_share": RNG.uniform(size=30), "interaction_share": RNG.uniform(size=30)}
    )


def test_every_residual_model_has_a_kind():

    assert set(interaction.MODELS) <= set(residual_fits.MODEL_KINDS)


def test_the_theme_is_applied_by_the_figure_functions_not_the_notebook():
    matplotlib.rcParams["axes.titlesize"] = 30  # a notebook (or another library) changed it
    training.feature_density(RNG.uniform(1e-3, 0.1, 50))
    assert matplotlib.rcParams["axes.titlesize"] == style.RC["axes.titlesize"]
    cycle = [matplotlib.colors.to_hex(c["color"]) for c in matplotlib.rcParams["axes.prop_cycle"]]
    assert cycle[:3] == style.PALETTE[:3]


def test_seaborn_draws_the_heatmap_with_a_blank_diagonal():
    strength = pd.DataFrame(RNG.normal(size=(6, 6)), index=range(6), columns=range(6))
    fig = residual_fits.interaction_matrix(strength)
    mesh = next(c for c in fig.axes[0].collections if isinstance(c, matplotlib.collections.QuadMesh))
    values = np.ma.masked_invalid(np.ma.asarray(mesh.get_array())).reshape(6, 6)
    assert np.ma.getmaskarray(values).diagonal().all() and not np.ma.getmaskarray(values)[0, 1]


def test_feature_density_axis_is_log_with_percent_labels():
    fig = training.feature_density(np.r_[np.zeros(3), RNG.uniform(1e-4, 0.2, 500)])
    fig.canvas.draw()
    ax = fig.axes[0]
    assert ax.get_xscale() == "log"
    assert any(t.get_text().endswith("%") for t in ax.get_xticklabels())
    assert "3 of 503" in ax.get_title()


def test_model_title_names_the_embedded_model_not_the_profile():
    assert "MiniLM" in figure.model_title("embedded")
    assert figure.model_title("EleutherAI/pythia-70m") == "EleutherAI/pythia-70m"
    assert figure.model_title("/models/openllama-3b/") == "openllama-3b"


# --- feature labels -----------------------------------------------------------------------------------------


def test_feature_label_examples():
    assert feature_label(3447, ["however", "but", "although", "yet"]) == '#3447 "however/but/although"'
    assert feature_label(3447, ["however", "But", "but", "however", "yet"]) == '#3447 "however/But/yet"'
    assert feature_label(7, ["the", "a"], n=1) == '#7 "the"'
    assert feature_label(7, []) == "#7"
    assert feature_label(7, ["  ", "\n"]) == "#7"
    assert feature_label(12, ["exhaust", "##ing"]) == '#12 "exhaust/-ing"'
    long = feature_label(1, ["internationalisation"])
    assert long.startswith('#1 "internation') and long.endswith('…"') and len(long) <= 20


def test_labels_from_top_activation_tables():
    examples = pd.DataFrame(
        {
            "feature": [5, 5, 5, 9, 5],
            "activation": [3.0, 2.0, 1.0, 4.0, 2.5],
            "text_id": ["a", "b", "c", "d", "e"],
            "context": [
                "flight was «delayed» again",
                "it was «late»",
                "x «delayed» y",
                "« is «,» which",
                "we «waited»",
            ],
        }
    )
    assert feature_labels.top_tokens(examples) == {5: ["delayed", "waited", "late", "delayed"], 9: [","]}
    assert feature_labels.labels_from_examples(examples) == {5: '#5 "delayed/waited/late"', 9: '#9 ","'}


def test_labels_for_asks_top_activations_for_raw_rows(monkeypatch):
    from featint_utils.dictionary import features

    seen = {}

    def fake_top_activations(encode, store, ids, tokenizer, split, n, normalize):
        seen.update(ids=ids, split=split, n=n, normalize=normalize)
        return pd.DataFrame({"feature": [4], "activation": [1.0], "text_id": ["t"], "context": ["a «b» c"]})

    monkeypatch.setattr(features, "top_activations", fake_top_activations)
    labels = feature_labels.labels_for(None, None, np.array([4, 8]), tokenizer=None)
    assert labels == {4: '#4 "b"'}  # 8 never fired: absent, so figures show its bare id
    assert seen == {"ids": [4, 8], "split": "val", "n": 10, "normalize": False}
    assert feature_labels.labels_for(None, None, [], None) == {}


def test_figures_name_features_by_their_labels():
    attribution = figure_calls_attribution()
    top_linear = int(attribution.nlargest(1, "linear_share")["feature"].iloc[0])
    labels = {top_linear: feature_label(top_linear, ["however", "but", "although"])}
    fig = residual_fits.top_feature_bars(attribution, 5, labels)
    assert f'#{top_linear} "however/but/although"' in [t.get_text() for t in fig.axes[0].get_yticklabels()]

    effects = feature_effects()
    named = effects.nsmallest(3, "interaction_p")["feature"].tolist()
    fig = stimulus_effects.effect_volcano(effects, labels={f: feature_label(f, [f"tok{f}"]) for f in named})
    annotations = [t.get_text() for t in fig.axes[0].texts]
    assert sorted(annotations) == sorted(f'#{f} "tok{f}"' for f in named)

    tidy = clamp_tidy(features=(837,), linear=3447)
    clamp_labels = {"secondary": {837: '#837 "a/b"'}, "primary": {3447: '#3447 "the"'}}
    fig = clamps.interaction_2x2(tidy, 1.0, "readout", clamp_labels)
    titles = {ax.get_title() for ax in fig.axes if ax.has_data()}
    assert titles == {'secondary #837 "a/b"', "random (size of 837)", 'linear-path #3447 "the"'}
    fig = clamps.effect_forest(clamp_statistics(tidy), clamp_labels)
    ticks = [t.get_text() for t in fig.axes[0].get_yticklabels()]
    assert 'secondary #837 "a/b" @ -1' in ticks and 'linear #3447 "the" @ +1' in ticks


def test_a_dollar_token_is_shown_literally_not_as_mathtext():
    attribution = figure_calls_attribution()
    top = attribution.nlargest(1, "linear_share")["feature"].iloc[0]
    fig = residual_fits.top_feature_bars(attribution, 3, {int(top): feature_label(int(top), ["$", "^$"])})
    fig.canvas.draw()  # unescaped, '"$/^$"' is parsed as mathtext and fails to draw


# --- saving -------------------------------------------------------------------------------------------------


def test_save_writes_png_at_the_set_dpi_and_svg_beside_it_atomically(tmp_path):
    fig = training.training_curves(topk_history())
    written = figure.save(fig, tmp_path, "01_training_curves")
    png, svg = tmp_path / "figures" / "01_training_curves.png", tmp_path / "figures" / "01_training_curves.svg"
    assert written == [png, svg]
    assert png.stat().st_size > 10_000 and svg.stat().st_size > 10_000
    with Image.open(png) as image:
        assert image.format == "PNG"
        assert image.info["dpi"] == pytest.approx((style.DPI, style.DPI), abs=0.5)
        assert image.size[0] == pytest.approx(fig.get_size_inches()[0] * style.DPI, rel=0.15)
    assert svg.read_text().lstrip().startswith("<?xml") and "<svg" in svg.read_text()[:2000]
    assert sorted(p.name for p in (tmp_path / "figures").iterdir()) == [png.name, svg.name]  # no temp files left


def test_saving_again_gives_the_same_svg(tmp_path):
    fig = training.feature_density(np.linspace(1e-3, 0.1, 50))
    figure.save(fig, tmp_path / "a", "density")
    figure.save(fig, tmp_path / "b", "density")
    assert (tmp_path / "a/figures/density.svg").read_bytes() == (tmp_path / "b/figures/density.svg").read_bytes()
