"""The additive counterfactual: on token-aligned minimal pairs, a layer that is additive in the two factors
gives every instrument a layer-made interaction of exactly zero, however non-additive the instrument."""

import dataclasses

import numpy as np
import pandas as pd
import pytest

from featint_utils.data import models, planted_model
from featint_utils.data.corpus import CONDITIONS, load_stimuli
from featint_utils.data.planted_model import PlantedSpec
from featint_utils.integration import clamp_split, clamping, counterfactual
from featint_utils.integration.counterfactual import NotMinimalPairs
from featint_utils.stats import RESOLUTION
from featint_utils.workbench import planted_truth
from tests.test_clamping import decomposition

NAME = "planted:seed=3,integration=0.5,n_items=24"

# three minimal pairs for MiniLM: each slot word is one WordPiece token
TEMPLATES = [
    ("I {F} the tickets and felt {E} about the trip.", ("purchased", "bought"), ("thrilled", "fine")),
    ("She was {E} when they asked her to {F} the team.", ("assist", "help"), ("furious", "informed")),
    ("We {F} the parcel today and were {E} to see it.", ("received", "got"), ("delighted", "able")),
]


def written_stimuli(templates=TEMPLATES) -> pd.DataFrame:
    rows = []
    for n, (template, formality_words, emotion_words) in enumerate(templates):
        for formality, f in zip(("formal", "casual"), formality_words):
            for emotion, e in zip(("emotional", "neutral"), emotion_words):
                text = template.format(F=f, E=e)
                rows.append(dict(item_id=f"mp_{n}", formality=formality, emotion=emotion, text=text))
    frame = pd.DataFrame(rows)
    frame["condition"] = frame["formality"] + "_" + frame["emotion"]
    return frame


def families(dec):
    n = dec.primary.cfg.n_latents
    return {
        "primary": (dec.primary_code, n),
        "primary_pre": (dec.primary_pre_activation, n),
        "secondary": (dec.secondary_code, dec.secondary.cfg.n_latents),
    }


@pytest.mark.parametrize("integration", [0.0, 0.5])
def test_the_layer_made_part_is_zero_exactly_where_the_planted_layer_is_additive(integration):
    """With no integration every instrument's layer-made part is exactly 0 on every item, while the TopK code
    and the secondary code still have an interaction contrast of their own (made by the instrument); with one,
    the pre-activation's layer-made part is s g a b (W_enc u_AB), the whole of its contrast."""
    spec = dataclasses.replace(PlantedSpec.parse(NAME), integration=integration)
    loaded = models.load_model(spec.name)
    dec = decomposition(64, scale=0.7)
    pairs = counterfactual.minimal_pairs(loaded.tokenizer, loaded.stimuli)
    values = counterfactual.additive_counterfactual(loaded, planted_model.LAYER, pairs, families(dec))
    tables = {name: counterfactual.layer_made_effects(v["cells"], v["additive"]) for name, v in values.items()}
    if integration == 0:
        for name, v in values.items():
            assert np.array_equal(v["cells"][:, 0], v["additive"]), name
            assert (tables[name]["layer_made_p"] == 1).all() and (tables[name]["layer_made_q"] == 1).all()
        for name in ("primary", "secondary"):  # the instruments are non-additive on their own
            assert tables[name]["instrument_made_effect"].abs().max() > 1e-3, name
        return
    truth = planted_model.truth(spec)
    fe = loaded.stimuli.query("condition == 'formal_emotional'").set_index("item_id").loc[pairs.items, "text"]
    a_b = np.array([np.prod([truth.intensity[w] for w in text.split() if w in truth.intensity]) for text in fe])
    reads = dec.primary.W_enc.detach().double().numpy() @ truth.integration_direction
    pre = values["primary_pre"]
    layer_made = pre["cells"][:, 0] - pre["additive"]
    # float32 encoder outputs of size ~10: rounding of order 1e-6
    np.testing.assert_allclose(layer_made, 0.7 * integration * a_b[:, None] * reads[None, :], atol=1e-4, rtol=0)
    np.testing.assert_allclose(tables["primary_pre"]["instrument_made_effect"], 0.0, atol=1e-4)
    assert (tables["primary_pre"]["layer_made_q"] < 0.05).sum() > 0
    assert (tables["primary"]["layer_made_q"] < 0.05).sum() > 0


def test_the_split_adds_up_to_the_contrast_and_the_t_test_matches_scipy():
    rng = np.random.default_rng(0)
    cells, additive = rng.normal(size=(30, 4, 5)), rng.normal(size=(30, 5))
    additive[:, 3] = cells[:, 0, 3]  # additive on every item: p = 1
    additive[:, 4] = cells[:, 0, 4] - 0.25  # the same layer-made part on every item: p = 0
    table = counterfactual.layer_made_effects(cells, additive)
    contrast = np.einsum("c,icf->f", [1, -1, -1, 1], cells) / 30
    np.testing.assert_allclose(table["interaction_effect"], contrast, rtol=1e-12)
    from scipy import stats

    expected = stats.ttest_1samp(cells[:, 0, :3] - additive[:, :3], 0.0).pvalue
    np.testing.assert_allclose(table["layer_made_p"][:3], expected, rtol=1e-10)
    assert table["layer_made_p"][3] == 1.0 and table["layer_made_p"][4] == 0.0
    assert table["layer_made_effect"][4] == pytest.approx(0.25)


def test_on_minilm_the_token_embeddings_are_additive_and_layer_3_is_not(embedded):
    """Each token embedding depends on its own token and position only, so on aligned minimal pairs every
    feature's layer-made part is exactly 0 at hidden_states[0]; three layers of attention make it non-zero."""
    stimuli = written_stimuli()
    pairs = counterfactual.minimal_pairs(embedded.tokenizer, stimuli)
    dec = decomposition(embedded.d_model, scale=0.3)
    encoders = {"primary": families(dec)["primary"], "primary_pre": families(dec)["primary_pre"]}
    for layer in (0, 3):
        values = counterfactual.additive_counterfactual(embedded, layer, pairs, encoders)
        for name, v in values.items():
            difference = np.abs(v["cells"][:, 0] - v["additive"]).max()
            if layer == 0:
                assert difference == 0.0, name
            else:
                assert difference > 1e-3, name


def test_variants_that_are_not_aligned_minimal_pairs_are_refused_with_the_item_named(embedded):
    with pytest.raises(NotMinimalPairs, match="different token counts"):
        counterfactual.minimal_pairs(embedded.tokenizer, load_stimuli(max_items=3))
    longer = [("I {F} the tickets and felt {E}.", ("purchased", "bought"), ("very thrilled", "fine"))]
    with pytest.raises(NotMinimalPairs, match="item 'mp_0'.*different token counts"):
        counterfactual.minimal_pairs(embedded.tokenizer, written_stimuli(longer))
    same_slot = written_stimuli(TEMPLATES[:1])  # emotion changes the formality slot: no additive layer there
    texts = ["I adored the tickets.", "I purchased the tickets.", "I loved the tickets.", "I bought the tickets."]
    same_slot["text"] = same_slot["condition"].map(dict(zip(CONDITIONS, texts)))
    with pytest.raises(NotMinimalPairs, match=r"formality changes positions \[1\] and emotion \[1\]"):
        counterfactual.minimal_pairs(embedded.tokenizer, same_slot)
    stimuli = written_stimuli()
    swapped = (stimuli["item_id"] == "mp_1") & (stimuli["condition"] == "formal_emotional")
    stimuli.loc[swapped, "text"] = "She was furious when they asked her to aid the team."  # not the two changes
    with pytest.raises(NotMinimalPairs, match="item 'mp_1'.*both changes made at positions \\[8\\]"):
        counterfactual.minimal_pairs(embedded.tokenizer, stimuli)
    assert list(CONDITIONS) == ["formal_emotional", "formal_neutral", "casual_emotional", "casual_neutral"]


@pytest.mark.parametrize("integration", [0.0, 0.5])
def test_the_part_of_a_clamp_s_effect_the_layer_made_is_zero_exactly_where_the_layer_is_additive(integration):
    """06 on minimal pairs: with no integration, the readout's layer-made interaction and every clamp's (the
    secondary at two levels and ablated, its random controls, the linear path) are zero to float32 rounding, so
    none is flagged; with one,
    the unclamped layer-made part is the planted model's own readout interaction, which removing the
    integration from the model (planted_truth.oracle_contrast) reverses."""
    spec = dataclasses.replace(PlantedSpec.parse(NAME), integration=integration)
    loaded = models.load_model(spec.name)
    stimuli = loaded.stimuli.reset_index(drop=True)
    dec = decomposition(64, scale=0.7)
    pairs = counterfactual.minimal_pairs(loaded.tokenizer, stimuli)
    plan = clamping.with_ablations(clamping.clamp_plan([0, 3], np.full(32, 2.0), 5, 1.0, [-1.0, 1.0]), [0, 3])
    texts = stimuli["text"].tolist()
    centroids = clamping.leave_item_out_centroids(
        clamping.pooled_embeddings(loaded, planted_model.LAYER, texts), stimuli
    )
    references = clamping.random_references(plan)
    assert references["secondary 3 @ ablated"] == "random, matched to 3 @ ablated" and len(references) == 6
    table, own, changes = clamp_split.layer_made_clamps(
        loaded, planted_model.LAYER, stimuli, pairs, centroids, dec, plan, references, n_permutations=2000, n_boot=200
    )
    # splicing in the layer's own activations (from the float64 model) reproduces the model's readout
    real, _ = counterfactual.formal_emotional_layers(loaded, planted_model.LAYER, pairs)
    fe = [texts[r] for r in clamp_split.formal_emotional_rows(stimuli, pairs.items)]
    np.testing.assert_allclose(
        clamping.pooled_embeddings(loaded, planted_model.LAYER, fe, substitutes=real),
        clamping.pooled_embeddings(loaded, planted_model.LAYER, fe),
        atol=1e-5,  # float64 vs float32 layer activations of norm ~3: a few float32 ulps
    )
    floor = RESOLUTION  # the readout is a cosine: its largest value is at most 1
    if integration == 0:
        assert np.abs(own).max() <= floor
        assert all(np.abs(change).max() <= floor for change in changes.values())
        assert (table["sign_flip_p"] == 1).all() and (table["vs_control_p"].dropna() == 1).all()
        return
    oracle = planted_truth.oracle_contrast(spec, stimuli, 0.0)  # per item, the readout's change without u_AB
    # float32 cosines of the same embeddings computed two ways (a splice and the model): rounding ~1e-7
    np.testing.assert_allclose(own @ [1, -1, -1, 1], -oracle, atol=1e-5)
    assert np.abs(oracle).mean() > 1e-3  # the planted integration moves the readout
    assert table.loc[0, "condition"] == "no clamp" and table.loc[0, "sign_flip_p"] < 0.01
    assert (table["sign_flip_p"][1:] < 0.05).any()  # a clamp reads the layer-made difference
