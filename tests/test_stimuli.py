"""The project's stimulus set and word lists, and the manipulation checks that vouch for them."""

import numpy as np
import pandas as pd
import pytest

from featint_utils.data import models
from featint_utils.data.corpus import CONDITIONS, load_prompt_frames, load_stimuli, load_wordlists, stimulus_texts
from featint_utils.integration import manipulation


@pytest.fixture(scope="module")
def stimuli():
    return load_stimuli()


@pytest.fixture(scope="module")
def scored(stimuli):
    return manipulation.score_texts(stimuli)


def test_set_has_enough_complete_balanced_quadruplets(stimuli):
    assert stimuli["item_id"].nunique() >= 400
    assert stimuli["topic"].nunique() >= 20
    counts = stimuli["condition"].value_counts()
    assert set(counts.index) == set(CONDITIONS) and counts.nunique() == 1, "every cell holds every item once"
    assert not stimuli["text"].duplicated().any()
    n_words = stimuli["text"].str.split().str.len()
    assert n_words.between(6, 35).all()
    assert (n_words <= 10).mean() > 0.02 and (n_words >= 25).mean() > 0.02, "short and long texts both present"
    per_topic = stimuli.groupby("topic")["item_id"].nunique()
    assert per_topic.min() >= 10


def test_every_item_is_one_quadruplet_and_each_manipulation_moves_its_score_within_the_item(stimuli, scored):
    n_items = stimuli["item_id"].nunique()
    assert len(stimuli) == 4 * n_items
    per_item = stimuli.groupby("item_id")
    assert all(sorted(conditions) == sorted(CONDITIONS) for conditions in per_item["condition"].apply(list))
    assert (per_item["topic"].nunique() == 1).all()
    assert (stimuli["condition"] == stimuli["formality"] + "_" + stimuli["emotion"]).all()
    texts = stimulus_texts(stimuli)  # what extraction runs: the split unit is the item
    assert len({t.text_id for t in texts}) == len(texts) == len(stimuli)
    assert all(t.group == item for t, item in zip(texts, stimuli["item_id"]))
    # paired within each item: the emotional variant against its neutral twin of the same register...
    wide = scored.pivot(index="item_id", columns="condition")
    emotion, formality = wide["emotion_score"], wide["formality_score"]
    for register in ("formal", "casual"):
        emotional, neutral = emotion[f"{register}_emotional"], emotion[f"{register}_neutral"]
        assert (emotional > neutral).all() and (neutral <= 0.05).all() and (emotional >= 0.3).all(), register
    # ...and the formal variant against its casual twin of the same affect
    for affect in ("emotional", "neutral"):
        gap = formality[f"formal_{affect}"] - formality[f"casual_{affect}"]
        assert (gap > 0).mean() >= 0.95 and gap.mean() >= 0.5, affect
    # the other factor barely moves each score: a small fraction of the intended within-item gap
    for register in ("formal", "casual"):
        side = (formality[f"{register}_emotional"] - formality[f"{register}_neutral"]).mean()
        assert abs(side) <= 0.15 * (formality["formal_neutral"] - formality["casual_neutral"]).mean(), register
    for affect in ("emotional", "neutral"):
        side = (emotion[f"formal_{affect}"] - emotion[f"casual_{affect}"]).mean()
        assert abs(side) <= 0.15 * (emotion["formal_emotional"] - emotion["formal_neutral"]).mean(), affect
    # and VADER's sign agrees with each emotional variant's valence label
    emotional = stimuli[stimuli["emotion"] == "emotional"]
    compound = np.array([manipulation._vader().polarity_scores(t)["compound"] for t in emotional["text"]])
    assert ((compound > 0) == (emotional["valence"] == "positive").to_numpy()).all()


def test_valence_is_shared_within_an_item_and_balanced(stimuli):
    emotional = stimuli[stimuli["emotion"] == "emotional"]
    assert (emotional.groupby("item_id")["valence"].nunique() == 1).all()
    assert set(emotional["valence"]) == {"positive", "negative"}
    share = (emotional.drop_duplicates("item_id")["valence"] == "positive").mean()
    assert 0.4 <= share <= 0.6
    assert (stimuli.loc[stimuli["emotion"] == "neutral", "valence"] == "neutral").all()


def test_each_factor_moves_its_own_score_and_not_the_other(scored):
    d = lambda score, factor, level: manipulation.cohens_d(  # noqa: E731
        scored.loc[scored[factor] == level, score], scored.loc[scored[factor] != level, score]
    )
    assert d("emotion_score", "emotion", "emotional") >= 1.0
    assert d("formality_score", "formality", "formal") >= 1.0
    assert abs(d("emotion_score", "formality", "formal")) <= 0.3
    assert abs(d("formality_score", "emotion", "emotional")) <= 0.3


def test_effect_table_matches_direct_cohens_d_and_brackets_it(scored):
    table = manipulation.effect_table(scored, n_boot=200)
    direct = manipulation.cohens_d(
        scored.loc[scored["emotion"] == "emotional", "emotion_score"],
        scored.loc[scored["emotion"] == "neutral", "emotion_score"],
    )
    row = table[(table["score"] == "emotion_score") & table["factor"].str.startswith("emotion")].iloc[0]
    assert row["cohens_d"] == pytest.approx(direct)
    assert (table["ci_low"] <= table["cohens_d"]).all() and (table["cohens_d"] <= table["ci_high"]).all()


def test_probe_on_embedded_model_beats_chance_under_item_level_cv(embedded, stimuli):
    embeddings = models.sentence_embeddings(embedded, stimuli["text"].tolist()).numpy()
    table = manipulation.probe_table(embeddings, stimuli, n_splits=5, seeds=(0,)).set_index("factor")
    for factor in ("formality", "emotion"):
        assert table.loc[factor, "chance"] == pytest.approx(0.5)
        assert table.loc[factor, "accuracy_mean"] >= 0.8, factor
        assert table.loc[factor, "accuracy_min"] >= 0.7, factor


def test_probe_cannot_learn_labels_that_carry_no_signal():
    rng = np.random.default_rng(0)
    features = rng.normal(size=(400, 20))
    labels = np.tile([0, 1], 200)
    accuracy = manipulation.probe_accuracy(features, labels, np.repeat(np.arange(100), 4), seeds=(0,))
    assert abs(accuracy.mean() - 0.5) < 0.1


def test_word_lists_and_prompt_frames():
    buckets = load_wordlists()
    assert set(buckets) == set(CONDITIONS)
    words = [w for ws in buckets.values() for w in ws]
    assert all(len(ws) >= 30 for ws in buckets.values())
    assert len(words) == len(set(words)) and all(w.isalpha() and w.islower() for w in words)
    lexicon = manipulation._vader().lexicon
    for bucket, ws in buckets.items():
        strong = np.mean([abs(lexicon.get(w, 0.0)) >= 1.5 for w in ws])
        if bucket.endswith("neutral"):
            assert all(abs(lexicon.get(w, 0.0)) < 0.5 for w in ws), bucket
        else:
            assert strong >= 0.75, bucket
    formal = np.mean([len(w) for b in ("formal_neutral", "formal_emotional") for w in buckets[b]])
    casual = np.mean([len(w) for b in ("casual_neutral", "casual_emotional") for w in buckets[b]])
    assert formal > casual + 2
    frames = load_prompt_frames()
    assert len(frames) >= 10 and len(set(frames)) == len(frames)
    assert manipulation.emotion_scores(frames).max() == 0.0


def test_formality_features_on_known_sentences():
    casual = manipulation.formality_features("Hey, we're gonna grab stuff! You'll see.")
    formal = manipulation.formality_features("The committee subsequently approved the administrative proposal.")
    assert casual["contractions"] == pytest.approx(2 / 7)  # we're, you'll over 7 words
    assert casual["slang"] == pytest.approx(3 / 7)  # hey, gonna, stuff
    assert casual["exclamations"] == pytest.approx(0.5) and casual["personal_pronouns"] == pytest.approx(2 / 7)
    assert casual["sentence_length"] == pytest.approx(3.5)
    assert formal["latinate"] == pytest.approx(1 / 7)  # administrative (-ive); proposal (-al) is not listed
    casual_text, formal_text = "Hey, we're gonna grab stuff! You'll see.", "The committee approved the administration."
    scores = manipulation.formality_scores([casual_text, formal_text])
    assert scores[1] > scores[0]


def test_cohens_d_known_answer():
    assert manipulation.cohens_d([2.0, 4.0], [0.0, 2.0]) == pytest.approx(2 / np.sqrt(2))
    with pytest.raises(ValueError, match="constant"):
        manipulation.cohens_d([1.0, 1.0], [1.0, 1.0])
    # VADER's |compound|: the negative text scores as high as its compound is low, the neutral one 0
    scores = manipulation.emotion_scores(["I am thrilled", "The box is brown", "I am miserable"])
    pd.testing.assert_series_equal(scores, pd.Series([0.4404, 0.0, 0.4939], name="emotion_score"))


def test_the_minimal_pairs_are_token_aligned_for_minilm_and_each_word_moves_its_own_score(embedded):
    """``stimulus_set="minimal_pairs"``: every item's four variants differ in one formality and one emotion
    word, each one MiniLM token, so 05 can split each interaction on the additive counterfactual; the paired
    manipulation checks hold item by item (thresholds a little under what the set gives: 93% and 96%)."""
    from featint_utils.integration import counterfactual
    from featint_utils.workbench import stages

    pairs_set = stages.stimuli(embedded, stimulus_set="minimal_pairs")
    assert pairs_set["item_id"].nunique() >= 240 and pairs_set["topic"].nunique() >= 20
    pairs = counterfactual.minimal_pairs(embedded.tokenizer, pairs_set)  # raises on any unaligned item
    assert len(pairs.items) == pairs_set["item_id"].nunique()
    emotional = pairs_set[pairs_set["emotion"] == "emotional"].drop_duplicates("item_id")
    assert 0.4 <= (emotional["valence"] == "positive").mean() <= 0.6
    wide = manipulation.score_texts(pairs_set).pivot(index="item_id", columns="condition")
    emotion, formality = wide["emotion_score"], wide["formality_score"]
    for register in ("formal", "casual"):
        assert (emotion[f"{register}_emotional"] > emotion[f"{register}_neutral"]).mean() >= 0.9, register
    for affect in ("emotional", "neutral"):
        assert (formality[f"formal_{affect}"] > formality[f"casual_{affect}"]).mean() >= 0.95, affect
    assert stages.stimuli(embedded, max_items=3)["item_id"].nunique() == 3  # "default": the project's set
    with pytest.raises(FileNotFoundError, match="no_such.csv"):
        stages.stimuli(embedded, stimulus_set="no_such.csv")
