"""Reconstruction metrics, one definition each, accumulated in float64 over a whole held-out split.

* ``fvu``: sum ||x - x_hat||^2 / sum ||x - mean||^2, the mean being the split's own (variance explained is
  1 - fvu). Computed about the mean, never about zero (which reads ~0.98 where the truth is ~0.78).
* ``legacy_fvu``: the per-token ratio ||x - x_hat||^2 / ||x - mean||^2 averaged over tokens, as older
  SAELens reports; beside ``fvu`` for comparison only.
* ``l0``: mean number of non-zero latents per token; ``dead_fraction``: latents that never fire on the
  split; ``dense_1pct`` / ``dense_10pct``: latents firing on more than 1% / 10% of tokens.
"""

from __future__ import annotations

import numpy as np
import torch

from ..data.activation_store import ActivationStore


class VarianceAccumulator:
    """Running float64 sums for the FVU of a prediction against a target, about the target's mean.

    The legacy per-token ratio needs the mean up front: pass ``mean`` to track it too.
    """

    def __init__(self, dim: int, mean: np.ndarray | None = None):
        self.n = 0
        self.sum = np.zeros(dim)
        self.sum_sq = 0.0
        self.sum_err = 0.0
        self.known_mean = mean
        self.legacy_sum = 0.0

    def add(self, target: torch.Tensor, prediction: torch.Tensor) -> None:
        t = target.detach().double()  # on the tensors' device: only the sums cross to the host
        err = ((t - prediction.detach().double()) ** 2).sum(-1)
        self.n += len(t)
        self.sum += t.sum(0).cpu().numpy()
        self.sum_sq += float((t**2).sum())
        self.sum_err += float(err.sum())
        if self.known_mean is not None:
            spread = ((t - torch.from_numpy(self.known_mean).to(t.device)) ** 2).sum(-1)
            self.legacy_sum += float((err / spread).sum())

    def merge_ranks(self, dist) -> VarianceAccumulator:
        """Every rank's sums added together (in place; ``dist``: :class:`featint_utils.data.distributed.Dist`), so
        that ranks that each saw part of a set answer for the whole of it."""
        if dist.distributed:
            sums = np.concatenate([[self.n, self.sum_sq, self.sum_err, self.legacy_sum], self.sum])
            total = dist.all_reduce(torch.from_numpy(sums).to(dist.device)).cpu().numpy()  # NCCL: on the GPU
            self.n, self.sum_sq, self.sum_err, self.legacy_sum = int(total[0]), *map(float, total[1:4])
            self.sum = total[4:]
        return self

    @property
    def mean(self) -> np.ndarray:
        return self.sum / self.n

    @property
    def total_variance(self) -> float:
        """sum ||x - mean||^2 over every token."""
        return self.sum_sq - self.n * float(self.mean @ self.mean)

    def fvu(self) -> float:
        return self.sum_err / self.total_variance

    def legacy_fvu(self) -> float:
        if self.known_mean is None:
            raise ValueError("the legacy per-token ratio needs the mean: construct with mean=...")
        return self.legacy_sum / self.n


def split_mean(store: ActivationStore, split: str, scale: float = 1.0) -> np.ndarray:
    """float64 mean activation of a split (times ``scale``)."""
    total, n = np.zeros(store.d_model), 0
    for x in store.batches(split, 8192, shuffle=False, normalize=False):
        total += x.double().sum(0).numpy()
        n += len(x)
    return total / n * scale


@torch.no_grad()
def evaluate_sae(sae, store: ActivationStore, split: str = "val", batch_size: int = 4096) -> dict:
    """FVU, legacy FVU, L0, dead and dense fractions and per-latent firing frequency on a split."""
    if store.d_model != sae.cfg.d_in:
        raise ValueError(f"the store's width {store.d_model} does not match the SAE's d_in={sae.cfg.d_in}")
    acc = VarianceAccumulator(store.d_model, mean=split_mean(store, split, sae.cfg.input_scale))
    device = sae.W_enc.device  # the batches go where the SAE is
    fires = torch.zeros(sae.cfg.n_latents, dtype=torch.float64, device=device)
    active = 0.0
    for x in store.batches(split, batch_size, shuffle=False, normalize=False):
        x = x.to(device) * sae.cfg.input_scale
        values, indices = sae.encode(x)
        acc.add(x, sae.decode(values, indices))
        on = values > 0
        active += float(on.sum())
        fires.index_add_(0, indices[on], torch.ones(int(on.sum()), dtype=torch.float64, device=device))
    if acc.n == 0:
        raise ValueError(f"split {split!r} of {store.path} holds no tokens")
    frequency = (fires / acc.n).cpu().numpy()
    return {
        "fvu": acc.fvu(),
        "variance_explained": 1.0 - acc.fvu(),
        "legacy_fvu": acc.legacy_fvu(),
        "l0": active / acc.n,
        "dead_fraction": float((frequency == 0).mean()),
        "dense_1pct": float((frequency > 0.01).mean()),
        "dense_10pct": float((frequency > 0.10).mean()),
        "n_tokens": acc.n,
        "firing_frequency": frequency,
    }
