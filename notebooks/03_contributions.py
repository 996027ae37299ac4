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
# # 03 · Linear or interaction? A variance decomposition of the SAE residual
#
# The original study reported its residual model as "95.5% linear / 4.5% interaction" from mean absolute
# outputs. Here every quantity is a **variance** on **held-out documents**:
#
# * the **baseline ladder**: residual FVU of every model of notebook 02, and the FVU of the whole activation
#   with the SAE alone and with the SAE plus each model;
# * the **interaction share**: the incremental R² of the pairwise term, `FVU(first-order) − FVU(first-order +
#   pairwise)`, over the linear and over the additive model, per seed; the shuffled-pair control gives the
#   same increment for a pairwise term that has no real pairs to use;
# * **which features** carry each part of the NFM, by their share of that part's held-out variance (see
#   `featint_utils.contributions`), and whether the two sets of features overlap.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
n_top_features: int = 20  # features shown and compared per part
seed: int = 0  # the seed whose NFM is taken apart

# %%
from pathlib import Path

import pandas as pd
from IPython.display import display

from featint_utils import contributions, plots
from featint_utils.io import update_metrics
from featint_utils.nfm import NFM
from featint_utils.residuals import load_sets, open_residual_data

nfm_dir = Path(run_dir) / "nfm"
ladder = pd.read_csv(nfm_dir / "ladder.csv")
test = load_sets(open_residual_data(nfm_dir / "residuals"), nfm_dir / "sets.json")["test"]

# %% [markdown]
# ## The baseline ladder

# %%
summary = contributions.ladder_summary(ladder)
display(summary[["label", "residual_fvu", "residual_fvu_sd", "residual_r2", "total_fvu", "total_fvu_sd"]]
        .style.format("{:.4f}", subset=["residual_fvu", "residual_fvu_sd", "residual_r2", "total_fvu",
                                        "total_fvu_sd"], na_rep="–"))  # fmt: skip
fig = plots.baseline_ladder(ladder, contributions.LADDER)
plots.save(fig, run_dir, "03_baseline_ladder")

# %% [markdown]
# ## The interaction share
# Positive means the pairwise term predicts held-out residual variance that the first-order model does not.
# The control row should sit at or below zero: whatever a pairwise term gains there, it gains without
# real pairs.

# %%
shares = contributions.interaction_shares(ladder)
display(shares.style.format("{:+.5f}"))
share_spread = contributions.spread(shares)
display(share_spread.style.format("{:+.5f}"))
fig = plots.interaction_shares(shares)
plots.save(fig, run_dir, "03_interaction_share")

# %% [markdown]
# ## Which features carry each part
# For the NFM of the first seed, each feature's share of the held-out variance of the first-order part
# (its exact term) and of the interaction part (what the interaction output loses without it).

# %%
nfm = NFM.load(nfm_dir / "nfm" / f"seed{seed}" / "model")
attribution = contributions.variance_attribution(nfm, test)
attribution.to_csv(nfm_dir / "attribution.csv", index=False)  # notebook 06 clamps a linear-path feature from it
fig = plots.top_feature_bars(attribution, n_top_features)
plots.save(fig, run_dir, "03_top_features")
overlap = contributions.top_feature_overlap(attribution, n_top_features)
display(pd.Series(overlap, name="top-feature overlap").to_frame())

# %% [markdown]
# The factor embeddings' inner products `⟨vᵢ, vⱼ⟩` among the top interaction features: in a plain
# factorization machine this is the weight of the pair `fᵢfⱼ`; in the NFM it is the pair's pooled vector
# summed over its K dimensions, before the MLP.

# %%
top = contributions.top_features(attribution, n_top_features)["interaction"]
fig = plots.interaction_matrix(contributions.interaction_strength(nfm, top))
plots.save(fig, run_dir, "03_interaction_matrix")

# %%
headline = contributions.headline(ladder, shares, overlap)
update_metrics(run_dir, "contributions", headline)
print(contributions.verdict(share_spread))
