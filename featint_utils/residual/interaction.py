"""The interaction estimator: what pairs of SAE features add to a converged first-order model of the SAE
residual, on held-out documents, with an interval, a calibrated null control and measured power.

**Nested fits** (:class:`Estimator`). For a target ``y`` (the residual, or a control or planted version of it):

1. the first-order model is the closed-form ridge from the code (penalty chosen on tune): converged;
2. every trained model (the additive per-feature model, the NFM over the linear and over the additive fit,
   the parameter-matched MLP) starts *as* its first-order model (that part copied and kept fixed, the new
   hinges or branch at zero), so it fits what the converged first-order model leaves; its start is the first
   candidate of early stopping, so it never ends worse than that start on tune; the learning rate is chosen
   on tune;
3. a trained model's linear block is then refitted in closed form around what it learnt (a Frisch-Waugh
   step): the new part can also learn corrections that are linear in the code, and those are not
   interactions; the refit is kept only if it is not worse than the start on tune;
4. the explicit-pairs ridge nests in the code ridge in closed form (pair penalty and how many of the
   strongest pairs to keep chosen on tune, "no pairs" included).

The *share* of a comparison is ``FVU_test(base) - FVU_test(model)`` (an incremental R-squared of the target).

The null control and the planted targets are :mod:`featint_utils.residual.targets`, the per-document
bootstrap :mod:`featint_utils.residual.resampling`, and reading the saved tables
:mod:`featint_utils.residual.interaction_results`.

**Over ranks** (``torchrun``, :mod:`featint_utils.data.distributed`) the targets after the residual (the null
controls and the planted sizes) are independent of each other, so when there are at least as many of them as
ranks they are *dealt*: every rank fits the residual's ladder as one process would (its members are small, and
a data-parallel step of a small NFM is mostly all-reduce), then fits its share of the other targets whole, on
the full batch, with no communication; rank 0 gathers their rows and errors and writes the tables in the order
one process would. With fewer targets than ranks, every rank walks the same ladder instead: each
gradient-trained model trains data-parallel (:class:`~featint_utils.residual.nfm_training.ResidualTrainer`), the
closed-form ridges are solved by every rank (the same numbers everywhere, so every nested start agrees), and
rank 0 writes the models and the tables. A finished :func:`run` leaves ``ladder.done.json``: run again with
the same settings and data, it reads its tables back instead of refitting (how a notebook goes on from
what the ranks fitted).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data.distributed import SINGLE, Dist
from ..io import read_json, write_json
from ..progress import progress
from .baselines import (
    RIDGE_ALPHAS,
    CodeMLP,
    SparseDesign,
    cofiring_pairs,
    fit_pair_ridge,
    fit_ridge,
    matched_hidden,
)
from .code_data import CodeData
from .nfm import NFM, NFMConfig
from .nfm_training import FitConfig, ResidualTrainer, document_sse, residual_fvu, select_lr
from .resampling import document_totals
from .targets import AddPlanted, PermutedRemainder, WithoutNonLinearPart, plant_pairs

MODELS = {
    "zero": "SAE alone (predict 0)",
    "raw_ridge": "ridge from the raw activation",
    "code_ridge": "linear in the code (ridge)",
    "additive": "additive per-feature non-linear",
    "pair_ridge": "ridge: code + explicit pairs",
    "nfm": "NFM: linear + pairwise",
    "nfm_additive": "NFM: additive + pairwise",
    "mlp": "linear + MLP (NFM's size)",
    "oracle": "ridge: code + the planted pairs",
}
"""Model keys, with the label a table or figure shows."""

GRADIENT = ("additive", "nfm", "nfm_additive", "mlp")
"""Models fitted by gradient (seeded, learning rate chosen on tune), in the order they are fitted."""

COMPARISONS = {
    "over_linear": ("code_ridge", "nfm"),
    "over_additive": ("additive", "nfm_additive"),
    "pair_ridge": ("code_ridge", "pair_ridge"),
    "mlp_over_linear": ("code_ridge", "mlp"),
    "additive_over_linear": ("code_ridge", "additive"),
    "oracle": ("code_ridge", "oracle"),
}
"""Share name: (base model, model). The first two are the interaction shares."""

ESTIMATORS = ("over_linear", "pair_ridge")
"""The two estimators of the pairwise term over the linear fit: the nested NFM and the explicit-pairs ridge."""

RESIDUAL = "residual"
CONTROL = "control"


# ---------------------------------------------------------------------------------------------------
# The estimator


@dataclass
class EstimatorConfig:
    """What the estimator fits and how."""

    nfm: NFMConfig
    """Shape of the NFMs (``knots`` sets the additive models' hinges; 0 means 3)."""
    fit: FitConfig
    """Trainer settings of every gradient-trained model (its ``lr`` is replaced by the one chosen on tune)."""
    seeds: tuple[int, ...] = (0, 1, 2)
    """Seeds of every gradient-trained model."""
    lr_grid: tuple[float, ...] = (1e-3, 3e-3)
    """Learning rates tried for each gradient-trained model (first seed, real residual); best on tune wins."""
    n_pairs: int = 1024
    """Explicit pairs in the pair ridge: the most frequently co-firing in the fit set."""
    n_boot: int = 2000
    """Bootstrap draws of the intervals."""
    level: float = 0.95
    """Interval coverage."""
    device: str = "cpu"
    """Where every model is fitted and evaluated (the ridges' normal equations are solved there in float64);
    the data stay on the host and stream to it."""

    @property
    def knots(self) -> int:
        return self.nfm.knots or 3


class Estimator:
    """Fits every model of the ladder on a target and keeps, per test document, every model's squared error.

    ``out_dir`` holds the trained models (``<model>/seed<s>/``, resumable; the real residual's NFMs are saved
    under ``<model>/seed<s>/model``) and, per target other than the residual, ``targets/<target>/...``."""

    def __init__(
        self,
        sets: dict[str, CodeData],
        cfg: EstimatorConfig,
        out_dir: str | Path,
        resume: bool = True,
        dist: Dist = SINGLE,
    ):
        missing = {"fit", "tune", "test"} - set(sets)
        if missing:
            raise ValueError(f"the estimator needs fit, tune and test sets; missing {sorted(missing)}")
        if not cfg.seeds:
            raise ValueError("the estimator needs at least one seed")
        self.sets, self.cfg, self.out_dir, self.resume, self.dist = sets, cfg, Path(out_dir), resume, dist
        self.pairs = cofiring_pairs(sets["fit"], cfg.n_pairs)
        self.design = SparseDesign(sets["fit"], self.pairs)  # its code block serves the first-order ridges
        self.feature_scale = sets["fit"].feature_scale()
        lr_file = self.out_dir / "learning_rates.json"
        self.lrs: dict[str, float] = read_json(lr_file) if resume and lr_file.exists() else {}
        self.rows: list[dict] = []
        self.sse: dict[tuple[str, str, int], np.ndarray] = {}
        self.totals: dict[str, pd.DataFrame] = {}
        self.first_order: dict[str, torch.nn.Module] = {}  # (target) code ridge, (target, seed) additive

    # -- models ----------------------------------------------------------------------------------------
    def _model(self, name: str, seed: int, start: torch.nn.Module, target_rms: float) -> torch.nn.Module:
        """A fresh nested model equal to its first-order ``start``, its new branch calibrated on the fit set."""
        cfg = self.cfg.nfm
        sample = self.sets["fit"].batch(np.arange(min(len(self.sets["fit"]), 8192)))
        if name == "additive":
            model = NFM(replace(cfg, form="first_order", knots=self.cfg.knots), seed=seed)
            model.set_knots(self.feature_scale)
            return model.start_from(start.weight, start.bias).to(self.cfg.device)
        if name == "nfm":
            model = NFM(replace(cfg, form="nfm", knots=0), seed=seed).start_from(start.weight, start.bias)
        elif name == "nfm_additive":
            model = NFM(replace(cfg, form="nfm", knots=self.cfg.knots), seed=seed)
            model.start_from(start.linear_weight, start.bias, start.knot_values)
        elif name == "mlp":
            nfm = NFM(replace(cfg, form="nfm", knots=0))
            branch = nfm.n_parameters() - nfm.linear_weight.numel() - nfm.bias.numel()
            hidden = matched_hidden(branch, cfg.n_latents, cfg.d_out)
            model = CodeMLP(cfg.n_latents, cfg.d_out, hidden, seed=seed).start_from(start.weight, start.bias)
        else:
            raise ValueError(f"unknown gradient-trained model {name!r}; known: {GRADIENT}")
        return model.calibrate(sample.values, sample.indices, target_rms).to(self.cfg.device)

    def _train(self, target: str, name: str, seed: int, start, sets, target_rms: float):
        out = (self.out_dir if target == RESIDUAL else self.out_dir / "targets" / target) / name / f"seed{seed}"
        cfg = replace(self.cfg.fit, seed=seed)
        desc = f"{name} (seed {seed})" if target == RESIDUAL else f"{target}: {name} (seed {seed})"
        if name not in self.lrs:
            if target != RESIDUAL:
                raise ValueError(f"fit the residual first: it chooses the learning rate of {name!r}")
            lr, model, trainer = select_lr(
                lambda: self._model(name, seed, start, target_rms),
                sets["fit"],
                sets["tune"],
                cfg,
                self.cfg.lr_grid,
                out,
                resume=self.resume,
                desc=desc,
                dist=self.dist,
            )
            self.lrs[name] = lr
            self._write_learning_rates()
        else:
            trainer = ResidualTrainer(
                self._model(name, seed, start, target_rms),
                sets["fit"],
                sets["tune"],
                replace(cfg, lr=self.lrs[name]),
                out,
                self.dist,
            )
            model = trainer.train(resume=self.resume, desc=desc)
        info = trainer.summary()
        if trainer.improved:
            fresh = lambda: self._model(name, seed, start, target_rms)  # noqa: E731 (the start, rebuilt exactly)
            info |= self._refit_linear(model, fresh, sets, trainer.start_fvu, self.first_order[target].alpha)
        if isinstance(model, NFM) and self.dist.is_main:
            model.save(out / "model", extra=info)
        return model, info

    def _write_learning_rates(self) -> None:
        if self.dist.is_main:
            write_json(self.out_dir / "learning_rates.json", self.lrs)

    def _refit_linear(self, model, fresh, sets, start_fvu: float, alpha: float) -> dict:
        """The Frisch-Waugh step that makes a trained model nested: refit its linear block in closed form (the
        first-order fit's own penalty ``alpha``) to the target minus everything else the model predicts. A
        new branch can also learn corrections that are linear in the code (the NFM's pooled vector carries f_i
        times the code's total, a hinge is linear wherever it is on), so it can undo part of the ridge's
        shrinkage; those go back into the linear block, and only what no linear map of the code gives remains
        as the increment. If the result is worse on tune than the start, the model goes back to its start."""
        refit = fit_ridge(
            sets["fit"].with_target(WithoutNonLinearPart(sets["fit"], model)),
            sets["tune"],
            alphas=(alpha,),
            design=self.design,
            device=self.cfg.device,
        )
        model.set_linear(refit.weight, refit.bias)
        tune_fvu = residual_fvu(model, sets["tune"], dist=self.dist)
        if tune_fvu > start_fvu:  # never worse than the start: back to it
            model.load_state_dict(fresh().state_dict())
            return {"refit_tune_fvu": tune_fvu, "kept_start": True}
        return {"refit_tune_fvu": tune_fvu, "kept_start": False}

    def _record(self, target: str, name: str, seed: int, model, sets, started: float, **extra) -> None:
        sse, total_fvu = document_sse(model, sets["test"])
        self.sse[(target, name, seed)] = sse
        totals = self.totals[target]
        self.rows.append(
            {
                "target": target,
                "model": name,
                "label": MODELS[name],
                "seed": seed,
                "residual_fvu": float(sse.sum() / totals["centred_ss"].sum()),
                "gain_over_zero": float((totals["zero_sse"].sum() - sse.sum()) / totals["centred_ss"].sum()),
                "total_fvu": total_fvu,
                "n_parameters": sum(p.numel() for p in model.parameters()),
                "seconds": time.perf_counter() - started,
                **extra,
            }
        )

    def fit_target(
        self,
        target: str,
        sets: dict[str, CodeData],
        models: tuple[str, ...],
        seeds: tuple[int, ...] | None = None,
        oracle_pairs: np.ndarray | None = None,
    ) -> None:
        """Fit ``models`` (keys of :data:`MODELS`; the code ridge always) on ``sets``' target."""
        unknown = set(models) - set(MODELS)
        if unknown:
            raise ValueError(f"unknown models {sorted(unknown)}; known: {list(MODELS)}")
        seeds = tuple(self.cfg.seeds if seeds is None else seeds)
        fit, tune, test = sets["fit"], sets["tune"], sets["test"]
        self.totals[target] = document_totals(test)
        target_rms = float(np.sqrt(document_totals(fit)["centred_ss"].sum() / (len(fit) * fit.d_out)))
        started = time.perf_counter()
        if "zero" in models:
            self._record(target, "zero", -1, _Zero(), sets, started)
        if "raw_ridge" in models:
            started = time.perf_counter()
            raw = fit_ridge(fit, tune, "inputs", device=self.cfg.device)
            self._record(target, "raw_ridge", -1, raw, sets, started, alpha=raw.alpha)
        started = time.perf_counter()
        # the residual chooses the first-order penalty; a control or planted target keeps it (same design)
        alphas = (self.first_order[RESIDUAL].alpha,) if RESIDUAL in self.first_order else RIDGE_ALPHAS
        first = fit_ridge(fit, tune, "codes", alphas=alphas, design=self.design, device=self.cfg.device)
        self.first_order[target] = first
        self._record(target, "code_ridge", -1, first, sets, started, alpha=first.alpha)
        if "pair_ridge" in models and len(self.pairs):
            started = time.perf_counter()
            pair = fit_pair_ridge(fit, tune, first, design=self.design, device=self.cfg.device)
            self._record(target, "pair_ridge", -1, pair, sets, started, alpha=pair.alpha, n_pairs=len(self.pairs))
        if "oracle" in models:
            started = time.perf_counter()
            oracle = fit_pair_ridge(fit, tune, first, pairs=oracle_pairs, clear_gain=False, device=self.cfg.device)
            self._record(target, "oracle", -1, oracle, sets, started, alpha=oracle.alpha, n_pairs=len(oracle_pairs))
        for seed in seeds:
            additive, trained = None, {}
            for name in (m for m in GRADIENT if m in models):
                if name == "nfm_additive" and additive is None:
                    raise ValueError("nfm_additive nests in the additive model: fit 'additive' too")
                started = time.perf_counter()
                if name == "nfm_additive" and not trained["additive"][1]["improved_on_start"] and "nfm" in trained:
                    # an additive fit that kept its start is the linear fit: the NFM over it is the NFM over that
                    model, info = trained["nfm"]
                    if "nfm_additive" not in self.lrs:  # ... and later fits of it take that NFM's learning rate
                        self.lrs["nfm_additive"] = self.lrs["nfm"]
                        self._write_learning_rates()
                else:
                    start = additive if name == "nfm_additive" else first
                    model, info = self._train(target, name, seed, start, sets, target_rms)
                trained[name] = (model, info)
                self._record(target, name, seed, model, sets, started, **info)
                if name == "additive":
                    additive = model
                    self.first_order[(target, seed)] = model

    def control_sets(self, base: str = RESIDUAL, first_order: torch.nn.Module | None = None, seed: int = 0):
        """The null control's sets (see the module docstring) around ``base``'s first-order fit."""
        first_order = first_order or self.first_order[base]
        return {
            name: data.with_target(PermutedRemainder(data, self.sets, first_order, seed))
            for name, data in self.sets.items()
        }

    def gather(self, dist: Dist, order: list[str]) -> None:
        """After dealt targets: every rank's rows, test errors and document totals on every rank, the rows in
        the order one process makes them (the residual's, then ``order``'s targets)."""
        mine = {"rows": self.rows, "sse": self.sse, "totals": self.totals}
        parts = dist.all_gather_object(mine)
        position = {target: i for i, target in enumerate([RESIDUAL, *order])}
        residual = [row for row in parts[0]["rows"] if row["target"] == RESIDUAL]  # every rank fitted it
        others = [row for part in parts for row in part["rows"] if row["target"] != RESIDUAL]
        # a stable sort: each target's rows come from one rank, in the order that rank made them
        self.rows = residual + sorted(others, key=lambda row: position[row["target"]])
        for part in parts:
            self.sse |= {key: value for key, value in part["sse"].items() if key[0] != RESIDUAL}
            self.totals |= {key: value for key, value in part["totals"].items() if key != RESIDUAL}
        self.sse = dict(sorted(self.sse.items(), key=lambda item: position[item[0][0]]))
        self.totals = dict(sorted(self.totals.items(), key=lambda item: position[item[0]]))

    # -- results ---------------------------------------------------------------------------------------
    def table(self) -> pd.DataFrame:
        """One row per (target, model, seed): held-out residual FVU, gain over predicting zero, fit details."""
        return pd.DataFrame(self.rows)

    def sse_table(self) -> pd.DataFrame:
        """Long table: target, model, seed, document, summed squared error on the test set."""
        frames = []
        for (target, name, seed), sse in self.sse.items():
            documents = self.totals[target]["document"].to_numpy()
            frames.append(
                pd.DataFrame({"target": target, "model": name, "seed": seed, "document": documents, "sse": sse})
            )
        return pd.concat(frames, ignore_index=True)

    def totals_table(self) -> pd.DataFrame:
        return pd.concat([t.assign(target=name) for name, t in self.totals.items()], ignore_index=True)

    def save(self) -> None:
        """``ladder.csv`` (all targets), ``test_sse.csv`` and ``test_documents.csv`` in ``out_dir`` (rank 0)."""
        if not self.dist.is_main:
            return
        self.table().to_csv(self.out_dir / "ladder.csv", index=False)
        self.sse_table().to_csv(self.out_dir / "test_sse.csv", index=False)
        self.totals_table().to_csv(self.out_dir / "test_documents.csv", index=False)
        write_json(self.out_dir / "pairs.json", {"explicit_pairs": self.pairs.tolist()})


class _Zero(torch.nn.Module):
    def predict(self, batch) -> torch.Tensor:
        return torch.zeros_like(batch.target)


@dataclass
class Ladder:
    """What a finished :func:`run` leaves in its directory: one row per (target, model, seed) (see
    :meth:`Estimator.table`) and the learning rates chosen on tune."""

    table: pd.DataFrame
    lrs: dict[str, float]

    @classmethod
    def read(cls, out_dir: str | Path) -> Ladder:
        out_dir = Path(out_dir)
        return cls(pd.read_csv(out_dir / "ladder.csv"), read_json(out_dir / "learning_rates.json"))


DONE = "ladder.done.json"


def _run_key(sets: dict[str, CodeData], cfg: EstimatorConfig, power_shares, n_planted: int) -> str:
    """What a finished run's tables depend on: the settings and a summary of every set (its rows, and the
    first rows' targets), so a changed split or residual is never answered with old tables."""
    summary = {
        name: [len(data), hashlib.sha256(np.ascontiguousarray(data.rows).tobytes()).hexdigest()[:16]]
        + [float(data.batch(np.arange(min(len(data), 1024))).target.double().sum())]
        for name, data in sorted(sets.items())
    }
    # not the device: a fit is the same fit wherever it ran (to float tolerance), like a resumed checkpoint
    key = {"cfg": asdict(replace(cfg, device="")), "power": [list(power_shares), n_planted], "sets": summary}
    return hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _later_targets(estimator: Estimator, cfg: EstimatorConfig, power_shares, n_planted: int) -> list:
    """The targets fitted after the residual, in the order one process fits them, as (name, fit) pairs: ``fit()``
    fits every model of that target and returns what was planted in it (None for a control). Each needs only
    the residual's fits, not the others'."""
    sets, jobs = estimator.sets, []

    def control() -> None:
        estimator.fit_target(CONTROL, estimator.control_sets(), ("nfm",))

    jobs.append((CONTROL, control))
    for seed in cfg.seeds:  # the control over the additive fit permutes what that seed's additive model leaves

        def control_additive(seed=seed) -> None:
            first_order = estimator.first_order[(RESIDUAL, seed)]
            control = estimator.control_sets(first_order=first_order, seed=seed)
            estimator.fit_target(f"{CONTROL}_additive_seed{seed}", control, ("additive", "nfm_additive"), seeds=(seed,))

        jobs.append((f"{CONTROL}_additive_seed{seed}", control_additive))
    for share in power_shares:

        def planted_target(share=share) -> dict:
            first = estimator.first_order[RESIDUAL]
            planted = plant_pairs(sets["fit"], share, estimator.design, first.penalty, n_planted, seed=cfg.seeds[0])
            injected = {name: data.with_target(AddPlanted(data, planted)) for name, data in sets.items()}
            estimator.fit_target(
                f"planted_{share:g}", injected, ("pair_ridge", "oracle", "nfm"), oracle_pairs=planted.pairs
            )
            return {"share": share, "scale": planted.scale, "pairs": planted.pairs.tolist()}

        jobs.append((f"planted_{share:g}", planted_target))
    return jobs


def run(
    sets: dict[str, CodeData],
    cfg: EstimatorConfig,
    out_dir: str | Path,
    power_shares: tuple[float, ...] = (0.001, 0.003, 0.01, 0.03),
    n_planted: int = 16,
    resume: bool = True,
    dist: Dist = SINGLE,
    deal: bool | None = None,
) -> Ladder:
    """Everything notebook 02 fits: the ladder on the residual, the null control over the linear and the
    additive fits, and a planted interaction of each of ``power_shares`` (every seed). Saves the tables;
    over the ranks of ``dist``, the targets after the residual are dealt to the ranks, or with fewer of them
    than ranks each model trains data-parallel (see the module docstring; ``deal`` True or False chooses). A
    run finished before with the same settings and data is read back (``resume``), not refitted."""
    out_dir, key = Path(out_dir), _run_key(sets, cfg, power_shares, n_planted)
    done = out_dir / DONE
    if resume and done.exists() and read_json(done).get("key") == key:
        return Ladder.read(out_dir)
    dist.barrier()  # every rank has read the marker before rank 0 removes it
    if dist.is_main:
        done.unlink(missing_ok=True)  # from here until the end, the tables on disk are not this run's
    estimator = Estimator(sets, cfg, out_dir, resume, dist)
    jobs = _later_targets(estimator, cfg, power_shares, n_planted)
    dealt = dist.distributed and (len(jobs) >= dist.world_size if deal is None else deal)
    if dealt and len(jobs) < dist.world_size:
        raise ValueError(f"{len(jobs)} targets cannot be dealt to {dist.world_size} ranks: every rank needs one")
    if dealt:  # every rank fits the residual as one process would; only rank 0's files are kept
        estimator.dist = SINGLE
        estimator.out_dir = out_dir if dist.is_main else out_dir / "ranks" / f"rank{dist.rank}"
    estimator.fit_target(RESIDUAL, sets, tuple(MODELS.keys() - {"oracle"}))
    estimator.out_dir = out_dir  # each later target writes under targets/<target>/, one rank each
    mine = jobs[dist.rank :: dist.world_size] if dealt else jobs
    planted_pairs = {}
    for target, fit in progress(
        mine, desc="controls and planted interactions", unit="target", disable=not dist.is_main
    ):
        planted = fit()
        if planted is not None:
            planted_pairs[target] = planted
    if dealt:
        estimator.gather(dist, [target for target, _ in jobs])
        planted_pairs = {k: v for part in dist.all_gather_object(planted_pairs) for k, v in part.items()}
        planted_pairs = {target: planted_pairs[target] for target, _ in jobs if target in planted_pairs}
    if dist.is_main:
        write_json(out_dir / "planted.json", planted_pairs)
        estimator.save()
        ranks = {target: i % dist.world_size for i, (target, _) in enumerate(jobs)} if dealt else {}
        write_json(done, {"key": key, "dealt": ranks})  # which rank fitted each later target (none: all did)
        if dealt:
            shutil.rmtree(out_dir / "ranks", ignore_errors=True)  # the other ranks' copies of the residual's fits
    dist.barrier()  # the tables are written before any rank reads them
    return Ladder.read(out_dir)
