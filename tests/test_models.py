import pytest
import torch

from featint_utils.data import models
from featint_utils.data.interventions import PrefixCache, splice

from .conftest import CAUSAL_ARCHS, count_forwards_below, tiny_causal


def _assert_hooks_match_hidden_states(model, inputs, unhookable=()):
    """Every layer's hook output equals ``hidden_states[layer]``, except ``unhookable`` layers, which must refuse."""
    with torch.inference_mode():
        reference = model(**inputs, output_hidden_states=True).hidden_states
        assert len(reference) == model.config.num_hidden_layers + 1
        for layer, expected in enumerate(reference):
            if layer in unhookable:
                with pytest.raises(NotImplementedError, match=r"cannot be hooked.*hidden_states\[0\]"):
                    models.hook_module(model, layer)
                continue
            with models.capture(model, layer) as captured:
                model(**inputs)
            assert torch.equal(captured["hidden"], expected), f"layer {layer}"
            assert torch.equal(models.forward_to_layer(model, layer, **inputs), expected), f"layer {layer} (early stop)"


# Tiny random configs of the families conftest.tiny_causal does not build: hidden 64, 4 heads of 16 (2 KV heads),
# vocab 64. Keyword -> (config class, model class, config arguments); "opt_350m_style" is OPT with post-LN blocks,
# no final norm and a project_out to a narrower word_embed_proj_dim, as OPT-350m has.
_TINY = dict(hidden_size=64, num_attention_heads=4, vocab_size=64, max_position_embeddings=64, pad_token_id=0)
_DECODER = dict(_TINY, num_key_value_heads=2, head_dim=16, intermediate_size=128, bos_token_id=2, eos_token_id=3)
_OPT = dict(_TINY, ffn_dim=128, word_embed_proj_dim=64)
MORE_CAUSAL_FAMILIES = {
    "gemma": ("GemmaConfig", "GemmaForCausalLM", _DECODER),
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM", dict(_DECODER, sliding_window=4)),  # 9 tokens: the window binds
    "gemma3_text": ("Gemma3TextConfig", "Gemma3ForCausalLM", dict(_DECODER, sliding_window=4)),
    "mistral": ("MistralConfig", "MistralForCausalLM", _DECODER),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", _DECODER),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", _DECODER),
    "phi": ("PhiConfig", "PhiForCausalLM", dict(_TINY, intermediate_size=128)),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", _DECODER),
    "opt": ("OPTConfig", "OPTForCausalLM", _OPT),
    "opt_350m_style": ("OPTConfig", "OPTForCausalLM", dict(_OPT, word_embed_proj_dim=32, do_layer_norm_before=False)),
}
# OPT with a final norm *and* a project_out after it: the one family where a module the hook does not name
# (the norm) sits between the last block and the hooked module
OPT_NORM_THEN_PROJECTION = ("OPTConfig", "OPTForCausalLM", dict(_OPT, word_embed_proj_dim=32))


def _tiny_model(arch: str, n_layers: int):
    if arch in CAUSAL_ARCHS:
        return tiny_causal(arch, n_layers=n_layers)
    import transformers

    config_name, model_name, kwargs = MORE_CAUSAL_FAMILIES.get(arch) or OPT_NORM_THEN_PROJECTION
    torch.manual_seed(0)
    config = getattr(transformers, config_name)(num_hidden_layers=n_layers, **kwargs)
    return getattr(transformers, model_name)(config).eval()


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + tuple(MORE_CAUSAL_FAMILIES))
def test_hook_equals_hidden_states_for_causal_architectures(arch):
    model = _tiny_model(arch, n_layers=3)
    assert model.config.model_type in models.ARCHITECTURES
    ids = torch.randint(4, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    # OPT's hidden_states[0] is token + position embeddings summed in the decoder's forward: no module outputs it
    unhookable = (0,) if model.config.model_type == "opt" else ()
    _assert_hooks_match_hidden_states(model, {"input_ids": ids, "attention_mask": mask}, unhookable)


@pytest.mark.parametrize("arch", CAUSAL_ARCHS + tuple(MORE_CAUSAL_FAMILIES) + ("opt_norm_then_projection",))
def test_a_prefix_cache_replays_every_layer_of_every_family_bit_for_bit(arch):
    model = _tiny_model(arch, n_layers=3)
    ids = torch.randint(4, 64, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask, "use_cache": False}
    first_layer = 1 if model.config.model_type == "opt" else 0
    for layer in range(first_layer, model.config.num_hidden_layers + 1):
        prefix = PrefixCache()
        blocks, hooked = models.prefix_modules(model, layer)
        assert models.hook_module(model, layer) is hooked and len(blocks) == layer
        calls, handles = count_forwards_below(model, layer)
        for n, factor in enumerate((1.0, 1.5, -0.5, 1.0)):  # the first pass records, the others replay
            with torch.inference_mode(), splice(model, layer, lambda h, factor=factor: h * factor) as state:
                state["mask"] = mask.bool()
                computed = model(**inputs).logits
                before = calls[0]
                with prefix.forward(model, layer, "batch", ids):
                    replayed = model(**inputs).logits
            assert torch.equal(replayed, computed), (layer, factor)
            assert (calls[0] > before) == (n == 0 and layer > 0), layer  # the blocks below run once
        for handle in handles:
            handle.remove()


def test_gemma_layer_0_is_the_embedding_scaled_by_sqrt_d():
    # Gemma multiplies embeddings by sqrt(hidden_size); in transformers 5 its embed_tokens module does it, so the
    # hooked layer 0 must carry the scale (a plain lookup would be 8x too small here)
    model = _tiny_model("gemma2", n_layers=2)
    ids = torch.randint(4, 64, (1, 5))
    with torch.inference_mode():
        layer_0 = models.forward_to_layer(model, 0, input_ids=ids)
        lookup = torch.nn.functional.embedding(ids, model.model.embed_tokens.weight)
    assert torch.allclose(layer_0, lookup * 64**0.5) and not torch.allclose(layer_0, lookup)


def test_opt_final_layer_is_project_out_when_there_is_one():
    pre_ln, post_ln_projected = _tiny_model("opt", n_layers=2), _tiny_model("opt_350m_style", n_layers=2)
    assert models.hook_module(pre_ln, 2) is pre_ln.model.decoder.final_layer_norm
    assert models.hook_module(post_ln_projected, 2) is post_ln_projected.model.decoder.project_out
    assert models.hook_module(post_ln_projected, 1) is post_ln_projected.model.decoder.layers[0]


def test_the_store_width_of_a_layer_is_the_width_of_its_hidden_state():
    """OPT-350m's last layer is projected to word_embed_proj_dim: the store must take that width, not d_model."""
    for arch, last_width in (("opt", 64), ("opt_350m_style", 32)):
        loaded = models.LoadedModel(_tiny_model(arch, n_layers=2), None, arch, arch, True)
        ids = torch.randint(4, 64, (1, 5))
        with torch.inference_mode():
            last = loaded.model(input_ids=ids, output_hidden_states=True).hidden_states[2]
        assert loaded.layer_width(2) == last.shape[-1] == last_width and loaded.layer_width(1) == loaded.d_model


def test_unsupported_architecture_names_the_supported_ones():
    import transformers

    model = transformers.GPTJForCausalLM(
        transformers.GPTJConfig(n_layer=1, n_embd=32, n_head=4, rotary_dim=8, vocab_size=64)
    )
    with pytest.raises(NotImplementedError, match="no layer mapping for model_type 'gptj'.*'gemma2'"):
        models.hook_module(model, 1)


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
    with pytest.raises(FileNotFoundError, match="does not exist.*'embedded'.*export FEATINT_MODEL="):
        models.load_model(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="no config.json"):
        models.load_model(str(tmp_path))


def test_local_causal_model_directory_loads_with_lm_head(causal_dir):
    loaded = models.load_model(str(causal_dir))
    assert loaded.is_causal_lm
    assert loaded.model.get_output_embeddings() is not None


@pytest.fixture
def hub_offline(monkeypatch):
    """The Hub as HF_HUB_OFFLINE=1 leaves it: fast and deterministic. huggingface_hub reads the variable at import,
    so its constant is set too."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_hub_model_that_cannot_be_reached_names_featint_model(hub_offline):
    # a name no cache holds, so the Hub is the only place it could come from
    with pytest.raises(OSError) as info:
        models.load_model("featint-tests/uncached-model")
    message = str(info.value)
    assert message.startswith("could not load model 'featint-tests/uncached-model' from the Hugging Face Hub: ")
    assert "the Hub cannot be reached (HF_HUB_OFFLINE is set)" in message
    assert "`export FEATINT_MODEL=/path/to/uncached-model`" in message
    assert "hf download featint-tests/uncached-model" in message
    assert models.hub_unreachable(info.value)  # the libraries' own error is kept as the cause


def test_other_hub_model_failures_say_what_failed_and_name_featint_model():
    not_found = OSError("gpt3 is not a local folder and is not a valid model identifier\nmore detail")
    message = str(models._hub_model_error("gpt3", not_found))
    assert "could not load model 'gpt3' from the Hugging Face Hub: OSError: gpt3 is not a local folder" in message
    assert "more detail" not in message and "export FEATINT_MODEL=/path/to/gpt3" in message
    assert not models.hub_unreachable(not_found)
    wrapped = OSError("couldn't connect")
    wrapped.__cause__ = ConnectionError("no route")
    assert models.hub_unreachable(wrapped)


def test_a_tokenizer_loads_alone_from_the_same_names_as_a_model(tmp_path):
    tokenizer = models.load_tokenizer("embedded")
    assert tokenizer("however")["input_ids"] == models.load_model("embedded").tokenizer("however")["input_ids"]
    with pytest.raises(FileNotFoundError, match="FEATINT_MODEL"):
        models.load_tokenizer(str(tmp_path / "missing"))
