"""Atomic writes: a file either has its complete new content or is untouched, never half-written."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

REPOSITORY = Path(__file__).resolve().parent.parent


def from_repository(path: str | os.PathLike) -> Path:
    """A path as parameters mean it: absolute as given, relative from the repository, whatever the working
    directory (the runner's kernels start in the repository, JupyterLab's in ``notebooks/``)."""
    return (REPOSITORY / Path(path).expanduser()).resolve()


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; the result is shared like any other file
    try:
        yield Path(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_json(path: str | os.PathLike, obj) -> None:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")


def read_json(path: str | os.PathLike):
    return json.loads(Path(path).read_text())


def replace_dir(new: Path, target: Path) -> None:
    """Move the finished directory ``new`` onto ``target``; a crash leaves either the old or the new one."""
    old = target.with_name(target.name + ".old")
    shutil.rmtree(old, ignore_errors=True)
    if target.exists():
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)


def _non_finite(value) -> bool:
    if isinstance(value, list | tuple):
        return any(_non_finite(v) for v in value)
    return isinstance(value, float) and not math.isfinite(value)


def update_metrics(run_dir: str | os.PathLike, section: str, values: dict) -> dict:
    """Merge ``values`` into section ``section`` of ``<run_dir>/metrics.json`` (every stage's headline numbers).
    A NaN or infinite number is refused: a headline must be a number (or None where it is undefined)."""
    bad = sorted(key for key, value in values.items() if _non_finite(value))
    if bad:
        raise FloatingPointError(
            f"non-finite {section} metric(s) {bad}: {[values[k] for k in bad]}; "
            "something upstream diverged or read corrupt data"
        )
    path = Path(run_dir) / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    metrics[section] = {**metrics.get(section, {}), **values}
    write_json(path, metrics)
    return metrics


class CheckpointError(ValueError):
    """A checkpoint is corrupt or was made with other settings."""


def optimizer_tensors(model, optimizer) -> dict:
    """Adam's per-parameter moments as flat tensors (``adam.<param>.<key>``), for a safetensors checkpoint."""
    return {
        f"adam.{name}.{key}": value.detach().contiguous()
        for name, param in model.named_parameters()
        for key, value in optimizer.state.get(param, {}).items()
    }


def restore_optimizer(model, optimizer, tensors: dict) -> None:
    """Put the moments :func:`optimizer_tensors` saved back into ``optimizer``."""
    for name, param in model.named_parameters():
        keys = [k for k in tensors if k.startswith(f"adam.{name}.")]
        if keys:  # the moments go where the parameter is (a checkpoint from a GPU resumes on a CPU and back);
            # Adam keeps its step count on the host
            optimizer.state[param] = {
                key: value if key == "step" else value.to(param.device)
                for key, value in ((k.rsplit(".", 1)[1], tensors[k]) for k in keys)
            }


def save_checkpoint(directory: Path, tensors: dict, state: dict) -> None:
    """Tensors + JSON state, written to a temporary directory and moved into place as a whole."""
    from safetensors.torch import save_file

    tmp = directory.with_name(directory.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp / "state.safetensors"))
    write_json(tmp / "state.json", state)
    replace_dir(tmp, directory)


def load_checkpoint(
    directory: Path, fingerprint: str, same_settings: dict[str, str] | None = None
) -> tuple[dict, dict] | None:
    """(state, tensors) of the checkpoint in ``directory``; None if there is none; :class:`CheckpointError` if
    it is unreadable or was made with settings whose fingerprint differs. ``same_settings`` maps fingerprints
    that an earlier version computed for these same settings to what made them differ; such a checkpoint is
    accepted, and the log says why."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    if not (directory / "state.json").exists():
        return None
    try:
        state = read_json(directory / "state.json")
        tensors = load_file(str(directory / "state.safetensors"))
    except (OSError, ValueError, SafetensorError) as err:
        raise CheckpointError(f"checkpoint in {directory} is unreadable ({err}); delete it to start over") from err
    recorded = state.get("fingerprint")
    if recorded != fingerprint and recorded in (same_settings or {}):
        print(f"checkpoint in {directory}: {same_settings[recorded]}; accepted as the same settings")
    elif recorded != fingerprint:
        raise CheckpointError(
            f"checkpoint in {directory} was made with other settings (model shape, data or "
            "training settings); delete it or choose another output directory"
        )
    return state, tensors


def state_digest(module) -> str:
    """A short hash of a module's weights and buffers (what an artifact made from it records)."""
    digest = hashlib.sha256()
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()[:16]
