"""Run the notebooks of a profile with papermill, in order, into ``runs/<profile>/``; render HTML reports.

A profile is ``profiles/<name>.toml`` with a ``description`` and a ``[parameters]`` table. Each notebook
receives the parameters its ``parameters`` cell declares, plus ``run_dir``. A key that no notebook
declares is an error (a typo must not silently fall back to a default). String values may name
environment variables: ``"${FEATINT_CORPUS}"`` or ``"${FEATINT_CORPUS:-stimuli}"``.
"""

from __future__ import annotations

import os
import platform
import re
import time
import tomllib
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

from .activations import git_commit
from .io import write_json

ROOT = Path(__file__).resolve().parent.parent
PROFILES_DIR = ROOT / "profiles"
NOTEBOOKS_DIR = ROOT / "notebooks"
RUNS_DIR = ROOT / "runs"
RECORDED_PACKAGES = ("torch", "transformers", "numpy", "pandas", "statsmodels", "papermill", "safetensors")
_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


class RunError(RuntimeError):
    """A run could not start or a notebook failed; the message names the profile, key or notebook."""


def available_profiles(profiles_dir: Path = PROFILES_DIR) -> list[str]:
    return sorted(p.stem for p in profiles_dir.glob("*.toml"))


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
    path = profiles_dir / f"{name}.toml"
    if not path.exists():
        raise RunError(f"unknown profile {name!r}; available: {', '.join(available_profiles(profiles_dir))}")
    with open(path, "rb") as f:
        data = tomllib.load(f)
    unexpected = set(data) - {"description", "parameters"}
    if unexpected:
        raise RunError(f"profile {name!r}: unknown top-level keys {sorted(unexpected)}; use [parameters]")
    return {k: _expand_env(v, k) for k, v in data.get("parameters", {}).items()}


def notebooks(notebooks_dir: Path = NOTEBOOKS_DIR, only: list[str] | None = None) -> list[Path]:
    """The numbered notebooks (``NN_name.ipynb``) in order, optionally only those whose number is listed."""
    found = sorted(p for p in notebooks_dir.glob("[0-9][0-9]_*.ipynb"))
    if only:
        unknown = [n for n in only if not any(p.name.startswith(f"{n}_") for p in found)]
        if unknown:
            raise RunError(f"--only names unknown notebook number(s) {unknown}; have {[p.name[:2] for p in found]}")
        found = [p for p in found if p.name[:2] in only]
    return found


def declared_parameters(notebook: Path) -> dict[str, dict]:
    """Parameters declared by a notebook's ``parameters`` cell: name -> papermill's description."""
    import papermill

    return papermill.inspect_notebook(str(notebook))


_CASTS = {"int": int, "float": float, "str": str}


def _cast(key: str, raw: str, type_name: str):
    if type_name == "bool":
        if raw.lower() in ("true", "1", "yes"):
            return True
        if raw.lower() in ("false", "0", "no"):
            return False
        raise RunError(f"--set {key}={raw}: expected true or false")
    try:
        return _CASTS.get(type_name, str)(raw)
    except ValueError as err:
        raise RunError(f"--set {key}={raw}: expected {type_name}") from err


def parse_sets(pairs: list[str]) -> dict[str, str]:
    """``["k=v", ...]`` from the command line into a dict of raw strings."""
    out = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise RunError(f"--set takes key=value, got {pair!r}")
        out[key.strip()] = value
    return out


def resolve_parameters(profile: dict, overrides: dict, declared: dict[str, dict[str, dict]]) -> dict:
    """Profile values with overrides applied, checked against what the notebooks declare."""
    known: dict[str, str] = {}
    for params in declared.values():
        for key, info in params.items():
            known.setdefault(key, info.get("inferred_type_name") or "str")
    for origin, keys in (("profile", profile), ("--set", overrides)):
        unknown = sorted(set(keys) - set(known) - {"run_dir"})
        if unknown:
            raise RunError(f"unknown parameter(s) {unknown} in {origin}; notebooks declare: {', '.join(sorted(known))}")
    resolved = dict(profile)
    for key, raw in overrides.items():
        resolved[key] = _cast(key, raw, known[key]) if isinstance(raw, str) else raw
    return resolved


def render_report(executed: Path, html: Path) -> None:
    """HTML of an executed notebook with code inputs hidden (a report, not a program)."""
    import nbformat
    from nbconvert import HTMLExporter

    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nbformat.read(executed, as_version=4))
    html.parent.mkdir(parents=True, exist_ok=True)
    html.write_text(body, encoding="utf-8")


def run(
    profile: str,
    only: list[str] | None = None,
    overrides: dict | None = None,
    runs_dir: Path = RUNS_DIR,
    notebooks_dir: Path = NOTEBOOKS_DIR,
    profiles_dir: Path = PROFILES_DIR,
    reports: bool = True,
) -> Path:
    """Execute the profile's notebooks in order; stop at the first failure and name it. Returns the run dir."""
    import papermill

    params = load_profile(profile, profiles_dir)
    selected = notebooks(notebooks_dir, only)
    if not selected:
        raise RunError(f"no notebooks found in {notebooks_dir}")
    declared = {nb.name: declared_parameters(nb) for nb in notebooks(notebooks_dir)}
    params = resolve_parameters(params, overrides or {}, declared)
    run_dir = Path(runs_dir) / profile
    run_dir.mkdir(parents=True, exist_ok=True)
    os.environ["FEATINT_HEADLESS"] = "1"  # the kernels inherit it: text progress bars in saved notebooks
    record = {
        "profile": profile,
        "parameters": params,
        "git_commit": git_commit(),
        "python": platform.python_version(),
        "packages": {p: _version(p) for p in RECORDED_PACKAGES},
        "started": datetime.now(UTC).isoformat(timespec="seconds"),
        "stages": {},
    }
    for nb in selected:
        stage_params = {k: v for k, v in params.items() if k in declared[nb.name]}
        if "run_dir" in declared[nb.name]:
            stage_params["run_dir"] = str(run_dir.resolve())
        executed = run_dir / "notebooks" / nb.name
        executed.parent.mkdir(parents=True, exist_ok=True)
        print(f"[featint] {profile}: running {nb.name}", flush=True)
        started = time.perf_counter()
        try:
            papermill.execute_notebook(
                str(nb), str(executed), parameters=stage_params, kernel_name="python3",
                cwd=str(ROOT), progress_bar=False, log_output=False,
            )  # fmt: skip
        except papermill.PapermillExecutionError as err:
            record["stages"][nb.stem] = {"status": "failed", "seconds": time.perf_counter() - started}
            write_json(run_dir / "run.json", record)
            raise RunError(
                f"notebook {nb.name} failed in cell {err.exec_count}: {err.ename}: {err.evalue}\n"
                f"the executed notebook, with the traceback, is {executed}"
            ) from None
        seconds = time.perf_counter() - started
        record["stages"][nb.stem] = {"status": "ok", "seconds": round(seconds, 1), "parameters": stage_params}
        write_json(run_dir / "run.json", record)
        print(f"[featint] {profile}: {nb.name} done in {seconds:.0f} s", flush=True)
        if reports:
            render_report(executed, run_dir / "reports" / f"{nb.stem}.html")
    return run_dir


def report(profile: str, runs_dir: Path = RUNS_DIR) -> list[Path]:
    """Render every executed notebook of a run to HTML (inputs hidden) under ``runs/<profile>/reports``."""
    run_dir = Path(runs_dir) / profile
    executed = sorted((run_dir / "notebooks").glob("*.ipynb"))
    if not executed:
        raise RunError(f"no executed notebooks under {run_dir}: run `make run PROFILE={profile}` first")
    out = []
    for nb in executed:
        html = run_dir / "reports" / f"{nb.stem}.html"
        render_report(nb, html)
        out.append(html)
    return out


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None
