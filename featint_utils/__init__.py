"""featint: does a sparse autoencoder's error hide non-linear interactions between its own features?

The package behind the notebooks in ``notebooks/``, in the study's order; each subpackage's docstring maps its
modules in reading order:

* :mod:`~featint_utils.data`: models and their hooks, corpora, the activation store (stages 00, splices);
* :mod:`~featint_utils.dictionary`: the primary SAE, its training, metrics and feature labels (01, 04);
* :mod:`~featint_utils.residual`: the residual question: what the SAE leaves, the NFM and its baselines, the
  interaction estimator, where the SAE absorbs interactions, planted data (02, 03);
* :mod:`~featint_utils.integration`: integration features: the secondary SAE's data, the stimulus set's
  checks, feature identification, clamping (04-06);
* :mod:`~featint_utils.plots`: every figure, one module per part of the study, one theme;
* :mod:`~featint_utils.workbench`: the run spine, the runner and its stages, sweeps, reports, dashboards,
  widgets, planted-run scoring.

Beside them, what every part uses: :mod:`~featint_utils.params` (every parameter, defined once),
:mod:`~featint_utils.io` (atomic writes, fingerprints, metrics.json), :mod:`~featint_utils.stats` (item-blocked
tests, BH, Holm), :mod:`~featint_utils.progress` (progress bars), :mod:`~featint_utils.scalars` (TensorBoard
curves). Imports go one way: a subpackage reads only the ones above it in this list and the modules beside them.
"""

__version__ = "0.1.0"
