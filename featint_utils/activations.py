"""Extract one layer's activations into a sharded, memory-mapped store, and stream batches back out.

Store layout (one directory)::

    manifest.json            model, layer, hook, dtype, split record, shards, normalisation, provenance
    texts.jsonl              every text: index, text_id, group, split, text
    mean.npy                 train-split mean activation (float64)
    {split}-{i:05d}.acts.npy [n, d_model] activations
    {split}-{i:05d}.meta.npy [n, 3] int32: text index, token position in the text, token id

A store is built in a ``.partial`` directory and renamed into place only when complete, so an
interrupted extraction never leaves shards that a later run could take for a finished store.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from queue import Full, Queue
from threading import Event, Thread

import numpy as np
import pandas as pd
import torch

from .corpus import Split, Text
from .distributed import SINGLE, Dist
from .io import read_json, replace_dir, write_json
from .models import LoadedModel, forward_to_layer, hook_module, hook_name, model_fingerprint
from .progress import progress

FORMAT = "featint-activations"
VERSION = 1
SPLITS = ("train", "val")
VERIFIED = "verified.json"  # sizes, mtimes and checksums of the files that passed the last check
DTYPES = {"float32": np.float32, "float16": np.float16}


class StoreError(ValueError):
    """An activation store is missing, incomplete, or does not match its manifest."""


def git_commit() -> str | None:
    """The commit of this checkout (recorded with every artifact), or None outside a git checkout."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True, text=True, timeout=5
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


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
            entry[f"{key}_sha256"] = _sha256(self.directory / entry[key])
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


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
        "files_sha256": {name: _sha256(partial / name) for name in ("texts.jsonl", "mean.npy")},
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


ACTIVATIONS_PREFIX = "activations:"


def is_activation_corpus(corpus: str) -> bool:
    """Whether a corpus spec names cached activations (``activations:PATH.npz``) rather than text."""
    return isinstance(corpus, str) and corpus.startswith(ACTIVATIONS_PREFIX)


def require_model(store: ActivationStore, stage: str) -> None:
    """Refuse, with a clear message, to run a stage that needs the language model on a store made from a file."""
    corpus = store.manifest.get("corpus", "")
    if is_activation_corpus(corpus):
        raise ValueError(
            f"stage {stage} runs the language model itself, but this run's activations come from "
            f"a file ({corpus}): stages 00-04 work on such runs; 05 and 06 need a text corpus and its "
            "model"
        )


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
    (:func:`featint_utils.corpus.split_by_group`); rows keep their order within a document. There is no model
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
        "sha256": _sha256(path),
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


def prefetch(items, depth: int = 4, pin: bool = False):
    """Yield ``items`` while a background thread makes the next ``depth`` of them (tokenising and padding,
    or gathering store rows from the memory maps, release the GIL for most of their time), so the model
    is rarely kept waiting. ``pin`` puts tensors in pinned memory: their copy to a GPU is then asynchronous
    (``.to(device, non_blocking=True)``). Stopping early (``break``, an error, closing the generator) stops the
    thread too, and waits for it to leave the item it is making."""
    queue: Queue = Queue(maxsize=depth)
    done, stop = object(), Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                queue.put(item, timeout=0.1)
                return True
            except Full:
                continue
        return False

    def produce():
        try:
            for item in items:
                if not put(item.pin_memory() if pin else item):
                    return
        except BaseException as err:  # re-raised in the consumer, with its traceback
            put(err)
        put(done)

    worker = Thread(target=produce, daemon=True)
    worker.start()
    try:
        while (item := queue.get()) is not done:
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        # A daemon thread still inside numpy or torch (without the GIL) when the interpreter exits is ended there,
        # and a C++ frame that cannot unwind aborts the process ("terminate called without an active exception",
        # SIGABRT: a rank of a two-rank SAE training at exit, under load). Once stopped it ends within one item.
        worker.join()


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


# ---------------------------------------------------------------------------------------------------
# Reading


def reusable_store(store_dir: str | Path, request, older: tuple = ()) -> ActivationStore | None:
    """The finished store at ``store_dir`` if it was made for ``request`` (or one of the ``older`` forms that an
    earlier version recorded for the same inputs) and every file still matches its checksum; None (and the
    reason, when there was a store) if it must be built again."""
    if not (Path(store_dir) / "manifest.json").exists():
        return None
    try:
        existing = ActivationStore(store_dir)
        if existing.manifest.get("request") not in (request, *older):
            print(f"rebuilding the store at {store_dir}: it was made for other inputs or settings")
            return None
        existing.verify()
    except StoreError as err:
        print(f"rebuilding the store at {store_dir}: {err}")
        return None
    shutil.rmtree(Path(store_dir).with_name(Path(store_dir).name + ".partial"), ignore_errors=True)
    return existing


class ActivationStore:
    """A finished activation store, opened read-only with every shard checked against the manifest."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        manifest_path = self.path / "manifest.json"
        if not manifest_path.exists():
            hint = (
                " (an interrupted extraction? run the 00 stage again)"
                if self.path.name.endswith(".partial") or self.path.exists()
                else ""
            )
            raise StoreError(f"no activation store at {str(self.path)!r}: manifest.json is missing{hint}")
        try:
            self.manifest = read_json(manifest_path)
        except (OSError, ValueError) as err:
            raise StoreError(f"{manifest_path} is unreadable ({err}): the store is corrupt, extract it again") from err
        if (
            not isinstance(self.manifest, dict)
            or self.manifest.get("format") != FORMAT
            or self.manifest.get("version") != VERSION
        ):
            raise StoreError(f"{manifest_path} is not a {FORMAT} v{VERSION} manifest")
        self.d_model: int = self.manifest["d_model"]
        self._maps: dict[str, list[tuple[np.ndarray, np.ndarray]]] = {}
        self.dtype = np.dtype(DTYPES[self.manifest["dtype"]])
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                self._check_shard(shard)

    def _check_shard(self, shard: dict) -> None:
        expected = {
            "acts": ((shard["n_tokens"], self.d_model), self.dtype),
            "meta": ((shard["n_tokens"], 3), np.dtype(np.int32)),
        }
        for key, (shape, dtype) in expected.items():
            file = self.path / shard[key]
            if not file.exists():
                raise StoreError(f"store {str(self.path)!r}: shard {shard[key]} listed in the manifest is missing")
            try:
                array = np.load(file, mmap_mode="r")
            except ValueError as err:
                raise StoreError(f"store {str(self.path)!r}: shard {shard[key]} is unreadable ({err})") from err
            if array.shape != shape or array.dtype != dtype:
                raise StoreError(
                    f"store {str(self.path)!r}: shard {shard[key]} has shape {array.shape} {array.dtype}, "
                    f"the manifest says {shape} {dtype}; the store is corrupt: extract it again"
                )

    def checksummed_files(self) -> dict[str, str]:
        """Every file of the store the manifest records a checksum for: relative name -> sha256."""
        files = dict(self.manifest.get("files_sha256", {}))
        for split in SPLITS:
            for shard in self.manifest["splits"][split]["shards"]:
                files |= {shard[key]: shard[f"{key}_sha256"] for key in ("acts", "meta")}
        return files

    def verify(self, cached: bool = True) -> None:
        """Check every file's checksum against the manifest. Hashing reads every byte, so with ``cached`` a file
        whose size and modification time are those of its last successful check (recorded in
        ``verified.json`` beside the manifest) is not read again: any rewrite of a shard changes its mtime."""
        record_path = self.path / VERIFIED
        try:
            record = read_json(record_path) if cached and record_path.exists() else {}
        except (OSError, ValueError):
            record = {}  # an unreadable record only costs a full check
        checked = {}
        for name, expected in self.checksummed_files().items():
            stat = (self.path / name).stat()
            key = [stat.st_size, stat.st_mtime_ns, expected]
            if record.get(name) != key:
                if _sha256(self.path / name) != expected:
                    raise StoreError(
                        f"store {str(self.path)!r}: {name} does not match its checksum in the manifest "
                        "(the file changed after extraction): the store is corrupt, extract it again"
                    )
            checked[name] = key
        if checked != record:
            write_json(record_path, checked)

    @property
    def fingerprint(self) -> str:
        """A hash of the store's content (every file's checksum and the normalisation), for the lineage of
        everything made from it; valid once :meth:`verify` has passed."""
        content = {
            "files": self.checksummed_files(),
            "normalisation": self.manifest["normalisation"],
            "d_model": self.d_model,
            "layer": self.manifest.get("layer"),
            "model": self.manifest.get("model"),
        }
        return hashlib.sha256(json.dumps(content, sort_keys=True).encode()).hexdigest()[:16]

    def extracted_by(self, loaded: LoadedModel) -> bool:
        """Whether these activations came from ``loaded``: the same model by content wherever it lies now (a
        store of an older version: from the same path)."""
        request = self.manifest.get("request", {})
        if "model" in request:
            return request["model"] == model_fingerprint(loaded.source)
        return self.manifest.get("model_source") == loaded.source

    # -- facts --------------------------------------------------------------------------------------
    @property
    def layer(self) -> int:
        return self.manifest["layer"]

    @property
    def scale(self) -> float:
        """Input normalisation: multiply raw activations by this so that E||x||^2 = d_model."""
        return self.manifest["normalisation"]["scale"]

    @property
    def mean(self) -> np.ndarray:
        """Train-split mean activation (float64)."""
        return np.load(self.path / self.manifest["normalisation"]["mean_file"])

    def n_tokens(self, split: str) -> int:
        return self._split(split)["n_tokens"]

    def _split(self, split: str) -> dict:
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        return self.manifest["splits"][split]

    def shards(self, split: str) -> list[tuple[np.ndarray, np.ndarray]]:
        """(activations, meta) memory maps of each shard of a split."""
        return [
            (np.load(self.path / s["acts"], mmap_mode="r"), np.load(self.path / s["meta"], mmap_mode="r"))
            for s in self._split(split)["shards"]
        ]

    def texts(self) -> pd.DataFrame:
        """Every text with its index, id, group and split."""
        return pd.read_json(self.path / "texts.jsonl", lines=True)

    def tokens(self, split: str) -> pd.DataFrame:
        """Provenance of every stored token of a split, in store order: text index, position, token id."""
        parts = [np.asarray(meta) for _, meta in self.shards(split)]
        meta = np.concatenate(parts) if parts else np.empty((0, 3), np.int32)
        return pd.DataFrame(meta, columns=["text_index", "position", "token_id"])

    def token_groups(self, split: str) -> np.ndarray:
        """The split unit of every stored token of a split (its text's group: a document, or a stimulus item whose
        variants are separate texts), as integers; a token's own text where the store records no groups."""
        text_index = self.tokens(split)["text_index"].to_numpy()
        texts = self.texts()
        if texts.empty:
            return text_index
        codes = pd.Series(pd.factorize(texts["group"].astype(str))[0], index=texts["index"])
        return codes.reindex(text_index).to_numpy()

    def load(self, split: str, normalize: bool = False) -> np.ndarray:
        """A whole split in memory as float32 (for small stores and evaluation)."""
        parts = [np.asarray(acts, dtype=np.float32) for acts, _ in self.shards(split)]
        out = np.concatenate(parts) if parts else np.empty((0, self.d_model), np.float32)
        return out * np.float32(self.scale) if normalize else out

    # -- streaming ----------------------------------------------------------------------------------
    def batches(
        self,
        split: str,
        batch_size: int,
        shuffle: bool = True,
        seed: int = 0,
        normalize: bool = True,
        mix_shards: int = 4,
        skip: int = 0,
        drop_last: bool = False,
        part: slice | None = None,
    ):
        """Yield float32 tensors of ``batch_size`` rows, one pass over a split.

        Shuffling draws shards in random order and permutes rows across ``mix_shards`` shards at a time,
        so memory holds at most that many shards' pages, whatever the store's size. The order depends
        only on ``seed``; ``skip`` passes over the first batches without reading them (to resume).
        ``part`` reads only those rows of each batch (a rank's share of a data-parallel global batch).
        """
        scale = np.float32(self.scale if normalize else 1.0)
        for number, rows in enumerate(self.batch_rows(split, batch_size, shuffle, seed, mix_shards)):
            if number < skip or (drop_last and len(rows) < batch_size):
                continue
            yield torch.from_numpy(self.gather(split, rows if part is None else rows[part]) * scale)

    def batch_rows(self, split: str, batch_size: int, shuffle: bool = True, seed: int = 0, mix_shards: int = 4):
        """The row numbers (into the split, store order) of each batch :meth:`batches` yields."""
        rng = np.random.default_rng(seed)
        sizes = [s["n_tokens"] for s in self._split(split)["shards"]]
        starts = np.cumsum([0] + sizes)
        order = rng.permutation(len(sizes)) if shuffle else np.arange(len(sizes))
        carry = np.empty(0, dtype=np.int64)
        for g in range(0, len(order), mix_shards):
            group = np.concatenate([np.arange(starts[i], starts[i + 1]) for i in order[g : g + mix_shards]])
            rows = np.concatenate([carry, rng.permutation(group) if shuffle else group])
            full = len(rows) // batch_size * batch_size
            for start in range(0, full, batch_size):
                yield rows[start : start + batch_size]
            carry = rows[full:]
        if len(carry):
            yield carry

    def gather(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Activations of the given split rows (any order), float32, read from the memory maps."""
        return self._gather(split, rows, 0, np.empty((len(rows), self.d_model), np.float32))

    def gather_meta(self, split: str, rows: np.ndarray) -> np.ndarray:
        """Provenance (text index, position, token id) of the given split rows (any order), as :meth:`tokens`
        gives it for every row, read from the memory maps."""
        return self._gather(split, rows, 1, np.empty((len(rows), 3), np.int64))

    def _gather(self, split: str, rows: np.ndarray, part: int, out: np.ndarray) -> np.ndarray:
        if split not in self._maps:
            self._maps[split] = self.shards(split)
        maps = [shard[part] for shard in self._maps[split]]
        starts = np.cumsum([0] + [len(a) for a in maps])
        owner = np.searchsorted(starts, rows, side="right") - 1
        for s in np.unique(owner):
            mask = owner == s
            local = rows[mask] - starts[s]
            order = np.argsort(local)  # sorted reads from the memory map, then back to the batch's order
            out[np.flatnonzero(mask)[order]] = maps[s][local[order]]
        return out


# ---------------------------------------------------------------------------------------------------
# Summaries for the notebook


def summary(store: ActivationStore) -> pd.DataFrame:
    """One row per split: texts, groups, tokens, shards, size on disk."""
    rows = []
    split_record = store.manifest["split"]
    for split in SPLITS:
        info = store.manifest["splits"][split]
        size = sum((store.path / s[k]).stat().st_size for s in info["shards"] for k in ("acts", "meta"))
        rows.append(
            {
                "split": split,
                "texts": info["n_texts"],
                "groups": len(split_record[f"{split}_groups"]),
                "tokens": info["n_tokens"],
                "shards": len(info["shards"]),
                "MB on disk": round(size / 2**20, 2),
            }
        )
    return pd.DataFrame(rows).set_index("split")


def token_norms(store: ActivationStore, split: str = "train") -> pd.DataFrame:
    """L2 norm (raw, un-normalised) of every stored token with its provenance."""
    norms = np.concatenate(
        [np.linalg.norm(np.asarray(a, np.float64), axis=1) for a, _ in store.shards(split)] or [np.empty(0)]
    )
    tokens = store.tokens(split)
    tokens["norm"] = norms
    return tokens


def norm_outliers(store: ActivationStore, tokenizer, split: str = "train", n: int = 10) -> pd.DataFrame:
    """The ``n`` tokens with the largest activation norm, traced back to their text."""
    norms = token_norms(store, split)
    top = norms.nlargest(n, "norm")
    texts = store.texts().set_index("index")
    top["token"] = tokenizer.convert_ids_to_tokens(top["token_id"].tolist())
    top["text_id"] = texts.loc[top["text_index"], "text_id"].to_numpy()
    top["text"] = texts.loc[top["text_index"], "text"].str.slice(0, 80).to_numpy()
    return top[["norm", "token", "position", "text_id", "text"]].reset_index(drop=True)
