"""How much of a feature's formality x emotion interaction the layer makes, and how much the instrument makes.

A TopK code, a code of the NFM's pairwise products or a secondary SAE's code is non-additive in the two
factors even where the layer is additive (``benchmarks/planted_integration.py``: they flag features in every
planted model with no integration), so their 2x2 contrast alone cannot say whether the layer integrates.
On **token-aligned minimal pairs** (an item's four variants differ only in one formality slot and one emotion
slot, each the same number of tokens) a layer that is additive in the two factors gives, at every token,

    x_FE = x_FN + (x_CE - x_CN)

(the *additive counterfactual*): with both factors the layer holds the formal variant plus what emotion
adds to the casual one. Any instrument ``f`` (a code, a pre-activation, a secondary feature), pooled over
the text, then splits its interaction contrast exactly into

    f(FE) - f(FN) - f(CE) + f(CN) = [f(FE) - f(FE*)]  +  [f(FE*) - f(FN) - f(CE) + f(CN)]
                                     made by the layer      made by the instrument from an additive layer

and the first part is zero, for every item, wherever the layer is additive: its test needs no model of the
instrument. The four variants are run in float64 so that an additive layer's counterfactual equals its
activation to within float64 rounding, far below the float32 precision the encoders read. Token embeddings
are additive across slots by construction (each depends on its own token and position), so on such stimuli
every feature's layer-made part is zero at ``hidden_states[0]``; at a deeper layer it is what the layers
computed. On written stimuli whose variants differ in more words, or whose contexts differ (a planted model's
per-text noise), the counterfactual is not the additive layer and this test does not apply.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..data.corpus import CONDITIONS
from ..data.extraction import special_frame
from ..data.models import LoadedModel, forward_to_layer
from ..progress import progress
from ..stats import benjamini_hochberg, item_contrast_test
from .identification import Encoder

FE, FN, CE, CN = (
    CONDITIONS.index(c) for c in ("formal_emotional", "formal_neutral", "casual_emotional", "casual_neutral")
)


class NotMinimalPairs(ValueError):
    """The stimulus set's variants are not token-aligned minimal pairs; the message names the first item."""


class MinimalPairs(NamedTuple):
    items: np.ndarray
    """Item ids, sorted (the order of :func:`featint_utils.integration.identification.cells`)."""
    input_ids: torch.Tensor
    """[n_items, 4 conditions (``CONDITIONS`` order), width], special tokens included, zero-padded."""
    attention_mask: torch.Tensor
    keep: torch.Tensor
    """[n_items, width] the real tokens (no special tokens, no padding); the same for the four variants."""


def minimal_pairs(tokenizer, stimuli: pd.DataFrame, context_tokens: int = 128) -> MinimalPairs:
    """The stimulus set tokenised as aligned 2x2s, or :class:`NotMinimalPairs` naming the first item whose
    variants are not: the four must have the same number of tokens; the formality change (formal vs casual,
    neutral) and the emotion change (emotional vs neutral, casual) must touch disjoint, non-empty sets of
    positions; and the formal-emotional variant must be the casual-neutral one with both changes made."""
    prefix, suffix = special_frame(tokenizer)
    items = np.array(sorted(stimuli["item_id"].unique()))
    by_cell = stimuli.set_index(["item_id", "condition"])["text"]
    rows = []
    for item in map(str, items):
        texts = [by_cell[(item, condition)] for condition in CONDITIONS]
        ids = tokenizer(texts, add_special_tokens=False, verbose=False)["input_ids"]
        lengths = sorted({len(i) for i in ids})
        if len(lengths) > 1:
            counts = ", ".join(f"{c} {len(i)}" for c, i in zip(CONDITIONS, ids))
            raise NotMinimalPairs(f"item {item!r}: its variants have different token counts ({counts})")
        if len(prefix) + lengths[0] + len(suffix) > context_tokens:
            raise NotMinimalPairs(f"item {item!r}: {lengths[0]} tokens do not fit a context of {context_tokens}")
        fe, fn, ce, cn = (np.array(ids[i]) for i in (FE, FN, CE, CN))
        formality, emotion = fn != cn, ce != cn
        if not formality.any() or not emotion.any() or (formality & emotion).any():
            raise NotMinimalPairs(
                f"item {item!r}: formality changes positions {np.flatnonzero(formality).tolist()} and emotion "
                f"{np.flatnonzero(emotion).tolist()}; they must be non-empty and disjoint"
            )
        expected = np.where(formality, fn, np.where(emotion, ce, cn))
        if not np.array_equal(fe, expected):
            raise NotMinimalPairs(
                f"item {item!r}: the formal-emotional variant differs from the casual-neutral one with both "
                f"changes made at positions {np.flatnonzero(fe != expected).tolist()}"
            )
        rows.append([prefix + list(map(int, i)) + suffix for i in (ids[i] for i in range(4))])
    width = max(len(r[0]) for r in rows)
    input_ids = torch.zeros(len(items), 4, width, dtype=torch.int64)
    attention_mask = torch.zeros(len(items), 4, width, dtype=torch.int64)
    keep = torch.zeros(len(items), width, dtype=torch.bool)
    for n, variants in enumerate(rows):
        length = len(variants[0])
        input_ids[n, :, :length] = torch.tensor(variants)
        attention_mask[n, :, :length] = 1
        keep[n, len(prefix) : length - len(suffix)] = True
    return MinimalPairs(items, input_ids, attention_mask, keep)


def _float64_layer(loaded: LoadedModel, layer: int, pairs: MinimalPairs, batch_items: int):
    """Per batch of items: its rows of ``pairs`` and the layer's activations of their four variants
    [b, 4 conditions, width, d], computed by the model in float64 (a float64 copy when it is not)."""
    model = loaded.model
    if next(model.parameters()).dtype != torch.float64:  # a copy: 8 bytes a weight (MiniLM: 180 MB)
        model = copy.deepcopy(model).double()
    device = next(model.parameters()).device
    n_items = len(pairs.items)
    for start in progress(range(0, n_items, batch_items), desc="additive counterfactual", unit="batch"):
        rows = slice(start, min(start + batch_items, n_items))
        ids, mask = pairs.input_ids[rows], pairs.attention_mask[rows]
        b, _, width = ids.shape
        hidden = forward_to_layer(
            model,
            layer,
            input_ids=ids.reshape(b * 4, width).to(device),
            attention_mask=mask.reshape(b * 4, width).to(device),
        )
        yield rows, hidden.reshape(b, 4, width, -1).double().cpu()


def _additive(hidden: torch.Tensor) -> torch.Tensor:
    """The additive counterfactual of the formal-emotional variant, from [b, 4, width, d] activations."""
    return hidden[:, FN] + (hidden[:, CE] - hidden[:, CN])


@torch.no_grad()
def additive_counterfactual(
    loaded: LoadedModel,
    layer: int,
    pairs: MinimalPairs,
    encoders: dict[str, tuple[Encoder, int]],
    batch_items: int = 16,
) -> dict[str, dict[str, np.ndarray]]:
    """Per family, each item's text-mean feature values in its four variants, ``"cells"`` [n_items, 4, n],
    and on the additive counterfactual of its formal-emotional variant, ``"additive"`` [n_items, n].

    The model runs in float64 (a float64 copy when it is not), the counterfactual is formed in float64, and
    the encoders read both in float32, as they read every activation."""
    n_items = len(pairs.items)
    out = {
        name: {"cells": np.zeros((n_items, 4, n)), "additive": np.zeros((n_items, n))}
        for name, (_, n) in encoders.items()
    }
    for rows, hidden in _float64_layer(loaded, layer, pairs, batch_items):
        keep = pairs.keep[rows]
        b, width = keep.shape
        additive = _additive(hidden)
        tokens = keep.sum(1, dtype=torch.float64)[:, None]  # [b, 1]
        owner = torch.arange(b)[:, None].expand(b, width)[keep]  # each kept token's item in this batch
        for name, (encode, n) in encoders.items():
            out[name]["additive"][rows] = (_text_sums(encode, additive[keep].float(), owner, b, n) / tokens).numpy()
            for condition in range(4):
                x = hidden[:, condition][keep].float()
                out[name]["cells"][rows, condition] = (_text_sums(encode, x, owner, b, n) / tokens).numpy()
    return out


@torch.no_grad()
def formal_emotional_layers(
    loaded: LoadedModel, layer: int, pairs: MinimalPairs, batch_items: int = 16
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """Per item, the layer's activations at every token of its formal-emotional variant (special tokens
    included: they are aligned too, and a pooled readout reads them) and of that variant's additive
    counterfactual ([n_tokens, d] each), both from the float64 model and rounded to float32, so that on an
    additive layer the two are equal to float32 rounding and anything computed from them differs by no more
    than that. 06 splices them in to split a clamp's effect as 05 splits a feature's."""
    real, additive = [], []
    for rows, hidden in _float64_layer(loaded, layer, pairs, batch_items):
        counterfactual = _additive(hidden)
        for n, attended in enumerate(pairs.attention_mask[rows, FE].bool()):
            real.append(hidden[n, FE][attended].float())
            additive.append(counterfactual[n][attended].float())
    return real, additive


def _text_sums(encode: Encoder, x: torch.Tensor, owner: torch.Tensor, n_texts: int, n: int) -> torch.Tensor:
    """[n_texts, n] sums of each text's sparse codes (float64)."""
    values, indices = encode(x)
    sums = torch.zeros(n_texts * n, dtype=torch.float64)
    sums.index_add_(0, (owner[:, None] * n + indices).flatten(), values.double().flatten())
    return sums.view(n_texts, n)


def layer_made_effects(cells: np.ndarray, additive: np.ndarray) -> pd.DataFrame:
    """Per feature: the interaction contrast split into its layer-made part ``f(FE) - f(FE*)`` and its
    instrument-made part ``f(FE*) - f(FN) - f(CE) + f(CN)`` (means over items), and a two-sided one-sample
    t-test of the layer-made part across items (:func:`featint_utils.stats.item_contrast_test`, as the ANOVA
    tests each effect) with BH q-values across the features. A feature whose layer-made part is zero on every
    item (an additive layer), to float32 precision, gets p = 1; one with the same non-zero value, p = 0."""
    cells, additive = np.asarray(cells, np.float64), np.asarray(additive, np.float64)
    if cells.ndim != 3 or cells.shape[1] != 4 or additive.shape != (cells.shape[0], cells.shape[2]):
        raise ValueError(
            f"cells must be [n_items, 4, n] and additive [n_items, n], got {cells.shape}, {additive.shape}"
        )
    n_items = len(cells)
    if n_items < 2:
        raise ValueError("the layer-made test needs at least two items")
    layer_made = cells[:, FE] - additive
    instrument_made = additive - cells[:, FN] - cells[:, CE] + cells[:, CN]
    mean, t, p = item_contrast_test(layer_made, np.abs(cells).max(axis=(0, 1)))
    return pd.DataFrame(
        {
            "feature": np.arange(cells.shape[2]),
            "interaction_effect": mean + instrument_made.mean(0),
            "layer_made_effect": mean,
            "instrument_made_effect": instrument_made.mean(0),
            "layer_made_t": t,
            "layer_made_p": p,
            "layer_made_q": benjamini_hochberg(p),
        }
    )


def split_summary(tables: dict[str, pd.DataFrame], q: float = 0.05) -> pd.DataFrame:
    """Per family (tables from :func:`layer_made_effects` joined to 05's effect tables): features with an
    interaction (the within-item ANOVA, q < ``q``), features with a layer-made part (q < ``q``), the share of
    the features' summed |interaction| that the instrument makes from an additive layer, and, over the
    features with a layer-made part, the median of |interaction| over the larger of the two main effects."""
    rows = {}
    for family, table in tables.items():
        layer, instrument = table["layer_made_effect"].abs().sum(), table["instrument_made_effect"].abs().sum()
        made = table[table["layer_made_q"] < q]
        main = np.maximum(made["formality_effect"].abs(), made["emotion_effect"].abs())
        rows[family] = {
            "features": len(table),
            f"interaction (q < {q})": int((table["interaction_q"] < q).sum()),
            f"layer-made (q < {q})": int((table["layer_made_q"] < q).sum()),
            "instrument-made share": instrument / (layer + instrument) if layer + instrument > 0 else float("nan"),
            "interaction / main effect": float(np.median(made["interaction_effect"].abs() / main))
            if len(made)
            else float("nan"),
        }
    return pd.DataFrame(rows).T.rename_axis("family")
