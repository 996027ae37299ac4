"""Does a first-order surrogate reproduce the interaction share an SAE makes in its own residual? (issue 26)

On the issue's additive generator (``featint_utils.residual.planted.activations`` with no interaction: k-sparse codes
over 512 unit directions in 64 dimensions plus small noise) an SAE's residual has a pairwise share above zero
that the layer does not have. A surrogate null would rebuild activations with the run's first-order structure
and no interaction by construction, put them through the same SAE training and the same estimator, and read
the SAE-made share off it. This measures, for several surrogate constructions, the share on the real
(additive) activations beside the share on the surrogate, and each SAE's held-out FVU:

* ``gauss<f>``: the primary SAE's reconstruction plus Gaussian noise with ``f`` times its residual's covariance;
* ``perm``: the primary SAE's reconstruction plus another token's residual (permuted within the split);
* ``k2``: the primary SAE's encoder at twice its k, decoded, plus noise matched to that reconstruction's error;
* ``wide<m>``: the reconstruction of a generator SAE with ``m`` times the latents (same k), plus matched noise.

A surrogate is usable only if, on additive data, its share matches the real one (then the excess covers zero).

Writes ``benchmarks/results/surrogate_null.json`` (one entry per surrogate, merged with earlier entries).
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import torch
from interaction_calibration import estimator_config

from featint_utils.data.extraction import derived_store, store_from_npz
from featint_utils.dictionary.metrics import evaluate_sae
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.residual import absorption, interaction, interaction_results, planted
from featint_utils.residual.code_data import build_residual_data, split_fit_tune_test

RESULTS = Path(__file__).parent / "results" / "surrogate_null.json"


def shares(store, name: str, cfg: TrainConfig, n_latents: int, k: int, work: Path):
    """An SAE trained on ``store`` and the estimator's two shares on its residual, with the SAE's FVU."""
    sae = SAETrainer(store, n_latents, k, cfg, work / f"sae_{name}").train()
    sets = split_fit_tune_test(build_residual_data(sae, store, work / f"residuals_{name}"), 0.15, 0.3, seed=0)
    out = work / f"estimator_{name}"
    estimator = interaction.Estimator(sets, estimator_config(n_latents, store.d_model, max_epochs=30), out)
    estimator.fit_target(interaction.RESIDUAL, sets, ("pair_ridge", "nfm"))
    estimator.save()
    (out / "planted.json").write_text("{}")
    results = interaction_results.Results(out, n_boot=1000)
    row = {name: results.share(interaction.RESIDUAL, name) for name in interaction.ESTIMATORS}
    return sae, row | {"sae_val_fvu": evaluate_sae(sae, store, "val")["fvu"]}


def matched_noise(reconstruct, train: np.ndarray, fraction: float, seed: int):
    """Gaussian noise with ``fraction`` times the covariance of ``train - reconstruct(train)``."""
    with torch.no_grad():
        error = train - reconstruct(torch.from_numpy(train)).numpy()
    chol = np.linalg.cholesky(np.cov(error.astype(np.float64), rowvar=False) + 1e-12 * np.eye(train.shape[1]))
    factor = torch.from_numpy(np.sqrt(fraction) * chol).float()
    generator = torch.Generator().manual_seed(seed)
    return lambda n: torch.randn(n, factor.shape[0], generator=generator) @ factor.T


def surrogate(kind: str, store, sae, cfg: TrainConfig, work: Path):
    """The transform of raw activations that makes ``kind``'s surrogate (see the module docstring); it may train
    a generator SAE, so it runs with gradients (the caller detaches what the transform returns)."""
    train = store.load("train")
    if kind.startswith("gauss"):
        reconstruct, fraction = sae.reconstruct_raw, float(kind[5:] or 1)
    elif kind == "k2":

        def reconstruct(x):
            z = x.float() * sae.cfg.input_scale
            values, indices = ((z - sae.b_dec) @ sae.W_enc.T + sae.b_enc).topk(2 * sae.cfg.k, dim=-1)
            return sae.decode(values.relu(), indices) / sae.cfg.input_scale

        fraction = 1.0
    elif kind.startswith("wide"):
        multiple = int(kind[4:])
        generator_cfg = replace(cfg, seed=cfg.seed + 1)
        wide = SAETrainer(store, multiple * sae.cfg.n_latents, sae.cfg.k, generator_cfg, work / "generator").train()
        reconstruct, fraction = wide.reconstruct_raw, 1.0
    elif kind == "perm":
        pools = {}
        for split, seed in (("train", 5), ("val", 6)):
            error = absorption.raw_residual(sae, store.load(split))
            pools[split] = torch.from_numpy(error[np.random.default_rng(seed).permutation(len(error))])
        position = {"train": 0, "val": 0}

        def transform(x):  # derived_store streams the train shards, then the val shards, in order
            split = "train" if position["train"] < len(pools["train"]) else "val"
            start = position[split]
            position[split] += len(x)
            return sae.reconstruct_raw(x) + pools[split][start : start + len(x)]

        return transform
    else:
        raise ValueError(f"unknown surrogate {kind!r}")
    noise = matched_noise(reconstruct, train, fraction, seed=123)
    return lambda x: reconstruct(x) + noise(len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("kinds", nargs="+", help="surrogates: gauss1, gauss0.3, gauss0, perm, k2, wide2, wide4")
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--train-tokens", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the planted activations")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surrogate_null"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(train_tokens=args.train_tokens, batch_size=1024, lr=3e-3, dead_tokens=300_000)
    work = args.work / f"seed{args.seed}_{args.tokens}_{args.train_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    data = planted.activations(args.tokens, d=64, n_features=512, k=8, interaction_share=0.0, seed=args.seed)
    store = store_from_npz(f"activations:{data.save_npz(work / 'acts.npz')}", work / "store", 0.3, seed=0)
    sae, real = shares(store, "real", cfg, 1024, 8, work)
    report = {}
    for kind in args.kinds:
        started = time.perf_counter()
        kind_dir = work / kind
        kind_dir.mkdir(exist_ok=True)
        transform = surrogate(kind, store, sae, cfg, kind_dir)
        made = derived_store(store, lambda x, t=transform: t(x).detach(), kind_dir / "store", {"kind": kind})
        _, surrogate_row = shares(made, "surrogate", cfg, 1024, 8, kind_dir)
        key = f"{kind} seed{args.seed} tokens{args.tokens} train{args.train_tokens}"
        report[key] = {"real": real, "surrogate": surrogate_row, "seconds": time.perf_counter() - started}
        print(json.dumps({key: report[key]}, indent=1), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # read last: runs side by side
    RESULTS.write_text(json.dumps(earlier | report, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
