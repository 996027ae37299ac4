"""Is a stimulus set's formality x emotion interaction made by the layer, or already in the words?

Stage 05's ``primary_pre`` family reads the layer along each primary encoder direction and tests the text
means' 2x2 interaction. On a planted model's minimal pairs that contrast is zero unless the layer integrates
(``tests/test_planted_model.py``); on written stimuli the four variants of an item use different words, so
their text means can be non-additive before any layer computes anything. This reads the same directions in
the token embeddings (``hidden_states[0]``) and in the run's layer, on the same texts, with the same test:

    python benchmarks/lexical_baseline.py runs/minilm-wikitext [--stimulus-set minimal_pairs]

On token-aligned minimal pairs (``--stimulus-set minimal_pairs``) each token embedding depends on its own token
and position only, so the token embeddings' contrast is zero and nothing there should be flagged.

Writes ``benchmarks/results/lexical_baseline.json``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from featint_utils.data import models
from featint_utils.integration import identification
from featint_utils.workbench import stages
from featint_utils.workbench.run import Run

RESULTS = Path(__file__).parent / "results" / "lexical_baseline.json"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", help="a finished run (stages 00-04)")
    parser.add_argument("--fdr-q", type=float, default=0.05)
    parser.add_argument("--stimulus-set", default="default", help="as the run parameter stimulus_set")
    args = parser.parse_args()
    run = Run(args.run_dir)
    store = run.store()
    decomposition = run.decomposition(secondary=False)
    loaded = models.load_model(store.manifest["model"])
    stimuli = stages.stimuli(loaded, stimulus_set=args.stimulus_set)
    n = decomposition.primary.cfg.n_latents
    out = {"run": Path(args.run_dir).name, "model": store.manifest["model"], "directions": n, "texts": len(stimuli)}
    out["stimulus_set"] = args.stimulus_set
    for layer in (0, store.layer):
        per_text = identification.text_activations(
            loaded, layer, stimuli["text"].tolist(), {"pre": (decomposition.primary_pre_activation, n)}
        )
        table = identification.feature_effects(identification.cells(per_text["pre"]["mean"], stimuli)[0])
        out[f"hidden_states[{layer}]"] = {
            "interaction_selective": int((table["interaction_q"] < args.fdr_q).sum()),
            "median_interaction_eta2": float(table["interaction_eta2"].median()),
        }
        print(f"hidden_states[{layer}]: {out[f'hidden_states[{layer}]']}", flush=True)
    results = json.loads(RESULTS.read_text()) if RESULTS.exists() else {}
    key = out["run"] if args.stimulus_set == "default" else f"{out['run']} ({args.stimulus_set})"
    results[key] = out
    RESULTS.write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
