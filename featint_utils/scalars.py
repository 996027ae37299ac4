"""Training curves for TensorBoard (local event files, no account): every trainer writes its scalars into
``<its out_dir>/tensorboard/`` as it trains, so ``tensorboard --logdir runs/<name>`` shows every SAE and NFM
fit of a run, live, each under its own path. ``FEATINT_TENSORBOARD=0`` turns it off (the history CSVs that
the notebooks plot are written either way).
"""

from __future__ import annotations

import math
import os
from pathlib import Path

ENV = "FEATINT_TENSORBOARD"


def enabled() -> bool:
    return os.environ.get(ENV, "1") != "0"


class ScalarLog:
    """Scalars by step into a TensorBoard event file; does nothing when off or on a rank other than 0."""

    def __init__(self, out_dir: str | Path, active: bool = True):
        self._writer = None
        if active and enabled():
            from torch.utils.tensorboard import SummaryWriter

            self._writer = SummaryWriter(log_dir=str(Path(out_dir) / "tensorboard"))

    def add(self, step: int, scalars: dict) -> None:
        if self._writer is None:
            return
        for name, value in scalars.items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                self._writer.add_scalar(name, value, step)

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
