"""Two commits' code side by side, each checked out in a git worktree of its own (for the benchmarks that compare
an earlier commit's code with a later one's on the same data)."""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def resolve(refs: dict[str, str]) -> dict[str, str]:
    """Each name's ref as a full commit hash."""
    return {
        name: subprocess.run(
            ["git", "rev-parse", ref], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
        for name, ref in refs.items()
    }


@contextmanager
def checked_out(commits: dict[str, str]) -> Iterator[tuple[Path, dict[str, Path]]]:
    """A scratch folder and, per name, a worktree of its commit in it; both are removed however the block exits."""
    with tempfile.TemporaryDirectory() as scratch:
        scratch = Path(scratch)
        trees = {name: scratch / f"code_{name}" for name in commits}
        added = []
        try:
            for name, commit in commits.items():
                subprocess.run(["git", "worktree", "add", "--detach", str(trees[name]), commit], cwd=ROOT, check=True)
                added.append(trees[name])
            yield scratch, trees
        finally:
            for tree in added:
                subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=ROOT, check=True)


# run by every Python process of an arm at start-up (``site`` imports ``sitecustomize`` after the ``.pth`` files):
# the editable install's import hook would answer an import that the arm's older tree cannot serve (a module
# it does not have) with the working tree's module, silently timing the wrong code; without it, such an import fails
_SHIM = """import sys
sys.meta_path[:] = [f for f in sys.meta_path if "__editable__" not in getattr(f, "__module__", "")]
"""


def arm_environment(code: Path, threads: int) -> dict[str, str]:
    """The environment of an arm's processes (notebook kernels included): ``featint_utils`` from the worktree
    ``code`` only, ``threads`` threads, no TensorBoard."""
    shim = code.parent / f"{code.name}_imports"
    shim.mkdir(exist_ok=True)
    (shim / "sitecustomize.py").write_text(_SHIM)
    return dict(
        os.environ, PYTHONPATH=f"{shim}{os.pathsep}{code}", OMP_NUM_THREADS=str(threads), FEATINT_TENSORBOARD="0"
    )


def check_imported_from(code: Path) -> None:
    """Raise unless every ``featint_utils`` module this process imported comes from the worktree ``code``."""
    import sys

    strays = [
        name
        for name, module in sys.modules.items()
        if name.split(".")[0] == "featint_utils"
        and getattr(module, "__file__", None)
        and not Path(module.__file__).resolve().is_relative_to(code.resolve())
    ]
    if strays:
        raise RuntimeError(f"modules imported from outside the arm's tree {code}: {sorted(strays)}")


def report(result: dict, name: str) -> None:
    """Add the speed-up of the ``after`` arm over the ``before`` arm, print the result (its arms aside) and write
    it to ``benchmarks/results/<name>.json``."""
    result["speedup"] = result["arms"]["before"]["seconds"] / result["arms"]["after"]["seconds"]
    print(json.dumps({k: v for k, v in result.items() if k != "arms"}, indent=1))
    (Path(__file__).parent / "results" / f"{name}.json").write_text(json.dumps(result, indent=1) + "\n")


def add_commit_arguments(parser) -> None:
    """``--before``, ``--after`` and ``--threads``: the two commits compared and each arm's threads."""
    parser.add_argument("--before", required=True, help="the commit whose code is the baseline")
    parser.add_argument("--after", default="HEAD", help="the commit whose code is measured against it")
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="threads of each arm")
