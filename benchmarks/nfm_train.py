"""Our NFM training step vs the dense formulation of the same model and vs DeepCTR-Torch's NFM, side by side.

    make bench-setup   # once: .venv-bench with deepctr-torch (and the SAE peers) beside featint
    .venv-bench/bin/python benchmarks/nfm_train.py [--widths 4096 16384] [--steps 6]

The same batches for every implementation: top-k SAE codes (k=32 active of n latents; latent frequencies
Zipf-like, as in a trained SAE; values exponential) and a d=384 target, batch 4096, K=256, Adam.

* **featint**: :class:`featint_utils.residual.nfm.NFM`, everything from the k active rows (embedding bags).
* **dense**: the original study's formulation of the same model and parameters: the code as a dense
  [batch, n] matrix, ``linear = F @ W``, pooling ``0.5 * ((F @ V)^2 - F^2 @ V^2)``. Checked to give the
  same output as ours before timing.
* **DeepCTR-Torch** ``NFM``: k categorical fields sharing one embedding table of n rows (its closest
  encoding of a set of active latents), ``dnn_hidden_units=(K,)``, regression. It cannot take the code's
  values (every active latent counts as 1) and predicts one number, not a d-vector, so it does less work
  per token than the other two; a ratio against it is a lower bound.
* **torchfm** ``NeuralFactorizationMachineModel``: one field of n latents read at the k active positions
  (one shared table), ``mlp_dims=(K,)``, no dropout; like DeepCTR it ignores the values and predicts one
  number (through a sigmoid), so again a lower bound.

Implementations take steps in turn (round robin), so drifts in machine load hit all of them alike; the
reported time is the median step after warm-up.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.residual.nfm import NFM, NFMConfig  # noqa: E402

K_ACTIVE, D, K_EMBED, BATCH = 32, 384, 256, 4096


def make_batches(n_latents: int, n_batches: int, seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, n_latents + 1).float() ** 0.8
    batches = []
    for _ in range(n_batches):
        indices = torch.multinomial(popularity.expand(BATCH, -1), K_ACTIVE, replacement=False, generator=generator)
        values = torch.empty(BATCH, K_ACTIVE).exponential_(generator=generator) + 0.1
        batches.append((values, indices, torch.randn(BATCH, D, generator=generator)))
    return batches


class Featint:
    name = "featint"

    def __init__(self, n_latents):
        self.model = NFM(NFMConfig(n_latents, D, k_embed=K_EMBED, dropout=0.0), seed=0)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self, values, indices, target):
        loss = (self.model(values, indices).output - target).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class Dense:
    """The same parameters as ``Featint``, computed on a dense code as the original study did."""

    name = "dense"

    def __init__(self, n_latents):
        self.model = NFM(NFMConfig(n_latents, D, k_embed=K_EMBED, dropout=0.0), seed=0)
        self.n = n_latents
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def forward(self, values, indices):
        m = self.model
        code = torch.zeros(len(values), self.n).scatter_(1, indices, values)
        linear = code @ m.linear_weight + m.bias
        pooled = 0.5 * ((code @ m.embeddings).square() - code.square() @ m.embeddings.square())
        return linear + m.out(torch.relu(m.hidden(pooled)))

    def step(self, values, indices, target):
        loss = (self.forward(values, indices) - target).pow(2).mean()
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class DeepCTR:
    name = "deepctr-torch"

    def __init__(self, n_latents):
        from deepctr_torch.inputs import SparseFeat
        from deepctr_torch.models import NFM as DeepCTRNFM

        fields = [
            SparseFeat(f"slot{i}", n_latents, embedding_dim=K_EMBED, embedding_name="latent") for i in range(K_ACTIVE)
        ]
        self.model = DeepCTRNFM(
            fields,
            fields,
            dnn_hidden_units=(K_EMBED,),
            task="regression",
            device="cpu",
            l2_reg_embedding=0,
            l2_reg_linear=0,
        )
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self, values, indices, target):
        prediction = self.model(indices.float())  # DeepCTR takes the field columns as one float tensor
        loss = F.mse_loss(prediction.squeeze(-1), target[:, 0])
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


class TorchFM:
    name = "torchfm"

    def __init__(self, n_latents):
        from torchfm.model.nfm import NeuralFactorizationMachineModel

        # field_dims=[n]: a single offset of 0 broadcasts over the k active columns, so they share one table
        self.model = NeuralFactorizationMachineModel([n_latents], K_EMBED, mlp_dims=(K_EMBED,), dropouts=(0.0, 0.0))
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=1e-3)

    def step(self, values, indices, target):
        loss = F.mse_loss(self.model(indices), torch.sigmoid(target[:, 0]))
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()


def check_same_model(n_latents: int) -> float:
    """Max abs difference between our forward and the dense one on the same parameters."""
    ours, dense = Featint(n_latents), Dense(n_latents)
    dense.model.load_state_dict(ours.model.state_dict())
    values, indices, _ = make_batches(n_latents, 1, seed=1)[0]
    with torch.no_grad():
        return float(
            (ours.model(values[:256], indices[:256]).output - dense.forward(values[:256], indices[:256])).abs().max()
        )


def run(n_latents: int, steps: int, warmup: int = 2) -> dict:
    batches = make_batches(n_latents, steps + warmup)
    runners = [Featint(n_latents), Dense(n_latents)]
    for peer in (DeepCTR, TorchFM):
        try:
            runners.append(peer(n_latents))
        except ImportError:
            print(f"{peer.name} is not installed (make bench-setup): skipped")
    times = {r.name: [] for r in runners}
    for i, (values, indices, target) in enumerate(batches):
        for r in runners:
            started = time.perf_counter()
            r.step(values, indices, target)
            if i >= warmup:
                times[r.name].append(time.perf_counter() - started)
    median = {name: statistics.median(t) for name, t in times.items()}
    result = {
        "n_latents": n_latents,
        "batch": BATCH,
        "k_active": K_ACTIVE,
        "K": K_EMBED,
        "d": D,
        "steps_timed": steps,
        "median_step_s": median,
        "tokens_per_s": {name: BATCH / t for name, t in median.items()},
        "speedup_vs": {name: t / median["featint"] for name, t in median.items() if name != "featint"},
        "max_abs_diff_vs_dense": check_same_model(n_latents),
    }
    print(json.dumps(result, indent=2))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--widths", type=int, nargs="+", default=[4096, 16384])
    parser.add_argument("--steps", type=int, default=6)
    args = parser.parse_args()
    torch.manual_seed(0)
    results = {
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "runs": [run(n, args.steps) for n in args.widths],
    }
    out = ROOT / "benchmarks" / "results" / "nfm_train.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
