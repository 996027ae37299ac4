"""Run the notebooks of a profile with papermill, in order, into a named run directory; render HTML reports.

A profile is ``profiles/<name>.toml`` with a ``description`` and a ``[parameters]`` table of values that
differ from the shared defaults (:mod:`featint_utils.params`). String values may name environment
variables: ``"${FEATINT_CORPUS}"`` or ``"${FEATINT_CORPUS:-stimuli}"``. A key no stage defines is an error
(a typo must not silently fall back to a default), and every value is checked before anything runs.

The runner executes each notebook's jupytext ``.py`` source (the ``.ipynb`` twin is for JupyterLab and may be
stale), holds the run directory's lock while it runs, and keeps the history of attempts in ``run.json``. A
notebook is executed into ``attempts/`` and moved into ``notebooks/`` only when it succeeds: a failed rerun
never replaces the last good executed notebook, its report or ``metrics.json`` (the failed notebook, with
its traceback, stays in ``attempts/``).

With ``nproc`` > 1 the stages that scale out (00's extraction, 01's SAE training, 02's NFM ladder:
:mod:`featint_utils.workbench.stages`) first run under ``torchrun`` with that many ranks on this node; their notebook
then finds the result and goes on from it. Several nodes: start ``python -m featint_utils stage NN`` under
``torchrun`` on each (README, "GPUs and clusters"), then this runner on one of them.
"""

from __future__ import annotations

import difflib
import os
import platform
import re
import shutil
import subprocess
import sys
import time
import tomllib
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from .. import params
from ..data.activation_store import git_commit
from ..io import REPOSITORY, read_json, write_json
from . import reports
from .live import StageProgress
from .run import LOCK_ENV, RUNS_DIR, RunLock, RunLockedError
from .stages import SCALED

ROOT = REPOSITORY
PROFILES_DIR = ROOT / "profiles"
NOTEBOOKS_DIR = ROOT / "notebooks"
RECORDED_PACKAGES = ("torch", "transformers", "numpy", "pandas", "statsmodels", "papermill", "safetensors")
# The kernel's own log (not the notebook's output) at error level: ipykernel warns on every start that its
# loopback TCP sockets are unencrypted, noise in the terminal of every stage
QUIET_KERNEL = ["--IPKernelApp.log_level=ERROR"]
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


class RunError(RuntimeError):
    """A run could not start or a notebook failed; the message names the profile, key or notebook."""


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.toml"))


def check_name(name: str, what: str) -> str:
    """A profile or run name: letters, digits, ``-`` and ``_`` only, so it can never leave its directory."""
    if not isinstance(name, str) or not _NAME.fullmatch(name):
        raise RunError(
            f"{what} name {name!r} is not allowed: use letters, digits, '-' and '_' "
            "(a run elsewhere is chosen with --run-dir)"
        )
    return name


def _expand_env(value, key: str):
    if not isinstance(value, str):
        return value

    def replace(match):
        name, default = match.group(1), match.group(2)
        if name in os.environ and os.environ[name] != "":
            return os.environ[name]
        if default is not None:
            return default
        raise RunError(f"parameter {key!r} needs the environment variable {name} (e.g. `export {name}=...`)")

    return _ENV_REF.sub(replace, value)


def load_profile(name: str, profiles_dir: Path = PROFILES_DIR) -> dict:
    """The profile's parameters with environment references expanded."""
    path = profiles_dir / f"{check_name(name, 'profile')}.toml"
    if not path.exists():
        raise RunError(f"unknown profile {name!r}; available: {', '.join(available_profiles(profiles_dir))}")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unexpected = set(data) - {"description", "parameters"}
    if unexpected:
        raise RunError(f"profile {name!r}: unknown top-level keys {sorted(unexpected)}; use [parameters]")
    return {k: _expand_env(v, k) for k, v in data.get("parameters", {}).items()}


def notebooks(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """The numbered notebook sources (``NN_name.py``, jupytext) in order, optionally only those listed."""
    found = sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.py"))
    if only:
        unknown = [n for n in only if not any(p.name.startswith(f"{n}_") for p in found)]
        if unknown:
            raise RunError(f"--only names unknown notebook number(s) {unknown}; have {[p.name[:2] for p in found]}")
        found = [p for p in found if p.name[:2] in only]
    return found


def describe_parameters(profile: str | None = None, profiles_dir: Path = PROFILES_DIR) -> str:
    """Every parameter by stage: type, default (or the profile's value, marked), and what it means."""
    values = load_profile(profile, profiles_dir) if profile else {}
    lines = []
    for stage, declared in params.PARAMETERS.items():
        lines.append(f"{stage}:")
        for name, p in declared.items():
            value = f"{values[name]!r} (profile {profile})" if name in values else repr(p.default)
            lines.append(f"  {name} ({p.type.__name__}) = {value}: {p.doc}")
    return "\n".join(lines)


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` from the command line into a dict of raw strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RunError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def resolve_parameters(profile: dict, overrides: dict) -> dict:
    """Every parameter: the shared defaults, then the profile's values, then ``--set``; each checked."""
    known = params.all_parameters()
    for origin, keys in (("profile", profile), ("--set", overrides)):
        unknown = sorted(set(keys) - set(known))
        if unknown:
            close = {k: difflib.get_close_matches(k, known, n=1) for k in unknown}
            hints = "; ".join(f"{k}: did you mean {c[0]}?" for k, c in close.items() if c)
            raise RunError(
                f"unknown parameter(s) {unknown} in {origin}{f' ({hints})' if hints else ''}; "
                f"known: {', '.join(sorted(known))} (`python -m featint_utils params` explains each)"
            )
    resolved = {name: p.default for name, p in known.items()}
    resolved |= profile
    try:
        resolved |= {k: params.cast(k, v) if isinstance(v, str) else v for k, v in overrides.items()}
        for stage in params.STAGES:
            params.validate(stage, resolved)
    except params.ParameterError as err:
        raise RunError(str(err)) from None
    return resolved


def run_directory(
    profile: str, name: str | None = None, run_dir: str | Path | None = None, runs_dir: Path = RUNS_DIR
) -> Path:
    """``--run-dir`` as given, else ``runs/<name>``, else ``runs/<profile>``."""
    if run_dir is not None and name is not None:
        raise RunError("give --name or --run-dir, not both")
    if run_dir is not None:
        return Path(run_dir).resolve()
    return (Path(runs_dir) / check_name(name or profile, "run")).resolve()


def run(
    profile: str,
    only: list[str] | None = None,
    overrides: dict | None = None,
    runs_dir: Path = RUNS_DIR,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    profiles_dir: Path = PROFILES_DIR,
    reports: bool = True,
    name: str | None = None,
    run_dir: str | Path | None = None,
    nproc: int = 1,
) -> Path:
    """Execute the profile's notebooks in order; stop at the first failure and name it. Returns the run dir.
    ``nproc`` > 1 runs stages 00 to 02 over that many ``torchrun`` ranks first (see the module docstring)."""
    if nproc < 1:
        raise RunError(f"--nproc must be at least 1, got {nproc}")
    resolved = resolve_parameters(load_profile(profile, profiles_dir), overrides or {})
    selected = notebooks(notebooks_dir, only)
    if not selected:
        raise RunError(f"no notebooks found in {notebooks_dir}")
    root = run_directory(profile, name, run_dir, runs_dir)
    root.mkdir(parents=True, exist_ok=True)
    lock = RunLock(root)
    try:
        lock.acquire(f"`featint run --profile {profile}`")
    except RunLockedError as err:
        raise RunError(str(err)) from None
    try:
        os.environ[LOCK_ENV] = str(root)  # the kernels inherit it: they know that this process holds the lock
        _run_locked(root, profile, selected, resolved, overrides or {}, reports, nproc)
    finally:
        os.environ.pop(LOCK_ENV, None)
        lock.release()
    return root


def _run_locked(
    root: Path, profile: str, selected: list[Path], resolved: dict, sets: dict, render: bool, nproc: int
) -> None:
    import papermill
    from nbclient.exceptions import DeadKernelError

    record = _load_record(root)
    attempt = {
        "profile": profile,
        "sets": {k: str(v) for k, v in sets.items()},
        "notebooks": [nb.stem for nb in selected],
        "parameters": resolved,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in RECORDED_PACKAGES},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "nproc": nproc,
        "status": "running",
        "stages": {},
    }
    record["attempts"].append(attempt)
    write_json(root / "run.json", record)
    metrics = root / "metrics.json"
    expected = {stage: done.get("seconds") for stage, done in record["stages"].items()}
    known = [expected[nb.stem] for nb in selected if expected.get(nb.stem)]
    estimate = f"; last time they took {reports.format_seconds(sum(known))}" if len(known) == len(selected) else ""
    print(f"[featint] {root.name}: {len(selected)} stage(s), profile {profile}{estimate}", flush=True)
    for index, nb in enumerate(selected, 1):
        stage = nb.stem
        stage_params = {k: resolved[k] for k in params.PARAMETERS[stage]} | {"run_dir": str(root)}
        attempt_path = root / "attempts" / f"{stage}.ipynb"
        attempt_path.parent.mkdir(parents=True, exist_ok=True)
        before = metrics.read_bytes() if metrics.exists() else None
        live = StageProgress(index, len(selected), stage, expected.get(stage))
        started = time.perf_counter()
        failure, notebook_ran = None, False
        try:
            if nproc > 1 and stage in SCALED:
                failure = _torchrun_stage(stage, root, profile, sets, nproc)
            if failure is None:
                notebook_ran = True
                with live:  # the kernel's progress bars (its stderr) drive the terminal line
                    papermill.execute_notebook(
                        source_notebook(nb),
                        str(attempt_path),
                        parameters=stage_params,
                        kernel_name="python3",
                        cwd=str(ROOT),
                        progress_bar=False,
                        log_output=False,
                        stderr_file=live,
                        extra_arguments=QUIET_KERNEL,
                    )
        except papermill.PapermillExecutionError as err:
            failure = f"notebook {stage} failed in cell {err.exec_count}: {err.ename}: {err.evalue}"
        except DeadKernelError:
            failure = (
                f"the kernel running {stage} died (killed, or out of memory?); what it had done is in "
                "the attempt's notebook"
            )
        except KeyboardInterrupt:
            failure = f"interrupted while running {stage}"
        except Exception as err:  # a kernel that cannot start, a cell timeout: still recorded as a failure
            failure = f"notebook {stage} could not be executed: {type(err).__name__}: {err}"
        seconds = round(time.perf_counter() - started, 1)
        if failure is not None:
            live.finished(seconds, ok=False)
            if before is not None:  # its metrics never replace the last good ones
                metrics.write_bytes(before)
            attempt["stages"][stage] = {"status": "failed", "seconds": seconds, "error": failure}
            attempt["status"] = "failed"
            attempt["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
            write_json(root / "run.json", record)
            where = (  # a torchrun failure leaves no notebook: its ranks' errors were printed above
                f"the executed notebook, with the traceback, is {attempt_path}; " if notebook_ran else ""
            )
            raise RunError(
                f"{failure}\n{where}the last good one (if any) is still {root / 'notebooks' / (stage + '.ipynb')}"
            )
        executed = root / "notebooks" / f"{stage}.ipynb"
        executed.parent.mkdir(parents=True, exist_ok=True)
        os.replace(attempt_path, executed)
        attempt["stages"][stage] = {"status": "ok", "seconds": seconds}
        record["stages"][stage] = {
            "status": "ok",
            "seconds": seconds,
            "parameters": recorded_parameters(stage_params),
            "finished": datetime.now(UTC).isoformat(timespec="seconds"),
        }
        write_json(root / "run.json", record)
        reports.add_header(
            executed,
            {
                "run": root.name,
                "profile": profile,
                "stage": stage,
                "changed": reports.changed_parameters(stage, stage_params),
                "git_commit": attempt["git_commit"],
                "finished": record["stages"][stage]["finished"].replace("+00:00", "").replace("T", " "),
                "seconds": seconds,
            },
        )
        live.finished(seconds, reports.stage_summary(root, stage))
        if render:
            reports.render_report(executed, root / "reports" / f"{stage}.html")
    attempt["status"] = "ok"
    attempt["finished"] = datetime.now(UTC).isoformat(timespec="seconds")
    write_json(root / "run.json", record)
    if render:
        reports.write_index(root)
    shutil.rmtree(root / "attempts", ignore_errors=True)


def recorded_parameters(stage_params: dict) -> dict:
    """A stage's parameters as ``run.json`` keeps them: without ``run_dir``, which is where the record itself
    lies, so that a run directory moved or copied elsewhere still says what each stage was run with."""
    return {k: v for k, v in stage_params.items() if k != "run_dir"}


def torchrun_command(stage: str, nproc: int, where: list[str], profile: str, sets: dict) -> list[str]:
    """The ``torchrun`` command (one node, ``nproc`` ranks) that runs the scaled part of ``stage``."""
    return [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        f"--nproc_per_node={nproc}",
        "-m",
        "featint_utils",
        "stage",
        stage[:2],
        "--profile",
        profile,
        *where,
        *(f"--set={k}={v}" for k, v in sets.items()),
    ]


def _torchrun_stage(stage: str, root: Path, profile: str, sets: dict, nproc: int) -> str | None:
    """Run ``stage``'s scaled part over ``nproc`` ranks (they inherit this runner's lock); the failure, if any."""
    command = torchrun_command(stage, nproc, ["--run-dir", str(root)], profile, sets)
    print(f"[featint] {root.name}: {stage} over {nproc} ranks: {' '.join(command[2:])}", flush=True)
    done = subprocess.run(command, cwd=ROOT)
    if done.returncode:
        return (
            f"{stage} over {nproc} ranks failed (torchrun exit code {done.returncode}; the failing rank's error is "
            "above); rerun the same command to resume from the last checkpoint"
        )
    return None


def source_notebook(source: Path):
    """The notebook of a jupytext ``.py`` source, as executed: what the file says now, whatever its twin says."""
    import jupytext

    nb = jupytext.read(source)
    nb.metadata.setdefault("kernelspec", {"name": "python3", "display_name": "Python 3", "language": "python"})
    nb.metadata.setdefault("language_info", {"name": "python"})
    return nb


def _load_record(root: Path) -> dict:
    """``run.json``: ``stages`` (each stage's last successful execution) and ``attempts`` (every run, with its
    status); an unreadable one is kept aside, not lost."""
    path = root / "run.json"
    try:
        record = read_json(path) if path.exists() else {}
    except (OSError, ValueError):
        os.replace(path, path.with_name("run.json.unreadable"))
        record = {}
    if "attempts" not in record:  # a record from before the history was kept
        record = {"stages": record.get("stages", {}), "attempts": []}
    return record


def run_scaled_stage(
    number: str,
    profile: str,
    overrides: dict | None = None,
    name: str | None = None,
    run_dir: str | Path | None = None,
    runs_dir: Path = RUNS_DIR,
) -> Path:
    """This rank's part of stage ``number`` (00, 01 or 02) of a run, as ``torchrun`` starts it on every rank."""
    from .stages import run_stage

    stage = next((s for s in SCALED if s[:2] == number), None)
    if stage is None:
        raise RunError(f"stage {number} does not run over ranks; only {', '.join(s[:2] for s in SCALED)} do")
    resolved = resolve_parameters(load_profile(profile), overrides or {})
    root = run_directory(profile, name, run_dir, runs_dir)
    run_stage(stage, root, {k: resolved[k] for k in params.PARAMETERS[stage]} | {"run_dir": str(root)})
    return root


def report(
    profile: str = "embedded", runs_dir: Path = RUNS_DIR, name: str | None = None, run_dir: str | Path | None = None
) -> list[Path]:
    """Render every executed notebook of a run to HTML (inputs hidden) under ``<run>/reports``, and the
    run's ``index.html``."""
    root = run_directory(profile, name, run_dir, runs_dir)
    executed = sorted((root / "notebooks").glob("*.ipynb"))
    if not executed:
        raise RunError(f"no executed notebooks under {root}: run `make run PROFILE={profile}` first")
    out = []
    for nb in executed:
        html = root / "reports" / f"{nb.stem}.html"
        reports.render_report(nb, html)
        out.append(html)
    out.append(reports.write_index(root))
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
