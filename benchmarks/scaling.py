"""Scale-out: SAE training throughput at 1 and N torchrun ranks, and what the store's prefetch buys.

    .venv/bin/python benchmarks/scaling.py [--ranks 1 2] [--steps 40] [--width 4096]

Every number times the pipeline's own ``SAETrainer.train()`` loop (store reads, prefetch thread, host-to-device
copies, DDP all-reduce, dead-latent bookkeeping; no evaluations or checkpoints fall inside the timed steps) on
the benchmark's WikiText-2 MiniLM store (``sae_train.py``'s), global batch 4096, k=32, after warm-up steps.

* **Ranks.** N ranks under ``torchrun`` (gloo on CPU, NCCL on GPUs), each reading its 4096/N rows of every
  global batch, against one process. On CPU the ranks share the machine's cores: each rank gets one thread
  (``torchrun`` sets ``OMP_NUM_THREADS=1``), so the efficiency is N ranks' tokens/s over N times one
  single-thread process's; one process with every core is reported beside it.
* **Prefetch.** One process: the loop as the pipeline runs it (2 batches read ahead by a background thread,
  pinned on a GPU), the same loop reading each batch when it is needed, and ``train_step`` alone on batches
  already on the device (the ceiling: no data movement at all).
* **GPU** (only where one is present): ``sae_train.py --device cuda`` (featint vs sparsify vs SAELens at 16k
  and 64k latents, k=32 and k=128; needs ``make bench-setup``) and ``extraction.py --device cuda``.

Writes ``benchmarks/results/scaling.json``.
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

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from sae_train import get_store  # noqa: E402

from featint_utils.data import distributed  # noqa: E402
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig  # noqa: E402

BATCH, K, WARMUP = 4096, 32, 5
RESULTS = ROOT / "benchmarks" / "results"


def trainer(width: int, steps: int, out_dir: Path, dist, prefetch: int = 2) -> SAETrainer:
    config = TrainConfig(
        train_tokens=BATCH * (WARMUP + steps + 1),
        batch_size=BATCH,
        eval_every=10**9,  # no periodic evaluation inside the timed steps
        checkpoint_every=10**9,  # nor checkpoints
        prefetch_batches=prefetch,
    )
    return SAETrainer(get_store(), width, K, config, out_dir, dist)


def synchronize(dist) -> None:
    if dist.device.type == "cuda":
        torch.cuda.synchronize(dist.device)
    dist.barrier()


def timed_loop(job: SAETrainer, steps: int) -> float:
    """Seconds for ``steps`` steps of ``train()`` after the warm-up steps."""
    job.train(stop_after=WARMUP)
    synchronize(job.dist)
    started = time.perf_counter()
    job.train(stop_after=steps)
    synchronize(job.dist)
    return time.perf_counter() - started


def worker(args) -> None:
    """One rank (or the only process) of a throughput measurement; rank 0 writes the result."""
    dist = distributed.init(args.device)
    with tempfile.TemporaryDirectory() as tmp:
        seconds = timed_loop(trainer(args.width, args.steps, Path(tmp), dist), args.steps)
    if dist.is_main:
        Path(args.worker).write_text(
            json.dumps(
                {
                    "ranks": dist.world_size,
                    "threads_per_rank": torch.get_num_threads(),
                    "tokens_per_s": args.steps * BATCH / seconds,
                }
            )
        )
    distributed.shutdown()


def measure_ranks(ranks: int, args, threads: int | None = None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        common = [__file__, "--worker", str(out), "--width", str(args.width), "--steps", str(args.steps)]
        common += ["--device", args.device]
        env = os.environ | ({"OMP_NUM_THREADS": str(threads)} if threads else {})
        if ranks == 1:
            command = [sys.executable, *common]
        else:
            command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"]
            command += common
        subprocess.run(command, cwd=ROOT, env=env, check=True, capture_output=True, text=True)
        return json.loads(out.read_text())


def measure_prefetch(args) -> dict:
    """The pipeline's loop with and without read-ahead, and the step alone on batches already on the device."""
    dist = distributed.init(args.device)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, depth in (("prefetch_2", 2), ("no_prefetch", 0)):
            job = trainer(args.width, args.steps, Path(tmp) / name, dist, depth)
            out[name] = args.steps * BATCH / timed_loop(job, args.steps)
        job = trainer(args.width, args.steps, Path(tmp) / "resident", dist)
        batches = job._batches()
        resident = [next(batches) for _ in range(WARMUP + args.steps)]  # read and moved before the clock starts
        for x in resident[:WARMUP]:
            job.train_step(x)
        synchronize(dist)
        started = time.perf_counter()
        for x in resident[WARMUP:]:
            job.train_step(x)
        synchronize(dist)
        out["batches_on_device"] = args.steps * BATCH / (time.perf_counter() - started)
    out["prefetch_vs_on_device"] = out["prefetch_2"] / out["batches_on_device"]
    out["prefetch_vs_none"] = out["prefetch_2"] / out["no_prefetch"]
    return out


def gpu_comparisons() -> dict:
    """The peers on the GPU and extraction vs a bare forward; each script writes its own result file."""
    python = ROOT / ".venv-bench" / "bin" / "python"
    python = str(python) if python.exists() else sys.executable
    for k in (32, 128):
        subprocess.run(
            [python, "benchmarks/sae_train.py", "--device", "cuda", "--widths", "16384", "65536", "--k", str(k)],
            cwd=ROOT,
            check=True,
        )
    subprocess.run([sys.executable, "benchmarks/extraction.py", "--device", "cuda"], cwd=ROOT, check=True)
    return {
        "sae_train": [json.loads((RESULTS / f"sae_train_cuda_k{k}.json").read_text()) for k in (32, 128)],
        "extraction": json.loads((RESULTS / "extraction_cuda.json").read_text()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--width", type=int, default=4096)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    get_store()  # built once here if missing, not by every rank
    cpu = args.device == "cpu"
    result = {
        "device": args.device,
        "cores": os.cpu_count(),
        "width": args.width,
        "k": K,
        "global_batch": BATCH,
        "steps": args.steps,
        "load_average_at_start": list(os.getloadavg()),
    }
    single = measure_ranks(1, args, threads=1 if cpu else None)
    result["one_process_one_thread" if cpu else "one_gpu"] = single
    if cpu:
        result["one_process_all_cores"] = measure_ranks(1, args)
    result["ranks"] = {}
    for ranks in (r for r in args.ranks if r > 1):
        measured = measure_ranks(ranks, args)
        measured["scaling_efficiency"] = measured["tokens_per_s"] / (ranks * single["tokens_per_s"])
        if cpu:
            measured["vs_one_process_all_cores"] = (
                measured["tokens_per_s"] / result["one_process_all_cores"]["tokens_per_s"]
            )
        result["ranks"][str(ranks)] = measured
    result["prefetch"] = measure_prefetch(args)
    result["gpu"] = gpu_comparisons() if torch.cuda.is_available() else "no GPU on this machine: not run"
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "scaling.json").write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
