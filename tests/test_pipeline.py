"""The real pipeline on one tiny run of every stage (``tiny_run``, tests/conftest.py): the smoke run through
papermill, a stale artifact refused after the SAE is retrained, and the run directory copied and moved."""

import json
import math
import shutil
import subprocess
from pathlib import Path

import nbformat
import pytest

from featint_utils.data.activation_store import ActivationStore
from featint_utils.dictionary.sae import TopKSAE
from featint_utils.io import state_digest
from featint_utils.workbench import reports, runner
from tests.conftest import TINY_RUN


def test_smoke_run_of_every_notebook_with_tiny_parameters(tiny_run):
    """The real pipeline through papermill: every notebook, tiny sizes, reports rendered."""
    run_dir, terminal = tiny_run
    index = (run_dir / "reports" / "index.html").read_text()
    for i, nb in enumerate(runner.notebooks(), 1):
        executed = nbformat.read(run_dir / "notebooks" / f"{nb.stem}.ipynb", as_version=4)
        header = executed.cells[0]
        assert reports.HEADER_TAG in header.metadata["tags"] and "profile `embedded`" in header.source
        assert ("`max_groups=12`" in header.source) == (nb.stem == "00_activations")  # its stage's settings only
        streams = [o for c in executed.cells if c.cell_type == "code" for o in c.outputs if o.output_type == "stream"]
        warned = [o.text[:300] for o in streams if o.name == "stderr" and "Warning" in o.text]
        assert not warned, f"{nb.stem} printed warnings: {warned}"
        views = [
            o
            for c in executed.cells
            if c.cell_type == "code"
            for o in c.outputs
            if reports.WIDGET_VIEW in o.get("data", {})
        ]
        assert not views, f"{nb.stem} saved widget views: headless was not detected under papermill"
        page = (run_dir / "reports" / f"{nb.stem}.html").read_text()
        assert len(page) > 10_000 and "<title>Notebook</title>" not in page and "%|" not in page
        assert f'href="{nb.stem}.html"' in index
        assert f"[{i}/7] {nb.stem}  done in" in terminal  # the runner's one-line summary of each stage
    assert "held-out FVU" in index and "interaction share over linear" in index
    assert "WARNING" not in terminal  # e.g. ipykernel's notice about its loopback sockets, on every stage
    record = json.loads((run_dir / "run.json").read_text())
    assert all(stage["status"] == "ok" for stage in record["stages"].values()) and len(record["stages"]) == 7
    assert record["attempts"][-1]["status"] == "ok"
    metrics = json.loads((run_dir / "metrics.json").read_text())
    headline = {
        "primary_sae": ["fvu", "l0", "dead_fraction", "cosine_spliced", "cosine_random"],
        "contributions": [
            "residual_fvu.raw_ridge",
            "residual_fvu.code_ridge",
            "residual_fvu.nfm",
            "residual_fvu.mlp",
            "total_fvu.zero",
            "total_fvu.nfm",
            "gain_over_zero.nfm.ci_low",
            "interaction_share.over_linear.mean",
            "interaction_share.over_linear.ci_low",
            "interaction_share.over_linear.ci_high",
            "interaction_share.over_additive.mean",
            "interaction_share.pair_ridge.mean",
            "control.over_linear.mean",
            "control.over_linear.ci_low",
            "detection_limit",
            "absorbed_fraction",
            "conjunction_latents",
        ],
        "secondary_sae": ["fvu", "l0", "dead_fraction", "nfm_learnt"],
        "identification": [
            "primary.interaction_selective",
            "secondary.interaction_selective",
            "secondary.interaction_replicated",
        ],
        "clamping": ["features", "linear_control_feature"],
    }
    for section, keys in headline.items():
        assert set(keys) <= set(metrics[section]), (section, set(keys) - set(metrics[section]))
    undefined_allowed = {"detection_limit", "detection_limit.pair_ridge", "interaction_share.of_explained"}
    if not metrics["identification"]["minimal_pairs"]:  # the layer-made split needs token-aligned minimal pairs
        undefined_allowed |= {f"{family}.layer_made_selective" for family in ("primary", "primary_pre", "secondary")}
        assert all(metrics["identification"][key] is None for key in undefined_allowed if "layer_made" in key)
        clamp_split = {key for key in metrics["clamping"] if key.startswith("layer_made.")}
        assert clamp_split and all(metrics["clamping"][key] is None for key in clamp_split)
        undefined_allowed |= clamp_split
    if not metrics["secondary_sae"]["nfm_learnt"]:  # an NFM at its start has no interaction part to rank
        undefined_allowed |= {"top_overlap", "top_overlap_chance"}
    numbers = [
        v
        for section in metrics.values()
        for key, value in section.items()
        if not (value is None and key in undefined_allowed)
        for v in (value if isinstance(value, list) else [value])
    ]
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in numbers)
    assert any(key.endswith("max_abs_interaction_contrast") for key in metrics["clamping"])
    assert metrics["contributions"]["n_seeds"] == 2
    store = ActivationStore(run_dir / "activations")
    assert len(store.manifest["split"]["train_groups"]) == 9 and len(store.manifest["split"]["val_groups"]) == 3


def test_a_stage_after_a_retrained_sae_refuses_the_old_nfms_and_02_refits_them(tiny_run, tmp_path):
    """The fault of an earlier version: retrain the SAE, then a later stage read the NFMs fitted to the old
    residual. On a copy of the tiny run, so the other tests keep theirs."""
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.root, run_dir, symlinks=True)
    executed = (run_dir / "notebooks" / "03_contributions.ipynb").read_text()
    retrained = TINY_RUN | {"sae_lr": "0.01"}
    runner.run("embedded", only=["01"], overrides=retrained, run_dir=run_dir, reports=False)
    with pytest.raises(runner.RunError, match=r"StaleArtifactError.*earlier primary_sae.*--only 02"):
        runner.run("embedded", only=["03"], overrides=TINY_RUN, run_dir=run_dir, reports=False)
    assert (run_dir / "notebooks" / "03_contributions.ipynb").read_text() == executed  # the good one is kept
    old_fit = json.loads((run_dir / "nfm" / "nfm" / "seed0" / "model" / "cfg.json").read_text())["extra"]
    runner.run("embedded", only=["02"], overrides=retrained, run_dir=run_dir, reports=False)
    lineage = json.loads((run_dir / "nfm" / "lineage.json").read_text())
    assert lineage["primary_sae"] == state_digest(TopKSAE.load(run_dir / "primary_sae" / "sae"))  # refitted to it
    new_fit = json.loads((run_dir / "nfm" / "nfm" / "seed0" / "model" / "cfg.json").read_text())["extra"]
    assert new_fit["start_tune_fvu"] != old_fit["start_tune_fvu"]  # a new fit from a new start, not the old one resumed


def _trained(run_dir: Path) -> dict[str, bytes]:
    """Every file a training step changes (weights, checkpoints, training histories), by path in the run."""
    names = ("*.safetensors", "history.csv", "state.json")
    return {str(p.relative_to(run_dir)): p.read_bytes() for name in names for p in sorted(run_dir.rglob(name))}


def _json_naming(run_dir: Path, where: Path) -> list[str]:
    """The JSON files of ``run_dir`` that name the absolute path ``where`` in what identifies an artifact:
    every one but ``run.json``'s history of attempts (which says where each attempt ran, and nothing else)."""
    found = []
    for path in run_dir.rglob("*.json"):
        text = path.read_text()
        if path.name == "run.json":
            text = json.dumps(json.loads(text)["stages"])
        if str(where) in text:
            found.append(str(path.relative_to(run_dir)))
    return found


def test_a_run_directory_copied_or_moved_elsewhere_is_the_same_run(tiny_run, tmp_path):
    """``cp -r`` (new mtimes) to another parent, then a move (``mv``) of the copy to a third: every stage that
    trains (SAE, NFM ladder, absorption's SAEs, secondary SAE) run again there trains nothing, refuses nothing,
    and gives the same metrics; nothing that identifies an artifact names a machine path (the original's, the
    copy's or the final one)."""
    original = tiny_run.root
    copied = tmp_path / "elsewhere" / "copied"
    copied.parent.mkdir()
    subprocess.run(["cp", "-r", str(original), str(copied)], check=True)
    moved = tmp_path / "scratch" / "moved"
    moved.parent.mkdir()
    copied.rename(moved)
    before, metrics = _trained(original), json.loads((original / "metrics.json").read_text())
    assert {"primary_sae/checkpoint/state.json", "nfm/nfm/seed0/model/nfm.safetensors"} <= set(before)
    runner.run("embedded", only=["00", "01", "02", "03", "04"], overrides=TINY_RUN, run_dir=moved, reports=False)
    assert _trained(moved) == before, "a trainer ran a step"
    executed = {nb: (moved / "notebooks" / f"{nb}.ipynb").read_text() for nb in ("01_primary_sae", "02_nfm")}
    assert "resuming from step 16 of 16" in executed["01_primary_sae"]
    assert "nfm (seed 0)" not in executed["02_nfm"]  # the finished ladder was read back
    assert json.loads((moved / "metrics.json").read_text()) == metrics
    for where in (original, copied, moved):
        assert not _json_naming(moved, where), (where, _json_naming(moved, where))


def test_05_and_06_on_minimal_pairs_split_every_interaction_into_layer_and_instrument_parts(tiny_run, tmp_path):
    """The smoke run's stimuli are not minimal pairs: 05 and 06 say so and record none. Rerun on the
    token-aligned set (a copy of the tiny run), 05 adds the split to every family's effect table and metrics (for
    the pre-activations, linear in the layer, the layer made the whole contrast), and 06 splits every clamp
    condition's effect the same way, beside the layer's own."""
    import pandas as pd

    assert json.loads((tiny_run.root / "metrics.json").read_text())["identification"]["minimal_pairs"] is False
    run_dir = tmp_path / "run"
    shutil.copytree(tiny_run.root, run_dir, symlinks=True)
    runner.run(
        "embedded",
        only=["05", "06"],
        overrides=TINY_RUN | {"stimulus_set": "minimal_pairs"},
        run_dir=run_dir,
        reports=False,
    )
    clamping = json.loads((run_dir / "metrics.json").read_text())["clamping"]
    assert isinstance(clamping["layer_made.own_p"], float) and clamping["layer_made.secondary_conditions"] > 0
    layer_made = pd.read_csv(next(run_dir.glob("clamping/*/layer_made.csv")))
    statistics = pd.read_csv(next(run_dir.glob("clamping/*/statistics.csv")))
    conditions = layer_made["condition"].tolist()  # the layer's own, every clamp of 06, then the ablations
    assert conditions[: len(statistics) + 1] == ["no clamp", *statistics["condition"]]
    assert len(conditions) == len(statistics) + 1 + 2 * len(clamping["features"])
    assert all(c.endswith("@ ablated") for c in conditions[len(statistics) + 1 :])
    assert (run_dir / "figures" / "06_layer_made_effects.png").exists()
    identification = json.loads((run_dir / "metrics.json").read_text())["identification"]
    assert identification["minimal_pairs"] is True
    assert (run_dir / "figures" / "05_interaction_split.png").exists()
    for family in ("primary", "primary_pre", "secondary"):
        assert isinstance(identification[f"{family}.layer_made_selective"], int)
        table = pd.read_csv(next(run_dir.glob(f"identification/*/{family}_effects.csv")))
        # the split is read from a float64 forward, the ANOVA's effect from the float32 one: they agree to float32
        # precision of the feature values (relative differences of order 1e-6 after three blocks)
        scale = table.filter(like="mean_").abs().to_numpy().max()
        split = table["layer_made_effect"] + table["instrument_made_effect"]
        assert (split - table["interaction_effect"]).abs().max() <= 1e-5 * scale
        if family == "primary_pre":  # linear in the layer: the instrument makes nothing but rounding
            assert table["instrument_made_effect"].abs().max() <= 1e-6 * scale
    # back on the default stimuli, no count of the minimal pairs stays behind in metrics.json or the tables
    runner.run("embedded", only=["05", "06"], overrides=TINY_RUN, run_dir=run_dir, reports=False)
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["identification"]["minimal_pairs"] is False
    assert all(metrics["identification"][f"{f}.layer_made_selective"] is None for f in ("primary", "primary_pre"))
    assert metrics["clamping"]["layer_made.own_p"] is None and not list(run_dir.glob("clamping/*/layer_made.csv"))
