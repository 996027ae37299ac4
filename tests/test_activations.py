import numpy as np
import pytest
import torch

from featint_utils.data import activation_store, extraction, models
from featint_utils.data.activation_store import ActivationStore, StoreError
from featint_utils.data.corpus import Text, split_by_group

from .conftest import CORPUS_SENTENCES, random_store

TEXTS = [
    "Short.",
    "A rather longer sentence, with punctuation; and several clauses that run on for a while.",
    "Numbers 123 and symbols % & appear here too.",
    "Another item of medium length for the store.",
    "Tiny one",
    "The last text has enough tokens to be cut into more than one context window by the extractor.",
]


def _split(texts):
    return split_by_group([Text(f"t{i}", f"g{i}", s) for i, s in enumerate(texts)], 0.34, seed=0)


@pytest.fixture(scope="module")
def minilm_store(embedded, tmp_path_factory):
    path = tmp_path_factory.mktemp("store") / "acts"
    # 10-token contexts force chunking; a tiny shard size forces several shards per split.
    store = extraction.extract(embedded, _split(TEXTS), 3, path, context_tokens=10, batch_size=3, shard_mb=0.02)
    return store


def _expected_activations(loaded, store, layer):
    """Recompute every stored token one context at a time, unbatched, straight from hidden_states."""
    prefix, suffix = extraction.special_frame(loaded.tokenizer)
    chunk_len = store.manifest["context_tokens"] - len(prefix) - len(suffix)
    expected = {}
    for row in store.texts().itertuples():
        ids = loaded.tokenizer(row.text, add_special_tokens=False)["input_ids"]
        for start in range(0, len(ids), chunk_len):
            chunk = ids[start : start + chunk_len]
            with torch.inference_mode():
                hidden = loaded.model(input_ids=torch.tensor([prefix + chunk + suffix]), output_hidden_states=True)
            states = hidden.hidden_states[layer][0, len(prefix) :]
            for j, token in enumerate(chunk):
                expected[(row.index, start + j)] = (token, states[j].numpy())
    return expected


def _assert_round_trip(loaded, store, layer):
    expected = _expected_activations(loaded, store, layer)
    specials = set(loaded.tokenizer.all_special_ids)
    seen = set()
    for split in ("train", "val"):
        acts, tokens = store.load(split), store.tokens(split)
        assert len(acts) == len(tokens) == store.n_tokens(split)
        for vector, (text_index, position, token_id) in zip(acts, tokens.itertuples(index=False)):
            exp_token, exp_vector = expected[(text_index, position)]
            assert token_id == exp_token and token_id not in specials
            np.testing.assert_allclose(vector, exp_vector, atol=2e-5, rtol=1e-4)
            seen.add((text_index, position))
    real = {k for k, (token, _) in expected.items() if token not in specials}
    assert seen == real, "every real token stored exactly once, nothing else"


def test_store_round_trip_values_and_provenance_minilm(embedded, minilm_store):
    _assert_round_trip(embedded, minilm_store, 3)
    assert len(minilm_store.manifest["splits"]["train"]["shards"]) > 1
    assert minilm_store.manifest["hook"] == "encoder.layer.2"
    texts = minilm_store.texts()
    val_groups = set(texts.loc[texts["split"] == "val", "group"])
    assert val_groups == set(minilm_store.manifest["split"]["val_groups"])
    assert not val_groups & set(texts.loc[texts["split"] == "train", "group"])


def test_store_round_trip_on_tiny_causal_models(causal_dir, tmp_path):
    loaded = models.load_model(str(causal_dir))
    store = extraction.extract(
        loaded,
        _split(CORPUS_SENTENCES + ["zebra unknown words here"]),
        1,
        tmp_path / "acts",
        context_tokens=6,
        batch_size=2,
    )
    _assert_round_trip(loaded, store, 1)
    frame = store.manifest["special_frame"]
    assert frame["prefix"] == ([2] if loaded.model.config.model_type == "llama" else [])


def test_normalisation_scale_gives_mean_squared_norm_d_model(minilm_store):
    x = minilm_store.load("train", normalize=True).astype(np.float64)
    assert np.mean((x**2).sum(1)) == pytest.approx(minilm_store.d_model, rel=1e-4)
    np.testing.assert_allclose(minilm_store.mean, minilm_store.load("train").astype(np.float64).mean(0), atol=1e-5)


@pytest.mark.parametrize("shuffle", [True, False])
def test_streaming_batches_cover_every_token_once(minilm_store, shuffle):
    batches = list(minilm_store.batches("train", batch_size=7, shuffle=shuffle, seed=1, normalize=False, mix_shards=2))
    assert all(len(b) == 7 for b in batches[:-1]) and 0 < len(batches[-1]) <= 7
    streamed = torch.cat(batches).numpy()
    stored = minilm_store.load("train")
    assert streamed.shape == stored.shape
    order = lambda a: a[np.lexsort(a.T[::-1])]  # noqa: E731
    np.testing.assert_array_equal(order(streamed), order(stored))
    if not shuffle:
        np.testing.assert_array_equal(streamed, stored)


def test_manifest_mismatch_is_a_clear_error(embedded, tmp_path):
    store = extraction.extract(embedded, _split(TEXTS), 2, tmp_path / "acts", context_tokens=16, shard_mb=0.02)
    shard = store.manifest["splits"]["train"]["shards"][0]
    np.save(store.path / shard["acts"], np.zeros((3, store.d_model), np.float32))
    with pytest.raises(StoreError, match=r"has shape \(3, 384\).*corrupt"):
        ActivationStore(store.path)
    (store.path / shard["acts"]).unlink()
    with pytest.raises(StoreError, match="is missing"):
        ActivationStore(store.path)


def test_checksum_catches_changed_bytes(embedded, tmp_path):
    store = extraction.extract(embedded, _split(TEXTS), 2, tmp_path / "acts", context_tokens=16)
    store.verify()
    shard = store.path / store.manifest["splits"]["val"]["shards"][0]["acts"]
    array = np.load(shard)
    array[0, 0] += 1.0
    np.save(shard, array)
    with pytest.raises(StoreError, match="does not match its checksum"):
        store.verify()


def test_interrupted_extraction_leaves_no_store_that_reads_as_valid(embedded, tmp_path, monkeypatch):
    path = tmp_path / "acts"
    first = extraction.extract(embedded, _split(TEXTS), 2, path, context_tokens=10, batch_size=2)
    tokens_before = first.n_tokens("train")
    real_forward, calls = extraction.forward_to_layer, []

    def dying_forward(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real_forward(*args, **kwargs)

    monkeypatch.setattr(extraction, "forward_to_layer", dying_forward)
    with pytest.raises(KeyboardInterrupt):
        extraction.extract(embedded, _split(TEXTS[:4]), 2, path, context_tokens=10, batch_size=2, shard_mb=1e-4)
    partial = path.with_name("acts.partial")
    assert any(partial.glob("*.acts.npy")), "the interrupted run had written shards"
    with pytest.raises(StoreError, match="manifest.json is missing"):
        ActivationStore(partial)
    assert ActivationStore(path).n_tokens("train") == tokens_before, "the previous complete store is untouched"
    monkeypatch.setattr(extraction, "forward_to_layer", real_forward)
    extraction.extract(embedded, _split(TEXTS), 2, path, context_tokens=10)
    assert not partial.exists()


def test_missing_store_and_bad_arguments(embedded, tmp_path):
    with pytest.raises(StoreError, match="no activation store"):
        ActivationStore(tmp_path / "nothing")
    with pytest.raises(ValueError, match="valid layers are 0..6"):
        extraction.extract(embedded, _split(TEXTS), 9, tmp_path / "a")
    with pytest.raises(ValueError, match="exceeds the model's 512 positions"):
        extraction.extract(embedded, _split(TEXTS), 2, tmp_path / "a", context_tokens=600)


def test_same_request_reuses_the_store_and_a_new_one_rebuilds_it(embedded, tmp_path):
    first = extraction.extract(embedded, _split(TEXTS), 2, tmp_path / "acts", context_tokens=16)
    again = extraction.extract(embedded, _split(TEXTS), 2, tmp_path / "acts", context_tokens=16)
    assert again.manifest["created"] == first.manifest["created"]
    other_layer = extraction.extract(embedded, _split(TEXTS), 3, tmp_path / "acts", context_tokens=16)
    assert other_layer.manifest["created"] != first.manifest["created"] and other_layer.layer == 3
    changed = _split(TEXTS[:-1] + ["changed"])
    other_texts = extraction.extract(embedded, changed, 3, tmp_path / "acts", context_tokens=16)
    assert other_texts.manifest["created"] != other_layer.manifest["created"]


def test_a_model_at_another_path_is_the_same_model_and_its_store_is_reused(tmp_path):
    """A run opened on another machine finds its model elsewhere (another virtual environment, another disk): the
    store names the model by content, so it is reused there, and the splice accepts that model; a model whose
    weights differ is another model."""
    import shutil

    from .conftest import _tiny_tokenizer, tiny_causal

    here, there, other = tmp_path / "here", tmp_path / "there", tmp_path / "other"
    tiny_causal("gpt2", vocab_size=len(_tiny_tokenizer(bos=False))).save_pretrained(here)
    _tiny_tokenizer(bos=False).save_pretrained(here)
    shutil.copytree(here, there)
    split = _split(CORPUS_SENTENCES)
    first = extraction.extract(models.load_model(str(here)), split, 1, tmp_path / "acts", context_tokens=8)
    moved = models.load_model(str(there))
    again = extraction.extract(moved, split, 1, tmp_path / "acts", context_tokens=8)
    assert again.manifest["created"] == first.manifest["created"] and again.extracted_by(moved)
    shutil.copytree(here, other)
    changed = models.load_model(str(other))
    with torch.no_grad():
        changed.model.transformer.h[0].mlp.c_fc.weight.add_(1e-3)
    changed.model.save_pretrained(other)
    changed = models.load_model(str(other))
    assert not first.extracted_by(changed)
    rebuilt = extraction.extract(changed, split, 1, tmp_path / "acts", context_tokens=8)
    assert rebuilt.manifest["created"] != first.manifest["created"]


def test_gathered_rows_in_any_order_are_those_of_a_full_read_across_shards(tmp_path):
    """Rows picked across shard boundaries, unsorted and repeated, read from the memory maps: the activations and
    the provenance equal what a full read of the split gives at those rows."""
    one_shard = random_store(tmp_path / "store", 3_000, 10, d=16)
    store = extraction.store_from_arrays(
        tmp_path / "sharded",
        {"train": one_shard.load("train"), "val": one_shard.load("val")},
        meta={"train": one_shard.tokens("train").to_numpy(), "val": one_shard.tokens("val").to_numpy()},
        shard_mb=0.05,
    )
    assert len(store.shards("train")) > 2
    rows = np.random.default_rng(0).integers(0, 3_000, 500)
    np.testing.assert_array_equal(store.gather("train", rows), store.load("train")[rows])
    np.testing.assert_array_equal(store.gather_meta("train", rows), store.tokens("train").to_numpy()[rows])


def test_a_closed_prefetch_leaves_no_thread_behind():
    """Closing the generator (a trainer that has its steps) ends the producer before it returns: a daemon thread
    left inside numpy or torch when the interpreter exits can abort the process."""
    import itertools
    import threading
    import time

    def slow():
        for i in itertools.count():
            time.sleep(0.02)  # the producer is inside an item when the consumer stops
            yield i

    before = set(threading.enumerate())
    stream = activation_store.prefetch(slow(), depth=2)
    assert [next(stream) for _ in range(3)] == [0, 1, 2]
    stream.close()
    assert [t for t in threading.enumerate() if t not in before] == []
