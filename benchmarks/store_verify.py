"""What verifying a store's checksums costs, on the WikiText run's store, beside one pass of SAE training reads.

    .venv/bin/python benchmarks/store_verify.py [--store runs/minilm-wikitext/activations]

The run spine verifies every file of the activation store (sha256 against the manifest) each time a stage
opens it (:meth:`ActivationStore.verify`). Times, in one process on the same store: a full check (every byte
hashed), the cached check that every later stage does (a file whose size and mtime are those of its last
successful check is not read again), and one pass over the training split as the SAE trainer reads it
(shuffled batches of 4096), the reference for what reading the store costs anyway. The page cache is warm for
all three (the pass runs first).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.data.activation_store import VERIFIED, ActivationStore  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--store", default=str(ROOT / "runs" / "minilm-wikitext" / "activations"))
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    store = ActivationStore(args.store)
    size = sum((store.path / name).stat().st_size for name in store.checksummed_files())

    def one_pass():
        for _ in store.batches("train", 4096, shuffle=True, seed=0):
            pass

    def full():
        store.verify(cached=False)

    def cached():
        store.verify(cached=True)

    timings = {}
    for name, fn in (("training_pass", one_pass), ("full_verify", full), ("cached_verify", cached)):
        seconds = []
        for _ in range(args.repeats):
            started = time.perf_counter()
            fn()
            seconds.append(time.perf_counter() - started)
        timings[name] = min(seconds)
        print(f"{name}: {timings[name]:.3f} s (best of {args.repeats})")
    result = {
        "store": str(store.path),
        "files": len(store.checksummed_files()),
        "megabytes": round(size / 2**20, 1),
        "train_tokens": store.n_tokens("train"),
        "seconds": {k: round(v, 4) for k, v in timings.items()},
        "full_verify_vs_training_pass": round(timings["full_verify"] / timings["training_pass"], 3),
        "cached_verify_vs_training_pass": round(timings["cached_verify"] / timings["training_pass"], 5),
        "full_verify_mb_per_s": round(size / 2**20 / timings["full_verify"], 1),
        "cpu_count": os.cpu_count(),
        "verified_record": VERIFIED,
    }
    out = ROOT / "benchmarks" / "results" / "store_verify.json"
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
