import json

import pytest

from featint_utils import params
from featint_utils.__main__ import main
from featint_utils.data.activation_store import ActivationStore
from featint_utils.workbench import runner


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


def test_activations_from_a_file_run_stages_00_to_04_and_05_refuses(tmp_path):
    """The ``activations:PATH.npz`` corpus: the same pipeline on activations cached elsewhere (here planted)."""
    from featint_utils.residual import planted

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
