"""Fit a model of the SAE residual (the NFM, or a gradient-trained baseline) to convergence on the tune set.

One loop for every model with a ``predict(batch)`` method, so every gradient-trained model gets the same
optimiser, schedule and stopping rule. Loss: the batch's squared error over the fitting set's total
variance (scale-free, like the SAE's FVU loss). Only parameters that require gradients train: a nested
model keeps the first-order fit it starts from fixed (see :meth:`featint_utils.residual.nfm.NFM.start_from`).

Schedule and stopping, all decided on the ``tune`` documents (FVU, float64):

* the starting model is evaluated first and is the first "best": early stopping can never keep a model
  worse than where it started (a nested model that cannot improve on its first-order start *is* that start);
* after ``patience`` epochs without an improvement of ``min_delta``, training stops and the best weights are
  kept (with ``lr_decays`` > 0 the learning rate is first divided by 3 that many times, each followed by
  another ``patience`` epochs; by default it is not: see :attr:`FitConfig.lr_decays`);
* :func:`select_lr` fits the first seed at every learning rate of a grid and keeps the best on tune.

A checkpoint (weights, Adam moments, best weights, schedule state, history) is written atomically at the
end of an epoch every ``checkpoint_seconds`` and when a call ends; a killed run resumes from it (losing at
most that much work) and ends with the same weights as an uninterrupted one, because the data order and
the dropout draws of an epoch depend only on the seed and the epoch.

Over the ranks of a ``torchrun`` job (:mod:`featint_utils.data.distributed`) one model trains data-parallel: every
rank reads its share of each batch, DDP adds the gradients, the tune set is evaluated in shares whose sums
are added, and rank 0 writes the checkpoints. Without dropout this is the single process's training to
float tolerance; with dropout each rank draws its own masks (the same distribution, not the same draws).
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.activation_store import prefetch
from ..data.distributed import SINGLE, Dist
from ..dictionary.metrics import VarianceAccumulator
from ..io import (
    CheckpointError,
    load_checkpoint,
    optimizer_tensors,
    restore_optimizer,
    save_checkpoint,
    state_digest,
    write_json,
)
from ..progress import progress
from ..scalars import ScalarLog
from .code_data import CodeData, device_of

LR_DECAY = 3.0


@dataclass
class FitConfig:
    """How to fit a residual model."""

    batch_size: int = 1024
    """Tokens per step."""
    lr: float = 1e-3
    """Adam learning rate (see :func:`select_lr` to choose it on the tune set)."""
    weight_decay: float = 0.0
    """Decoupled weight decay (AdamW)."""
    max_epochs: int = 60
    """Upper bound on passes over the fitting set."""
    patience: int = 5
    """Epochs without a tune-set improvement before the learning rate is decayed (or training stops)."""
    lr_decays: int = 0
    """Times the learning rate is divided by 3 on a plateau before stopping. 0 by default: in the 39 fits of
    the embedded and the WikiText-2 runs (every model, target and learning rate) no epoch after the first
    decay improved on tune, so the two decays the schedule used to allow only added ``2 x patience`` epochs
    per fit (230 of the embedded run's 390 training epochs) and never changed a fitted model. On clean
    planted data they can help (the calibration's planted fits; the schedule test in tests/test_nfm.py)."""
    min_delta: float = 1e-5
    """Smallest tune-FVU decrease that counts as an improvement."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    checkpoint_seconds: float = 30.0
    """Seconds between checkpoints (always one when a call ends)."""
    seed: int = 0
    """Seeds the data order and dropout (the model's initialisation has its own seed)."""
    keep_optimizer: bool = False
    """Keep Adam's moments in a finished fit's checkpoint (only needed to train it further)."""

    def __post_init__(self):
        for name in ("batch_size", "max_epochs", "patience"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if self.lr_decays < 0:
            raise ValueError(f"lr_decays must be >= 0, got {self.lr_decays}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be positive and finite, got {self.lr}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be finite and >= 0, got {self.weight_decay}")


@torch.no_grad()
def residual_fvu(model, data: CodeData, batch_size: int = 8192, dist: Dist = SINGLE) -> float:
    """FVU of the residual on ``data`` (float64, about the set's own mean); over ranks, each evaluates a
    contiguous share of the rows and the sums are added."""
    was_training = getattr(model, "training", False)
    model.eval()
    device = device_of(model)
    if dist.distributed:
        data = data.subset(np.array_split(np.arange(len(data)), dist.world_size)[dist.rank])
    acc = VarianceAccumulator(data.d_out)
    for batch in data.batches(batch_size):
        batch = batch.to(device)
        acc.add(batch.target, model.predict(batch))
    model.train(was_training)
    return acc.merge_ranks(dist).fvu()


@torch.no_grad()
def document_sse(model, data: CodeData, batch_size: int = 8192) -> tuple[np.ndarray, float | None]:
    """Per document (sorted): the model's summed squared error; and the total-activation FVU of SAE + model
    (None when the target is not the stored residual)."""
    if hasattr(model, "eval"):
        model.eval()
    device = device_of(model)
    documents, inverse = np.unique(data.document, return_inverse=True)
    sse = torch.zeros(len(documents), dtype=torch.float64)
    total = VarianceAccumulator(data.d_out) if data.target_transform is None else None
    position = 0
    for batch in data.batches(batch_size):
        batch = batch.to(device)
        prediction = model.predict(batch)
        doc = torch.from_numpy(inverse[position : position + len(batch.target)])
        position += len(batch.target)
        sse.index_add_(0, doc, (batch.target.double() - prediction.double()).square().sum(1).cpu())
        if total is not None:  # x - (SAE(x) + e_hat) = e - e_hat
            total.add(batch.inputs, batch.inputs - batch.target + prediction)
    return sse.numpy(), (total.fvu() if total is not None else None)


class _SquaredError(torch.nn.Module):
    """A batch's summed squared error as a module's forward: what DDP wraps to add the ranks' gradients."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, batch) -> torch.Tensor:
        return (batch.target - self.model.predict(batch)).pow(2).sum()


class ResidualTrainer:
    """Fits ``model`` on ``fit``, stopping on ``tune``; writes ``out_dir/{checkpoint,history.csv}``. Trains on
    the model's device (the host's batches are moved there); its checkpoints resume on any device. Over the
    ranks of ``dist`` (every rank builds the same model) it trains data-parallel, see the module docstring."""

    def __init__(
        self,
        model: torch.nn.Module,
        fit: CodeData,
        tune: CodeData,
        cfg: FitConfig,
        out_dir: str | Path,
        dist: Dist = SINGLE,
    ):
        if fit.n_latents != tune.n_latents or fit.d_out != tune.d_out:
            raise ValueError("the fit and tune sets come from different SAEs or layers")
        n_latents = getattr(getattr(model, "cfg", None), "n_latents", fit.n_latents)
        if n_latents != fit.n_latents:
            raise ValueError(f"the model takes {n_latents} latents but the data's SAE has {fit.n_latents}")
        if len(fit) < cfg.batch_size:
            raise ValueError(f"the fitting set has {len(fit)} tokens, fewer than batch_size={cfg.batch_size}")
        if cfg.batch_size % dist.world_size:
            raise ValueError(
                f"batch_size={cfg.batch_size} does not split evenly over {dist.world_size} ranks: choose a multiple "
                f"of {dist.world_size}"
            )
        if dist.distributed and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            raise ValueError(
                "batch norm over ranks would normalise each rank's part of a batch on its own (SyncBatchNorm is "
                "not wired in): set nfm_batch_norm=False, or fit on one process"
            )
        self.model, self.fit, self.tune, self.cfg, self.out_dir = model, fit, tune, cfg, Path(out_dir)
        self.dist = dist
        self.objective = _SquaredError(model)
        if dist.distributed:
            import inspect

            from torch.nn.parallel import DistributedDataParallel

            # the buffers (hinge knots) are fixed and equal on every rank: no broadcast before each forward
            # (torch 2.13 renamed the switch; older torch on GPU machines has only the old name)
            renamed = "forward_sync_buffers" in inspect.signature(DistributedDataParallel).parameters
            no_sync = {"forward_sync_buffers": False} if renamed else {"broadcast_buffers": False}
            self.objective = DistributedDataParallel(
                self.objective, device_ids=[dist.device] if dist.device.type == "cuda" else None, **no_sync
            )
        self.device = device_of(model)
        self.fit_variance = self._variance_per_token(fit)
        self.tune_variance = self._variance_per_token(tune)
        self.start_digest = state_digest(model)
        self.lr = cfg.lr
        self.optimizer = self._optimizer()
        self.epoch = 0
        self.decays = 0
        self.since = 0  # epoch of the last improvement or learning-rate decay
        self.stopped = False
        self.start_fvu = float("nan")
        self.best_fvu = float("inf")
        self.best_epoch = 0
        self.best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        self.history: list[dict] = []

    def _optimizer(self) -> torch.optim.Optimizer:
        trainable = [p for p in self.model.parameters() if p.requires_grad]
        if not trainable:
            raise ValueError(f"{type(self.model).__name__} has no trainable parameters")
        # foreach: one kernel per operation for all tensors (CUDA's default; on the host the same arithmetic, in
        # half the time of the per-tensor loop)
        return torch.optim.AdamW(trainable, lr=self.lr, weight_decay=self.cfg.weight_decay, foreach=True)

    @staticmethod
    def _variance_per_token(data: CodeData) -> float:
        acc = VarianceAccumulator(data.d_out)
        for batch in data.batches(65536):
            acc.add(batch.target, batch.target)
        if acc.n == 0 or not acc.total_variance > 0:
            raise ValueError("the residual has no variance on this set: nothing to fit")
        return acc.total_variance / acc.n

    # -- checkpointing ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _fingerprint(self) -> str:
        """Settings, shapes, the starting weights and a summary of the data: a checkpoint of anything else
        is refused rather than resumed."""
        settings = {
            "model": type(self.model).__name__,
            "cfg": str(getattr(self.model, "cfg", "")),
            "start": self.start_digest,
            "fit": asdict(replace(self.cfg, keep_optimizer=False)),
            "n_fit": len(self.fit),
            "n_tune": len(self.tune),
            "variance": f"{self.fit_variance:.9g} {self.tune_variance:.9g}",
        }
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def save_checkpoint(self) -> None:
        """Best weights, schedule and history; the current weights and Adam's moments too unless the fit is
        finished (and ``keep_optimizer`` is off): a finished fit is its best weights, and the rest, three times
        their size, only serves to train further."""
        tensors = {f"best.{k}": v.contiguous() for k, v in self.best_state.items()}
        if not self.finished or self.cfg.keep_optimizer:
            tensors |= {f"model.{k}": v.detach().contiguous() for k, v in self.model.state_dict().items()}
            tensors |= optimizer_tensors(self.model, self.optimizer)
        state = {
            "fingerprint": self._fingerprint(),
            "epoch": self.epoch,
            "best_fvu": self.best_fvu,
            "best_epoch": self.best_epoch,
            "start_fvu": self.start_fvu,
            "lr": self.lr,
            "decays": self.decays,
            "since": self.since,
            "stopped": self.stopped,
            "history": self.history,
        }
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_dir, tensors, state)
        self.dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint/`` if present; True if restored."""
        found = load_checkpoint(self.checkpoint_dir, self._fingerprint())
        if found is None:
            return False
        state, tensors = found
        try:
            self.best_state = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
            current = {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}
            self.model.load_state_dict(current or self.best_state)  # a finished fit keeps its best weights only
            self.lr = state["lr"]
            self.optimizer = self._optimizer()
            restore_optimizer(self.model, self.optimizer, tensors)
            for group in self.optimizer.param_groups:
                group["lr"] = self.lr
            for key in ("epoch", "best_fvu", "best_epoch", "start_fvu", "decays", "since", "stopped", "history"):
                setattr(self, key, state[key])
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint in {self.checkpoint_dir} is incomplete or corrupt ({err})") from err
        return True

    # -- training --------------------------------------------------------------------------------------
    @property
    def finished(self) -> bool:
        return self.stopped or self.epoch >= self.cfg.max_epochs

    @property
    def improved(self) -> bool:
        """Whether training moved the model away from its start (it beat the start on tune)."""
        return self.best_epoch > 0

    def train_epoch(self) -> float:
        cfg, model, dist = self.cfg, self.model, self.dist
        torch.manual_seed(cfg.seed * 1_000_003 + self.epoch + 7919 * dist.rank)  # this epoch's (rank's) dropout
        model.train()
        total, n = 0.0, 0
        # this rank's part of every full batch (the last, short batch is dropped: every step sees as many tokens)
        batches = self.fit.batches(
            cfg.batch_size, shuffle=True, seed=cfg.seed * 100_003 + self.epoch, part=dist.part(cfg.batch_size)
        )
        if self.device.type == "cuda":  # gathered and pinned by a background thread while the GPU computes
            batches = prefetch(batches, 2, pin=True)
        for batch in batches:
            batch = batch.to(self.device, non_blocking=True)
            error = self.objective(batch)
            # over the global batch; DDP averages the ranks' gradients, so each rank's loss counts world times
            loss = error * dist.world_size / (cfg.batch_size * self.fit_variance)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"non-finite loss at epoch {self.epoch}: lower the learning rate")
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            self.optimizer.step()
            total += error.item()
            n += len(batch.target)
        if dist.distributed:
            total, n = dist.all_reduce(torch.tensor([total, n], dtype=torch.float64, device=dist.device)).tolist()
        return total / (n * self.fit_variance)

    def _end_of_epoch(self, tune_fvu: float) -> None:
        cfg = self.cfg
        if tune_fvu < self.best_fvu - cfg.min_delta:
            self.best_fvu, self.best_epoch, self.since = tune_fvu, self.epoch, self.epoch
            self.best_state = {k: v.detach().clone() for k, v in self.model.state_dict().items()}
        elif self.epoch - self.since >= cfg.patience:
            if self.decays < cfg.lr_decays:  # plateau: smaller steps from here
                self.decays += 1
                self.lr /= LR_DECAY
                self.since = self.epoch
                for group in self.optimizer.param_groups:
                    group["lr"] = self.lr
            else:
                self.stopped = True

    def train(self, resume: bool = True, stop_after: int | None = None, desc: str = "fit") -> torch.nn.Module:
        """Fit until the schedule ends; returns the model holding its best tune-set weights (possibly the
        starting weights). ``stop_after`` ends this call after that many epochs (to test resuming)."""
        dist = self.dist
        if not resume:
            if dist.is_main:
                shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
            dist.barrier()
        elif self.load_checkpoint() and dist.is_main:
            print(f"{desc}: resuming after epoch {self.epoch}")
        if not self.history:  # the start is the first candidate: never keep anything worse
            self.start_fvu = self.best_fvu = residual_fvu(self.model, self.tune, dist=dist)
            self.history.append({"epoch": 0, "fit_fvu": float("nan"), "tune_fvu": self.start_fvu, "lr": self.lr})
        bar = progress(total=self.cfg.max_epochs, initial=self.epoch, desc=desc, unit="epoch", disable=not dist.is_main)
        curves = ScalarLog(self.out_dir, active=dist.is_main)  # x axis: epochs
        done, saved_at = 0, time.monotonic()
        while not self.finished and (stop_after is None or done < stop_after):
            fit_fvu = self.train_epoch()
            tune_fvu = residual_fvu(self.model, self.tune, dist=dist)
            self.epoch += 1
            done += 1
            self.history.append({"epoch": self.epoch, "fit_fvu": fit_fvu, "tune_fvu": tune_fvu, "lr": self.lr})
            curves.add(self.epoch, {"fit/fit_fvu": fit_fvu, "fit/tune_fvu": tune_fvu, "fit/lr": self.lr})
            self._end_of_epoch(tune_fvu)
            # rank 0's clock decides, so that every rank joins the checkpoint's barrier
            if dist.broadcast_object(time.monotonic() - saved_at >= self.cfg.checkpoint_seconds):
                self.save_checkpoint()
                saved_at = time.monotonic()
            bar.update(1)
            bar.set_postfix(fit=f"{fit_fvu:.4f}", tune=f"{tune_fvu:.4f}", best=self.best_epoch, refresh=False)
        bar.close()
        curves.close()
        if done or not self.checkpoint_dir.exists():
            self.save_checkpoint()  # every call ends with its state saved: a re-run resumes or returns at once
        if self.finished:
            self.model.load_state_dict(self.best_state)
            if dist.is_main:
                pd.DataFrame(self.history).to_csv(self.out_dir / "history.csv", index=False)
        return self.model.eval()

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)

    def summary(self) -> dict:
        """What a ladder row records about the fit."""
        return {
            "epochs": self.epoch,
            "best_epoch": self.best_epoch,
            "tune_fvu": self.best_fvu,
            "start_tune_fvu": self.start_fvu,
            "lr": self.cfg.lr,
            "improved_on_start": self.improved,
        }


def select_lr(
    make_model: Callable[[], torch.nn.Module],
    fit: CodeData,
    tune: CodeData,
    cfg: FitConfig,
    lrs: tuple[float, ...],
    out_dir: str | Path,
    resume: bool = True,
    desc: str = "fit",
    dist: Dist = SINGLE,
) -> tuple[float, torch.nn.Module, ResidualTrainer]:
    """Fit a fresh model (same start, same seed) at every learning rate of ``lrs``; keep the one with the best
    tune FVU. Each fit lives in ``out_dir/lr<lr>/`` (resumable); the choice is written to ``out_dir/lr.json``."""
    if not lrs:
        raise ValueError("select_lr needs at least one learning rate")
    out_dir = Path(out_dir)
    results = []
    for lr in lrs:
        trainer = ResidualTrainer(make_model(), fit, tune, replace(cfg, lr=lr), out_dir / f"lr{lr:g}", dist)
        model = trainer.train(resume=resume, desc=f"{desc}, lr {lr:g}")
        results.append((trainer.best_fvu, lr, model, trainer))
    best_fvu, lr, model, trainer = min(results, key=lambda r: r[0])
    if dist.is_main:
        write_json(out_dir / "lr.json", {"chosen": lr, "tune_fvu": {f"{r[1]:g}": r[0] for r in results}})
    return lr, model, trainer
