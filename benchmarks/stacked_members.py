"""Would training the ladder's members together pay on this machine? (#24's "members trained together")

    .venv/bin/python benchmarks/stacked_members.py [--members 1 2 4 8] [--epochs 2] [--device cpu]

The ladder trains its independent members (NFM seeds, null controls, planted sizes) one after another, each with
the pipeline's :class:`~featint_utils.residual.nfm_training.ResidualTrainer` (its own pass over the batches,
its own forward, backward, clipping and AdamW step). Stacked, ``M`` members with the same shape would read and
gather every batch once, compute their shared first-order part once (nested NFMs of one target start from the
same ridge), and run one batched forward and backward: the factor embeddings of all members as one table (an
embedding bag over ``M x batch`` rows), the two linear layers as batched matrix products, per-member clipping
and one AdamW step over the stacked tensors.

Both arms train the same ``M`` NFMs (the pipeline's :class:`~featint_utils.residual.nfm.NFM`, nested in a
fixed first-order part and calibrated as the ladder does: the seeds of one target, the case where stacking shares
the most) on the same planted code and residual, on the
stage's shapes (embedded and minilm-wikitext: 4096 latents, k=32, d=384, K=256, batch 1024). ``one_by_one``
times the pipeline's own ``ResidualTrainer.train_epoch`` for each member; ``stacked`` times the stacked step
written here (the candidate, not pipeline code), after checking that its forward equals every member's own to
float tolerance. The candidate leaves out two things the trainer does per step: its host sync (reading the
batch's error for the epoch's loss) and, on CUDA, its background prefetch; on a GPU read its ratio with that in
mind. Each arm's first epoch is a warm-up and is not timed. Reported per ``M``: milliseconds per
member and step in each arm and their ratio. Writes ``benchmarks/results/stacked_members.json``
(``stacked_members_<device>.json`` off the CPU).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from featint_utils.residual import planted
from featint_utils.residual.code_data import split_fit_tune_test
from featint_utils.residual.nfm import NFM, NFMConfig, bi_interaction
from featint_utils.residual.nfm_training import FitConfig, ResidualTrainer

SHAPE = {"n_tokens": 48_000, "n_latents": 4096, "k": 32, "d": 384}
K_EMBED, BATCH = 256, 1024


def members(sets, m: int, device: str) -> list[NFM]:
    """``m`` nested NFMs (seeds 0..m-1) over one first-order start, calibrated on the fitting set as the ladder's."""
    fit = sets["fit"]
    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(SHAPE["n_latents"], SHAPE["d"], generator=generator) * 0.01
    sample = fit.batch(torch.arange(min(len(fit), 8192)).numpy())
    rms = float(sample.target.square().mean().sqrt())
    cfg = NFMConfig(SHAPE["n_latents"], SHAPE["d"], k_embed=K_EMBED)
    return [
        NFM(cfg, seed=s)
        .start_from(weight, torch.zeros(SHAPE["d"]))
        .calibrate(sample.values, sample.indices, rms)
        .to(device)
        for s in range(m)
    ]


class Stacked(torch.nn.Module):
    """``M`` NFMs of one shape and one first-order start as stacked tensors (see the module docstring)."""

    def __init__(self, models: list[NFM]):
        super().__init__()
        first = models[0]
        self.members = [first]  # a list, not a submodule: only its frozen first-order part is used, once per batch
        self.embeddings = torch.nn.Parameter(torch.stack([m.embeddings.detach() for m in models]).clone())
        self.w1 = torch.nn.Parameter(torch.stack([m.hidden.weight.detach() for m in models]).clone())
        self.b1 = torch.nn.Parameter(torch.stack([m.hidden.bias.detach() for m in models]).clone())
        self.w2 = torch.nn.Parameter(torch.stack([m.out.weight.detach() for m in models]).clone())
        self.b2 = torch.nn.Parameter(torch.stack([m.out.bias.detach() for m in models]).clone())
        self.register_buffer("scale", torch.stack([m.output_scale for m in models]).reshape(-1, 1, 1))
        self.dropout = first.cfg.dropout

    def forward(self, values: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """[M, batch, d]: every member's prediction."""
        m, n = self.embeddings.shape[:2]
        # member j's rows of the one table are j * n_latents + its latents: one pooling over M x batch tokens
        rows = (indices.unsqueeze(0) + n * torch.arange(m, device=indices.device).view(-1, 1, 1)).flatten(0, 1)
        pooled = bi_interaction(values.repeat(m, 1), rows, self.embeddings.flatten(0, 1))
        pooled = F.dropout(pooled, self.dropout, self.training).view(m, len(values), -1)
        hidden = torch.relu(torch.baddbmm(self.b1.unsqueeze(1), pooled, self.w1.transpose(1, 2)))
        interaction = torch.baddbmm(self.b2.unsqueeze(1), hidden, self.w2.transpose(1, 2)) * self.scale
        return self.members[0].first_order(values, indices).unsqueeze(0) + interaction


def stacked_epoch(model: Stacked, optimizer, fit, variance: float, epoch: int, device: str) -> None:
    """One pass: each batch read once, one forward and backward for every member, clipping per member."""
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    for batch in fit.batches(BATCH, shuffle=True, seed=epoch, part=slice(0, BATCH)):
        batch = batch.to(device)
        error = (batch.target.unsqueeze(0) - model(batch.values, batch.indices)).square().sum()
        optimizer.zero_grad(set_to_none=True)
        (error / (BATCH * variance)).backward()  # members are independent: one backward gives each its gradient
        norms = torch.stack([p.grad.flatten(1).square().sum(1) for p in params]).sum(0).sqrt()
        factor = (1.0 / (norms + 1e-6)).clamp(max=1.0)  # clip_grad_norm_(1.0) per member
        for p in params:
            p.grad.mul_(factor.view(-1, *[1] * (p.dim() - 1)))
        optimizer.step()


def measure(sets, m: int, epochs: int, device: str) -> dict:
    fit, tune = sets["fit"], sets["tune"]
    steps = len(fit) // BATCH
    with tempfile.TemporaryDirectory() as scratch:
        trainers = [
            ResidualTrainer(model, fit, tune, FitConfig(batch_size=BATCH, seed=s), Path(scratch) / f"m{s}")
            for s, model in enumerate(members(sets, m, device))
        ]
        for epoch in range(epochs + 1):  # the first epoch warms up (allocator, kernels) and is not timed
            if epoch == 1:
                started = time.perf_counter()
            for trainer in trainers:
                trainer.epoch = epoch
                trainer.train_epoch()
        one_by_one = time.perf_counter() - started

    models = members(sets, m, device)
    stacked = Stacked(models).to(device)
    check = fit.batch(torch.arange(BATCH).numpy()).to(device)
    with torch.no_grad():
        stacked.eval()
        together = stacked(check.values, check.indices)
        alone = torch.stack([model.eval()(check.values, check.indices).output for model in models])
    largest = float((together - alone).abs().max())
    if largest > 1e-4 * float(alone.abs().max()):
        raise AssertionError(f"the stacked forward differs from the members' own by {largest:.3g}")
    optimizer = torch.optim.AdamW([p for p in stacked.parameters() if p.requires_grad], lr=1e-3, foreach=True)
    variance = float(fit.batch(torch.arange(len(fit)).numpy()).target.var(0).sum())
    for epoch in range(epochs + 1):
        if epoch == 1:
            started = time.perf_counter()
        stacked_epoch(stacked, optimizer, fit, variance, epoch, device)
    if torch.device(device).type == "cuda":  # the trainer's steps end on a host sync; these are still queued
        torch.cuda.synchronize()
    together_s = time.perf_counter() - started
    per = lambda seconds: 1000 * seconds / (epochs * steps * m)  # noqa: E731
    return {
        "members": m,
        "steps": epochs * steps,
        "one_by_one_ms_per_member_step": per(one_by_one),
        "stacked_ms_per_member_step": per(together_s),
        "speedup": one_by_one / together_s,
        "forward_largest_difference": largest,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--members", type=int, nargs="+", default=[1, 2, 4, 8])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    sets = split_fit_tune_test(planted.codes(**SHAPE, seed=0), 0.15, 0.15, seed=0)
    rows = [measure(sets, m, args.epochs, args.device) for m in args.members]
    for row in rows:
        print(json.dumps(row))
    result = {"shape": SHAPE | {"k_embed": K_EMBED, "batch": BATCH}, "threads": torch.get_num_threads()}
    result |= {"device": args.device, "cores": os.cpu_count(), "rows": rows}
    name = "stacked_members" + ("" if args.device == "cpu" else f"_{args.device.split(':')[0]}")
    (Path(__file__).parent / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
