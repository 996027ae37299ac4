"""TopK SAE: gradients, planted-direction recovery, AuxK, exact resume, interop, clear errors."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from featint_utils.data.activation_store import ActivationStore, StoreError
from featint_utils.data.extraction import store_from_arrays
from featint_utils.dictionary import saelens
from featint_utils.dictionary.metrics import evaluate_sae
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.dictionary.sae_training import CheckpointError, SAETrainer, TrainConfig, lr_at
from featint_utils.dictionary.saelens import (
    from_saelens,
    hf_hook_conventions,
    layer_to_saelens_hook,
    saelens_hook_to_layer,
    to_saelens,
)

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
    # the resumed steps replay the uninterrupted ones (same data order, state and arithmetic): bit-identical
    for name, param in uninterrupted.named_parameters():
        torch.testing.assert_close(dict(resumed.named_parameters())[name], param, rtol=0, atol=0, msg=name)


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


def test_a_checkpoint_is_the_same_wherever_its_store_is_and_an_older_one_with_the_path_is_accepted(
    directions, tmp_path, capsys
):
    """The store enters the settings by its content: a run whose directory moved resumes its checkpoint. Older
    checkpoints hashed the store's absolute path too; one that differs only by that path is accepted, and says so."""
    first = tmp_path / "first"
    store = store_from_arrays(
        first / "store", {"train": planted(4096, 0, directions), "val": planted(512, 1, directions)}
    )
    config = small_config(train_tokens=8 * 512, checkpoint_every=4)
    SAETrainer(store, 64, K_TRUE, config, first / "sae_run").train(stop_after=4)
    moved = tmp_path / "elsewhere" / "moved"
    moved.parent.mkdir()
    first.rename(moved)
    again = SAETrainer(ActivationStore(moved / "store"), 64, K_TRUE, config, moved / "sae_run")
    assert again.load_checkpoint() and again.step == 4
    assert "store" not in again.sae_cfg.extra  # no machine path in what the SAE records of its data
    # as a version before Dec 2026 left a finished run: the fingerprint hashed the store's absolute path, and the
    # SAE's cfg.json kept it
    older = str(moved / "store")
    legacy = again._fingerprint(store_path=older)
    again.train()
    state_path, cfg_path = moved / "sae_run" / "checkpoint" / "state.json", moved / "sae_run" / "sae" / "cfg.json"
    state, cfg = json.loads(state_path.read_text()), json.loads(cfg_path.read_text())
    state["fingerprint"] = legacy
    cfg["extra"]["store"] = older
    state_path.write_text(json.dumps(state))
    cfg_path.write_text(json.dumps(cfg))
    moved.rename(tmp_path / "last")
    capsys.readouterr()
    resumed = SAETrainer(
        ActivationStore(tmp_path / "last" / "store"), 64, K_TRUE, config, tmp_path / "last" / "sae_run"
    )
    assert resumed.load_checkpoint() and resumed.step == 8
    assert f"it recorded {older}" in capsys.readouterr().out
    state["fingerprint"] = resumed._fingerprint(store_path=older + "-not-this-one")  # another path: other settings
    (tmp_path / "last" / "sae_run" / "checkpoint" / "state.json").write_text(json.dumps(state))
    with pytest.raises(CheckpointError, match="other settings"):
        resumed.load_checkpoint()


def test_saelens_layout_round_trip(tmp_path):
    torch.manual_seed(0)
    sae = TopKSAE(SAEConfig(24, 96, 6, input_scale=0.37, model="m", layer=3, hook="encoder.layer.2"), seed=3)
    with torch.no_grad():
        sae.b_enc.normal_(0, 0.1)
        sae.b_dec.normal_(0, 0.5)
    to_saelens(sae, tmp_path)
    cfg = json.loads((tmp_path / "cfg.json").read_text())
    from safetensors.torch import load_file

    weights = load_file(str(tmp_path / saelens.SAELENS_WEIGHTS))
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
    assert back.cfg.hook == "encoder.layer.2" and back.cfg.layer == 3
    # hidden_states[3] of a BERT encoder in SAELens's (TransformerLens's) name; ours stays in metadata.featint
    assert cfg["metadata"]["hook_name"] == cfg["hook_name"] == "blocks.2.hook_normalized_resid_post"  # see to_saelens
    assert cfg["metadata"]["featint"]["hf_module"] == "encoder.layer.2"
    del cfg["metadata"]["featint"]  # as a SAELens-made SAE would be: the layer comes from the hook name alone
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    assert from_saelens(tmp_path, post_norm=True).cfg.layer == 3
    with pytest.raises(ValueError, match=r"reads hidden_states\[3\], not hidden_states\[4\]"):
        from_saelens(tmp_path, layer=4)
    cfg["architecture"] = "standard"
    (tmp_path / "cfg.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="not TopK"):
        from_saelens(tmp_path)


# -- SAELens hook names and SAELens-written SAEs ------------------------------------------------------

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.mark.parametrize(
    ("hook", "post_norm", "layer"),
    [
        ("blocks.0.hook_resid_pre", False, 0),
        ("blocks.4.hook_resid_pre", False, 4),
        ("blocks.4.hook_resid_post", False, 5),  # block 4's output = block 5's input
        ("blocks.4.hook_resid_pre", True, 4),
        ("blocks.4.hook_normalized_resid_post", True, 5),
    ],
)
def test_saelens_hook_names_translate_to_hidden_states_indices_and_back(hook, post_norm, layer):
    assert saelens_hook_to_layer(hook, post_norm) == layer
    back = layer_to_saelens_hook(layer, post_norm)
    assert saelens_hook_to_layer(back, post_norm) == layer
    assert back == hook or hook.endswith("hook_resid_pre")  # a block's input is written as the previous output


def test_layer_to_saelens_hook_names():
    assert layer_to_saelens_hook(0) == "blocks.0.hook_resid_pre"
    assert layer_to_saelens_hook(5) == "blocks.4.hook_resid_post"
    assert layer_to_saelens_hook(5, post_norm=True) == "blocks.4.hook_normalized_resid_post"
    with pytest.raises(ValueError, match=r"hidden_states\[12\] is the causal LM's final-norm output"):
        layer_to_saelens_hook(12, final_norm=True)
    with pytest.raises(ValueError, match="hidden_states index >= 0"):
        layer_to_saelens_hook(-1)


@pytest.mark.parametrize(
    ("module", "layer", "hook"),
    [
        ("transformer.drop", 0, "blocks.0.hook_resid_pre"),
        ("transformer.h.2", 3, "blocks.2.hook_resid_post"),
        ("model.layers.0", 1, "blocks.0.hook_resid_post"),
        ("encoder.layer.5", 6, "blocks.5.hook_normalized_resid_post"),  # BERT's last layer is a block output
    ],
)
def test_to_saelens_writes_the_saelens_name_of_the_sae_s_layer(tmp_path, module, layer, hook):
    to_saelens(TopKSAE(SAEConfig(8, 16, 2, layer=layer, hook=module)), tmp_path)
    metadata = json.loads((tmp_path / "cfg.json").read_text())["metadata"]
    assert metadata["hook_name"] == hook and metadata["featint"]["hf_module"] == module


def test_to_saelens_refuses_a_causal_lm_s_final_norm_output(tmp_path):
    with pytest.raises(ValueError, match="final-norm output: no SAELens residual hook reads it"):
        to_saelens(TopKSAE(SAEConfig(8, 16, 2, layer=2, hook="transformer.ln_f")), tmp_path)


@pytest.mark.parametrize(
    "hook",
    [
        "blocks.3.hook_attn_out",
        "blocks.3.hook_mlp_out",
        "blocks.3.hook_resid_mid",
        "blocks.3.attn.hook_z",
        "blocks.3.hook_resid_post.extra",
        "hook_embed",
        "",
    ],
)
def test_hooks_off_the_residual_stream_are_refused_naming_the_supported_ones(hook):
    with pytest.raises(ValueError, match=r"not on the residual stream; supported: blocks\.\{i\}\.hook_resid_pre"):
        saelens_hook_to_layer(hook)


def test_hooks_that_are_no_hidden_state_are_refused():
    # a post-norm encoder's hook_resid_post comes before the block's LayerNorm
    with pytest.raises(ValueError, match=r"before the block's LayerNorm.*blocks\.2\.hook_normalized_resid_post"):
        saelens_hook_to_layer("blocks.2.hook_resid_post", post_norm=True)
    # a 12-block causal LM's hidden_states[12] has the final norm applied; block 11's resid_post does not
    with pytest.raises(ValueError, match="final norm applied"):
        saelens_hook_to_layer("blocks.11.hook_resid_post", n_layers=12)
    assert saelens_hook_to_layer("blocks.10.hook_resid_post", n_layers=12) == 11


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox", "llama", "bert"])
def test_the_hook_conventions_of_every_layer_of_every_supported_architecture(arch):
    """Read from the module names our pipeline records: the last layer of a causal LM is its final norm."""
    from transformers import BertConfig, BertModel

    from featint_utils.data import models
    from tests.conftest import tiny_causal

    if arch == "bert":
        model = BertModel(BertConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4, intermediate_size=64))
    else:
        model = tiny_causal(arch, n_layers=2)
    for layer in range(3):
        hook = models.hook_name(model, layer)
        expected = (arch == "bert", arch != "bert" and layer == 2)
        assert hf_hook_conventions(hook) == expected, hook
        assert hf_hook_conventions(hook, model.config.model_type) == expected, hook


@pytest.mark.parametrize(("fixture", "layer"), [("saelens_minilm_l3", 3), ("saelens_folds", 2)])
def test_an_sae_written_by_saelens_encodes_and_decodes_as_saelens_did(fixture, layer):
    """The fixtures hold SAELens's own outputs (benchmarks/saelens_fixture.py); saelens_folds has decoder rows of
    norms 0.2-3 with rescale_acts_by_decoder_norm on and apply_b_dec_to_input off."""
    from safetensors.torch import load_file

    expected = load_file(str(FIXTURES / fixture / "saelens_outputs.safetensors"))
    sae = from_saelens(FIXTURES / fixture)
    assert sae.cfg.layer == layer and sae.cfg.input_scale == 1.0
    values, indices = sae.encode(expected["x"])
    codes = torch.zeros_like(expected["feature_acts"]).scatter(1, indices, values)
    assert (codes > 0).sum(1).tolist() == (expected["feature_acts"] > 0).sum(1).tolist()
    torch.testing.assert_close(codes, expected["feature_acts"], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(sae.reconstruct_raw(expected["x"]), expected["reconstruction"], rtol=1e-4, atol=1e-4)
    # at another input scale (what a run installs): the same codes and raw reconstructions
    scaled = sae.with_input_scale(0.3)
    torch.testing.assert_close(scaled.encode(expected["x"] * 0.3).values, values, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(scaled.reconstruct_raw(expected["x"]), expected["reconstruction"], rtol=1e-4, atol=1e-4)


def test_saelens_sae_hooks_are_checked_on_load():
    with pytest.raises(ValueError, match=r"reads hidden_states\[3\], not hidden_states\[2\]"):
        from_saelens(FIXTURES / "saelens_minilm_l3", layer=2)
    with pytest.raises(ValueError, match="before the block's LayerNorm"):
        from_saelens(FIXTURES / "saelens_folds", post_norm=True)  # its hook is blocks.1.hook_resid_post
    with pytest.raises(ValueError, match="final norm applied"):
        from_saelens(FIXTURES / "saelens_folds", n_layers=2)
    with pytest.raises(FileNotFoundError, match="no SAELens SAE"):
        from_saelens(FIXTURES)
