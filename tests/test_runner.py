import json
import math

import pytest

from featint_utils import runner
from featint_utils.__main__ import main
from featint_utils.activations import ActivationStore


def test_unknown_profile_lists_the_available_ones():
    with pytest.raises(runner.RunError, match="unknown profile 'nope'; available: .*embedded"):
        runner.run("nope")


def test_unknown_parameter_is_an_error_naming_the_known_ones(tmp_path):
    with pytest.raises(
        runner.RunError, match=r"unknown parameter\(s\) \['leyer'\] in --set; notebooks declare: .*layer"
    ):
        runner.run("embedded", overrides={"leyer": "3"}, runs_dir=tmp_path)
    (tmp_path / "typo.toml").write_text('[parameters]\nmodle = "embedded"\n')
    with pytest.raises(runner.RunError, match=r"\['modle'\] in profile"):
        runner.run("typo", runs_dir=tmp_path, profiles_dir=tmp_path)


def test_set_values_are_cast_to_the_declared_type():
    declared = {"nb": {"layer": {"inferred_type_name": "int"}, "val_fraction": {"inferred_type_name": "float"}}}
    resolved = runner.resolve_parameters({}, {"layer": "2", "val_fraction": "0.5"}, declared)
    assert resolved == {"layer": 2, "val_fraction": 0.5}
    with pytest.raises(runner.RunError, match="expected int"):
        runner.resolve_parameters({}, {"layer": "two"}, declared)
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


def test_every_profile_declares_only_known_parameters():
    declared = {nb.name: runner.declared_parameters(nb) for nb in runner.notebooks()}
    for name in runner.available_profiles():
        profile = runner.load_profile(name) if name == "embedded" else _raw_parameters(name)
        runner.resolve_parameters(profile, {}, declared)


def _raw_parameters(name):
    import tomllib

    with open(runner.PROFILES_DIR / f"{name}.toml", "rb") as f:
        return tomllib.load(f)["parameters"]


def test_smoke_run_of_every_notebook_with_tiny_parameters(tmp_path):
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
        "n_seeds": "2",
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
    for nb in runner.notebooks():
        assert (run_dir / "notebooks" / nb.name).exists()
        assert (run_dir / "reports" / f"{nb.stem}.html").stat().st_size > 10_000
    record = json.loads((run_dir / "run.json").read_text())
    assert all(stage["status"] == "ok" for stage in record["stages"].values())
    metrics = json.loads((run_dir / "metrics.json").read_text())
    headline = {
        "primary_sae": ["fvu", "l0", "dead_fraction", "cosine_spliced", "cosine_random"],
        "contributions": ["residual_fvu.raw_ridge", "residual_fvu.code_ridge", "residual_fvu.nfm", "residual_fvu.mlp",
                          "total_fvu.sae_alone", "total_fvu.nfm", "interaction_share.over_linear.mean",
                          "interaction_share.over_linear.sd", "interaction_share.over_additive.mean",
                          "interaction_share.shuffled_control.mean"],
        "secondary_sae": ["fvu", "l0", "dead_fraction"],
        "identification": ["primary.interaction_selective", "secondary.interaction_selective",
                           "secondary.interaction_replicated"],
        "clamping": ["features", "linear_control_feature"],
    }  # fmt: skip
    for section, keys in headline.items():
        assert set(keys) <= set(metrics[section]), (section, set(keys) - set(metrics[section]))
    numbers = [v for section in metrics.values() for value in section.values()
               for v in (value if isinstance(value, list) else [value])]  # fmt: skip
    assert all(isinstance(v, int | float) and math.isfinite(v) for v in numbers)
    assert any(key.endswith("max_abs_interaction_contrast") for key in metrics["clamping"])
    assert metrics["contributions"]["n_seeds"] == 2
    store = ActivationStore(run_dir / "activations")
    assert len(store.manifest["split"]["train_groups"]) == 9 and len(store.manifest["split"]["val_groups"]) == 3


def test_failing_notebook_stops_the_run_and_is_named(tmp_path):
    with pytest.raises(runner.RunError, match=r"notebook 00_activations.ipynb failed.*valid layers are 0\.\.6"):
        runner.run("embedded", overrides={"layer": "99"}, runs_dir=tmp_path, reports=False)


def test_cli_reports_errors_without_a_traceback(capsys):
    assert main(["run", "--profile", "does-not-exist"]) == 2
    assert "unknown profile 'does-not-exist'" in capsys.readouterr().err
