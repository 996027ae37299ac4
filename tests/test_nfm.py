import numpy as np
import pytest
import torch

from featint_utils import contributions
from featint_utils.activations import store_from_arrays
from featint_utils.baselines import fit_ridge
from featint_utils.nfm import NFM, NFMConfig, bi_interaction
from featint_utils.nfm_training import FitConfig, ResidualTrainer, residual_fvu
from featint_utils.residuals import (
    build_residual_data,
    code_data_from_arrays,
    load_sets,
    save_sets,
    split_fit_tune,
    split_fit_tune_test,
)
from featint_utils.sae import SAEConfig, TopKSAE
from featint_utils.sae_training import CheckpointError
from tests.conftest import random_store


def test_bi_interaction_equals_the_explicit_sum_over_pairs():
    torch.manual_seed(0)
    values, indices = torch.rand(5, 7), torch.stack([torch.randperm(40)[:7] for _ in range(5)])
    embeddings = torch.randn(40, 6)
    expected = torch.zeros(5, 6)
    for b in range(5):
        e = values[b, :, None] * embeddings[indices[b]]
        for i in range(7):
            for j in range(i + 1, 7):
                expected[b] += e[i] * e[j]
    torch.testing.assert_close(bi_interaction(values, indices, embeddings), expected, rtol=1e-5, atol=1e-5)


def test_forms_and_exposed_vectors():
    values, indices = torch.rand(3, 4), torch.randint(0, 20, (3, 4))
    nfm = NFM(NFMConfig(20, 8, k_embed=5, dropout=0.0)).eval()
    out = nfm(values, indices)
    torch.testing.assert_close(out.output, out.linear + out.interaction)
    torch.testing.assert_close(out.interaction, nfm.out(torch.relu(out.hidden_pre)))
    assert out.pooled.shape == (3, 5) and out.hidden_pre.shape == (3, 5)
    fm = NFM(NFMConfig(20, 8, k_embed=5, form="fm", dropout=0.0))(values, indices)
    assert fm.hidden_pre is None
    only = NFM(NFMConfig(20, 8, k_embed=5, form="interaction", dropout=0.0))(values, indices)
    assert torch.equal(only.linear, torch.zeros_like(only.linear))


def test_bad_inputs_are_clear_errors():
    nfm = NFM(NFMConfig(20, 8, k_embed=5))
    with pytest.raises(ValueError, match="out of range for an NFM of 20 latents"):
        nfm(torch.rand(2, 3), torch.tensor([[1, 2, 25], [0, 1, 2]]))
    with pytest.raises(ValueError, match="form must be"):
        NFMConfig(20, 8, form="deep")


# -- planted data ------------------------------------------------------------------------------------
N_LAT, K_ACT, D_OUT, NOISE = 48, 6, 12, 0.1


def planted(n_tokens: int, seed: int, pair_strength: float = 1.0, square_strength: float = 0.0):
    """Codes with k=6 of 48 latents active (latents 0 and 1 each on half the tokens), and a residual that is
    linear in the code, plus ``pair_strength * f0 * f1 * u`` (a planted pairwise term), plus
    ``square_strength * f2^2 * u`` (a per-feature non-linearity), plus noise."""
    rng = np.random.default_rng(seed)
    indices = np.empty((n_tokens, K_ACT), np.int64)
    for t in range(n_tokens):
        base = [f for f in (0, 1, 2) if rng.random() < 0.5]
        indices[t] = np.r_[base, rng.choice(np.arange(3, N_LAT), K_ACT - len(base), replace=False)]
    values = rng.uniform(0.5, 1.5, (n_tokens, K_ACT))
    dense = np.zeros((n_tokens, N_LAT))
    np.put_along_axis(dense, indices, values, 1)
    fixed = np.random.default_rng(99)
    W, u, mix = fixed.normal(0, 0.3, (N_LAT, D_OUT)), fixed.normal(0, 1, D_OUT), fixed.normal(0, 1, (N_LAT, D_OUT))
    target = dense @ W + np.outer(pair_strength * dense[:, 0] * dense[:, 1] + square_strength * dense[:, 2] ** 2, u)
    target += rng.normal(0, NOISE, target.shape)
    data = code_data_from_arrays(values, indices, target, inputs=dense @ mix, n_latents=N_LAT)
    return data, dense, target


def test_ridge_matches_least_squares_and_picks_its_penalty_on_tune():
    data, dense, target = planted(4_000, 0)
    fit, tune = split_fit_tune(data, 0.2)
    model = fit_ridge(fit, tune, "codes", alphas=(1e-9,))
    rows = fit.rows
    design = np.c_[dense[rows], np.ones(len(rows))]
    beta = np.linalg.lstsq(design, target[rows], rcond=None)[0]
    np.testing.assert_allclose(model.weight.numpy(), beta[:-1], atol=2e-4)
    np.testing.assert_allclose(model.bias.numpy(), beta[-1], atol=2e-4)
    chosen = fit_ridge(fit, tune, "codes")
    assert residual_fvu(chosen, tune) <= residual_fvu(model, tune) + 1e-9


def test_variance_attribution_finds_the_planted_pair_and_linear_shares_sum_to_one(tmp_path):
    fit, tune = split_fit_tune(planted(12_000, 0, 2.0)[0], 0.15)
    nfm = NFM(NFMConfig(N_LAT, D_OUT, k_embed=16, dropout=0.0), seed=0)
    ResidualTrainer(nfm, fit, tune, FitConfig(batch_size=256, lr=3e-3, max_epochs=40, patience=5), tmp_path).train()
    attribution = contributions.variance_attribution(nfm, planted(3_000, 1, 2.0)[0])
    assert attribution["linear_share"].sum() == pytest.approx(1.0, abs=1e-6)
    top = contributions.top_features(attribution, 2)
    assert set(top["interaction"]) == {0, 1}
    overlap = contributions.top_feature_overlap(attribution, 5)
    assert 0 <= overlap["shared"] <= 5 and overlap["chance_shared"] == pytest.approx(25 / N_LAT)
    strength = contributions.interaction_strength(nfm, np.array([0, 1, 5]))
    assert strength.shape == (3, 3) and np.allclose(strength.values, strength.values.T)


def test_an_nfm_at_its_nested_start_has_no_interaction_part_to_attribute():
    data = planted(2_000, 0, 2.0)[0]
    weight = torch.randn(N_LAT, D_OUT, generator=torch.Generator().manual_seed(0))
    nfm = NFM(NFMConfig(N_LAT, D_OUT, k_embed=8, dropout=0.0), seed=0).start_from(weight, torch.zeros(D_OUT))
    attribution = contributions.variance_attribution(nfm, data)
    assert "interaction_share" not in attribution and attribution["linear_share"].sum() == pytest.approx(1.0, abs=1e-6)
    assert contributions.top_feature_overlap(attribution, 5) is None


def test_resume_after_an_interruption_gives_the_uninterrupted_weights(tmp_path):
    fit, tune = split_fit_tune(planted(3_000, 0)[0], 0.2)
    cfg = FitConfig(batch_size=128, lr=3e-3, max_epochs=6, patience=100)

    def fresh():
        return NFM(NFMConfig(N_LAT, D_OUT, k_embed=8, dropout=0.2), seed=3)

    whole = ResidualTrainer(fresh(), fit, tune, cfg, tmp_path / "whole").train()
    ResidualTrainer(fresh(), fit, tune, cfg, tmp_path / "cut").train(stop_after=2)
    resumed = ResidualTrainer(fresh(), fit, tune, cfg, tmp_path / "cut").train()
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=0, msg=name)
    other = FitConfig(batch_size=64, lr=3e-3, max_epochs=6)
    with pytest.raises(CheckpointError, match="other settings"):
        ResidualTrainer(fresh(), fit, tune, other, tmp_path / "cut").train()


def test_saved_nfm_reloads_with_the_same_forward(tmp_path):
    data = planted(500, 0)[0]
    nfm = NFM(NFMConfig(N_LAT, D_OUT, k_embed=8, knots=2, batch_norm=True), seed=1)
    nfm.set_knots(data.feature_scale())
    nfm.eval().save(tmp_path / "nfm")
    batch = data.batch(np.arange(50))
    torch.testing.assert_close(NFM.load(tmp_path / "nfm").predict(batch), nfm.predict(batch))


def test_split_by_document_keeps_every_document_on_one_side():
    data = planted(200, 0)[0]
    fit, tune = split_fit_tune(data, 0.25)
    assert not set(fit.document) & set(tune.document) and len(fit) + len(tune) == 200


def test_width_mismatches_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    store = store_from_arrays(
        tmp_path / "store", {"train": rng.normal(size=(300, 16)), "val": rng.normal(size=(100, 16))}
    )
    sae = TopKSAE(SAEConfig(d_in=24, n_latents=64, k=4))
    with pytest.raises(ValueError, match="store is 16 wide but the SAE takes d_in=24"):
        build_residual_data(sae, store, tmp_path / "cache")
    data = planted(600, 0)[0]
    fit, tune = split_fit_tune(data, 0.2)
    with pytest.raises(ValueError, match="takes 100 latents but the data's SAE has 48"):
        ResidualTrainer(NFM(NFMConfig(100, D_OUT)), fit, tune, FitConfig(batch_size=64), tmp_path / "t")


def test_residual_data_holds_the_sae_code_and_error_and_is_rebuilt_when_the_sae_changes(tmp_path):
    store = random_store(tmp_path / "store", 300, 100)
    sae = TopKSAE(SAEConfig(d_in=16, n_latents=64, k=4, input_scale=store.scale), seed=0)
    data = build_residual_data(sae, store, tmp_path / "cache", batch_size=64)
    x = torch.from_numpy(store.load("val", normalize=True))  # the SAE's held-out documents only
    values, indices = sae.encode(x)
    assert len(data) == 100
    batch = data.batch(np.arange(100))
    torch.testing.assert_close(batch.values, values)
    torch.testing.assert_close(batch.target, x - sae.decode(values, indices))
    torch.testing.assert_close(batch.inputs, x)
    assert list(data.document[:12]) == [0] * 10 + [1] * 2
    sets = split_fit_tune_test(data, 0.2, 0.3)
    assert sum(len(s) for s in sets.values()) == 100
    assert not set(sets["fit"].document) & (set(sets["tune"].document) | set(sets["test"].document))
    save_sets(sets, tmp_path / "sets.json")
    again = load_sets(data, tmp_path / "sets.json")
    assert all(np.array_equal(again[name].rows, sets[name].rows) for name in sets)
    with torch.no_grad():
        sae.b_dec += 1.0
    rebuilt = build_residual_data(sae, store, tmp_path / "cache", batch_size=64).batch(np.arange(100))
    torch.testing.assert_close(rebuilt.target, x - sae(x))


def test_the_split_unit_is_the_stimulus_item_not_the_text(tmp_path):
    """The four variants of a stimulus item are four texts; fit, tune and test must not share an item."""
    rng = np.random.default_rng(0)
    texts = [{"index": i, "text_id": f"item{i // 4}/v{i % 4}", "group": f"item{i // 4}", "split": "val", "text": ""}
             for i in range(40)]  # fmt: skip
    meta = {"train": np.c_[np.zeros(50), np.arange(50), np.zeros(50)],
            "val": np.c_[np.repeat(np.arange(40), 5), np.tile(np.arange(5), 40), np.zeros(200)]}  # fmt: skip
    arrays = {"train": rng.normal(size=(50, 16)), "val": rng.normal(size=(200, 16))}
    store = store_from_arrays(tmp_path / "store", arrays, meta=meta, texts=texts)
    data = build_residual_data(TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=store.scale)), store,
                               tmp_path / "cache")  # fmt: skip
    assert list(np.unique(data.document)) == list(range(10))  # ten items, not forty texts
    sets = split_fit_tune_test(data, 0.2, 0.3)
    assert not set(sets["fit"].document) & (set(sets["tune"].document) | set(sets["test"].document))
