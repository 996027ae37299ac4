"""The run spine: one object that owns a run directory's layout, parameters, lock and artifact lineage.

A notebook opens its run with ``run = Run.open(run_dir, "02_nfm", globals())``: the stage's parameters are
validated (:mod:`featint_utils.params`), the run directory is locked against a second writer, and from then
on the notebook asks the run for paths and artifacts instead of writing them by hand.

**Lineage.** Every directory a stage produces holds ``lineage.json``: content fingerprints of its inputs
(the activation store's checksums, the weights of the SAE or NFM it was made from, the settings that shape
it). A stage that starts on a directory whose lineage differs clears it first and says what changed, so a
retrained SAE always retrains the NFMs downstream; a stage that *reads* an artifact whose upstream changed
since it was made refuses, naming the command that brings it up to date. Nothing stale is ever reused.

**Layout** (``runs/<name>/``): ``activations/`` (00), ``primary_sae/`` (01), ``nfm/`` (02, with the
attributions of 03), ``absorption/`` (03), ``secondary/nfm_seed<s>/`` (04), ``identification/nfm_seed<s>/``
(05), ``clamping/nfm_seed<s>/`` (06), ``figures/``, ``metrics.json``, ``run.json``, executed ``notebooks/``
and ``reports/``. Everything downstream of an NFM is keyed by its seed.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
import socket
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pandas as pd
import torch

from .. import params as parameters
from ..data.activation_store import ActivationStore
from ..data.models import resolve_device
from ..dictionary.sae import TopKSAE
from ..io import REPOSITORY, from_repository, read_json, state_digest, write_json
from ..residual.code_data import CodeData, load_sets, open_residual_data
from ..residual.decomposition import Decomposition
from ..residual.nfm import NFM

ROOT = REPOSITORY
RUNS_DIR = ROOT / "runs"
LINEAGE = "lineage.json"
LOCK = ".lock"
LOCK_ENV = "FEATINT_RUN_LOCKED"  # set by the runner for its kernels: the runner itself holds the lock


# The parameters that shape each artifact (its lineage records them; changing one starts it again).
SHAPES_PRIMARY = ("sae_latents", "sae_k", "sae_train_tokens", "sae_batch_size", "sae_lr", "sae_dead_tokens", "sae_seed")
SHAPES_NFM = (
    "nfm_k_embed",
    "nfm_dropout",
    "nfm_batch_norm",
    "nfm_knots",
    "nfm_lr_grid",
    "nfm_weight_decay",
    "nfm_batch_size",
    "nfm_max_epochs",
    "nfm_patience",
    "nfm_lr_decays",
    "tune_fraction",
    "test_fraction",
    "nfm_split_seed",
    "pair_ridge_pairs",
    "power_shares",
    "power_pairs",
)
SHAPES_ABSORPTION = ("absorption_share", "absorption_pairs", "absorption_train_tokens", "absorption_seed")
SHAPES_SECONDARY = (
    "secondary_latents",
    "secondary_k",
    "secondary_train_tokens",
    "secondary_batch_size",
    "secondary_lr",
    "secondary_dead_tokens",
    "secondary_seed",
)


class StaleArtifactError(RuntimeError):
    """An artifact was made from inputs that have changed since; the message names the stage to rerun."""


class RunLockedError(RuntimeError):
    """Another process is writing to this run directory."""


def fingerprint(value: Any) -> str:
    """A short content hash of a JSON-able value."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


class RunLock:
    """An exclusive advisory lock on ``<run_dir>/.lock`` (``flock``: released when the holder exits, however it
    exits). The file names the holder, so a refused run can say who has it."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK
        self._file = None

    def acquire(self, holder: str) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        f = open(self.path, "a+")  # noqa: SIM115 (held open for the lock's lifetime)
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            current = f.read().strip() or "unknown"
            f.close()
            raise RunLockedError(
                f"run directory {self.path.parent} is in use by {current}; wait for it to finish (or shut that "
                "kernel down), or choose another run with --name / --run-dir"
            ) from None
        f.seek(0)
        f.truncate()
        f.write(
            f"{holder} (pid {os.getpid()} on {socket.gethostname()}, since "
            f"{datetime.now(UTC).isoformat(timespec='seconds')})\n"
        )
        f.flush()
        self._file = f

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file, fcntl.LOCK_UN)
            self._file.close()
            self._file = None


_HELD: dict[str, RunLock] = {}  # run directories this process has locked through Run.open


def rerun_command(root: Path, stage: str) -> str:
    """The command that runs ``stage`` again in this run, with the profile and ``--set`` values of its last
    attempt (from ``run.json``), so that the rerun is the same experiment."""
    try:
        last = read_json(root / "run.json")["attempts"][-1]
        recorded = [f"--profile {last['profile']}"] + [f"--set {k}={v}" for k, v in last.get("sets", {}).items()]
    except (OSError, ValueError, KeyError, IndexError):
        recorded = []  # a run made by hand in notebooks: the defaults
    return " ".join(["python -m featint_utils run", *recorded, f"--run-dir {root} --only {stage[:2]}"])


class Run:
    """One run directory: its layout, the stage's validated parameters, and its artifacts with their lineage."""

    def __init__(self, root: str | Path, stage: str | None = None, values: dict | None = None):
        self.root = from_repository(root)
        self.stage = stage
        self.params: dict[str, Any] = values or {}
        self._lock: RunLock | None = None
        self._digests: dict[str, str] = {}
        self._store: ActivationStore | None = None

    @classmethod
    def open(cls, run_dir: str | Path, stage: str, namespace: dict, lock: bool = True) -> Run:
        """The run at ``run_dir`` for ``stage``, its parameters validated from ``namespace`` (a notebook's
        ``globals()``), locked for writing unless the runner that started this kernel holds the lock."""
        run = cls(run_dir, stage, parameters.validate(stage, namespace))
        run.root.mkdir(parents=True, exist_ok=True)
        if lock and os.environ.get(LOCK_ENV) != str(run.root):
            previous = _HELD.pop(str(run.root), None)
            if previous is not None:  # this process opens its run again (a re-executed cell): hand the lock over
                previous.release()
            run._lock = RunLock(run.root)
            run._lock.acquire(f"stage {stage}")
            _HELD[str(run.root)] = run._lock
        return run

    def close(self) -> None:
        """Release the lock (a notebook's last cell; a kernel that exits releases it too)."""
        if self._lock is not None:
            self._lock.release()
            if _HELD.get(str(self.root)) is self._lock:
                del _HELD[str(self.root)]
            self._lock = None

    # -- layout ------------------------------------------------------------------------------------------
    @property
    def store_dir(self) -> Path:
        return self.root / "activations"

    @property
    def primary_dir(self) -> Path:
        return self.root / "primary_sae"

    @property
    def nfm_dir(self) -> Path:
        return self.root / "nfm"

    @property
    def residuals_dir(self) -> Path:
        return self.nfm_dir / "residuals"

    @property
    def sets_path(self) -> Path:
        return self.nfm_dir / "sets.json"

    def nfm_model_dir(self, seed: int) -> Path:
        return self.nfm_dir / "nfm" / f"seed{seed}" / "model"

    def attribution_path(self, seed: int) -> Path:
        return self.nfm_dir / f"attribution_seed{seed}.csv"

    @property
    def absorption_dir(self) -> Path:
        return self.root / "absorption"

    def secondary_dir(self, seed: int) -> Path:
        """The secondary stage of NFM ``seed``: ``vectors/`` (its input store), ``sae/`` and the trainer's files."""
        return self.root / "secondary" / f"nfm_seed{seed}"

    def secondary_vectors_dir(self, seed: int) -> Path:
        return self.secondary_dir(seed) / "vectors"

    def identification_dir(self, seed: int) -> Path:
        return self.root / "identification" / f"nfm_seed{seed}"

    def effects_path(self, seed: int, family: str) -> Path:
        """Stage 05's effect table of ``family`` ("primary" or "secondary") for NFM ``seed``."""
        return self.identification_dir(seed) / f"{family}_effects.csv"

    def clamping_dir(self, seed: int) -> Path:
        return self.root / "clamping" / f"nfm_seed{seed}"

    def clamping_table(self, seed: int, name: str) -> Path:
        """Stage 06's tables: ``changes`` (every readout change), ``statistics`` (the tests) and, on minimal pairs,
        ``layer_made`` (the part of each clamp's effect the layer made)."""
        return self.clamping_dir(seed) / f"{name}.csv"

    # -- lineage -----------------------------------------------------------------------------------------
    def settings(self, *names: str) -> dict[str, Any]:
        """The named parameters of this stage (those that shape an artifact, for its lineage)."""
        return {name: self.params[name] for name in names}

    def begin_primary_sae(self, pretrained: dict | None = None) -> Path:
        """Stage 01's directory; ``pretrained`` (a published SAE's source and content hash) replaces the
        training settings in its lineage, so another SAE, or changed files at the same path, start it again."""
        shapes = {"pretrained": pretrained} if pretrained else self.settings(*SHAPES_PRIMARY)
        return self.begin(self.primary_dir, self.primary_inputs() | shapes)

    def begin_nfm_stage(self) -> Path:
        return self.begin(self.nfm_dir, self.nfm_inputs() | self.settings(*SHAPES_NFM))

    def begin_absorption(self) -> Path:
        return self.begin(self.absorption_dir, self.nfm_inputs() | self.settings(*SHAPES_ABSORPTION))

    def begin_secondary(self, seed: int) -> Path:
        return self.begin(self.secondary_dir(seed), self.secondary_inputs(seed) | self.settings(*SHAPES_SECONDARY))

    def begin_identification(self, seed: int) -> Path:
        return self.begin(self.identification_dir(seed), self.identification_inputs(seed))

    def begin_clamping(self, seed: int) -> Path:
        return self.begin(self.clamping_dir(seed), self.identification_inputs(seed))

    def begin(self, directory: Path, inputs: dict[str, Any]) -> Path:
        """Make ``directory`` the home of an artifact of exactly ``inputs``: if it holds one made from other
        inputs (or of unknown origin), clear it first and say what changed. Returns ``directory``."""
        lineage = directory / LINEAGE
        if directory.exists() and any(directory.iterdir()):
            recorded = _read_lineage(lineage)
            if recorded != inputs:
                changed = sorted(
                    k for k in set(inputs) | set(recorded or {}) if (recorded or {}).get(k) != inputs.get(k)
                )
                print(
                    f"{directory.relative_to(self.root)}: its inputs changed ({', '.join(changed) or 'unknown'}): "
                    "starting it again"
                )
                shutil.rmtree(directory)
        directory.mkdir(parents=True, exist_ok=True)
        write_json(lineage, inputs)
        return directory

    def _check(self, directory: Path, upstream: dict[str, Any], stage: str, what: str) -> None:
        """Refuse to read ``what`` from ``directory`` unless it was made from ``upstream`` as it is now."""
        recorded = _read_lineage(directory / LINEAGE)
        if recorded is None:
            raise StaleArtifactError(
                f"no {what} in {directory} (or no record of its inputs): run stage {stage} "
                f"first: `{rerun_command(self.root, stage)}`"
            )
        changed = sorted(k for k, v in upstream.items() if recorded.get(k) != v)
        if changed:
            raise StaleArtifactError(
                f"the {what} in {directory} was made from an earlier {', '.join(changed)}: "
                f"bring it up to date with `{rerun_command(self.root, stage)}`"
            )

    def _digest(self, key: str, load) -> str:
        """The weights digest of the artifact ``load()`` returns, loaded and hashed once per run object."""
        if key not in self._digests:
            self._digests[key] = state_digest(load())
        return self._digests[key]

    # -- artifacts ---------------------------------------------------------------------------------------
    def store(self) -> ActivationStore:
        """The activation store, every file's checksum verified (cached by size and mtime: cheap after the
        first check)."""
        if self._store is None:
            store = ActivationStore(self.store_dir)
            store.verify()
            self._store = store
        return self._store

    def primary_inputs(self) -> dict[str, Any]:
        return {"store": self.store().fingerprint}

    def primary_sae(self) -> TopKSAE:
        """The primary SAE, refused if the store changed after it was trained."""
        self._check(self.primary_dir, self.primary_inputs(), "01_primary_sae", "primary SAE")
        return TopKSAE.load(self.primary_dir / "sae")

    def primary_sae_source(self) -> dict | None:
        """Where the primary SAE came from when stage 01 installed a published one instead of training it: its
        ``source`` (``primary_sae`` as given) and the ``sha256`` of its files; None for a trained SAE."""
        self._check(self.primary_dir, self.primary_inputs(), "01_primary_sae", "primary SAE")
        return _read_lineage(self.primary_dir / LINEAGE).get("pretrained")

    def nfm_inputs(self) -> dict[str, Any]:
        return {"store": self.store().fingerprint, "primary_sae": self._digest("primary", self.primary_sae)}

    def residual_sets(self) -> dict[str, CodeData]:
        """The fit/tune/test sets of stage 02, cut from its residual cache as 02 recorded them."""
        self._check(self.nfm_dir, self.nfm_inputs(), "02_nfm", "NFM stage")
        return load_sets(open_residual_data(self.residuals_dir), self.sets_path)

    def nfm(self, seed: int) -> NFM:
        """The NFM of ``seed`` fitted by stage 02 to the current primary SAE's residual."""
        self._check(self.nfm_dir, self.nfm_inputs(), "02_nfm", "NFM stage")
        if not (self.nfm_model_dir(seed) / "cfg.json").exists():
            fitted = sorted(p.parent.name for p in (self.nfm_dir / "nfm").glob("seed*/model"))
            raise StaleArtifactError(
                f"stage 02 fitted no NFM of seed {seed} (it has {', '.join(fitted) or 'none'});"
                " set nfm_seed to one of them, or add it to nfm_seeds and rerun 02"
            )
        return NFM.load(self.nfm_model_dir(seed))

    def secondary_inputs(self, seed: int) -> dict[str, Any]:
        return self.nfm_inputs() | {
            "nfm": self._digest(f"nfm{seed}", lambda: self.nfm(seed)),
            "sets": fingerprint(read_json(self.sets_path)),
        }

    def secondary_store(self, seed: int) -> ActivationStore:
        self._check(self.secondary_dir(seed), self.secondary_inputs(seed), "04_secondary_sae", "secondary stage")
        store = ActivationStore(self.secondary_vectors_dir(seed))
        store.verify()
        return store

    def secondary_sae(self, seed: int) -> TopKSAE:
        self._check(self.secondary_dir(seed), self.secondary_inputs(seed), "04_secondary_sae", "secondary SAE")
        return TopKSAE.load(self.secondary_dir(seed) / "sae")

    @property
    def device(self) -> torch.device:
        """Where this stage computes: its ``device`` parameter, resolved (auto: a GPU when there is one)."""
        return torch.device(resolve_device(self.params.get("device", "auto")))

    def decomposition(self, seed: int | None = None, secondary: bool = True) -> Decomposition:
        """The primary SAE, and with ``seed`` the NFM of that seed and (``secondary``) its secondary SAE, on
        the stage's device."""
        primary = self.primary_sae()
        if seed is None:
            return Decomposition(primary).to(self.device)
        return Decomposition(primary, self.nfm(seed), self.secondary_sae(seed) if secondary else None).to(self.device)

    def identification_inputs(self, seed: int) -> dict[str, Any]:
        return {
            "primary_sae": self._digest("primary", self.primary_sae),
            "secondary_sae": self._digest(f"secondary{seed}", lambda: self.secondary_sae(seed)),
        }

    def feature_effects(self, seed: int, family: str) -> pd.DataFrame:
        """Stage 05's per-feature effect table of ``family`` ("primary" or "secondary") for NFM ``seed``."""
        directory = self.identification_dir(seed)
        self._check(directory, self.identification_inputs(seed), "05_feature_identification", "feature effects")
        return pd.read_csv(self.effects_path(seed, family))

    def attribution(self, seed: int) -> pd.DataFrame:
        """Stage 03's per-feature variance attribution of NFM ``seed``."""
        path = self.attribution_path(seed)
        self._check(self.nfm_dir, self.nfm_inputs(), "02_nfm", "NFM stage")
        if not path.exists():
            raise StaleArtifactError(f"no attribution of NFM seed {seed}: run `{rerun_command(self.root, '03')}`")
        return pd.read_csv(path)


def _read_lineage(path: Path) -> dict | None:
    try:
        recorded = read_json(path)
    except (OSError, ValueError):
        return None
    return recorded if isinstance(recorded, dict) else None
