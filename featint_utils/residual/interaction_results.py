"""Reading a finished ladder (:func:`featint_utils.residual.interaction.run`), as notebook 03 does: every model's
held-out FVU and gain over predicting zero, the interaction shares with their intervals beside the null
control's, the power curve and detection limit, the numbers ``metrics.json`` keeps, and the verdict in words.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from ..io import read_json
from .interaction import COMPARISONS, CONTROL, ESTIMATORS, MODELS, RESIDUAL
from .resampling import bootstrap_draws, increments, interval

# ---------------------------------------------------------------------------------------------------
# Analysis of the saved tables (notebook 03)


class Results:
    """The saved tables of a :func:`run`, with the shares, intervals, power curve and verdict."""

    def __init__(self, out_dir: str | Path, n_boot: int = 2000, level: float = 0.95, seed: int = 0):
        self.out_dir = out_dir = Path(out_dir)
        self.ladder = pd.read_csv(out_dir / "ladder.csv")
        self.sse = pd.read_csv(out_dir / "test_sse.csv")
        self.documents = pd.read_csv(out_dir / "test_documents.csv")
        self.planted = read_json(out_dir / "planted.json") if (out_dir / "planted.json").exists() else {}
        self.level = level
        n_documents = self.documents.query("target == @RESIDUAL")["document"].nunique()
        n_seeds = max(1, self.ladder.query("seed >= 0")["seed"].nunique())
        self.draws = bootstrap_draws(n_documents, n_seeds, n_boot, seed)

    def _sse(self, target: str, model: str) -> np.ndarray:
        table = self.sse.query("target == @target and model == @model").sort_values(["seed", "document"])
        if table.empty:
            raise KeyError(f"no {model!r} fit on target {target!r}")
        return table.pivot(index="seed", columns="document", values="sse").to_numpy()

    def _centred(self, target: str) -> np.ndarray:
        return self.documents.query("target == @target").sort_values("document")["centred_ss"].to_numpy()

    def _boot(self, target: str, base: str, model: str) -> tuple[np.ndarray, np.ndarray]:
        centred = self._centred(target)
        if base == "zero":
            base_sse = self.documents.query("target == @target").sort_values("document")["zero_sse"].to_numpy()
        else:
            base_sse = self._sse(target, base)
        model_sse = self._sse(target, model)
        return increments(centred, base_sse, model_sse), increments(centred, base_sse, model_sse, self.draws)

    def share(self, target: str, comparison: str) -> dict:
        """Mean over seeds, seed sd and bootstrap interval of a comparison of :data:`COMPARISONS` on a target."""
        per_seed, boot = self._boot(target, *COMPARISONS[comparison])
        return interval(per_seed, boot, self.level)

    def shares(self, target: str = RESIDUAL) -> pd.DataFrame:
        """Every comparison available on ``target``."""
        fitted = set(self.sse.query("target == @target")["model"])
        rows = {
            name: self.share(target, name) for name, (base, model) in COMPARISONS.items() if {base, model} <= fitted
        }
        return pd.DataFrame(rows).T

    def control_shares(self) -> pd.DataFrame:
        """The null control's shares: over the linear fit, and over the additive fit (pooled over seeds)."""
        rows = {"over_linear": self.share(CONTROL, "over_linear")}
        per_seed, boots = [], []
        for target in sorted(t for t in self.sse["target"].unique() if t.startswith(f"{CONTROL}_additive")):
            point, boot = self._boot(target, *COMPARISONS["over_additive"])
            per_seed.append(point[0])
            boots.append(boot)
        if boots:
            rows["over_additive"] = interval(np.array(per_seed), np.mean(boots, 0), self.level)
        return pd.DataFrame(rows).T

    def of_explained(self) -> float | None:
        """The pairwise share over the linear fit as a fraction of the NFM's own held-out R-squared (what the
        original study's "4.5%" was a fraction of); undefined (None) unless that R-squared is positive."""
        nfm_r2 = 1 - float(self.ladder.query("target == @RESIDUAL and model == 'nfm'")["residual_fvu"].mean())
        return self.share(RESIDUAL, "over_linear")["mean"] / nfm_r2 if nfm_r2 > 0 else None

    def beats_zero(self) -> pd.DataFrame:
        """Per model of the real residual: held-out gain over predicting zero, with its interval."""
        rows = {}
        for model in self.ladder.query("target == @RESIDUAL")["model"].unique():
            if model != "zero":
                rows[model] = interval(*self._boot(RESIDUAL, "zero", model), self.level)
        table = pd.DataFrame(rows).T
        table["beats_zero"] = table["ci_low"] > 0
        return table

    def power(self) -> pd.DataFrame:
        """Per planted size: nominal share, the oracle's and each estimator's recovered share with intervals,
        and whether each estimator's recovery exceeds its own un-injected estimate (``detected``: bootstrap of
        the paired difference over test documents and seeds, so that the refits' own variation counts)."""
        rows = []
        for target, info in sorted(self.planted.items(), key=lambda item: item[1]["share"]):
            row = {"target": target, "nominal_share": info["share"]}
            for comparison in ("oracle",) + ESTIMATORS:
                stats = self.share(target, comparison)
                row |= {
                    f"{comparison}": stats["mean"],
                    f"{comparison}_ci_low": stats["ci_low"],
                    f"{comparison}_ci_high": stats["ci_high"],
                }
            for comparison in ESTIMATORS:  # what the planted interaction added to each estimate
                injected_point, injected = self._boot(target, *COMPARISONS[comparison])
                baseline_point, baseline = self._boot(RESIDUAL, *COMPARISONS[comparison])
                low = np.percentile(injected - baseline, 50 * (1 - self.level))
                row |= {
                    f"{comparison}_excess": float(np.mean(injected_point) - np.mean(baseline_point)),
                    f"{comparison}_excess_ci_low": float(low),
                    f"{comparison}_detected": bool(low > 0),
                }
            rows.append(row)
        return pd.DataFrame(rows)


def detection_limit(power: pd.DataFrame, estimator: str = "over_linear") -> float | None:
    """The smallest planted share (by the oracle's recovered share) that ``estimator`` detects at that size and
    every larger one; None when it does not detect the largest planted size."""
    if power.empty:
        return None
    ordered = power.sort_values("oracle")
    undetected = np.flatnonzero(~ordered[f"{estimator}_detected"].to_numpy())
    if len(undetected) and undetected[-1] == len(ordered) - 1:
        return None
    first = 0 if not len(undetected) else undetected[-1] + 1
    return float(ordered["oracle"].iloc[first])


def share_text(stats: dict) -> str:
    return f"{stats['mean']:+.4f} [{stats['ci_low']:+.4f}, {stats['ci_high']:+.4f}]"


def headline(results: Results) -> dict:
    """The numbers metrics.json keeps: per-model held-out FVUs and gains over zero, every share with its
    interval, the null control's, the power curve's detection limit."""
    from .contributions import ladder_summary

    summary = ladder_summary(results.ladder)
    out = {f"residual_fvu.{m}": float(summary.loc[m, "residual_fvu"]) for m in summary.index}
    out |= {f"total_fvu.{m}": float(summary.loc[m, "total_fvu"]) for m in summary.index}
    for model, row in results.beats_zero().iterrows():
        out |= {f"gain_over_zero.{model}.{k}": float(row[k]) for k in ("mean", "ci_low", "ci_high")}
    for name, row in results.shares().iterrows():
        out |= {f"interaction_share.{name}.{k}": float(row[k]) for k in ("mean", "ci_low", "ci_high", "sd")}
    for name, row in results.control_shares().iterrows():
        out |= {f"control.{name}.{k}": float(row[k]) for k in ("mean", "ci_low", "ci_high")}
    out["interaction_share.of_explained"] = results.of_explained()
    power = results.power()
    out["detection_limit"] = detection_limit(power)  # None: not detected even at the largest planted size
    out["detection_limit.pair_ridge"] = detection_limit(power, "pair_ridge")
    out["largest_planted_share"] = float(power["oracle"].max()) if len(power) else None
    for comparison in ESTIMATORS:  # how much of the largest planted interaction each estimator adds to its estimate
        recovered = power[f"{comparison}_excess"].iloc[-1] / power["oracle"].iloc[-1] if len(power) else None
        out[f"recovered_of_planted.{comparison}"] = None if recovered is None else float(recovered)
    out["n_seeds"] = int(results.ladder.query("target == @RESIDUAL and seed >= 0")["seed"].nunique())
    out["n_test_documents"] = int(len(results._centred(RESIDUAL)))
    return out


def _limit_text(power: pd.DataFrame, estimator: str) -> str:
    limit = detection_limit(power, estimator)
    if limit is not None:
        return f"{limit:.4f}"
    return f"above the largest planted size ({power['oracle'].max():.4f})" if len(power) else "not measured"


def verdict(results: Results) -> str:
    """What the estimate does and does not show, in plain sentences (the rules of the module docstring)."""
    shares, control, zero = results.shares(), results.control_shares(), results.beats_zero()
    power = results.power()
    lines = []
    failed = [m for m in ("code_ridge", "nfm") if m in zero.index and not zero.loc[m, "beats_zero"]]
    if failed:
        lines.append(
            f"Failed fit: {', '.join(MODELS[m] for m in failed)} does not beat predicting zero on the "
            "test documents (interval of the gain not above 0), so no conclusion is drawn about "
            "interactions from it."
        )
    over = shares.loc["over_linear"]
    seeds = f"{int(over['n_seeds'])} seed" + ("s" if int(over["n_seeds"]) != 1 else "")
    lines.append(
        f"Pairwise term over the linear fit (nested NFM): {share_text(over)} held-out R² of the residual "
        f"({seeds}, {len(results._centred(RESIDUAL))} test documents, "
        f"{100 * results.level:.0f}% bootstrap interval)."
    )
    if "over_additive" in shares.index:
        lines.append(f"Over the additive per-feature fit: {share_text(shares.loc['over_additive'])}.")
    if "pair_ridge" in shares.index:
        lines.append(f"Explicit-pairs ridge over the linear fit: {share_text(shares.loc['pair_ridge'])}.")
    lines.append(f"Null control (first-order remainder permuted): {share_text(control.loc['over_linear'])}.")
    if len(power):
        largest = power.iloc[-1]
        lines.append(
            f"Planted interactions of known size in this residual: the smallest detected at every larger "
            f"size is {_limit_text(power, 'over_linear')} for the NFM and "
            f"{_limit_text(power, 'pair_ridge')} for the explicit pairs; the largest "
            f"({largest['oracle']:.4f}) adds {largest['over_linear_excess']:+.4f} and "
            f"{largest['pair_ridge_excess']:+.4f} to their estimates."
        )
    detected = [name for name in ESTIMATORS if name in shares.index and shares.loc[name, "ci_low"] > 0]
    if control.loc["over_linear", "ci_low"] > 0:
        lines.append(
            "The null control shows a gain: the estimator is not calibrated on this data, so no conclusion is drawn."
        )
    if failed or control.loc["over_linear", "ci_low"] > 0:
        return " ".join(lines)
    if detected:
        lines.append(
            "The pairs carry information beyond the first-order fit: the interval of "
            f"{' and '.join(SHARE_NAMES[d] for d in detected)} lies above zero and the null control's "
            "does not."
        )
    else:
        limits = [detection_limit(power, name) for name in ESTIMATORS]
        known = [limit for limit in limits if limit is not None]
        lines.append(
            "No pairwise interaction is detected"
            + (
                f" above {min(known):.4f} of the residual's held-out variance (the smaller detection limit)."
                if known
                else "; this run could not detect even the largest planted interaction, so absence is not shown either."
            )
        )
    return " ".join(lines)


SHARE_NAMES = {"over_linear": "the nested NFM", "pair_ridge": "the explicit-pairs ridge"}
