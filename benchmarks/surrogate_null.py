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
* ``wide<m>``: the reconstruction of a generator SAE with ``m`` times the latents (same k), plus matched noise;
* ``omp[k]``: the primary SAE's dictionary with codes inferred by non-negative orthogonal matching pursuit (k atoms,
  the SAE's k unless given; least squares on the chosen support: a stronger sparse inference than the TopK
  encoder, so the generator's own error is small), each atom's magnitudes permuted among the tokens where it
  is chosen (firing and co-firing kept, any product of two atoms' magnitudes broken), decoded, plus noise
  matched to OMP's error;
* ``womp<m>``: ``omp`` (at the SAE's k) over the dictionary of a generator SAE with ``m`` times the latents, trained
  on the same activations: atoms finer than the SAE's, so that the SAE trained on the surrogate has to
  approximate its generator's atoms as the real SAE does the data's;
* ``redraw``: another draw of the same planted generator (a perfect surrogate: the spread of the SAE-made
  share between draws, which any surrogate's excess must be judged against).

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


def shares(store, name: str, cfg: TrainConfig, n_latents: int, k: int, work: Path, lr_decays: int = 0):
    """An SAE trained on ``store`` and the estimator's two shares on its residual, with the SAE's FVU."""
    sae = SAETrainer(store, n_latents, k, cfg, work / f"sae_{name}").train()
    sets = split_fit_tune_test(build_residual_data(sae, store, work / f"residuals_{name}"), 0.15, 0.3, seed=0)
    out = work / f"estimator_{name}"
    estimator_cfg = estimator_config(n_latents, store.d_model, max_epochs=30)
    estimator_cfg = replace(estimator_cfg, fit=replace(estimator_cfg.fit, lr_decays=lr_decays))
    estimator = interaction.Estimator(sets, estimator_cfg, out)
    estimator.fit_target(interaction.RESIDUAL, sets, ("pair_ridge", "nfm"))
    estimator.save()
    (out / "planted.json").write_text("{}")
    results = interaction_results.Results(out, n_boot=1000)
    row = {name: results.share(interaction.RESIDUAL, name) for name in interaction.ESTIMATORS}
    gain = results.beats_zero()  # a share is an increment over fits that must themselves beat predicting zero
    row["gain_over_zero_ci_low"] = {model: float(gain.loc[model, "ci_low"]) for model in gain.index}
    return sae, row | {"sae_val_fvu": evaluate_sae(sae, store, "val")["fvu"]}


def gaussian_like(error: np.ndarray, fraction: float, seed: int):
    """A sampler of Gaussian noise with ``fraction`` times the covariance of ``error`` (rows: tokens)."""
    chol = np.linalg.cholesky(np.cov(error.astype(np.float64), rowvar=False) + 1e-12 * np.eye(error.shape[1]))
    factor = torch.from_numpy(np.sqrt(fraction) * chol).float()
    generator = torch.Generator().manual_seed(seed)
    return lambda n: torch.randn(n, factor.shape[0], generator=generator) @ factor.T


def matched_noise(reconstruct, train: np.ndarray, fraction: float, seed: int):
    """Gaussian noise with ``fraction`` times the covariance of ``train - reconstruct(train)``."""
    with torch.no_grad():
        error = train - reconstruct(torch.from_numpy(train)).numpy()
    return gaussian_like(error, fraction, seed)


def omp(x: torch.Tensor, atoms: torch.Tensor, k: int, batch_size: int = 8192) -> tuple[torch.Tensor, torch.Tensor]:
    """Non-negative orthogonal matching pursuit: per row of ``x``, ``k`` atoms (unit rows of ``atoms``) chosen
    greedily by their positive correlation with what is left, coefficients refitted by least squares on the
    chosen support each step and negative ones set to zero; (values [n, k], indices [n, k])."""
    values, indices = [], []
    for batch in x.split(batch_size):
        left, chosen = batch.clone(), batch.new_zeros((len(batch), 0), dtype=torch.long)
        for _ in range(k):
            scores = left @ atoms.T
            scores.scatter_(1, chosen, -torch.inf)
            chosen = torch.cat([chosen, scores.argmax(1, keepdim=True)], 1)
            support = atoms[chosen]  # [b, t, d]
            gram = support @ support.transpose(1, 2) + 1e-6 * torch.eye(chosen.shape[1])
            coef = torch.linalg.solve(gram, support @ batch.unsqueeze(-1)).squeeze(-1).clamp_min(0)
            left = batch - (coef.unsqueeze(-1) * support).sum(1)
        values.append(coef)
        indices.append(chosen)
    return torch.cat(values), torch.cat(indices)


def permute_magnitudes(values: torch.Tensor, indices: torch.Tensor, seed: int) -> torch.Tensor:
    """Each atom's magnitudes permuted among the (token, slot) entries where it is chosen: every token keeps
    its support (so firing and co-firing are the data's), and no magnitude depends on another atom's."""
    atom = indices.flatten().numpy()
    shuffled = np.lexsort((np.random.default_rng(seed).random(len(atom)), atom))  # by atom, random within one
    ordered = np.argsort(atom, kind="stable")
    out = values.flatten().clone()
    out[torch.from_numpy(ordered)] = values.flatten()[torch.from_numpy(shuffled)]
    return out.reshape(values.shape)


def omp_surrogate(sae, raw: np.ndarray, k: int, seed: int) -> torch.Tensor:
    """The ``omp`` surrogate of one split's raw activations (see the module docstring)."""
    with torch.no_grad():
        x = torch.from_numpy(raw).float() * sae.cfg.input_scale - sae.b_dec
        norms = sae.W_dec.norm(dim=1)
        atoms = sae.W_dec / norms.unsqueeze(1)
        values, indices = omp(x, atoms, k)
        error = x - (values.unsqueeze(-1) * atoms[indices]).sum(1)
        permuted = permute_magnitudes(values, indices, seed)
        rebuilt = (permuted.unsqueeze(-1) * atoms[indices]).sum(1)
        print(f"omp: error {float(error.square().sum(1).mean() / (x - x.mean(0)).square().sum(1).mean()):.4f} of x")
        noise = gaussian_like(error.numpy(), 1.0, seed)(len(x))
        return (rebuilt + noise + sae.b_dec) / sae.cfg.input_scale


def _position_transform(store, make):
    """A transform that hands out ``make(split, raw rows)`` of each split in the order derived_store streams the
    shards (the train split's, then the val split's); it checks that each streamed batch is the rows it stands
    for, so another streaming order is an error, not a silently mismatched surrogate."""
    sources = {split: store.load(split) for split in ("train", "val")}
    pools = {split: make(split, raw) for split, raw in sources.items()}
    position = {"train": 0, "val": 0}

    def transform(x):
        split = "train" if position["train"] < len(pools["train"]) else "val"
        start = position[split]
        position[split] += len(x)
        if not np.array_equal(x.numpy(), sources[split][start : position[split]]):
            raise RuntimeError(f"the store streamed {split} rows {start}-{position[split]} in another order")
        return pools[split][start : position[split]]

    return transform


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
    elif kind.startswith("womp"):  # omp over a finer dictionary than the SAE's: its own mismatch to the data
        multiple = int(kind[4:])
        generator_cfg = replace(cfg, seed=cfg.seed + 1)
        wide = SAETrainer(store, multiple * sae.cfg.n_latents, sae.cfg.k, generator_cfg, work / "generator").train()
        return _position_transform(
            store, lambda split, raw: omp_surrogate(wide, raw, sae.cfg.k, 7 if split == "train" else 8)
        )
    elif kind.startswith("omp"):
        k = int(kind[3:] or sae.cfg.k)
        return _position_transform(store, lambda split, raw: omp_surrogate(sae, raw, k, 7 if split == "train" else 8))
    elif kind == "perm":  # another token's residual, within the split

        def rebuilt(split, raw):
            error = torch.from_numpy(absorption.raw_residual(sae, raw))
            order = np.random.default_rng(5 if split == "train" else 6).permutation(len(raw))
            return sae.reconstruct_raw(torch.from_numpy(raw)) + error[order]

        return _position_transform(store, rebuilt)
    else:
        raise ValueError(f"unknown surrogate {kind!r}")
    noise = matched_noise(reconstruct, train, fraction, seed=123)
    return lambda x: reconstruct(x) + noise(len(x))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "kinds",
        nargs="+",
        help="surrogates: gauss1, gauss0.3, gauss0, perm, k2, wide2, wide4, omp, omp6, omp16, womp4, redraw",
    )
    parser.add_argument("--tokens", type=int, default=100_000)
    parser.add_argument("--train-tokens", type=int, default=3_000_000)
    parser.add_argument("--seed", type=int, default=0, help="seeds the planted activations")
    parser.add_argument("--lr-decays", type=int, default=0, help="the residual fits' learning-rate decays")
    parser.add_argument("--work", type=Path, default=Path("/tmp/surrogate_null"))
    args = parser.parse_args()
    torch.manual_seed(0)
    cfg = TrainConfig(train_tokens=args.train_tokens, batch_size=1024, lr=3e-3, dead_tokens=300_000)
    work = args.work / f"seed{args.seed}_{args.tokens}_{args.train_tokens}"
    work.mkdir(parents=True, exist_ok=True)
    data = planted.activations(args.tokens, d=64, n_features=512, k=8, interaction_share=0.0, seed=args.seed)
    store = store_from_npz(f"activations:{data.save_npz(work / 'acts.npz')}", work / "store", 0.3, seed=0)
    sae, real = shares(store, "real", cfg, 1024, 8, work, args.lr_decays)
    report = {}
    for kind in args.kinds:
        started = time.perf_counter()
        kind_dir = work / kind
        kind_dir.mkdir(exist_ok=True)
        if kind == "redraw":
            other = planted.activations(args.tokens, d=64, n_features=512, k=8, seed=args.seed + 1_000)
            made = store_from_npz(
                f"activations:{other.save_npz(kind_dir / 'acts.npz')}", kind_dir / "store", 0.3, seed=0
            )
        else:
            transform = surrogate(kind, store, sae, cfg, kind_dir)
            made = derived_store(store, lambda x, t=transform: t(x).detach(), kind_dir / "store", {"kind": kind})
        _, surrogate_row = shares(made, "surrogate", cfg, 1024, 8, kind_dir, args.lr_decays)
        key = f"{kind} seed{args.seed} tokens{args.tokens} train{args.train_tokens}"
        key += f" lr_decays{args.lr_decays}" if args.lr_decays else ""
        report[key] = {"real": real, "surrogate": surrogate_row, "seconds": time.perf_counter() - started}
        print(json.dumps({key: report[key]}, indent=1), flush=True)
    RESULTS.parent.mkdir(exist_ok=True)
    earlier = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}  # read last: runs side by side
    RESULTS.write_text(json.dumps(earlier | report, indent=2) + "\n")
    print(f"written {RESULTS}")


if __name__ == "__main__":
    main()
