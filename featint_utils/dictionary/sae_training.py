"""Train a TopK SAE by streaming an activation store: AuxK, LR heuristic, atomic checkpoints, exact resume.

Loss: the batch FVU of the reconstruction (scale-free) plus ``aux_coef`` times AuxK's loss, in which the
``k_aux`` strongest *dead* latents (no firing in the last ``dead_tokens`` tokens) reconstruct the detached
residual, normalised by the residual's variance. Adam, learning rate ``2e-4 / sqrt(n_latents / 2^14)``
unless given, linear warm-up and a linear decay to zero over the last part of training, gradient clipping.
The decoder's rows stay unit-norm: the gradient's component along each row is removed before every step
and the rows are renormalised after it.

A checkpoint (weights, Adam moments, dead-latent counters, data position, history) is written atomically
every ``checkpoint_every`` steps; a killed run resumes from it and ends with the same weights as an
uninterrupted one, because the data order depends only on the seed and the epoch. It holds host tensors: a
run checkpointed on a GPU resumes on a CPU and the reverse.

**Devices and ranks.** The SAE, its optimiser and counters live on the device of ``dist``
(:mod:`featint_utils.data.distributed`); store batches are gathered and pinned by a background thread while the
device computes. Under ``torchrun`` training is data-parallel (DDP): each rank reads its contiguous share of
every global batch, the FVU's denominator is the global batch's variance, DDP all-reduces the gradients, and
the dead-latent counters count the global batch, so every rank holds the same weights, the same AuxK set and
the same step as a single process with the whole batch. Rank 0 writes the checkpoints and the result.
"""

from __future__ import annotations

import hashlib
import json
import math
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import pandas as pd
import torch

from ..data.activation_store import ActivationStore, git_commit, prefetch
from ..data.distributed import SINGLE, Dist
from ..io import CheckpointError, load_checkpoint, optimizer_tensors, read_json, restore_optimizer, save_checkpoint
from ..progress import progress
from ..scalars import ScalarLog
from .metrics import VarianceAccumulator
from .sae import SAEConfig, TopKSAE


@dataclass
class TrainConfig:
    """How to train (the SAE's shape is in :class:`featint_utils.dictionary.sae.SAEConfig`)."""

    train_tokens: int
    """Token budget: training stops after this many training tokens (several epochs if needed)."""
    batch_size: int = 4096
    """Tokens per step."""
    lr: float = 0.0
    """Adam learning rate; 0 means the heuristic 2e-4 / sqrt(n_latents / 2^14)."""
    warmup_fraction: float = 0.05
    """Share of steps with a linear learning-rate warm-up."""
    decay_fraction: float = 0.2
    """Share of steps, at the end, over which the learning rate decays linearly to zero."""
    grad_clip: float = 1.0
    """Gradient-norm clipping."""
    k_aux: int = 0
    """Dead latents used by AuxK; 0 means d_in // 2."""
    aux_coef: float = 1 / 32
    """Weight of the AuxK loss."""
    dead_tokens: int = 10_000_000
    """A latent is dead after this many training tokens without firing."""
    eval_every: int = 0
    """Steps between held-out evaluations (0: about 20 over the run)."""
    eval_tokens: int = 100_000
    """Held-out tokens per periodic evaluation (the final evaluation uses all)."""
    checkpoint_every: int = 0
    """Steps between checkpoints (0: about 10 over the run)."""
    seed: int = 0
    """Seeds the initialisation and the data order."""
    bf16_encoder: str = "auto"
    """Encoder matmul in bfloat16 while training: "auto" (when the training device does bf16 fast), "on" or
    "off"."""
    prefetch_batches: int = 2
    """Store batches read ahead by a background thread (0: read each when it is needed)."""

    def __post_init__(self):
        for name in ("train_tokens", "batch_size", "dead_tokens", "eval_tokens"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")
        if not (math.isfinite(self.lr) and self.lr >= 0):
            raise ValueError(f"lr must be finite and >= 0 (0: the heuristic), got {self.lr}")
        if self.prefetch_batches < 0:
            raise ValueError(f"prefetch_batches must be >= 0, got {self.prefetch_batches}")
        if self.train_tokens < self.batch_size:
            raise ValueError(f"train_tokens={self.train_tokens} is less than one batch of {self.batch_size}")

    def use_bf16(self, device: torch.device | str = "cpu") -> bool:
        if self.bf16_encoder not in ("auto", "on", "off"):
            raise ValueError(f"bf16_encoder must be 'auto', 'on' or 'off', got {self.bf16_encoder!r}")
        return self.bf16_encoder == "on" or (self.bf16_encoder == "auto" and fast_bf16(device))

    def steps(self) -> int:
        return max(1, self.train_tokens // self.batch_size)

    def learning_rate(self, n_latents: int) -> float:
        return self.lr or 2e-4 / math.sqrt(n_latents / 2**14)


def fast_bf16(device: torch.device | str = "cpu") -> bool:
    """Whether ``device`` multiplies bf16 matrices fast: a CUDA GPU with bf16 tensor cores (Ampere or later),
    or a CPU with AMX or AVX-512 bf16 units (where a bf16 matmul is ~3x float32). A CPU run is asked about
    the CPU, whatever GPU the machine also has."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_capability(device)[0] >= 8
    return device.type == "cpu" and cpu_has_bf16_units()


def cpu_has_bf16_units() -> bool:
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return " amx_bf16" in flags or " avx512_bf16" in flags


def lr_at(step: int, total: int, base: float, warmup_fraction: float, decay_fraction: float) -> float:
    """Linear warm-up, constant, then linear decay to zero over the last ``decay_fraction`` of steps."""
    warmup = max(1, int(warmup_fraction * total))
    decay_start = int((1.0 - decay_fraction) * total)
    factor = min(1.0, (step + 1) / warmup)
    if decay_fraction > 0 and step >= decay_start:
        factor *= max(0.0, (total - step) / max(1, total - decay_start))
    return base * factor


class _Objective(torch.nn.Module):
    """One step's loss on this rank's share of the global batch, as a module so that DDP can wrap it (DDP
    all-reduces the gradients during the backward pass, overlapping communication with computation). The
    loss is scaled so that DDP's average over ranks is the gradient of the global batch's loss."""

    def __init__(self, sae: TopKSAE, dist: Dist):
        super().__init__()
        self.sae, self.dist = sae, dist

    def variance(self, t: torch.Tensor) -> torch.Tensor:
        """sum ||t - mean||^2 over the global batch (the mean is the global batch's)."""
        if not self.dist.distributed:
            return (t - t.mean(0)).pow(2).sum()
        totals = self.dist.all_reduce(torch.cat([t.sum(0), t.new_tensor([len(t)])]))
        return self.dist.all_reduce((t - totals[:-1] / totals[-1]).pow(2).sum())

    def forward(self, x, dead, k_aux: int, bf16: bool, aux_coef: float):
        sae, world = self.sae, self.dist.world_size
        values, indices, aux_values, aux_indices = sae.encode_with_aux(x, dead, k_aux, bf16=bf16)
        x_hat = sae.decode(values, indices)
        fvu = (x - x_hat).pow(2).sum() / self.variance(x)  # this rank's part of the global batch's FVU
        loss = fvu * world
        aux = torch.zeros((), device=x.device)
        if aux_indices.shape[1]:
            residual = (x - x_hat).detach()
            aux_hat = sae.decode(aux_values, aux_indices, bias=False)
            aux = (residual - aux_hat).pow(2).sum() / self.variance(residual)
            loss = loss + aux_coef * aux * world
        return loss, fvu, aux, values, indices


class SAETrainer:
    """Trains one SAE on one store into ``out_dir`` (``checkpoint/``, ``sae/``, ``history.csv``), on the
    device of ``dist`` and, under ``torchrun``, data-parallel over its ranks."""

    def __init__(
        self,
        store: ActivationStore,
        n_latents: int,
        k: int,
        train: TrainConfig,
        out_dir: str | Path,
        dist: Dist = SINGLE,
    ):
        if train.batch_size % dist.world_size:
            raise ValueError(
                f"batch_size={train.batch_size} does not split evenly over {dist.world_size} ranks: choose a "
                "multiple of the number of processes"
            )
        self.store, self.train_cfg, self.out_dir, self.dist = store, train, Path(out_dir), dist
        manifest = store.manifest
        self.sae_cfg = SAEConfig(
            d_in=store.d_model,
            n_latents=n_latents,
            k=k,
            input_scale=store.scale,
            model=manifest["model"],
            layer=manifest["layer"],
            hook=manifest["hook"],
            # the store by its content, not its path: a run directory moved or copied is the same run
            extra={"store_fingerprint": store.fingerprint, "train": asdict(train)},
        )
        self.k_aux = min(train.k_aux or store.d_model // 2, n_latents)
        self.bf16 = train.use_bf16(dist.device)
        torch.manual_seed(train.seed)
        self.sae = TopKSAE(self.sae_cfg, seed=train.seed)
        with torch.no_grad():  # start b_dec at the (normalised) training mean: the code then models deviations
            self.sae.b_dec.copy_(torch.from_numpy(store.mean * store.scale).float())
        self.sae.to(dist.device)
        self.objective = _Objective(self.sae, dist)
        if dist.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.objective = DistributedDataParallel(
                self.objective, device_ids=[dist.device] if dist.device.type == "cuda" else None
            )
        # foreach: CUDA's default, and on the host the per-tensor loop's arithmetic in less time
        self.optimizer = torch.optim.Adam(self.sae.parameters(), lr=train.learning_rate(n_latents), foreach=True)
        self.tokens_since_fired = torch.zeros(n_latents, dtype=torch.long, device=dist.device)
        self.step = 0
        self.epoch = 0
        self.batch_in_epoch = 0
        self.history: list[dict] = []

    # -- checkpointing ---------------------------------------------------------------------------------
    @property
    def checkpoint_dir(self) -> Path:
        return self.out_dir / "checkpoint"

    def _fingerprint(self, store_path: str | None = None) -> str:
        """A hash of the settings; with ``store_path``, as checkpoints written before Dec 2026 hashed them (the
        settings then held the store's absolute path beside its content fingerprint)."""
        sae = asdict(self.sae_cfg)
        if store_path is not None:
            sae["extra"] = {"store": store_path} | sae["extra"]
        settings = {"sae": sae, "k_aux": self.k_aux}
        return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _older_fingerprints(self) -> dict[str, str]:
        """Fingerprints of these settings as older checkpoints recorded them, with the store's path where it
        is now or where the finished SAE's ``cfg.json`` says it was (a run that has since moved)."""
        paths = {str(self.store.path)}
        try:
            paths.add(read_json(self.out_dir / "sae" / "cfg.json")["extra"]["store"])
        except (OSError, ValueError, KeyError):
            pass
        return {
            self._fingerprint(path): f"made before checkpoints ignored the store's path (it recorded {path})"
            for path in paths
        }

    def save_checkpoint(self, optimizer: bool = True) -> None:
        """Weights, counters, data position and history; Adam's moments too unless ``optimizer`` is False (a
        finished run needs them only to train further, and they are twice the weights' size)."""
        tensors = {f"sae.{k}": v.detach().contiguous() for k, v in self.sae.state_dict().items()}
        tensors |= {"tokens_since_fired": self.tokens_since_fired}
        if optimizer:
            tensors |= optimizer_tensors(self.sae, self.optimizer)
        state = {
            "fingerprint": self._fingerprint(),
            "step": self.step,
            "epoch": self.epoch,
            "batch_in_epoch": self.batch_in_epoch,
            "history": self.history,
        }
        if self.dist.is_main:
            save_checkpoint(self.checkpoint_dir, tensors, state)
        self.dist.barrier()  # no rank runs ahead of a checkpoint it might have to resume from

    def load_checkpoint(self) -> bool:
        """Restore from ``checkpoint/`` if present; True if restored."""
        found = load_checkpoint(self.checkpoint_dir, self._fingerprint(), self._older_fingerprints())
        if found is None:
            return False
        state, tensors = found
        try:
            self.sae.load_state_dict({k[4:]: v for k, v in tensors.items() if k.startswith("sae.")})
            restore_optimizer(self.sae, self.optimizer, tensors)
            self.tokens_since_fired = tensors["tokens_since_fired"].to(self.dist.device)
        except (KeyError, RuntimeError) as err:
            raise CheckpointError(f"checkpoint in {self.checkpoint_dir} is incomplete or corrupt ({err})") from err
        self.step, self.epoch, self.batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        self.history = state["history"]
        return True

    # -- training --------------------------------------------------------------------------------------
    def _batches(self):
        """Training batches from the saved data position on, epoch after epoch."""
        cfg, device = self.train_cfg, self.dist.device
        while True:
            stream = self.store.batches(
                "train",
                cfg.batch_size,
                shuffle=True,
                seed=cfg.seed * 100_003 + self.epoch,
                skip=self.batch_in_epoch,
                drop_last=True,
                part=self.dist.part(cfg.batch_size) if self.dist.distributed else None,
            )
            if cfg.prefetch_batches:
                stream = prefetch(stream, cfg.prefetch_batches, pin=device.type == "cuda")
            empty = True
            try:
                for x in stream:
                    empty = False
                    self.batch_in_epoch += 1
                    yield x.to(device, non_blocking=True)
            finally:
                stream.close()  # with prefetching, its thread ends with it
            if empty and self.batch_in_epoch == 0:
                raise ValueError(f"the training split has fewer than batch_size={cfg.batch_size} tokens")
            self.epoch += 1
            self.batch_in_epoch = 0

    def train_step(self, x: torch.Tensor) -> dict:
        sae, cfg, dist = self.sae, self.train_cfg, self.dist
        if not torch.isfinite(x).all():
            raise ValueError(
                f"non-finite activations (NaN/Inf) in the training batch at step {self.step}: "
                f"check the activation store {self.store.path}"
            )
        dead = self.tokens_since_fired >= cfg.dead_tokens  # the same on every rank: the counters are global
        loss, fvu, aux, values, indices = self.objective(
            x, dead if dead.any() else None, self.k_aux, self.bf16, cfg.aux_coef
        )
        self.optimizer.zero_grad(set_to_none=True)
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the SAE's loss is {loss.item()} at step {self.step}: training diverged "
                f"(learning rate {self.optimizer.param_groups[0]['lr']:.3g} too high?)"
            )
        loss.backward()
        sae.remove_parallel_gradient()
        torch.nn.utils.clip_grad_norm_(sae.parameters(), cfg.grad_clip)
        for group in self.optimizer.param_groups:
            group["lr"] = lr_at(
                self.step,
                cfg.steps(),
                cfg.learning_rate(self.sae_cfg.n_latents),
                cfg.warmup_fraction,
                cfg.decay_fraction,
            )
        self.optimizer.step()
        sae.normalize_decoder()
        fired = torch.zeros(len(dead), dtype=torch.int32, device=dead.device)
        fired[indices[values > 0]] = 1
        dist.all_reduce(fired, "max")
        self.tokens_since_fired += len(x) * dist.world_size
        self.tokens_since_fired[fired.bool()] = 0
        self.step += 1
        l0 = (values > 0).sum(1).float().mean()
        # the global batch's numbers (this rank's shares summed; every rank's share has the same size)
        fvu, aux, l0 = dist.all_reduce(torch.stack([fvu.detach(), aux.detach(), l0 / dist.world_size])).tolist()
        return {
            "fvu": fvu,
            "aux_loss": aux,
            "l0": l0,
            "dead_fraction": float(dead.float().mean()),
            "lr": self.optimizer.param_groups[0]["lr"],
        }

    @torch.no_grad()
    def quick_eval(self) -> float:
        """Held-out FVU on the first ``eval_tokens`` validation tokens (about the mean, float64)."""
        acc = VarianceAccumulator(self.sae_cfg.d_in)
        for x in self.store.batches("val", 4096, shuffle=False, normalize=True):
            x = x.to(self.dist.device)
            acc.add(x, self.sae(x))
            if acc.n >= self.train_cfg.eval_tokens:
                break
        return acc.fvu()

    def train(self, resume: bool = True, stop_after: int | None = None, keep_optimizer: bool = False) -> TopKSAE:
        """Train to the token budget; ``stop_after`` ends early after that many steps of this call (tests). The
        finished run's checkpoint keeps Adam's moments only with ``keep_optimizer`` (to train further)."""
        cfg = self.train_cfg
        if not resume:
            shutil.rmtree(self.checkpoint_dir, ignore_errors=True)
        elif self.load_checkpoint() and self.dist.is_main:
            print(f"resuming from step {self.step} of {cfg.steps()} ({self.checkpoint_dir})")
        total = cfg.steps()
        eval_every = cfg.eval_every or max(1, total // 20)
        checkpoint_every = cfg.checkpoint_every or max(1, total // 10)
        bar = progress(total=total, initial=self.step, desc="train SAE", unit="step", disable=not self.dist.is_main)
        curves = ScalarLog(self.out_dir, active=self.dist.is_main)  # x axis: training tokens
        started, tokens_at_start, done = time.perf_counter(), self.step * cfg.batch_size, 0
        batches = self._batches()
        try:
            while self.step < total and (stop_after is None or done < stop_after):
                stats = self.train_step(next(batches))
                done += 1
                stats.update(step=self.step, tokens=self.step * cfg.batch_size)
                if self.step % eval_every == 0 or self.step == total:
                    stats["val_fvu"] = self.quick_eval()
                self.history.append(stats)
                curves.add(stats["tokens"], {f"sae/{k}": v for k, v in stats.items() if k not in ("step", "tokens")})
                if self.step % checkpoint_every == 0 and self.step < total:
                    self.save_checkpoint()
                rate = (self.step * cfg.batch_size - tokens_at_start) / (time.perf_counter() - started)  # global
                bar.update(1)
                bar.set_postfix(
                    tok_s=f"{rate:.0f}",
                    fvu=f"{stats['fvu']:.3f}",
                    l0=f"{stats['l0']:.1f}",
                    dead=f"{100 * stats['dead_fraction']:.1f}%",
                    refresh=False,
                )
        finally:
            batches.close()  # its prefetching thread ends here, not at the interpreter's exit (see prefetch)
        bar.close()
        curves.close()
        if self.step >= total:
            self.save_checkpoint(keep_optimizer)  # a finished run: re-running returns at once, no retraining
            self.sae_cfg.extra["git_commit"] = git_commit()
            if self.dist.is_main:
                self.sae.save(self.out_dir / "sae")
                pd.DataFrame(self.history).to_csv(self.out_dir / "history.csv", index=False)
            self.dist.barrier()
        return self.sae

    def history_frame(self) -> pd.DataFrame:
        return pd.DataFrame(self.history)
