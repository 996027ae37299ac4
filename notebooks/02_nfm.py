# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # 02 · What the SAE misses: an NFM and its baselines
#
# The primary SAE writes each activation as a sparse sum of features; its error `e = x - SAE(x)` is what
# it cannot write. A **Neural Factorization Machine** predicts `e` from the SAE's own code with a
# first-order term (each active feature on its own) plus a **pairwise** term: the bi-interaction pooling
# `½((Σ fᵢvᵢ)² − Σ (fᵢvᵢ)²)`, i.e. the sum over active pairs `fᵢfⱼ vᵢ⊙vⱼ`, through a small MLP. If pairs of
# features carry information that no single feature does, the pairwise term will predict part of `e`
# that first-order models cannot.
#
# Such a claim is only as good as its baselines. Every model below is fitted to the same residual, on the
# same documents, by the same trainer (or in closed form), and measured on **held-out documents** that no
# model and no stopping rule has seen:
#
# | model | asks |
# |---|---|
# | ridge from the raw activation | how much of `e` is a linear function of `x` itself ("dark matter")? |
# | ridge from the SAE code, and the same linear model trained | the best the code does linearly |
# | additive per-feature non-linear | is a feature's effect merely non-linear in its own value? |
# | NFM (linear + pairwise), NFM (additive + pairwise) | what pairs add over each first-order model |
# | MLP with the NFM's parameter count | is the factorised pairwise form special? |
# | NFM with shuffled pairs | the pairwise term's capacity with the pairs broken: what overfitting alone buys |
#
# The seeded models are fitted once per seed, so that notebook 03 can show the spread.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_k_embed: int = 256  # K, width of the factor embeddings and of the interaction MLP
nfm_dropout: float = 0.15  # dropout on the pooled vector while training
nfm_batch_norm: bool = False  # batch norm on the pooled vector
nfm_knots: int = 3  # hinges per feature in the additive models
nfm_lr: float = 1e-3  # Adam learning rate of every trained residual model
nfm_weight_decay: float = 0.0  # decoupled weight decay
nfm_batch_size: int = 1024  # tokens per step
nfm_max_epochs: int = 50  # upper bound on epochs (early stopping usually ends sooner)
nfm_patience: int = 4  # epochs without a tune-set improvement before stopping
tune_fraction: float = 0.15  # share of the documents for early stopping and ridge penalties
test_fraction: float = 0.3  # share of the documents for the reported numbers only
n_seeds: int = 3  # seeds of every trained model (seed, seed + 1, ...)
resume: bool = True  # continue interrupted fits with the same settings
seed: int = 0  # first seed; also splits the tune documents

# %%
from pathlib import Path

import pandas as pd
from IPython.display import display

from featint_utils import contributions, plots
from featint_utils.activations import ActivationStore
from featint_utils.metrics import evaluate_sae
from featint_utils.nfm import NFMConfig
from featint_utils.nfm_training import FitConfig
from featint_utils.residuals import build_residual_data, save_sets, set_sizes, split_fit_tune_test
from featint_utils.sae import TopKSAE

# %% [markdown]
# ## The data: documents the SAE never saw
# An SAE trained for several epochs fits its own training tokens better than new ones, so the residual
# of a training token is a smaller, different signal: a model of it would learn the SAE's over-fitting.
# The NFM stage therefore works on the store's held-out documents only:

# %%
store = ActivationStore(Path(run_dir) / "activations")
sae = TopKSAE.load(Path(run_dir) / "primary_sae" / "sae")
sae_fit = pd.DataFrame({split: evaluate_sae(sae, store, split) for split in ("train", "val")}).T
display(sae_fit[["fvu", "n_tokens"]].rename(index={"train": "SAE's training documents", "val": "held-out documents"}))

# %% [markdown]
# Each held-out token's SAE code and residual (in the SAE's normalised space) are cached beside the run,
# and the documents are split three ways: `fit` trains every model, `tune` decides when to stop and
# picks ridge penalties, `test` is used for the reported numbers only.

# %%
data = build_residual_data(sae, store, Path(run_dir) / "nfm" / "residuals")
sets = split_fit_tune_test(data, tune_fraction, test_fraction, seed)
save_sets(sets, Path(run_dir) / "nfm" / "sets.json")
display(set_sizes(sets))

# %% [markdown]
# ## Fitting the ladder
# Every trained model is saved with a checkpoint after each epoch, so an interrupted run picks up where it
# stopped; the weights kept are those of the best tune-set epoch.

# %%
nfm_config = NFMConfig(sae.cfg.n_latents, store.d_model, k_embed=nfm_k_embed, dropout=nfm_dropout,
                       batch_norm=nfm_batch_norm, knots=nfm_knots)  # fmt: skip
fit_config = FitConfig(batch_size=nfm_batch_size, lr=nfm_lr, weight_decay=nfm_weight_decay,
                       max_epochs=nfm_max_epochs, patience=nfm_patience)  # fmt: skip
seeds = list(range(seed, seed + n_seeds))
ladder = contributions.fit_ladder(sets["fit"], sets["tune"], sets["test"], nfm_config, fit_config, seeds,
                                  Path(run_dir) / "nfm", resume=resume)  # fmt: skip

# %%
fig = plots.fit_curves(contributions.histories(Path(run_dir) / "nfm", seed),
                       title=f"residual models, seed {seed}: fit (thin), tune (thick); dot: kept epoch")  # fmt: skip
plots.save(fig, run_dir, "02_fit_curves")

# %% [markdown]
# ## First look
# Held-out residual FVU (1 is "predicts nothing beyond the mean") and the FVU of the whole activation once
# each model's prediction is added to the SAE's reconstruction. Notebook 03 takes these apart.

# %%
summary = contributions.ladder_summary(ladder)
display(summary[["label", "residual_fvu", "residual_fvu_sd", "total_fvu", "seeds", "n_parameters"]]
        .style.format({"residual_fvu": "{:.4f}", "residual_fvu_sd": "{:.4f}", "total_fvu": "{:.4f}",
                       "n_parameters": "{:,}"}, na_rep="–"))  # fmt: skip
