import numpy as np
import pytest
import torch

from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.integration import secondary
from featint_utils.residual.code_data import build_residual_data, split_fit_tune_test
from featint_utils.residual.decomposition import Decomposition
from featint_utils.residual.nfm import NFM, NFMConfig
from tests.conftest import random_store


def trained_like_nfm(batch_norm: bool, d_out: int = 6) -> NFM:
    """An NFM in eval mode with non-trivial batch-norm statistics and biases."""
    torch.manual_seed(0)
    nfm = NFM(NFMConfig(40, d_out, k_embed=8, batch_norm=batch_norm), seed=2)
    with torch.no_grad():
        nfm.hidden.bias.normal_()
        if batch_norm:
            nfm.norm.running_mean.normal_()
            nfm.norm.running_var.uniform_(0.5, 2.0)
            nfm.norm.weight.normal_()
            nfm.norm.bias.normal_()
    return nfm.eval()


@pytest.mark.parametrize("batch_norm", [False, True])
def test_pair_contributions_sum_exactly_to_the_pre_relu_vector(batch_norm):
    nfm = trained_like_nfm(batch_norm)
    values = torch.tensor([[0.7, 1.3, 0.0, 2.1, 0.4]])
    indices = torch.tensor([[3, 17, 5, 29, 0]])
    split = secondary.pair_attribution(nfm, values[0], indices[0])
    assert split.pairs.shape == (6, 2)  # 4 active latents: the zero-valued slot owns no pair
    torch.testing.assert_close(
        split.contributions.sum(0) + split.constant, nfm(values, indices).hidden_pre[0], atol=1e-5, rtol=1e-5
    )


@torch.no_grad()
def test_driver_contributions_add_up_to_the_secondary_pre_activation():
    nfm = trained_like_nfm(True)
    sae2 = TopKSAE(SAEConfig(d_in=8, n_latents=12, k=3, input_scale=1.7), seed=1)
    values, indices = torch.tensor([0.7, 1.3, 2.1]), torch.tensor([3, 17, 29])
    pairs, features = secondary.drivers(nfm, sae2, 5, [(values, indices)])
    h = nfm(values[None], indices[None]).hidden_pre[0]
    direction = sae2.W_enc[5] * sae2.cfg.input_scale
    split = secondary.pair_attribution(nfm, values, indices)
    pre_activation = (h * sae2.cfg.input_scale - sae2.b_dec) @ sae2.W_enc[5] + sae2.b_enc[5]
    constant = split.constant @ direction - sae2.b_dec @ sae2.W_enc[5] + sae2.b_enc[5]
    assert pairs["contribution"].sum() + float(constant) == pytest.approx(float(pre_activation), abs=1e-4)
    assert features["contribution"].sum() == pytest.approx(pairs["contribution"].sum(), abs=1e-5)
    assert set(features["primary_feature"]) == {3, 17, 29}


def test_embedding_store_holds_the_nfm_vectors_of_training_and_test_documents(tmp_path):
    store = random_store(tmp_path / "store", 200, 120)
    primary = TopKSAE(SAEConfig(d_in=16, n_latents=40, k=4, input_scale=store.scale), seed=0)
    test = split_fit_tune_test(build_residual_data(primary, store, tmp_path / "cache"), 0.2, 0.3)["test"]
    nfm = trained_like_nfm(False, d_out=16)  # it predicts the primary SAE's 16-wide residual
    vectors = secondary.build_embedding_store(Decomposition(primary, nfm), store, test, tmp_path / "vectors")
    assert vectors.n_tokens("train") == 200 and vectors.n_tokens("val") == len(test)
    expected = nfm(*primary.encode(torch.from_numpy(store.load("train", normalize=True)))).hidden_pre
    np.testing.assert_allclose(vectors.load("train"), expected.detach().numpy(), atol=1e-5)
    assert list(vectors.tokens("val")["text_index"]) == list(test.document)
    again = secondary.build_embedding_store(Decomposition(primary, nfm), store, test, tmp_path / "vectors")
    assert again.manifest["created"] == vectors.manifest["created"]  # same inputs: reused, not rebuilt
    with pytest.raises(ValueError, match="has no Linear"):
        Decomposition(primary, NFM(NFMConfig(40, 16, form="fm"))).nfm_vector(*primary.encode(torch.zeros(2, 16)))
