import pytest
import torch

from featint_utils.nfm import NFM, NFMConfig, bi_interaction


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
