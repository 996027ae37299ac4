"""The secondary SAE's data, and what drives a secondary feature.

The secondary SAE reads the NFM's post-Linear(K,K), pre-ReLU vector ``h`` (``NFMOutput.hidden_pre``),
produced by the one NFM forward from the primary SAE's code. ``h`` is a function of the code alone (never
of the residual the NFM was fitted to), so it carries no label leakage from any token; to keep the
secondary SAE's own numbers honest it trains on the store's training documents and is measured on the
NFM stage's ``test`` documents, which neither the NFM nor the secondary SAE has seen.

Attribution is exact. With the NFM in eval mode (dropout off, batch norm an affine map ``a * p + c``),
``h = sum_{i<j} W_h (a * f_i v_i * f_j v_j) + (W_h c + b_h)``: every active pair of primary features
contributes one K-vector, and these plus the constant sum to ``h``. A feature's contribution is half of
each pair it belongs to. A secondary feature's pre-activation is linear in ``h``, so the same split holds
for it after projecting on its encoder row.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..data.activation_store import ActivationStore, reusable_store
from ..data.extraction import store_from_arrays
from ..dictionary.sae import TopKSAE
from ..progress import progress
from ..residual.code_data import CodeData
from ..residual.decomposition import Decomposition
from ..residual.nfm import NFM

HOOK = "nfm.hidden_pre"


@torch.no_grad()
def build_embedding_store(
    decomposition: Decomposition, store: ActivationStore, test: CodeData, store_dir: str | Path, batch_size: int = 4096
) -> ActivationStore:
    """An activation store of NFM vectors: ``train`` from the store's training documents (through the
    primary SAE), ``val`` from the NFM stage's ``test`` documents. Token provenance and texts are the
    primary store's, so top-activation tables work unchanged. A store made from the same primary SAE,
    NFM and documents is reused (so the secondary SAE's checkpoint stays valid)."""
    primary, nfm = decomposition.primary, decomposition.nfm
    if nfm is None or nfm.hidden is None:
        raise ValueError("the NFM vector needs an NFM with a Linear(K,K) layer (form 'nfm' or 'interaction')")
    digest = hashlib.sha256(f"{store.fingerprint}|{test.rows.tolist()}".encode())
    for model in (primary, nfm):
        for name, tensor in sorted(model.state_dict().items()):
            digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    request = digest.hexdigest()[:16]
    existing = reusable_store(store_dir, request)
    if existing is not None:
        return existing
    parts = []
    bar = progress(total=store.n_tokens("train"), desc="NFM vectors (train)", unit="tok")
    for x in store.batches("train", batch_size, shuffle=False, normalize=False):
        parts.append(decomposition.nfm_vector(*decomposition.primary_code(x)).numpy())
        bar.update(len(x))
    bar.close()
    train = np.concatenate(parts)
    val = np.concatenate([decomposition.nfm_vector(b.values, b.indices).numpy() for b in test.batches(batch_size)])
    val_meta = store.tokens("val").to_numpy()[test.rows]
    info = {
        "model": store.manifest["model"],
        "layer": store.layer,
        "hook": HOOK,
        "request": request,
        "corpus": store.manifest.get("corpus", ""),
        "primary_store": store.fingerprint,  # by content: the run directory may move
    }
    texts = store.texts().to_dict("records")  # the primary store's texts: top-activation tables work unchanged
    return store_from_arrays(
        store_dir,
        {"train": train, "val": val},
        info=info,
        texts=texts,
        meta={"train": store.tokens("train").to_numpy(), "val": val_meta},
    )


class PairAttribution(NamedTuple):
    """Exact split of one token's NFM vector ``h`` over its active pairs of primary features."""

    pairs: torch.Tensor
    """[P, 2] primary feature indices (i, j) of each active pair, i's slot before j's."""
    contributions: torch.Tensor
    """[P, K] each pair's part of ``h``."""
    constant: torch.Tensor
    """[K] the part of ``h`` no pair owns (biases, batch-norm shift)."""


@torch.no_grad()
def pair_attribution(nfm: NFM, values: torch.Tensor, indices: torch.Tensor) -> PairAttribution:
    """The exact pairwise split of ``h`` for one token's code ``values``, ``indices`` [k] (see the module
    docstring); ``contributions.sum(0) + constant`` equals the NFM's ``hidden_pre`` for that token."""
    if not nfm.cfg.has_pairs or nfm.hidden is None:
        raise ValueError(f"an NFM of form {nfm.cfg.form!r} has no Linear(K,K) vector; use form 'nfm' or 'interaction'")
    nfm.eval()
    device = nfm.embeddings.device  # the code goes where the NFM is
    active = values > 0
    values, indices = values[active].to(device), indices[active].to(device)
    factors = values[:, None] * nfm.embeddings[indices]  # [k, K]
    i, j = torch.triu_indices(len(values), len(values), offset=1)
    products = factors[i] * factors[j]  # [P, K]: the pooling's terms
    if isinstance(nfm.norm, torch.nn.BatchNorm1d):
        bn = nfm.norm
        gain = bn.weight / torch.sqrt(bn.running_var + bn.eps)
        shift = bn.bias - bn.running_mean * gain
    else:
        gain, shift = torch.ones(nfm.cfg.k_embed, device=device), torch.zeros(nfm.cfg.k_embed, device=device)
    contributions = (products * gain) @ nfm.hidden.weight.T
    constant = nfm.hidden.weight @ shift + nfm.hidden.bias
    return PairAttribution(torch.stack([indices[i], indices[j]], 1), contributions, constant)


@torch.no_grad()
def drivers(
    nfm: NFM, secondary: TopKSAE, feature: int, codes: list[tuple[torch.Tensor, torch.Tensor]]
) -> tuple[pd.DataFrame, pd.DataFrame]:
    """What drives secondary ``feature`` on the given tokens' primary codes: the mean contribution of every
    primary pair and of every primary feature to its pre-activation (exact; see the module docstring).

    Returns (pairs table, features table), largest mean contribution first."""
    direction = secondary.W_enc[feature] * secondary.cfg.input_scale  # pre-activation = direction . h + const
    pair_totals: dict[tuple[int, int], float] = {}
    feature_totals: dict[int, float] = {}
    for values, indices in codes:
        split = pair_attribution(nfm, values, indices)
        projected = (split.contributions @ direction).tolist()
        for (a, b), value in zip(split.pairs.tolist(), projected):
            key = (min(a, b), max(a, b))
            pair_totals[key] = pair_totals.get(key, 0.0) + value
            for f in key:
                feature_totals[f] = feature_totals.get(f, 0.0) + value / 2
    n = max(len(codes), 1)
    pairs = pd.DataFrame(
        [{"feature_i": a, "feature_j": b, "contribution": v / n} for (a, b), v in pair_totals.items()],
        columns=["feature_i", "feature_j", "contribution"],
    )
    features = pd.DataFrame(
        [{"primary_feature": f, "contribution": v / n} for f, v in feature_totals.items()],
        columns=["primary_feature", "contribution"],
    )
    return (
        pairs.sort_values("contribution", ascending=False, ignore_index=True),
        features.sort_values("contribution", ascending=False, ignore_index=True),
    )


@torch.no_grad()
def top_codes(
    decomposition: Decomposition, store: ActivationStore, feature: int, n: int = 100
) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Primary codes of the ``n`` held-out tokens of the primary store's val split (NFM test documents
    included) on which secondary ``feature`` is strongest."""
    best: list[tuple[float, torch.Tensor, torch.Tensor]] = []
    for x in store.batches("val", 4096, shuffle=False, normalize=False):
        values, indices = decomposition.primary_code(x)
        s_values, s_indices = decomposition.secondary_code_of_vector(decomposition.nfm_vector(values, indices))
        strength = (s_values * (s_indices == feature)).sum(1)
        for row in torch.nonzero(strength > 0).flatten().tolist():
            best.append((float(strength[row]), values[row], indices[row]))
        best = sorted(best, key=lambda t: -t[0])[:n]
    return [(v, i) for _, v, i in best]
