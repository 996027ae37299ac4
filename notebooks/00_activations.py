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
# # 00 · Activations
#
# Every later stage reads one layer's activations from disk. This notebook runs the corpus through the
# model and stores `hidden_states[layer]` for every **real** token: padding and special tokens
# (`[CLS]`, `[SEP]`, BOS) are never stored, and each stored vector keeps its provenance (text, position,
# token id), so any activation can be traced back to the words that produced it.
#
# The split is by **document** (or by stimulus item: the four register × affect variants of an item stay
# together), never by token, so held-out numbers in later stages are not inflated by leakage.

# %% tags=["parameters"]
run_dir: str = "runs/embedded"  # where this run's artifacts go (the runner sets it)
model: str = "embedded"  # "embedded" (bundled MiniLM), a local model directory, or a Hugging Face name
layer: int = 3  # hidden_states index: 0 is the embedding output, L the output of block L-1
corpus: str = "stimuli"  # "stimuli", a .txt/.jsonl/.parquet path, "hf:NAME[:CONFIG[:SPLIT]]" or "activations:PATH.npz"
max_groups: int = 0  # keep a seeded random subset of this many documents or items (0: all)
val_fraction: float = 0.5  # documents/items held out: the SAE's validation and all the NFM stage's data
split_seed: int = 0  # seeds the train/held-out split and the max_groups subset
context_tokens: int = 128  # tokens per model context, special tokens included
batch_size: int = 64  # contexts per forward pass
dtype: str = "float32"  # storage dtype: float32 or float16
device: str = "auto"  # "auto" (GPU if present), "cpu" or "cuda"
model_dtype: str = "float32"  # language model weights: float32, bfloat16 or float16 (not the store's dtype)

# %%
from IPython.display import display

from featint_utils.data import activation_store
from featint_utils.plots import figure, training
from featint_utils.workbench import stages
from featint_utils.workbench.run import Run

run = Run.open(run_dir, "00_activations", globals())

# %% [markdown]
# ## Extraction
# The model (its weights in `model_dtype`) runs every text of the corpus; only the blocks up to `layer` run.
# The store is written to a `.partial` directory and moved into place when complete, so an interrupted run
# never leaves a store that looks finished; a verified store of the same request is reused. Under `torchrun`
# the texts are dealt out to the ranks and this cell finds their store (README, "GPUs and clusters").
#
# `corpus = "activations:PATH.npz"` skips the model: the file's arrays `acts` [n, d] and `doc` [n] (the document
# of each row) become the store, split by document exactly as texts are (stages 00-04 then run as usual).

# %%
store, loaded, split = stages.build_store(run)
from_file = loaded is None
display(activation_store.summary(store))
print(f"normalisation scale (E||x||^2 = d_model on train): {store.scale:.4f}")

# %% [markdown]
# ## Activation norms
# Outlier tokens (very large norms, often at the first position) would dominate an SAE's loss; the
# per-position and per-text views show whether any exist.

# %%
norms = activation_store.token_norms(store, "train")
source = corpus if from_file else f"{figure.model_title(loaded.name)} · hidden_states[{layer}]"
fig = training.activation_norms(norms, title=f"{source} · train split")
figure.save(fig, run.root, "00_activation_norms")

# %%
if not from_file:
    display(activation_store.norm_outliers(store, loaded.tokenizer, "train", n=10))

# %%
run.close()
