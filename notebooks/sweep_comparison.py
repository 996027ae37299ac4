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
# # Sweep comparison: the same study at several layers, SAE widths or sparsities
#
# Each point of a sweep is a complete run (`points/<point>/`, with its own notebooks and reports) of the same
# profile with a few parameters changed. How much of a layer's structure the SAE leaves as *pairwise
# interaction* in its residual, and how much of a planted interaction an SAE *absorbs* into its own latents,
# may depend on the layer, the SAE's width and its k: this report puts the runs side by side.
#
# Read the interaction share with its interval **and** its run's detection limit: a share whose interval
# covers zero while the limit is high says "nothing detected at this power", not "no interaction".

# %% tags=["parameters"]
sweep_dir: str = "runs/sweeps/embedded"  # the sweep's directory (`featint sweep` sets it)

# %%
import pandas as pd
from IPython.display import display

from featint_utils.plots import comparisons, figure
from featint_utils.workbench import sweeps

sweep = sweeps.open_sweep(sweep_dir)
print(f"profile {sweep.profile!r}; swept: {', '.join(f'{k} = {v}' for k, v in sweep.grid.items())}")
if sweep.sets:
    print("fixed for every point:", ", ".join(f"{k}={v}" for k, v in sweep.sets.items()))

# %% [markdown]
# ## Every run, one row
# The swept values, whether the run finished, its stages' wall time, and the headline numbers (interaction
# share of the nested NFM and of the explicit-pairs ridge over the linear fit with 95% intervals; the null
# control's interval; the detection limits; the absorbed fraction; the SAE's held-out FVU and dead latents).
# A missing value is a stage the sweep did not run for that point.

# %%
table = sweeps.comparison_table(sweep.root)
with pd.option_context("display.max_columns", None, "display.width", 250):
    display(table.style.format(precision=4, na_rep="–").hide(axis="index"))

# %% [markdown]
# ## The headline numbers against the swept parameters

# %%
fig = comparisons.sweep_comparison(table, list(sweep.grid))
figure.save(fig, sweep.root, "sweep_comparison")
