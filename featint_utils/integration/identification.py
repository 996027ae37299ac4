"""Which features track formality, emotion and their interaction, measured on the stimulus set.

* :func:`text_activations`: run texts through the model, encode each real token (padding and special
  tokens never count), and pool each feature over a text's tokens: the mean and the max.
* :func:`feature_effects`: per feature, the within-item (repeated-measures) two-way ANOVA of
  :mod:`featint_utils.stats` on the per-text activation, with Benjamini-Hochberg q-values across the features
  of one family.
* :func:`split_half_replication`: features selected on one half of the items, their effects measured on
  the other half (a selection's effect sizes on the data that selected it are biased upwards).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ..data.corpus import CONDITIONS, Text
from ..data.extraction import padded_batches
from ..data.models import LoadedModel, forward_to_layer
from ..progress import progress
from ..stats import EFFECTS, benjamini_hochberg, block_anova

Encoder = Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Maps raw activations [tokens, d] to a sparse code (values, indices) [tokens, k] each."""


@torch.no_grad()
def text_activations(
    loaded: LoadedModel,
    layer: int,
    texts: list[str],
    encoders: dict[str, tuple[Encoder, int]],
    batch_size: int = 64,
    context_tokens: int = 128,
) -> dict[str, dict[str, np.ndarray]]:
    """Per text and feature, the mean and the max activation over the text's real tokens.

    ``encoders`` maps a name to ``(encode, n_features)``. Returns ``{name: {"mean": [n_texts, n], "max":
    [n_texts, n]}}``. Texts longer than ``context_tokens`` are cut into several contexts, as in extraction;
    a feature silent on a token counts as 0 there."""
    model, tokenizer = loaded.model, loaded.tokenizer
    device = next(model.parameters()).device
    n_texts = len(texts)
    sums = {name: torch.zeros(n_texts * n, dtype=torch.float64) for name, (_, n) in encoders.items()}
    maxes = {name: torch.zeros(n_texts * n) for name, (_, n) in encoders.items()}
    counts = torch.zeros(n_texts, dtype=torch.float64)
    items = [("train", Text(str(i), str(i), text)) for i, text in enumerate(texts)]
    bar = progress(total=n_texts, desc="feature activations per text", unit="text")
    for batch in padded_batches(tokenizer, items, context_tokens, batch_size):
        hidden = forward_to_layer(
            model, layer, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        )
        x = hidden[batch.keep.to(hidden.device)].float().cpu()
        text_index = torch.from_numpy(batch.meta[:, 0].astype(np.int64))
        counts.index_add_(0, text_index, torch.ones(len(x), dtype=torch.float64))
        for name, (encode, n) in encoders.items():
            values, indices = encode(x)
            flat = (text_index[:, None] * n + indices).flatten()
            sums[name].index_add_(0, flat, values.double().flatten())
            maxes[name].scatter_reduce_(0, flat, values.flatten(), reduce="amax", include_self=True)
        bar.update(batch.texts_done)
    bar.close()
    if (counts == 0).any():
        empty = int(torch.nonzero(counts == 0)[0])
        raise ValueError(f"text {empty} ({texts[empty][:40]!r}) has no real tokens")
    return {
        name: {
            "mean": (sums[name].view(n_texts, n) / counts[:, None]).float().numpy(),
            "max": maxes[name].view(n_texts, n).numpy(),
        }
        for name, (_, n) in encoders.items()
    }


def cells(per_text: np.ndarray, stimuli: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Per-text rows (in ``stimuli`` order) arranged as [n_items, 4 conditions, n_features], and the items."""
    position = {c: i for i, c in enumerate(CONDITIONS)}
    items = np.array(sorted(stimuli["item_id"].unique()))
    item_row = {item: i for i, item in enumerate(items)}
    out = np.zeros((len(items), 4, per_text.shape[1]), dtype=np.float64)
    rows = stimuli["item_id"].map(item_row).to_numpy()
    cols = stimuli["condition"].map(position).to_numpy()
    out[rows, cols] = per_text
    return out, items


def feature_effects(cell_values: np.ndarray, features: np.ndarray | None = None) -> pd.DataFrame:
    """Per feature: the within-item ANOVA, BH q-values across these features per effect, condition means."""
    table = block_anova(cell_values)
    table.insert(0, "feature", np.arange(cell_values.shape[2]) if features is None else np.asarray(features))
    for effect in EFFECTS:
        table[f"{effect}_q"] = benjamini_hochberg(table[f"{effect}_p"].to_numpy())
    means = cell_values.mean(axis=0)  # [4, n]
    for i, condition in enumerate(CONDITIONS):
        table[f"mean_{condition}"] = means[i]
    table["mean_any"] = means.mean(0)
    return table


def rank(effects: pd.DataFrame, effect: str, n: int = 10, q: float = 0.05) -> pd.DataFrame:
    """The ``n`` features with the largest partial eta-squared for ``effect`` among those with q < ``q``."""
    kept = effects[effects[f"{effect}_q"] < q]
    return kept.nlargest(n, f"{effect}_eta2")


def split_half_replication(
    cell_values: np.ndarray, effect: str = "interaction", n_select: int = 10, q: float = 0.05, seed: int = 0
) -> pd.DataFrame:
    """Select features on a random half of the items (q < ``q`` for ``effect``, the ``n_select`` largest
    eta-squared), then test only those on the other half (BH across the selected).

    Returns one row per selected feature with its selection-half and replication-half statistics."""
    n_items = cell_values.shape[0]
    order = np.random.default_rng(seed).permutation(n_items)
    select, replicate = np.sort(order[: n_items // 2]), np.sort(order[n_items // 2 :])
    first = feature_effects(cell_values[select])
    chosen = rank(first, effect, n_select, q)
    if chosen.empty:
        return pd.DataFrame(
            columns=[
                "feature",
                "select_eta2",
                "select_q",
                "replicate_eta2",
                "replicate_p",
                "replicate_q",
                "same_sign",
                "replicated",
            ]
        )
    second = block_anova(cell_values[replicate][:, :, chosen["feature"].to_numpy()])
    result = pd.DataFrame(
        {
            "feature": chosen["feature"].to_numpy(),
            "select_eta2": chosen[f"{effect}_eta2"].to_numpy(),
            "select_effect": chosen[f"{effect}_effect"].to_numpy(),
            "select_q": chosen[f"{effect}_q"].to_numpy(),
            "replicate_eta2": second[f"{effect}_eta2"].to_numpy(),
            "replicate_effect": second[f"{effect}_effect"].to_numpy(),
            "replicate_p": second[f"{effect}_p"].to_numpy(),
        }
    )
    result["replicate_q"] = benjamini_hochberg(result["replicate_p"].to_numpy())
    result["same_sign"] = np.sign(result["select_effect"]) == np.sign(result["replicate_effect"])
    result["replicated"] = result["same_sign"] & (result["replicate_q"] < q)
    return result


@torch.no_grad()
def token_activations(loaded: LoadedModel, layer: int, text: str, encode: Encoder, feature: int) -> pd.DataFrame:
    """One feature's activation at every real token of one text (for highlighting), in text order."""
    batch = next(padded_batches(loaded.tokenizer, [("train", Text("0", "0", text))], 512, 1))
    device = next(loaded.model.parameters()).device
    hidden = forward_to_layer(
        loaded.model, layer, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
    )
    values, indices = encode(hidden[batch.keep.to(hidden.device)].float().cpu())
    activation = (values * (indices == feature)).sum(1).numpy()
    tokens = [loaded.tokenizer.decode([int(t)]) for t in batch.meta[:, 2]]
    return pd.DataFrame({"position": batch.meta[:, 1], "token": tokens, "activation": activation})
