"""Extraction throughput against a bare forward pass of the same model on the same batches, and peak
memory for the default corpus vs one ten times larger.

    .venv/bin/python benchmarks/extraction.py [--model embedded] [--layer 3] [--repeats 3] [--device cpu|cuda]

Throughput: our `extraction.extract` (hook, early stop after the layer, masking, shard writes, checksums)
vs `model(**batch)` over exactly the batches extraction runs (same chunking, sorting and padding), timed
alternately in one process; also vs a bare forward cut at the same layer, the fairest like-for-like.
Memory: each extraction runs in a fresh subprocess; we report its peak RSS (ru_maxrss) for the default
corpus, the default corpus ten times over, and WikiText-2 (long documents: full contexts).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from featint_utils.data import extraction, models  # noqa: E402
from featint_utils.data.corpus import Split, Text, load_corpus, load_text_file, split_by_group  # noqa: E402

WIKITEXT = ROOT.parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def default_split() -> Split:
    return split_by_group(load_corpus("stimuli"), 0.2, seed=0)


def replicated_split(factor: int = 10) -> Split:
    """The default corpus ``factor`` times over (distinct ids and groups): the same kind of text, 10x the tokens."""
    base = load_corpus("stimuli")
    texts = [Text(f"{t.text_id}#{r}", f"{t.group}#{r}", t.text) for r in range(factor) for t in base]
    return split_by_group(texts, 0.2, seed=0)


def wikitext_split() -> Split:
    """Every article of WikiText-2 validation: long documents cut into full 128-token contexts."""
    return split_by_group(load_text_file(WIKITEXT), 0.2, seed=0)


SPLITS = {"default": default_split, "10x": replicated_split, "wikitext-2": wikitext_split}


@torch.inference_mode()
def synchronize(loaded) -> None:
    device = next(loaded.model.parameters()).device
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.inference_mode()
def bare_forward_seconds(loaded, split: Split, context_tokens: int, batch_size: int, stop_layer: int | None) -> float:
    """The model alone on the same batches, each moved to the model's device as extraction moves them."""
    texts = [(name, t) for name in ("train", "val") for t in getattr(split, name)]
    batches = list(extraction.padded_batches(loaded.tokenizer, texts, context_tokens, batch_size))
    device = next(loaded.model.parameters()).device
    synchronize(loaded)
    started = time.perf_counter()
    for b in batches:
        ids, mask = b.input_ids.to(device), b.attention_mask.to(device)
        if stop_layer is None:
            loaded.model(input_ids=ids, attention_mask=mask)
        else:
            models.forward_to_layer(loaded.model, stop_layer, input_ids=ids, attention_mask=mask)
    synchronize(loaded)
    return time.perf_counter() - started


def throughput(model: str, layer: int, repeats: int, context_tokens: int, batch_size: int, device="cpu") -> dict:
    loaded = models.load_model(model, device=device)
    split = default_split()
    times = {"extract": [], "bare_full": [], "bare_to_layer": []}
    n_tokens = 0
    with tempfile.TemporaryDirectory() as tmp:
        for _ in range(repeats):  # alternate, so drift in machine load hits all three alike
            started = time.perf_counter()
            store = extraction.extract(
                loaded, split, layer, Path(tmp) / "acts", "stimuli", context_tokens, batch_size, reuse=False
            )
            times["extract"].append(time.perf_counter() - started)
            n_tokens = store.n_tokens("train") + store.n_tokens("val")
            times["bare_full"].append(bare_forward_seconds(loaded, split, context_tokens, batch_size, None))
            times["bare_to_layer"].append(bare_forward_seconds(loaded, split, context_tokens, batch_size, layer))
    best = {k: min(v) for k, v in times.items()}
    return {
        "model": model,
        "device": str(device),
        "layer": layer,
        "n_layers": loaded.n_layers,
        "tokens": n_tokens,
        "seconds_best_of": repeats,
        "extract_tokens_per_s": n_tokens / best["extract"],
        "bare_full_forward_tokens_per_s": n_tokens / best["bare_full"],
        "bare_forward_to_layer_tokens_per_s": n_tokens / best["bare_to_layer"],
        "ratio_vs_full_forward": best["bare_full"] / best["extract"],
        "ratio_vs_forward_to_layer": best["bare_to_layer"] / best["extract"],
    }


def _peak_rss_child(which: str, model: str, layer: int) -> None:
    """Child process body: extract one corpus and print peak RSS (MiB) and token count as JSON."""
    loaded = models.load_model(model)
    split = SPLITS[which]()
    with tempfile.TemporaryDirectory() as tmp:
        store = extraction.extract(loaded, split, layer, Path(tmp) / "acts", which)
        tokens = store.n_tokens("train") + store.n_tokens("val")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"corpus": which, "tokens": tokens, "peak_rss_mib": peak}))


def peak_memory(model: str, layer: int) -> list[dict]:
    out = []
    for which in SPLITS:
        proc = subprocess.run(
            [sys.executable, __file__, "--child", which, "--model", model, "--layer", str(layer)],
            capture_output=True,
            text=True,
            check=True,
        )
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="embedded")
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--context-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--throughput-only", action="store_true", help="no peak-RSS runs (always so on a GPU)")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        _peak_rss_child(args.child, args.model, args.layer)
        return
    if args.device != "cpu" or args.throughput_only:  # a GPU's throughput only: peak host RSS is a CPU question
        result = {
            "throughput": throughput(
                args.model, args.layer, args.repeats, args.context_tokens, args.batch_size, args.device
            )
        }
        (ROOT / "benchmarks" / "results" / f"extraction_{args.device.split(':')[0]}.json").write_text(
            json.dumps(result, indent=2) + "\n"
        )
        print(json.dumps(result, indent=2))
        return
    result = {
        "throughput": throughput(args.model, args.layer, args.repeats, args.context_tokens, args.batch_size),
        "memory": peak_memory(args.model, args.layer),
        "torch_threads": torch.get_num_threads(),
    }
    mem = result["memory"]
    result["memory_ratio_10x_vs_default"] = mem[1]["peak_rss_mib"] / mem[0]["peak_rss_mib"]
    result["token_ratio_10x_vs_default"] = mem[1]["tokens"] / mem[0]["tokens"]
    (ROOT / "benchmarks" / "results").mkdir(exist_ok=True)
    (ROOT / "benchmarks" / "results" / "extraction.json").write_text(json.dumps(result, indent=2) + "\n")
    t = result["throughput"]
    print(f"extraction, {t['model']} layer {t['layer']}/{t['n_layers']}, {t['tokens']} tokens, best of {args.repeats}")
    print(f"  extract            {t['extract_tokens_per_s']:9.0f} tok/s")
    full, ratio = t["bare_full_forward_tokens_per_s"], t["ratio_vs_full_forward"]
    print(f"  bare full forward  {full:9.0f} tok/s  -> ratio {ratio:.2f}")
    print(
        f"  bare fwd to layer  {t['bare_forward_to_layer_tokens_per_s']:9.0f} tok/s  -> ratio "
        f"{t['ratio_vs_forward_to_layer']:.2f}"
    )
    for m in mem:
        print(f"  peak RSS {m['corpus']:>7}: {m['tokens']:8d} tokens  {m['peak_rss_mib']:7.0f} MiB")
    print(
        f"  peak-RSS ratio 10x/default: {result['memory_ratio_10x_vs_default']:.2f} "
        f"at {result['token_ratio_10x_vs_default']:.1f}x the tokens"
    )


if __name__ == "__main__":
    main()
