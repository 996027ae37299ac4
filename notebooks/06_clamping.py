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
# # 06 · Clamping secondary features: do they have non-additive effects on the output?
#
# The layer's output is replaced by `SAE(x) + NFM'(f) + error`, where `error = x − SAE(x) − NFM(f)` comes
# from the same clean pass: with nothing clamped the model is reproduced exactly. Clamping a secondary
# feature edits the NFM vector along that feature's decoder direction and sends the result through the
# rest of the NFM, so only the interaction path changes.
#
# **Readout** (four numbers per unit, one per condition bucket): for an encoder, the cosine of each
# stimulus text's pooled output embedding to the four condition centroids (each centroid computed from
# the *other* items), averaged over the item's four texts; for a causal LM, the mean next-token
# log-probability of each word bucket at neutral prompt frames.
#
# **Statistics**, per clamp level: the change from the unclamped splice, per unit, as a 2x2 (bucket
# formality × bucket emotion) with the unit as the block; partial η² and the per-unit interaction contrast
# `(FE − FN) − (CE − CN)` with a bootstrap CI and a sign-flip permutation test, Holm-corrected over every
# feature, control and level. **Controls**: a random edit of the same size at every token, and a clamp of
# the feature that carries the most first-order (linear-path) variance.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_seed: int = 0  # the NFM (one of 02's nfm_seeds) that 03-06 take apart
clamp_features: int = 3  # strongest interaction-selective secondary features to clamp
clamp_levels: str = "-1,-0.5,0.5,1"  # added multiples of each feature's largest observed activation
max_items: int = 0  # stimulus items measured (0: all)
stimulus_set: str = "default"  # "default" (a planted model's own, else the project's), "minimal_pairs" or a CSV path
n_permutations: int = 10_000  # sign-flip permutations per test
n_boot: int = 2000  # bootstrap resamples for every interval
fdr_q: float = 0.05  # false-discovery (05) or family-wise (06) level
clamp_seed: int = 0  # seeds the random-edit control and the statistics
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"
model_dtype: str = "float32"  # language model weights: float32, bfloat16 or float16 (not the store's dtype)

# %%
from IPython.display import display

from featint_utils.data.activation_store import require_model
from featint_utils.data.corpus import load_prompt_frames, load_wordlists
from featint_utils.data.interventions import PrefixCache
from featint_utils.dictionary import feature_labels, features
from featint_utils.integration import clamp_split, clamping, counterfactual, identification
from featint_utils.io import update_metrics
from featint_utils.params import numbers
from featint_utils.plots import clamps, figure
from featint_utils.workbench import stages
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "06_clamping", globals())

# %% [markdown]
# ## What is clamped

# %%
store = run.store()
require_model(store, "06")
loaded = stages.load_language_model(run, store.manifest["model"])
decomposition = run.decomposition(nfm_seed)
run.begin_clamping(nfm_seed)

secondary_effects = run.feature_effects(nfm_seed, "secondary")
chosen = identification.rank(secondary_effects, "interaction", clamp_features, fdr_q)["feature"].tolist()
if len(chosen) < clamp_features:  # too few significant: fill with the largest interaction effects, flagged below
    rest = secondary_effects[~secondary_effects["feature"].isin(chosen)].nlargest(clamp_features, "interaction_eta2")
    chosen += rest["feature"].tolist()[: clamp_features - len(chosen)]
linear_feature = int(run.attribution(nfm_seed).nlargest(1, "linear_share")["feature"].iloc[0])
secondary_max = features.max_activations(
    decomposition.secondary.encode, run.secondary_store(nfm_seed), decomposition.secondary.cfg.n_latents
)
levels = list(numbers(clamp_levels))
sample = next(store.batches("val", 4096, shuffle=False, normalize=False))  # held-out tokens to size the edits
linear_unit = clamping.matched_linear_unit(decomposition, chosen, secondary_max, linear_feature, sample)
plan = clamping.clamp_plan(chosen, secondary_max, linear_feature, linear_unit, levels)
plan["edit_norm"] = [
    clamping.edit_norm(decomposition, r.clamp, sample, r.control or None)
    for r in plan.fillna({"control": ""}).itertuples()
]
shown = secondary_effects.set_index("feature").loc[chosen, ["interaction_eta2", "interaction_q", "formality_eta2"]]
display(shown.assign(max_activation=secondary_max[chosen]))
print(
    f"linear-path control: primary feature {linear_feature} (largest first-order variance share), "
    f"added {linear_unit:.3f} per level unit so that its edits match the secondary ones in size"
)
display(plan[["name", "edit_norm"]].style.format({"edit_norm": "{:.3f}"}).hide(axis="index"))

# %% [markdown]
# ## The readout, clean and clamped
#
# Every condition reads the same texts, and a clamp changes nothing below the splice: the model's layers up to
# it, and the clean decomposition of its tokens, are computed once per batch and replayed for each condition
# (`PrefixCache`: the replayed forward is the computed one bit for bit).

# %%
prefix = PrefixCache()  # every condition reads the same inputs: the layers below the splice run once
if loaded.is_causal_lm:
    frames, bucket_ids = load_prompt_frames(), clamping.bucket_token_ids(loaded.tokenizer, load_wordlists())
    readout_name = "bucket log-probability"

    def readout(clamp, control):
        return clamping.causal_readout(
            loaded, store.layer, frames, bucket_ids, decomposition, clamp, control, clamp_seed, prefix
        )
else:
    stimuli = stages.stimuli(loaded, max_items, stimulus_set)
    texts = stimuli["text"].tolist()
    clean_pooled = clamping.pooled_embeddings(loaded, store.layer, texts, prefix=prefix)
    centroids = clamping.leave_item_out_centroids(clean_pooled, stimuli)
    readout_name = "cosine to the condition centroid"

    def readout(clamp, control):
        pooled = clamping.pooled_embeddings(
            loaded, store.layer, texts, decomposition, clamp, control, seed=clamp_seed, prefix=prefix
        )
        return clamping.encoder_readout(pooled, centroids, stimuli)


clean, changes = clamping.run_clamps(readout, plan)
tidy = clamping.tidy_changes(plan, changes)
tidy.to_csv(run.clamping_table(nfm_seed, "changes"), index=False)
labels = {  # clamped features named by their top held-out tokens
    "secondary": feature_labels.labels_for(decomposition.secondary_code, store, chosen, loaded.tokenizer),
    "primary": feature_labels.labels_for(decomposition.primary_code, store, [linear_feature], loaded.tokenizer),
}
fig = clamps.dose_response(tidy, readout_name, labels)
figure.save(fig, run.root, "06_dose_response")

# %% [markdown]
# ## Non-additive effects
# Each row is one clamp condition; the interaction contrast is the change's difference of differences per
# unit, averaged over units. Colour: what was clamped (secondary feature, random control, linear path);
# filled: Holm-corrected sign-flip p < the level. For each secondary condition, `vs_control_p` tests whether
# its contrast exceeds that of the random edit of the same size, unit by unit.

# %%
references = clamping.random_references(plan)
table = clamping.clamp_statistics(changes, n_permutations, n_boot, clamp_seed, references)
table.to_csv(run.clamping_table(nfm_seed, "statistics"), index=False)
display(table.style.format(precision=4).hide(axis="index"))
fig = clamps.effect_forest(table, labels, alpha=fdr_q)
figure.save(fig, run.root, "06_interaction_effects")
strongest_level = max(levels, key=abs)
fig = clamps.interaction_2x2(tidy, strongest_level, readout_name, labels)
figure.save(fig, run.root, "06_interaction_2x2")

# %% [markdown]
# ## Which part of a clamp's effect the layer made
# "Larger than its size-matched random control" is not a null for the interaction path: on planted models
# with no integration at all (`benchmarks/planted_integration.py`), a secondary clamp beat its random edit in
# every model, because a secondary feature's size differs between the four conditions (its code is
# non-additive whatever the layer does, notebook 05) and a random edit's does not. On **token-aligned minimal
# pairs** (notebook 05's last section) every condition is read a second time with each item's
# formal-emotional text at the layer's *additive counterfactual* `x_FE* = x_FN + (x_CE − x_CN)` (every token,
# from the float64 model) instead of its own activations. The difference is the part the layer made:
#
# * **no clamp**: the readout's interaction that exists because the layer is non-additive (the layer's own
#   non-additive effect on the output);
# * **each clamp**: the part of its change's interaction contrast that exists because the layer is
#   non-additive; `share_of_own` puts it against the layer's own. Each clamped secondary feature is also
#   **ablated** (set to 0 at every token, beside a random edit matched to it): if the layer's non-additive
#   effect went through that feature alone, the ablation's share would be -1.
#
# Where the layer is additive both are exactly zero on every item, whatever the clamp, so nothing here can be
# flagged without integration. A layer-made part says the clamp's effect depends on what the layer made; the
# random and linear-path edits read that too (the readout is a cosine), so a secondary feature *carries*
# the layer's integration only where its part exceeds its random control's (`vs_control_p`). Tests:
# sign-flip over items, Holm over the conditions.

# %%
pairs = None
if loaded.is_causal_lm:
    print("Not measured: a causal LM's readout reads prompt frames, not the 2x2 stimuli.")
else:
    try:
        pairs = counterfactual.minimal_pairs(loaded.tokenizer, stimuli)
    except counterfactual.NotMinimalPairs as reason:
        print(f"Not measured, the stimuli are not token-aligned minimal pairs: {reason}.")
layer_made, split_plan = None, clamping.with_ablations(plan, chosen)
run.clamping_table(nfm_seed, "layer_made").unlink(missing_ok=True)  # one from other stimuli must not stay
if pairs is not None:
    layer_made, _, _ = clamp_split.layer_made_clamps(
        loaded,
        store.layer,
        stimuli,
        pairs,
        centroids,
        decomposition,
        split_plan,
        clamping.random_references(split_plan),
        clamp_seed,
        n_permutations,
        n_boot,
    )
    layer_made.to_csv(run.clamping_table(nfm_seed, "layer_made"), index=False)
    display(layer_made.style.format(precision=4).hide(axis="index"))
    fig = clamps.effect_forest(
        layer_made, labels, alpha=fdr_q, what="the part the layer made (real minus additive counterfactual)"
    )
    figure.save(fig, run.root, "06_layer_made_effects")

# %% [markdown]
# ## What was and was not shown
# The contrasts of the first table say how the readout responds to editing the NFM's path, not that the layer
# integrates the two factors. The layer-made parts do, on minimal pairs whose variants share everything but the
# two slots: on 5 planted models without integration none was flagged, and on 15 with one the layer's own part
# equalled the planted effect on the readout (the README's "The second half on planted truth"). Where the
# variants' contexts differ (a planted model's per-text noise), or the two slot words interact in ways that are
# not formality x emotion, the cosine readout turns that into a layer-made part too. An ablation's share says
# how much of the layer's own effect goes through the feature's path in the decomposition.

# %%
print(clamping.summary(table, plan, fdr_q))
if layer_made is not None:
    print(clamp_split.layer_made_summary(layer_made, split_plan, fdr_q))
merged = table.merge(plan[["name", "group"]], left_on="condition", right_on="name")
update_metrics(
    run.root,
    "clamping",
    {
        "nfm_seed": nfm_seed,
        "features": [int(f) for f in chosen],
        "linear_control_feature": linear_feature,
        "levels": levels,
        **{
            f"{group}.max_abs_interaction_contrast": float(rows["interaction_contrast"].abs().max())
            for group, rows in merged.groupby("group")
        },
        **{
            f"{group}.significant_levels": int((rows["holm_p"] < fdr_q).sum())
            for group, rows in merged.groupby("group")
        },
        **{
            f"{group}.beats_random_levels": int((rows["vs_control_holm_p"] < fdr_q).sum())
            for group, rows in merged.groupby("group")
            if rows["vs_control_holm_p"].notna().any()
        },
        **clamp_split.layer_made_metrics(layer_made, split_plan, fdr_q),
    },
)

# %%
run.close()
