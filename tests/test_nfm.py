import numpy as np
import pytest
import torch

from featint_utils.data.extraction import store_from_arrays
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.dictionary.sae_training import CheckpointError
from featint_utils.residual import contributions
from featint_utils.residual.baselines import fit_ridge
from featint_utils.residual.code_data import (
    build_residual_data,
    code_data_from_arrays,
    load_sets,
    save_sets,
    split_fit_tune,
    split_fit_tune_test,
)
from featint_utils.residual.nfm import NFM, NFMConfig, bi_interaction
from featint_utils.residual.nfm_training import FitConfig, ResidualTrainer, residual_fvu
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
    top5 = contributions.top_features(attribution, 5)
    shared = sorted(set(top5["linear"]) & set(top5["interaction"]))
    assert overlap["shared_features"] == shared and overlap["shared"] == len(shared)
    assert overlap["jaccard"] == pytest.approx(len(shared) / len(set(top5["linear"]) | set(top5["interaction"])))
    assert overlap["chance_shared"] == pytest.approx(25 / N_LAT)  # every latent fires on these tokens
    features = np.array([0, 1, 5])
    strength = contributions.interaction_strength(nfm, features)
    v = nfm.embeddings.detach().double().numpy()
    by_hand = [[sum(v[i, k] * v[j, k] for k in range(v.shape[1])) for j in features] for i in features]
    assert list(strength.index) == list(strength.columns) == ["0", "1", "5"]
    np.testing.assert_allclose(strength.values, by_hand, rtol=1e-5, atol=1e-7)


# A hand-built factorization machine on 20 latents of which only 0..9 ever fire: the first-order weights are
# non-zero on features 0..4 only, the factor embeddings on five features that share m with 0..4 only.
PLANTED_V = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, -1, 1], [1, 0, 0, 2], [0, 2, 0, 1]], dtype=float)


def hand_built_fm(m: int):
    n, d, tokens = 20, 3, 600
    rng = np.random.default_rng(m)
    indices = np.stack([rng.choice(10, 4, replace=False) for _ in range(tokens)])
    values = rng.uniform(0.5, 1.5, (tokens, 4))
    dense = np.zeros((tokens, n))
    np.put_along_axis(dense, indices, values, 1)
    weight, embeddings = np.zeros((n, d)), np.zeros((n, 4))
    weight[:5] = rng.normal(0, 1, (5, d))
    paired = np.arange(5 - m, 10 - m)  # overlaps the first-order features 0..4 in exactly m features
    embeddings[paired] = PLANTED_V
    out_weight, out_bias = rng.uniform(0.5, 1.5, (d, 4)), rng.normal(0, 1, d)
    nfm = NFM(NFMConfig(n, d, k_embed=4, form="fm", dropout=0.0), seed=0)
    with torch.no_grad():
        nfm.linear_weight.copy_(torch.from_numpy(weight))
        nfm.bias.fill_(0.3)
        nfm.embeddings.copy_(torch.from_numpy(embeddings))
        nfm.out.weight.copy_(torch.from_numpy(out_weight))
        nfm.out.bias.copy_(torch.from_numpy(out_bias))
    data = code_data_from_arrays(values, indices, np.zeros((tokens, d)), n_latents=n)
    return nfm, data, dense, paired


def explicit_shares(nfm: NFM, dense: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The module docstring's shares computed densely in float64: the first-order term ``f_i w_i``, and what
    the FM's output loses without i, ``W_out (e_i * (sum_j e_j - e_i))`` with ``e_j = f_j v_j``."""
    weight, bias = nfm.linear_weight.detach().double().numpy(), nfm.bias.detach().double().numpy()
    v, w_out = nfm.embeddings.detach().double().numpy(), nfm.out.weight.detach().double().numpy()
    linear_terms = dense[:, :, None] * weight  # [tokens, n, d]
    e = dense[:, :, None] * v  # [tokens, n, K]
    total = e.sum(1, keepdims=True)
    pooled = 0.5 * (total[:, 0] ** 2 - (e**2).sum(1))
    interaction = pooled @ w_out.T + nfm.out.bias.detach().double().numpy()
    interaction_terms = (e * (total - e)) @ w_out.T

    def share(terms, part):
        centred = part - part.mean(0)
        return np.einsum("tnd,td->n", terms, centred) / (centred**2).sum()

    return share(linear_terms, linear_terms.sum(1) + bias), share(interaction_terms, interaction)


@pytest.mark.parametrize("m", [0, 2, 5])
def test_attribution_overlap_and_pair_weights_have_known_answers_on_a_hand_built_fm(m):
    nfm, data, dense, paired = hand_built_fm(m)
    attribution = contributions.variance_attribution(nfm, data, batch_size=128)
    linear, interaction = explicit_shares(nfm, dense)
    np.testing.assert_allclose(attribution["linear_share"], linear, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(attribution["interaction_share"], interaction, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(attribution["firing_frequency"], (dense > 0).mean(0))
    assert attribution["linear_share"].sum() == pytest.approx(1.0, abs=1e-6)
    # an FM's pooled vector is a sum over pairs, and removing i drops each of its pairs once: the removal
    # terms add up to twice the interaction output (minus its bias), so the shares sum to exactly 2
    assert attribution["interaction_share"].sum() == pytest.approx(2.0, abs=1e-5)
    assert (attribution.loc[~attribution["feature"].isin(paired), "interaction_share"] == 0).all()
    assert (attribution.loc[attribution["feature"] >= 5, "linear_share"] == 0).all()

    top = contributions.top_features(attribution, 5)
    assert set(top["linear"]) == set(range(5)) and set(top["interaction"]) == set(paired)
    overlap = contributions.top_feature_overlap(attribution, 5)
    assert overlap["shared"] == m and overlap["shared_features"] == list(range(5 - m, 5))
    assert overlap["jaccard"] == pytest.approx(m / (10 - m))
    assert overlap["chance_shared"] == pytest.approx(5 * 5 / 10)  # 10 latents fire, not all 20

    a, b, c = (int(f) for f in paired[:3])
    strength = contributions.interaction_strength(nfm, np.array([a, b, c, 19]))
    assert list(strength.index) == list(strength.columns) == [str(a), str(b), str(c), "19"]
    # the inner products of PLANTED_V's first three rows; latent 19 has no embedding
    known = [[2, 1, -1, 0], [1, 2, 1, 0], [-1, 1, 3, 0], [0, 0, 0, 0]]
    np.testing.assert_array_equal(strength.values, known)
    # and <v_a, v_b> is the FM's weight on the pair: a token holding only a and b moves the pooled vector by
    # f_a f_b (v_a * v_b), which sums over K to f_a f_b <v_a, v_b>
    pooled = nfm(torch.tensor([[0.5, 3.0]]), torch.tensor([[a, b]])).pooled
    assert float(pooled.detach().sum()) == pytest.approx(0.5 * 3.0 * strength.loc[str(a), str(b)])


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
    for (name, a), b in zip(whole.state_dict().items(), resumed.state_dict().values()):  # a replay: bit-identical
        torch.testing.assert_close(a, b, atol=0, rtol=0, msg=name)
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
    texts = [
        {"index": i, "text_id": f"item{i // 4}/v{i % 4}", "group": f"item{i // 4}", "split": "val", "text": ""}
        for i in range(40)
    ]
    meta = {
        "train": np.c_[np.zeros(50), np.arange(50), np.zeros(50)],
        "val": np.c_[np.repeat(np.arange(40), 5), np.tile(np.arange(5), 40), np.zeros(200)],
    }
    arrays = {"train": rng.normal(size=(50, 16)), "val": rng.normal(size=(200, 16))}
    store = store_from_arrays(tmp_path / "store", arrays, meta=meta, texts=texts)
    data = build_residual_data(
        TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=store.scale)), store, tmp_path / "cache"
    )
    assert list(np.unique(data.document)) == list(range(10))  # ten items, not forty texts
    sets = split_fit_tune_test(data, 0.2, 0.3)
    assert not set(sets["fit"].document) & (set(sets["tune"].document) | set(sets["test"].document))


@pytest.mark.parametrize("lr_decays", [0, 2])
def test_training_stops_patience_epochs_after_its_last_improvement_or_decay(tmp_path, lr_decays):
    fit, tune = split_fit_tune(planted(1_500, 0)[0], 0.2)

    def trained(min_delta: float) -> ResidualTrainer:
        cfg = FitConfig(batch_size=128, lr=1e-2, max_epochs=80, patience=3, lr_decays=lr_decays, min_delta=min_delta)
        trainer = ResidualTrainer(NFM(NFMConfig(N_LAT, D_OUT, k_embed=8), seed=0), fit, tune, cfg, tmp_path / "fit")
        trainer.train(resume=False)
        return trainer

    # no epoch can count as an improvement: the start is kept, after `patience` epochs at each learning rate
    stuck = trained(min_delta=1e6)
    assert (stuck.best_epoch, stuck.epoch) == (0, 3 * (1 + lr_decays))
    plateaus, lr = [], 1e-2
    for _ in range(1 + lr_decays):  # the trainer's own arithmetic: the rate divided by 3 at each decay
        plateaus += [lr] * 3
        lr /= 3.0
    assert [row["lr"] for row in stuck.history[1:]] == plateaus
    # a model that learns stops `patience` epochs after its last improvement or decay, before max_epochs
    learning = trained(min_delta=1e-5)
    decays = [
        row["epoch"] - 1 for before, row in zip(learning.history, learning.history[1:]) if row["lr"] < before["lr"]
    ]
    assert learning.best_epoch > 3 and len(decays) == lr_decays
    assert learning.epoch == max([learning.best_epoch, *decays]) + 3 < 80
