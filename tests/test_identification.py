import numpy as np
import pandas as pd
import pytest
import scipy.stats
import torch

from featint_utils import stats
from featint_utils.data.corpus import CONDITIONS
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.integration import identification
from featint_utils.workbench import widgets


def planted_cells(n_items=200, n_null=300, bump=1.0, seed=0):
    """[items, 4, features]: item effects + noise; feature 0 also rises in the formal-emotional cell only."""
    rng = np.random.default_rng(seed)
    cells = rng.normal(size=(n_items, 1, n_null + 1)) + rng.normal(size=(n_items, 4, n_null + 1))
    cells[:, CONDITIONS.index("formal_emotional"), 0] += bump
    return cells


def test_block_anova_matches_statsmodels_repeated_measures_anova():
    """Items whose factor effects differ from item to item (as written variants do): every effect is tested
    against its own item interaction, as ``AnovaRM`` does."""
    rng = np.random.default_rng(1)
    cells = rng.normal(size=(30, 4, 3)) + np.array([0.5, 0.0, 0.2, 0.0])[None, :, None]
    cells += rng.normal(size=(30, 1, 3)) * stats.CONTRASTS["formality"][None, :, None]  # item x formality
    ours = stats.block_anova(cells)
    for f in range(3):
        reference = stats.block_anova_statsmodels(cells[:, :, f])
        for effect, term in (("formality", "formality"), ("emotion", "emotion"), ("interaction", "formality:emotion")):
            assert ours[f"{effect}_F"][f] == pytest.approx(reference.loc[term, "F Value"], rel=1e-9)
            assert ours[f"{effect}_p"][f] == pytest.approx(reference.loc[term, "Pr > F"], rel=1e-9)
            contrast = cells[:, :, f] @ stats.CONTRASTS[effect]
            assert ours[f"{effect}_F"][f] == pytest.approx(scipy.stats.ttest_1samp(contrast, 0).statistic ** 2)


def test_an_interaction_hidden_by_item_differences_in_the_main_effects_is_found():
    """The pooled error term this ANOVA had put the items' spread in formality and emotion into the
    interaction's denominator: here it gave p = 0.51 where each effect's own error gives p = 2e-6."""
    rng = np.random.default_rng(0)
    n = 60
    formality, emotion = rng.normal(1, 1.0, n), rng.normal(1, 1.0, n)
    interaction, base = 0.15 + rng.normal(0, 0.2, n), rng.normal(0, 1, n)
    cells = np.stack([base + formality + emotion + interaction, base + formality, base + emotion, base], 1)
    table = stats.block_anova(cells)
    assert table["interaction_p"][0] < 1e-5


def test_constant_features_are_not_significant():
    cells = np.zeros((10, 4, 2))
    cells[:, :, 1] = 3.0
    table = stats.block_anova(cells)
    assert (table[[f"{e}_p" for e in stats.EFFECTS]].to_numpy() == 1.0).all()


def test_planted_formal_emotional_feature_is_found_and_replicates_on_held_out_items():
    cells = planted_cells()
    effects = identification.feature_effects(cells)
    planted = effects.iloc[0]
    assert planted["interaction_q"] < 0.05 and planted["interaction_effect"] > 0
    assert identification.rank(effects, "interaction", 5)["feature"].iloc[0] == 0
    replication = identification.split_half_replication(cells, "interaction", n_select=5, seed=3)
    assert 0 in set(replication["feature"])
    assert bool(replication.set_index("feature").loc[0, "replicated"])


def test_each_planted_effect_is_found_on_its_own_effect_only_and_item_effects_are_blocked_out():
    """Features 0, 1, 2 carry a pure formality, emotion and interaction pattern of +-1 over the four cells
    (the rows of ``stats.CONTRASTS``); features 3..22 are nulls. Known answers: formality and emotion effects
    of 2 (mean of +1 cells minus mean of -1 cells), an interaction effect of 4 ((FE - FN) - (CE - CN)), and
    partial eta-squared ~ 0.94 on the planted effect (SS = n * 4^2 / 4 against its item interaction, the spread
    of the per-item contrast: (n - 1) * 4 * 0.5^2 / 4)."""
    rng = np.random.default_rng(0)
    n_items, n_features = 120, 23
    cells = rng.normal(size=(n_items, 4, n_features)) * 0.5
    for f, effect in enumerate(stats.EFFECTS):
        cells[:, :, f] += stats.CONTRASTS[effect]
    effects = identification.feature_effects(cells)
    assert list(effects["feature"]) == list(range(n_features))
    for f, effect in enumerate(stats.EFFECTS):
        planted = effects.iloc[f]
        assert planted[f"{effect}_effect"] == pytest.approx(4.0 if effect == "interaction" else 2.0, abs=0.3)
        assert 0.9 < planted[f"{effect}_eta2"] < 0.98 and planted[f"{effect}_q"] < 1e-10, effect
        others = [e for e in stats.EFFECTS if e != effect]
        assert all(planted[f"{e}_eta2"] < 0.05 for e in others), (effect, planted)
        assert effects[f"{effect}_eta2"].drop(f).max() < 0.05  # no other feature shows this effect
        assert list(identification.rank(effects, effect, 5)["feature"]) == [f]  # no null survives BH at 0.05
        ranked = identification.rank(effects, effect, 4, q=1.0)  # every feature kept: ordered by eta-squared
        assert ranked["feature"].iloc[0] == f and (np.diff(ranked[f"{effect}_eta2"]) <= 0).all()
        p, q = effects[f"{effect}_p"].to_numpy(), effects[f"{effect}_q"].to_numpy()
        assert (q >= p).all() and (np.diff(q[np.argsort(p)]) >= 0).all()  # BH keeps the order of p
    for c, condition in enumerate(CONDITIONS):
        np.testing.assert_allclose(effects[f"mean_{condition}"], cells[:, c].mean(0))
    # the item is a block: a per-item offset (here huge) changes no effect, F, p or eta-squared
    shifted = identification.feature_effects(cells + rng.normal(size=(n_items, 1, n_features)) * 100)
    for effect in stats.EFFECTS:
        for column in ("effect", "F", "p", "eta2"):
            np.testing.assert_allclose(
                shifted[f"{effect}_{column}"],
                effects[f"{effect}_{column}"],
                rtol=1e-6,
                atol=1e-12,
                err_msg=f"{effect}_{column}",
            )


def test_null_features_hold_the_nominal_false_discovery_rate():
    proportions, null_rejections = [], []
    for seed in range(20):
        rng = np.random.default_rng(seed)
        cells = rng.normal(size=(60, 1, 1000)) + rng.normal(size=(60, 4, 1000))
        cells[:, 0, :50] += 1.0  # 50 true interaction (and main) effects, 950 nulls
        effects = identification.feature_effects(cells)
        found = effects["interaction_q"].to_numpy() < 0.1
        proportions.append(found[50:].sum() / max(found.sum(), 1))
        null_rejections.append((effects["interaction_p"].to_numpy()[50:] < 0.05).mean())
    assert np.mean(proportions) < 0.1  # BH at 0.1 controls it at 0.1 * 950 / 1000
    assert 0.04 < np.mean(null_rejections) < 0.06  # the uncorrected test is calibrated


def test_multiple_comparison_corrections_on_a_hand_computed_example():
    # sorted p 0.01, 0.03, 0.04, 0.2 (n = 4). BH: p * n / rank = 0.04, 0.06, 0.0533, 0.2, then the running minimum
    # from the top. Holm: p * (n - rank + 1) = 0.04, 0.09, 0.08, 0.2, then the running maximum from the bottom.
    p = np.array([0.01, np.nan, 0.04, 0.03, 0.2])  # the NaN is no test: n stays 4 and it stays NaN
    np.testing.assert_allclose(stats.benjamini_hochberg(p), [0.04, np.nan, 0.16 / 3, 0.16 / 3, 0.2], rtol=1e-12)
    np.testing.assert_allclose(stats.holm(p), [0.04, np.nan, 0.09, 0.09, 0.2], rtol=1e-12)
    np.testing.assert_allclose(stats.benjamini_hochberg([0.7, 0.8]), [0.8, 0.8], rtol=1e-12)
    np.testing.assert_array_equal(stats.holm([0.7, 0.8]), [1.0, 1.0])  # 0.7 * 2 = 1.4, capped at 1
    for adjust in (stats.benjamini_hochberg, stats.holm):
        assert np.isnan(adjust(np.array([np.nan, np.nan]))).all()
        assert adjust(np.array([])).shape == (0,)


def test_sign_flip_test_is_calibrated_and_finds_an_effect():
    rng = np.random.default_rng(0)
    null = stats.sign_flip_test(rng.normal(size=(40, 400)), n_permutations=999)
    assert 0.03 < (null < 0.05).mean() < 0.08
    assert stats.sign_flip_test(rng.normal(0.8, 1, size=(40, 1)), n_permutations=999)[0] < 0.01


def test_text_activations_pool_real_tokens_only_on_unequal_length_batches(embedded):
    sae = TopKSAE(SAEConfig(d_in=embedded.d_model, n_latents=64, k=4), seed=0)
    with torch.no_grad():
        sae.b_enc += 2.0  # every latent positive before TopK: always k active, so means are informative

    def encode(x):
        return sae.encode(x)

    texts = [
        "Short one.",
        "A considerably longer sentence, with several more words and punctuation in it!",
        "Mid length text here.",
    ]
    pooled = identification.text_activations(embedded, 2, texts, {"sae": (encode, 64)}, batch_size=3)["sae"]
    for i, text in enumerate(texts):  # each text alone, no padding; drop [CLS] and [SEP] by hand
        ids = embedded.tokenizer(text, return_tensors="pt")
        hidden = embedded.model(**ids, output_hidden_states=True).hidden_states[2][0, 1:-1]
        values, indices = sae.encode(hidden)
        dense = torch.zeros(len(hidden), 64).scatter_(1, indices, values)
        np.testing.assert_allclose(pooled["mean"][i], dense.mean(0).detach().numpy(), atol=2e-4)
        np.testing.assert_allclose(pooled["max"][i], dense.max(0).values.detach().numpy(), atol=2e-4)
    tokens = identification.token_activations(embedded, 2, texts[0], encode, int(np.argmax(pooled["max"][0])))
    assert len(tokens) == len(embedded.tokenizer(texts[0], add_special_tokens=False)["input_ids"])
    assert tokens["activation"].max() == pytest.approx(pooled["max"][0].max(), abs=2e-4)


def _family(drivers=None):
    stimuli = pd.DataFrame(
        {"text": [f"text {i}" for i in range(8)], "condition": list(CONDITIONS) * 2, "item_id": ["a"] * 4 + ["b"] * 4}
    )
    per_text = np.random.default_rng(0).uniform(size=(8, 3))
    cells, _ = identification.cells(per_text, stimuli)
    return widgets.FeatureFamily(
        "secondary",
        per_text,
        stimuli,
        identification.feature_effects(cells),
        lambda text, feature: pd.DataFrame({"token": text.split(), "activation": [0.1, 0.9]}),
        drivers,
    )


def test_feature_panel_and_browser_build_without_a_front_end(monkeypatch):
    import IPython.display

    shown = []  # what the browser displays: no front end is attached, so record it instead
    monkeypatch.setattr(IPython.display, "display", lambda *objects, **_: shown.extend(objects))
    drivers = lambda f: (
        pd.DataFrame({"feature_i": [1], "feature_j": [2], "contribution": [0.5]}),  # noqa: E731
        pd.DataFrame({"primary_feature": [1], "contribution": [0.25]}),
    )
    family = _family(drivers)
    text, fig = widgets.panel(family, 1)
    assert "secondary feature 1" in text and "rgba(220, 80, 60, 1.00)" in text and "Driving pairs" in text
    assert len(fig.axes) == 2
    with pytest.raises(ValueError, match="feature 7 does not exist"):
        widgets.panel(family, 7)
    browser = widgets.browser({"secondary": family}, {"secondary": [2, 0]})
    family_choice, feature_choice = browser.children[0].children
    assert feature_choice.value == "2" and list(feature_choice.options) == ["2", "0"]
    # the first suggestion's panel, drawn once
    assert [type(o).__name__ for o in shown] == ["HTML", "Figure"] and shown[0].data == widgets.panel(family, 2)[0]
    shown.clear()
    feature_choice.value = "0"  # re-renders through the observer, with no front end attached
    assert [type(o).__name__ for o in shown] == ["HTML", "Figure"] and shown[0].data == widgets.panel(family, 0)[0]
    row = family.effects.set_index("feature").loc[0]
    assert "<h4>secondary feature 0</h4>" in shown[0].data
    assert f"interaction: η²={row['interaction_eta2']:.3f}, q={row['interaction_q']:.2g}" in shown[0].data
    top = int(np.argmax(family.per_text[:, 0]))  # the panel lists the feature's strongest text first
    assert f"<li><b>{family.per_text[top, 0]:.3f}</b> <i>{family.stimuli['condition'][top]}</i>" in shown[0].data
    shown.clear()
    feature_choice.value = "99"  # an unknown feature is reported, not raised
    assert len(shown) == 1 and "secondary feature 99 does not exist (0..2)" in shown[0].data
    shown.clear()
    feature_choice.value = "x"  # not an index: nothing is rendered
    assert shown == []


def test_a_contrast_that_is_zero_but_for_float32_rounding_is_not_an_effect():
    """An exactly additive response computed in float32 (the FE cell rounds its own sum) has per-item
    interaction contrasts of pure rounding, consistent in sign; tested against their own spread they would be
    'significant'. Below stats.RESOLUTION of the response's largest value they are zero; a contrast of 1e-3 of
    it is not."""
    rng = np.random.default_rng(3)
    n = 200
    base, formality, emotion = (rng.uniform(1, 2, (n, 50)).astype(np.float32) for _ in range(3))
    fe = (base + formality) + emotion  # float32 sums, rounded in another order than the contrast undoes them
    cells = np.stack([fe, base + formality, base + emotion, base], 1).astype(np.float64)
    contrast = np.einsum("c,icf->if", [1, -1, -1, 1], cells)
    assert np.abs(contrast).max() > 0  # rounding is there
    t = scipy.stats.ttest_1samp(contrast, 0.0)
    assert (t.pvalue < 0.05).any()  # and a t-test of it alone finds "effects"
    table = stats.block_anova(cells)
    assert (table["interaction_p"] == 1.0).all() and (table["interaction_eta2"] == 0.0).all()
    cells[:, 0] += 1e-3 * np.abs(cells).max(axis=(0, 1))
    assert (stats.block_anova(cells)["interaction_p"] < 1e-10).all()
