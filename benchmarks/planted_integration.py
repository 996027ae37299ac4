"""Stages 00-06 on planted models (``featint_utils.data.planted_model``), scored against their truth.

Every planted model of the grid (integration sizes x seeds; size 0 is the same model with nothing to find) is
run through the whole pipeline, unchanged, by the runner (profile ``planted``, sized down by ``FAST``), and
``planted_truth.score_run`` reads each run against the truth. Per integration size, over the seeds:

* **05** ``secondary_any`` / ``primary_any`` / ``primary_pre_any`` (the primary features' pre-activations, linear
  in the layer): runs in which some feature is flagged interaction-selective (BH,
  q < 0.05); with no integration every flag is false, so on size 0 this is the family-wise false-discovery rate
  that BH's FDR bounds under a complete null; ``aligned_flagged``: the secondary latent nearest the NFM's image
  of the 2x2 is flagged, and ``primary_pre_reading_any``: a flagged pre-activation's encoder direction reads
  ``u_AB`` (|cos| >= 0.3) (power where there is an integration);
* **06** ``clamp_beats_random``: runs in which some secondary clamp is more non-additive than its size-matched
  random edit (Holm); on size 0, the same false-positive rate;
* **01-02** how much of the integration the SAE absorbs and how much of what it leaves the NFM predicts.

``--noise`` gives every text its own context (``planted_model``): with none, an item's 2x2 contrast of anything
linear in the layer is exact, so only the noisy series measures how power falls with the planted size.

Writes ``benchmarks/results/planted_integration.json`` (every run's scores and the summary per noise and
size); rows already there are skipped. About 70 s a model on one thread with ``FAST``:
``python benchmarks/planted_integration.py --sizes 0,0.02,0.05,0.1 --seeds 0-4 --noise 1``.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from featint_utils.plots import comparisons, figure
from featint_utils.workbench import planted_truth, runner

RESULTS = Path(__file__).parent / "results" / "planted_integration.json"
FAMILIES = ("primary_pre", "primary", "secondary")
FIGURE_DIR = Path(__file__).parent.parent  # the README's figures/

FAST = {  # the planted profile at a size that keeps a model to minutes; what each stage tests is unchanged
    "sae_train_tokens": "400000",
    "nfm_lr_grid": "3e-3",
    "nfm_max_epochs": "25",
    "power_shares": "0.01",
    "absorption_train_tokens": "200000",
    "secondary_train_tokens": "150000",
    "n_boot": "500",
    "n_permutations": "2000",
    "clamp_levels": "-1,1",
}


def seeds_of(text: str) -> list[int]:
    if "-" in text:
        first, last = (int(v) for v in text.split("-"))
        return list(range(first, last + 1))
    return [int(v) for v in text.split(",")]


def run_model(size: float, seed: int, n_items: int, noise: float, work: Path, only: list[str] | None = None) -> dict:
    """Stages 00-06 (or ``only`` these, on a run already in ``work``) on one planted model, scored."""
    model = f"planted:seed={seed},integration={size:g},n_items={n_items},noise={noise:g}"
    started = time.time()
    run_dir = work / f"n{noise:g}_g{size:g}_s{seed}"
    if only and not (run_dir / "run.json").exists():
        raise SystemExit(f"--only {','.join(only)}: no finished run at {run_dir} (give --work where the runs are)")
    root = runner.run("planted", only=only, overrides=FAST | {"model": model}, run_dir=run_dir, reports=False)
    scores = planted_truth.score_run(root)
    seconds = "seconds" if not only else f"seconds_{'_'.join(only)}"  # a rerun keeps the full run's time
    return scores | {"size": size, "seed": seed, "noise": noise, seconds: round(time.time() - started, 1)}


def noise_of(row: dict) -> float:
    return row.get("noise", 0.0)  # rows from before the context noise existed had none


def summarise(rows: list[dict]) -> dict:
    """Per context noise (``noise=...``) and integration size, over the seeds (module docstring)."""
    return {
        f"noise={noise:g}": summarise_sizes([r for r in rows if noise_of(r) == noise])
        for noise in sorted({noise_of(r) for r in rows})
    }


def summarise_sizes(rows: list[dict]) -> dict:
    out = {}
    for size in sorted({r["size"] for r in rows}):
        runs = [r for r in rows if r["size"] == size]
        summary = {
            "models": len(runs),
            "secondary_any": float(np.mean([r["secondary.flagged"] > 0 for r in runs])),
            "primary_any": float(np.mean([r["primary.flagged"] > 0 for r in runs])),
            "primary_pre_any": float(np.mean([r["primary_pre.flagged"] > 0 for r in runs])),
            "primary_pre_flagged_median": float(np.median([r["primary_pre.flagged"] for r in runs])),
            "primary_pre_reading_any": float(np.mean([r["primary_pre.flagged_reading_integration"] > 0 for r in runs])),
            "secondary_flagged_median": float(np.median([r["secondary.flagged"] for r in runs])),
            "primary_flagged_median": float(np.median([r["primary.flagged"] for r in runs])),
            "aligned_flagged": float(np.mean([r["secondary.aligned_flagged"] for r in runs])),
            "clamp_beats_random": float(np.mean([r.get("clamp.beats_random", 0) > 0 for r in runs])),
            "aligned_clamped": float(np.mean([r["clamp.aligned_clamped"] for r in runs])),
        }
        split = [r for r in runs if "primary.layer_made_flagged" in r]  # 05 split the interaction (minimal pairs)
        if split:
            summary["layer_made_models"] = len(split)
            for family in FAMILIES:
                flagged = [r[f"{family}.layer_made_flagged"] for r in split]
                summary[f"{family}_layer_made_any"] = float(np.mean([f > 0 for f in flagged]))
                summary[f"{family}_layer_made_median"] = float(np.median(flagged))
            summary["primary_pre_layer_made_reading_any"] = float(
                np.mean([r["primary_pre.layer_made_reading_integration"] > 0 for r in split])
            )
            summary["aligned_layer_made_flagged"] = float(
                np.mean([r["secondary.aligned_layer_made_flagged"] for r in split])
            )
        clamp_split = [r for r in runs if "clamp.layer_made_own" in r]  # 06 split each clamp's effect
        if clamp_split:
            summary["clamp_layer_made_models"] = len(clamp_split)
            summary["clamp_layer_made_own_flagged"] = float(
                np.mean([r["clamp.layer_made_own_p"] < 0.05 for r in clamp_split])
            )
            for kind in ("secondary", "random", "linear", "beats_random"):
                summary[f"clamp_layer_made_{kind}_any"] = float(
                    np.mean([r[f"clamp.layer_made_{kind}"] > 0 for r in clamp_split])
                )
        if size > 0:
            summary["absorbed_median"] = float(np.median([r["absorbed"] for r in runs]))
            summary["nfm_recovered_median"] = float(np.median([r["nfm_recovered"] or 0.0 for r in runs]))
            summary["oracle_removed_mean"] = float(np.mean([r["oracle.removed"] for r in runs]))
        out[f"{size:g}"] = summary
    return out


def table(rows: list[dict]) -> str:
    """The README's table: per noise and size, in how many models each family flags something (median count)."""

    def share(runs, flagged) -> str:
        return f"{sum(bool(flagged(r)) for r in runs)}/{len(runs)}"

    def median(runs, key) -> str:
        return f"{np.median([r[key] for r in runs]):.0f}"

    lines = [
        "| noise | integration | models | pre-activations: models with a flag (median flagged) / with one reading "
        "u_AB | primary codes | secondary | secondary latent nearest the NFM's image flagged | 06: a secondary "
        "clamp beats its random edit | absorbed by the SAE | oracle contrast (integration removed) |",
        "|---" * 10 + "|",
    ]
    for noise in sorted({noise_of(r) for r in rows}):
        for size in sorted({r["size"] for r in rows if noise_of(r) == noise}):
            runs = [r for r in rows if noise_of(r) == noise and r["size"] == size]
            truth = size > 0
            cells = [
                f"{noise:g}",
                f"{size:g}",
                str(len(runs)),
                f"{share(runs, lambda r: r['primary_pre.flagged'])} ({median(runs, 'primary_pre.flagged')}) / "
                + (share(runs, lambda r: r["primary_pre.flagged_reading_integration"]) if truth else "-"),
                f"{share(runs, lambda r: r['primary.flagged'])} ({median(runs, 'primary.flagged')})",
                f"{share(runs, lambda r: r['secondary.flagged'])} ({median(runs, 'secondary.flagged')})",
                share(runs, lambda r: r["secondary.aligned_flagged"]),
                share(runs, lambda r: r.get("clamp.beats_random", 0)),
                f"{np.median([r['absorbed'] for r in runs]):.2f}" if truth else "-",
                f"{np.mean([r['oracle.removed'] for r in runs]):+.4f}" if truth else "-",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_noise_and_size(rows: list[dict]):
    """(noise, size, the runs of that noise and size), in order."""
    for noise in sorted({noise_of(r) for r in rows}):
        for size in sorted({r["size"] for r in rows if noise_of(r) == noise}):
            yield noise, size, [r for r in rows if noise_of(r) == noise and r["size"] == size]


def _header(*columns: str) -> list[str]:
    """A markdown table's first two lines: noise, integration, models, then ``columns``."""
    columns = ("noise", "integration", "models", *columns)
    return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def _count(runs: list[dict], key: str) -> str:
    """Models with a count above 0, of all, and the median count: "3/5 (2)"."""
    return f"{sum(r[key] > 0 for r in runs)}/{len(runs)} ({np.median([r[key] for r in runs]):.0f})"


def layer_made_table(rows: list[dict]) -> str:
    """Per noise and size, over the models whose 05 split each interaction on the additive counterfactual: in
    how many models each family flags an interaction (ANOVA) and a layer-made part (median count)."""
    rows = [r for r in rows if "primary.layer_made_flagged" in r]
    lines = _header(
        "pre-activations: interaction / layer-made (one reading u_AB)",
        "primary codes: interaction / layer-made",
        "secondary: interaction / layer-made",
        "secondary latent nearest the NFM's image: layer-made",
    )
    for noise, size, runs in _by_noise_and_size(rows):
        reading = sum(r["primary_pre.layer_made_reading_integration"] > 0 for r in runs)
        cells = [f"{noise:g}", f"{size:g}", str(len(runs))]
        cells += [
            f"{_count(runs, f'{family}.flagged')} / {_count(runs, f'{family}.layer_made_flagged')}"
            + (f" ({reading}/{len(runs)})" if family == "primary_pre" and size > 0 else "")
            for family in FAMILIES
        ]
        cells.append(f"{sum(r['secondary.aligned_layer_made_flagged'] for r in runs)}/{len(runs)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def clamp_layer_made_table(rows: list[dict]) -> str:
    """Per noise and size, over the models whose 06 split each clamp's effect on the additive counterfactual:
    the layer's own layer-made readout contrast against the oracle's (the readout's change when the planted
    integration is removed: its negative), and in how many models a secondary, random or linear-path condition
    has a layer-made part, and a secondary one's exceeds its random control's (median count of conditions)."""
    rows = [r for r in rows if "clamp.layer_made_own" in r]
    lines = _header(
        "the layer's own: flagged / mean contrast / minus the oracle's",
        "secondary clamps with a layer-made part",
        "random edits",
        "linear-path edits",
        "a secondary clamp's part beats its random edit's",
        "... the latent nearest the NFM's image (clamped)",
    )
    for noise, size, runs in _by_noise_and_size(rows):
        own = np.mean([r["clamp.layer_made_own"] for r in runs])
        oracle = f"{-np.mean([r['oracle.removed'] for r in runs]):+.5f}" if size > 0 else "0"
        aligned = [r for r in runs if r["clamp.aligned_clamped"]]
        beats = sum(any(v for k, v in r.items() if k.endswith("_beats_random") and "aligned" in k) for r in aligned)
        cells = [
            f"{noise:g}",
            f"{size:g}",
            str(len(runs)),
            f"{sum(r['clamp.layer_made_own_p'] < 0.05 for r in runs)}/{len(runs)} / {own:+.5f} / {oracle}",
            *(_count(runs, f"clamp.layer_made_{kind}") for kind in ("secondary", "random", "linear", "beats_random")),
            f"{beats}/{len(aligned)}",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


TESTS = {  # what counts as a flag of each test, per run (None: the run did not measure it)
    "05 pre-activations (primary_pre)": lambda r: r["primary_pre.flagged"] > 0,
    "05 primary codes": lambda r: r["primary.flagged"] > 0,
    "05 secondary features": lambda r: r["secondary.flagged"] > 0,
    "05 secondary latent nearest the NFM's image": lambda r: r["secondary.aligned_flagged"],
    "06 a secondary clamp beats its random edit": lambda r: r.get("clamp.beats_random", 0) > 0,
    "05 layer-made: primary codes": lambda r: _any(r, "primary.layer_made_flagged"),
    "05 layer-made: secondary features": lambda r: _any(r, "secondary.layer_made_flagged"),
    "06 layer-made: a secondary clamp beats its random edit": lambda r: _any(r, "clamp.layer_made_beats_random"),
}


def _any(row: dict, key: str) -> bool | None:
    """Whether a count is above zero; None where the run did not measure it (absent, or NaN in a frame's row)."""
    count = row.get(key)
    return None if count is None or count != count else count > 0


def flag_rates(rows: list[dict]) -> pd.DataFrame:
    """Per noise, size and test: the share of models in which the test flags something."""
    out = []
    for (noise, size), runs in pd.DataFrame(rows).assign(noise=[noise_of(r) for r in rows]).groupby(["noise", "size"]):
        records = runs.to_dict("records")
        for test, flagged in TESTS.items():
            flags = [f for f in map(flagged, records) if f is not None]
            if flags:
                share = float(np.mean([bool(f) for f in flags]))
                out.append({"noise": noise, "size": size, "test": test, "share": share, "models": len(flags)})
    return pd.DataFrame(out)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="0,0.1,0.2,0.4", help="integration sizes (0: none)")
    parser.add_argument("--seeds", default="0-4", help="model seeds: a list (0,1,2) or a range (0-4)")
    parser.add_argument("--items", type=int, default=300, help="stimulus items per model (four texts each)")
    parser.add_argument("--noise", type=float, default=0.0, help="each text's own context (planted_model)")
    parser.add_argument("--work", default="", help="where the runs go (default: a temporary directory)")
    parser.add_argument(
        "--only",
        default="",
        help="rerun only these stages (e.g. 06) on the runs already in --work, and score them again",
    )
    parser.add_argument(
        "--table", action="store_true", help="print the results' table (markdown), draw its figure, and stop"
    )
    args = parser.parse_args()
    if args.table:
        rows = json.loads(RESULTS.read_text())["runs"]
        print(table(rows))
        print()
        print(layer_made_table(rows))
        print()
        print(clamp_layer_made_table(rows))
        print(figure.save(comparisons.flag_rates(flag_rates(rows)), FIGURE_DIR, "planted_integration")[0])
        return
    sizes, seeds = [float(v) for v in args.sizes.split(",")], seeds_of(args.seeds)
    rows = json.loads(RESULTS.read_text())["runs"] if RESULTS.exists() else []
    key = lambda r: (r["size"], r["seed"], r.get("items"), noise_of(r))  # noqa: E731
    # a model whose row predates 06's layer-made split is run again and its row replaced
    done = {key(r) for r in rows if "clamp.layer_made_own" in r}
    only = [v for v in args.only.split(",") if v] or None
    with tempfile.TemporaryDirectory() as scratch:
        work = Path(args.work or scratch)
        for size in sizes:
            for seed in seeds:
                if (size, seed, args.items, args.noise) in done:
                    continue
                row = run_model(size, seed, args.items, args.noise, work, only) | {"items": args.items}
                previous = [r for r in rows if key(r) == key(row)]  # a rerun of some stages keeps the rest
                row = (previous[0] if previous and only else {}) | row
                rows = [r for r in rows if key(r) != key(row)] + [row]
                RESULTS.write_text(json.dumps({"runs": rows, "summary": summarise(rows)}, indent=1))
                print(
                    f"noise {args.noise:g} integration {size:g} seed {seed}: primary_pre flagged "
                    f"{row['primary_pre.flagged']}, secondary flagged {row['secondary.flagged']}, "
                    f"aligned flagged {row['secondary.aligned_flagged']}, clamps beating random "
                    f"{row.get('clamp.beats_random')}, layer-made: own p {row.get('clamp.layer_made_own_p')}, "
                    f"secondary {row.get('clamp.layer_made_secondary')} "
                    f"(beating random {row.get('clamp.layer_made_beats_random')})",
                    flush=True,
                )
    print(json.dumps(summarise(rows), indent=1))


if __name__ == "__main__":
    main()
