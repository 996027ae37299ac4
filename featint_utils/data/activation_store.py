"""A finished activation store, opened read-only with every shard checked against its manifest, and the
batches streamed back out of it (rows gathered from the memory maps; :func:`prefetch` makes the next ones while
the model or trainer works); the summaries notebook 00 shows. :mod:`featint_utils.data.extraction` writes stores.

Store layout (one directory)::

    manifest.json            model, layer, hook, dtype, split record, shards, normalisation, provenance
    texts.jsonl              every text: index, text_id, group, split, text
    mean.npy                 train-split mean activation (float64)
    {split}-{i:05d}.acts.npy [n, d_model] activations
    {split}-{i:05d}.meta.npy [n, 3] int32: text index, token position in the text, token id
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
from pathlib import Path
from queue import Full, Queue
from threading import Event, Thread

import numpy as np
import pandas as pd
import torch

from ..io import read_json, write_json
from .models import LoadedModel, model_fingerprint

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


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


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
                if file_sha256(self.path / name) != expected:
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
