import numpy as np
import pandas as pd
import pytest
import torch

from featint_utils.data import models
from featint_utils.data.corpus import CONDITIONS
from featint_utils.data.interventions import PrefixCache
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.integration import clamp_split, clamping
from featint_utils.integration.clamping import Clamp, Decomposition
from featint_utils.residual.nfm import NFM, NFMConfig
from featint_utils.stats import sign_flip_test

from .conftest import count_forwards_below

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
    words = dict(zip(CONDITIONS, (["cat"], ["dog", "mat"], ["river"], ["window", "house", "cat"])))
    ids = clamping.bucket_token_ids(loaded.tokenizer, words)
    assert ids == {c: sorted(loaded.tokenizer.convert_tokens_to_ids(ws)) for c, ws in words.items()}
    frames = ["the cat sat on the", "a quick brown fox"]
    base = clamping.causal_readout(loaded, 1, frames, ids)
    np.testing.assert_allclose(clamping.causal_readout(loaded, 1, frames, ids, dec), base, atol=1e-5)
    expected = np.zeros((2, 4))  # the mean next-token log-probability of each bucket, condition by condition
    for f, frame in enumerate(frames):
        with torch.no_grad():
            logits = loaded.model(**loaded.tokenizer(frame, return_tensors="pt")).logits[0, -1]
        logp = torch.log_softmax(logits.double(), -1)
        expected[f] = [float(np.mean([logp[i] for i in ids[c]])) for c in CONDITIONS]
    np.testing.assert_allclose(base, expected, rtol=1e-5)
    assert len(np.unique(base.round(4))) == 8  # distinct buckets and frames: a swap of either would show


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


def test_clamps_move_the_output_by_known_amounts_where_the_relu_is_linear():
    """Every pre-ReLU unit sits far above 0 (hidden bias 40), so ``Linear(K,d)(ReLU(h))`` is affine near ``h``:
    a secondary edit of ``delta`` moves the layer output by exactly ``delta * scale_out * W_out d_s /
    (secondary scale * primary scale)``, and a first-order edit by ``(new - old) w_i / primary scale``."""
    p_scale, s_scale, out_scale = 0.5, 2.0, 1.5
    primary = TopKSAE(SAEConfig(d_in=24, n_latents=64, k=8, input_scale=p_scale), seed=0)
    nfm = NFM(NFMConfig(64, 24, k_embed=16, dropout=0.0), seed=1)
    second = TopKSAE(SAEConfig(d_in=16, n_latents=32, k=4, input_scale=s_scale), seed=2)
    with torch.no_grad():
        nfm.linear_weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
        nfm.embeddings.normal_(0, 0.5, generator=torch.Generator().manual_seed(1))
        nfm.hidden.bias.fill_(40.0)
        nfm.output_scale.fill_(out_scale)
        second.b_enc[DEAD] = -1e6
    dec = Decomposition(primary, nfm, second)
    x = torch.randn(12, 24, generator=torch.Generator().manual_seed(2)) * 3
    values, indices = primary.encode(x * p_scale)
    with torch.no_grad():
        h = nfm(values, indices).hidden_pre
        s_values, s_indices = second.encode(h * s_scale)
    assert h.min() > 20  # the premise: the edits below stay where the ReLU is the identity
    plain = dec.edit(x)

    def unit(feature):  # the output change of a secondary edit of +1, raw units
        return out_scale * nfm.out.weight.detach() @ second.W_dec.detach()[feature] / (s_scale * p_scale)

    firing = int(s_indices[0, 0])
    current = (s_values * (s_indices == firing)).sum(1)
    assert (current > 0).any()
    linear_feature = int(indices[0, 0])
    linear_current = (values * (indices == linear_feature)).sum(1)
    assert 0 < int((linear_current > 0).sum()) < len(x)  # active on some tokens only
    for clamp in (
        Clamp("secondary", firing, "add", 0.0),
        Clamp("secondary", firing, "multiply", 1.0),
        Clamp("linear", linear_feature, "add", 0.0),
        Clamp("linear", linear_feature, "multiply", 1.0),
    ):
        assert torch.equal(dec.edit(x, clamp), plain), clamp  # a no-op edit reproduces the splice exactly...
        random = dec.edit(x, clamp, control="random", generator=torch.Generator().manual_seed(0))
        assert torch.equal(random, plain), clamp  # ...and so does its size-matched random control
    for value in (5.0, -2.0):
        change = dec.edit(x, Clamp("secondary", firing, "add", value)) - plain
        torch.testing.assert_close(change, (value * unit(firing)).expand_as(change), atol=1e-4, rtol=1e-4)
        size = clamping.edit_norm(dec, Clamp("secondary", firing, "add", value), x)
        assert size == pytest.approx(abs(value) * float(unit(firing).norm()), rel=1e-4)
    change = dec.edit(x, Clamp("secondary", firing, "set", 0.0)) - plain  # removes exactly what was there
    torch.testing.assert_close(change, -current[:, None] * unit(firing), atol=1e-4, rtol=1e-4)
    change = dec.edit(x, Clamp("secondary", DEAD, "set", 3.0)) - plain  # a silent feature's value is 0: set = add
    torch.testing.assert_close(change, (3.0 * unit(DEAD)).expand_as(change), atol=1e-4, rtol=1e-4)
    change = dec.edit(x, Clamp("linear", linear_feature, "multiply", 3.0)) - plain
    expected = 2.0 * linear_current[:, None] * nfm.linear_weight.detach()[linear_feature] / p_scale
    torch.testing.assert_close(change, expected, atol=1e-5, rtol=1e-4)  # zero where the feature is silent
    change = dec.edit(x, Clamp("linear", linear_feature, "set", 1.0)) - plain
    expected = (1.0 - linear_current[:, None]) * nfm.linear_weight.detach()[linear_feature] / p_scale
    torch.testing.assert_close(change, expected, atol=1e-5, rtol=1e-4)


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
    # the same on five items whose rows are in no particular order, and the readout from those centroids
    order = np.random.default_rng(0).permutation(20)
    stimuli = pd.DataFrame(
        {"item_id": np.repeat(["e", "b", "d", "a", "c"], 4)[order], "condition": np.array(list(CONDITIONS) * 5)[order]}
    )
    embeddings = torch.randn(20, 3, generator=torch.Generator().manual_seed(0))
    centroids = clamping.leave_item_out_centroids(embeddings, stimuli)
    items, conditions = stimuli["item_id"].to_numpy(), stimuli["condition"].to_numpy()
    for t in range(20):
        for c, condition in enumerate(CONDITIONS):
            others = (conditions == condition) & (items != items[t])
            assert others.sum() == 4
            torch.testing.assert_close(centroids[t, c], embeddings[others].mean(0))
    readout = clamping.encoder_readout(embeddings, centroids, stimuli)
    for i, item in enumerate(sorted(set(items))):  # rows in sorted item order
        rows = np.flatnonzero(items == item)
        for c in range(4):
            cosines = [
                float(embeddings[t] @ centroids[t, c] / (embeddings[t].norm() * centroids[t, c].norm())) for t in rows
            ]
            assert readout[i, c] == pytest.approx(np.mean(cosines), abs=1e-6)


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


CONDITIONS_TO_REPLAY = [  # (clamped?, clamp, control), in the order 06 runs them: clean first
    (False, None, None),
    (True, None, None),
    (True, Clamp("secondary", 1, "add", 5.0), None),
    (True, Clamp("secondary", 1, "add", 5.0), "random"),
    (True, Clamp("linear", 3, "add", 2.0), None),
    (True, None, None),
]


def test_texts_are_read_in_batches_of_similar_length_and_returned_in_their_own_order(embedded):
    texts = [
        "ok",
        "The committee regrets to inform you of a long and entirely unavoidable delay in the proceedings.",
        "hi there",
        "Dear Sir, kindly find the attached documents enclosed herewith for your perusal at your convenience.",
    ]
    lengths = [len(embedded.tokenizer(t)["input_ids"]) for t in texts]
    shapes = []
    hook = embedded.model.embeddings.register_forward_hook(lambda _m, _i, output: shapes.append(output.shape[:2]))
    try:
        batched = clamping.pooled_embeddings(embedded, 3, texts, batch_size=2)
    finally:
        hook.remove()
    short, long = sorted(lengths)[:2], sorted(lengths)[2:]
    assert [tuple(s) for s in shapes] == [(2, max(short)), (2, max(long))]  # unsorted: both batches pad to a long text
    # each text's row is its own: the texts given already in length order run the same batches, so the rows are
    # the same numbers bit for bit, only in the other order (no float tolerance needed)
    rank = sorted(range(len(texts)), key=lengths.__getitem__)
    in_length_order = clamping.pooled_embeddings(embedded, 3, [texts[i] for i in rank], batch_size=2)
    assert torch.equal(batched[rank], in_length_order)
    # a substitute follows its text (another text's would give another row or another shape): each text's own
    # layer activations, doubled so that reading them shows
    own = [
        2 * models.forward_to_layer(embedded.model, 3, **embedded.tokenizer(t, return_tensors="pt"))[0] for t in texts
    ]
    substituted = clamping.pooled_embeddings(embedded, 3, texts, batch_size=2, substitutes=own)
    substituted_in_order = clamping.pooled_embeddings(
        embedded, 3, [texts[i] for i in rank], batch_size=2, substitutes=[own[i] for i in rank]
    )
    assert torch.equal(substituted[rank], substituted_in_order)
    assert (substituted - batched).abs().max() > 1e-2  # they were read
    with pytest.raises(ValueError, match="3 substitutes for 4 texts"):
        clamping.pooled_embeddings(embedded, 3, texts, batch_size=2, substitutes=own[:3])


@pytest.mark.parametrize("layer", [0, 3, 6])
def test_a_prefix_cache_replays_the_layers_below_the_splice_bit_for_bit(layer):
    loaded = models.load_model("embedded")  # its own copy: hooks are added to count the blocks' forwards
    dec = decomposition(loaded.d_model, scale=0.3)
    texts = ["The committee regrets the delay.", "ugh, whatever", "Dear Sir, kindly find attached.", "I love it!"] * 3
    prefix = PrefixCache()
    calls = count_forwards_below(loaded.model, layer)[0]
    decomposed = []
    original = dec.decompose
    dec.decompose = lambda h: decomposed.append(len(h)) or original(h)
    for n, (spliced, clamp, control) in enumerate(CONDITIONS_TO_REPLAY):
        args = (loaded, layer, texts, dec if spliced else None, clamp, control)
        computed = clamping.pooled_embeddings(*args, batch_size=5)
        before = calls[0]
        replayed = clamping.pooled_embeddings(*args, batch_size=5, prefix=prefix)
        assert torch.equal(replayed, computed), (layer, clamp, control)
        assert (calls[0] > before) == (n == 0 and layer > 0)  # the blocks below run on the first pass only
    # the clean decomposition: three batches for each of the five spliced computed passes, and once for the cache
    assert len(decomposed) == 3 * 5 + 3
    with pytest.raises(ValueError, match="other inputs"):
        clamping.pooled_embeddings(loaded, layer, texts[::-1], dec, batch_size=5, prefix=prefix)


def test_a_prefix_cache_replays_a_causal_lm_at_every_kind_of_layer(causal_dir):
    loaded = models.load_model(str(causal_dir))
    dec = decomposition(loaded.d_model, scale=2.0)
    words = dict(zip(CONDITIONS, (["cat"], ["dog", "mat"], ["river"], ["window", "house", "cat"])))
    ids = clamping.bucket_token_ids(loaded.tokenizer, words)
    frames = ["the cat sat on the", "a quick brown fox"]
    n_layers = loaded.model.config.num_hidden_layers
    for layer in (0, 1, n_layers):  # the embeddings, a block, the final norm
        prefix = PrefixCache()
        calls = count_forwards_below(loaded.model, layer)[0]
        for n, (spliced, clamp, control) in enumerate(CONDITIONS_TO_REPLAY):
            args = (loaded, layer, frames, ids, dec if spliced else None, clamp, control)
            computed = clamping.causal_readout(*args)
            before = calls[0]
            replayed = clamping.causal_readout(*args, prefix=prefix)
            np.testing.assert_array_equal(replayed, computed)
            assert (calls[0] > before) == (n == 0 and layer > 0)


def test_a_prefix_cache_refuses_a_recorded_batch_spliced_at_other_tokens():
    loaded = models.load_model("embedded")
    dec = decomposition(loaded.d_model, scale=0.3)
    inputs = loaded.tokenizer(["The committee regrets the delay."], return_tensors="pt")
    keep = inputs["attention_mask"].bool()
    prefix = PrefixCache()
    clamping._forward(loaded, 3, dict(inputs), keep, dec, None, None, 0, prefix, 0)
    other = keep.clone()
    other[0, 0] = False  # the memo holds the decomposition of the first splice's tokens, not of these
    with pytest.raises(ValueError, match="other tokens"):
        clamping._forward(loaded, 3, dict(inputs), other, dec, None, None, 0, prefix, 0)


def test_layer_made_statistics_call_rounding_zero_and_test_real_parts_against_their_controls():
    """A part within 2^-16 of the readout in every unit is float32 rounding: p = 1 (a sign-flip test alone
    calls a sign-consistent rounding "significant"), and so is the difference of two such parts; a part above
    it is tested, alone and against its control. Contrasts are of [units, 4] changes: FE's bucket alone."""
    rng = np.random.default_rng(0)
    n = 60

    def fe_only(values):  # a change in the FE bucket only: its interaction contrast is the value itself
        out = np.zeros((n, 4))
        out[:, 0] = values
        return out

    # sign-consistent, within 2^-16 (1.5e-5) of a readout of 1; two of opposite sign differ by more than that
    rounding = 9e-6 * (1 + 0.5 * rng.random(n))
    changes = {
        "secondary 1 @ +1": fe_only(rounding),
        "random, matched to 1 @ +1": fe_only(-rounding),
        "secondary 2 @ +1": fe_only(1e-3 + 1e-4 * rng.normal(size=n)),
        "random, matched to 2 @ +1": fe_only(rounding),
    }
    own = fe_only(2e-3 + 1e-4 * rng.normal(size=n))
    references = clamping.random_references(pd.DataFrame({"name": list(changes)}))
    table = clamp_split.layer_made_statistics(own, changes, 1.0, references, 2000, 200).set_index("condition")
    assert sign_flip_test(rounding, 2000)[0] < 0.01  # what the floor guards against
    assert table.loc["secondary 1 @ +1", "sign_flip_p"] == 1 and table.loc["secondary 1 @ +1", "vs_control_p"] == 1
    assert table.loc["no clamp", "sign_flip_p"] < 0.01 and table.loc["secondary 2 @ +1", "holm_p"] < 0.01
    assert table.loc["secondary 2 @ +1", "vs_control_holm_p"] < 0.01
    assert table.loc["secondary 2 @ +1", "share_of_own"] == pytest.approx(
        changes["secondary 2 @ +1"][:, 0].mean() / own[:, 0].mean()
    )
