"""TopK SAE: gradients, planted-direction recovery, AuxK, exact resume, interop, clear errors."""

import json

import numpy as np
import pytest
import torch

from featint_utils import sae as sae_module
from featint_utils.activations import StoreError, store_from_arrays
from featint_utils.metrics import evaluate_sae
from featint_utils.sae import SAEConfig, TopKSAE, from_saelens, to_saelens
from featint_utils.sae_training import CheckpointError, SAETrainer, TrainConfig, lr_at

D_IN, N_TRUE, K_TRUE = 32, 48, 3


def planted(n: int, seed: int, directions: np.ndarray) -> np.ndarray:
    """Sparse non-negative combinations of known unit directions plus a little noise."""
    rng = np.random.default_rng(seed)
    chosen = np.argsort(rng.random((n, len(directions))), axis=1)[:, :K_TRUE]
    x = np.einsum("nk,nkd->nd", rng.uniform(1, 3, (n, K_TRUE)), directions[chosen])
    return x + 0.01 * rng.normal(size=x.shape)


@pytest.fixture(scope="module")
def directions():
    d = np.random.default_rng(42).normal(size=(N_TRUE, D_IN))
    return d / np.linalg.norm(d, axis=1, keepdims=True)


@pytest.fixture(scope="module")
def planted_store(tmp_path_factory, directions):
    path = tmp_path_factory.mktemp("planted") / "store"
    return store_from_arrays(
        path, {"train": planted(40_000, 0, directions), "val": planted(5_000, 1, directions)}, shard_mb=0.5
    )


def small_config(**overrides):
    defaults = dict(train_tokens=200_000, batch_size=512, lr=3e-3, dead_tokens=5_000, checkpoint_every=50)
    return TrainConfig(**{**defaults, **overrides})


def dense_reference(sae, x):
    """The textbook dense TopK forward, differentiated by autograd."""
    pre = torch.relu((x - sae.b_dec) @ sae.W_enc.t() + sae.b_enc)
    values, indices = pre.topk(sae.cfg.k)
    return torch.zeros_like(pre).scatter(1, indices, values) @ sae.W_dec + sae.b_dec


def test_sparse_forward_and_backward_equal_the_dense_reference():
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(16, 64, 5), seed=1)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.1)
    x = torch.randn(40, 16)
    target = torch.randn(40, 16)
    (sae(x) - target).pow(2).sum().backward()
    sparse_grads = {n: p.grad.clone() for n, p in sae.named_parameters()}
    sae.zero_grad()
    (dense_reference(sae, x) - target).pow(2).sum().backward()
    torch.testing.assert_close(sae(x), dense_reference(sae, x))
    for name, param in sae.named_parameters():
        torch.testing.assert_close(sparse_grads[name], param.grad, rtol=1e-4, atol=1e-5, msg=name)


def test_sae_recovers_planted_directions(planted_store, directions, tmp_path):
    trainer = SAETrainer(planted_store, 64, K_TRUE, small_config(), tmp_path)
    sae = trainer.train()
    best_cosine = np.abs(directions @ sae.W_dec.detach().numpy().T).max(axis=1)
    assert best_cosine.mean() >= 0.9
    metrics = evaluate_sae(sae, planted_store)
    assert metrics["fvu"] < 0.1
    assert metrics["l0"] <= K_TRUE
    norms = sae.W_dec.detach().norm(dim=1)
    torch.testing.assert_close(norms, torch.ones_like(norms))
    reloaded = TopKSAE.load(tmp_path / "sae")
    x = torch.from_numpy(planted_store.load("val")[:100])
    torch.testing.assert_close(reloaded.reconstruct_raw(x), sae.reconstruct_raw(x))
    assert reloaded.cfg.input_scale == pytest.approx(planted_store.scale)


def test_fvu_is_about_the_mean_not_zero(planted_store):
    """An SAE that outputs only the mean explains nothing: FVU 1, whatever the mean's size."""
    sae = TopKSAE(SAEConfig(D_IN, 64, 2, input_scale=planted_store.scale))
    with torch.no_grad():
        sae.W_dec.zero_()
        sae.b_dec.copy_(torch.from_numpy(planted_store.load("val", normalize=True).mean(0)))
    assert evaluate_sae(sae, planted_store)["fvu"] == pytest.approx(1.0, abs=1e-6)


def test_kill_and_resume_equals_an_uninterrupted_run(planted_store, tmp_path):
    config = small_config(train_tokens=60 * 512, checkpoint_every=10)
    uninterrupted = SAETrainer(planted_store, 64, K_TRUE, config, tmp_path / "a").train()
    first = SAETrainer(planted_store, 64, K_TRUE, config, tmp_path / "b")
    first.train(stop_after=37)  # "killed" at step 37: the last checkpoint is step 30
    assert not (tmp_path / "b" / "sae").exists()
    resumed_trainer = SAETrainer(planted_store, 64, K_TRUE, config, tmp_path / "b")
    resumed = resumed_trainer.train()
    assert resumed_trainer.history[29]["step"] == 30 and len(resumed_trainer.history) == 60
    for name, param in uninterrupted.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], param, rtol=0, atol=1e-6, msg=name)


def test_auxk_revives_planted_dead_latents(planted_store, tmp_path):
    def train(aux_coef, out):
        trainer = SAETrainer(
            planted_store, 64, K_TRUE, small_config(train_tokens=150 * 512, aux_coef=aux_coef, dead_tokens=1024), out
        )
        with torch.no_grad():  # latents 0-15 start with tiny encoder rows: never in the top k, so dead
            trainer.sae.W_enc[:16] *= 0.01
        sae = trainer.train()
        return (evaluate_sae(sae, planted_store)["firing_frequency"][:16] > 0).mean()

    revived_with_aux = train(1 / 32, tmp_path / "aux")
    revived_without = train(0.0, tmp_path / "noaux")
    assert revived_without == 0.0
    assert revived_with_aux >= 0.5


def test_learning_rate_schedule():
    values = [lr_at(s, 100, 1.0, 0.1, 0.2) for s in range(100)]
    assert values[0] == pytest.approx(0.1) and values[9] == pytest.approx(1.0) and values[50] == 1.0
    assert values[80] == pytest.approx(1.0) and values[90] == pytest.approx(0.5) and values[99] == pytest.approx(0.05)
    assert TrainConfig(train_tokens=4096).learning_rate(2**16) == pytest.approx(1e-4)


def test_bad_inputs_are_clear_errors(planted_store, tmp_path):
    with pytest.raises(ValueError, match=r"k=64 must be smaller than the number of latents \(64\)"):
        SAEConfig(32, 64, 64)
    poisoned = planted_store.load("train")[:2048].copy()
    poisoned[7, 3] = np.inf
    with pytest.raises(StoreError, match=r"non-finite activations \(NaN/Inf\) in the train split"):
        store_from_arrays(tmp_path / "nan", {"train": poisoned, "val": poisoned[:10]})
    trainer = SAETrainer(planted_store, 64, K_TRUE, small_config(), tmp_path / "n")
    with pytest.raises(ValueError, match="non-finite activations"):
        trainer.train_step(torch.from_numpy(np.where(poisoned == np.inf, np.nan, poisoned)))
    narrow = TopKSAE(SAEConfig(8, 16, 2))
    with pytest.raises(ValueError, match="store's width 32 does not match the SAE's d_in=8"):
        evaluate_sae(narrow, planted_store)
    with pytest.raises(ValueError, match="input width 32 does not match"):
        narrow.encode(torch.zeros(2, 32))


def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(planted_store, tmp_path):
    config = small_config(train_tokens=20 * 512, checkpoint_every=5)
    SAETrainer(planted_store, 64, K_TRUE, config, tmp_path).train(stop_after=7)
    with pytest.raises(CheckpointError, match="other settings"):
        SAETrainer(planted_store, 64, K_TRUE + 1, config, tmp_path).train()
    weights = tmp_path / "checkpoint" / "state.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(CheckpointError, match="unreadable"):
        SAETrainer(planted_store, 64, K_TRUE, config, tmp_path).train()
    SAETrainer(planted_store, 64, K_TRUE, config, tmp_path).train(resume=False)  # starting over is allowed
    assert (tmp_path / "sae" / "cfg.json").exists()


def test_saelens_layout_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(24, 96, 6, input_scale=0.37, model="m", layer=3, hook="encoder.layer.2"), seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    to_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / sae_module.SAELENS_WEIGHTS))
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 24 and cfg["d_sae"] == 96 and cfg["k"] == 6
    assert {k: tuple(v.shape) for k, v in weights.items()} == {
        "W_enc": (24, 96),
        "b_enc": (96,),
        "W_dec": (96, 24),
        "b_dec": (24,),
    }
    x_raw = torch.randn(50, 24) * 3
    # SAELens' TopK forward on raw activations, written out from its documented definition
    pre = (x_raw - weights["b_dec"]) @ weights["W_enc"] + weights["b_enc"]
    values, indices = torch.relu(pre).topk(6)
    saelens_out = torch.zeros_like(pre).scatter(1, indices, values) @ weights["W_dec"] + weights["b_dec"]
    torch.testing.assert_close(saelens_out, sae.reconstruct_raw(x_raw), rtol=1e-4, atol=1e-4)
    back = from_saelens(tmp_path)
    torch.testing.assert_close(back.reconstruct_raw(x_raw), sae.reconstruct_raw(x_raw), rtol=1e-4, atol=1e-4)
    assert back.cfg.hook == "encoder.layer.2"
    cfg["architecture"] = "standard"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not TopK"):
        from_saelens(tmp_path)
