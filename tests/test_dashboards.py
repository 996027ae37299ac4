"""Feature dashboards: planted features show their tokens, counts are exact, examples are ordered, neighbours and
output tokens are what the weights say, and token text is escaped. One tiny run with a tiny random GPT-2 serves
every test; the pages are read back from disk."""

import re

import numpy as np
import pytest
import torch

from featint_utils import params
from featint_utils.data.extraction import store_from_arrays
from featint_utils.data.models import LoadedModel
from featint_utils.dictionary.sae import SAEConfig, TopKSAE
from featint_utils.io import write_json
from featint_utils.residual.nfm import NFM, NFMConfig
from featint_utils.workbench.dashboards import build_dashboards
from featint_utils.workbench.feature_stats import HIST_BINS, _Collector, decoder_neighbours
from featint_utils.workbench.run import Run
from tests.conftest import tiny_causal

D, N_LATENTS, K = 32, 64, 4  # d = the tiny GPT-2's width
CAT, SCRIPT = 0, 1  # primary features planted on the tokens "cat" and "<script>"
TWIN, COPY = 7, 40  # COPY's decoder row is set equal to TWIN's
WORDS = "the a dog sat on mat river north south rain letter house week plan noon window quick brown fox lazy".split()


def _tokenizer():
    """A word-level tokenizer that splits on whitespace only, so ``<script>`` is one token."""
    from tokenizers import Tokenizer, pre_tokenizers
    from tokenizers import models as tok_models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS, "cat", "<script>"])}
    tok = Tokenizer(tok_models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>"
    )


def _split(rng, n_docs: int, first_doc: int, tokens_per_doc: int, ids: dict[str, int]):
    """Random words with ``cat`` and ``<script>`` sprinkled in; activations are noise plus a planted direction on
    those two tokens."""
    n = n_docs * tokens_per_doc
    token = rng.choice([ids[w] for w in WORDS], size=n)
    planted = rng.random(n)
    token[planted < 0.06] = ids["cat"]
    token[(planted >= 0.06) & (planted < 0.09)] = ids["<script>"]
    acts = 0.3 * rng.normal(size=(n, D))
    acts[token == ids["cat"], CAT] += 6.0 + rng.random((token == ids["cat"]).sum())
    acts[token == ids["<script>"], SCRIPT] += 5.0
    meta = np.c_[first_doc + np.arange(n) // tokens_per_doc, np.arange(n) % tokens_per_doc, token]
    return acts, meta


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A run (store, primary SAE, NFM, secondary SAE) and its primary dashboards for a few features."""
    root = tmp_path_factory.mktemp("run")
    tokenizer = _tokenizer()
    ids = tokenizer.get_vocab()
    model = tiny_causal("gpt2", vocab_size=len(tokenizer))
    loaded = LoadedModel(model, tokenizer, "tiny", "tiny", is_causal_lm=True)
    rng = np.random.default_rng(0)
    (train, train_meta), (val, val_meta) = _split(rng, 30, 0, 16, ids), _split(rng, 80, 30, 16, ids)
    texts = [
        {"index": i, "text_id": f"doc&{i}", "group": str(i), "split": "train" if i < 30 else "val", "text": ""}
        for i in range(110)
    ]
    store = store_from_arrays(
        root / "activations", {"train": train, "val": val}, meta={"train": train_meta, "val": val_meta}, texts=texts
    )
    values = {k: v for s in params.STAGES for k, v in params.defaults(s).items()} | {"device": "cpu"}
    run = Run(root, "05_feature_identification", values)

    run.begin_primary_sae()
    sae = TopKSAE(SAEConfig(d_in=D, n_latents=N_LATENTS, k=K, input_scale=store.scale), seed=0)
    with torch.no_grad():
        sae.W_dec[:D] = torch.eye(D)  # feature i reads and writes basis direction i
        sae.W_dec[COPY] = sae.W_dec[TWIN]
        sae.W_enc.copy_(sae.W_dec)
    sae.save(run.primary_dir / "sae")
    run.begin_nfm_stage()
    NFM(NFMConfig(N_LATENTS, D, k_embed=8, embed_init_std=1.0), seed=0).save(run.nfm_model_dir(0))
    write_json(run.sets_path, {"note": "stage 02's sets are not read here"})
    run.begin_secondary(0)
    TopKSAE(SAEConfig(d_in=8, n_latents=16, k=2), seed=0).save(run.secondary_dir(0) / "sae")

    features = [CAT, SCRIPT, TWIN, COPY, 50]
    index = build_dashboards(
        run, "primary", features=features, out_dir=root / "dash", loaded=loaded, n_top=5, batch_size=300
    )
    return {"run": run, "loaded": loaded, "ids": ids, "dir": index.parent, "features": features, "sae": sae}


def _page(built, feature: int, family_dir=None) -> str:
    return ((family_dir or built["dir"]) / f"feature_{feature}.html").read_text()


def _examples(fragment: str) -> list[tuple[int, float, int]]:
    found = re.findall(r'<div class="ex" data-row="(\d+)" data-activation="([^"]+)" data-token-id="(-?\d+)"', fragment)
    return [(int(r), float(a), int(t)) for r, a, t in found]


def _top(page: str) -> list[tuple[int, float, int]]:
    return _examples(re.search(r'<section class="top">(.*?)</section>', page, re.S).group(1))


def _bins(page: str) -> list[tuple[float, float, list]]:
    found = re.findall(r'<section class="bin" data-lo="([^"]+)" data-hi="([^"]+)">(.*?)</section>', page, re.S)
    return [(float(lo), float(hi), _examples(body)) for lo, hi, body in found]


def _histogram_total(page: str) -> int:
    return sum(int(c) for c in re.findall(r'data-count="(\d+)"', page))


def _output_ids(page: str, kind: str) -> list[int]:
    block = re.search(rf'<div class="tokens {kind}">(.*?)</div>', page, re.S).group(1)
    return [int(t) for t in re.findall(r'data-token-id="(\d+)"', block)]


def _direct_codes(run: Run, which: str):
    decomposition = run.decomposition(0 if which == "secondary" else None)
    encode = decomposition.primary_code if which == "primary" else decomposition.secondary_code
    x = torch.from_numpy(run.store().load("val"))
    return x, decomposition, encode(x)


def _activation(code, feature: int) -> torch.Tensor:
    values, indices = code
    return (values * (indices == feature)).sum(1)


def test_a_planted_feature_shows_its_token_in_its_top_examples_and_label(built):
    page = _page(built, CAT)
    top = _top(page)
    assert len(top) == 5 and all(token == built["ids"]["cat"] for _, _, token in top)
    label = re.search(r"<h1>.*?<small>(.*?)</small></h1>", page).group(1)
    assert label.split("/")[0] == "cat"
    centre = re.findall(r'<span class="t c"[^>]*>([^<]*)</span>', page)
    assert centre[:5] == [" cat"] * 5  # the highlighted token of each top example's window
    index = (built["dir"] / "index.html").read_text()
    for feature in built["features"]:
        assert f'href="feature_{feature}.html"' in index
    assert re.search(r'href="feature_0.html">0</a></td><td>cat', index)


def test_histogram_counts_every_nonzero_activation_and_top_is_the_true_maximum(built):
    _, _, code = _direct_codes(built["run"], "primary")
    for feature in built["features"]:
        activation = _activation(code, feature)
        page = _page(built, feature)
        assert _histogram_total(page) == int((activation > 0).sum())
        assert f"({int((activation > 0).sum())} of {len(activation)})" in page
        assert _top(page)[0][1] == pytest.approx(float(activation.max()), rel=1e-5)


def test_the_doubling_histogram_equals_a_histogram_with_the_final_bins():
    rng = np.random.default_rng(1)
    collector = _Collector(n_features=2, n_top=3, sample_size=8, seed=0)
    batches = [np.abs(rng.normal(size=(50, 2))) * scale for scale in (0.01, 0.5, 3.0, 40.0, 1.0)]  # range grows
    for b, batch in enumerate(batches):
        batch[rng.random(batch.shape) < 0.3] = 0  # features are off on some tokens
        collector.add(torch.from_numpy(batch).float(), b * 50)
    everything = np.concatenate(batches).astype(np.float32)
    for f in range(2):
        on = everything[:, f][everything[:, f] > 0]
        edges = np.linspace(0, float(collector.upper[f]), HIST_BINS + 1)
        assert collector.hist[f].tolist() == np.histogram(on, edges)[0].tolist()
        assert on.max() <= float(collector.upper[f]) < 2 * on.max()
        assert sorted(collector.top_values[f].tolist(), reverse=True) == sorted(on, reverse=True)[:3]


def test_quantile_examples_are_ordered_within_and_across_bins_and_below_the_top(built):
    for feature in built["features"]:
        page = _page(built, feature)
        bins = _bins(page)
        assert len(bins) == 4
        lowest_top = min(a for _, a, _ in _top(page))
        previous_low = np.inf
        for lo, hi, examples in bins:
            acts = [a for _, a, _ in examples]
            assert acts == sorted(acts, reverse=True)
            assert all(lo - 1e-5 <= a <= hi + 1e-5 and a <= previous_low + 1e-6 for a in acts)
            assert all(a <= lowest_top + 1e-6 for a in acts)
            previous_low = min(acts, default=previous_low)
        assert [hi for _, hi, _ in bins] == sorted([hi for _, hi, _ in bins], reverse=True)
        assert sum(len(examples) for _, _, examples in bins) >= 4  # every feature here fires on dozens of tokens


def test_decoder_neighbours_list_an_identical_decoder_row_first(built):
    assert decoder_neighbours(built["sae"].W_dec, TWIN, 3)[0] == (COPY, pytest.approx(1.0))
    rows = re.findall(r'<tr data-feature="(\d+)"><td>(.*?)</td><td>([^<]+)</td>', _page(built, TWIN))
    assert int(rows[0][0]) == COPY and float(rows[0][2]) == pytest.approx(1.0)
    assert rows[0][1] == f'<a href="feature_{COPY}.html">{COPY}</a>'  # it has a page: linked
    assert float(rows[1][2]) < 0.999


def test_token_text_and_document_ids_are_escaped(built):
    page = _page(built, SCRIPT)
    assert all(token == built["ids"]["<script>"] for _, _, token in _top(page))
    assert "&lt;script&gt;" in page
    assert "<script" not in page.lower()  # no script tags: neither a token's text nor the page's own
    assert "doc&amp;" in page and "doc&3" not in page


def test_boosted_and_suppressed_tokens_are_the_argsort_of_the_decoder_row_through_the_unembedding(built):
    W_U = built["loaded"].model.get_output_embeddings().weight.detach().T  # [d, vocab]
    for feature in (CAT, TWIN, 50):
        logits = built["sae"].W_dec[feature].detach() @ W_U
        page = _page(built, feature)
        assert _output_ids(page, "boosted") == torch.argsort(logits, descending=True)[:10].tolist()
        assert _output_ids(page, "suppressed") == torch.argsort(logits)[:10].tolist()


def test_secondary_dashboards_read_the_nfm_vector_and_clamp_through_the_nfm(built, tmp_path):
    run = built["run"]
    x, decomposition, code = _direct_codes(run, "secondary")
    counts = torch.bincount(code[1][code[0] > 0], minlength=16)
    features = torch.argsort(counts, descending=True)[:2].tolist()
    index = build_dashboards(
        run, "secondary", features=features, out_dir=tmp_path, loaded=built["loaded"], sample_size=len(x), n_top=4
    )
    W_U = built["loaded"].model.get_output_embeddings().weight.detach().T
    nfm, secondary = decomposition.nfm, decomposition.secondary
    primary_scale = decomposition.primary.cfg.input_scale
    for feature in features:
        page = _page(built, feature, index.parent)
        activation = _activation(code, feature)
        assert _histogram_total(page) == int((activation > 0).sum()) == int(counts[feature])
        assert _top(page)[0][1] == pytest.approx(float(activation.max()), rel=1e-5)
        # the feature's share of the NFM output, written out: ReLU(h) - ReLU(h without it), through out
        on = activation > 0
        h = nfm(*decomposition.primary_code(x[on])).hidden_pre.detach()
        without = h - activation[on, None] * secondary.W_dec[feature].detach() / secondary.cfg.input_scale
        change = (nfm.interaction_from_hidden(h) - nfm.interaction_from_hidden(without)).detach() / primary_scale
        logits = (change.sum(0) / activation[on].sum()) @ W_U
        assert _output_ids(page, "boosted") == torch.argsort(logits, descending=True)[:10].tolist()
        assert "Driving primary pairs" in page


def test_without_stage_05_the_default_is_live_features_capped(built, tmp_path):
    index = build_dashboards(built["run"], "primary", out_dir=tmp_path, loaded=built["loaded"], max_features=5)
    pages = sorted(index.parent.glob("feature_*.html"))
    assert len(pages) == 5
    assert "firing-frequency ranking" in index.read_text()
    for page in pages:
        assert _top(page.read_text())  # every chosen feature fires
