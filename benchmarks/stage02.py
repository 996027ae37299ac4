"""Stage 02 of a finished run, refitted by an earlier commit's code and by a later one's, side by side.

    .venv/bin/python benchmarks/stage02.py runs/minilm-wikitext --before COMMIT [--after COMMIT] [--threads 2] [--tag T]

Each arm runs the pipeline's :func:`featint_utils.residual.interaction.run` (what stage 02 runs: the residual's
ladder, the null controls, the planted sizes) in its own process, on the run's own residual sets (its cached
codes and residuals, split by its recorded 02 parameters) with those parameters, into a scratch directory:
``before`` imports ``featint_utils`` from a git worktree of ``--before``, ``after`` from one of ``--after``
(default: HEAD; commit a change to measure it). The run itself is only read. Reported: each arm's seconds
inside ``interaction.run``, the speed-up, and whether the two arms' tables are equal (``ladder.csv`` without
its timing column, ``test_sse.csv``, ``planted.json``, ``learning_rates.json``: byte for byte, the ladder's
columns that differ and its largest difference, and every weights file the arms wrote), with both arms'
headline numbers (what 03 reports). Parameters the run did not record (added since) take their defaults.
Writes ``benchmarks/results/stage02_<run name>[_<tag>].json``. ``--before`` may be a commit from before the package
was split into subpackages (the code #24 started from, 2fe126e): its arm imports the flat modules.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from worktrees import add_commit_arguments, arm_environment, check_imported_from, checked_out, report, resolve

ROOT = Path(__file__).resolve().parent.parent
TABLES = ("test_sse.csv", "planted.json", "learning_rates.json")


def fit(run_dir: Path, out: Path, code: Path) -> None:
    """One arm, in this process: the run's stage 02 refitted into ``out`` by the ``featint_utils`` of the worktree
    ``code`` (first on the path; an import from anywhere else is an error)."""
    from types import SimpleNamespace

    import torch

    import featint_utils
    from featint_utils.params import defaults, numbers

    if (Path(featint_utils.__file__).parent / "residual").is_dir():  # the package's layout since the subpackages
        from featint_utils.residual import interaction, interaction_results
        from featint_utils.residual.code_data import open_residual_data, split_fit_tune_test
        from featint_utils.workbench import stages
    else:  # a commit from before them (e.g. the code #24 started from): one flat package
        from featint_utils.residuals import open_residual_data, split_fit_tune_test

        from featint_utils import interaction, stages
        from featint_utils import interaction as interaction_results

    p = defaults("02_nfm") | json.loads((run_dir / "run.json").read_text())["stages"]["02_nfm"]["parameters"]
    data = open_residual_data(run_dir / "nfm" / "residuals")
    sets = split_fit_tune_test(data, p["tune_fraction"], p["test_fraction"], p["nfm_split_seed"])
    cfg = stages.estimator_config(SimpleNamespace(params=p), sets, "cpu")  # the stage's own settings
    started = time.perf_counter()
    interaction.run(sets, cfg, out, numbers(p["power_shares"]), n_planted=p["power_pairs"], resume=False)
    seconds = time.perf_counter() - started
    headline = interaction_results.headline(interaction_results.Results(out))
    check_imported_from(code)
    (out / "arm.json").write_text(
        json.dumps({"seconds": seconds, "threads": torch.get_num_threads(), "headline": headline}, indent=1)
    )


def arm(run_dir: Path, code: Path, out: Path, threads: int) -> dict:
    env = arm_environment(code, threads)
    env["STAGE02_ARM"] = json.dumps({"run": str(run_dir), "out": str(out), "code": str(code)})
    done = subprocess.run([sys.executable, str(Path(__file__).resolve())], env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the arm with {code} failed:\n{done.stderr[-4000:]}")
    return json.loads((out / "arm.json").read_text())


def _same_weights(before: Path, after: Path) -> dict:
    """Every weights file the two arms wrote (fitted models and their checkpoints' tensors), compared byte for
    byte: how many are identical, and which are not or exist in one arm only."""
    names = {p.relative_to(before) for p in before.rglob("*.safetensors")}
    names |= {p.relative_to(after) for p in after.rglob("*.safetensors")}
    differing = [
        str(n)
        for n in sorted(names)
        if not ((before / n).exists() and (after / n).exists()) or (before / n).read_bytes() != (after / n).read_bytes()
    ]
    return {"files": len(names), "identical": len(names) - len(differing), "differing": differing}


def main() -> None:
    if "STAGE02_ARM" in os.environ:  # a worker: one arm
        job = json.loads(os.environ["STAGE02_ARM"])
        fit(Path(job["run"]), Path(job["out"]), Path(job["code"]))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a run whose stage 02 has run (its residual cache is read)")
    add_commit_arguments(parser)
    parser.add_argument("--tag", default="", help="write stage02_<run name>_<tag>.json (not stage02_<run name>.json)")
    args = parser.parse_args()
    run_dir = args.run.resolve()
    if not (run_dir / "nfm" / "residuals").is_dir():
        raise SystemExit(f"{run_dir} has no stage 02 residual cache (nfm/residuals): run its stage 02 first")
    commits = resolve({"before": args.before, "after": args.after})
    result = {"run": run_dir.name, "threads": args.threads, "cores": os.cpu_count(), "arms": {}}
    with checked_out(commits) as (scratch, trees):
        for name in ("before", "after"):
            out = scratch / name
            result["arms"][name] = arm(run_dir, trees[name], out, args.threads) | {"commit": commits[name]}
            print(name, f"{result['arms'][name]['seconds']:.1f} s", flush=True)
        ladders = [pd.read_csv(scratch / n / "ladder.csv").drop(columns="seconds") for n in ("before", "after")]
        shared = [c for c in ladders[0].columns if c in ladders[1].columns]  # an older ladder may lack a column
        result["ladder_columns_in_one_arm"] = sorted(set(ladders[0].columns) ^ set(ladders[1].columns))
        ladders = [ladder[shared] for ladder in ladders]
        numeric = [c for c in shared if pd.api.types.is_numeric_dtype(ladders[0][c])]
        result["equal"] = {
            "ladder.csv": bool(ladders[0].equals(ladders[1])),
            "ladder_largest_difference": float(
                np.nanmax(np.abs(ladders[0][numeric].to_numpy(float) - ladders[1][numeric].to_numpy(float)))
            ),
            "ladder_columns_differing": [c for c in ladders[0].columns if not ladders[0][c].equals(ladders[1][c])],
            **{t: (scratch / "before" / t).read_bytes() == (scratch / "after" / t).read_bytes() for t in TABLES},
            "weights": _same_weights(scratch / "before", scratch / "after"),
        }
    report(result, f"stage02_{run_dir.name}" + (f"_{args.tag}" if args.tag else ""))


if __name__ == "__main__":
    main()
