"""One rank of a data-parallel SAE training, started by the tests with ``torchrun`` (gloo on CPU).

``python -m torch.distributed.run --nproc_per_node 2 tests/dist_worker.py STORE OUT [--kill-rank R --kill-at S]``
trains the tests' small SAE on STORE into OUT; with ``--kill-rank``, rank R kills itself (SIGKILL, as an
out-of-memory killer would) after step S, the others carrying on into the next step's all-reduce.
"""

import argparse
import os
import signal

from featint_utils.data import distributed
from featint_utils.data.activation_store import ActivationStore
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig

SETTINGS = {"n_latents": 256, "k": 4}
CONFIG = {"train_tokens": 12 * 512, "batch_size": 512, "lr": 3e-3, "dead_tokens": 1024, "checkpoint_every": 5}


def trainer(store: str, out: str, dist) -> SAETrainer:
    return SAETrainer(ActivationStore(store), **SETTINGS, train=TrainConfig(**CONFIG), out_dir=out, dist=dist)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("store")
    parser.add_argument("out")
    parser.add_argument("--kill-rank", type=int, default=-1)
    parser.add_argument("--kill-at", type=int, default=0)
    args = parser.parse_args()
    dist = distributed.init("cpu")
    job = trainer(args.store, args.out, dist)
    if dist.rank == args.kill_rank:
        job.train(stop_after=args.kill_at)
        os.kill(os.getpid(), signal.SIGKILL)
    job.train()
    distributed.shutdown()


if __name__ == "__main__":
    main()
