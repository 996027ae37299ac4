import pytest
import torch

from featint_utils import models

from .conftest import CAUSAL_ARCHS, tiny_causal


def _assert_hooks_match_hidden_states(model, inputs):
    with torch.inference_mode():
        reference = model(**inputs, output_hidden_states=True).hidden_states
        assert len(reference) == model.config.num_hidden_layers + 1
        for layer, expected in enumerate(reference):
            with models.capture(model, layer) as captured:
                model(**inputs)
            assert torch.equal(captured["hidden"], expected), f"layer {layer}"
            assert torch.equal(models.forward_to_layer(model, layer, **inputs), expected), f"layer {layer} (early stop)"


@pytest.mark.parametrize("arch", CAUSAL_ARCHS)
def test_hook_equals_hidden_states_for_causal_architectures(arch):
    model = tiny_causal(arch, n_layers=3)
    ids = torch.randint(4, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    _assert_hooks_match_hidden_states(model, {"input_ids": ids, "attention_mask": mask})


def test_hook_equals_hidden_states_on_real_minilm(embedded):
    inputs = embedded.tokenizer(
        ["A short one.", "A somewhat longer sentence with more words in it."], return_tensors="pt", padding=True
    )
    _assert_hooks_match_hidden_states(embedded.model, dict(inputs))
    assert not embedded.is_causal_lm and embedded.n_layers == 6 and embedded.d_model == 384


def test_final_layer_of_causal_lm_is_the_final_norm():
    model = tiny_causal("gpt2", n_layers=2)
    assert models.hook_module(model, 2) is model.transformer.ln_f
    assert models.hook_module(model, 1) is model.transformer.h[0]


@pytest.mark.parametrize("layer", [-1, 7, 100, 2.0])
def test_layer_out_of_range_names_the_valid_range(embedded, layer):
    with pytest.raises(ValueError, match=r"valid layers are 0\.\.6"):
        models.hook_module(embedded.model, layer)


def test_hook_is_removed_after_an_exception(embedded):
    module = models.hook_module(embedded.model, 2)
    before = len(module._forward_hooks)
    with pytest.raises(RuntimeError):
        with models.capture(embedded.model, 2):
            assert len(module._forward_hooks) == before + 1
            raise RuntimeError("boom")
    assert len(module._forward_hooks) == before


def test_missing_model_path_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist.*'embedded'"):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_local_causal_model_directory_loads_with_lm_head(causal_dir):
    loaded = models.load_model(str(causal_dir))
    assert loaded.is_causal_lm
    assert loaded.model.get_output_embeddings() is not None
