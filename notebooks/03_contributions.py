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
# # 03 · Linear or interaction? What the pairs add, what this run could detect, and what the SAE absorbed
#
# The original study reported its residual model as "95.5% linear / 4.5% interaction" from mean absolute
# outputs. Here every quantity is a **variance** on **held-out documents**, with an interval:
#
# * the **baseline ladder**: residual FVU of every model of notebook 02 and its gain over predicting zero;
# * the **interaction share**: the held-out incremental R² of the pairwise term over the converged linear and
#   additive fits (nested NFMs), beside the explicit-pairs ridge and the **null control** (the same fits on a
#   target with the first-order remainder permuted), each with a bootstrap interval over test documents and
#   seeds;
# * **power**: interactions of known size planted in this run's residual, how much of each the estimator
#   recovers, and the smallest it detects;
# * **where the SAE hides interactions**: how much of an interaction injected into the activations a
#   retrained SAE absorbs into its own latents (so no residual model can see it), and latents that act as
#   conjunctions of two others;
# * **which features** carry each part of the NFM (see `featint_utils.residual.contributions`).

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_seed: int = 0  # the NFM (one of 02's nfm_seeds) that 03-06 take apart
n_top_features: int = 20  # features shown and compared per part
n_boot: int = 2000  # bootstrap resamples for every interval
bootstrap_seed: int = 0  # seeds the bootstrap of test documents and seeds
absorption_share: float = 0.02  # size of the interaction injected before SAE training (share of activation variance)
absorption_pairs: int = 16  # latent pairs in the injected interaction
absorption_train_tokens: int = 0  # the retrained SAE's budget (0: the primary SAE's own; then it is the reference)
absorption_seed: int = 0  # seeds the injected interaction and the retrained SAE
conjunction_candidates: int = 10  # per latent, the most correlated latents whose pairs are searched
conjunction_min_increment: float = 0.01  # least pre-activation variance share a conjunction's pair product adds
fdr_q: float = 0.05  # false-discovery (03's conjunction latents, 05) or family-wise (06) level
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"

# %%
import pandas as pd
from IPython.display import Markdown, display

from featint_utils.data import distributed, models
from featint_utils.data.activation_store import is_activation_corpus
from featint_utils.dictionary import feature_labels
from featint_utils.io import update_metrics
from featint_utils.plots import figure, residual_fits
from featint_utils.residual import absorption, contributions, interaction, interaction_results
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "03_contributions", globals())
sets = run.residual_sets()  # refused if the SAE or store changed after 02 fitted its models
results = interaction_results.Results(run.nfm_dir, n_boot=n_boot, seed=bootstrap_seed)

# %% [markdown]
# ## The baseline ladder
# Gain over zero: how much less held-out error than the SAE alone, in units of the residual's variance, with
# its interval. A model whose interval does not lie above zero is a failed fit: nothing is concluded from it.

# %%
summary = contributions.ladder_summary(results.ladder)
beats = results.beats_zero()
summary = summary.join(beats[["ci_low", "ci_high", "beats_zero"]].add_prefix("gain_"))
display(
    summary[
        [
            "label",
            "residual_fvu",
            "residual_fvu_sd",
            "gain_over_zero",
            "gain_ci_low",
            "gain_ci_high",
            "gain_beats_zero",
            "total_fvu",
        ]
    ]
    .style.format("{:.4f}", subset=["residual_fvu", "residual_fvu_sd", "total_fvu"])
    .format("{:+.4f}", subset=["gain_over_zero", "gain_ci_low", "gain_ci_high"]),
    na_rep="–",
)
failed = set(beats.index[~beats["beats_zero"].astype(bool)])
fig = residual_fits.baseline_ladder(results.ladder.query("target == 'residual'"), interaction.MODELS, failed)
figure.save(fig, run.root, "03_baseline_ladder")

# %% [markdown]
# ## The interaction share, with its interval and its null control
# Positive means the term predicts held-out residual variance that its first-order fit does not. The null
# control runs the same nested fits on a target that keeps every token's first-order part and permutes what
# the first-order fit leaves, so its interval shows what the estimator reports when there is nothing to find.
#
# What a positive share is not: by itself, evidence that the layer combines features non-additively. A TopK
# SAE's error has pairwise structure of its own: on purely additive planted activations (the README's "How the
# interaction share is measured"), both shares' intervals lie above zero in 8 and 10 of 10 draws. And the
# interval resamples test documents and NFM seeds, not SAE trainings: on that planted data the NFM share
# varies between draws 2.7 times more than one run's interval says (on the embedded profile, five SAE seeds
# moved it by less than its interval). Read it as pairwise structure in *what this SAE misses*, beside the
# absorbed fraction and the conjunction search below.

# %%
shares = results.shares()
control = results.control_shares()
both = pd.concat({"share": shares, "null control": control})[["mean", "ci_low", "ci_high", "sd", "n_seeds"]]
display(both.style.format("{:+.5f}", subset=["mean", "ci_low", "ci_high", "sd"]).format("{:.0f}", subset=["n_seeds"]))
fraction = results.of_explained()
print(
    "as a fraction of what the NFM explains (the original study's kind of share): "
    + (f"{fraction:.1%}" if fraction is not None else "undefined, the NFM's held-out R² is not positive")
)

# %% [markdown]
# ## Power: what this run could have detected
# Interactions among the most frequently co-firing latent pairs, of known size, added to this run's own
# residual (their linear shadow on the code removed, so all of it is pairwise); the oracle ridge knows the
# planted pairs, so its increment is what there is to find. For each estimator: how much the planted
# interaction adds to its estimate, and whether the interval of that addition (test documents and seeds
# bootstrapped) lies above zero ("detected").

# %%
power = results.power()
limits = {name: interaction_results.detection_limit(power, name) for name in interaction.ESTIMATORS}
columns = ["oracle", "over_linear_excess", "over_linear_detected", "pair_ridge_excess", "pair_ridge_detected"]
display(power.set_index("nominal_share")[columns].style.format("{:+.5f}", subset=columns[::2]))
fig = residual_fits.power_curve(power, limits)
figure.save(fig, run.root, "03_power")
fig = residual_fits.interaction_forest(shares, control, limits["over_linear"])
figure.save(fig, run.root, "03_interaction_share")
display(Markdown(interaction_results.verdict(results)))

# %% [markdown]
# ## Where the SAE hides interactions
# **Absorption.** An interaction among the primary SAE's own frequently co-firing latents is added to the
# activations (train and held-out), an SAE with the same settings is trained on them, and its held-out
# residual is compared with the primary SAE's: the absorbed fraction is the part of the injected interaction
# that the new SAE reconstructs, which no model of its residual could then see.

# %%
store, sae = run.store(), run.primary_sae()
absorption_dir = run.begin_absorption()
absorbed = absorption.sensitivity_run(
    store,
    sae,
    absorption_dir,
    share=absorption_share,
    n_pairs=absorption_pairs,
    train_tokens=absorption_train_tokens,
    seed=absorption_seed,
    dist=distributed.init(device),
)
display(pd.Series(absorbed, name="sensitivity run").to_frame())

# %% [markdown]
# Does that SAE give the injected interaction latents of its own, and does the conjunction search below flag
# them? (Its positive control: the search is only worth running on the primary SAE if it finds these.)

# %%
injected = absorption.injected_conjunctions(absorption_dir, candidates=conjunction_candidates)
display(pd.Series(injected, name="injected directions").to_frame())

# %% [markdown]
# **Conjunction latents.** Latents that stand for "a and b together": the input's projection on two other
# latents' decoder directions (their *presences*: the SAE keeps the latents that a conjunction has absorbed
# quiet) predicts the latent's encoder pre-activation through their **product**, beyond any additive function
# of the two (a jump, a slope and hinges for each). The pre-activation, not the code: it is linear in the input,
# so a product dependence means the input holds a direction that comes with a and b together, whereas the
# code's top-k threshold makes it depend on pairs with no such direction. Each latent's pair is chosen on half
# the held-out documents and tested on the other half, against surrogates that keep its additive dependence on
# both presences and its co-firing with them and have no product structure; a conjunction latent's product adds
# at least `conjunction_min_increment` of its pre-activation variance (Benjamini-Hochberg at `fdr_q` across the
# latents), with a decoder direction mostly outside the pair's span. The same test on one surrogate per latent
# is the count on data with nothing to find.

# %%
conjunctions = absorption.conjunction_latents(
    store, sae, "val", candidates=conjunction_candidates, fdr=fdr_q, min_increment=conjunction_min_increment
)
display(
    conjunctions.head(15)
    .style.format("{:.3f}", subset=["r2_product", "r2_additive", "gain", "increment", "z", "outside_span"])
    .format("{:.2g}", subset=["q_value"])
    .hide(axis="index")
)
print(
    f"{int(conjunctions['conjunction'].sum())} of {len(conjunctions)} firing latents are conjunction latents "
    f"(q < {fdr_q}, product ≥ {conjunction_min_increment:g} of the pre-activation variance, ≥ half the decoder "
    f"outside the pair's span); on surrogates with no product structure the same test flags "
    f"{int(conjunctions['null_conjunction'].sum())}"
)

# %% [markdown]
# ## Which features carry each part
# For the NFM of seed `nfm_seed`, each feature's share of the held-out variance of the first-order part
# (its exact term) and of the interaction part (what the interaction output loses without it).

# %%
nfm = run.nfm(nfm_seed)
attribution = contributions.variance_attribution(nfm, sets["test"])
attribution.to_csv(run.attribution_path(nfm_seed), index=False)  # 06 clamps a linear-path feature from it
labels = None  # features named by their top held-out tokens, unless the activations came from a file
if not is_activation_corpus(store.manifest["corpus"]):
    named = {int(f) for top in contributions.top_features(attribution, n_top_features).values() for f in top}
    tokenizer = models.load_tokenizer(store.manifest["model"])
    labels = feature_labels.labels_for(run.decomposition().primary_code, store, named, tokenizer)
fig = residual_fits.top_feature_bars(attribution, n_top_features, labels)
figure.save(fig, run.root, "03_top_features")
overlap = contributions.top_feature_overlap(attribution, n_top_features)
if overlap is None:
    print(
        "The NFM's interaction output is zero on every test token (it kept its start): no feature carries "
        "an interaction part, so there is nothing to rank or compare."
    )
else:
    display(pd.Series(overlap, name="top-feature overlap").to_frame())

# %% [markdown]
# The factor embeddings' inner products `⟨vᵢ, vⱼ⟩` among the top interaction features: in a plain
# factorization machine this is the weight of the pair `fᵢfⱼ`; in the NFM it is the pair's pooled vector
# summed over its K dimensions, before the MLP. (An NFM that kept its start has untrained embeddings: read
# this only when the interaction share is detected.)

# %%
top = contributions.top_features(attribution, n_top_features).get("interaction")
if top is not None:
    fig = residual_fits.interaction_matrix(contributions.interaction_strength(nfm, top), labels)
    figure.save(fig, run.root, "03_interaction_matrix")

# %%
headline = interaction_results.headline(results) | {
    "absorbed_fraction": absorbed["absorbed_fraction"],
    "absorption_injected_share": absorbed["injected_share"],
    "absorption_directions_with_latent": injected["with_a_latent"],
    "absorption_directions_as_conjunction": injected["as_conjunction_latent"],
    "conjunction_latents": int(conjunctions["conjunction"].sum()),
    "conjunction_latents_fraction": float(conjunctions["conjunction"].mean()),
    "conjunction_latents_null": int(conjunctions["null_conjunction"].sum()),
    "top_n": n_top_features,
    "top_overlap": overlap and overlap["shared"],
    "top_overlap_chance": overlap and overlap["chance_shared"],
}
update_metrics(run.root, "contributions", headline)

# %%
run.close()
