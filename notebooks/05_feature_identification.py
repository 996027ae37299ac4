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
# # 05 · Feature identification
#
# Which features track formality, emotion, and their interaction is measured on the project's stimulus
# set: every item is one proposition written four ways (formal/casual × emotional/neutral). Before any
# feature is tested, this notebook checks that the stimuli vary the two factors **independently**:
# otherwise a "formality feature" could be an emotion feature in disguise.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
model: str = "embedded"  # the model whose pooled embeddings the probe reads
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"
probe_folds: int = 5  # item-grouped cross-validation folds of the linear probe
n_boot: int = 2000  # item-level bootstrap resamples for effect-size intervals

# %%
from IPython.display import display

from featint_utils import manipulation, models, plots
from featint_utils.corpus import load_stimuli

# %% [markdown]
# ## Manipulation checks
#
# Two transparent text scores, neither involving the model:
# an **emotion score** (VADER's |compound|, a human-rated sentiment lexicon) and a **formality score**
# (contractions, slang and interjections, exclamation marks, first/second person, sentence length, word
# length and Latinate suffixes; see `featint_utils.manipulation`). Each factor should move its own score
# strongly (|d| ≥ 1) and the other one barely (|d| ≤ 0.3).

# %%
stimuli = load_stimuli()
scored = manipulation.score_texts(stimuli)
print(f"{stimuli.item_id.nunique()} items × 4 variants, {stimuli.topic.nunique()} topics")
effects = manipulation.effect_table(scored, n_boot=n_boot)
display(effects.round(3))

# %% [markdown]
# A linear probe on the model's mean-pooled sentence embeddings, cross-validated so that the four variants
# of an item are never split between training and test folds, shows whether the model itself separates
# each factor.

# %%
loaded = models.load_model(model, device=models.resolve_device(device))
embeddings = models.sentence_embeddings(loaded, stimuli["text"].tolist())
probes = manipulation.probe_table(embeddings.numpy(), stimuli, n_splits=probe_folds)
display(probes.round(3))

# %%
fig = plots.manipulation_checks(scored, effects, probes)
plots.save(fig, run_dir, "05_manipulation_checks")
