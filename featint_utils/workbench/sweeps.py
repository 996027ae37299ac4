"""Sweeps: one run per point of a parameter grid, sharing what the swept parameters do not change, and a
comparison report over the points.

``python -m featint_utils sweep --profile P --grid sae_k=16,32 --grid layer=2,3,4 [--zip] [--only 00,01,02,03]``
makes ``runs/sweeps/<name>/`` (or ``--sweep-dir``):

* ``points/<point>/``: one complete run per point (the profile, ``--set`` values, then the point's values),
  named by its values (``layer3-sae_k16``) and run by :func:`featint_utils.workbench.runner.run`, so it is resumable
  like any run: a rerun skips a point whose stages all finished with these parameters and resumes the others
  from their checkpoints;
* ``stores/<key>/``: one activation store per distinct set of stage 00's parameters (a sweep over ``sae_k``
  extracts once, one over ``layer`` once per layer); each point's ``activations`` is a link to its store, which
  stage 00 then finds verified and reuses (its fingerprint is the same in every point's lineage);
* ``sweep.json`` (the definition and each point's state), ``comparison.csv`` (one row per point: its values
  and headline metrics with intervals), ``comparison.ipynb`` / ``comparison.html`` (the report executed from
  ``notebooks/sweep_comparison.py``) and ``figures/``.

Every point's parameters are resolved and checked before any work: an unknown key (with the closest known
names), a value of the wrong type, an empty list or an invalid combination fails at once. ``--jobs N`` runs N
points at once (each a ``python -m featint_utils run`` process; with ``--nproc M`` each takes M ranks, and on
GPUs job slot j sees GPUs jM .. jM+M-1).
"""

from __future__ import annotations

import difflib
import itertools
import os
import re
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from .. import params
from ..io import from_repository, read_json, write_json
from . import runner
from .reports import render_report
from .run import RUNS_DIR, RunLock, RunLockedError, fingerprint

SWEEP_NOTEBOOK = runner.NOTEBOOKS_DIR / "sweep_comparison.py"
STORE_STAGE = "00_activations"

HEADLINE = {  # comparison column: (metrics.json section, key)
    "sae_fvu": ("primary_sae", "fvu"),
    "sae_dead_fraction": ("primary_sae", "dead_fraction"),
    "interaction_share": ("contributions", "interaction_share.over_linear.mean"),
    "interaction_share_low": ("contributions", "interaction_share.over_linear.ci_low"),
    "interaction_share_high": ("contributions", "interaction_share.over_linear.ci_high"),
    "pair_ridge_share": ("contributions", "interaction_share.pair_ridge.mean"),
    "pair_ridge_share_low": ("contributions", "interaction_share.pair_ridge.ci_low"),
    "pair_ridge_share_high": ("contributions", "interaction_share.pair_ridge.ci_high"),
    "control_share_low": ("contributions", "control.over_linear.ci_low"),
    "control_share_high": ("contributions", "control.over_linear.ci_high"),
    "detection_limit": ("contributions", "detection_limit"),
    "detection_limit_pair_ridge": ("contributions", "detection_limit.pair_ridge"),
    "absorbed_fraction": ("contributions", "absorbed_fraction"),
}
"""The headline metrics a comparison row carries (missing when the point did not run that stage)."""


class SweepError(RuntimeError):
    """A sweep could not start (a bad grid) or some of its points failed; the message says which."""


# ---------------------------------------------------------------------------------------------------
# The grid


def parse_grid(specs: list[str]) -> dict[str, list]:
    """``["sae_k=16,32", "layer=2,3"]`` as {key: [typed values]}, every key and value checked."""
    known = params.all_parameters()
    grid: dict[str, list] = {}
    for spec in specs:
        key, sep, raw = spec.partition("=")
        key = key.strip()
        if not sep or not key:
            raise SweepError(f"--grid takes key=v1,v2,..., got {spec!r}")
        if key not in known:
            close = difflib.get_close_matches(key, known, n=3)
            hint = f"; did you mean {', '.join(close)}?" if close else f"; known: {', '.join(sorted(known))}"
            raise SweepError(f"--grid: unknown parameter {key!r}{hint}")
        if key in grid:
            raise SweepError(f"--grid: {key!r} is given twice; put all its values in one --grid {key}=v1,v2")
        if key in ("run_dir", "resume"):
            raise SweepError(f"--grid: {key!r} is not an experiment's parameter")
        values = [v.strip() for v in raw.split(",")]
        if not raw.strip() or any(v == "" for v in values):
            raise SweepError(f"--grid {key}: empty value list {raw!r}; give values like {key}=a,b")
        try:
            typed = [params.cast(key, v) for v in values]
        except params.ParameterError as err:
            raise SweepError(f"--grid {key}: {err}") from None
        if len(set(map(repr, typed))) != len(typed):
            raise SweepError(f"--grid {key}: repeated values in {raw!r}")
        grid[key] = typed
    if not grid:
        raise SweepError("a sweep needs at least one --grid key=v1,v2,...")
    return grid


def grid_points(grid: dict[str, list], zipped: bool = False) -> list[dict]:
    """The points: every combination (the Cartesian product), or with ``zipped`` the i-th value of every key."""
    keys = list(grid)
    if zipped:
        lengths = {k: len(v) for k, v in grid.items()}
        if len(set(lengths.values())) != 1:
            raise SweepError(f"--zip needs lists of one length; got {lengths}")
        combos = zip(*grid.values())
    else:
        combos = itertools.product(*grid.values())
    return [dict(zip(keys, combo)) for combo in combos]


def point_name(point: dict) -> str:
    """``layer3-sae_k16``: the point's values, as a run name (letters, digits, ``-``, ``_``)."""

    def text(value) -> str:
        return re.sub(r"[^A-Za-z0-9_]", "_", str(value).replace(".", "p").replace("-", "m"))

    return "-".join(f"{key}{text(value)}" for key, value in point.items())


# ---------------------------------------------------------------------------------------------------
# Running


def sweep_directory(name: str | None, sweep_dir: str | Path | None, profile: str, runs_dir: Path = RUNS_DIR) -> Path:
    if sweep_dir is not None and name is not None:
        raise SweepError("give --name or --sweep-dir, not both")
    if sweep_dir is not None:
        return Path(sweep_dir).resolve()
    return (Path(runs_dir) / "sweeps" / runner.check_name(name or profile, "sweep")).resolve()


def _finished(run_dir: Path, resolved: dict, stages: list[str]) -> bool:
    """Whether every one of ``stages`` last finished in ``run_dir`` with exactly these parameters."""
    try:
        record = read_json(run_dir / "run.json")
    except (OSError, ValueError):
        return False
    done = record.get("stages", {})
    for stage in stages:
        expected = {k: resolved[k] for k in params.PARAMETERS[stage]}
        recorded = runner.recorded_parameters(done.get(stage, {}).get("parameters") or {})  # older: with run_dir
        if done.get(stage, {}).get("status") != "ok" or recorded != expected:
            return False
    return bool(record.get("attempts")) and record["attempts"][-1].get("status") == "ok"


def _link_store(point_dir: Path, store_dir: Path) -> None:
    """``point_dir/activations`` -> the shared store (relative, so the sweep directory can move)."""
    link = point_dir / "activations"
    target = Path(os.path.relpath(store_dir / "activations", point_dir))
    if link.is_symlink() and Path(os.readlink(link)) == target:
        return
    if link.is_symlink():
        link.unlink()
    elif link.exists():
        raise SweepError(f"{link} is a store of its own, not a link to the sweep's shared one: remove it")
    point_dir.mkdir(parents=True, exist_ok=True)
    link.symlink_to(target, target_is_directory=True)


def gpu_slot_env(slot: int, nproc: int) -> dict[str, str]:
    """The environment of job slot ``slot``: on a GPU machine it sees its own ``nproc`` of the GPUs this
    process sees (slot j: the j-th group of ``nproc``); elsewhere this process's environment."""
    import torch

    env = dict(os.environ)
    count = torch.cuda.device_count()
    if count:
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        ids = visible.split(",")[:count] if visible else [str(g) for g in range(count)]
        first = slot * nproc
        if first + nproc > count:
            raise SweepError(f"job slot {slot} needs GPUs {first}..{first + nproc - 1}; only {count} are visible")
        env["CUDA_VISIBLE_DEVICES"] = ",".join(ids[first : first + nproc])
    return env


def _run_point(
    profile: str, run_dir: Path, only: list[str] | None, sets: dict, reports: bool, nproc: int, env: dict
) -> tuple[bool, float]:
    """One point as its own ``python -m featint_utils run`` process, its output in ``run_dir/sweep.log``."""
    command = [sys.executable, "-m", "featint_utils", "run", "--profile", profile, "--run-dir", str(run_dir)]
    command += (["--only", ",".join(only)] if only else []) + ([] if reports else ["--no-reports"])
    command += [f"--nproc={nproc}"] + [f"--set={k}={v}" for k, v in sets.items()]
    run_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    with open(run_dir / "sweep.log", "w") as log:
        done = subprocess.run(command, cwd=runner.ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    return done.returncode == 0, time.perf_counter() - started


def _tail(path: Path, lines: int = 6) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


def run_sweep(
    profile: str,
    grid_specs: list[str],
    zipped: bool = False,
    overrides: dict | None = None,
    only: list[str] | None = None,
    name: str | None = None,
    sweep_dir: str | Path | None = None,
    jobs: int = 1,
    nproc: int = 1,
    reports: bool = True,
    runs_dir: Path = RUNS_DIR,
) -> Path:
    """Run every point of the grid (see the module docstring); returns the sweep directory."""
    if jobs < 1 or nproc < 1:
        raise SweepError(f"--jobs and --nproc must be at least 1, got {jobs} and {nproc}")
    overrides = dict(overrides or {})
    grid = parse_grid(grid_specs)
    clash = sorted(set(grid) & set(overrides))
    if clash:
        raise SweepError(f"{clash} are both swept (--grid) and fixed (--set): choose one")
    stages = [nb.stem for nb in runner.notebooks(runner.NOTEBOOKS_DIR, only)]
    base = runner.load_profile(profile)
    points = []
    for point in grid_points(grid, zipped):  # every point resolved and checked before any work
        sets = overrides | {k: str(v) for k, v in point.items()}
        try:
            resolved = runner.resolve_parameters(base, sets)
        except runner.RunError as err:
            raise SweepError(f"point {point_name(point)}: {err}") from None
        # the store's directory: the swept values that shape it (or "shared"), and a hash of everything that does
        shaping = {k: v for k, v in point.items() if k in params.PARAMETERS[STORE_STAGE]}
        store_key = fingerprint({k: resolved[k] for k in params.PARAMETERS[STORE_STAGE] if k != "resume"})
        store_key = f"{point_name(shaping) if shaping else 'shared'}-{store_key[:8]}"
        points.append(
            {"name": point_name(point), "values": point, "sets": sets, "store": store_key, "resolved": resolved}
        )
    names = [p["name"] for p in points]
    if len(set(names)) != len(names):
        raise SweepError(f"two points would share a directory name: {names}; give values that differ as text")
    root = sweep_directory(name, sweep_dir, profile, runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(root)
    try:
        lock.acquire(f"`featint sweep --profile {profile}`")
    except RunLockedError as err:
        raise SweepError(str(err)) from None
    try:
        return _run_locked(root, profile, grid, zipped, overrides, only, stages, points, jobs, nproc, reports)
    finally:
        lock.release()


def _run_locked(root, profile, grid, zipped, overrides, only, stages, points, jobs, nproc, reports) -> Path:
    definition = {
        "profile": profile,
        "grid": {k: [str(v) for v in values] for k, values in grid.items()},
        "zip": zipped,
        "sets": overrides,
        "only": only,
        "points": [{k: p[k] for k in ("name", "values", "store")} for p in points],
    }
    # each job slot's environment, checked before any work (enough GPUs for jobs x nproc)
    envs = [gpu_slot_env(slot, nproc) for slot in range(jobs)] if jobs > 1 else [dict(os.environ)]
    write_json(root / "sweep.json", definition)
    shares_store = STORE_STAGE in stages
    if shares_store:  # one store per distinct stage-00 request, made before the points that link to it
        for key in dict.fromkeys(p["store"] for p in points):
            first = next(p for p in points if p["store"] == key)
            store_run = root / "stores" / key
            if _finished(store_run, first["resolved"], [STORE_STAGE]):
                continue
            print(f"[sweep] {root.name}: activation store {key}, for every point that shares it", flush=True)
            runner.run(profile, [STORE_STAGE[:2]], first["sets"], run_dir=store_run, reports=False, nproc=nproc)
    todo = []
    for i, point in enumerate(points, 1):
        run_dir = root / "points" / point["name"]
        label = f"[sweep] {root.name}: point {i}/{len(points)} {point['name']}"
        if _finished(run_dir, point["resolved"], stages):
            print(f"{label}: finished before, skipped", flush=True)
            continue
        if shares_store:
            _link_store(run_dir, root / "stores" / point["store"])
        todo.append((label, run_dir, point))
    failed = []

    def work(slot_queue, item):
        label, run_dir, point = item
        slot = slot_queue.pop()
        try:
            print(f"{label}: running (log: {run_dir / 'sweep.log'})", flush=True)
            ok, seconds = _run_point(profile, run_dir, only, point["sets"], reports, nproc, envs[slot])
        finally:
            slot_queue.append(slot)
        if ok:
            print(f"{label}: done in {seconds:.0f} s", flush=True)
        else:
            failed.append(point["name"])
            print(f"{label}: FAILED after {seconds:.0f} s:\n{_tail(run_dir / 'sweep.log')}", flush=True)

    slots = list(range(jobs))
    with ThreadPoolExecutor(max_workers=jobs) as pool:
        list(pool.map(lambda item: work(slots, item), todo))
    table = comparison_table(root)
    table.to_csv(root / "comparison.csv", index=False)
    if todo or not (root / "comparison.ipynb").exists():
        render_comparison(root)
    if failed:
        raise SweepError(
            f"{len(failed)} of {len(points)} points failed: {', '.join(failed)}; each one's log is "
            "points/<point>/sweep.log. Rerun the same command: finished points are skipped, the others resume."
        )
    return root


# ---------------------------------------------------------------------------------------------------
# Comparing


class Sweep(NamedTuple):
    """A sweep's directory and its definition (``sweep.json``)."""

    root: Path
    profile: str
    grid: dict[str, list[str]]
    sets: dict[str, str]
    only: list[str] | None
    points: list[dict]


def open_sweep(sweep_dir: str | Path) -> Sweep:
    """The sweep at ``sweep_dir`` (relative: from the repository, wherever the caller runs)."""
    root = from_repository(sweep_dir)
    if not (root / "sweep.json").exists():
        raise SweepError(f"no sweep at {root}: run `python -m featint_utils sweep --profile P --grid k=a,b` first")
    d = read_json(root / "sweep.json")
    return Sweep(root, d["profile"], d["grid"], d["sets"], d["only"], d["points"])


def comparison_table(sweep_dir: str | Path) -> pd.DataFrame:
    """One row per point of the sweep: its swept values, whether it finished, its stages' wall time, and the
    headline metrics of :data:`HEADLINE` (NaN where the point has not produced them)."""
    sweep = open_sweep(sweep_dir)
    rows = []
    for point in sweep.points:
        run_dir = sweep.root / "points" / point["name"]
        metrics = read_json(run_dir / "metrics.json") if (run_dir / "metrics.json").exists() else {}
        try:
            record = read_json(run_dir / "run.json")
            status = record["attempts"][-1]["status"]
            seconds = sum(s.get("seconds", 0.0) for s in record.get("stages", {}).values())
        except (OSError, ValueError, KeyError, IndexError):
            status, seconds = "not run", np.nan
        row = {"point": point["name"], **point["values"], "status": status, "stage_seconds": seconds}
        for column, (section, key) in HEADLINE.items():
            value = metrics.get(section, {}).get(key)
            row[column] = np.nan if value is None else value
        rows.append(row)
    return pd.DataFrame(rows)


def render_comparison(sweep_dir: Path) -> Path:
    """Execute the comparison notebook for ``sweep_dir`` into ``comparison.ipynb`` and ``comparison.html``."""
    import papermill

    executed = sweep_dir / "comparison.ipynb"
    try:
        papermill.execute_notebook(
            runner.source_notebook(SWEEP_NOTEBOOK),
            str(executed),
            parameters={"sweep_dir": str(sweep_dir)},
            kernel_name="python3",
            cwd=str(runner.ROOT),
            progress_bar=False,
            extra_arguments=runner.QUIET_KERNEL,
            log_output=False,
        )
    except papermill.PapermillExecutionError as err:
        raise SweepError(f"the comparison notebook failed: {err.ename}: {err.evalue} (see {executed})") from None
    render_report(executed, sweep_dir / "comparison.html")
    return executed
