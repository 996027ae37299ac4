"""Looking at features: where each fires hardest, traced back to its text and token."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import pandas as pd
import torch

from ..data.activation_store import ActivationStore


@torch.no_grad()
def top_activations(
    encode: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
    store: ActivationStore,
    features: list[int],
    tokenizer,
    split: str = "val",
    n: int = 5,
    normalize: bool = True,
    window: tuple[int, int] = (10, 4),
) -> pd.DataFrame:
    """The ``n`` strongest activations of each feature over a split, with the token (in «») in its context.

    ``encode`` maps a batch of store rows to a sparse code ``(values, indices)`` (e.g. ``sae.encode``).
    """
    wanted = torch.tensor(features)
    best_values = torch.full((len(features), n), -np.inf)
    best_rows = torch.full((len(features), n), -1, dtype=torch.long)
    offset = 0
    for x in store.batches(split, 4096, shuffle=False, normalize=normalize):
        values, indices = encode(x)
        # dense activation of just the wanted features: [batch, n_features]
        hits = (indices[:, :, None] == wanted[None, None, :]) * values[:, :, None]
        acts = hits.sum(1)
        rows = torch.arange(offset, offset + len(x))[:, None].expand_as(acts)
        merged_values = torch.cat([best_values, acts.t()], dim=1)
        merged_rows = torch.cat([best_rows, rows.t()], dim=1)
        top = merged_values.topk(n, dim=1)
        best_values, best_rows = top.values, merged_rows.gather(1, top.indices)
        offset += len(x)
    tokens = store.tokens(split)
    texts = store.texts().set_index("index")
    records = []
    for f, feature in enumerate(features):
        for value, row in zip(best_values[f].tolist(), best_rows[f].tolist()):
            if row < 0 or value <= 0:
                continue
            text_index, position, _ = tokens.iloc[row]
            text = texts.loc[text_index]
            records.append(
                {
                    "feature": feature,
                    "activation": value,
                    "text_id": text["text_id"],
                    "context": _context(tokenizer, text["text"], int(position), window),
                }
            )
    return pd.DataFrame(records, columns=["feature", "activation", "text_id", "context"])


def _context(tokenizer, text: str, position: int, window: tuple[int, int]) -> str:
    ids = tokenizer(text, add_special_tokens=False, verbose=False)["input_ids"]
    before = tokenizer.decode(ids[max(0, position - window[0]) : position])
    token = tokenizer.decode(ids[position : position + 1])
    after = tokenizer.decode(ids[position + 1 : position + 1 + window[1]])
    return f"{before} «{token.strip()}» {after}".strip()


def pick_features(firing_frequency: np.ndarray, n: int, max_frequency: float = 0.1) -> list[int]:
    """``n`` live, non-dense features spread evenly over the firing-frequency ranking (common to rare)."""
    alive = np.flatnonzero((firing_frequency > 0) & (firing_frequency <= max_frequency))
    ranked = alive[np.argsort(-firing_frequency[alive])]
    if len(ranked) == 0:
        return []
    return [int(ranked[i]) for i in np.linspace(0, len(ranked) - 1, min(n, len(ranked))).round().astype(int)]


@torch.no_grad()
def max_activations(encode, store: ActivationStore, n_features: int, split: str = "train") -> np.ndarray:
    """Each feature's largest activation over a split (0 for features that never fire there)."""
    best = torch.zeros(n_features)
    for x in store.batches(split, 4096, shuffle=False, normalize=True):
        values, indices = encode(x)
        best.scatter_reduce_(0, indices.flatten(), values.flatten(), reduce="amax", include_self=True)
    return best.numpy()
