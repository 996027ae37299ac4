"""Manipulation checks for the stimulus set: does each variant differ in the factor it should, and only that one?

Two transparent text scores (no model involved) plus Cohen's d:

* ``emotion_score``: VADER's |compound| (human-rated lexicon + rules); emotional variants of either
  valence score high, neutral ones near 0.
* ``formality_score``: the mean of seven documented, signed text features, each z-scored over the texts
  being compared (so the score is relative to the set, like Heylighen & Dewaele's F-score):

  ======================  ====  ==========================================================
  feature                 sign  definition
  ======================  ====  ==========================================================
  contractions            -     apostrophe contractions (n't, 're, 'll, 's, 'm, 've, 'd) per word
  slang                   -     words from ``CASUAL_MARKERS`` (slang, interjections, hedges) per word
  exclamations            -     '!' per sentence
  personal_pronouns       -     first/second person pronouns per word
  sentence_length         +     words per sentence
  word_length             +     mean characters per word
  latinate                +     words of >= 7 letters with a Latinate suffix per word
  ======================  ====  ==========================================================
"""

from __future__ import annotations

import re
from functools import lru_cache

import numpy as np
import pandas as pd

CASUAL_MARKERS = frozenset(
    """
    gonna wanna gotta kinda sorta lemme dunno gimme ya yeah yep yup nope nah hey hi oh ok okay
    lol omg ugh wow whoa yay ouch huh um uh hmm dude guys folks kid kids mom dad buddy stuff thing things
    pretty super totally basically literally honestly anyway anyways like cool awesome nice chill
    bucks grand tons loads bunch heaps cuz cos tho btw fyi gosh geez jeez damn heck crap freaking
    """.split()
)
PERSONAL_PRONOUNS = frozenset("i me my mine myself we us our ours ourselves you your yours yourself yourselves".split())
LATINATE_SUFFIXES = (
    "tion",
    "sion",
    "ment",
    "ance",
    "ence",
    "ity",
    "ive",
    "ous",
    "ate",
    "ise",
    "ize",
    "ial",
    "ual",
    "ally",
    "ency",
    "ancy",
    "ible",
    "able",
    "ory",
    "ure",
)
FORMALITY_SIGNS = {
    "contractions": -1.0,
    "slang": -1.0,
    "exclamations": -1.0,
    "personal_pronouns": -1.0,
    "sentence_length": 1.0,
    "word_length": 1.0,
    "latinate": 1.0,
}

_WORD = re.compile(r"[A-Za-z]+(?:'[A-Za-z]+)?")
_CONTRACTION = re.compile(r"[A-Za-z](?:n't|'re|'ll|'s|'m|'ve|'d)\b", re.IGNORECASE)
_SENTENCE_END = re.compile(r"[.!?]+")


def formality_features(text: str) -> dict[str, float]:
    """The seven raw formality features of one text (see the module docstring)."""
    words = _WORD.findall(text.replace("\u2019", "'"))
    if not words:
        raise ValueError(f"text has no words: {text!r}")
    lower = [w.lower() for w in words]
    bare = [w.split("'")[0] for w in lower]
    n_words = len(words)
    n_sentences = max(1, len([s for s in _SENTENCE_END.split(text) if s.strip()]))
    return {
        "contractions": len(_CONTRACTION.findall(text.replace("\u2019", "'"))) / n_words,
        "slang": sum(w in CASUAL_MARKERS for w in bare) / n_words,
        "exclamations": text.count("!") / n_sentences,
        "personal_pronouns": sum(w in PERSONAL_PRONOUNS for w in bare) / n_words,
        "sentence_length": n_words / n_sentences,
        "word_length": float(np.mean([len(w) for w in bare])),
        "latinate": sum(len(w) >= 7 and w.endswith(LATINATE_SUFFIXES) for w in bare) / n_words,
    }


def formality_scores(texts) -> pd.Series:
    """Formality score of each text: mean of the signed, set-wise z-scored features."""
    features = pd.DataFrame([formality_features(t) for t in texts])
    spread = features.std(ddof=0).replace(0.0, 1.0)  # a constant feature contributes 0, not NaN
    z = (features - features.mean()) / spread
    return (z * pd.Series(FORMALITY_SIGNS)).mean(axis=1).rename("formality_score")


@lru_cache(maxsize=1)
def _vader():
    from vaderSentiment.vaderSentiment import SentimentIntensityAnalyzer

    return SentimentIntensityAnalyzer()


def emotion_scores(texts) -> pd.Series:
    """Emotional intensity of each text: VADER's |compound| in [0, 1], whatever the valence."""
    analyzer = _vader()
    return pd.Series([abs(analyzer.polarity_scores(t)["compound"]) for t in texts], name="emotion_score")


def cohens_d(a, b) -> float:
    """Cohen's d of a minus b with the pooled standard deviation."""
    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    pooled = np.sqrt(((len(a) - 1) * a.var(ddof=1) + (len(b) - 1) * b.var(ddof=1)) / (len(a) + len(b) - 2))
    if pooled == 0:
        raise ValueError("both groups are constant: Cohen's d is undefined")
    return float((a.mean() - b.mean()) / pooled)


def score_texts(stimuli: pd.DataFrame) -> pd.DataFrame:
    """The stimulus frame with ``emotion_score`` and ``formality_score`` columns added."""
    return stimuli.assign(
        emotion_score=emotion_scores(stimuli["text"]).to_numpy(),
        formality_score=formality_scores(stimuli["text"]).to_numpy(),
    )


def _d_rows(x: np.ndarray, in_level: np.ndarray) -> np.ndarray:
    """Cohen's d per row of ``x`` [b, n] between columns in and out of the level."""
    a, b = x[:, in_level], x[:, ~in_level]
    na, nb = a.shape[1], b.shape[1]
    pooled = np.sqrt(((na - 1) * a.var(1, ddof=1) + (nb - 1) * b.var(1, ddof=1)) / (na + nb - 2))
    return (a.mean(1) - b.mean(1)) / pooled


def effect_table(scored: pd.DataFrame, n_boot: int = 2000, seed: int = 0) -> pd.DataFrame:
    """Cohen's d of each factor on each text score with a 95% CI from resampling whole items.

    Rows marked ``intended`` should be large; the others (cross effects) should be near zero.
    """
    from ..data.corpus import CONDITIONS

    wide = scored.pivot(index="item_id", columns="condition")
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(wide), size=(n_boot, len(wide)))
    rows = []
    for score, intended in (("emotion_score", "emotion"), ("formality_score", "formality")):
        values = wide[score][list(CONDITIONS)].to_numpy()  # [items, 4]
        for factor, level in (("emotion", "emotional"), ("formality", "formal")):
            in_level = np.tile([level in c.split("_") for c in CONDITIONS], len(wide))  # flattened [items*4]
            d = _d_rows(values.reshape(1, -1), in_level)[0]
            boots = _d_rows(values[picks].reshape(n_boot, -1), in_level)
            low, high = np.percentile(boots, [2.5, 97.5])
            rows.append(
                {
                    "score": score,
                    "factor": f"{factor} ({level} - other)",
                    "intended": factor == intended,
                    "cohens_d": d,
                    "ci_low": low,
                    "ci_high": high,
                }
            )
    return pd.DataFrame(rows)


def probe_accuracy(features, labels, groups, n_splits: int = 5, seeds=(0, 1, 2)) -> pd.Series:
    """Held-out accuracy of a logistic-regression probe, cross-validated by group (item), one value per
    fold and seed: no item's variants are ever on both sides of a fold."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    features, labels, groups = np.asarray(features), np.asarray(labels), np.asarray(groups)
    scores = []
    for seed in seeds:
        folds = GroupKFold(n_splits=n_splits, shuffle=True, random_state=seed)
        for train, test in folds.split(features, labels, groups):
            probe = make_pipeline(StandardScaler(), LogisticRegression(C=0.1, max_iter=2000))
            probe.fit(features[train], labels[train])
            scores.append(probe.score(features[test], labels[test]))
    return pd.Series(scores, name="accuracy")


def probe_table(embeddings, stimuli: pd.DataFrame, n_splits: int = 5, seeds=(0, 1, 2)) -> pd.DataFrame:
    """Probe accuracy for each factor (mean, sd over folds x seeds) beside the majority-class chance level."""
    rows = []
    for factor in ("formality", "emotion"):
        acc = probe_accuracy(embeddings, stimuli[factor], stimuli["item_id"], n_splits, seeds)
        chance = stimuli[factor].value_counts(normalize=True).max()
        rows.append(
            {
                "factor": factor,
                "accuracy_mean": acc.mean(),
                "accuracy_sd": acc.std(ddof=1),
                "accuracy_min": acc.min(),
                "chance": chance,
                "n_folds": len(acc),
            }
        )
    return pd.DataFrame(rows)
