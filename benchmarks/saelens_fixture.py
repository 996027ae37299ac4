"""Write the test fixtures tests/fixtures/saelens_*/: small TopK SAEs saved by the real SAELens, with SAELens's
own outputs on a few inputs (needs .venv-bench, see benchmarks/README.md).

    .venv-bench/bin/python benchmarks/saelens_fixture.py

The SAE reads hidden_states[3] of the embedded MiniLM (SAELens name ``blocks.3.hook_resid_pre``): the
activations are extracted by featint's own pipeline from the built-in stimuli, then SAELens's ``SAETrainer``
trains a ``TopKTrainingSAE`` (its defaults: decoder-norm rescaling, ``expected_average_only_in``
normalisation, which it folds into the weights at the end) and ``save_inference_model`` writes it. SAELens's
``SAE.load_from_disk`` then encodes and decodes held-out rows; those numbers are what the tests compare with.

That SAE ends with unit decoder rows, so a second, tiny one (``saelens_folds``: random weights, decoder rows of
norms 0.2-3, ``rescale_acts_by_decoder_norm`` on, ``apply_b_dec_to_input`` off) checks the two SAELens options
that our loader folds into the weights.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.data import extraction, models  # noqa: E402
from featint_utils.data.corpus import load_corpus, split_by_group  # noqa: E402

LAYER, N_LATENTS, K, N_ROWS = 3, 64, 8, 8


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "tests" / "fixtures", help="fixtures directory")
    parser.add_argument("--steps", type=int, default=600, help="SAELens training steps of 256 tokens")
    args = parser.parse_args()

    from sae_lens import SAE, TopKTrainingSAE, TopKTrainingSAEConfig
    from sae_lens.config import LoggingConfig, SAETrainerConfig
    from sae_lens.training.sae_trainer import SAETrainer

    torch.manual_seed(0)
    loaded = models.load_model("embedded")
    split = split_by_group(load_corpus("stimuli"), 0.5, 0)
    with tempfile.TemporaryDirectory() as tmp:
        store = extraction.extract(loaded, split, LAYER, Path(tmp) / "store", context_tokens=128)
        train = torch.from_numpy(store.load("train"))
        val = torch.from_numpy(store.load("val"))

    def batches(batch_size: int = 256):
        generator = torch.Generator().manual_seed(0)
        while True:
            yield train[torch.randint(len(train), (batch_size,), generator=generator)]

    cfg = TopKTrainingSAEConfig(
        d_in=train.shape[1], d_sae=N_LATENTS, k=K, normalize_activations="expected_average_only_in"
    )
    cfg.metadata.model_name = "sentence-transformers/all-MiniLM-L6-v2"
    cfg.metadata.hook_name = f"blocks.{LAYER}.hook_resid_pre"  # hidden_states[3]: the input of block 3
    sae = TopKTrainingSAE(cfg)
    trainer_cfg = SAETrainerConfig(
        total_training_samples=args.steps * 256,
        train_batch_size_samples=256,
        lr=1e-3,
        lr_end=1e-3,
        logger=LoggingConfig(log_to_wandb=False),
        n_batches_for_norm_estimate=50,
    )
    SAETrainer(trainer_cfg, sae, batches()).fit()
    out = args.out / "saelens_minilm_l3"
    sae.save_inference_model(out)
    x = val[torch.linspace(0, len(val) - 1, N_ROWS).long()]
    lens, fvu = record_outputs(SAE, out, x, val)
    write_readme(
        out,
        f"SAELens TopK SAE on MiniLM hidden_states[{LAYER}]",
        f"""{type(lens).__name__}, d_in={lens.cfg.d_in}, d_sae={lens.cfg.d_sae}, k={lens.cfg.k}, hook
`{lens.cfg.metadata.hook_name}`, trained by SAELens's `SAETrainer` for {args.steps} steps of 256 tokens on the
embedded MiniLM's layer-{LAYER} activations of the built-in stimuli (train split), saved with
`save_inference_model`. Held-out FVU (SAELens forward, validation split, {len(val)} tokens): {fvu:.3f}.""",
        f"--steps {args.steps}",
        f"{N_ROWS} held-out activation rows",
    )

    from sae_lens import TopKSAE, TopKSAEConfig

    cfg = TopKSAEConfig(d_in=16, d_sae=48, k=4, rescale_acts_by_decoder_norm=True, apply_b_dec_to_input=False)
    cfg.metadata.model_name, cfg.metadata.hook_name = "gpt2", "blocks.1.hook_resid_post"
    folds = TopKSAE(cfg)
    with torch.no_grad():
        for p in folds.parameters():
            p.normal_(0, 0.3)
        folds.W_dec.mul_(torch.empty(48, 1).uniform_(0.2, 3.0))
    out = args.out / "saelens_folds"
    folds.save_model(out)
    record_outputs(SAE, out, torch.randn(16, 16) * 2)
    write_readme(
        out,
        "SAELens TopK SAE with decoder-norm rescaling and no input b_dec",
        """TopKSAE(TopKSAEConfig(d_in=16, d_sae=48, k=4, rescale_acts_by_decoder_norm=True,
apply_b_dec_to_input=False)), hook `blocks.1.hook_resid_post`, random weights (normal, sd 0.3; decoder rows scaled
by uniform 0.2-3), saved with `save_model`.""",
        f"--steps {args.steps}",
        "16 random rows (normal, sd 2)",
    )


def record_outputs(SAE, out: Path, x: torch.Tensor, val: torch.Tensor | None = None):
    """SAELens's own encode/decode of ``x`` by the SAE it saved in ``out``, written beside it; and its held-out
    FVU on ``val``."""
    from safetensors.torch import save_file

    lens = SAE.load_from_disk(out, device="cpu")
    with torch.no_grad():
        feature_acts = lens.encode(x)
        reconstruction = lens.decode(feature_acts)
        fvu = None if val is None else ((lens(val) - val).pow(2).sum() / (val - val.mean(0)).pow(2).sum()).item()
    tensors = {"x": x, "feature_acts": feature_acts, "reconstruction": reconstruction}
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(out / "saelens_outputs.safetensors"))
    return lens, fvu


def write_readme(out: Path, title: str, what: str, options: str, rows: str) -> None:
    version = importlib.metadata.version("sae-lens")
    size = sum(p.stat().st_size for p in out.iterdir() if p.is_file() and p.name != "README.md")
    (out / "README.md").write_text(
        f"""# {title} (test fixture)

Written by the real SAELens {version} on {datetime.now(UTC).date().isoformat()} with

    .venv-bench/bin/python benchmarks/saelens_fixture.py {options}

(which writes every `tests/fixtures/saelens_*` directory). {what}

- `cfg.json`, `sae_weights.safetensors`: the SAE as SAELens saved it.
- `saelens_outputs.safetensors`: `x` ({rows}), and SAELens's `SAE.load_from_disk(...).encode(x)`
  (`feature_acts`) and `.decode(feature_acts)` (`reconstruction`).

{size // 1024} KiB in all. `tests/test_sae.py` checks that `featint_utils.dictionary.saelens.from_saelens` gives
these numbers.
"""
    )
    print(f"wrote {out} ({size // 1024} KiB); sae_lens {version}")


if __name__ == "__main__":
    main()
