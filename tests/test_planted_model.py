"""The planted model: the interface of a loaded encoder (layer mapping, hooks, splice, readouts), its stimulus
set, and its ground truth (the integration is where and as large as it is planted; the oracle readout)."""

import dataclasses

import numpy as np
import pytest
import torch

from featint_utils.data import models, planted_model
from featint_utils.data.corpus import CONDITIONS, load_corpus
from featint_utils.data.planted_model import PlantedSpec
from featint_utils.integration import clamping
from featint_utils.workbench import planted_truth, stages
from tests.test_clamping import decomposition

NAME = "planted:seed=3,integration=0.5,n_items=12"


@pytest.fixture(scope="module")
def loaded():
    return models.load_model(NAME)


def test_a_spec_reads_back_from_its_name_and_bad_specs_are_clear_errors():
    spec = PlantedSpec.parse(NAME)
    assert (spec.seed, spec.integration, spec.n_items) == (3, 0.5, 12)
    assert PlantedSpec.parse(spec.name) == spec and models.model_source(NAME) == spec.name
    with pytest.raises(ValueError, match="unknown planted-model setting 'integrtion'"):
        PlantedSpec.parse("planted:integrtion=1")
    with pytest.raises(ValueError, match="seed='x' is not a number"):
        PlantedSpec.parse("planted:seed=x")
    with pytest.raises(ValueError, match="needs integration >= 0"):
        PlantedSpec.parse("planted:integration=-1")


def test_the_hooks_read_and_replace_hidden_states_of_the_planted_model(loaded):
    assert (loaded.n_layers, loaded.d_model, loaded.is_causal_lm) == (2, 64, False)
    inputs = loaded.tokenizer(loaded.stimuli["text"].tolist()[:8], return_tensors="pt", padding=True)
    with torch.no_grad():
        states = loaded.model(**inputs, output_hidden_states=True).hidden_states
        for layer in range(3):
            torch.testing.assert_close(models.forward_to_layer(loaded.model, layer, **inputs), states[layer])
    assert models.hook_name(loaded.model, 1) == "layers.0"
    dec = decomposition(loaded.d_model, scale=0.5)
    clean = clamping.pooled_embeddings(loaded, 1, loaded.stimuli["text"].tolist()[:8])
    spliced = clamping.pooled_embeddings(loaded, 1, loaded.stimuli["text"].tolist()[:8], dec)
    assert (spliced - clean).abs().max() <= 1e-5  # the splice with no clamp is the model


def test_the_stimuli_are_minimal_pairs_that_switch_the_two_markers(loaded):
    stimuli = loaded.stimuli
    assert len(stimuli) == 48
    assert all(sorted(group) == sorted(CONDITIONS) for _, group in stimuli.groupby("item_id")["condition"])
    for _, item in stimuli.groupby("item_id"):
        words = {r.condition: r.text.split() for r in item.itertuples()}
        fe, fn, ce = words["formal_emotional"], words["formal_neutral"], words["casual_emotional"]
        assert sum(a != b for a, b in zip(fe, fn)) == 1 and sum(a != b for a, b in zip(fe, ce)) == 1
        assert any(w.startswith("formal") for w in fe) and any(w.startswith("emotional") for w in fe)
    texts = load_corpus("stimuli", stimuli=stimuli)  # the planted model's corpus is its stimulus set
    assert [t.text for t in texts] == stimuli["text"].tolist() and texts[0].group == stimuli["item_id"].iloc[0]
    assert stages.stimuli(loaded, max_items=2)["item_id"].nunique() == 2


def test_the_integration_is_a_b_times_its_size_along_its_direction_in_formal_emotional_texts_only():
    spec = PlantedSpec.parse(NAME)
    truth = planted_model.truth(spec)
    stimuli = planted_model.stimuli_for(spec)
    tokenizer = planted_model.tokenizer_for(spec)
    inputs = tokenizer(stimuli["text"].tolist(), return_tensors="pt", padding=True)
    with torch.no_grad():
        with_it = planted_model.PlantedModel(spec)(**inputs, output_hidden_states=True).hidden_states[1]
        without = planted_model.PlantedModel(dataclasses.replace(spec, integration=0.0))(
            **inputs, output_hidden_states=True
        ).hidden_states[1]
    for row, r in enumerate(stimuli.itertuples()):
        a = max((truth.intensity.get(w, 0.0) for w in r.text.split() if w.startswith("formal")), default=0.0)
        b = max((truth.intensity.get(w, 0.0) for w in r.text.split() if w.startswith("emotional")), default=0.0)
        expected = 0.5 * a * b * torch.from_numpy(truth.integration_direction).float()
        real = inputs["attention_mask"][row].bool()
        difference = (with_it - without)[row, real]
        torch.testing.assert_close(difference, expected.expand_as(difference), atol=1e-6, rtol=1e-5)
        assert (r.condition == "formal_emotional") == bool(expected.norm() > 0)


def test_the_oracle_contrast_is_zero_for_the_model_itself_and_negative_without_its_integration():
    spec = PlantedSpec.parse(NAME)
    stimuli = planted_model.stimuli_for(spec)
    assert np.abs(planted_truth.oracle_contrast(spec, stimuli, 1.0)).max() == 0.0
    removed = planted_truth.oracle_contrast(spec, stimuli, 0.0)
    # the formal-emotional text moves away from its own centroid, which holds the integration direction
    assert len(removed) == 12 and (removed < 0).all()
    assert np.abs(planted_truth.oracle_contrast(dataclasses.replace(spec, integration=0.0), stimuli, 0.0)).max() == 0


@pytest.mark.parametrize("integration", [0.0, 0.5])
def test_pre_activations_are_non_additive_exactly_where_the_layer_is(integration):
    """Stage 05's primary_pre family reads the layer along each encoder direction: on the planted model, its
    per-text mean's interaction contrast (FE - FN - CE + CN) is s * integration * a * b * (W_enc u) for every
    item and feature (s the SAE's input scale), so exactly 0 with no integration, whatever the SAE."""
    from featint_utils.dictionary.sae import SAEConfig, TopKSAE
    from featint_utils.integration import identification
    from featint_utils.residual.decomposition import Decomposition

    spec = dataclasses.replace(PlantedSpec.parse(NAME), integration=integration)
    loaded = models.load_model(spec.name)
    sae = TopKSAE(SAEConfig(d_in=64, n_latents=32, k=4, input_scale=0.7), seed=1)
    with torch.no_grad():
        sae.b_dec.normal_()
        sae.b_enc.normal_()
    code = Decomposition(sae).primary_pre_activation
    stimuli = loaded.stimuli
    per_text = identification.text_activations(loaded, 1, stimuli["text"].tolist(), {"pre": (code, 32)})
    cells, items = identification.cells(per_text["pre"]["mean"], stimuli)
    contrast = np.einsum("c,icf->if", [1, -1, -1, 1], cells)  # CONDITIONS order: FE, FN, CE, CN
    truth = planted_model.truth(spec)
    fe = stimuli[stimuli["condition"] == "formal_emotional"].set_index("item_id").loc[items, "text"]
    a_b = np.array([np.prod([truth.intensity[w] for w in text.split() if w in truth.intensity]) for text in fe])
    reads = sae.W_enc.detach().double().numpy() @ truth.integration_direction  # [32]
    expected = 0.7 * integration * a_b[:, None] * reads[None, :]
    # float32 token means of pre-activations of size ~10: rounding of order 1e-6 each
    np.testing.assert_allclose(contrast, expected, atol=1e-4, rtol=0)
    assert (np.abs(expected).max() > 0.1) == (integration > 0)  # the non-null case has something to find


def test_each_text_has_its_own_context_whatever_its_batch_and_the_variants_of_an_item_differ():
    spec = dataclasses.replace(PlantedSpec.parse(NAME), noise=0.5)
    assert PlantedSpec.parse(spec.name).noise == 0.5
    with pytest.raises(ValueError, match="noise >= 0"):
        PlantedSpec.parse("planted:noise=-1")
    tokenizer = planted_model.tokenizer_for(spec)
    texts = planted_model.stimuli_for(spec)["text"].tolist()[:8]  # two items, four variants each

    def layer(model_spec, batch):
        inputs = tokenizer(batch, return_tensors="pt", padding=True)
        with torch.no_grad():
            hidden = planted_model.PlantedModel(model_spec)(**inputs, output_hidden_states=True).hidden_states[1]
        return [h[m.bool()] for h, m in zip(hidden, inputs["attention_mask"])]

    noisy, clean = layer(spec, texts), layer(dataclasses.replace(spec, noise=0.0), texts)
    context = torch.stack([(n - c)[0] for n, c in zip(noisy, clean)])  # [8, d]
    for n, c, ctx in zip(noisy, clean, context):  # the same vector at every token of the text
        torch.testing.assert_close(n - c, ctx.expand_as(n), atol=1e-6, rtol=0)
    alone = layer(spec, [texts[5]])[0]  # unpadded, alone: the same as in its padded batch
    torch.testing.assert_close(alone, noisy[5], atol=0, rtol=0)
    norms = context.norm(dim=1)
    assert 0.3 < float(norms.min()) and float(norms.max()) < 0.7  # 0.5 * (chi_64 / 8): 0.5 +- 0.045
    cosines = torch.nn.functional.normalize(context, dim=1) @ torch.nn.functional.normalize(context, dim=1).T
    assert float((cosines - torch.eye(8)).abs().max()) < 0.6  # independent draws in 64 dimensions
