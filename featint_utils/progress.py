"""One progress-bar helper: text bars when headless (papermill, CI, a terminal), widget bars in JupyterLab.

``tqdm.auto`` guesses from the kernel type, which is wrong under papermill (a kernel with no front end
renders widget bars as noise in the saved notebook). The runner sets ``FEATINT_HEADLESS=1``.
"""

from __future__ import annotations

import os
import sys


def headless() -> bool:
    """True unless we are in a Jupyter kernel that a person is looking at."""
    if os.environ.get("FEATINT_HEADLESS") or os.environ.get("CI"):
        return True
    shell = sys.modules.get("IPython") and sys.modules["IPython"].get_ipython()
    return type(shell).__name__ != "ZMQInteractiveShell"


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
