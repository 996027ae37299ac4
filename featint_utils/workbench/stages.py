"""The work of the stages that scale out over ranks: 00's extraction, 01's SAE training, 02's NFM ladder.

Each is one function of the run (its validated parameters) and the process's place in the job
(:mod:`featint_utils.data.distributed`). A notebook calls it as a single process; ``torchrun`` runs the same
function on every rank through ``python -m featint_utils stage NN`` (see :func:`run_stage`), and the notebook
run afterwards finds the finished store, SAE or ladder and goes on from there (a finished SAE is never
retrained, a verified store never re-extracted, a finished ladder read back).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import NamedTuple

import pandas as pd
import torch

from ..data import activation_store, distributed, extraction, models
from ..data.activation_store import ActivationStore
from ..data.corpus import MINIMAL_PAIRS_CSV, Split, first_items, load_corpus, load_stimuli, split_by_group
from ..data.distributed import Dist
from ..dictionary.sae import TopKSAE
from ..dictionary.sae_training import SAETrainer, TrainConfig
from ..dictionary.saelens import locate_pretrained, pretrained_primary
from ..params import numbers, seeds
from ..residual import interaction
from ..residual.code_data import CodeData, build_residual_data, open_residual_data, save_sets, split_fit_tune_test
from ..residual.nfm import NFMConfig
from ..residual.nfm_training import FitConfig
from .run import Run

MODEL_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_language_model(run: Run, name: str, device: torch.device | str | None = None) -> models.LoadedModel:
    """The language model ``name`` on ``device`` (default: the run's), its weights in ``model_dtype``."""
    device = device or models.resolve_device(run.params["device"])
    return models.load_model(name, device=device, dtype=MODEL_DTYPES[run.params["model_dtype"]])


def stimuli(loaded: models.LoadedModel, max_items: int = 0, stimulus_set: str = "default") -> pd.DataFrame:
    """The stimulus set stages 05 and 06 measure, its first ``max_items`` items (0: all): with ``"default"``
    the model's own (a planted model's) or the project's, with ``"minimal_pairs"`` the project's token-aligned
    2x2s, else the stimulus CSV at that path."""
    if stimulus_set == "default":
        if loaded.stimuli is not None:
            return first_items(loaded.stimuli, max_items)
        return load_stimuli(max_items=max_items)
    return load_stimuli(MINIMAL_PAIRS_CSV if stimulus_set == "minimal_pairs" else stimulus_set, max_items)


class Built(NamedTuple):
    store: ActivationStore
    loaded: models.LoadedModel | None
    """None when the activations come from a file (``activations:PATH.npz``)."""
    split: Split | None


def build_store(run: Run, dist: Dist | None = None) -> Built:
    """Stage 00: the run's activation store, extracted (over the ranks of ``dist``; default: this process on
    the run's ``device``) or reused when a verified one of the same request is already there."""
    p = run.params
    dist = dist or distributed.init(p["device"])
    max_groups = p["max_groups"] or None
    if activation_store.is_activation_corpus(p["corpus"]):
        store = None
        if dist.is_main:
            store = extraction.store_from_npz(
                p["corpus"], run.store_dir, p["val_fraction"], p["split_seed"], max_groups=max_groups, dtype=p["dtype"]
            )
        dist.barrier()
        return Built(store or ActivationStore(run.store_dir), None, None)
    loaded = load_language_model(run, p["model"], dist.device)
    texts = load_corpus(
        p["corpus"], max_documents=max_groups if p["corpus"].startswith("hf:") else None, stimuli=loaded.stimuli
    )
    split = split_by_group(texts, p["val_fraction"], p["split_seed"], max_groups=max_groups)
    if dist.is_main:
        print(
            f"{loaded.name}: {loaded.model.config.model_type}, {loaded.n_layers} layers, d_model={loaded.d_model}, "
            f"{p['model_dtype']} on {dist.device}"
            + (f" (x{dist.world_size} ranks)" if dist.distributed else "")
            + f"; hooking {models.hook_name(loaded.model, p['layer'])} for hidden_states[{p['layer']}]"
        )
        print(f"{len(texts)} texts; {len(split.train)} train / {len(split.val)} validation texts")
    store = extraction.extract(
        loaded,
        split,
        p["layer"],
        run.store_dir,
        corpus=p["corpus"],
        context_tokens=p["context_tokens"],
        batch_size=p["batch_size"],
        dtype=p["dtype"],
        dist=dist,
    )
    return Built(store, loaded, split)


class PrimarySAE(NamedTuple):
    """Stage 01's result."""

    sae: TopKSAE
    history: pd.DataFrame
    """The training curve, one row per step (empty for an installed SAE)."""
    source: dict | None
    """For a published SAE installed instead of trained: its ``source`` and the ``sha256`` of its files."""


def train_primary_sae(run: Run, dist: Dist | None = None) -> PrimarySAE:
    """Stage 01: the primary SAE trained to its token budget (data-parallel over the ranks of ``dist``;
    default: this process on the run's ``device``), or the finished one of the same store and settings;
    resumes an interrupted training. With ``primary_sae`` set, the published SAE it names is installed
    instead, untrained, once checked against the store (:func:`featint_utils.dictionary.saelens.pretrained_primary`)."""
    p = run.params
    dist = dist or distributed.init(p["device"])
    if dist.is_main:
        run.store()  # rank 0 checks the store's checksums; the others then find them checked (cached)
    dist.barrier()
    store = run.store()
    if p["primary_sae"]:
        if dist.is_main:
            with tempfile.TemporaryDirectory() as scratch:
                directory, source = locate_pretrained(p["primary_sae"], Path(scratch))
                sae, provenance = pretrained_primary(directory, source, store)
                sae.save(run.begin_primary_sae(provenance) / "sae")
            print(
                f"installed {source} as the primary SAE ({sae.cfg.n_latents} latents, k={sae.cfg.k}, "
                f"{sae.cfg.extra['saelens_hook_name']} = hidden_states[{sae.cfg.layer}]): nothing trained"
            )
        dist.barrier()
        return PrimarySAE(run.primary_sae(), pd.DataFrame(), run.primary_sae_source())
    out_dir = run.begin_primary_sae() if dist.is_main else run.primary_dir
    dist.barrier()  # rank 0 has cleared a directory made from other inputs before any rank reads it
    config = TrainConfig(
        train_tokens=p["sae_train_tokens"],
        batch_size=p["sae_batch_size"],
        lr=p["sae_lr"],
        dead_tokens=p["sae_dead_tokens"],
        seed=p["sae_seed"],
    )
    trainer = SAETrainer(store, p["sae_latents"], p["sae_k"], config, out_dir, dist)
    trainer.train(resume=p["resume"], keep_optimizer=p["keep_checkpoints"])
    return PrimarySAE(trainer.sae, trainer.history_frame(), None)


def build_residual_sets(run: Run, dist: Dist | None = None) -> dict[str, CodeData]:
    """Stage 02's data: every held-out token's SAE code and residual (cached beside the run by rank 0, from
    the store and SAE of this run) split by document into fit / tune / test; the split is recorded."""
    p = run.params
    dist = dist or distributed.init(p["device"])
    if dist.is_main:
        run.store()  # checksums checked once, by rank 0 (see train_primary_sae)
    dist.barrier()
    sae = run.primary_sae().to(dist.device)  # refused if the store changed after the SAE was trained
    data = None
    if dist.is_main:
        run.begin_nfm_stage()
        data = build_residual_data(sae, run.store(), run.residuals_dir)
    dist.barrier()  # the cache is complete before the other ranks open it
    if data is None:
        data = open_residual_data(run.residuals_dir)
    sets = split_fit_tune_test(data, p["tune_fraction"], p["test_fraction"], p["nfm_split_seed"])
    if dist.is_main:
        save_sets(sets, run.sets_path)
    return sets


def estimator_config(run: Run, sets: dict[str, CodeData], device: torch.device | str) -> interaction.EstimatorConfig:
    """Stage 02's ladder settings, from the run's parameters and the data's shape."""
    p, fit = run.params, sets["fit"]
    return interaction.EstimatorConfig(
        nfm=NFMConfig(
            fit.n_latents,
            fit.d_out,
            k_embed=p["nfm_k_embed"],
            dropout=p["nfm_dropout"],
            batch_norm=p["nfm_batch_norm"],
            knots=p["nfm_knots"],
        ),
        fit=FitConfig(
            batch_size=p["nfm_batch_size"],
            weight_decay=p["nfm_weight_decay"],
            max_epochs=p["nfm_max_epochs"],
            patience=p["nfm_patience"],
            lr_decays=p["nfm_lr_decays"],
            keep_optimizer=p["keep_checkpoints"],
        ),
        seeds=seeds(p["nfm_seeds"]),
        lr_grid=numbers(p["nfm_lr_grid"]),
        n_pairs=p["pair_ridge_pairs"],
        device=str(device),
    )


def fit_ladder(run: Run, sets: dict[str, CodeData], dist: Dist | None = None) -> interaction.Ladder:
    """Stage 02's fits (:func:`featint_utils.residual.interaction.run`: the ladder, the null control, the planted
    interactions; over the ranks of ``dist``, the controls and planted sizes dealt to them), or the finished
    ones."""
    p = run.params
    dist = dist or distributed.init(p["device"])
    return interaction.run(
        sets,
        estimator_config(run, sets, dist.device),
        run.nfm_dir,
        power_shares=numbers(p["power_shares"]),
        n_planted=p["power_pairs"],
        resume=p["resume"],
        dist=dist,
    )


def nfm_ladder(run: Run, dist: Dist | None = None) -> interaction.Ladder:
    """Stage 02 as ranks run it: the residual sets, then the ladder."""
    return fit_ladder(run, build_residual_sets(run, dist), dist)


STAGE_WORK = {"00_activations": build_store, "01_primary_sae": train_primary_sae, "02_nfm": nfm_ladder}
SCALED = tuple(STAGE_WORK)  # the stages ``python -m featint_utils stage`` runs over ranks


def run_stage(stage: str, run_dir, values: dict) -> None:
    """Run the scaled part of ``stage`` on this rank (``torchrun`` starts one process per rank)."""
    if stage not in SCALED:
        raise ValueError(f"stage {stage} does not run over ranks; only {', '.join(SCALED)} do")
    dist = distributed.init(values["device"])
    done = False
    try:
        # rank 0 holds the run's lock for the job (unless the runner that started torchrun holds it)
        run = Run.open(run_dir, stage, values, lock=dist.is_main)
        try:
            STAGE_WORK[stage](run, dist)
            done = True
        finally:
            run.close()
    finally:
        distributed.shutdown(wait_for_peers=done)
