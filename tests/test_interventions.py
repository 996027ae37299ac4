import pytest
import torch

from featint_utils.data import extraction, interventions, models
from featint_utils.data.corpus import Text, split_by_group

from .conftest import CORPUS_SENTENCES

TEXTS = [
    "The meeting moved to Tuesday.",
    "A long sentence about the weather in the north, which stays cold.",
    "Short one.",
    "Prices rose again this month, and the shops are quiet.",
]


def _store(loaded, tmp_path, texts, layer):
    split = split_by_group([Text(f"t{i}", f"g{i}", s) for i, s in enumerate(texts)], 0.5, seed=0)
    return extraction.extract(loaded, split, layer, tmp_path / "acts", context_tokens=12)


def test_identity_splice_reproduces_the_clean_model_exactly(embedded):
    inputs = embedded.tokenizer(TEXTS, return_tensors="pt", padding=True)
    with torch.inference_mode():
        clean = embedded.model(**inputs).last_hidden_state
        with interventions.splice(embedded.model, 3, lambda h: h) as state:
            state["mask"] = inputs["attention_mask"].bool()
            spliced = embedded.model(**inputs).last_hidden_state
    assert torch.equal(clean, spliced)


def test_splice_changes_only_the_masked_positions_at_the_hooked_layer(embedded):
    # Read the layer through our own capture hook, registered after the splice's: transformers' own
    # hidden_states recorder may run before the splice and report the unspliced value.
    inputs = embedded.tokenizer(TEXTS[:1], return_tensors="pt")
    mask = torch.zeros_like(inputs["input_ids"], dtype=torch.bool)
    mask[0, 2] = True
    with torch.inference_mode():
        with models.capture(embedded.model, 3) as clean:
            embedded.model(**inputs)
        with interventions.splice(embedded.model, 3, lambda h: h + 1.0) as state:
            state["mask"] = mask
            with models.capture(embedded.model, 3) as spliced:
                embedded.model(**inputs)
    delta = (spliced["hidden"] - clean["hidden"]).abs().amax(-1)[0]
    assert delta[2] == pytest.approx(1.0) and (delta[torch.arange(len(delta)) != 2] == 0).all()


def test_splice_hook_is_removed_after_an_exception(embedded):
    module = models.hook_module(embedded.model, 3)
    before = len(module._forward_hooks)
    with pytest.raises(RuntimeError, match="boom"):
        with interventions.splice(embedded.model, 3, lambda h: h):
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == before


def test_splice_metrics_encoder_identity_and_random(embedded, tmp_path):
    store = _store(embedded, tmp_path, TEXTS, 3)
    perfect = interventions.splice_metrics(embedded, store, lambda h: h, max_texts=4)
    assert perfect["cosine_spliced"] == pytest.approx(1.0, abs=1e-6)
    shrunk = interventions.splice_metrics(embedded, store, lambda h: 0.5 * h, max_texts=4)
    assert shrunk["cosine_spliced"] < 0.999 and shrunk["cosine_random"] < 0.999
    assert perfect["cosine_random"] == pytest.approx(1.0, abs=1e-6), "a zero error adds zero noise"


def test_splice_metrics_causal_lm(causal_dir, tmp_path):
    loaded = models.load_model(str(causal_dir))
    store = _store(loaded, tmp_path, CORPUS_SENTENCES, 1)
    perfect = interventions.splice_metrics(loaded, store, lambda h: h)
    assert perfect["ce_spliced"] == pytest.approx(perfect["ce_clean"], rel=1e-6)
    assert perfect["kl_spliced"] == pytest.approx(0.0, abs=1e-6)
    assert perfect["ce_score_vs_zero"] == pytest.approx(1.0, abs=1e-4)
    noisy = interventions.splice_metrics(loaded, store, lambda h: h + torch.randn_like(h))
    assert noisy["kl_spliced"] > 1e-4 and noisy["n_predictions"] > 0
