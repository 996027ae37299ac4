"""Fit a model of the SAE residual (the NFM, or a gradient-trained baseline) with early stopping.

One loop for every model with a ``predict(batch)`` method, so the baselines get the same optimiser,
schedule and stopping rule as the NFM. Loss: the batch's squared error over the fitting set's total
variance (scale-free, like the SAE's FVU loss). Adam with decoupled weight decay; after each epoch the
FVU on the ``tune`` documents (float64) decides: the best epoch's weights are kept, and training stops
after ``patience`` epochs without an improvement of ``min_delta``.

A checkpoint (weights, Adam moments, best weights, epoch, history) is written atomically after every
epoch; a killed run resumes from it and ends with the same weights as an uninterrupted one, because the
data order and the dropout draws of an epoch depend only on the seed and the epoch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from .io import CheckpointError, load_checkpoint, optimizer_tensors, restore_optimizer, save_checkpoint
from .metrics import VarianceAccumulator
from .progress import progress
from .residuals import CodeData


@dataclass
class FitConfig:
    """How to fit a residual model."""

    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    max_epochs: int = 50
    """Upper bound on passes over the fitting set."""
    patience: int = 4
    """Stop after this many epochs without a tune-set improvement."""
    min_delta: float = 1e-4
    """Smallest tune-FVU decrease that counts as an improvement."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    seed: int = 0
    """Seeds the data order and dropout (the model's initialisation has its own seed)."""


@torch.no_grad()
def residual_fvu(model, data: CodeData, batch_size: int = 8192) -> float:
    """FVU of the residual on ``data`` (float64, about the set's own mean)."""
    was_training = model.training
    model.eval()
    acc = VarianceAccumulator(data.d_out)
    for batch in data.batches(batch_size):
        acc.add(batch.target, model.predict(batch))
    model.train(was_training)
    return acc.fvu()


class ResidualTrainer:
    """Fits ``model`` on ``fit``, stopping on ``tune``; writes ``out_dir/{checkpoint,model,history.csv}``."""

    def __init__(self, model: torch.nn.Module, fit: CodeData, tune: CodeData, cfg: FitConfig, out_dir: str | Path):
        if fit.n_latents != tune.n_latents or fit.d_out != tune.d_out:
            raise ValueError("the fit and tune sets come from different SAEs or layers")
        n_latents = getattr(getattr(model, "cfg", None), "n_latents", fit.n_latents)
        if n_latents != fit.n_latents:
            raise ValueError(f"the model takes {n_latents} latents but the data's SAE has {fit.n_latents}")
        if len(fit) < cfg.batch_size:
            raise ValueError(f"the fitting set has {len(fit)} tokens, fewer than batch_size={cfg.batch_size}")
        self.model, self.fit, self.tune, self.cfg, self.out_dir = model, fit, tune, cfg, Path(out_dir)
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.fit_variance = self._variance_per_token(fit)
        self.epoch = 0
        self.best_fvu = float("inf")
        self.best_epoch = 0
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history: list[dict] = []

    @staticmethod
    def _variance_per_token(data: CodeData) -> float:
        acc = VarianceAccumulator(data.d_out)
        for batch in data.batches(65536):
            acc.add(batch.target, batch.target)
        return acc.total_variance / acc.n

    # -- checkpointing ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _fingerprint(self) -> str:
        shapes = {k: list(v.shape) for k, v in self.model.state_dict().items()}
        settings = {"model": type(self.model).__name__, "cfg": str(getattr(self.model, "cfg", "")),
                    "shapes": shapes, "fit": asdict(self.cfg), "n_fit": len(self.fit), "n_tune": len(self.tune),
                    "shuffled_pairs": self.fit.pair_rows is not None}  # fmt: skip
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def save_checkpoint(self) -> None:
        tensors = {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
        tensors |= {f"best.{k}": v.contiguous() for k, v in self.best_state.items()}
        tensors |= optimizer_tensors(self.model, self.optimizer)
        state = {"fingerprint": self._fingerprint(), "epoch": self.epoch, "best_fvu": self.best_fvu,
                 "best_epoch": self.best_epoch, "history": self.history}  # fmt: skip
        save_checkpoint(self.checkpoint_dir, tensors, state)

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint/`` if present; True if restored."""
        found = load_checkpoint(self.checkpoint_dir, self._fingerprint())
        if found is None:
            return False
        state, tensors = found
        try:
            self.model.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("model.")})
            self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            restore_optimizer(self.model, self.optimizer, tensors)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint in {self.checkpoint_dir} is incomplete or corrupt ({err})") from err
        self.epoch, self.best_fvu, self.best_epoch = state["epoch"], state["best_fvu"], state["best_epoch"]
        self.history = state["history"]
        return True

    # -- training --------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.epoch >= self.cfg.max_epochs or self.epoch - self.best_epoch >= self.cfg.patience

    def train_epoch(self) -> float:
        cfg, model = self.cfg, self.model
        torch.manual_seed(cfg.seed * 1_000_003 + self.epoch)  # this epoch's dropout draws
        model.train()
        total, n = 0.0, 0
        for batch in self.fit.batches(cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + self.epoch):
            if len(batch.target) < cfg.batch_size:
                continue  # drop the last, short batch: every step sees the same number of tokens
            error = (batch.target - model.predict(batch)).pow(2).sum()
            loss = error / (len(batch.target) * self.fit_variance)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {self.epoch}: lower the learning rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            total += error.item()
            n += len(batch.target)
        return total / (n * self.fit_variance)

    def train(self, resume: bool = True, stop_after: int | None = None, desc: str = "fit") -> torch.nn.Module:
        """Fit until early stopping; returns the model holding its best tune-set weights.

        ``stop_after`` ends this call after that many epochs (to test resuming)."""
        if not resume:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        elif self.load_checkpoint():
            print(f"{desc}: resuming after epoch {self.epoch}")
        bar = progress(total=self.cfg.max_epochs, initial=self.epoch, desc=desc, unit="epoch")
        done = 0
        while not self.finished and (stop_after is None or done < stop_after):
            fit_fvu = self.train_epoch()
            tune_fvu = residual_fvu(self.model, self.tune)
            self.epoch += 1
            done += 1
            if tune_fvu < self.best_fvu - self.cfg.min_delta:
                self.best_fvu, self.best_epoch = tune_fvu, self.epoch
                self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
            self.history.append({"epoch": self.epoch, "fit_fvu": fit_fvu, "tune_fvu": tune_fvu})
            self.save_checkpoint()
            bar.update(1)
            bar.set_postfix(fit=f"{fit_fvu:.4f}", tune=f"{tune_fvu:.4f}", best=self.best_epoch, refresh=False)
        bar.close()
        if self.finished:
            self.model.load_state_dict(self.best_state)
            pd.DataFrame(self.history).to_csv(self.out_dir / "history.csv", index=False)
        return self.model.eval()

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
