"""The run spine: lineage (nothing stale reused), integrity (nothing corrupt reused), locks, named runs, and the
runner's handling of sources, profile names, failures and dead kernels. Each test is a fault that once let a
run exit 0 with wrong results."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch

from featint_utils import params
from featint_utils.data import activation_store
from featint_utils.data.activation_store import ActivationStore, StoreError, reusable_store
from featint_utils.data.extraction import store_from_arrays
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.io import update_metrics
from featint_utils.residual.nfm import NFM, NFMConfig
from featint_utils.residual.nfm_training import FitConfig
from featint_utils.workbench import runner, stages
from featint_utils.workbench.run import LOCK_ENV, Run, RunLock, RunLockedError, StaleArtifactError
from tests.conftest import random_store


def _shard(store: ActivationStore, split: str = "val") -> str:
    return store.manifest["splits"][split]["shards"][0]["acts"]


# -- integrity ---------------------------------------------------------------------------------------


def test_a_flipped_byte_in_a_shard_is_caught_and_the_store_is_not_reused(tmp_path):
    store = random_store(tmp_path / "s", 200, 100)
    request = store.manifest.get("request")
    assert reusable_store(tmp_path / "s", request) is not None
    path = tmp_path / "s" / _shard(store, "train")
    data = bytearray(path.read_bytes())
    data[-7] ^= 0x55  # inside the last activation: the shape still checks out
    path.write_bytes(bytes(data))
    with pytest.raises(StoreError, match="does not match its checksum"):
        ActivationStore(tmp_path / "s").verify()
    assert reusable_store(tmp_path / "s", request) is None  # rebuilt, not reused


def test_verification_is_cached_by_size_and_mtime(tmp_path, monkeypatch):

    store = random_store(tmp_path / "s", 200, 100)
    hashed = []
    real = activation_store.file_sha256
    monkeypatch.setattr(activation_store, "file_sha256", lambda p: hashed.append(p.name) or real(p))
    store.verify()
    assert len(hashed) == len(store.checksummed_files())  # the first check reads every file
    hashed.clear()
    ActivationStore(tmp_path / "s").verify()
    assert hashed == []  # nothing changed: nothing read again
    shard = tmp_path / "s" / _shard(store)
    os.utime(shard, ns=(shard.stat().st_atime_ns, shard.stat().st_mtime_ns + 1))
    ActivationStore(tmp_path / "s").verify()
    assert hashed == [shard.name]  # only the touched file


def test_nan_in_a_val_shard_is_a_clear_error_not_a_nan_metric(tmp_path):
    store = random_store(tmp_path / "activations", 200, 100)
    acts = np.load(tmp_path / "activations" / _shard(store), mmap_mode="r+")
    acts[3, 2] = np.nan
    acts.flush()
    with pytest.raises(StoreError, match="does not match its checksum"):
        Run(tmp_path).store()  # the spine verifies before any stage reads
    # read past the spine, unverified: the metric it gives is refused, never written
    from featint_utils.dictionary.metrics import evaluate_sae

    sae = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=store.scale), seed=0)
    fvu = evaluate_sae(sae, ActivationStore(tmp_path / "activations"), "val")["fvu"]
    with pytest.raises(FloatingPointError, match=r"non-finite primary_sae metric\(s\) \['fvu'\]"):
        update_metrics(tmp_path, "primary_sae", {"fvu": fvu})
    assert not (tmp_path / "metrics.json").exists()


def test_an_unreadable_manifest_is_a_store_error_and_the_store_is_rebuilt(tmp_path):
    random_store(tmp_path / "s", 50, 20)
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_text(manifest.read_text()[:100])
    with pytest.raises(StoreError, match="unreadable"):
        ActivationStore(tmp_path / "s")
    assert reusable_store(tmp_path / "s", None) is None


def test_all_zero_activations_are_refused(tmp_path):
    with pytest.raises(StoreError, match="every training activation is zero"):
        store_from_arrays(tmp_path / "s", {"train": np.zeros((20, 4)), "val": np.zeros((5, 4))})


def test_non_finite_metrics_and_losses_are_errors(tmp_path):
    with pytest.raises(FloatingPointError, match=r"\['fvu'\]"):
        update_metrics(tmp_path, "primary_sae", {"fvu": float("nan"), "l0": 32.0})
    assert not (tmp_path / "metrics.json").exists()
    update_metrics(tmp_path, "x", {"limit": None, "features": [1, 2]})  # undefined is not non-finite
    store = random_store(tmp_path / "s", 512, 64)
    trainer = SAETrainer(store, 32, 4, TrainConfig(train_tokens=4096, batch_size=128, lr=1e30), tmp_path / "sae")
    with pytest.raises(FloatingPointError, match="training diverged"):
        trainer.train(resume=False)
    assert not (tmp_path / "sae" / "sae").exists()  # no SAE saved from a diverged run


@pytest.mark.parametrize(
    ("name", "raw", "message"),
    [
        ("sae_lr", "inf", "must be finite"),
        ("sae_lr", "-1e-3", "zero or more"),
        ("sae_train_tokens", "-5", "positive"),
        ("sae_batch_size", "0", "positive"),
        ("val_fraction", "1.0", "between 0 and 1"),
        ("nfm_seeds", "0,0", "distinct"),
        ("clamp_levels", "0,1", "non-zero"),
        ("device", "gpu", "auto, cpu"),
        ("sae_k", "5000", "exceeds sae_latents"),
        ("sae_train_tokens", "100", "less than one batch"),
        ("test_fraction", "0.9", "no documents to fit"),
    ],
)
def test_degenerate_settings_are_refused_before_anything_runs(tmp_path, name, raw, message):
    with pytest.raises(runner.RunError, match=message):
        runner.run("embedded", overrides={name: raw}, run_dir=tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_library_configs_refuse_degenerate_values():
    with pytest.raises(ValueError, match="batch_size must be positive"):
        TrainConfig(train_tokens=100, batch_size=0)
    with pytest.raises(ValueError, match="lr must be finite"):
        TrainConfig(train_tokens=100, batch_size=10, lr=float("inf"))
    with pytest.raises(ValueError, match="lr must be positive"):
        FitConfig(lr=float("nan"))


# -- lineage -----------------------------------------------------------------------------------------


def _primary(run: Run, seed: int) -> TopKSAE:
    """A primary SAE saved as stage 01 would, recorded as made from the run's current store."""
    run.begin_primary_sae()
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=run.store().scale), seed=seed)
    sae.save(run.primary_dir / "sae")
    return sae


def _fitted_nfm(run: Run) -> None:
    """An NFM of seed 0 saved as stage 02 would."""
    run.begin_nfm_stage()
    NFM(NFMConfig(32, 16, k_embed=8), seed=0).save(run.nfm_model_dir(0))


def _run(tmp_path) -> Run:
    random_store(tmp_path / "activations", 200, 100)
    values = {**{k: v for s in params.STAGES for k, v in params.defaults(s).items()}}
    return Run(tmp_path, "02_nfm", values)


def test_a_retrained_sae_makes_the_nfm_stage_start_again_and_readers_refuse_the_old_nfms(tmp_path, capsys):
    run = _run(tmp_path)
    _primary(run, seed=0)
    _fitted_nfm(run)
    assert run.nfm(0).cfg.k_embed == 8  # up to date: readable
    _primary(Run(tmp_path, "01_primary_sae", run.params), seed=1)  # stage 01 again, other weights
    fresh = Run(tmp_path, "02_nfm", run.params)
    with pytest.raises(StaleArtifactError, match=r"earlier primary_sae.*--only 02"):
        fresh.nfm(0)  # 03-06 refuse an NFM fitted to the old SAE's residual
    fresh.begin_nfm_stage()  # stage 02 again: the old fits are gone, not resumed
    assert "its inputs changed (primary_sae)" in capsys.readouterr().out
    assert not fresh.nfm_model_dir(0).exists()


def test_a_rebuilt_store_makes_readers_refuse_the_old_sae(tmp_path):
    run = _run(tmp_path)
    _primary(run, seed=0)
    random_store(tmp_path / "activations", 300, 100)  # stage 00 again, e.g. at another layer
    with pytest.raises(StaleArtifactError, match=r"primary SAE .* earlier store.*--only 01"):
        Run(tmp_path, "02_nfm", run.params).primary_sae()


def test_a_changed_setting_starts_the_artifact_again_and_an_unchanged_one_keeps_it(tmp_path, capsys):
    run = _run(tmp_path)
    _primary(run, seed=0)
    (run.primary_dir / "checkpoint").mkdir()
    Run(tmp_path, "01_primary_sae", run.params).begin_primary_sae()
    assert (run.primary_dir / "checkpoint").exists()  # same inputs: an interrupted training resumes
    Run(tmp_path, "01_primary_sae", run.params | {"sae_k": 16}).begin_primary_sae()
    assert not (run.primary_dir / "checkpoint").exists()
    assert "its inputs changed (sae_k)" in capsys.readouterr().out


def test_an_nfm_seed_that_02_did_not_fit_is_named(tmp_path):
    run = _run(tmp_path)
    _primary(run, seed=0)
    _fitted_nfm(run)
    with pytest.raises(StaleArtifactError, match="no NFM of seed 3 .*seed0"):
        run.nfm(3)


def test_a_finished_training_keeps_no_optimizer_state_unless_asked(tmp_path):
    from safetensors.torch import load_file

    store = random_store(tmp_path / "s", 512, 64)
    for keep in (False, True):
        out = tmp_path / f"keep{keep}"
        SAETrainer(store, 32, 4, TrainConfig(train_tokens=1024, batch_size=128), out).train(keep_optimizer=keep)
        keys = load_file(str(out / "checkpoint" / "state.safetensors"))
        assert any(k.startswith("adam.") for k in keys) == keep
        again = SAETrainer(store, 32, 4, TrainConfig(train_tokens=1024, batch_size=128), out)
        torch.testing.assert_close(again.train().W_dec, TopKSAE.load(out / "sae").W_dec)  # returns at once


# -- locks and names ---------------------------------------------------------------------------------


def test_a_second_writer_is_refused_with_the_holders_name(tmp_path):
    first = RunLock(tmp_path)
    first.acquire("stage 02_nfm")
    with pytest.raises(RunLockedError, match=r"in use by stage 02_nfm \(pid \d+"):
        RunLock(tmp_path).acquire("stage 03_contributions")
    with pytest.raises(runner.RunError, match="in use by stage 02_nfm"):
        runner.run("embedded", run_dir=tmp_path)
    first.release()
    second = RunLock(tmp_path)
    second.acquire("another")  # free again once released
    second.release()


def test_profile_and_run_names_cannot_escape(tmp_path):
    for bad in ("../profiles/embedded", "/etc/passwd", "a/b", ".."):
        with pytest.raises(runner.RunError, match="not allowed"):
            runner.run(bad)
        with pytest.raises(runner.RunError, match="not allowed"):
            runner.run("embedded", name=bad)
    assert runner.run_directory("embedded", runs_dir=tmp_path) == tmp_path.resolve() / "embedded"
    assert runner.run_directory("embedded", name="k16", runs_dir=tmp_path) == tmp_path.resolve() / "k16"
    assert runner.run_directory("embedded", run_dir=tmp_path / "x") == (tmp_path / "x").resolve()


# -- the runner: sources, failures, dead kernels -----------------------------------------------------

NOTEBOOK = """# %% tags=["parameters"]
run_dir: str = ""

# %%
from pathlib import Path

from featint_utils.io import update_metrics

{body}
"""


def _notebooks(tmp_path, body: str, stale_twin: bool = False):
    import jupytext

    directory = tmp_path / "notebooks"
    directory.mkdir(exist_ok=True)
    source = directory / "00_activations.py"
    source.write_text(NOTEBOOK.format(body=body))
    if stale_twin:  # an .ipynb that says something else: the runner must not execute it
        jupytext.write(
            jupytext.reads(NOTEBOOK.format(body="raise RuntimeError('stale twin ran')"), "py:percent"),
            source.with_suffix(".ipynb"),
        )
    return directory


def test_the_runner_executes_the_py_source_not_a_stale_ipynb(tmp_path):
    body = 'update_metrics(run_dir, "probe", {"ran": "py source"})'
    nbs = _notebooks(tmp_path, body, stale_twin=True)
    root = runner.run("embedded", only=["00"], notebooks_dir=nbs, run_dir=tmp_path / "r", reports=False)
    assert json.loads((root / "metrics.json").read_text())["probe"]["ran"] == "py source"
    lock = RunLock(root)
    lock.acquire("after the run")  # the runner let go of the lock ...
    lock.release()
    assert LOCK_ENV not in os.environ  # ... and this process no longer tells kernels that it holds it


def test_a_failed_rerun_keeps_the_last_good_notebook_and_metrics_and_records_the_attempt(tmp_path):
    good = 'update_metrics(run_dir, "probe", {"value": 1.0})\nprint("good run")'
    root = runner.run(
        "embedded", only=["00"], notebooks_dir=_notebooks(tmp_path, good), run_dir=tmp_path / "r", reports=False
    )
    executed = (root / "notebooks" / "00_activations.ipynb").read_text()
    bad = 'update_metrics(run_dir, "probe", {"value": 2.0})\nraise ValueError("broken on purpose")'
    with pytest.raises(runner.RunError, match="broken on purpose"):
        runner.run("embedded", only=["00"], notebooks_dir=_notebooks(tmp_path, bad), run_dir=root, reports=False)
    assert (root / "notebooks" / "00_activations.ipynb").read_text() == executed
    assert json.loads((root / "metrics.json").read_text())["probe"]["value"] == 1.0
    assert "broken on purpose" in (root / "attempts" / "00_activations.ipynb").read_text()
    record = json.loads((root / "run.json").read_text())
    assert [a["status"] for a in record["attempts"]] == ["ok", "failed"]
    assert record["stages"]["00_activations"]["status"] == "ok"  # the last good execution


def test_a_dead_kernel_is_a_clear_error_and_the_run_is_recorded_as_failed(tmp_path):
    body = "import os\nimport signal\n\nos.kill(os.getpid(), signal.SIGKILL)"
    with pytest.raises(runner.RunError, match="kernel running 00_activations died"):
        runner.run(
            "embedded", only=["00"], notebooks_dir=_notebooks(tmp_path, body), run_dir=tmp_path / "r", reports=False
        )
    record = json.loads((tmp_path / "r" / "run.json").read_text())
    assert record["attempts"][-1]["status"] == "failed"
    assert "died" in record["attempts"][-1]["stages"]["00_activations"]["error"]


def test_written_files_are_readable_by_the_group(tmp_path):
    from featint_utils.io import write_json

    old = os.umask(0o022)
    try:
        write_json(tmp_path / "x.json", {"a": 1})
    finally:
        os.umask(old)
    assert (tmp_path / "x.json").stat().st_mode & 0o777 == 0o644


def test_run_dir_is_not_a_parameter_a_profile_or_set_can_change():
    with pytest.raises(runner.RunError, match=r"unknown parameter\(s\) \['run_dir'\]"):
        runner.resolve_parameters({}, {"run_dir": "/elsewhere"})


def test_a_finished_nfm_fit_keeps_its_best_weights_only_unless_asked(tmp_path):
    from safetensors.torch import load_file

    from featint_utils.residual.code_data import code_data_from_arrays, split_fit_tune
    from featint_utils.residual.nfm_training import ResidualTrainer

    rng = np.random.default_rng(0)
    indices = np.stack([rng.choice(20, 3, replace=False) for _ in range(600)])
    data = code_data_from_arrays(rng.exponential(size=(600, 3)) + 0.1, indices, rng.normal(size=(600, 4)))
    fit, tune = split_fit_tune(data, 0.25)
    for keep in (False, True):
        cfg = FitConfig(batch_size=64, lr=3e-3, max_epochs=3, patience=100, keep_optimizer=keep)
        out = tmp_path / f"keep{keep}"
        model = ResidualTrainer(NFM(NFMConfig(20, 4, k_embed=4), seed=0), fit, tune, cfg, out).train()
        keys = load_file(str(out / "checkpoint" / "state.safetensors"))
        assert any(k.startswith("adam.") for k in keys) == keep and any(k.startswith("model.") for k in keys) == keep
        again = ResidualTrainer(NFM(NFMConfig(20, 4, k_embed=4), seed=0), fit, tune, cfg, out)
        for a, b in zip(model.state_dict().values(), again.train().state_dict().values(), strict=True):
            torch.testing.assert_close(a, b)  # a finished fit returns its best weights without training
        assert again.epoch == 3


def test_another_runs_texts_in_a_store_are_caught(tmp_path):
    """Two runs sharing a store once left one run's texts.jsonl beside the other's shards, and verify() passed."""
    texts = [
        {"index": i, "text_id": f"t{i}", "group": f"g{i}", "split": "train", "text": f"text {i}"} for i in range(4)
    ]
    store = store_from_arrays(tmp_path / "s", {"train": np.ones((4, 3)), "val": np.ones((2, 3))}, texts=texts)
    store.verify()
    (tmp_path / "s" / "texts.jsonl").write_text(json.dumps(texts[0] | {"text": "another run's text"}) + "\n")
    with pytest.raises(StoreError, match="texts.jsonl does not match its checksum"):
        ActivationStore(tmp_path / "s").verify()


def test_a_notebook_opened_by_hand_validates_its_parameters_and_takes_the_lock(tmp_path):
    values = params.defaults("01_primary_sae")
    with pytest.raises(params.ParameterError, match="sae_lr=inf: must be finite"):
        Run.open(tmp_path, "01_primary_sae", values | {"sae_lr": float("inf")})
    with pytest.raises(params.ParameterError, match=r"parameters \['sae_k'\] are not set"):
        Run.open(tmp_path, "01_primary_sae", {k: v for k, v in values.items() if k != "sae_k"})
    run = Run.open(tmp_path, "01_primary_sae", values)
    with pytest.raises(RunLockedError, match="in use by stage 01_primary_sae"):
        RunLock(tmp_path).acquire("another kernel")  # another process (its own open file) is refused
    run = Run.open(tmp_path, "01_primary_sae", values)  # the same kernel re-executing its cell is not
    with pytest.raises(RunLockedError, match="in use by stage 01_primary_sae"):
        RunLock(tmp_path).acquire("another kernel")
    run.close()
    Run.open(tmp_path, "02_nfm", params.defaults("02_nfm")).close()
    RunLock(tmp_path).acquire("another kernel")  # closed: free


def test_a_store_rebuilt_with_the_same_content_keeps_everything_made_from_it(tmp_path):
    """Lineage is by content: a corrupt store extracted again (bit-identical) invalidates nothing downstream."""
    run = _run(tmp_path)
    _primary(run, seed=0)
    cfg = TrainConfig(train_tokens=1024, batch_size=128)
    trained = SAETrainer(run.store(), 32, 4, cfg, tmp_path / "sae").train()
    before = run.store().manifest["created"]
    rebuilt = random_store(tmp_path / "activations", 200, 100)  # the same arrays, written again
    assert rebuilt.manifest["created"] != before and rebuilt.fingerprint == run.store().fingerprint
    fresh = Run(tmp_path, "02_nfm", run.params)
    assert fresh.primary_sae().cfg.n_latents == 32  # the SAE's lineage still holds
    again = SAETrainer(fresh.store(), 32, 4, cfg, tmp_path / "sae")
    torch.testing.assert_close(again.train().W_dec, trained.W_dec)  # its checkpoint is still the one to resume
    assert again.step == cfg.steps()


def test_a_relative_run_dir_is_the_repositorys_whatever_the_kernels_cwd(tmp_path, monkeypatch):
    """JupyterLab starts a notebook's kernel in notebooks/: its default run_dir must still be runs/embedded."""
    from featint_utils.workbench.run import ROOT

    monkeypatch.chdir(tmp_path)
    assert Run("runs/embedded").root == ROOT / "runs" / "embedded"
    assert Run(tmp_path / "x").root == tmp_path / "x"


# -- a published SAE as the primary SAE ----------------------------------------------------------------

SAELENS_MINILM = Path(__file__).parent / "fixtures" / "saelens_minilm_l3"  # real SAELens output: d_in 384, layer 3


def _minilm_run(tmp_path, layer: int = 3, d: int = 384, **info) -> dict:
    """A store as stage 00 writes for the embedded MiniLM at ``layer`` (random activations), and stage 01's
    parameters."""
    rng = np.random.default_rng(0)
    store_from_arrays(
        tmp_path / "activations",
        {"train": rng.normal(0.5, 2.0, (300, d)), "val": rng.normal(0.5, 2.0, (200, d))},
        info={"model": "embedded", "model_type": "bert", "layer": layer, "hook": f"encoder.layer.{layer - 1}"} | info,
    )
    return {k: v for s in params.STAGES for k, v in params.defaults(s).items()} | {"device": "cpu"}


def _install(tmp_path, values, source) -> stages.PrimarySAE:
    return stages.train_primary_sae(Run(tmp_path, "01_primary_sae", values | {"primary_sae": str(source)}))


def test_stage_01_installs_a_saelens_sae_untrained_and_later_stages_read_it(tmp_path, monkeypatch, capsys):
    import hashlib

    from featint_utils.dictionary.metrics import evaluate_sae
    from featint_utils.dictionary.saelens import from_saelens
    from featint_utils.residual.code_data import build_residual_data

    values = _minilm_run(tmp_path)
    monkeypatch.setattr(stages, "SAETrainer", None)  # any training would fail
    primary = _install(tmp_path, values, SAELENS_MINILM)
    assert primary.history.empty and "installed" in capsys.readouterr().out
    content = b"".join(
        name.encode() + (SAELENS_MINILM / name).read_bytes() for name in ("cfg.json", "sae_weights.safetensors")
    )
    assert primary.source == {"source": str(SAELENS_MINILM.resolve()), "sha256": hashlib.sha256(content).hexdigest()}
    assert sorted(p.name for p in (tmp_path / "primary_sae").iterdir()) == ["lineage.json", "sae"]  # no checkpoint
    downstream = Run(tmp_path, "02_nfm", values)
    sae = downstream.primary_sae()
    assert downstream.primary_sae_source() == primary.source
    store = downstream.store()
    assert sae.cfg.input_scale == pytest.approx(store.scale) and store.scale != pytest.approx(1.0)
    # the installed SAE (normalised inputs, like a trained one) is SAELens's SAE: same codes, same raw output
    lens = from_saelens(SAELENS_MINILM).requires_grad_(False)
    x_raw = torch.from_numpy(store.load("val"))
    torch.testing.assert_close(sae.reconstruct_raw(x_raw), lens.reconstruct_raw(x_raw), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.encode(x_raw * store.scale).values, lens.encode(x_raw).values, rtol=1e-4, atol=1e-4)
    # stage 01's metrics and stage 02's residuals of it are SAELens's SAE's, in the store's normalised units
    residual = (x_raw - lens.reconstruct_raw(x_raw)).double()
    fvu = float(residual.pow(2).sum() / (x_raw.double() - x_raw.double().mean(0)).pow(2).sum())
    assert evaluate_sae(sae, store, "val")["fvu"] == pytest.approx(fvu, rel=1e-4)
    data = build_residual_data(sae, store, tmp_path / "residuals")
    assert "differs from the store's" not in capsys.readouterr().out
    target = torch.from_numpy(np.array(data.target))
    torch.testing.assert_close(target, (residual * store.scale).float(), rtol=1e-4, atol=1e-4)


def test_a_replaced_published_sae_makes_later_stages_start_again(tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    values = _minilm_run(tmp_path)
    source = tmp_path / "published"
    shutil.copytree(SAELENS_MINILM, source)
    _install(tmp_path, values, source)
    run = Run(tmp_path, "02_nfm", values)
    run.begin_nfm_stage()
    NFM(NFMConfig(64, 384, k_embed=8), seed=0).save(run.nfm_model_dir(0))
    assert run.nfm(0).cfg.k_embed == 8
    _install(tmp_path, values, source)  # the same files again: nothing downstream changes
    assert Run(tmp_path, "02_nfm", values).nfm(0).cfg.k_embed == 8
    weights = load_file(str(source / "sae_weights.safetensors"))
    save_file(weights | {"W_dec": weights["W_dec"] * 1.5}, str(source / "sae_weights.safetensors"))
    capsys.readouterr()
    _install(tmp_path, values, source)  # new weights at the same path
    assert "its inputs changed (pretrained)" in capsys.readouterr().out
    with pytest.raises(StaleArtifactError, match="earlier primary_sae"):
        Run(tmp_path, "02_nfm", values).nfm(0)
    Run(tmp_path, "01_primary_sae", values).begin_primary_sae()  # back to training: the installed SAE goes
    assert "its inputs changed (pretrained, sae_" in capsys.readouterr().out
    assert not (tmp_path / "primary_sae" / "sae").exists()


def test_a_published_sae_that_does_not_fit_the_run_is_refused_clearly(tmp_path):
    import shutil

    values = _minilm_run(tmp_path / "layer2", layer=2)
    with pytest.raises(ValueError, match=r"reads hidden_states\[3\], not hidden_states\[2\].*stage 00's layer"):
        _install(tmp_path / "layer2", values, SAELENS_MINILM)
    values = _minilm_run(tmp_path / "narrow", d=16)
    with pytest.raises(ValueError, match="reads 384-wide activations, but this run's store holds 16-wide ones"):
        _install(tmp_path / "narrow", values, SAELENS_MINILM)
    # a causal LM's last layer is its final norm's output, which block n-1's hook_resid_post is not
    values = _minilm_run(tmp_path / "gpt2", model="gpt2", model_type="gpt2", hook="transformer.ln_f")
    last_block = tmp_path / "last_block"
    shutil.copytree(SAELENS_MINILM, last_block)
    cfg = json.loads((last_block / "cfg.json").read_text())
    cfg["metadata"]["hook_name"] = "blocks.2.hook_resid_post"
    (last_block / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="final norm applied"):
        _install(tmp_path / "gpt2", values, last_block)
    with pytest.raises(FileNotFoundError, match="no directory"):
        _install(tmp_path / "gpt2", values, tmp_path / "missing")
    assert not (tmp_path / "layer2" / "primary_sae" / "sae").exists()


def test_a_published_sae_of_another_model_warns(tmp_path):
    values = _minilm_run(tmp_path, model="EleutherAI/pythia-70m")
    with pytest.warns(UserWarning, match="trained on model 'sentence-transformers/all-MiniLM-L6-v2'"):
        _install(tmp_path, values, SAELENS_MINILM)
    assert Run(tmp_path, "02_nfm", values).primary_sae().cfg.n_latents == 64
    # activations from a file record no layer (nor a model): only the width can be checked, and it is said
    file_run = tmp_path / "from_file"
    values = _minilm_run(file_run, layer=-1, model="activations:acts.npz", model_type="", hook="")
    with pytest.warns(UserWarning, match="no layer recorded") as warned:
        _install(file_run, values, SAELENS_MINILM)
    assert not [w for w in warned if "trained on model" in str(w.message)]


def test_a_saelens_release_is_fetched_with_sae_lens_or_refused_clearly(tmp_path, monkeypatch):
    import shutil
    import sys
    import types

    values = _minilm_run(tmp_path)
    monkeypatch.setitem(sys.modules, "sae_lens", None)  # not installed
    with pytest.raises(ImportError, match="needs the sae_lens package"):
        _install(tmp_path, values, "saelens:minilm-res/blocks.3.hook_resid_pre")
    asked = []

    class SAE:  # sae_lens's interface: from_pretrained(release, sae_id), then save_model(path)
        @staticmethod
        def from_pretrained(release, sae_id, device="cpu"):
            asked.append((release, sae_id))
            return SAE()

        def save_model(self, path):
            shutil.copytree(SAELENS_MINILM, path, dirs_exist_ok=True)

    monkeypatch.setitem(sys.modules, "sae_lens", types.SimpleNamespace(SAE=SAE))
    primary = _install(tmp_path, values, "saelens:minilm-res/layer_3/width_64")
    assert asked == [("minilm-res", "layer_3/width_64")]
    assert primary.source["source"] == "saelens:minilm-res/layer_3/width_64"
    with pytest.raises(ValueError, match="saelens:RELEASE/SAE_ID"):
        _install(tmp_path, values, "saelens:no-sae-id")
