"""Check our SAELens export against the real SAELens loader (needs .venv-bench, see benchmarks/README.md).

    .venv-bench/bin/python benchmarks/saelens_interop.py

Exports a featint TopK SAE (with a non-trivial input scale and biases), loads it with
``sae_lens.SAE.load_from_disk``, and compares SAELens's forward on raw activations with ours; then saves an
SAE from SAELens itself and imports it with ``featint_utils.dictionary.saelens.from_saelens``.
"""

from __future__ import annotations

import json
import sys
import tempfile
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.dictionary.sae import SAEConfig, TopKSAE  # noqa: E402
from featint_utils.dictionary.saelens import from_saelens, to_saelens  # noqa: E402


def main() -> None:
    from sae_lens import SAE, TopKSAEConfig
    from sae_lens import TopKSAE as LensTopKSAE

    torch.manual_seed(0)
    ours = TopKSAE(SAEConfig(64, 512, 16, input_scale=0.37, model="m", layer=3, hook="encoder.layer.2"), seed=1)
    with torch.no_grad():
        ours.b_enc.normal_(0, 0.2)
        ours.b_dec.normal_(0, 1.0)
    x = torch.randn(256, 64) * 4
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        to_saelens(ours, tmp)
        lens = SAE.load_from_disk(tmp, device="cpu")
        with torch.no_grad():
            diff = (lens(x) - ours.reconstruct_raw(x)).abs().max().item()
        results["featint_to_saelens_max_abs_diff"] = diff
        results["saelens_class"] = type(lens).__name__

        cfg = TopKSAEConfig(d_in=64, d_sae=512, k=16, dtype="float32", device="cpu")
        theirs = LensTopKSAE(cfg)
        with torch.no_grad():
            for p in theirs.parameters():
                p.normal_(0, 0.1)
        out = Path(tmp) / "theirs"
        theirs.save_model(str(out))
        imported = from_saelens(out)
        with torch.no_grad():
            results["saelens_to_featint_max_abs_diff"] = (theirs(x) - imported.reconstruct_raw(x)).abs().max().item()
        results["saelens_saved_files"] = sorted(p.name for p in out.iterdir())
    results["sae_lens_version"] = __import__("importlib.metadata").metadata.version("sae-lens")
    print(json.dumps(results, indent=2))
    (ROOT / "benchmarks" / "results" / "saelens_interop.json").write_text(json.dumps(results, indent=2) + "\n")
    assert results["featint_to_saelens_max_abs_diff"] < 1e-4 and results["saelens_to_featint_max_abs_diff"] < 1e-4


if __name__ == "__main__":
    main()
