"""Extract one layer's activations into an activation store (:mod:`featint_utils.data.activation_store`):
texts tokenised a window at a time, cut into contexts framed by the tokenizer's own special tokens, run up to
the layer, and written shard by shard with checksums. Stores can also be made from arrays, from an ``.npz`` of
cached activations (``activations:PATH.npz``), or derived from another store by a transform.

A store is built in a ``.partial`` directory and renamed into place only when complete, so an
interrupted extraction never leaves shards that a later run could take for a finished store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from ..io import read_json, replace_dir, write_json
from ..progress import progress
from .activation_store import (
    ACTIVATIONS_PREFIX,
    DTYPES,
    FORMAT,
    SPLITS,
    VERSION,
    ActivationStore,
    StoreError,
    file_sha256,
    git_commit,
    prefetch,
    reusable_store,
)
from .corpus import Split, Text
from .distributed import SINGLE, Dist
from .models import LoadedModel, forward_to_layer, hook_module, hook_name, model_fingerprint

# ---------------------------------------------------------------------------------------------------
# Tokenisation: chunks of real tokens framed by the tokenizer's own special tokens


def special_frame(tokenizer) -> tuple[list[int], list[int]]:
    """The special tokens the tokenizer puts before and after content ([CLS]..[SEP], <s>.., or nothing)."""
    content = tokenizer("a", add_special_tokens=False)["input_ids"]
    full = tokenizer("a", add_special_tokens=True)["input_ids"]
    for start in range(len(full) - len(content) + 1):
        if full[start : start + len(content)] == content:
            return full[:start], full[start + len(content) :]
    raise ValueError("cannot locate content tokens among the tokenizer's special tokens")


@dataclass
class _Chunk:
    text_index: int
    start: int  # position of the chunk's first content token within the text's tokens
    ids: list[int]


def chunk_text(ids: list[int], text_index: int, chunk_len: int) -> list[_Chunk]:
    return [_Chunk(text_index, s, ids[s : s + chunk_len]) for s in range(0, len(ids), chunk_len)]


# ---------------------------------------------------------------------------------------------------
# Writing


class _ShardWriter:
    """Fills fixed-size buffers and writes each as a shard pair; tracks train-split moments."""

    def __init__(self, directory: Path, split: str, d_model: int, dtype, shard_tokens: int, prefix: str = ""):
        self.directory, self.split, self.dtype, self.prefix = directory, split, dtype, prefix
        self.acts = np.empty((shard_tokens, d_model), dtype=dtype)
        self.meta = np.empty((shard_tokens, 3), dtype=np.int32)
        self.fill = 0
        self.shards: list[dict] = []
        self.sum = np.zeros(d_model, dtype=np.float64)
        self.sum_sq_norm = 0.0
        self.n_tokens = 0

    def add(self, acts: np.ndarray, meta: np.ndarray) -> None:
        self.sum += acts.sum(0, dtype=np.float64)
        self.sum_sq_norm += float(np.einsum("ij,ij->", acts, acts, dtype=np.float64))
        self.n_tokens += len(acts)
        while len(acts):
            take = min(len(acts), len(self.acts) - self.fill)
            self.acts[self.fill : self.fill + take] = acts[:take]
            self.meta[self.fill : self.fill + take] = meta[:take]
            self.fill += take
            acts, meta = acts[take:], meta[take:]
            if self.fill == len(self.acts):
                self.flush()

    def flush(self) -> None:
        if self.fill == 0:
            return
        stem = f"{self.split}-{self.prefix}{len(self.shards):05d}"
        entry = {"acts": f"{stem}.acts.npy", "meta": f"{stem}.meta.npy", "n_tokens": self.fill}
        for key, array in (("acts", self.acts), ("meta", self.meta)):
            np.save(self.directory / entry[key], array[: self.fill])
            entry[f"{key}_sha256"] = file_sha256(self.directory / entry[key])
        self.shards.append(entry)
        self.fill = 0

    def totals(self) -> dict:
        """What :meth:`absorb` needs of a flushed writer (another rank's shards of the same split)."""
        return {"shards": self.shards, "sum": self.sum, "sum_sq_norm": self.sum_sq_norm, "n_tokens": self.n_tokens}

    def absorb(self, totals: dict) -> None:
        self.shards += totals["shards"]
        self.sum += totals["sum"]
        self.sum_sq_norm += totals["sum_sq_norm"]
        self.n_tokens += totals["n_tokens"]


@torch.inference_mode()
def extract(
    loaded: LoadedModel,
    split: Split,
    layer: int,
    store_dir: str | Path,
    corpus: str = "",
    context_tokens: int = 128,
    batch_size: int = 32,
    dtype: str = "float32",
    shard_mb: float = 64.0,
    window_texts: int = 512,
    reuse: bool = True,
    dist: Dist = SINGLE,
) -> ActivationStore:
    """Run every text of ``split`` through the model and store ``hidden_states[layer]`` of its real tokens.

    Texts are cut into chunks of ``context_tokens`` (special tokens included); padding and special
    tokens are never stored. Only the blocks up to ``layer`` run. Returns the opened store. With ``reuse``,
    a complete store at ``store_dir`` made from the same request (model, layer, texts, split, context,
    dtype) is returned as it is, so re-running a pipeline does not redo (or invalidate) this stage.

    Under ``torchrun`` (``dist``) the texts are dealt out to the ranks (text i to rank i mod world size);
    each rank runs its own texts on its device and writes its own shards (``train-r<rank>-*``); rank 0 merges
    their lists, checksums and moments into the one manifest, as a single process would have written it.
    """
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    model, tokenizer = loaded.model, loaded.tokenizer
    hook_module(model, layer)  # validates the layer before any work
    request = {
        "model": model_fingerprint(loaded.source),  # by content: the same model at another path is the same
        "layer": layer,
        "context_tokens": context_tokens,
        "dtype": dtype,
        "split": split.record(),
        "texts_sha256": hashlib.sha256(
            "\x00".join(f"{t.text_id}\x01{t.text}" for name in SPLITS for t in getattr(split, name)).encode()
        ).hexdigest(),
    }
    # stores made before Dec 2026 named the model by its path (still accepted where the model has not moved)
    older = {k: v for k, v in request.items() if k != "model"} | {"model_source": loaded.source}
    existing = reusable_store(store_dir, request, (older,)) if reuse and dist.is_main else None
    if dist.broadcast_object(existing is not None):
        if dist.is_main:
            print(
                f"reusing the activation store at {store_dir} (same model, layer, texts and split; checksums verified)"
            )
        return existing or ActivationStore(store_dir)
    prefix, suffix = special_frame(tokenizer)
    if context_tokens - len(prefix) - len(suffix) < 1:
        raise ValueError(
            f"context_tokens={context_tokens} leaves no room beside {len(prefix) + len(suffix)} special tokens"
        )
    max_positions = getattr(model.config, "max_position_embeddings", None)
    if max_positions and context_tokens > max_positions:
        raise ValueError(f"context_tokens={context_tokens} exceeds the model's {max_positions} positions")
    np_dtype = DTYPES[dtype]
    d_model = loaded.layer_width(layer)
    shard_tokens = max(1, int(shard_mb * 2**20 // (d_model * np.dtype(np_dtype).itemsize)))
    device = next(model.parameters()).device

    store_dir = Path(store_dir)
    partial = store_dir.with_name(store_dir.name + ".partial")
    texts = [(name, t) for name in SPLITS for t in getattr(split, name)]
    if dist.is_main:
        shutil.rmtree(partial, ignore_errors=True)  # leftovers of an interrupted run are never reused
        partial.mkdir(parents=True)
        with open(partial / "texts.jsonl", "w") as f:
            for index, (name, t) in enumerate(texts):
                f.write(
                    json.dumps({"index": index, "text_id": t.text_id, "group": t.group, "split": name, "text": t.text})
                    + "\n"
                )
    dist.barrier()

    shard_prefix = f"r{dist.rank}-" if dist.distributed else ""
    writers = {name: _ShardWriter(partial, name, d_model, np_dtype, shard_tokens, shard_prefix) for name in SPLITS}
    mine = np.arange(dist.rank, len(texts), dist.world_size)  # this rank's texts (all of them in one process)
    started = time.perf_counter()
    bar = progress(total=len(mine), desc=f"extract layer {layer}", unit="text", disable=not dist.is_main)
    batches = padded_batches(tokenizer, [texts[i] for i in mine], context_tokens, batch_size, window_texts, mine)
    for batch in prefetch(batches):
        hidden = forward_to_layer(
            model, layer, input_ids=batch.input_ids.to(device), attention_mask=batch.attention_mask.to(device)
        )
        acts = hidden[batch.keep.to(hidden.device)].float().cpu().numpy()
        writers[batch.split].add(acts.astype(np_dtype, copy=False), batch.meta)
        if batch.texts_done:
            n_done = sum(w.n_tokens for w in writers.values())
            bar.update(batch.texts_done)
            bar.set_postfix(tokens=n_done, tok_per_s=f"{n_done / (time.perf_counter() - started):.0f}", refresh=False)
    bar.close()
    for writer in writers.values():
        writer.flush()
    gathered = dist.all_gather_object({name: w.totals() for name, w in writers.items()})
    if not dist.is_main:
        dist.barrier()  # rank 0 writes the manifest and moves the store into place
        return ActivationStore(store_dir)
    for other in gathered[1:]:
        for name, writer in writers.items():
            writer.absorb(other[name])
    info = {
        "request": request,
        "model": loaded.name,
        "model_source": loaded.source,
        "model_type": model.config.model_type,
        "is_causal_lm": loaded.is_causal_lm,
        "layer": layer,
        "hook": hook_name(model, layer),
        "context_tokens": context_tokens,
        "special_frame": {"prefix": prefix, "suffix": suffix},
        "excluded_token_ids": sorted(set(tokenizer.all_special_ids)),
        "corpus": corpus,
        "split": split.record(),
        "extraction_seconds": time.perf_counter() - started,
    }
    n_texts = {name: len(getattr(split, name)) for name in SPLITS}
    try:
        return _finish_store(partial, store_dir, writers, dtype, n_texts, info)
    finally:
        dist.barrier()


def _finish_store(partial: Path, store_dir: Path, writers: dict, dtype: str, n_texts: dict, info: dict):
    """Flush the shards, write the normalisation and the manifest, and move the store into place."""
    for writer in writers.values():
        writer.flush()
    train = writers["train"]
    if train.n_tokens == 0:
        raise ValueError("the training split produced no tokens: is the corpus empty?")
    for name, writer in writers.items():
        if not np.isfinite(writer.sum_sq_norm):
            raise StoreError(f"non-finite activations (NaN/Inf) in the {name} split: refusing to write the store")
    d_model = len(train.sum)
    mean = train.sum / train.n_tokens
    mean_sq_norm = train.sum_sq_norm / train.n_tokens
    if not mean_sq_norm > 0:
        raise StoreError(
            "every training activation is zero: there is nothing to normalise or decompose "
            "(a wrong layer, or a model that outputs zeros?)"
        )
    np.save(partial / "mean.npy", mean)
    manifest = {
        "format": FORMAT,
        "version": VERSION,
        **info,
        "d_model": d_model,
        "dtype": dtype,
        "splits": {
            name: {"n_tokens": w.n_tokens, "n_texts": n_texts[name], "shards": w.shards} for name, w in writers.items()
        },
        "files_sha256": {name: file_sha256(partial / name) for name in ("texts.jsonl", "mean.npy")},
        "normalisation": {
            "mean_file": "mean.npy",
            "mean_sq_norm": mean_sq_norm,
            # Scalar so that E||scale * x||^2 = d_model on the training split (the SAE tools' convention).
            "scale": float(np.sqrt(d_model / mean_sq_norm)),
        },
        "created": datetime.now(UTC).isoformat(timespec="microseconds"),
        "git_commit": git_commit(),
    }
    write_json(partial / "manifest.json", manifest)
    replace_dir(partial, store_dir)
    return ActivationStore(store_dir)


def store_from_arrays(
    store_dir: str | Path,
    arrays: dict[str, np.ndarray],
    info: dict | None = None,
    meta: dict[str, np.ndarray] | None = None,
    dtype: str = "float32",
    shard_mb: float = 64.0,
    texts: list[dict] | None = None,
):
    """Write in-memory activations (``{"train": [n, d], "val": [m, d]}``) as a store, with the same
    normalisation and manifest as extraction: for derived activations (the NFM embedding) and planted data.
    ``meta`` gives each row's (text index, position, token id); without it every row is its own document
    (the rows are taken as independent), never one document for all. ``texts`` are the ``texts.jsonl``
    records; ``info`` is merged into the manifest."""
    store_dir = Path(store_dir)
    partial = store_dir.with_name(store_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    (partial / "texts.jsonl").write_text("".join(json.dumps(t) + "\n" for t in texts or []))
    d_model = arrays["train"].shape[1]
    np_dtype = DTYPES[dtype]
    shard_tokens = max(1, int(shard_mb * 2**20 // (d_model * np.dtype(np_dtype).itemsize)))
    writers = {}
    offset = 0
    for name in SPLITS:
        data = np.asarray(arrays[name], dtype=np.float32)
        if data.ndim != 2 or data.shape[1] != d_model:
            raise ValueError(f"{name} array has shape {data.shape}; expected [n, {d_model}]")
        if meta:
            rows = meta[name]
        else:  # one document per row, numbered across the splits so that no document is on both sides
            rows = np.zeros((len(data), 3), np.int64)
            rows[:, 0] = offset + np.arange(len(data))
            rows[:, 2] = -1
            offset += len(data)
        writers[name] = _ShardWriter(partial, name, d_model, np_dtype, shard_tokens)
        writers[name].add(data.astype(np_dtype, copy=False), np.asarray(rows, np.int32))
    defaults = {"model": "", "layer": -1, "hook": "", "corpus": "", "split": {"train_groups": [], "val_groups": []}}
    n_texts = {n: sum(t["split"] == n for t in texts or []) for n in SPLITS}
    return _finish_store(partial, store_dir, writers, dtype, n_texts, {**defaults, **(info or {})})


def store_from_npz(
    corpus: str,
    store_dir: str | Path,
    val_fraction: float,
    seed: int,
    max_groups: int | None = None,
    dtype: str = "float32",
    reuse: bool = True,
) -> ActivationStore:
    """A store from activations cached elsewhere: ``activations:PATH.npz`` with arrays ``acts`` [n, d] (float)
    and ``doc`` [n] (int, the document of each row). Documents are split exactly as texts are
    (:func:`featint_utils.data.corpus.split_by_group`); rows keep their order within a document. There is no model
    behind such a store, so the stages that run one (05, 06, and 01's splice metrics) cannot use it."""
    from .corpus import split_by_group

    path = Path(corpus[len(ACTIVATIONS_PREFIX) :]).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no activation file at {str(path)!r} (corpus {corpus!r})")
    try:
        with np.load(path) as npz:
            arrays = {name: npz[name] for name in ("acts", "doc") if name in npz}
    except (OSError, ValueError) as err:
        raise ValueError(f"{path} is not a readable .npz file ({err})") from err
    missing = {"acts", "doc"} - set(arrays)
    if missing:
        raise ValueError(f"{path} must hold arrays 'acts' [n, d] and 'doc' [n]; missing {sorted(missing)}")
    acts, doc = arrays["acts"], arrays["doc"]
    if acts.ndim != 2 or not np.issubdtype(acts.dtype, np.floating):
        raise ValueError(f"'acts' in {path} must be a 2-D float array, got {acts.dtype} {acts.shape}")
    if doc.shape != (len(acts),) or not np.issubdtype(doc.dtype, np.integer):
        raise ValueError(f"'doc' in {path} must be an integer array of length {len(acts)}, got {doc.dtype} {doc.shape}")
    if not np.isfinite(acts).all():
        raise StoreError(f"'acts' in {path} holds NaN or Inf values: refusing to build a store from it")
    request = {  # the file by its content: moved elsewhere (another corpus path) it is the same file
        "sha256": file_sha256(path),
        "val_fraction": val_fraction,
        "seed": seed,
        "max_groups": max_groups,
        "dtype": dtype,
    }
    try:  # a store made before Dec 2026 also recorded the path it read the file from
        older = ({**request, "corpus": read_json(Path(store_dir) / "manifest.json")["request"]["corpus"]},)
    except (OSError, ValueError, KeyError, TypeError):
        older = ()
    existing = reusable_store(store_dir, request, older) if reuse else None
    if existing is not None:
        print(f"reusing the activation store at {store_dir} (same file and split; checksums verified)")
        return existing
    documents = np.unique(doc)
    texts = [Text(text_id=str(d), group=str(d), text="") for d in documents]
    split = split_by_group(texts, val_fraction, seed, max_groups=max_groups)
    records, arrays_out, meta = [], {}, {}
    for name in SPLITS:
        chosen = [int(t.group) for t in getattr(split, name)]
        parts, metas = [], []
        for d in chosen:
            rows = np.flatnonzero(doc == d)
            index = len(records)
            records.append(
                {
                    "index": index,
                    "text_id": str(d),
                    "group": str(d),
                    "split": name,
                    "text": f"rows of document {d} in {path.name}",
                }
            )
            parts.append(acts[rows])
            metas.append(np.c_[np.full(len(rows), index), np.arange(len(rows)), np.full(len(rows), -1)])
        arrays_out[name] = np.concatenate(parts) if parts else np.empty((0, acts.shape[1]), np.float32)
        meta[name] = np.concatenate(metas) if metas else np.empty((0, 3), np.int64)
    info = {
        "request": request,
        "model": corpus,
        "model_source": str(path),
        "layer": -1,
        "hook": "",
        "corpus": corpus,
        "split": split.record(),
        "is_causal_lm": False,
    }
    return store_from_arrays(store_dir, arrays_out, info=info, meta=meta, dtype=dtype, texts=records)


def derived_store(store: ActivationStore, transform, store_dir: str | Path, request: dict, reuse: bool = True):
    """A copy of ``store`` whose activations are ``transform(raw activations [n, d] float32 tensor)``, streamed
    shard by shard, with the same texts and token provenance (for sensitivity runs). ``request`` describes the
    transform (JSON); a finished store made from the same source store and request is reused."""
    store_dir = Path(store_dir)
    request = json.loads(json.dumps({"source": store.fingerprint, **request}))
    existing = reusable_store(store_dir, request) if reuse else None
    if existing is not None:
        return existing
    partial = store_dir.with_name(store_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    shutil.copy(store.path / "texts.jsonl", partial / "texts.jsonl")
    np_dtype = DTYPES[store.manifest["dtype"]]
    writers = {}
    for name in SPLITS:
        shard_tokens = max([s["n_tokens"] for s in store.manifest["splits"][name]["shards"]] + [1])
        writers[name] = _ShardWriter(partial, name, store.d_model, np_dtype, shard_tokens)
        for acts, meta in store.shards(name):
            new = transform(torch.from_numpy(np.array(acts, dtype=np.float32)))  # a writable copy of the shard
            writers[name].add(new.numpy().astype(np_dtype, copy=False), np.asarray(meta))
    drop = ("splits", "normalisation", "created", "git_commit", "request")
    keep = {k: v for k, v in store.manifest.items() if k not in drop}
    n_texts = {name: store.manifest["splits"][name]["n_texts"] for name in SPLITS}
    return _finish_store(
        partial,
        store_dir,
        writers,
        store.manifest["dtype"],
        n_texts,
        {**keep, "derived_from": store.fingerprint, "request": request},  # by content: the run may move
    )


@dataclass
class PaddedBatch:
    """One forward pass worth of contexts, right-padded, with the mask and provenance of its real tokens."""

    split: str
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    keep: torch.Tensor
    """True at real tokens: not padding, not special."""
    meta: np.ndarray
    """[n_kept, 3] int32: text index, position in the text, token id (in ``keep`` order)."""
    texts_done: int
    """Texts finished with this batch (for progress); 0 except on a window's last batch."""


def padded_batches(
    tokenizer,
    texts: list[tuple[str, Text]],
    context_tokens: int,
    batch_size: int,
    window_texts: int = 512,
    indices: np.ndarray | None = None,
):
    """The batches extraction runs, in order: texts tokenised a window at a time (memory stays flat),
    cut into contexts of ``context_tokens`` framed by the tokenizer's special tokens, grouped by length.
    ``indices`` are the texts' numbers in the store (default: their positions in ``texts``)."""
    prefix, suffix = special_frame(tokenizer)
    chunk_len = context_tokens - len(prefix) - len(suffix)
    excluded = np.array(sorted(set(tokenizer.all_special_ids)))
    for window_start in range(0, len(texts), window_texts):
        window = texts[window_start : window_start + window_texts]
        # verbose=False: long documents are chunked here, so the "longer than the maximum" warning is moot
        encoded = tokenizer([t.text for _, t in window], add_special_tokens=False, verbose=False)["input_ids"]
        by_split: dict[str, list[_Chunk]] = {name: [] for name in SPLITS}
        for offset, ((name, _), ids) in enumerate(zip(window, encoded)):
            number = window_start + offset
            by_split[name].extend(chunk_text(ids, number if indices is None else int(indices[number]), chunk_len))
        plan = []
        for name, chunks in by_split.items():
            chunks.sort(key=lambda c: len(c.ids))  # similar lengths share a batch: little padding
            plan += [(name, chunks[b : b + batch_size]) for b in range(0, len(chunks), batch_size)]
        for i, (name, batch) in enumerate(plan):
            done = len(window) if i == len(plan) - 1 else 0
            yield _pad(name, batch, prefix, suffix, excluded, done)


def _pad(split: str, batch: list[_Chunk], prefix, suffix, excluded: np.ndarray, texts_done: int) -> PaddedBatch:
    lengths = np.array([len(c.ids) for c in batch])
    width = len(prefix) + lengths.max() + len(suffix)
    ids = np.zeros((len(batch), width), dtype=np.int64)
    for row, chunk in enumerate(batch):
        ids[row, : len(prefix) + len(chunk.ids) + len(suffix)] = prefix + chunk.ids + suffix
    column = np.arange(width)
    attention = column < (len(prefix) + lengths + len(suffix))[:, None]
    content = (column >= len(prefix)) & (column < (len(prefix) + lengths)[:, None])
    keep = content & ~np.isin(ids, excluded)
    rows, cols = np.nonzero(keep)  # row-major, the order in which hidden[keep] lists the tokens
    starts = np.array([c.start for c in batch]) - len(prefix)
    text_index = np.array([c.text_index for c in batch])
    meta = np.stack([text_index[rows], starts[rows] + cols, ids[rows, cols]], axis=1).astype(np.int32)
    attention = torch.from_numpy(attention.astype(np.int64))
    return PaddedBatch(split, torch.from_numpy(ids), attention, torch.from_numpy(keep), meta, texts_done)
