"""featint's TopK SAE training step vs SAELens's and EleutherAI sparsify's, on the same activations, side by side.

    make bench-setup   # once: .venv-bench with sae-lens, eai-sparsify, deepctr-torch beside featint
    .venv-bench/bin/python benchmarks/sae_train.py [--widths 4096 16384] [--tokens 500000] [--lrs 3e-3 1e-2]
        [--k 32] [--device cpu|cuda]

featint's numbers come from the pipeline's own code: a real ``featint_utils.dictionary.sae_training.SAETrainer`` on the
benchmark's ActivationStore, with a ``TrainConfig`` holding the shared settings, and only
``SAETrainer.train_step(x)`` is timed, with all it does per step (finite check of the batch, dead-latent
bookkeeping, its statistics); ``train()``'s periodic evaluations and checkpoints are not part of the step
and are not timed (nothing is written to disk).

Activations: all-MiniLM-L6-v2 hidden_states[3] on WikiText-2 validation (../shared/data), split by article,
normalised to E||x||^2 = d_in (``store.load(..., normalize=True)``: the same float32 values that
``store.batches(..., normalize=True)`` feeds ``SAETrainer``). Every library trains on exactly the same batch
tensors in the same order, with the same width, k=32, batch 4096, token budget, Adam, learning-rate schedule
(``lr_at`` with the TrainConfig's warm-up and decay fractions; SAETrainer sets its own rate each step and the
script checks it equals the peers') and gradient clipping, once per learning rate of a shared grid. No latent
can be dead before ``TrainConfig.dead_tokens`` (10M) tokens, so below that budget SAETrainer's AuxK pass never
runs, as for the peers (no dead mask). The libraries parametrise their decoders differently (SAELens starts
decoder rows at norm 0.1, leaves them free and rescales activations by them; sparsify and featint keep them at
unit norm), so one nominal learning rate is not the same step for all; each library is judged at its best
rate of the grid. The libraries take steps in turn, round robin, so drifts in machine load hit all of them
alike; tokens/s counts only each library's own step time. Held-out FVU is measured for every library by the
same float64 function on the same validation tokens, in float32 (featint: ``trainer.sae``).
SAELens runs in its default dense mode: its ``use_sparse_activations=True`` fails in the backward pass on
CPU with torch 2.13 (``aten::view`` has no SparseCPU kernel).

``--device cuda`` runs every library on the GPU (featint's ``SAETrainer`` on that device), the batches already
there, each step's time taken after ``torch.cuda.synchronize()``; results go to ``sae_train_cuda_k<k>.json``.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.data import activation_store, extraction, models  # noqa: E402
from featint_utils.data.activation_store import ActivationStore  # noqa: E402
from featint_utils.data.corpus import load_text_file, split_by_group  # noqa: E402
from featint_utils.data.distributed import Dist  # noqa: E402
from featint_utils.dictionary.metrics import VarianceAccumulator  # noqa: E402
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig, lr_at  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
STORE = ROOT / "runs" / "bench" / "minilm-wikitext2-l3"
BATCH = 4096
K = 32  # --k sets it
DEVICE = torch.device("cpu")  # --device sets it


def synchronize() -> None:
    """A step's time ends when the device has finished it (CUDA runs kernels asynchronously)."""
    if DEVICE.type == "cuda":
        torch.cuda.synchronize(DEVICE)


def get_store() -> ActivationStore:
    try:
        return ActivationStore(STORE)
    except activation_store.StoreError:
        split = split_by_group(load_text_file(WIKITEXT), 0.1, seed=0)
        return extraction.extract(models.load_model("embedded"), split, 3, STORE, corpus=str(WIKITEXT))


class Featint:
    """The pipeline's own trainer: ``SAETrainer.train_step`` sets its learning rate from its TrainConfig."""

    name = "featint"

    def __init__(self, store: ActivationStore, width: int, cfg: TrainConfig):
        # only SAETrainer.train() writes to out_dir (checkpoints, the SAE); train_step writes nothing
        unused = STORE.parent / f"sae-train-unused-{width}-{cfg.lr:g}"
        self.trainer = SAETrainer(store, width, K, cfg, unused, Dist(device=DEVICE))
        self.opt = self.trainer.optimizer

    def step(self, x, _lr):
        self.trainer.train_step(x)

    @torch.no_grad()
    def reconstruct(self, x):
        return self.trainer.sae(x)


class Sparsify:
    name = "sparsify"

    def __init__(self, store: ActivationStore, width: int, cfg: TrainConfig):
        from sparsify import SparseCoder, SparseCoderConfig

        torch.manual_seed(cfg.seed)
        self.sae = SparseCoder(
            store.d_model, SparseCoderConfig(num_latents=width, k=K), device=DEVICE, dtype=torch.float32
        )
        self.opt = torch.optim.Adam(self.sae.parameters())
        self.clip = cfg.grad_clip

    def step(self, x, lr):
        out = self.sae(x, dead_mask=None)
        self.opt.zero_grad(set_to_none=True)
        (out.fvu + out.auxk_loss).backward()
        self.sae.remove_gradient_parallel_to_decoder_directions()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.clip)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()
        self.sae.set_decoder_norm_to_unit_norm()

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae(x).sae_out


class SAELens:
    name = "saelens"

    def __init__(self, store: ActivationStore, width: int, cfg: TrainConfig):
        from sae_lens import TopKTrainingSAE, TopKTrainingSAEConfig

        torch.manual_seed(cfg.seed)
        sae_cfg = TopKTrainingSAEConfig(d_in=store.d_model, d_sae=width, k=K, dtype="float32", device=str(DEVICE))
        self.sae = TopKTrainingSAE(sae_cfg)
        self.opt = torch.optim.Adam(self.sae.parameters())
        self.clip = cfg.grad_clip
        self.n = 0

    def step(self, x, lr):
        from sae_lens.saes.sae import TrainStepInput

        out = self.sae.training_forward_pass(
            TrainStepInput(
                sae_in=x, coefficients={}, dead_neuron_mask=None, n_training_steps=self.n, is_logging_step=False
            )
        )
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        torch.nn.utils.clip_grad_norm_(self.sae.parameters(), self.clip)
        self.opt.param_groups[0]["lr"] = lr
        self.opt.step()
        self.n += 1

    @torch.no_grad()
    def reconstruct(self, x):
        return self.sae(x)


@torch.no_grad()
def held_out_fvu(lib, val: torch.Tensor) -> float:
    acc = VarianceAccumulator(val.shape[1])
    for start in range(0, len(val), 8192):
        x = val[start : start + 8192]
        acc.add(x, lib.reconstruct(x).float())
    return acc.fvu()


def run_width(store, width: int, shared: TrainConfig, lrs: list[float], train, val, libraries) -> dict:
    """Every library trains once per learning rate; all of them take each step in turn (round robin)."""
    runs = [(cls(store, width, dataclasses.replace(shared, lr=lr)), lr) for cls in libraries for lr in lrs]
    steps = shared.steps()
    rng = np.random.default_rng(shared.seed)
    order = np.concatenate([rng.permutation(len(train)) for _ in range(shared.train_tokens // len(train) + 1)])
    seconds = {lib.name: 0.0 for lib, _ in runs}
    for step in range(steps):
        x = train[order[step * BATCH : (step + 1) * BATCH]]
        for lib, lr in runs:
            lr_now = lr_at(step, steps, lr, shared.warmup_fraction, shared.decay_fraction)
            synchronize()
            started = time.perf_counter()
            lib.step(x, lr_now)
            synchronize()
            seconds[lib.name] += time.perf_counter() - started
            if lib.opt.param_groups[0]["lr"] != lr_now:  # SAETrainer schedules its own rate: same as the peers'?
                raise RuntimeError(f"{lib.name} stepped at lr {lib.opt.param_groups[0]['lr']}, not {lr_now}")
        if step % 20 == 0:
            print(f"  width {width} step {step}/{steps}", {k: round(v, 1) for k, v in seconds.items()}, flush=True)
    result = {"width": width, "k": K, "batch": BATCH, "steps": steps, "tokens": steps * BATCH, "libraries": {}}
    for lib, lr in runs:
        entry = result["libraries"].setdefault(lib.name, {"held_out_fvu_by_lr": {}})
        entry["held_out_fvu_by_lr"][str(lr)] = held_out_fvu(lib, val)
    for name, entry in result["libraries"].items():
        entry["tokens_per_s"] = len(lrs) * steps * BATCH / seconds[name]
        best_lr = min(entry["held_out_fvu_by_lr"], key=entry["held_out_fvu_by_lr"].get)
        entry["best_lr"], entry["held_out_fvu"] = float(best_lr), entry["held_out_fvu_by_lr"][best_lr]
    ours = result["libraries"]["featint"]
    peers = {n: r for n, r in result["libraries"].items() if n != "featint"}
    if not peers:  # every peer skipped (not installed where this runs): featint's own numbers only
        return result
    result["speedup_vs"] = {n: ours["tokens_per_s"] / r["tokens_per_s"] for n, r in peers.items()}
    result["speedup_vs_fastest_peer"] = ours["tokens_per_s"] / max(r["tokens_per_s"] for r in peers.values())
    result["fvu_equal_or_better_than_every_peer"] = all(
        ours["held_out_fvu"] <= r["held_out_fvu"] for r in peers.values()
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--tokens", type=int, default=500_000)
    parser.add_argument("--lrs", type=float, nargs="+", default=[3e-3, 1e-2])
    parser.add_argument("--bf16", choices=["auto", "on", "off"], default="auto")
    parser.add_argument("--skip", nargs="*", default=[], help="libraries to leave out")
    parser.add_argument("--k", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    global K, DEVICE
    K, DEVICE = args.k, torch.device(args.device)
    load_at_start = os.getloadavg()  # before a first run's extraction: other jobs on the machine distort timings
    torch.manual_seed(0)
    store = get_store()
    train = torch.from_numpy(store.load("train", normalize=True))
    val = torch.from_numpy(store.load("val", normalize=True))
    # SAETrainer's own input: store.batches(..., normalize=True); every library gets these very values
    first_rows = next(store.batch_rows("train", BATCH))
    if not torch.equal(next(store.batches("train", BATCH, normalize=True)), train[first_rows]):
        raise RuntimeError("store.load(normalize=True) does not give the values store.batches feeds SAETrainer")
    train, val = train.to(DEVICE), val.to(DEVICE)
    shared = TrainConfig(
        train_tokens=args.tokens,
        batch_size=BATCH,
        warmup_fraction=0.05,
        decay_fraction=0.2,
        grad_clip=1.0,
        seed=0,
        bf16_encoder=args.bf16,
    )
    bf16 = shared.use_bf16(DEVICE)
    libraries = [c for c in (Featint, Sparsify, SAELens) if c.name not in args.skip]
    results = {
        "store": str(STORE),
        "train_tokens_available": len(train),
        "val_tokens": len(val),
        "featint": "SAETrainer.train_step",
        "featint_bf16_encoder": bf16,
        "threads": torch.get_num_threads(),
        "device": str(DEVICE) + (f" ({torch.cuda.get_device_name(DEVICE)})" if DEVICE.type == "cuda" else ""),
        "k": K,
        "load_average_at_start": list(load_at_start),
        "runs": [],
    }
    for width in args.widths:
        results["runs"].append(run_width(store, width, shared, args.lrs, train, val, libraries))
        name = "sae_train" + ("" if bf16 else "_fp32") if DEVICE.type == "cpu" else f"sae_train_{DEVICE.type}_k{K}"
        out = ROOT / "benchmarks" / "results" / f"{name}.json"
        out.write_text(json.dumps(results, indent=2) + "\n")
    for run in results["runs"]:
        print(f"width {run['width']}, k={K}, batch {BATCH}, {run['tokens']} tokens (featint bf16 encoder: {bf16})")
        for name, r in run["libraries"].items():
            print(
                f"  {name:15s} {r['tokens_per_s']:9.0f} tok/s   best held-out FVU {r['held_out_fvu']:.4f} "
                f"(lr {r['best_lr']:g}; by lr {r['held_out_fvu_by_lr']})"
            )
        print(f"  featint speed-up vs fastest peer: {run['speedup_vs_fastest_peer']:.2f}x  ({run['speedup_vs']})")


if __name__ == "__main__":
    main()
