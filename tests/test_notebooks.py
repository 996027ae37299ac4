"""Notebook conventions: one tagged parameters cell with typed, commented defaults; .py and .ipynb in step."""

import ast

import jupytext
import nbformat
import pytest

from featint_utils import params
from featint_utils.workbench.runner import NOTEBOOKS_DIR

SOURCES = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.py"))


def test_there_are_notebooks():
    assert SOURCES, "no notebooks/NN_*.py found"


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_exactly_one_parameters_cell_with_typed_commented_defaults(source):
    nb = jupytext.read(source)
    cells = [c for c in nb.cells if "parameters" in c.metadata.get("tags", [])]
    assert len(cells) == 1
    assert nb.metadata["kernelspec"]["name"] == "python3"
    for line in cells[0].source.splitlines():
        if not line.strip():
            continue
        statement = ast.parse(line.split("  #")[0]).body[0]
        assert isinstance(statement, ast.AnnAssign), f"untyped parameter: {line!r}"
        assert "  # " in line, f"parameter without a comment: {line!r}"


@pytest.mark.parametrize("source", [*SOURCES, NOTEBOOKS_DIR / "sweep_comparison.py"], ids=lambda p: p.stem)
def test_ipynb_is_in_sync_with_py_source_and_has_no_outputs(source):
    paired = source.with_suffix(".ipynb")
    assert paired.exists(), f"{paired.name} missing: run `make sync`"
    expected = jupytext.read(source)
    actual = nbformat.read(paired, as_version=4)
    simplify = lambda nb: [(c.cell_type, c.source, c.metadata.get("tags", [])) for c in nb.cells]  # noqa: E731
    assert simplify(actual) == simplify(expected), f"{paired.name} differs from {source.name}: run `make sync`"
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in actual.cells if c.cell_type == "code")


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_papermill_parses_every_parameter(source):
    """papermill silently drops a parameter line it cannot parse (e.g. an '=' in its comment)."""
    import papermill

    cell = next(c for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", []))
    names = [line.split(":")[0] for line in cell.source.splitlines() if line.strip()]
    assert sorted(papermill.inspect_notebook(str(source.with_suffix(".ipynb")))) == sorted(names)


@pytest.mark.parametrize("source", SOURCES, ids=lambda p: p.stem)
def test_notebook_defaults_are_the_shared_defaults(source):
    """ "Run All" in a notebook must be the same experiment as the embedded profile (whose values are these)."""
    cell = next(c for c in jupytext.read(source).cells if "parameters" in c.metadata.get("tags", []))
    namespace: dict = {}
    exec(cell.source, namespace)  # noqa: S102 (the notebook's own parameters cell)
    declared = {k: v for k, v in namespace.items() if not k.startswith("__") and k != "run_dir"}
    assert declared == params.defaults(source.stem)
    assert all(type(declared[k]) is p.type for k, p in params.PARAMETERS[source.stem].items())


def test_every_stage_has_a_notebook_and_every_notebook_a_stage():
    assert [s.stem for s in SOURCES] == list(params.STAGES)


def test_a_name_shared_by_stages_means_one_thing():
    merged = params.all_parameters()  # raises if two stages define one name differently
    assert {"device", "nfm_seed", "resume", "n_boot", "fdr_q"} <= set(merged)
    assert "seed" not in merged  # every seed says what it seeds


def test_a_plain_jupytext_sync_in_either_direction_leaves_the_py_source_as_it_is(tmp_path):
    """The repository's jupytext config keeps the header (kernelspec, pairing): syncing from the .py or from an
    .ipynb that JupyterLab saved later must not rewrite the source."""
    import shutil
    import subprocess
    import sys

    shutil.copy(NOTEBOOKS_DIR.parent / "pyproject.toml", tmp_path / "pyproject.toml")  # jupytext reads its config
    source = NOTEBOOKS_DIR / "01_primary_sae.py"
    copy = tmp_path / "notebooks" / source.name
    copy.parent.mkdir()
    shutil.copy(source, copy)
    shutil.copy(source.with_suffix(".ipynb"), copy.with_suffix(".ipynb"))
    for newer in (copy, copy.with_suffix(".ipynb")):
        newer.touch()
        done = subprocess.run([sys.executable, "-m", "jupytext", "--sync", str(newer)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        assert copy.read_text() == source.read_text(), f"jupytext --sync {newer.name} rewrote the .py"
