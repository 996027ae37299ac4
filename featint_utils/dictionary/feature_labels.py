"""Short names for features: the id with the tokens it fires hardest on, e.g. ``#3447 "however/but/although"``.

Figures and dashboards name a feature with :func:`feature_label`; :func:`labels_from_examples` builds the labels
of many features from :func:`featint_utils.dictionary.features.top_activations` (its ``context`` column marks the token
in «»), and :func:`labels_for` runs that search first. Nothing here imports torch until a search runs.
"""

from __future__ import annotations

import re

import pandas as pd

MAX_TOKEN_CHARS = 12
"""A longer token is cut (with "…") so that a label stays short enough for a tick label."""

_MARKED_TOKEN = re.compile(r"«([^«»]*)»")


def _clean(token: str) -> str:
    token = token.strip()
    if token.startswith("##"):  # WordPiece continuation: "##ing" reads as "-ing"
        token = "-" + token[2:]
    token = " ".join(token.split())  # newlines and tabs would break a one-line label
    if len(token) > MAX_TOKEN_CHARS:
        token = token[: MAX_TOKEN_CHARS - 1] + "…"
    return token


def token_summary(top_tokens: list[str], n: int = 3) -> str:
    """``<tok>/<tok>/<tok>``: the first ``n`` distinct (case-insensitively) non-blank tokens of ``top_tokens``
    (strongest first); empty when there are none."""
    shown: list[str] = []
    seen: set[str] = set()
    for token in top_tokens:
        cleaned = _clean(str(token))
        if not cleaned or cleaned.lower() in seen:
            continue
        seen.add(cleaned.lower())
        shown.append(cleaned)
        if len(shown) == n:
            break
    return "/".join(shown)


def feature_label(feature_id: int, top_tokens: list[str], n: int = 3) -> str:
    """``#<id> "<tok>/<tok>/<tok>"`` (:func:`token_summary`); just ``#<id>`` when there are no tokens."""
    summary = token_summary(top_tokens, n)
    return f'#{int(feature_id)} "{summary}"' if summary else f"#{int(feature_id)}"


def top_tokens(examples: pd.DataFrame) -> dict[int, list[str]]:
    """Each feature's top-activating tokens, strongest first, from a
    :func:`~featint_utils.dictionary.features.top_activations` table (``feature``, ``activation``, ``context``)."""
    ranked = examples.sort_values("activation", ascending=False, kind="stable")
    tokens: dict[int, list[str]] = {}
    for feature, context in zip(ranked["feature"], ranked["context"]):
        match = _MARKED_TOKEN.search(str(context))
        tokens.setdefault(int(feature), [])
        if match:
            tokens[int(feature)].append(match.group(1))
    return tokens


def labels_from_examples(examples: pd.DataFrame, n: int = 3) -> dict[int, str]:
    """:func:`feature_label` of every feature in a :func:`~featint_utils.dictionary.features.top_activations` table."""
    return {feature: feature_label(feature, tokens, n) for feature, tokens in top_tokens(examples).items()}


def labels_for(
    encode, store, feature_ids, tokenizer, n: int = 3, examples: int = 10, split: str = "val"
) -> dict[int, str]:
    """Labels of ``feature_ids`` from their ``examples`` strongest activations over a split of ``store``;
    ``encode`` maps raw store rows to a sparse code (e.g. ``Decomposition.primary_code``). A feature that
    never fires there is absent (a figure then shows its bare id)."""
    from .features import top_activations

    feature_ids = [int(f) for f in feature_ids]
    if not feature_ids:
        return {}
    found = top_activations(encode, store, feature_ids, tokenizer, split=split, n=examples, normalize=False)
    return labels_from_examples(found, n)
