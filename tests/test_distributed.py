"""Scale-out on CPU with gloo: 2 torchrun ranks agree with one process (SAE training, extraction), a killed rank
fails the job and the rerun resumes to the same weights; device handling of checkpoints and the splice."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from featint_utils.data import distributed, models
from featint_utils.data.activation_store import ActivationStore
from featint_utils.data.extraction import store_from_arrays
from featint_utils.dictionary import sae_training
from featint_utils.dictionary.sae import TopKSAE
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.integration import clamping
from featint_utils.io import read_json
from featint_utils.residual import interaction
from featint_utils.residual.decomposition import Clamp
from featint_utils.residual.nfm import NFM
from featint_utils.residual.nfm_training import FitConfig
from featint_utils.workbench import runner, stages
from tests import dist_nfm_worker
from tests.dist_worker import CONFIG, SETTINGS, trainer
from tests.test_clamping import decomposition as clamping_decomposition

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).with_name("dist_worker.py")
NFM_WORKER = Path(__file__).with_name("dist_nfm_worker.py")
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def torchrun(*args: str, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *args]
    return subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)


def ranks_said(done: subprocess.CompletedProcess) -> str:
    """What the ranks printed, without progress bars and warnings, so a failure shows the rank's own error
    (a traceback or gloo's message) and where it had got to (its last lines of output), not only torchrun's
    summary."""
    noise = ("it/s", "epoch/s", "step/s", "text/s", "Warning", "self.objective")
    errors = "\n".join(line for line in done.stderr.splitlines() if not any(n in line for n in noise))[-8000:]
    return f"{errors}\n-- the ranks' last output --\n" + "\n".join(done.stdout.splitlines()[-20:])


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ActivationStore:
    """Sparse combinations of 48 planted directions in 32 dimensions, several shards."""
    rng = np.random.default_rng(0)
    directions = rng.normal(size=(48, 32))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)

    def draw(n):
        chosen = np.argsort(rng.random((n, 48)), axis=1)[:, :3]
        return np.einsum("nk,nkd->nd", rng.uniform(1, 3, (n, 3)), directions[chosen]) + 0.01 * rng.normal(size=(n, 32))

    path = tmp_path_factory.mktemp("dist") / "store"
    return store_from_arrays(path, {"train": draw(8192), "val": draw(1024)}, shard_mb=0.25)


@pytest.fixture(scope="module")
def two_ranks(store, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "two_ranks"
    done = torchrun(str(WORKER), str(store.path), str(out))
    assert done.returncode == 0, ranks_said(done)
    return out


def weights(out: Path) -> dict[str, torch.Tensor]:
    return TopKSAE.load(out / "sae").state_dict()


def test_two_ranks_with_half_batches_train_the_sae_of_one_process_with_the_whole_batch(store, two_ranks, tmp_path):
    single = trainer(str(store.path), str(tmp_path / "one"), distributed.SINGLE)
    single.train()
    history = pd.read_csv(two_ranks / "history.csv")
    assert history["aux_loss"].gt(0).sum() >= 8, "AuxK must be active for most of the steps compared"
    assert len(history) == CONFIG["train_tokens"] // CONFIG["batch_size"]
    # Two ranks add their half-batch gradients where one process sums the whole batch: float32 sums of 512 rows in
    # another order, relative difference up to ~512 * eps32 = 3e-5 of a gradient. Adam's step lr * m / sqrt(v) is
    # invariant to the gradient's scale, so a relative change d moves a step by about lr * d: 12 steps of lr 3e-3
    # move a weight by ~1e-6 at most. atol 1e-5 is ten times that and a hundred times below where one rank's
    # half batch alone ends (next test). A top-k choice flipped by such a difference would break any tolerance;
    # the data and seeds are fixed, and none is within reach of it here.
    for name, value in single.sae.state_dict().items():
        torch.testing.assert_close(weights(two_ranks)[name], value, atol=1e-5, rtol=0, msg=name)
    # the global batch's numbers, as one process saw them
    np.testing.assert_allclose(history["fvu"], single.history_frame()["fvu"], rtol=1e-4)
    np.testing.assert_allclose(history["dead_fraction"], single.history_frame()["dead_fraction"])


def test_an_sae_of_two_ranks_is_not_one_rank_of_half_the_batch(store, two_ranks, tmp_path):
    """The comparison above has power: each rank's own half-batch, trained alone, ends elsewhere."""
    half = SAETrainer(
        store, **SETTINGS, train=TrainConfig(**CONFIG | {"batch_size": CONFIG["batch_size"] // 2}), out_dir=tmp_path
    )
    half.train(stop_after=CONFIG["train_tokens"] // CONFIG["batch_size"])
    gap = (half.sae.W_enc - weights(two_ranks)["W_enc"]).abs().max()
    assert gap > 1e-3


def test_a_killed_rank_fails_the_job_and_the_rerun_resumes_to_the_uninterrupted_weights(store, two_ranks, tmp_path):
    out = tmp_path / "killed"
    killed = torchrun(str(WORKER), str(store.path), str(out), "--kill-rank", "1", "--kill-at", "7")
    assert killed.returncode != 0
    assert "dist_worker.py FAILED" in killed.stderr and "rank      : 1" in killed.stderr
    assert "Signal 9 (SIGKILL)" in killed.stderr
    assert not (out / "sae").exists(), "a failed job leaves no result that looks finished"
    assert (out / "checkpoint" / "state.json").exists()
    resumed = torchrun(str(WORKER), str(store.path), str(out))
    assert resumed.returncode == 0, ranks_said(resumed)
    assert "resuming from step 5 of 12" in resumed.stdout
    for name, value in weights(two_ranks).items():
        torch.testing.assert_close(weights(out)[name], value, atol=0, rtol=0, msg=name)


def test_two_rank_extraction_stores_the_rows_of_one_process(tmp_path):
    sets = ["--set", "max_groups=12"]
    one = runner.run_scaled_stage("00", "embedded", runner.parse_sets(["max_groups=12"]), run_dir=tmp_path / "one")
    done = torchrun("-m", "featint_utils", "stage", "00", "--run-dir", str(tmp_path / "two"), *sets)
    assert done.returncode == 0, ranks_said(done)
    a, b = ActivationStore(one / "activations"), ActivationStore(tmp_path / "two" / "activations")
    b.verify(cached=False)  # every rank's shards are in the one manifest, with their checksums
    assert {s["acts"].split("-")[1] for s in b.manifest["splits"]["train"]["shards"]} == {"r0", "r1"}
    assert a.manifest["request"] == b.manifest["request"] and a.manifest["splits"]["val"]["n_texts"] > 0
    for split in ("train", "val"):
        rows_a, rows_b = a.tokens(split).to_numpy(), b.tokens(split).to_numpy()
        order_a, order_b = np.lexsort(rows_a.T[::-1]), np.lexsort(rows_b.T[::-1])
        np.testing.assert_array_equal(rows_a[order_a], rows_b[order_b])
        np.testing.assert_allclose(a.load(split)[order_a], b.load(split)[order_b], atol=1e-5)
    # The scale is sqrt(d / mean ||x||^2) over the training rows. Each store's is its own rows' value, up to
    # float64 summation in some order: relative error at most (n_rows + d) * eps64 (positive terms).
    eps64 = np.finfo(np.float64).eps
    rows = {name: store.load("train", normalize=False).astype(np.float64) for name, store in (("a", a), ("b", b))}
    for name, store in (("a", a), ("b", b)):
        own = np.sqrt(store.d_model / np.einsum("ij,ij->i", rows[name], rows[name]).mean())
        assert store.scale == pytest.approx(own, rel=(len(rows[name]) + store.d_model) * eps64), name
    # The two stores' rows differ by what a different padding does to the forward pass (atol above), so their
    # scales differ by what those rows make of them: mean ||x||^2 moves by at most 2 RMS||x|| RMS||dx|| +
    # RMS||dx||^2 (Cauchy-Schwarz), and the scale by half of that, relatively, to first order.
    x = rows["a"][np.lexsort(a.tokens("train").to_numpy().T[::-1])]
    dx = rows["b"][np.lexsort(b.tokens("train").to_numpy().T[::-1])] - x
    rms_x, rms_dx = np.sqrt((x**2).sum(1).mean()), np.sqrt((dx**2).sum(1).mean())
    moved = (2 * rms_x * rms_dx + rms_dx**2) / rms_x**2
    assert b.scale == pytest.approx(a.scale, rel=0.5 * moved * (1 + moved) + 2 * (len(x) + a.d_model) * eps64)


@pytest.mark.parametrize("device", DEVICES)
def test_a_checkpoint_resumes_on_another_device_to_the_same_weights(store, tmp_path, device):
    """Checkpoints hold host tensors: a run stopped on one device finishes on the other exactly as it would
    have on the first (CPU -> CPU here; CPU -> CUDA where a GPU is present)."""
    config = TrainConfig(**CONFIG)
    whole = SAETrainer(store, **SETTINGS, train=config, out_dir=tmp_path / "whole")
    whole.train()
    first = SAETrainer(store, **SETTINGS, train=config, out_dir=tmp_path / "moved")
    first.train(stop_after=5)  # checkpointed at step 5
    there = distributed.Dist(device=torch.device(device))
    second = SAETrainer(store, **SETTINGS, train=config, out_dir=tmp_path / "moved", dist=there)
    second.train()
    assert second.sae.W_enc.device.type == device
    tolerance = 0 if device == "cpu" else 1e-4
    for name, value in whole.sae.state_dict().items():
        torch.testing.assert_close(second.sae.state_dict()[name].cpu(), value, atol=tolerance, rtol=0, msg=name)


@pytest.mark.parametrize("units", [False, True])
def test_bf16_is_asked_of_the_training_device_not_of_the_machine(monkeypatch, units):
    monkeypatch.setattr(sae_training, "cpu_has_bf16_units", lambda: units)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a GPU in the machine says nothing of the CPU
    assert sae_training.fast_bf16("cpu") is units
    assert TrainConfig(train_tokens=10, batch_size=10).use_bf16("cpu") is units
    assert TrainConfig(train_tokens=10, batch_size=10, bf16_encoder="on").use_bf16("cpu") is True
    assert TrainConfig(train_tokens=10, batch_size=10, bf16_encoder="off").use_bf16("cpu") is False


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("device", DEVICES)
def test_the_unclamped_splice_reproduces_the_model_on_its_device_and_dtype(device, dtype):
    """Model and decomposition on ``device``, the model's weights in ``dtype`` (model_dtype): the hidden
    states never leave the device, the SAE reads them in float32, and the model's output is unchanged."""
    loaded = models.load_model("embedded", device=device, dtype=stages.MODEL_DTYPES[dtype])
    dec = clamping_decomposition(loaded.d_model, scale=0.3).to(device)
    inputs = {
        k: v.to(device) for k, v in loaded.tokenizer("The committee regrets the delay.", return_tensors="pt").items()
    }
    keep = inputs["attention_mask"].bool()
    keep[:, [0, -1]] = False  # [CLS] and [SEP] are never spliced
    with torch.no_grad():
        clean = loaded.model(**inputs).last_hidden_state
        with clamping.clamped(loaded, 3, dec, None, None) as state:
            state["mask"] = keep
            spliced = loaded.model(**inputs).last_hidden_state
        moved = None
        with clamping.clamped(loaded, 3, dec, Clamp("secondary", 0, "add", 20.0), None) as state:
            state["mask"] = keep
            moved = loaded.model(**inputs).last_hidden_state
    assert spliced.device.type == device and spliced.dtype == stages.MODEL_DTYPES[dtype]
    # float32: exact to rounding; bf16: the splice's float32 sum rounds back to the same bf16 values
    assert (spliced.float() - clean.float()).abs().max() <= (1e-5 if dtype == "float32" else 1e-2)
    assert (moved.float() - clean.float()).abs().max() > 1e-1  # and a clamp does reach the output


def test_a_batch_size_that_does_not_split_over_the_ranks_is_refused(store, tmp_path):
    three = distributed.Dist(rank=0, world_size=3)
    with pytest.raises(ValueError, match="does not split evenly over 3 ranks"):
        SAETrainer(store, **SETTINGS, train=TrainConfig(**CONFIG), out_dir=tmp_path, dist=three)


def test_the_runner_runs_00_to_02_over_ranks_and_their_notebooks_go_on_from_the_result(tmp_path):
    tiny = {"max_groups": "12", "sae_latents": "256", "sae_train_tokens": "4096", "sae_batch_size": "256"}
    tiny |= {"splice_texts": "8", "n_show_features": "2", "nfm_batch_size": "64", "nfm_k_embed": "8"}
    tiny |= {"nfm_max_epochs": "2", "nfm_seeds": "0", "pair_ridge_pairs": "32", "power_shares": "0.05"}
    tiny |= {"power_pairs": "4"}
    root = runner.run("embedded", ["00", "01", "02"], tiny, run_dir=tmp_path / "run", reports=False, nproc=2)
    shards = ActivationStore(root / "activations").manifest["splits"]["train"]["shards"]
    assert {s["acts"].split("-")[1] for s in shards} == {"r0", "r1"}  # the ranks' store, reused by notebook 00
    executed = (root / "notebooks" / "01_primary_sae.ipynb").read_text()
    assert "resuming from step 16 of 16" in executed  # the notebook found the ranks' SAE finished: no retraining
    executed = (root / "notebooks" / "02_nfm.ipynb").read_text()
    assert (root / "nfm" / interaction.DONE).exists() and "learning rates chosen on tune" in executed
    assert "nfm (seed 0)" not in executed  # the ranks' ladder was read back, nothing refitted
    assert len(pd.read_csv(root / "nfm" / "ladder.csv")) >= 12
    attempt = json.loads((root / "run.json").read_text())["attempts"][-1]
    assert attempt["nproc"] == 2 and attempt["status"] == "ok"


# -- the NFM stage: one model data-parallel, and the whole ladder ------------------------------------------


@pytest.fixture(scope="module")
def nfm_two_ranks(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("dist") / "nfm_two_ranks"
    done = torchrun(str(NFM_WORKER), "nfm", str(out))
    assert done.returncode == 0, ranks_said(done)
    return out


def nfm_weights(out: Path) -> dict[str, torch.Tensor]:
    return NFM.load(out / "model").state_dict()


def test_two_ranks_with_half_batches_fit_the_nfm_of_one_process_with_the_whole_batch(nfm_two_ranks, tmp_path):
    single = dist_nfm_worker.nested_nfm_trainer(str(tmp_path / "one"))
    start = {k: v.clone() for k, v in single.model.state_dict().items()}
    model = single.train()
    assert single.improved and single.best_epoch >= 3  # the planted pairs are being learnt, epoch after epoch
    assert max(float((model.state_dict()[k] - start[k]).abs().max()) for k in start if start[k].numel()) > 1e-2
    two = nfm_weights(nfm_two_ranks)
    # as for the SAE above: half-batch gradient sums in another order (512 rows: ~3e-5 relative), each of Adam's
    # steps moving by lr * that; 5 epochs of ~9 steps at lr 3e-3 move a weight by ~4e-6 at most
    for name, value in model.state_dict().items():
        torch.testing.assert_close(two[name], value, atol=1e-5, rtol=1e-5, msg=name)
    ranks = pd.read_csv(nfm_two_ranks / "history.csv")
    np.testing.assert_allclose(ranks[["fit_fvu", "tune_fvu"]], single.history_frame()[["fit_fvu", "tune_fvu"]], 1e-5)


def test_an_nfm_of_two_ranks_is_not_one_rank_of_half_the_batch(nfm_two_ranks, tmp_path):
    half = dist_nfm_worker.nested_nfm_trainer(str(tmp_path / "half"), batch_size=dist_nfm_worker.FIT.batch_size // 2)
    model, two = half.train(), nfm_weights(nfm_two_ranks)
    assert max(float((two[k] - v).abs().max()) for k, v in model.state_dict().items() if v.numel()) > 1e-3


def test_two_ranks_deal_the_ladder_and_fit_exactly_that_of_one_process(tmp_path):
    done = torchrun(str(NFM_WORKER), "ladder", str(tmp_path / "ranks"))
    assert done.returncode == 0, ranks_said(done)
    ranks = dist_nfm_worker.ladder(str(tmp_path / "ranks"))  # finished: read back, not refitted
    dealt = read_json(tmp_path / "ranks" / interaction.DONE)["dealt"]
    assert dealt == {"control": 0, "control_additive_seed0": 1, "planted_0.05": 0}
    assert not (tmp_path / "ranks" / "ranks").exists()  # rank 1's copy of the residual's fits is gone
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as torchrun's ranks: the same reductions in the same order
    try:
        single = dist_nfm_worker.ladder(str(tmp_path / "one"))
    finally:
        torch.set_num_threads(threads)
    assert ranks.lrs == single.lrs
    assert len(ranks.table) == len(single.table) >= 12 and ranks.table["improved_on_start"].fillna(False).any()
    # every member trained whole on one rank, as in one process: the same arithmetic, so the same numbers
    drop = ["seconds"]
    pd.testing.assert_frame_equal(ranks.table.drop(columns=drop), single.table.drop(columns=drop), check_exact=True)
    sse = [pd.read_csv(tmp_path / where / "test_sse.csv") for where in ("ranks", "one")]
    pd.testing.assert_frame_equal(sse[0], sse[1], check_exact=True)
    planted = [read_json(tmp_path / where / "planted.json") for where in ("ranks", "one")]
    assert planted[0] == planted[1] and list(planted[0]) == ["planted_0.05"]


def test_two_ranks_fit_the_ladder_of_one_process_data_parallel(tmp_path):
    done = torchrun(str(NFM_WORKER), "ladder-ddp", str(tmp_path / "ranks"))
    assert done.returncode == 0, ranks_said(done)
    ranks = dist_nfm_worker.ladder(str(tmp_path / "ranks"))  # finished: read back, not refitted
    assert read_json(tmp_path / "ranks" / interaction.DONE)["dealt"] == {}
    single = dist_nfm_worker.ladder(str(tmp_path / "one"))
    assert ranks.lrs == single.lrs
    columns = ["residual_fvu", "gain_over_zero", "total_fvu", "tune_fvu", "refit_tune_fvu"]
    assert len(ranks.table) == len(single.table) >= 12 and ranks.table["improved_on_start"].fillna(False).any()
    for key in ("target", "model", "seed", "epochs", "best_epoch", "kept_start", "alpha", "n_pairs"):
        pd.testing.assert_series_equal(ranks.table[key], single.table[key])
    # half-batch gradients in another order, as for one NFM above (~4e-6 on a weight), through 4 epochs
    np.testing.assert_allclose(ranks.table[columns], single.table[columns], rtol=1e-5, atol=1e-7)
    sse = [pd.read_csv(tmp_path / where / "test_sse.csv") for where in ("ranks", "one")]
    np.testing.assert_allclose(sse[0]["sse"], sse[1]["sse"], rtol=1e-5)
    # the read-back answers only for the same settings and data: other planted sizes are fitted
    cfg = interaction.EstimatorConfig(
        dist_nfm_worker.NFM_SHAPE, FitConfig(batch_size=512, max_epochs=4), seeds=(0,), lr_grid=(3e-3,), n_pairs=128
    )
    other = interaction.run(dist_nfm_worker.residual_sets(), cfg, tmp_path / "one", power_shares=(0.1,), n_planted=4)
    assert "planted_0.1" in set(other.table["target"]) and "planted_0.05" not in set(other.table["target"])
