"""Atomic writes: a file either has its complete new content or is untouched, never half-written."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def atomic_path(path: str | os.PathLike):
    """Yield a temporary path beside ``path``; rename it onto ``path`` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
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


def update_metrics(run_dir: str | os.PathLike, section: str, values: dict) -> dict:
    """Merge ``values`` into section ``section`` of ``<run_dir>/metrics.json`` (every stage's headline numbers)."""
    path = Path(run_dir) / "metrics.json"
    metrics = read_json(path) if path.exists() else {}
    metrics[section] = {**metrics.get(section, {}), **values}
    write_json(path, metrics)
    return metrics
