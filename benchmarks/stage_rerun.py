"""One stage of a finished run, rerun by an earlier commit's code and by a later one's, side by side.

    .venv/bin/python benchmarks/stage_rerun.py runs/embedded --stage 06 --before COMMIT [--after HEAD]

Each arm copies the run directory into a scratch folder (the run is only read) and reruns the stage there
exactly as ``make run`` does (``python -m featint_utils run --run-dir COPY --only STAGE --no-reports``), with
``featint_utils`` imported from a git worktree of its commit (commit a change to measure it); the arms run one
after the other on the same machine. Reported: each arm's wall seconds for the stage (the notebook's own,
papermill included, as ``run.json`` records it), the speed-up, and every file the two arms' copies hold that is
not byte-identical, leaving out what records when and where a stage ran (``run.json``, the run's lock, the
executed notebook, logs and TensorBoard events). A stage whose earlier artifacts are cached (03's absorption
SAE, say) reuses them in both arms, so what is timed is the stage's own computation on them. Writes
``benchmarks/results/stage<STAGE>_<run name>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from worktrees import add_commit_arguments, arm_environment, checked_out, report, resolve

PROVENANCE = ("run.json", ".lock", "notebooks/", ".log", "events.out.tfevents", "tensorboard/")


def rerun(run_dir: Path, stage: str, code: Path, copy: Path, threads: int) -> float:
    """The stage rerun in ``copy`` of the run by the code in ``code``; its seconds as ``run.json`` records them."""
    shutil.copytree(run_dir, copy, symlinks=True)
    env = arm_environment(code, threads)
    command = [sys.executable, "-m", "featint_utils", "run", "--run-dir", str(copy), "--only", stage, "--no-reports"]
    done = subprocess.run(command, cwd=code, env=env, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"stage {stage} with {code} failed:\n{done.stdout[-2000:]}\n{done.stderr[-4000:]}")
    record = json.loads((copy / "run.json").read_text())["stages"]
    return next(entry["seconds"] for name, entry in record.items() if name.startswith(stage))


def differing(a: Path, b: Path) -> list[str]:
    """Files of either tree that the other lacks or holds with other bytes, provenance left out."""
    files = {p.relative_to(a) for p in a.rglob("*") if p.is_file()} | {
        p.relative_to(b) for p in b.rglob("*") if p.is_file()
    }
    out = []
    for name in sorted(map(str, files)):
        if any(mark in name for mark in PROVENANCE):
            continue
        left, right = a / name, b / name
        if not (left.is_file() and right.is_file()) or left.read_bytes() != right.read_bytes():
            out.append(name)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=Path, help="a finished run (the stage and those before it have run)")
    parser.add_argument("--stage", required=True, help="the stage's number, e.g. 06")
    add_commit_arguments(parser)
    args = parser.parse_args()
    run_dir = args.run.resolve()
    if not (run_dir / "run.json").is_file():
        raise SystemExit(f"{run_dir} is not a run directory (no run.json)")
    commits = resolve({"before": args.before, "after": args.after})
    result = {"run": run_dir.name, "stage": args.stage, "threads": args.threads, "cores": os.cpu_count(), "arms": {}}
    with checked_out(commits) as (scratch, trees):
        for name in ("before", "after"):
            seconds = rerun(run_dir, args.stage, trees[name], scratch / name, args.threads)
            result["arms"][name] = {"seconds": seconds, "commit": commits[name]}
            print(name, f"{seconds:.1f} s", flush=True)
        result["differing_files"] = differing(scratch / "before", scratch / "after")
    report(result, f"stage{args.stage}_{run_dir.name}")


if __name__ == "__main__":
    main()
