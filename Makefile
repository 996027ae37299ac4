# featint: `make setup`, then `make run`; `make test` for the tests.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROFILE ?= embedded
ARGS ?=
LAB_ARGS ?=
NPROC ?= 1

SWEEP ?= --grid layer=2,3,4 --grid sae_k=16,32 --only 00,01,02,03

.PHONY: setup run sweep lab test report bench bench-setup calibration sync lint

setup:  ## create .venv and install the pinned requirements + this package (editable)
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade --quiet pip
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps -e .

run:  ## run every notebook, in order, for PROFILE (default: embedded) into runs/PROFILE/ (ARGS="--name N" elsewhere); NPROC=8: stages 00-02 over 8 GPUs (torchrun)
	$(PY) -m featint_utils run --profile $(PROFILE) --nproc $(NPROC) $(ARGS)

sweep:  ## one run per point of a grid for PROFILE into runs/sweeps/PROFILE/ (default: layers 2-4 x k 16,32, stages 00-03), and comparison.html
	$(PY) -m featint_utils sweep --profile $(PROFILE) $(SWEEP) $(ARGS)

lab:  ## JupyterLab (opens notebooks/; runs/ beside it) with this environment (kernel also registered as "featint" for other Jupyter installs); LAB_ARGS="--no-browser --port 8890"
	$(PY) -m ipykernel install --user --name featint --display-name "Python (featint)" > /dev/null
	$(VENV)/bin/jupyter lab --ServerApp.root_dir=. --LabApp.default_url=/lab/tree/notebooks $(LAB_ARGS)

test:  ## unit tests + papermill smoke run of every notebook
	$(PY) -m pytest

report:  ## render the executed notebooks of runs/PROFILE/ (ARGS="--name N": runs/N/) to HTML, inputs hidden
	$(PY) -m featint_utils report --profile $(PROFILE) $(ARGS)

bench-setup:  ## a separate .venv-bench with featint + the peer libraries the benchmarks compare against
	$(PYTHON) -m venv .venv-bench
	.venv-bench/bin/python -m pip install --quiet -r requirements.txt -r benchmarks/requirements.txt
	.venv-bench/bin/python -m pip install --quiet --no-deps -e .

bench:  ## side-by-side performance comparisons (see benchmarks/README.md); needs `make bench-setup`
	.venv-bench/bin/python benchmarks/extraction.py
	.venv-bench/bin/python benchmarks/sae_train.py
	.venv-bench/bin/python benchmarks/nfm_train.py
	.venv-bench/bin/python benchmarks/saelens_interop.py
	.venv-bench/bin/python benchmarks/scaling.py

calibration:  ## the interaction estimator on planted data: null calibration, power, absorption (~6 min)
	$(PY) benchmarks/interaction_calibration.py

NOTEBOOK_SOURCES := $(wildcard notebooks/[0-9][0-9]_*.py) notebooks/sweep_comparison.py

sync:  ## update notebooks/*.ipynb from their .py sources, keeping cell ids (a one-line edit is a one-line diff), outputs cleared
	$(PY) -m jupytext --update --to ipynb $(NOTEBOOK_SOURCES)
	$(PY) -m nbconvert --clear-output --inplace --log-level=WARN $(NOTEBOOK_SOURCES:.py=.ipynb)
	touch $(NOTEBOOK_SOURCES:.py=.ipynb)  # the derived file is never older than its source

lint:  ## ruff's lint rules and formatting (CI runs this)
	$(VENV)/bin/ruff check featint_utils tests benchmarks notebooks
	$(VENV)/bin/ruff format --check featint_utils tests benchmarks notebooks
