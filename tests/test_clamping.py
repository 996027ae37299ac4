import numpy as np
import pandas as pd
import pytest
import torch

from featint_utils import clamping, models
from featint_utils.clamping import Clamp, Decomposition
from featint_utils.corpus import CONDITIONS
from featint_utils.nfm import NFM, NFMConfig
from featint_utils.sae import SAEConfig, TopKSAE

DEAD = 7  # a secondary feature that never fires (its encoder bias is hugely negative)


def decomposition(d: int, scale: float) -> Decomposition:
    primary = TopKSAE(SAEConfig(d_in=d, n_latents=64, k=8, input_scale=scale), seed=0)
    nfm = NFM(NFMConfig(64, d, k_embed=16, dropout=0.0), seed=1)
    with torch.no_grad():  # a non-trivial NFM: random first-order weights and a lively interaction path
        nfm.linear_weight.normal_(0, 0.05)
        nfm.embeddings.normal_(0, 0.5)
    second = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=1.0), seed=2)
    with torch.no_grad():
        second.b_enc[DEAD] = -1e6
    return Decomposition(primary, nfm, second)


def spliced_output(loaded, layer, dec, clamp=None, control=None, text="The committee regrets the delay."):
    inputs = loaded.tokenizer(text, return_tensors="pt")
    special = torch.tensor(sorted(set(loaded.tokenizer.all_special_ids)))
    keep = ~torch.isin(inputs["input_ids"], special)
    with torch.no_grad():
        if dec is None:
            out = loaded.model(**inputs)
        else:
            with clamping.clamped(loaded, layer, dec, clamp, control) as state:
                state["mask"] = keep
                out = loaded.model(**inputs)
    return out.logits if loaded.is_causal_lm else out.last_hidden_state


def test_unclamped_splice_reproduces_minilm_and_an_inactive_clamp_changes_nothing(embedded):
    dec = decomposition(embedded.d_model, scale=0.3)
    clean = spliced_output(embedded, 3, None)
    unclamped = spliced_output(embedded, 3, dec)
    assert (unclamped - clean).abs().max() <= 1e-5
    for clamp in (Clamp("secondary", DEAD, "set", 0.0), Clamp("secondary", DEAD, "multiply", 4.0)):
        assert torch.equal(spliced_output(embedded, 3, dec, clamp), unclamped)
    moved = spliced_output(embedded, 3, dec, Clamp("secondary", DEAD, "add", 20.0))
    assert (moved - clean).abs().max() > 1e-2  # the clamp does reach the output


def test_unclamped_splice_reproduces_a_tiny_causal_lm(causal_dir):
    loaded = models.load_model(str(causal_dir))
    dec = decomposition(loaded.d_model, scale=2.0)
    clean = spliced_output(loaded, 1, None, text="the cat sat on the mat")
    assert (spliced_output(loaded, 1, dec, text="the cat sat on the mat") - clean).abs().max() <= 1e-5
    ids = clamping.bucket_token_ids(loaded.tokenizer, {c: ["cat", "dog", "mat"] for c in CONDITIONS})
    frames = ["the cat sat on the", "a quick brown fox"]
    base = clamping.causal_readout(loaded, 1, frames, ids)
    np.testing.assert_allclose(clamping.causal_readout(loaded, 1, frames, ids, dec), base, atol=1e-5)
    assert base.shape == (2, 4) and np.isfinite(base).all()


def test_clamps_change_only_their_path_and_the_random_control_matches_their_size():
    dec = decomposition(24, scale=1.0)
    x = torch.randn(10, 24) * 3
    plain = dec.edit(x)
    torch.testing.assert_close(plain, x, atol=1e-5, rtol=0)
    values, indices = dec.primary.encode(x)
    feature = int(indices[0, 0])
    linear = dec.edit(x, Clamp("linear", feature, "add", 2.0))
    # "add 2" moves the feature's first-order term by 2 w_i on every token, active or not
    torch.testing.assert_close(
        linear - plain, (2.0 * dec.nfm.linear_weight[feature]).expand_as(plain), atol=1e-5, rtol=0
    )
    clamp = Clamp("secondary", 3, "add", 5.0)
    change = dec.edit(x, clamp) - plain
    random = dec.edit(x, clamp, control="random", generator=torch.Generator().manual_seed(0)) - plain
    torch.testing.assert_close(random.norm(dim=1), change.norm(dim=1), rtol=1e-4, atol=1e-5)
    assert (random - change).abs().max() > 1e-3
    with pytest.raises(ValueError, match="clamp mode"):
        Clamp("secondary", 3, "double", 2.0)


def test_hook_is_removed_after_an_exception(embedded):
    module = models.hook_module(embedded.model, 3)
    before = len(module._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with clamping.clamped(embedded, 3, decomposition(embedded.d_model, 0.3), Clamp("secondary", 1, "add", 1.0)):
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == before


def test_centroids_leave_the_measured_item_out():
    stimuli = pd.DataFrame({"item_id": np.repeat(["a", "b", "c"], 4), "condition": list(CONDITIONS) * 3})
    embeddings = torch.arange(12 * 2, dtype=torch.float32).view(12, 2)
    centroids = clamping.leave_item_out_centroids(embeddings, stimuli)
    torch.testing.assert_close(centroids[0, 1], (embeddings[5] + embeddings[9]) / 2)  # item a, formal_neutral
    readout = clamping.encoder_readout(embeddings + 1.0, centroids, stimuli)
    assert readout.shape == (3, 4)


def test_clamp_statistics_find_a_planted_non_additive_effect_and_hold_their_false_positive_rate():
    rng = np.random.default_rng(0)
    planted = rng.normal(size=(40, 4))
    planted[:, 0] += 1.0  # the clamp moves only the formal-emotional bucket
    nulls = {f"null {i}": rng.normal(size=(40, 4)) for i in range(200)}
    table = clamping.clamp_statistics({"planted": planted, **nulls}, n_permutations=9999, n_boot=500)
    row = table.set_index("condition").loc["planted"]
    assert row["holm_p"] < 0.05 and row["ci_low"] > 0 and row["interaction_eta2"] > 0.04
    null = table[table["condition"] != "planted"]
    assert 0.02 <= (null["sign_flip_p"] < 0.05).mean() <= 0.09
    assert (null["holm_p"] < 0.05).mean() <= 0.01


def test_conditions_are_compared_with_their_size_matched_control():
    rng = np.random.default_rng(1)
    control = rng.normal(size=(60, 4)) * 0.1
    control[:, 0] += 0.2  # the random control is itself (a little) non-additive
    stronger, same = control.copy(), control.copy()
    stronger[:, 0] += 0.5
    changes = {"feature": stronger, "twin": same, "control": control}
    table = clamping.clamp_statistics(changes, 4999, 200, references={"feature": "control", "twin": "control"})
    table = table.set_index("condition")
    assert table.loc["control", "holm_p"] < 0.05  # non-additive on its own...
    assert table.loc["feature", "vs_control_holm_p"] < 0.01  # ...but the feature does more
    assert table.loc["twin", "vs_control_p"] == 1.0 and np.isnan(table.loc["control", "vs_control_p"])


def test_linear_control_is_sized_like_the_secondary_clamps():
    dec = decomposition(24, scale=1.0)
    x = torch.randn(50, 24) * 3
    secondary_max = np.full(32, 4.0)
    unit = clamping.matched_linear_unit(dec, [1, 3], secondary_max, 5, x)
    target = np.mean([clamping.edit_norm(dec, Clamp("secondary", f, "add", 4.0), x) for f in (1, 3)])
    assert clamping.edit_norm(dec, Clamp("linear", 5, "add", unit), x) == pytest.approx(target, rel=1e-4)
    plan = clamping.clamp_plan([1, 3], secondary_max, 5, unit, [-1.0, 1.0])
    assert len(plan) == 2 * 2 * 2 + 2 and set(plan["control"].dropna()) == {"random"}
