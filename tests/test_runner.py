import json
import math

import nbformat
import pytest

from featint_utils import params, reports, runner
from featint_utils.__main__ import main
from featint_utils.activations import ActivationStore
from featint_utils.io import state_digest
from featint_utils.sae import TopKSAE


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(runner.RunError, match="unknown profile 'nope'; available: .*embedded"):
        runner.run("nope")


def test_unknown_parameter_is_an_error_naming_the_known_ones(tmp_path):
    with pytest.raises(
        runner.RunError,
        match=r"unknown parameter\(s\) \['leyer'\] in --set \(leyer: did you mean layer\?\); known: .*layer",
    ):
        runner.run("embedded", overrides={"leyer": "3"}, runs_dir=tmp_path)
    (tmp_path / "typo.toml").write_text('[parameters]\nmodle = "embedded"\n')
    with pytest.raises(runner.RunError, match=r"\['modle'\] in profile"):
        runner.run("typo", runs_dir=tmp_path, profiles_dir=tmp_path)


def test_set_values_are_cast_to_the_declared_type():
    resolved = runner.resolve_parameters({}, {"layer": "2", "val_fraction": "0.25", "resume": "false"})
    assert (resolved["layer"], resolved["val_fraction"], resolved["resume"]) == (2, 0.25, False)
    assert resolved["sae_k"] == 32  # the shared default
    with pytest.raises(runner.RunError, match="expected int"):
        runner.resolve_parameters({}, {"layer": "two"})
    with pytest.raises(runner.RunError, match="key=value"):
        runner.parse_sets(["layer"])


def test_profile_environment_references(tmp_path, monkeypatch):
    (tmp_path / "env.toml").write_text(
        '[parameters]\ncorpus = "${FEATINT_TEST_CORPUS:-stimuli}"\nmodel = "${FEATINT_TEST_MODEL}"\n'
    )
    monkeypatch.delenv("FEATINT_TEST_CORPUS", raising=False)
    monkeypatch.setenv("FEATINT_TEST_MODEL", "/models/x")
    assert runner.load_profile("env", tmp_path) == {"corpus": "stimuli", "model": "/models/x"}
    monkeypatch.setenv("FEATINT_TEST_CORPUS", "/data/c.txt")
    assert runner.load_profile("env", tmp_path)["corpus"] == "/data/c.txt"
    monkeypatch.delenv("FEATINT_TEST_MODEL")
    with pytest.raises(runner.RunError, match="needs the environment variable FEATINT_TEST_MODEL"):
        runner.load_profile("env", tmp_path)


def test_every_profile_declares_only_known_and_valid_parameters():
    for name in runner.available_profiles():
        profile = runner.load_profile(name) if name == "embedded" else _raw_parameters(name)
        runner.resolve_parameters(profile, {})


def test_the_embedded_profile_is_the_shared_defaults():
    """So that "Run All" in a notebook (which uses the defaults) is `make run`."""
    profile = runner.load_profile("embedded")
    assert set(profile) <= {"corpus"} and profile == {k: params.all_parameters()[k].default for k in profile}


def _raw_parameters(name):
    import tomllib

    with open(runner.PROFILES_DIR / f"{name}.toml", "rb") as f:
        return tomllib.load(f)["parameters"]


def test_smoke_run_of_every_notebook_with_tiny_parameters(tmp_path, capfd):
    """The real pipeline through papermill: every notebook, tiny sizes, reports rendered."""
    tiny = {
        "max_groups": "12",
        "batch_size": "16",
        "val_fraction": "0.25",
        "n_boot": "50",
        "probe_folds": "3",
        "sae_latents": "256",
        "sae_train_tokens": "4096",
        "sae_batch_size": "256",
        "splice_texts": "8",
        "nfm_batch_size": "64",
        "nfm_k_embed": "16",
        "nfm_max_epochs": "3",
        "nfm_lr_grid": "3e-3",
        "pair_ridge_pairs": "64",
        "power_shares": "0.01,0.05",
        "power_pairs": "4",
        "conjunction_candidates": "4",
        "absorption_pairs": "4",
        "nfm_seeds": "0,1",
        "n_top_features": "5",
        "secondary_latents": "64",
        "secondary_k": "4",
        "secondary_train_tokens": "2048",
        "secondary_batch_size": "256",
        "n_panels": "1",
        "clamp_features": "1",
        "clamp_levels": "-1,1",
        "max_items": "12",
        "n_permutations": "199",
    }
    run_dir = runner.run("embedded", overrides=tiny, runs_dir=tmp_path)
    terminal = capfd.readouterr().err
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
    # The fault: retrain the SAE, then a later stage must not read the NFMs fitted to the old residual.
    executed = (run_dir / "notebooks" / "03_contributions.ipynb").read_text()
    runner.run("embedded", only=["01"], overrides=tiny | {"sae_lr": "0.01"}, runs_dir=tmp_path, reports=False)
    with pytest.raises(runner.RunError, match=r"StaleArtifactError.*earlier primary_sae.*--only 02"):
        runner.run("embedded", only=["03"], overrides=tiny, runs_dir=tmp_path, reports=False)
    assert (run_dir / "notebooks" / "03_contributions.ipynb").read_text() == executed  # the good one is kept
    old_fit = json.loads((run_dir / "nfm" / "nfm" / "seed0" / "model" / "cfg.json").read_text())["extra"]
    runner.run("embedded", only=["02"], overrides=tiny | {"sae_lr": "0.01"}, runs_dir=tmp_path, reports=False)
    lineage = json.loads((run_dir / "nfm" / "lineage.json").read_text())
    assert lineage["primary_sae"] == state_digest(TopKSAE.load(run_dir / "primary_sae" / "sae"))  # refitted to it
    new_fit = json.loads((run_dir / "nfm" / "nfm" / "seed0" / "model" / "cfg.json").read_text())["extra"]
    assert new_fit["start_tune_fvu"] != old_fit["start_tune_fvu"]  # a new fit from a new start, not the old one resumed


def test_activations_from_a_file_run_stages_00_to_04_and_05_refuses(tmp_path):
    """The ``activations:PATH.npz`` corpus: the same pipeline on activations cached elsewhere (here planted)."""
    from featint_utils import planted

    npz = planted.activations(8_000, d=32, n_features=128, k=4, interaction_share=0.05, doc_len=50).save_npz(
        tmp_path / "acts.npz"
    )
    tiny = {
        "corpus": f"activations:{npz}",
        "val_fraction": "0.5",
        "sae_latents": "128",
        "sae_k": "4",
        "sae_train_tokens": "8192",
        "sae_batch_size": "256",
        "nfm_batch_size": "128",
        "nfm_k_embed": "8",
        "nfm_max_epochs": "2",
        "nfm_lr_grid": "3e-3",
        "nfm_seeds": "0",
        "pair_ridge_pairs": "32",
        "power_shares": "0.05",
        "power_pairs": "4",
        "conjunction_candidates": "4",
        "absorption_pairs": "4",
        "n_boot": "50",
        "n_top_features": "3",
        "secondary_latents": "32",
        "secondary_k": "4",
        "secondary_train_tokens": "2048",
        "secondary_batch_size": "128",
    }
    run_dir = runner.run(
        "embedded", only=["00", "01", "02", "03", "04"], overrides=tiny, runs_dir=tmp_path, reports=False
    )
    store = ActivationStore(run_dir / "activations")
    assert store.manifest["corpus"] == tiny["corpus"] and store.d_model == 32
    texts = store.texts()
    train, val = set(texts.query("split == 'train'").group), set(texts.query("split == 'val'").group)
    assert len(texts) == 160 and not train & val
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert {"primary_sae", "contributions", "secondary_sae"} <= set(metrics)
    assert "cosine_spliced" not in metrics["primary_sae"]  # no model to splice into
    with pytest.raises(runner.RunError, match="05.*activations come from a file"):
        runner.run("embedded", only=["05"], overrides={"corpus": tiny["corpus"]}, runs_dir=tmp_path, reports=False)


def test_failing_notebook_stops_the_run_and_is_named(tmp_path):
    with pytest.raises(runner.RunError, match=r"notebook 00_activations failed.*valid layers are 0\.\.6"):
        runner.run("embedded", overrides={"layer": "99"}, runs_dir=tmp_path, reports=False)


def test_cli_reports_errors_without_a_traceback(capsys):
    assert main(["run", "--profile", "does-not-exist"]) == 2
    assert "unknown profile 'does-not-exist'" in capsys.readouterr().err


def test_params_lists_every_parameter_with_its_default_or_the_profiles_value(capsys):
    from featint_utils import params
    from featint_utils.__main__ import main

    assert main(["params"]) == 0
    out = capsys.readouterr().out
    assert all(f"  {name} (" in out for name in params.all_parameters())
    assert "  sae_k (int) = 32: " in out
    assert main(["params", "--profile", "openllama-3b-seed"]) == 0
    assert "  layer (int) = 16 (profile openllama-3b-seed): hidden_states index" in capsys.readouterr().out
