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
# # 01 · Primary sparse autoencoder
#
# A TopK SAE learns to write each activation as a sparse sum of `k` dictionary directions. What it cannot
# write, the residual `e = x - SAE(x)`, is what the rest of the workbook studies, so the SAE must be
# trained faithfully and measured honestly:
#
# * inputs scaled so that E‖x‖² = d (the scale is saved with the SAE, and every later stage uses it);
# * decoder rows kept at unit norm; AuxK keeps latents from dying;
# * FVU accumulated in float64 over **held-out documents**, about the mean (the per-token "legacy" ratio
#   beside it only for comparison with older SAELens numbers);
# * the reconstruction spliced back into the model, beside a random error of the same size.
#
# Or start from a published SAE: `primary_sae` names a SAELens SAE (its directory, or `saelens:RELEASE/SAE_ID`
# where the Hugging Face Hub is reachable), which is checked against this run's activations (width, layer,
# model) and installed untrained; the metrics below then measure it on this run's held-out documents.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
primary_sae: str = ""  # "" trains the SAE; a SAELens SAE directory or "saelens:RELEASE/SAE_ID" is installed instead
sae_latents: int = 4096  # dictionary size
sae_k: int = 32  # active latents per token
sae_train_tokens: int = 1_000_000  # training-token budget (several epochs over a small store)
sae_batch_size: int = 4096  # tokens per step
sae_lr: float = 0.003  # Adam learning rate; 0 uses 2e-4 / sqrt(n_latents / 2**14)
sae_dead_tokens: int = 250_000  # a latent is dead after this many tokens without firing
sae_seed: int = 0  # seeds the SAE's initialisation and data order
resume: bool = True  # continue from a checkpoint of an interrupted run with the same settings
keep_checkpoints: bool = False  # keep finished trainings' optimiser state (only to train further)
splice_texts: int = 256  # held-out contexts for the splice metrics
n_show_features: int = 6  # features whose top activations are listed
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"
model_dtype: str = "float32"  # language model weights: float32, bfloat16 or float16 (not the store's dtype)

# %%
import pandas as pd
from IPython.display import Markdown, display

from featint_utils.data import interventions
from featint_utils.data.activation_store import is_activation_corpus
from featint_utils.dictionary import features
from featint_utils.dictionary.metrics import evaluate_sae
from featint_utils.io import update_metrics
from featint_utils.plots import figure, training
from featint_utils.workbench import stages
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "01_primary_sae", globals())

# %% [markdown]
# ## Training
# The trainer streams shuffled batches from the on-disk store; an interrupted run resumes from its last
# checkpoint and ends with the same weights it would have had. The SAE records the store it was trained on
# (its checksums) and its settings: a rebuilt store or new settings start it again, and every later stage
# refuses an SAE older than its store. Under `torchrun` the ranks train it data-parallel and this cell finds
# it finished (README, "GPUs and clusters"). A published SAE (`primary_sae`) is installed instead, its source and
# a hash of its files recorded in the same way, so that replacing it also brings every later stage up to date.

# %%
store = run.store()
primary = stages.train_primary_sae(run)
sae = primary.sae
if primary.source is None:
    fig = training.training_curves(primary.history, title=f"TopK SAE: {sae.cfg.n_latents} latents, k={sae.cfg.k}")
    figure.save(fig, run.root, "01_training_curves")
else:
    display(
        Markdown(
            f"**Loaded, not trained:** the primary SAE is the published SAE `{primary.source['source']}` "
            f"(sha256 `{primary.source['sha256'][:16]}`): {sae.cfg.n_latents} latents, k={sae.cfg.k}, reading "
            f"`{sae.cfg.extra['saelens_hook_name']}` = `hidden_states[{sae.cfg.layer}]`. There is no training curve; "
            "the training settings (`sae_*`) are not used."
        )
    )

# %% [markdown]
# ## Held-out metrics
# The splice replaces `hidden_states[layer]` at every real token of held-out texts with its reconstruction
# and compares the model's output with the clean one (encoders: cosine of pooled sentence embeddings;
# causal LMs: cross-entropy, CE score against zero and mean ablation, KL). The random-error row splices
# `x + r` with ‖r‖ = ‖x − SAE(x)‖ in a random direction: an SAE error that matters less than a random one
# of the same size is a good sign.

# %%
metrics = evaluate_sae(sae, store, "val")
from_file = is_activation_corpus(store.manifest["corpus"])  # activations from a file: no model to splice into
splice = {}
if not from_file:
    loaded = stages.load_language_model(run, store.manifest["model"])
    splice = interventions.splice_metrics(loaded, store, sae.reconstruct_raw, max_texts=splice_texts, seed=sae_seed)
headline = {k: v for k, v in metrics.items() if k != "firing_frequency"} | splice
update_metrics(run.root, "primary_sae", {"n_latents": sae.cfg.n_latents, "k": sae.cfg.k, **headline})
display(pd.Series(headline, name="held-out").to_frame().style.format("{:.4g}"))

# %%
fig = training.feature_density(metrics["firing_frequency"])
figure.save(fig, run.root, "01_feature_density")

# %% [markdown]
# ## What some features respond to
# Features spread over the firing-frequency ranking (common to rare, dense ones excluded), each with the
# held-out tokens (in «») where it fires hardest.

# %%
if not from_file:
    shown = features.pick_features(metrics["firing_frequency"], n_show_features)
    examples = features.top_activations(
        run.decomposition().primary_code, store, shown, loaded.tokenizer, n=4, normalize=False
    )
    display(examples.style.format({"activation": "{:.2f}"}).hide(axis="index"))

# %%
run.close()
