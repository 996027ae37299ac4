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
# # 02 · What the SAE misses: an NFM and its baselines, fitted as nested models
#
# The primary SAE writes each activation as a sparse sum of features; its error `e = x - SAE(x)` is what
# it cannot write. A **Neural Factorization Machine** predicts `e` from the SAE's own code with a
# first-order term (each active feature on its own) plus a **pairwise** term: the bi-interaction pooling
# `½((Σ fᵢvᵢ)² − Σ (fᵢvᵢ)²)`, i.e. the sum over active pairs `fᵢfⱼ vᵢ⊙vⱼ`, through a small MLP. If pairs of
# features carry information that no single feature does, the pairwise term will predict part of `e`
# that first-order models cannot.
#
# How that is measured decides whether the answer means anything, so every pairwise model here is
# **nested** in a **converged** first-order fit:
#
# * the linear first-order model is a ridge from the code, solved in closed form (penalty chosen on the tune
#   documents); the additive per-feature model adds hinges to it;
# * each pairwise model *starts as* its first-order model (that part copied and kept fixed, the new branch's
#   output at zero) and the start is the first candidate of early stopping, so it can only end where the
#   tune documents say pairs help; learning rates are chosen on tune;
# * an **explicit-pairs ridge** (the code plus the products of the most frequently co-firing pairs, closed
#   form) checks the NFM's pairwise term transparently;
# * a **null control** reruns the same fits on a target whose first-order part is kept and whose remainder is
#   permuted across tokens: what the estimator reports when there is nothing to find;
# * **planted interactions** of known size are added to this run's residual to measure what the estimator
#   can detect here (the power curve and detection limit in notebook 03).
#
# Every model is measured on **held-out documents** that no model and no stopping rule has seen, against
# the error of predicting zero (the SAE alone).

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_k_embed: int = 256  # K, width of the factor embeddings and of the interaction MLP
nfm_dropout: float = 0.15  # dropout on the pooled vector while training
nfm_batch_norm: bool = False  # batch norm on the pooled vector
nfm_knots: int = 3  # hinges per feature in the additive models
nfm_lr_grid: str = "1e-3,3e-3"  # learning rates tried per model (first seed); the best on tune is kept
nfm_weight_decay: float = 0.0  # decoupled weight decay
nfm_batch_size: int = 1024  # tokens per step
nfm_max_epochs: int = 60  # upper bound on epochs (the tune-set schedule usually ends sooner)
nfm_patience: int = 5  # epochs without a tune-set improvement before training stops or the learning rate decays
nfm_lr_decays: int = 0  # learning-rate divisions by 3 on a plateau before stopping (none helped in our real runs)
tune_fraction: float = 0.15  # share of the documents for early stopping, learning rates and penalties
test_fraction: float = 0.3  # share of the documents for the reported numbers only
nfm_split_seed: int = 0  # seeds the fit/tune/test split of the documents
nfm_seeds: str = "0,1"  # seeds of every trained model, null control and planted size
pair_ridge_pairs: int = 1024  # co-firing pairs whose products the explicit-pairs ridge adds
power_shares: str = "0.001,0.003,0.01,0.03"  # planted sizes: pairwise-only variance as a share of the residual's
power_pairs: int = 16  # pairs per planted interaction (among the 256 most frequently co-firing)
resume: bool = True  # continue from a checkpoint of an interrupted run with the same settings
keep_checkpoints: bool = False  # keep finished trainings' optimiser state (only to train further)
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"

# %%
import pandas as pd
from IPython.display import display

from featint_utils.dictionary.metrics import evaluate_sae
from featint_utils.params import seeds
from featint_utils.plots import figure, residual_fits
from featint_utils.residual import contributions
from featint_utils.residual.code_data import set_sizes
from featint_utils.workbench import stages
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "02_nfm", globals())

# %% [markdown]
# ## The data: documents the SAE never saw
# An SAE trained for several epochs fits its own training tokens better than new ones, so the residual
# of a training token is a smaller, different signal: a model of it would learn the SAE's over-fitting.
# The NFM stage therefore works on the store's held-out documents only:

# %%
store = run.store()
sae = run.primary_sae().to(run.device)  # refused if the store changed after the SAE was trained
sae_fit = pd.DataFrame({split: evaluate_sae(sae, store, split) for split in ("train", "val")}).T
display(sae_fit[["fvu", "n_tokens"]].rename(index={"train": "SAE's training documents", "val": "held-out documents"}))

# %% [markdown]
# Each held-out token's SAE code and residual (in the SAE's normalised space) are cached beside the run,
# and the documents are split three ways: `fit` trains every model, `tune` decides when to stop and
# picks learning rates and ridge penalties, `test` is used for the reported numbers only. Everything here
# records the store and SAE it was made from: after a new SAE or store, every model below is fitted again.

# %%
sets = stages.build_residual_sets(run)
display(set_sizes(sets))

# %% [markdown]
# ## Fitting
# The ladder on the residual (every seeded model once per seed), the null control, and one planted
# interaction per size. Every trained model is checkpointed after each epoch, so an interrupted run picks up
# where it stopped; the weights kept are those of the best tune-set epoch, possibly the start. (Run with
# `--nproc N`, the fits were made by N ranks before this notebook started: they are read back here.)

# %%
ladder = stages.fit_ladder(run, sets)
print("learning rates chosen on tune:", ladder.lrs)

# %%
first_seed = seeds(nfm_seeds)[0]
fig = residual_fits.fit_curves(
    contributions.histories(run.nfm_dir, first_seed),
    title=f"seed {first_seed}: fit (thin), tune (thick); dot: kept epoch (0 is the start)",
)
figure.save(fig, run.root, "02_fit_curves")

# %% [markdown]
# ## First look
# Held-out residual FVU (1 is "predicts nothing beyond the mean"), the gain over predicting zero (the SAE
# alone; a model without a positive gain is a failed fit), and the FVU of the whole activation once each
# model's prediction is added to the SAE's reconstruction. Notebook 03 takes these apart, with intervals.

# %%
summary = contributions.ladder_summary(ladder.table)
display(
    summary[
        ["label", "residual_fvu", "residual_fvu_sd", "gain_over_zero", "total_fvu", "seeds", "n_parameters"]
    ].style.format(
        {
            "residual_fvu": "{:.4f}",
            "residual_fvu_sd": "{:.4f}",
            "gain_over_zero": "{:+.4f}",
            "total_fvu": "{:.4f}",
            "n_parameters": "{:,}",
        },
        na_rep="–",
    )
)

# %%
run.close()
