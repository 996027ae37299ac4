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
# # 04 · A secondary SAE on the NFM's interaction vector
#
# The NFM turns each token's active pairs of primary features into a K-dimensional vector `h` (after its
# first Linear(K,K), before the ReLU). A second TopK SAE, the same code as the primary one, decomposes `h`
# into sparse **secondary features**: recurring patterns of feature co-occurrence that the NFM found
# useful for predicting what the primary SAE misses.
#
# * `h` comes from the one NFM forward used everywhere (bi-interaction pooling included), in eval mode.
# * `h` depends on the primary code only, never on the residual, so it leaks no target; still, the
#   secondary SAE trains on the store's training documents and is measured on the NFM stage's test
#   documents, which neither the NFM nor the secondary SAE has seen.
# * Each secondary feature can be traced back exactly: its pre-activation is a sum over the token's
#   active pairs of primary features, plus a constant (see `featint_utils.integration.secondary`).

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
nfm_seed: int = 0  # the NFM (one of 02's nfm_seeds) that 03-06 take apart
secondary_latents: int = 1024  # secondary dictionary size
secondary_k: int = 32  # active secondary latents per token
secondary_train_tokens: int = 500_000  # training-token budget
secondary_batch_size: int = 2048  # tokens per step
secondary_lr: float = 0.003  # Adam learning rate; 0 uses 2e-4 / sqrt(n_latents / 2**14)
secondary_dead_tokens: int = 250_000  # a latent is dead after this many tokens without firing
secondary_seed: int = 0  # seeds the secondary SAE's initialisation and data order
n_show_features: int = 6  # features whose top activations are listed
resume: bool = True  # continue from a checkpoint of an interrupted run with the same settings
keep_checkpoints: bool = False  # keep finished trainings' optimiser state (only to train further)
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"

# %%
from dataclasses import replace

import pandas as pd
from IPython.display import Markdown, display

from featint_utils.data import distributed, models
from featint_utils.data.activation_store import is_activation_corpus
from featint_utils.dictionary import features
from featint_utils.dictionary.metrics import evaluate_sae
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.integration import secondary
from featint_utils.io import update_metrics
from featint_utils.plots import figure, training
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "04_secondary_sae", globals())

# %% [markdown]
# ## The NFM vectors

# %%
store = run.store()
decomposition = run.decomposition(nfm_seed, secondary=False)  # primary SAE -> NFM of seed nfm_seed
nfm = decomposition.nfm
if not nfm.learnt:
    display(
        Markdown(
            f"**The NFM of seed {nfm_seed} kept its start: its pairwise branch learnt nothing on the tune "
            "documents, so its vector is the random starting map of the pooled pairs, and what follows "
            "(04-06) describes that map, not learnt interactions.**"
        )
    )
out_dir = run.begin_secondary(nfm_seed)
vectors = secondary.build_embedding_store(
    decomposition, store, run.residual_sets()["test"], run.secondary_vectors_dir(nfm_seed)
)
display(
    pd.Series(
        {
            "training tokens": vectors.n_tokens("train"),
            "held-out tokens": vectors.n_tokens("val"),
            "width K": vectors.d_model,
        },
        name="NFM vectors",
    ).to_frame()
)

# %% [markdown]
# ## Training
# Same trainer, same normalisation convention (E‖h‖² = K, the scale saved with the SAE), same metrics.

# %%
config = TrainConfig(
    train_tokens=secondary_train_tokens,
    batch_size=secondary_batch_size,
    lr=secondary_lr,
    dead_tokens=secondary_dead_tokens,
    seed=secondary_seed,
)
trainer = SAETrainer(vectors, secondary_latents, secondary_k, config, out_dir, distributed.init(device))
sae2 = trainer.train(resume=resume, keep_optimizer=keep_checkpoints)
decomposition = replace(decomposition, secondary=sae2)
title = f"secondary SAE: {secondary_latents} latents, k={secondary_k}"
fig = training.training_curves(trainer.history_frame(), title=title)
figure.save(fig, run.root, "04_training_curves")

# %%
metrics = evaluate_sae(sae2, vectors, "val")
headline = {k: v for k, v in metrics.items() if k != "firing_frequency"}
update_metrics(
    run.root,
    "secondary_sae",
    {"n_latents": secondary_latents, "k": secondary_k, "nfm_seed": nfm_seed, "nfm_learnt": nfm.learnt, **headline},
)
display(pd.Series(headline, name="held-out").to_frame().style.format("{:.4g}"))
fig = training.feature_density(metrics["firing_frequency"])
figure.save(fig, run.root, "04_feature_density")

# %% [markdown]
# ## What some secondary features respond to, and which primary pairs drive them
# Held-out tokens where each feature fires hardest, then the primary pairs with the largest mean exact
# contribution to its pre-activation over its 50 strongest held-out tokens.

# %%
shown = features.pick_features(metrics["firing_frequency"], n_show_features)
if not is_activation_corpus(store.manifest["corpus"]):  # activations from a file have no tokens to show
    tokenizer = models.load_model(store.manifest["model"]).tokenizer
    display(
        features.top_activations(sae2.encode, vectors, shown, tokenizer, n=4)
        .style.format({"activation": "{:.2f}"})
        .hide(axis="index")
    )
for feature in shown:
    pairs, _ = secondary.drivers(nfm, sae2, feature, secondary.top_codes(decomposition, store, feature, n=50))
    display(pairs.head(5).assign(secondary_feature=feature).style.format({"contribution": "{:.4f}"}).hide(axis="index"))

# %%
run.close()
