"""The baseline ladder's table, and which features carry the first-order and the interaction part of the NFM.

The models are fitted by :mod:`featint_utils.residual.interaction` (on the ``fit`` documents, stopped or tuned on
``tune``, measured on ``test``; all three are documents the SAE never trained on).

* **Residual FVU** of a model: sum ||e - e_hat||^2 / sum ||e - mean(e)||^2 on held-out tokens (float64);
  ``1 - residual FVU`` is its R-squared of the residual. **Gain over zero**: how much less error than
  predicting zero (the SAE alone), in the same units; a model whose gain's interval does not lie above zero
  is a failed fit, and nothing is concluded from it.
* **Total FVU**: the same for the activation when the model's prediction is added to the SAE's
  reconstruction: sum ||x - SAE(x) - e_hat||^2 / sum ||x - mean(x)||^2 ("SAE alone" predicts 0).
* **Variance attribution** of a part ``p`` (first-order or interaction output) to feature ``i``:
  ``sum_t <c_ti - mean(c_i), p_t - mean(p)> / sum_t ||p_t - mean(p)||^2`` over held-out tokens, where
  ``c_ti`` is feature i's term (exact for the first-order part, so the shares sum to 1) or, for the
  interaction part, what the interaction output loses when i is removed from the pairwise pool
  (``I(f) - I(f with f_i = 0)``; these need not sum to 1, the pairwise term not being additive).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..progress import progress
from .code_data import CodeData
from .interaction import GRADIENT, MODELS, RESIDUAL
from .nfm import NFM


def ladder_summary(table: pd.DataFrame, target: str = RESIDUAL) -> pd.DataFrame:
    """Per model fitted on ``target``: held-out residual and total FVU and the gain over predicting zero
    (mean and spread over seeds), in ladder order."""
    table = table[table["target"] == target]
    grouped = table.groupby("model", sort=False)
    summary = pd.DataFrame(
        {
            "label": grouped["label"].first(),
            "residual_fvu": grouped["residual_fvu"].mean(),
            "residual_fvu_sd": grouped["residual_fvu"].std(ddof=1),
            "gain_over_zero": grouped["gain_over_zero"].mean(),
            "total_fvu": grouped["total_fvu"].mean(),
            "seeds": grouped["seed"].nunique(),
            "n_parameters": grouped["n_parameters"].first(),
        }
    )
    summary["residual_r2"] = 1 - summary["residual_fvu"]
    return summary.reindex([m for m in MODELS if m in summary.index])


@torch.no_grad()
def variance_attribution(model: NFM, data: CodeData, batch_size: int = 1024) -> pd.DataFrame:
    """Per feature: its variance share of the first-order part and of the interaction part on ``data``,
    and how often it fires there (see the module docstring for the measure)."""
    model.eval()
    n, d = model.cfg.n_latents, model.cfg.d_out
    zeros = {"cross": (n,), "term": (n, d), "out": (d,)}
    sums = {
        part: {key: torch.zeros(shape, dtype=torch.float64) for key, shape in zeros.items()} | {"out_sq": 0.0}
        for part in ("linear", "interaction")
    }
    fires = torch.zeros(n, dtype=torch.float64)
    tokens = 0
    bar = progress(total=len(data), desc="variance attribution", unit="tok")
    for batch in data.batches(batch_size):
        values, indices = batch.values, batch.indices
        out = model(values, indices)
        on = (values > 0).double()
        fires.index_add_(0, indices.flatten(), on.flatten())
        tokens += len(values)
        terms = {}
        if model.cfg.has_first_order:
            basis, rows = model.first_order_terms(values, indices)
            per_row = basis.unsqueeze(-1) * model.linear_weight[rows]  # [B, k*(1+knots), d]
            terms["linear"] = per_row.view(len(values), values.shape[1], -1, d).sum(2)  # [B, k, d]
        if model.cfg.has_pairs:
            removed = []
            for slot in range(values.shape[1]):
                without = values.clone()
                without[:, slot] = 0
                removed.append(out.interaction - model(without, indices).interaction)
            terms["interaction"] = torch.stack(removed, 1)
        for part, term in terms.items():
            s, output = sums[part], getattr(out, part).double()
            term = term.double() * on.unsqueeze(-1)
            s["cross"].index_add_(0, indices.flatten(), (term * output.unsqueeze(1)).sum(-1).flatten())
            s["term"].index_add_(0, indices.flatten(), term.flatten(0, 1))
            s["out"] += output.sum(0)
            s["out_sq"] += float(output.square().sum())
        bar.update(len(values))
    bar.close()
    frame = pd.DataFrame({"feature": np.arange(n), "firing_frequency": (fires / tokens).numpy()})
    for part, s in sums.items():
        if not s["out_sq"]:
            continue
        mean = s["out"] / tokens
        variance = s["out_sq"] - tokens * float(mean @ mean)
        frame[f"{part}_share"] = ((s["cross"] - s["term"] @ mean) / variance).numpy()
    return frame


def top_features(attribution: pd.DataFrame, n: int = 20) -> dict[str, np.ndarray]:
    """Indices of the ``n`` features with the largest share of each part."""
    return {
        part: attribution.nlargest(n, f"{part}_share")["feature"].to_numpy()
        for part in ("linear", "interaction")
        if f"{part}_share" in attribution
    }


def top_feature_overlap(attribution: pd.DataFrame, n: int = 20) -> dict | None:
    """Overlap of the top-``n`` feature sets of the two parts, beside what chance would give; None when a
    part has no variance on these tokens (an NFM that kept its zero-output start has no interaction part)."""
    top = top_features(attribution, n)
    if len(top) < 2:
        return None
    shared = np.intersect1d(top["linear"], top["interaction"])
    alive = int((attribution["firing_frequency"] > 0).sum())
    return {
        "n": n,
        "shared": len(shared),
        "jaccard": len(shared) / len(np.union1d(top["linear"], top["interaction"])),
        "chance_shared": n * n / max(alive, 1),
        "shared_features": shared.tolist(),
    }


def interaction_strength(model: NFM, features: np.ndarray) -> pd.DataFrame:
    """``<v_i, v_j>`` between the factor embeddings of ``features`` (the FM's pairwise weight)."""
    v = model.embeddings.detach()[torch.tensor(np.asarray(features), dtype=torch.long)]  # a copy: ids may be read-only
    labels = [str(f) for f in features]
    return pd.DataFrame((v @ v.T).numpy(), index=labels, columns=labels)


def histories(out_dir: str | Path, seed: int) -> dict[str, pd.DataFrame]:
    """Epoch histories of the gradient-trained models of one seed on the residual, by model key (the kept
    learning rate's, for the seed that chose it)."""
    found = {}
    for name in GRADIENT:
        directory = Path(out_dir) / name / f"seed{seed}"
        chosen = directory / "lr.json"
        if chosen.exists():
            directory = directory / f"lr{pd.read_json(chosen, typ='series')['chosen']:g}"
        if (directory / "history.csv").exists():
            found[name] = pd.read_csv(directory / "history.csv")
    return found
