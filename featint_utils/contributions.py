"""The baseline ladder, the linear-vs-interaction decomposition, and which features carry each part.

Every model is fitted on the ``fit`` documents, stopped or tuned on the ``tune`` documents, and measured
on the ``test`` documents only; all three are documents the SAE never trained on (see
:mod:`featint_utils.residuals`).

* **Residual FVU** of a model: sum ||e - e_hat||^2 / sum ||e - mean(e)||^2 on held-out tokens (float64);
  ``1 - residual FVU`` is its R-squared of the residual.
* **Total FVU**: the same for the activation when the model's prediction is added to the SAE's
  reconstruction: sum ||x - SAE(x) - e_hat||^2 / sum ||x - mean(x)||^2 ("SAE alone" predicts 0).
* **Interaction share** (per seed): the held-out incremental R-squared of the pairwise term,
  ``fvu(first-order model) - fvu(the same model + pairwise term)``, both fitted by the same trainer from
  the same seed, over the linear and over the additive first-order model; beside it, the same increment
  for the shuffled-pair control, which has the NFM's capacity but no real pairs. ``of_explained`` divides
  the increment over the linear model by the NFM's own R-squared (the original study's "4.5%" was a share
  of this kind, but of mean absolute outputs).
* **Variance attribution** of a part ``p`` (first-order or interaction output) to feature ``i``:
  ``sum_t <c_ti - mean(c_i), p_t - mean(p)> / sum_t ||p_t - mean(p)||^2`` over held-out tokens, where
  ``c_ti`` is feature i's term (exact for the first-order part, so the shares sum to 1) or, for the
  interaction part, what the interaction output loses when i is removed from the pairwise pool
  (``I(f) - I(f with f_i = 0)``; these need not sum to 1, the pairwise term not being additive).
"""

from __future__ import annotations

import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from .baselines import CodeMLP, fit_ridge, matched_hidden
from .metrics import VarianceAccumulator
from .nfm import NFM, NFMConfig
from .nfm_training import FitConfig, ResidualTrainer
from .progress import progress
from .residuals import CodeData

LADDER = {
    "sae_alone": "SAE alone (predict 0)",
    "raw_ridge": "ridge from the raw activation",
    "code_ridge": "ridge from the SAE code",
    "linear": "linear in the code (trained)",
    "additive": "additive per-feature non-linear",
    "nfm": "NFM (linear + pairwise)",
    "nfm_additive": "NFM (additive + pairwise)",
    "mlp": "MLP, NFM's parameter count",
    "shuffled_pairs": "NFM, shuffled-pair control",
}
"""Model keys of the ladder, with the label a table or figure shows."""

SEEDED = ("linear", "additive", "nfm", "nfm_additive", "mlp", "shuffled_pairs")


class _Zero(torch.nn.Module):
    def predict(self, batch) -> torch.Tensor:
        return torch.zeros_like(batch.target)


@torch.no_grad()
def held_out_fit(model, data: CodeData, batch_size: int = 8192) -> dict:
    """Residual FVU and total-activation FVU of a residual model on ``data`` (float64)."""
    model.eval()
    residual = VarianceAccumulator(data.d_out)
    total = VarianceAccumulator(data.d_out)
    for batch in data.batches(batch_size):
        prediction = model.predict(batch)
        residual.add(batch.target, prediction)
        # x - (SAE(x) + e_hat) = e - e_hat: the activation's error once the prediction is added
        total.add(batch.inputs, batch.inputs - batch.target + prediction)
    return {"residual_fvu": residual.fvu(), "total_fvu": total.fvu()}


def ladder_model(name: str, nfm_cfg: NFMConfig, seed: int, fit: CodeData) -> torch.nn.Module:
    """A fresh, untrained model of the ladder (``name`` in :data:`SEEDED`)."""
    forms = {"linear": ("first_order", 0), "additive": ("first_order", nfm_cfg.knots or 3),
             "nfm": ("nfm", 0), "nfm_additive": ("nfm", nfm_cfg.knots or 3), "shuffled_pairs": ("nfm", 0)}  # fmt: skip
    if name == "mlp":
        n_params = NFM(replace(nfm_cfg, form="nfm", knots=0)).n_parameters()
        return CodeMLP(nfm_cfg.n_latents, nfm_cfg.d_out, matched_hidden(n_params, nfm_cfg.n_latents, nfm_cfg.d_out),
                       seed=seed)  # fmt: skip
    form, knots = forms[name]
    model = NFM(replace(nfm_cfg, form=form, knots=knots), seed=seed)
    model.set_knots(fit.feature_scale())
    return model


def fit_ladder(
    fit: CodeData,
    tune: CodeData,
    test: CodeData,
    nfm_cfg: NFMConfig,
    fit_cfg: FitConfig,
    seeds: list[int],
    out_dir: str | Path,
    resume: bool = True,
    models: tuple[str, ...] = tuple(LADDER),
) -> pd.DataFrame:
    """Fit every model of the ladder (the seeded ones once per seed) and measure it on ``test``.

    Each trained model is saved under ``out_dir/<name>/seed<s>/`` with its checkpoint, so an interrupted
    ladder resumes where it stopped. Returns one row per (model, seed)."""
    unknown = set(models) - set(LADDER)
    if unknown:
        raise ValueError(f"unknown ladder models {sorted(unknown)}; known: {list(LADDER)}")
    if not seeds:
        raise ValueError("fit_ladder needs at least one seed")
    out_dir = Path(out_dir)
    rows = []

    def record(name, seed, model, started, test_set, **extra):
        rows.append({"model": name, "label": LADDER[name], "seed": seed, **held_out_fit(model, test_set),
                     "n_parameters": sum(p.numel() for p in model.parameters()),
                     "seconds": time.perf_counter() - started, **extra})  # fmt: skip

    for name in models:
        if name in SEEDED:
            continue
        started = time.perf_counter()
        if name == "sae_alone":
            record(name, -1, _Zero(), started, test)
        else:
            model = fit_ridge(fit, tune, source="inputs" if name == "raw_ridge" else "codes")
            record(name, -1, model, started, test, ridge_alpha=model.alpha)
    for seed in seeds:
        for name in (m for m in models if m in SEEDED):
            started = time.perf_counter()
            model = ladder_model(name, nfm_cfg, seed, fit)
            shuffled = name == "shuffled_pairs"
            fit_set = fit.with_shuffled_pairs(seed) if shuffled else fit
            tune_set = tune.with_shuffled_pairs(seed) if shuffled else tune
            trainer = ResidualTrainer(
                model, fit_set, tune_set, replace(fit_cfg, seed=seed), out_dir / name / f"seed{seed}"
            )
            model = trainer.train(resume=resume, desc=f"{name} (seed {seed})")
            if isinstance(model, NFM):
                model.save(out_dir / name / f"seed{seed}" / "model", extra={"tune_fvu": trainer.best_fvu})
            record(
                name,
                seed,
                model,
                started,
                test.with_shuffled_pairs(seed) if shuffled else test,
                epochs=trainer.epoch,
                best_epoch=trainer.best_epoch,
                tune_fvu=trainer.best_fvu,
            )
    table = pd.DataFrame(rows)
    table.to_csv(out_dir / "ladder.csv", index=False)
    return table


def ladder_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Per model: held-out residual and total FVU, mean and spread over seeds, in ladder order."""
    grouped = table.groupby("model", sort=False)
    summary = pd.DataFrame({
        "label": grouped["label"].first(),
        "residual_fvu": grouped["residual_fvu"].mean(),
        "residual_fvu_sd": grouped["residual_fvu"].std(ddof=1),
        "total_fvu": grouped["total_fvu"].mean(),
        "total_fvu_sd": grouped["total_fvu"].std(ddof=1),
        "seeds": grouped["seed"].nunique(),
        "n_parameters": grouped["n_parameters"].first(),
    })  # fmt: skip
    summary["residual_r2"] = 1 - summary["residual_fvu"]
    return summary.reindex([m for m in LADDER if m in summary.index])


def interaction_shares(table: pd.DataFrame) -> pd.DataFrame:
    """Per seed: the held-out incremental R-squared of the pairwise term (see the module docstring)."""
    fvu = table.pivot_table(index="seed", columns="model", values="residual_fvu")
    need = {"linear", "nfm"}
    if not need <= set(fvu.columns):
        raise ValueError(f"interaction shares need the ladder models {sorted(need)}")
    shares = pd.DataFrame(index=fvu.index[fvu.index >= 0])
    fvu = fvu.loc[shares.index]
    shares["over_linear"] = fvu["linear"] - fvu["nfm"]
    shares["of_explained"] = shares["over_linear"] / (1 - fvu["nfm"])
    if {"additive", "nfm_additive"} <= set(fvu.columns):
        shares["over_additive"] = fvu["additive"] - fvu["nfm_additive"]
    if "shuffled_pairs" in fvu.columns:
        shares["shuffled_control"] = fvu["linear"] - fvu["shuffled_pairs"]
    return shares


def spread(values: pd.DataFrame) -> pd.DataFrame:
    """Mean, standard deviation, min and max over the rows (seeds) of every column."""
    return values.agg(["mean", "std", "min", "max"]).T.rename(columns={"std": "sd"})


@torch.no_grad()
def variance_attribution(model: NFM, data: CodeData, batch_size: int = 1024) -> pd.DataFrame:
    """Per feature: its variance share of the first-order part and of the interaction part on ``data``,
    and how often it fires there (see the module docstring for the measure)."""
    model.eval()
    n, d = model.cfg.n_latents, model.cfg.d_out
    zeros = {"cross": (n,), "term": (n, d), "out": (d,)}
    sums = {part: {key: torch.zeros(shape, dtype=torch.float64) for key, shape in zeros.items()} | {"out_sq": 0.0}
            for part in ("linear", "interaction")}  # fmt: skip
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
    return {part: attribution.nlargest(n, f"{part}_share")["feature"].to_numpy()
            for part in ("linear", "interaction") if f"{part}_share" in attribution}  # fmt: skip


def top_feature_overlap(attribution: pd.DataFrame, n: int = 20) -> dict:
    """Overlap of the top-``n`` feature sets of the two parts, beside what chance would give."""
    top = top_features(attribution, n)
    shared = np.intersect1d(top["linear"], top["interaction"])
    alive = int((attribution["firing_frequency"] > 0).sum())
    return {"n": n, "shared": len(shared), "jaccard": len(shared) / len(np.union1d(top["linear"], top["interaction"])),
            "chance_shared": n * n / max(alive, 1), "shared_features": shared.tolist()}  # fmt: skip


def interaction_strength(model: NFM, features: np.ndarray) -> pd.DataFrame:
    """``<v_i, v_j>`` between the factor embeddings of ``features`` (the FM's pairwise weight)."""
    v = model.embeddings.detach()[torch.as_tensor(np.asarray(features))]
    labels = [str(f) for f in features]
    return pd.DataFrame((v @ v.T).numpy(), index=labels, columns=labels)


def histories(out_dir: str | Path, seed: int) -> dict[str, pd.DataFrame]:
    """Epoch histories of the trained ladder models of one seed, by model key."""
    found = {}
    for name in SEEDED:
        path = Path(out_dir) / name / f"seed{seed}" / "history.csv"
        if path.exists():
            found[name] = pd.read_csv(path)
    return found


def headline(table: pd.DataFrame, shares: pd.DataFrame, overlap: dict) -> dict:
    """The numbers metrics.json keeps: per-model held-out FVUs and the interaction shares' spread."""
    summary = ladder_summary(table)
    out = {f"residual_fvu.{m}": float(summary.loc[m, "residual_fvu"]) for m in summary.index}
    out |= {f"total_fvu.{m}": float(summary.loc[m, "total_fvu"]) for m in summary.index}
    for column, stats in spread(shares).iterrows():
        out |= {f"interaction_share.{column}.{stat}": float(stats[stat]) for stat in ("mean", "sd", "min", "max")}
    out |= {"n_seeds": int(len(shares)), "top_overlap": overlap["shared"],
            "top_overlap_chance": overlap["chance_shared"], "top_n": overlap["n"]}  # fmt: skip
    return out


def verdict(share_spread: pd.DataFrame) -> str:
    """A plain sentence on what the interaction shares do and do not show."""
    gain = share_spread.loc["over_linear"]
    control = share_spread.loc["shuffled_control"] if "shuffled_control" in share_spread.index else None
    lines = [f"Pairwise term over the linear model: {gain['mean']:+.4f} held-out R² of the SAE residual "
             f"(sd {gain['sd']:.4f}, range {gain['min']:+.4f} to {gain['max']:+.4f} over seeds)."]  # fmt: skip
    if "over_additive" in share_spread.index:
        add = share_spread.loc["over_additive"]
        lines.append(f"Over the additive per-feature model: {add['mean']:+.4f} (sd {add['sd']:.4f}).")
    if control is not None:
        lines.append(f"Shuffled-pair control: {control['mean']:+.4f} (sd {control['sd']:.4f}).")
        above = gain["min"] > control["max"]
        lines.append("Every seed's gain exceeds every control seed's: the pairs carry information."
                     if above and gain["min"] > 0 else
                     "The gain does not clear the control on every seed: no evidence here that pairs of "
                     "features carry information beyond single features.")  # fmt: skip
        if above and gain["min"] > 0 and gain["mean"] < 0.01:
            lines.append("But it is small: under 1% of the residual's held-out variance.")
    return " ".join(lines)
