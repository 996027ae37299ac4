"""Stage 02's ladder over ranks: later targets dealt to the ranks against one process, and against every model
data-parallel (what stage 02 did before members were dealt).

    .venv/bin/python benchmarks/ladder.py [--epochs 2] [--arms single dealt ddp single_all_cores]

Every arm times the pipeline's own :func:`featint_utils.residual.interaction.run` (the residual's ladder, the null
controls, four planted sizes: six targets after the residual) on a planted code and residual
(:data:`SHAPE`; one seed, one learning rate, ``--epochs`` epochs, no early stop), into a fresh directory, each
arm in its own process:

* ``single``: one process, one thread;
* ``dealt``: two ``torchrun`` ranks (gloo), one thread each: every rank fits the residual, the other targets
  are dealt (the default over ranks);
* ``ddp``: two ranks, one thread each, every model data-parallel (``deal=False``);
* ``single_all_cores``: one process with every core, for reference;
* ``cuda``: one process on the GPU (``benchmarks/gpu_check.sh`` runs ``--arms single_all_cores cuda``).

Reported: each arm's seconds inside ``interaction.run`` (rank 0) and for the whole process (start-up, data
loading and, for the ranks, the process group included), the speed-ups over the first arm, and whether each
arm's ``ladder.csv`` equals the first arm's (largest absolute difference of its numbers). Writes
``benchmarks/results/ladder.json`` (``ladder_cuda.json`` when a GPU arm ran).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

ROOT = Path(__file__).resolve().parent.parent
RESULTS = Path(__file__).parent / "results" / "ladder.json"


ARMS = ("single", "dealt", "ddp", "single_all_cores", "cuda")

SHAPE = {"n_tokens": 60_000, "n_latents": 1024, "k": 32, "d": 128}
"""The benchmark's planted code and residual (``featint_utils.residual.planted.codes``): first-order part, noise."""


def fit(out: str, epochs: int, deal: bool | None, device: str = "cpu") -> None:
    """One arm, in this process (and rank): the ladder into ``out``."""
    import torch

    from featint_utils.data import distributed
    from featint_utils.residual import interaction, planted
    from featint_utils.residual.code_data import split_fit_tune_test
    from featint_utils.residual.nfm import NFMConfig
    from featint_utils.residual.nfm_training import FitConfig

    dist = distributed.init(device)
    sets = split_fit_tune_test(planted.codes(**SHAPE, seed=0), 0.15, 0.3, seed=0)
    cfg = interaction.EstimatorConfig(
        NFMConfig(SHAPE["n_latents"], SHAPE["d"], k_embed=64, dropout=0.15),
        FitConfig(batch_size=1024, max_epochs=epochs, patience=epochs),
        seeds=(0,),
        lr_grid=(3e-3,),
        n_pairs=512,
        device=str(dist.device),
    )
    started = time.perf_counter()
    interaction.run(sets, cfg, out, (0.001, 0.003, 0.01, 0.03), n_planted=16, resume=False, dist=dist, deal=deal)
    if dist.is_main:
        seconds = time.perf_counter() - started
        Path(out, "seconds.json").write_text(json.dumps({"ladder": seconds, "threads": torch.get_num_threads()}))
    distributed.shutdown()


def arm(name: str, out: Path, epochs: int) -> dict:
    """Run one arm in a fresh process; its seconds. (The arm reaches the worker through the environment:
    ``torchrun`` would read options after the script as its own.)"""
    env = dict(
        os.environ, PYTHONPATH=str(ROOT), LADDER_ARM=json.dumps({"arm": name, "out": str(out), "epochs": epochs})
    )
    script = str(Path(__file__).resolve())
    if name in ("single_all_cores", "cuda"):
        env.pop("OMP_NUM_THREADS", None)
        command = [sys.executable, script]
    elif name == "single":
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, script]
    else:
        env["OMP_NUM_THREADS"] = "1"
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script]
    started = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"arm {name} failed:\n{done.stderr[-4000:]}")
    inside = json.loads((out / "seconds.json").read_text())
    return {"seconds": inside["ladder"], "process_seconds": time.perf_counter() - started, "threads": inside["threads"]}


def largest_difference(a: pd.DataFrame, b: pd.DataFrame) -> float:
    numbers = [c for c in a.columns if c != "seconds" and pd.api.types.is_numeric_dtype(a[c])]
    return float(np.nanmax(np.abs(a[numbers].to_numpy(float) - b[numbers].to_numpy(float))))


def main() -> None:
    if "LADDER_ARM" in os.environ:  # a worker: one arm
        job = json.loads(os.environ["LADDER_ARM"])
        deal = {"dealt": True, "ddp": False}.get(job["arm"])
        fit(job["out"], job["epochs"], deal, "cuda" if job["arm"] == "cuda" else "cpu")
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs of each gradient-trained model")
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS[:4]), help="the first is the baseline")
    args = parser.parse_args()
    results = {"data": SHAPE, "epochs": args.epochs, "cores": os.cpu_count(), "arms": {}}
    with tempfile.TemporaryDirectory() as scratch:
        tables = {}
        for name in args.arms:
            out = Path(scratch) / name
            results["arms"][name] = arm(name, out, args.epochs)
            tables[name] = pd.read_csv(out / "ladder.csv")
            print(name, results["arms"][name], flush=True)
    first = args.arms[0]
    results["baseline"] = first
    for name, row in results["arms"].items():
        row["speedup"] = results["arms"][first]["seconds"] / row["seconds"]
        row["process_speedup"] = results["arms"][first]["process_seconds"] / row["process_seconds"]
        row["largest_difference_from_baseline"] = largest_difference(tables[name], tables[first])
        row["rows"] = len(tables[name])
    if "cuda" in args.arms:
        import torch

        results["device"] = torch.cuda.get_device_name(0)
    path = RESULTS.with_name("ladder_cuda.json") if "cuda" in args.arms else RESULTS
    path.write_text(json.dumps(results, indent=1))
    print(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
