"""What a finished run on a planted model (:mod:`featint_utils.data.planted_model`) found, against the truth.

:func:`score_run` reads a run's artifacts and the planted model it was made from, and measures each stage
on the model's own stimulus set (what 05 and 06 measure):

* **01**: the primary latents nearest the formality, emotion and integration directions (decoder cosine),
  and how much of the planted integration ``I`` the SAE's reconstruction takes (``absorbed``: ``1 - sum <e,
  I> / sum ||I||^2`` over the stimuli's tokens, ``e`` the SAE's residual);
* **02**: how much of what the residual keeps of it the NFM predicts (``nfm_recovered``: ``sum <NFM, I> / sum
  <e, I>``);
* **04**: the NFM's *image* of the 2x2, its hidden vector's interaction contrast over the four conditions
  (token means, FE - FN - CE + CN), and the secondary latent whose decoder direction is nearest it (cosine;
  its rank among the secondary latents by 05's interaction effect size);
* **05**: whether that latent is flagged interaction-selective, and how many of each family are (for the
  pre-activations, also how many of those flagged have an encoder direction at |cos| >= 0.3 to ``u_AB``);
  and, where 05 split each interaction on the additive counterfactual, the same for its layer-made part;
* **06**: the contrast of its clamp at every level (when it was clamped), beside the oracle: the contrast of
  the same readout when the planted integration itself is removed (:func:`oracle_contrast`); and, where 06
  split each clamp's effect on the additive counterfactual, the layer's own layer-made contrast, how many
  secondary, random and linear-path conditions have a layer-made part, and how many secondary ones exceed
  their random control's.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from ..data import planted_model
from ..data.activation_store import ActivationStore
from ..data.corpus import CONDITIONS
from ..data.models import forward_to_layer, mean_pool
from ..integration.clamping import encoder_readout, leave_item_out_centroids
from ..stats import CONTRASTS
from .run import Run


@torch.no_grad()
def readout_embeddings(
    spec: planted_model.PlantedSpec, texts: list[str], integration: float | None = None
) -> torch.Tensor:
    """Mean-pooled outputs of ``texts`` (the encoder readout's embeddings) of the model with its integration
    set to ``integration`` (None: the spec's)."""
    model = planted_model.PlantedModel(
        dataclasses.replace(spec, integration=spec.integration if integration is None else integration)
    )
    tokenizer = planted_model.tokenizer_for(spec)
    inputs = tokenizer(texts, return_tensors="pt", padding=True)
    hidden = model.eval()(inputs["input_ids"], inputs["attention_mask"]).last_hidden_state
    return mean_pool(hidden, inputs["attention_mask"])


def oracle_contrast(spec: planted_model.PlantedSpec, stimuli: pd.DataFrame, scale: float) -> np.ndarray:
    """Per item, the interaction contrast of the encoder readout's change when the planted integration is
    multiplied by ``scale`` (0: removed), the readout's centroids those of the unchanged model: what a clamp
    that did exactly that to ``u_AB`` would measure in stage 06."""
    texts = stimuli["text"].tolist()
    clean = readout_embeddings(spec, texts)
    centroids = leave_item_out_centroids(clean, stimuli)
    edited = readout_embeddings(spec, texts, spec.integration * scale)
    change = encoder_readout(edited, centroids, stimuli) - encoder_readout(clean, centroids, stimuli)
    return change @ CONTRASTS["interaction"]


@torch.no_grad()
def _layer_tokens(spec: planted_model.PlantedSpec, stimuli: pd.DataFrame, integration: float):
    """Layer-1 activations of every real token of the stimuli, and each token's condition index."""
    model = planted_model.PlantedModel(dataclasses.replace(spec, integration=integration)).eval()
    inputs = planted_model.tokenizer_for(spec)(stimuli["text"].tolist(), return_tensors="pt", padding=True)
    hidden = forward_to_layer(model, planted_model.LAYER, **inputs)
    keep = inputs["attention_mask"].bool() & (inputs["input_ids"] >= len(planted_model.SPECIALS))
    condition = torch.tensor(stimuli["condition"].map({c: i for i, c in enumerate(CONDITIONS)}).to_numpy())
    return hidden[keep], condition[:, None].expand_as(keep)[keep]


def _contrast(values: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
    """Interaction contrast (FE - FN - CE + CN) of per-condition token means of ``values`` [tokens, ...]."""
    means = torch.stack([values[condition == c].mean(0) for c in range(len(CONDITIONS))])
    return torch.tensordot(torch.tensor(CONTRASTS["interaction"], dtype=means.dtype), means, 1)


def _cosines(rows: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
    return F.normalize(rows.double(), dim=1) @ F.normalize(direction.double(), dim=0)


@torch.no_grad()
def score_run(run_dir: str | Path, nfm_seed: int = 0, fdr_q: float = 0.05) -> dict:
    """Every stage of a finished planted run against the truth (see the module docstring)."""
    run = Run(run_dir)
    store = ActivationStore(run.store_dir)
    name = store.manifest["model"]
    if not name.startswith(planted_model.PREFIX):
        raise ValueError(f"the run at {str(run_dir)!r} is of model {name!r}, not a planted model")
    spec = planted_model.PlantedSpec.parse(name)
    truth = planted_model.truth(spec)
    stimuli = planted_model.stimuli_for(spec)
    decomposition = run.decomposition(nfm_seed)
    primary, nfm, secondary = decomposition.primary, decomposition.nfm, decomposition.secondary
    scale = primary.cfg.input_scale
    out: dict = {"model": spec.name, "integration": spec.integration}

    unit = F.normalize(primary.W_dec.detach().double(), dim=1)
    for label, direction in (
        ("formality", truth.formality),
        ("emotion", truth.emotion),
        ("integration", truth.integration_direction),
    ):
        cosine = unit @ torch.from_numpy(direction)
        out[f"primary.{label}_latent"] = int(cosine.argmax())
        out[f"primary.{label}_cosine"] = float(cosine.max())

    x, condition = _layer_tokens(spec, stimuli, spec.integration)
    x_without, _ = _layer_tokens(spec, stimuli, 0.0)
    planted = (x - x_without).double()  # the integration term of every token (zero outside FE texts)
    code = decomposition.primary_code(x)
    if spec.integration > 0:
        size = float(planted.square().sum())
        in_residual = float((primary.residual_raw(x).double() * planted).sum())
        out["absorbed"] = 1 - in_residual / size  # what the SAE's reconstruction takes of it
        predicted = (nfm(*code).output / scale).double()
        out["nfm_recovered"] = float((predicted * planted).sum()) / in_residual if in_residual > 0 else None

    image = _contrast(nfm(*code).hidden_pre.double(), condition)
    out["nfm_image_norm"] = float(image.norm())
    sec_cosine = _cosines(secondary.W_dec.detach(), image)
    aligned = int(sec_cosine.argmax())
    out["secondary.aligned_latent"] = aligned
    out["secondary.aligned_cosine"] = float(sec_cosine[aligned])

    effects = {family: run.feature_effects(nfm_seed, family) for family in ("primary", "primary_pre", "secondary")}
    for family, table in effects.items():
        out[f"{family}.flagged"] = int((table["interaction_q"] < fdr_q).sum())
    ranked = effects["secondary"].sort_values("interaction_eta2", ascending=False)["feature"].tolist()
    row = effects["secondary"].set_index("feature").loc[aligned]
    out["secondary.aligned_rank"] = ranked.index(aligned) + 1
    out["secondary.aligned_q"] = float(row["interaction_q"])
    out["secondary.aligned_flagged"] = bool(row["interaction_q"] < fdr_q)
    out["secondary.aligned_effect"] = float(row["interaction_effect"])
    # the primary features whose encoder direction reads the integration: the layer's own non-additive part
    reads = _cosines(primary.W_enc.detach(), torch.from_numpy(truth.integration_direction)).abs()
    pre = effects["primary_pre"].set_index("feature")
    flagged_pre = pre.index[pre["interaction_q"] < fdr_q].to_numpy()
    out["primary_pre.flagged_reading_integration"] = int((reads[torch.tensor(flagged_pre)] >= 0.3).sum())
    if "layer_made_q" in pre:  # 05 split each interaction on the additive counterfactual (minimal pairs)
        for family, table in effects.items():
            out[f"{family}.layer_made_flagged"] = int((table["layer_made_q"] < fdr_q).sum())
        layer_made_pre = pre.index[pre["layer_made_q"] < fdr_q].to_numpy()
        out["primary_pre.layer_made_reading_integration"] = int((reads[torch.tensor(layer_made_pre)] >= 0.3).sum())
        out["secondary.aligned_layer_made_flagged"] = bool(row["layer_made_q"] < fdr_q)
        out["secondary.aligned_layer_made_effect"] = float(row["layer_made_effect"])
        out["secondary.aligned_instrument_made_effect"] = float(row["instrument_made_effect"])

    statistics = pd.read_csv(run.clamping_table(nfm_seed, "statistics"))
    clamped = statistics[statistics["condition"].str.startswith("secondary ")]
    out["clamp.significant_secondary"] = int((clamped["holm_p"] < fdr_q).sum())
    if "vs_control_holm_p" in clamped:
        out["clamp.beats_random"] = int((clamped["vs_control_holm_p"] < fdr_q).sum())
    mine = clamped[clamped["condition"].str.startswith(f"secondary {aligned} @")]
    out["clamp.aligned_clamped"] = bool(len(mine))
    for r in mine.itertuples():
        level = r.condition.split("@")[1].strip()
        out[f"clamp.aligned_{level}"] = float(r.interaction_contrast)
        out[f"clamp.aligned_{level}_ci"] = [float(r.ci_low), float(r.ci_high)]
    layer_made_path = run.clamping_table(nfm_seed, "layer_made")
    if layer_made_path.exists():  # 06 split each clamp's effect on the additive counterfactual (minimal pairs)
        made = pd.read_csv(layer_made_path)
        own = made.iloc[0]
        out["clamp.layer_made_own"] = float(own["interaction_contrast"])
        out["clamp.layer_made_own_p"] = float(own["sign_flip_p"])
        for kind in ("secondary", "random", "linear"):
            rows = made[made["condition"].str.startswith(kind)]
            out[f"clamp.layer_made_{kind}"] = int((rows["holm_p"] < fdr_q).sum())
        out["clamp.layer_made_beats_random"] = int((made["vs_control_holm_p"] < fdr_q).sum())
        ablated = made[made["condition"].str.match(r"secondary \d+ @ ablated")]
        out["clamp.ablated_share_of_own"] = {  # per clamped feature: -1, the layer's whole effect goes through it
            r.condition.split()[1]: float(r.share_of_own) for r in ablated.itertuples()
        }
        for r in made[made["condition"].str.startswith(f"secondary {aligned} @")].itertuples():
            level = r.condition.split("@")[1].strip()
            out[f"clamp.aligned_layer_made_{level}"] = float(r.interaction_contrast)
            out[f"clamp.aligned_layer_made_{level}_beats_random"] = bool(r.vs_control_holm_p < fdr_q)
    if spec.integration > 0:
        oracle = oracle_contrast(spec, stimuli, 0.0)
        out["oracle.removed"] = float(oracle.mean())
        out["oracle.removed_se"] = float(oracle.std(ddof=1) / np.sqrt(len(oracle)))
    return out
