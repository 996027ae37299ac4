"""The workbench: runs, their notebooks, and what a researcher reads afterwards.

* :mod:`.run`: the run spine: a run directory's layout, parameters, lock and artifact lineage;
* :mod:`.stages`: the work of the stages that scale out over ranks (00, 01, 02);
* :mod:`.runner`: run a profile's notebooks in order with papermill, on one process or ``torchrun`` ranks;
* :mod:`.live`: the runner's live line in the terminal;
* :mod:`.sweeps`: one run per point of a grid, sharing stores, and the comparison table;
* :mod:`.reports`: executed notebooks as HTML pages with a provenance header, and an index;
* :mod:`.feature_stats`: one pass over a store for what a feature dashboard shows;
* :mod:`.dashboards`: static HTML feature pages and their index;
* :mod:`.widgets`: the feature browser in JupyterLab;
* :mod:`.planted_truth`: a finished run on a planted model scored against its truth.
"""
