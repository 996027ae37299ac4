"""Calibration, power and absorption of the interaction estimator on planted data (heavier than the tests).

1. **Null calibration**: ``--nulls`` residuals with no pairwise structure (``featint_utils.residual.planted.codes``);
   for the nested NFM and the explicit-pairs ridge, the rate at which the 95% interval lies above zero (false
   positives) and the rate at which it covers zero.
2. **Power and bias**: one residual with planted interactions of several sizes (``interaction.run``), each
   estimator's recovered share against the oracle's (a ridge that knows the planted pairs).
3. **Absorption**: the issue's generator, ``x = s D + sum s_a s_b u_ab + noise`` (d=64, 512 features, k=8) with the
   interaction worth 0%, 1%, 3% and 10% of x's variance, through the ``activations:`` path; an SAE trained on each;
   the absorbed fraction against the 0% SAE, the residual's own interaction share, and conjunction latents.

Writes ``benchmarks/results/interaction_calibration.json``. About 6 minutes on 2 cores with the defaults.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from featint_utils.data.extraction import store_from_npz
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.residual import absorption, interaction, interaction_results, planted
from featint_utils.residual.code_data import build_residual_data, split_fit_tune_test
from featint_utils.residual.nfm import NFMConfig
from featint_utils.residual.nfm_training import FitConfig

RESULTS = Path(__file__).parent / "results" / "interaction_calibration.json"


def estimator_config(n_latents: int, d: int, seeds=(0,), max_epochs: int = 40) -> interaction.EstimatorConfig:
    return interaction.EstimatorConfig(
        NFMConfig(n_latents, d, k_embed=16),
        FitConfig(batch_size=512, max_epochs=max_epochs),
        seeds=seeds,
        lr_grid=(3e-3,),
        n_pairs=256,
        n_boot=1000,
    )


def null_calibration(n_nulls: int, work: Path) -> dict:
    rows = []
    for replicate in range(n_nulls):
        data = planted.codes(12_000, n_latents=64, k=8, d=16, seed=1_000 + replicate)
        sets = split_fit_tune_test(data, 0.15, 0.3, seed=replicate)
        estimator = interaction.Estimator(sets, estimator_config(64, 16, max_epochs=20), work / f"null{replicate}")
        estimator.fit_target(interaction.RESIDUAL, sets, ("pair_ridge", "nfm"))
        estimator.save()
        (work / f"null{replicate}" / "planted.json").write_text("{}")
        results = interaction_results.Results(work / f"null{replicate}", n_boot=1000, seed=replicate)
        rows.append({name: results.share(interaction.RESIDUAL, name) for name in interaction.ESTIMATORS})
    out = {}
    for name in interaction.ESTIMATORS:
        low = np.array([r[name]["ci_low"] for r in rows])
        high = np.array([r[name]["ci_high"] for r in rows])
        mean = np.array([r[name]["mean"] for r in rows])
        covered = (low <= 0) & (high >= 0)
        out[name] = {
            "false_positive_rate": float((low > 0).mean()),
            "coverage_of_zero": float(covered.mean()),
            "mean_share": float(mean.mean()),
            "sd_share": float(mean.std(ddof=1)),
        }
    return out | {"n_nulls": n_nulls}


def power_and_bias(work: Path, shares=(0.002, 0.005, 0.01, 0.02, 0.05)) -> list[dict]:
    data = planted.codes(60_000, n_latents=64, k=8, d=16, seed=4)
    sets = split_fit_tune_test(data, 0.15, 0.3, seed=4)
    interaction.run(sets, estimator_config(64, 16, seeds=(0, 1)), work / "power", power_shares=shares, n_planted=6)
    power = interaction_results.Results(work / "power", n_boot=1000).power()
    keep = [
        "nominal_share",
        "oracle",
        "over_linear",
        "over_linear_ci_low",
        "over_linear_ci_high",
        "pair_ridge",
        "pair_ridge_ci_low",
        "pair_ridge_ci_high",
        "over_linear_detected",
        "pair_ridge_detected",
    ]
    return [
        {k: (bool(v) if isinstance(v, np.bool_) else float(v)) for k, v in row.items()}
        for row in power[keep].to_dict("records")
    ]


def absorption_by_size(work: Path, shares=(0.0, 0.01, 0.03, 0.1)) -> list[dict]:
    """The issue's generator; every SAE has the same settings, seed and budget."""
    saes, rows = {}, []
    for share in shares:
        data = planted.activations(100_000, d=64, n_features=512, k=8, interaction_share=share, n_pairs=20)
        store = store_from_npz(
            f"activations:{data.save_npz(work / f'acts{share}.npz')}", work / f"store{share}", 0.3, seed=0
        )
        trainer = SAETrainer(
            store,
            1024,
            16,
            TrainConfig(train_tokens=3_000_000, batch_size=1024, lr=3e-3, dead_tokens=300_000),
            work / f"sae{share}",
        )
        saes[share] = (data, store, trainer.train())
    clean_data, clean_store, clean_sae = saes[0.0]
    for share in shares:
        data, store, sae = saes[share]
        val_rows = _val_rows(store, data)
        row = {"planted_share_of_x": share}
        if share > 0:  # the same rows without the interaction, through the SAE trained without it
            row["absorbed_fraction"] = absorption.absorbed_fraction(
                absorption.raw_residual(clean_sae, data.acts[val_rows] - data.interaction[val_rows]),
                absorption.raw_residual(sae, data.acts[val_rows]),
                data.interaction[val_rows],
            )
        residual = build_residual_data(sae, store, work / f"residuals{share}")
        sets = split_fit_tune_test(residual, 0.15, 0.3, seed=0)
        estimator = interaction.Estimator(sets, estimator_config(1024, 64, max_epochs=30), work / f"est{share}")
        estimator.fit_target(interaction.RESIDUAL, sets, ("pair_ridge", "nfm"))
        estimator.save()
        (work / f"est{share}" / "planted.json").write_text("{}")
        results = interaction_results.Results(work / f"est{share}", n_boot=1000)
        for name in interaction.ESTIMATORS:
            stats = results.share(interaction.RESIDUAL, name)
            row |= {f"residual_share.{name}": stats["mean"], f"residual_share.{name}.ci_low": stats["ci_low"]}
        table = absorption.conjunction_latents(store, sae, "val")
        flagged = torch.tensor(table.loc[table["conjunction"], "latent"].to_numpy(), dtype=torch.long)
        cosine = (
            torch.nn.functional.normalize(sae.W_dec.detach(), dim=1)[flagged]
            @ torch.from_numpy(data.directions.T).float()
        )
        row |= {
            "conjunction_latents": len(flagged),
            "conjunction_latents_on_surrogates": int(table["null_conjunction"].sum()),
            "firing_latents": len(table),
            "planted_directions_with_a_conjunction_latent": int((cosine.abs() >= 0.5).any(0).sum())
            if len(flagged)
            else 0,
            "n_planted_pairs": len(data.pairs),
        }
        rows.append(row)
    return rows


def _val_rows(store, data) -> np.ndarray:
    texts = store.texts().set_index("index")
    documents = [int(texts.loc[i, "group"]) for i in np.unique(store.tokens("val").text_index)]
    return np.concatenate([np.flatnonzero(data.doc == d) for d in documents])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nulls", type=int, default=100, help="null residuals for the calibration")
    args = parser.parse_args()
    torch.manual_seed(0)
    report = {}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for name, step in (
            ("null_calibration", lambda: null_calibration(args.nulls, work)),
            ("power_and_bias", lambda: power_and_bias(work)),
            ("absorption", lambda: absorption_by_size(work)),
        ):
            started = time.perf_counter()
            report[name] = step()
            report[f"{name}_seconds"] = time.perf_counter() - started
            print(json.dumps({name: report[name]}, indent=1), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
