"""One rank of the NFM stage's data-parallel fits, started by the tests with ``torchrun`` (gloo on CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_nfm_worker.py {nfm,ladder,ladder-ddp} OUT``:
``nfm`` trains one nested NFM on a residual with a planted interaction into OUT; ``ladder`` runs the whole
estimator (:func:`featint_utils.residual.interaction.run`) into OUT, its later targets dealt to the ranks, and
``ladder-ddp`` with every model data-parallel instead. The tests run the same with one process and compare.
"""

import argparse
from dataclasses import replace
from pathlib import Path

import numpy as np

from featint_utils.data import distributed
from featint_utils.residual import interaction, planted, targets
from featint_utils.residual.baselines import SparseDesign, cofiring_pairs, fit_ridge
from featint_utils.residual.code_data import split_fit_tune_test
from featint_utils.residual.nfm import NFM, NFMConfig
from featint_utils.residual.nfm_training import FitConfig, ResidualTrainer

N_LATENTS, D_OUT = 64, 16
NFM_SHAPE = NFMConfig(N_LATENTS, D_OUT, k_embed=16, dropout=0.0)  # no dropout: the ranks' draws would differ
FIT = FitConfig(batch_size=512, lr=3e-3, max_epochs=5, checkpoint_seconds=0.0)  # a checkpoint every epoch


def residual_sets():
    """fit / tune / test of a planted code and residual (no pairwise structure of its own)."""
    return split_fit_tune_test(planted.codes(8_000, n_latents=N_LATENTS, k=8, d=D_OUT, seed=3), 0.15, 0.3, seed=3)


def nested_nfm_trainer(out: str, dist=distributed.SINGLE, batch_size: int = FIT.batch_size) -> ResidualTrainer:
    """A nested NFM (started as the code ridge) on the residual plus a planted interaction: there is a
    pairwise term to learn, so training moves the model."""
    sets = residual_sets()
    design = SparseDesign(sets["fit"], cofiring_pairs(sets["fit"], 128))
    ridge = fit_ridge(sets["fit"], sets["tune"], design=design)
    pairs = targets.plant_pairs(sets["fit"], 0.2, design, ridge.penalty, 6, seed=0)
    sets = {name: data.with_target(targets.AddPlanted(data, pairs)) for name, data in sets.items()}
    ridge = fit_ridge(sets["fit"], sets["tune"], design=design)
    sample = sets["fit"].batch(np.arange(2_048))
    model = NFM(NFM_SHAPE, seed=0).start_from(ridge.weight, ridge.bias)
    model.calibrate(sample.values, sample.indices, target_rms=float(sample.target.std()))
    return ResidualTrainer(model, sets["fit"], sets["tune"], replace(FIT, batch_size=batch_size), out, dist)


def ladder(out: str, dist=distributed.SINGLE, deal: bool | None = None) -> interaction.Ladder:
    cfg = interaction.EstimatorConfig(
        NFM_SHAPE, FitConfig(batch_size=512, max_epochs=4), seeds=(0,), lr_grid=(3e-3,), n_pairs=128, n_boot=200
    )
    return interaction.run(residual_sets(), cfg, out, power_shares=(0.05,), n_planted=4, dist=dist, deal=deal)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("what", choices=("nfm", "ladder", "ladder-ddp"))
    parser.add_argument("out")
    args = parser.parse_args()
    dist = distributed.init("cpu")
    if args.what == "nfm":
        model = nested_nfm_trainer(args.out, dist).train()
        if dist.is_main:
            model.save(Path(args.out) / "model")
    else:
        ladder(args.out, dist, deal=args.what == "ladder")
    distributed.shutdown()


if __name__ == "__main__":
    main()
