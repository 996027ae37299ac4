"""One progress-bar helper: text bars when headless (papermill, CI, a terminal), widget bars in JupyterLab.

``tqdm.auto`` guesses from the kernel type, which is wrong under papermill: a kernel with no front end saves
widget bars as empty views in the notebook. A kernel that nbclient started (papermill, ``nbconvert
--execute``, the runner) is recognised by its in-memory command history (nbclient passes
``--HistoryManager.hist_file=:memory:``; a Jupyter server does not). ``FEATINT_HEADLESS=1`` forces text bars
anywhere, ``FEATINT_HEADLESS=0`` widget bars in any kernel.
"""

from __future__ import annotations

import os
import sys


def headless() -> bool:
    """True unless we are in a Jupyter kernel that a person is looking at."""
    forced = os.environ.get("FEATINT_HEADLESS", "")
    if forced in ("1", "0"):
        return forced == "1"
    if os.environ.get("CI"):
        return True
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    if type(shell).__name__ != "ZMQInteractiveShell":
        return True
    return executed_by_nbclient(shell)


def executed_by_nbclient(shell) -> bool:
    """Whether this kernel was started by nbclient (papermill and nbconvert execute notebooks with it)."""
    history = getattr(shell, "history_manager", None)
    return str(getattr(history, "hist_file", "")) == ":memory:"


def progress(iterable=None, **kwargs):
    """A tqdm bar of the right kind; takes tqdm's arguments (``total``, ``desc``, ``unit``, ...)."""
    if headless():
        from tqdm import tqdm

        # Few updates: a saved notebook or CI log should hold a handful of lines, not thousands.
        kwargs.setdefault("mininterval", 5.0)
        kwargs.setdefault("file", sys.stderr)
        return tqdm(iterable, **kwargs)
    from tqdm.notebook import tqdm

    return tqdm(iterable, **kwargs)
