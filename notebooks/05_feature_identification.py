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
# otherwise a "formality feature" could be an emotion feature in disguise. Then every primary and
# secondary feature is tested with the **item** as the unit of analysis.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_seed: int = 0  # the NFM (one of 02's nfm_seeds) that 03-06 take apart
probe_folds: int = 5  # item-grouped cross-validation folds of the linear probe
n_boot: int = 2000  # bootstrap resamples for every interval
fdr_q: float = 0.05  # false-discovery (05) or family-wise (06) level
n_top_features: int = 20  # features shown and compared per part
n_panels: int = 4  # secondary features shown in full in a headless run
replication_seed: int = 0  # seeds the split of the items for the replication check
max_items: int = 0  # stimulus items measured (0: all)
stimulus_set: str = "default"  # "default" (a planted model's own, else the project's), "minimal_pairs" or a CSV path
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"
model_dtype: str = "float32"  # language model weights: float32, bfloat16 or float16 (not the store's dtype)

# %%
import os

import pandas as pd
from IPython.display import Markdown, display

from featint_utils.data import models
from featint_utils.data.activation_store import require_model
from featint_utils.dictionary import feature_labels
from featint_utils.integration import counterfactual, identification, manipulation, secondary
from featint_utils.io import update_metrics
from featint_utils.plots import figure, stimulus_effects
from featint_utils.progress import headless
from featint_utils.workbench import dashboards, stages, widgets
from featint_utils.workbench.feature_stats import FAMILIES
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "05_feature_identification", globals())

# %% [markdown]
# ## Manipulation checks
#
# Two transparent text scores, neither involving the model:
# an **emotion score** (VADER's |compound|, a human-rated sentiment lexicon) and a **formality score**
# (contractions, slang and interjections, exclamation marks, first/second person, sentence length, word
# length and Latinate suffixes; see `featint_utils.integration.manipulation`). Each factor should move its own score
# strongly (|d| ≥ 1) and the other one barely (|d| ≤ 0.3).

# %%
store = run.store()
require_model(store, "05")  # a run on activations from a file stops here
loaded = stages.load_language_model(run, store.manifest["model"])
stimuli = stages.stimuli(loaded, max_items, stimulus_set)  # the project's set, or a planted model's own
scored = manipulation.score_texts(stimuli)
print(f"{stimuli.item_id.nunique()} items × 4 variants, {stimuli.topic.nunique()} topics")
effects = manipulation.effect_table(scored, n_boot=n_boot)
display(effects.round(3))

# %% [markdown]
# A linear probe on the model's mean-pooled sentence embeddings, cross-validated so that the four variants
# of an item are never split between training and test folds, shows whether the model itself separates
# each factor.

# %%
embeddings = models.sentence_embeddings(loaded, stimuli["text"].tolist())
probes = manipulation.probe_table(embeddings.numpy(), stimuli, n_splits=probe_folds)
display(probes.round(3))

# %%
fig = stimulus_effects.manipulation_checks(scored, effects, probes)
figure.save(fig, run.root, "05_manipulation_checks")

# %% [markdown]
# ## Every feature, per text
# Each stimulus text goes through the model; each of its real tokens (no padding, no special tokens) is
# encoded by the primary SAE and, through the NFM, by the secondary SAE; a feature's value for the text is
# its **mean** over the text's tokens (the max is kept too).
#
# A third family, `primary_pre`, reads the layer itself along each primary feature's **encoder direction**
# (its pre-activation, before ReLU and top-k). It is linear in the activation, so the SAE's own thresholding
# cannot make it non-additive: a code can be non-additive in the two factors only because the top-k lets
# features crowd each other out where both factors add theirs (on five planted models with no integration at
# all, 248-337 of 512 primary codes were interaction-selective), whereas the pre-activation's text mean is
# non-additive only where the layer's activations are.

# %%
decomposition = run.decomposition(nfm_seed)  # primary SAE -> NFM -> secondary SAE, as 04 left them
encoders = {
    "primary": (decomposition.primary_code, decomposition.primary.cfg.n_latents),
    "primary_pre": (decomposition.primary_pre_activation, decomposition.primary.cfg.n_latents),
    "secondary": (decomposition.secondary_code, decomposition.secondary.cfg.n_latents),
}
per_text = identification.text_activations(loaded, store.layer, stimuli["text"].tolist(), encoders)

# %% [markdown]
# ## Formality × emotion, feature by feature
# For every feature: the within-item (repeated-measures) ANOVA of `activation ~ formality * emotion`, each
# effect tested against its own interaction with the items (`statsmodels`' `AnovaRM`, in closed form: each
# item's variants use their own words, so items differ in how much each factor moves them, and a pooled error
# term would put that spread into every test), partial η² per effect, and Benjamini-Hochberg q-values
# across the features of each family. Features that never fire on the stimuli are tested too (p = 1).

# %%
effects, counts = {}, []
for family in encoders:
    for pooling in ("mean", "max"):
        cell_values, items = identification.cells(per_text[family][pooling], stimuli)
        table = identification.feature_effects(cell_values)
        if pooling == "mean":
            effects[family] = table
        counts.append(
            {
                "family": family,
                "pooling": pooling,
                "features": len(table),
                **{
                    f"{e} (q < {fdr_q})": int((table[f"{e}_q"] < fdr_q).sum())
                    for e in ("formality", "emotion", "interaction")
                },
            }
        )
counts = pd.DataFrame(counts).set_index(["family", "pooling"])
run.begin_identification(nfm_seed)
for family, table in effects.items():  # notebook 06 clamps the strongest secondary interaction features
    table.to_csv(run.effects_path(nfm_seed, family), index=False)
display(counts)
for family, table in effects.items():  # the 6 strongest features named by their top held-out tokens
    named = identification.rank(table, "interaction", 6, fdr_q)["feature"]
    code = encoders["primary" if family == "primary_pre" else family][0]  # a feature is named by its code
    labels = feature_labels.labels_for(code, store, named, loaded.tokenizer)
    title = f"{family} features: formality × emotion interaction"
    fig = stimulus_effects.effect_volcano(table, "interaction", fdr_q, title=title, labels=labels)
    figure.save(fig, run.root, f"05_{family}_interaction_volcano")

# %% [markdown]
# **What a flag can mean.** BH bounds the share of false flags among features whose null is true. For a
# pre-activation the null is "the layer is additive in the two factors along this direction"; for a code it is
# "this code is additive", which a TopK code or a code of the NFM's pairwise products is not, even where the
# layer is. `benchmarks/planted_integration.py` ran this notebook on planted models with the same features
# and no integration at all: the pre-activations flagged nothing in any of them, while the primary codes and
# the secondary features were "interaction-selective" in every one (the README's "The second half on planted
# truth"). So only a `primary_pre` flag says that the layer itself is non-additive along that direction; a
# primary or secondary flag says that the feature's code is, which the SAE's top-k and the NFM's products make
# on their own. And a `primary_pre` flag is about the layer only where an item's variants differ in nothing but
# the two factors: written variants use different words, so their 2x2 is non-additive in the token embeddings
# already (`benchmarks/lexical_baseline.py`: on the project's stimuli as many directions are flagged there as
# at MiniLM's layer 3; on the minimal pairs, none). On minimal pairs, the next section asks the question of
# every family: what part of its interaction did the layer make?

# %% [markdown]
# ## Which part of an interaction the layer made
# On **token-aligned minimal pairs** (an item's four variants differ only in one formality word and one
# emotion word, each the same number of tokens: a planted model's stimuli, or `stimulus_set="minimal_pairs"`)
# an additive layer would hold, at every token of the formal-emotional variant, the formal-neutral activation
# plus what emotion adds to the casual one: `x_FE* = x_FN + (x_CE - x_CN)`. Reading every family on that
# *additive counterfactual* splits each feature's interaction contrast exactly into a **layer-made** part,
# `f(FE) - f(FE*)`, which is zero on every item wherever the layer is additive, however non-linear the
# instrument, and an **instrument-made** part, what the top-k, the NFM's products or the secondary SAE make
# from an additive layer. The layer-made part is tested across items (t-test, BH across each family's
# features), so a flag here is evidence of the layer's integration whatever the family. The four variants
# run in float64 so that an additive layer's counterfactual is exact at the float32 precision the encoders
# read (`featint_utils/integration/counterfactual.py`). On variants that differ in more words (the project's
# default set) the counterfactual is not an additive layer, and this part is not measured.

# %%
try:
    pairs = counterfactual.minimal_pairs(loaded.tokenizer, stimuli)
except counterfactual.NotMinimalPairs as reason:
    pairs = None
    print(f"Not measured, the stimuli are not token-aligned minimal pairs: {reason}.")
if pairs is not None:
    values = counterfactual.additive_counterfactual(loaded, store.layer, pairs, encoders)
    for family, v in values.items():
        split = counterfactual.layer_made_effects(v["cells"], v["additive"]).drop(columns=["interaction_effect"])
        effects[family] = effects[family].merge(split, on="feature")
        effects[family].to_csv(run.effects_path(nfm_seed, family), index=False)
    layer_made = counterfactual.split_summary(effects, fdr_q)
    display(
        layer_made.style.format("{:.0f}").format(
            "{:.3f}", subset=["instrument-made share", "interaction / main effect"]
        )
    )
    fig = stimulus_effects.interaction_split(effects, fdr_q)
    figure.save(fig, run.root, "05_interaction_split")

# %% [markdown]
# The strongest features per effect (q < the level), with their condition means.

# %%
columns = [
    "feature",
    "formality_eta2",
    "emotion_eta2",
    "interaction_eta2",
    "interaction_effect",
    "interaction_q",
    "mean_formal_emotional",
    "mean_formal_neutral",
    "mean_casual_emotional",
    "mean_casual_neutral",
]
for family, table in effects.items():
    for effect in ("formality", "emotion", "interaction"):
        top = identification.rank(table, effect, n_top_features, fdr_q)
        print(f"{family} features, ranked by {effect} ({len(top)} shown)")
        display(top[columns].style.format(precision=3).hide(axis="index"))

# %% [markdown]
# ## Does the selection hold on new items?
# Effect sizes of features selected on the data that selected them are inflated. Features are selected on
# a random half of the items and tested again on the other half only.

# %%
replication = {}
for family in encoders:
    cell_values, _ = identification.cells(per_text[family]["mean"], stimuli)
    replication[family] = identification.split_half_replication(
        cell_values, "interaction", n_top_features, fdr_q, replication_seed
    )
    print(
        f"{family}: {int(replication[family]['replicated'].sum())} of {len(replication[family])} "
        "interaction-selected features replicate on the held-out items"
    )
    display(replication[family].style.format(precision=3).hide(axis="index"))

# %%
update_metrics(
    run.root,
    "identification",
    {
        **{
            f"{family}.{e}_selective": int((effects[family][f"{e}_q"] < fdr_q).sum())
            for family in effects
            for e in ("formality", "emotion", "interaction")
        },
        **{f"{family}.interaction_replicated": int(replication[family]["replicated"].sum()) for family in replication},
        **{f"{family}.interaction_selected_on_half": len(replication[family]) for family in replication},
        **{  # None where not measured, so that no count from another stimulus set stays behind
            f"{family}.layer_made_selective": None
            if pairs is None
            else int(layer_made.loc[family, f"layer-made (q < {fdr_q})"])
            for family in encoders
        },
        "minimal_pairs": pairs is not None,
        "fdr_q": fdr_q,
    },
)

# %% [markdown]
# ## Feature browser
# In JupyterLab: pick any feature. In a headless run (and the HTML report) the strongest secondary
# interaction features are shown in full: their top stimulus texts with token highlighting, the
# distribution of their per-text activation, their 2x2 condition means, and the primary features and
# pairs that drive them (exact contributions to the pre-activation over their 50 strongest held-out tokens).


# %%
def family_view(name, encode, effects_table, drivers=None):
    return widgets.FeatureFamily(
        name,
        per_text[name]["mean"],
        stimuli,
        effects_table,
        lambda text, feature: identification.token_activations(loaded, store.layer, text, encode, feature),
        drivers,
    )


def secondary_drivers(feature):
    return secondary.drivers(
        decomposition.nfm, decomposition.secondary, feature, secondary.top_codes(decomposition, store, feature, n=50)
    )


families = {
    "secondary": family_view("secondary", decomposition.secondary_code, effects["secondary"], secondary_drivers),
    "primary": family_view("primary", decomposition.primary_code, effects["primary"]),
}
suggested = {
    name: identification.rank(effects[name], "interaction", n_top_features, fdr_q)["feature"].tolist()
    for name in families
}
if headless():
    shown = suggested["secondary"][:n_panels] or effects["secondary"].nlargest(n_panels, "interaction_eta2")["feature"]
    widgets.show_static(families["secondary"], list(shown))
else:
    display(widgets.browser(families, suggested))

# %% [markdown]
# ## Feature dashboards
# One static page per identified feature, primary and secondary, that opens from disk with no network: its
# top and quantile-sampled activating tokens in context on the held-out documents, an activation histogram,
# its decoder neighbours and, for causal LMs, the output tokens it boosts and suppresses.

# %%
# primary first: the secondary pages link the primary features that drive them
pages = {family: dashboards.build_dashboards(run, family, nfm_seed=nfm_seed, loaded=loaded) for family in FAMILIES}
links = [f"[{family} features]({os.path.relpath(index, run.root / 'reports')})" for family, index in pages.items()]
display(Markdown("Dashboards: " + " · ".join(links)))

# %%
run.close()
