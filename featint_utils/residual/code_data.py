"""The NFM stage's data: each token's SAE code, its SAE residual and its activation, cached on disk.

For every token (normalised space, the SAE's own input scale): the top-k code ``(values, indices)``,
the residual ``e = x - SAE(x)`` (the NFM's target) and ``x`` itself (for the raw-activation baseline),
plus the token's document. Arrays are ``.npy`` files opened as memory maps, so the NFM stage's memory
does not grow with the corpus; the cache is rebuilt when the SAE or the store changes.

The tokens are the store's ``val`` documents, which the SAE never trained on. This matters: an SAE
trained for several epochs fits its own training tokens far better than new ones (embedded profile:
FVU 0.04 on its training documents, 0.20 held out), so residuals of training tokens are a different,
smaller signal, and a model of them learns the SAE's over-fitting, not what the SAE misses in general.
Those documents are split again, by document, into three sets with one job each: ``fit`` trains every
model, ``tune`` picks early-stopping epochs and ridge penalties, ``test`` is only ever used to report.
"""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import torch

from ..data.activation_store import ActivationStore
from ..dictionary.sae import TopKSAE
from ..io import read_json, replace_dir, state_digest, write_json
from ..progress import progress

ARRAYS = ("values", "indices", "target", "inputs", "groups")
FORMAT = "featint-residuals"


class CodeBatch(NamedTuple):
    """One minibatch of a :class:`CodeData`."""

    values: torch.Tensor
    """[batch, k] code values (zeros where fewer than k latents fire)."""
    indices: torch.Tensor
    """[batch, k] int64 latent indices."""
    target: torch.Tensor
    """[batch, d] the SAE residual (or a control / injected target, see :meth:`CodeData.with_target`)."""
    inputs: torch.Tensor
    """[batch, d] the normalised activation."""

    def to(self, device: torch.device | str, non_blocking: bool = False) -> CodeBatch:
        return CodeBatch(*(t.to(device, non_blocking=non_blocking) for t in self))

    def pin_memory(self) -> CodeBatch:
        return CodeBatch(*(t.pin_memory() for t in self))


def device_of(model: torch.nn.Module) -> torch.device:
    """Where a model computes (the host for a model without parameters)."""
    parameter = next(model.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")


def predict(model: torch.nn.Module, batch: CodeBatch) -> torch.Tensor:
    """``model.predict(batch)`` computed on the model's device, answered on the batch's: a model on a GPU can
    serve a host-side computation (a control's or a refit's target)."""
    return model.predict(batch.to(device_of(model))).to(batch.target.device)


@dataclass
class CodeData:
    """Codes, residuals and activations of a set of tokens: the rows ``rows`` of full-length arrays
    (memory maps for a cached store), so subsets cost an index array, not a copy."""

    values: np.ndarray
    indices: np.ndarray
    target: np.ndarray
    inputs: np.ndarray
    groups: np.ndarray
    """Split unit of every token: its document, or its stimulus item (whose four variants are separate texts)."""
    n_latents: int
    rows: np.ndarray | None = None
    """Rows of the arrays that belong to this set (None: all)."""
    target_transform: Callable[[np.ndarray, CodeBatch], torch.Tensor] | None = None
    """Computes the target from (the rows, their stored batch) instead of the stored residual: a null control
    or a planted interaction, made on the fly so that it costs no disk (see :meth:`with_target`)."""

    def __post_init__(self):
        n = len(self.values)
        for name in ARRAYS:
            if len(getattr(self, name)) != n:
                raise ValueError(f"CodeData arrays disagree in length: {name} has {len(getattr(self, name))}, not {n}")
        if self.values.shape != self.indices.shape:
            raise ValueError(f"values {self.values.shape} and indices {self.indices.shape} differ in shape")
        if self.rows is None:
            self.rows = np.arange(n)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def d_out(self) -> int:
        return self.target.shape[1]

    @property
    def document(self) -> np.ndarray:
        """Document of each row of this set."""
        return np.asarray(self.groups)[self.rows]

    def stored(self, at: np.ndarray) -> CodeBatch:
        """Rows ``at`` of the full arrays (any order), with the stored residual as the target."""
        at = np.asarray(at)

        def take(array):
            order = np.argsort(at, kind="stable")  # sorted reads from the memory maps, then back in order
            out = np.empty((len(at),) + array.shape[1:], array.dtype)
            out[order] = array[at[order]]
            return torch.from_numpy(out)

        return CodeBatch(
            take(self.values).float(), take(self.indices).long(), take(self.target).float(), take(self.inputs).float()
        )

    def batch(self, local: np.ndarray) -> CodeBatch:
        """Rows ``local`` of this set (any order) as tensors."""
        at = self.rows[np.asarray(local)]
        batch = self.stored(at)
        if self.target_transform is None:
            return batch
        return batch._replace(target=self.target_transform(at, batch))

    def batches(self, batch_size: int, shuffle: bool = False, seed: int = 0, part: slice | None = None):
        """One pass in minibatches; the order depends only on ``seed``. With ``part`` (a rank's share, see
        :meth:`featint_utils.data.distributed.Dist.part`) only those rows of every full batch are read, and the last,
        short batch is dropped: the ranks' parts together are exactly the single process's full batches."""
        order = np.random.default_rng(seed).permutation(len(self)) if shuffle else np.arange(len(self))
        stop = len(self) - len(self) % batch_size if part is not None else len(self)
        for start in range(0, stop, batch_size):
            chunk = order[start : start + batch_size]
            yield self.batch(chunk if part is None else chunk[part])

    def subset(self, local: np.ndarray) -> CodeData:
        """Rows ``local`` of this set, in store order."""
        return replace(self, rows=self.rows[np.sort(np.asarray(local))])

    def with_target(self, transform: Callable[[np.ndarray, CodeBatch], torch.Tensor] | None) -> CodeData:
        """The same tokens with a computed target: ``transform(rows, stored_batch)`` gives the target of the
        full-array ``rows`` (None: back to the stored residual)."""
        return replace(self, target_transform=transform)

    def feature_scale(self) -> np.ndarray:
        """Mean value of each latent where it fires (1 for latents that never fire here), float32."""
        total = np.zeros(self.n_latents)
        count = np.zeros(self.n_latents)
        for batch in self.batches(65536):
            on = batch.values > 0
            total += (
                torch.zeros(self.n_latents, dtype=torch.float64)
                .index_add_(0, batch.indices[on], batch.values[on].double())
                .numpy()
            )
            count += torch.bincount(batch.indices[on], minlength=self.n_latents).numpy()
        return np.where(count > 0, total / np.maximum(count, 1), 1.0).astype(np.float32)


def split_fit_tune(data: CodeData, tune_fraction: float = 0.1, seed: int = 0) -> tuple[CodeData, CodeData]:
    """Split by document: ``tune_fraction`` of the documents (at least one) for tuning, the rest to fit."""
    if not 0 < tune_fraction < 1:
        raise ValueError(f"the held-out fraction must be in (0, 1), got {tune_fraction}")
    document = data.document
    documents = np.unique(document)
    if len(documents) < 2:
        raise ValueError(f"splitting by document needs at least two documents; this set has {len(documents)}")
    n_tune = min(len(documents) - 1, max(1, round(tune_fraction * len(documents))))
    tune_docs = np.random.default_rng(seed).choice(documents, n_tune, replace=False)
    is_tune = np.isin(document, tune_docs)
    return data.subset(np.flatnonzero(~is_tune)), data.subset(np.flatnonzero(is_tune))


def split_fit_tune_test(
    data: CodeData, tune_fraction: float = 0.15, test_fraction: float = 0.3, seed: int = 0
) -> dict[str, CodeData]:
    """``fit``, ``tune`` and ``test`` sets by document (fractions of the documents)."""
    if tune_fraction + test_fraction >= 1:
        raise ValueError(f"tune_fraction + test_fraction must be below 1, got {tune_fraction} + {test_fraction}")
    rest, test = split_fit_tune(data, test_fraction, seed)
    fit, tune = split_fit_tune(rest, tune_fraction / (1 - test_fraction), seed + 1)
    return {"fit": fit, "tune": tune, "test": test}


def _fingerprint(sae: TopKSAE, store: ActivationStore, store_path: Path | None = None) -> str:
    """What the cache is made of: the SAE's weights and the store's content; with ``store_path``, as caches
    made before Dec 2026 hashed it (with the store's path, which a moved run directory changes)."""
    key = f"{state_digest(sae)}|{sae.cfg.k}|{sae.cfg.input_scale}|{store.fingerprint}"
    key += f"|{store_path}" if store_path is not None else ""
    key += "|groups"  # caches from before the split unit was the store's group are rebuilt
    return hashlib.sha256(key.encode()).hexdigest()[:16]


@torch.no_grad()
def build_residual_data(
    sae: TopKSAE, store: ActivationStore, cache_dir: str | Path, batch_size: int = 4096, reuse: bool = True
) -> CodeData:
    """Codes, residuals and activations of the store's ``val`` documents, cached in ``cache_dir``."""
    if store.d_model != sae.cfg.d_in:
        raise ValueError(
            f"the activation store is {store.d_model} wide but the SAE takes d_in={sae.cfg.d_in}: "
            "they come from different models or layers"
        )
    if abs(store.scale - sae.cfg.input_scale) > 1e-6 * max(1.0, store.scale):
        print(
            f"note: the SAE's input scale {sae.cfg.input_scale:.6g} differs from the store's "
            f"{store.scale:.6g}; using the SAE's, as it was trained with it"
        )
    cache_dir = Path(cache_dir)
    fingerprint = _fingerprint(sae, store)
    manifest_path = cache_dir / "manifest.json"
    same = {fingerprint, _fingerprint(sae, store, store.path.resolve())}  # the second: a cache of an older version
    if reuse and manifest_path.exists() and read_json(manifest_path).get("fingerprint") in same:
        return open_residual_data(cache_dir)
    partial = cache_dir.with_name(cache_dir.name + ".partial")
    shutil.rmtree(partial, ignore_errors=True)
    partial.mkdir(parents=True)
    k, d = sae.cfg.k, store.d_model
    sae = sae.eval()
    device = sae.W_enc.device  # the store's batches go where the SAE is; the cache is on the host
    split = "val"
    n = store.n_tokens(split)
    (partial / split).mkdir()
    shapes = {
        "values": ((n, k), np.float32),
        "indices": ((n, k), np.int32),
        "target": ((n, d), np.float32),
        "inputs": ((n, d), np.float32),
        "groups": ((n,), np.int32),
    }
    out = {
        name: np.lib.format.open_memmap(partial / split / f"{name}.npy", "w+", dtype, shape)
        for name, (shape, dtype) in shapes.items()
    }
    out["groups"][:] = store.token_groups(split)  # the split unit: a stimulus item's variants stay together
    start = 0
    bar = progress(total=n, desc=f"SAE codes and residuals ({split})", unit="tok")
    for x in store.batches(split, batch_size, shuffle=False, normalize=False):
        x = x.to(device) * sae.cfg.input_scale
        if not torch.isfinite(x).all():
            raise ValueError(f"non-finite activations in the {split} split of {store.path}")
        values, indices = sae.encode(x)
        stop = start + len(x)
        out["values"][start:stop] = values.cpu().numpy()
        out["indices"][start:stop] = indices.cpu().numpy()
        out["target"][start:stop] = (x - sae.decode(values, indices)).cpu().numpy()
        out["inputs"][start:stop] = x.cpu().numpy()
        start = stop
        bar.update(len(x))
    bar.close()
    for array in out.values():
        array.flush()
    del out
    write_json(
        partial / "manifest.json",
        {"format": FORMAT, "fingerprint": fingerprint, "n_latents": sae.cfg.n_latents, "k": k, "d": d},
    )
    replace_dir(partial, cache_dir)
    return open_residual_data(cache_dir)


def open_residual_data(cache_dir: str | Path) -> CodeData:
    """The cached set of :func:`build_residual_data`, as memory maps."""
    cache_dir = Path(cache_dir)
    manifest_path = cache_dir / "manifest.json"
    if not manifest_path.exists() or read_json(manifest_path).get("format") != FORMAT:
        raise ValueError(f"no residual cache at {str(cache_dir)!r}: run notebook 02 first")
    arrays = {name: np.load(cache_dir / "val" / f"{name}.npy", mmap_mode="r") for name in ARRAYS}
    return CodeData(**arrays, n_latents=read_json(manifest_path)["n_latents"])


def code_data_from_arrays(values, indices, target, inputs=None, groups=None, n_latents: int | None = None) -> CodeData:
    """A :class:`CodeData` from in-memory arrays (planted data, tests); one document per 64 rows by default."""
    values = np.asarray(values, np.float32)
    indices = np.asarray(indices, np.int32)
    target = np.asarray(target, np.float32)
    inputs = target if inputs is None else np.asarray(inputs, np.float32)
    groups = np.arange(len(values)) // 64 if groups is None else np.asarray(groups)
    n_latents = int(indices.max()) + 1 if n_latents is None else n_latents
    return CodeData(values, indices, target, inputs, groups, n_latents)


def set_sizes(sets: dict[str, CodeData]) -> pd.DataFrame:
    """Tokens and documents of each set, and what the set is used for."""
    roles = {"fit": "trains every model", "tune": "early stopping, ridge penalty", "test": "reported numbers only"}
    return pd.DataFrame(
        [
            {"set": name, "tokens": len(data), "documents": len(np.unique(data.document)), "role": roles.get(name, "")}
            for name, data in sets.items()
        ]
    ).set_index("set")


def save_sets(sets: dict[str, CodeData], path: str | Path) -> None:
    """Record which documents each set holds, so later notebooks take apart the very same sets."""
    write_json(path, {name: sorted(int(d) for d in np.unique(data.document)) for name, data in sets.items()})


def load_sets(data: CodeData, path: str | Path) -> dict[str, CodeData]:
    """The sets :func:`save_sets` recorded, cut again from ``data``."""
    documents = read_json(path)
    return {name: data.subset(np.flatnonzero(np.isin(data.document, docs))) for name, docs in documents.items()}
