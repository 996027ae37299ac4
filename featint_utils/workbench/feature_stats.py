"""What a feature dashboard shows, measured (:mod:`featint_utils.workbench.dashboards` renders it).

**One pass.** The split is encoded batch by batch, never held whole. For each chosen feature the pass keeps its
firing count, an exact histogram (fixed bins over ``[0, upper]``; when an activation exceeds ``upper`` the range
doubles and neighbouring bins merge, so no count is ever lost), its ``n_top`` strongest tokens, and a uniform
sample of its firing tokens (the ``sample_size`` smallest of a random key per firing token). The quantile bins
are cut from that sample. Afterwards only the example rows and their context windows are read again.

**Secondary features** are the secondary SAE's code of the NFM vector ``h`` of each token's primary code,
computed per token of the primary store by :meth:`Decomposition.secondary_code` (as stage 05 does).

**Output tokens.** Primary: the decoder direction in raw units (``W_dec[f] / input_scale``) times the unembedding:
the direct effect on the logits per unit of activation, through no later block and no final norm (as sae_vis
and Neuronpedia compute it). Secondary: a secondary feature lives in ``h``, which reaches the residual stream only
through ``Linear(K, d)(ReLU(h))``; the ReLU makes that map non-linear, so no fixed direction exists. Its effect is
measured as the splice makes it: the change of the spliced layer output when the feature is clamped to 0
(:meth:`Decomposition.edit`), summed over the uniform sample of its firing tokens and divided by their summed
activation (residual units per unit of activation), then times the unembedding. Encoders have no LM head: the
section is left out.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from ..data.activation_store import ActivationStore
from ..progress import progress
from ..residual.decomposition import Clamp, Decomposition

FAMILIES = ("primary", "secondary")
HIST_BINS = 64  # a power of two: doubling the range merges the bins in pairs
EFFECTS = ("interaction", "formality", "emotion")  # stage 05's effects, in the order their features are taken


@dataclass
class Example:
    """One token where a feature fires, with its place in its document."""

    row: int
    """Row of the split (store order)."""
    activation: float
    text_index: int = -1
    position: int = -1
    """Token position in its text."""
    token_id: int = -1
    context: list[tuple[int, float, bool]] = field(default_factory=list)
    """(token id, the feature's activation, whether it is this example's token) of each token of the window."""


@dataclass
class QuantileBin:
    """Examples drawn from one quantile range of a feature's nonzero activations."""

    lo_quantile: float
    hi_quantile: float
    lo: float
    """Activation at ``lo_quantile`` (of the uniform sample of firing tokens)."""
    hi: float
    examples: list[Example]
    """Strongest first."""


@dataclass
class FeatureStats:
    """What one pass over a split learns of a feature."""

    feature: int
    n_tokens: int
    """Tokens in the split."""
    n_firing: int
    """Tokens where the feature is nonzero."""
    activation_sum: float
    max_activation: float
    hist_counts: np.ndarray
    """[bins] counts of the nonzero activations (they sum to ``n_firing``)."""
    hist_edges: np.ndarray
    """[bins + 1] bin edges."""
    top: list[Example]
    """The strongest tokens, strongest first."""
    sample: list[Example]
    """A uniform sample of the firing tokens (all of them when there are at most ``sample_size``)."""
    quantile_bins: list[QuantileBin] = field(default_factory=list)
    """Highest bin first."""

    @property
    def frequency(self) -> float:
        return self.n_firing / max(self.n_tokens, 1)

    @property
    def mean_activation(self) -> float:
        """Mean over the tokens where it fires."""
        return self.activation_sum / max(self.n_firing, 1)


# ---------------------------------------------------------------------------------------------------
# The pass


class _Collector:
    """Running statistics of ``n_features`` features over batches of their dense activations."""

    def __init__(self, n_features: int, n_top: int, sample_size: int, seed: int):
        self.generator = torch.Generator().manual_seed(seed)
        self.top_values = torch.full((n_features, n_top), -float("inf"))
        self.top_rows = torch.full((n_features, n_top), -1, dtype=torch.long)
        self.sample_keys = torch.full((n_features, sample_size), float("inf"))
        self.sample_rows = torch.full((n_features, sample_size), -1, dtype=torch.long)
        self.sample_values = torch.zeros((n_features, sample_size))
        self.n_firing = torch.zeros(n_features, dtype=torch.long)
        self.sums = torch.zeros(n_features, dtype=torch.float64)
        self.maxima = torch.zeros(n_features)
        self.hist = torch.zeros((n_features, HIST_BINS), dtype=torch.long)
        self.upper = torch.zeros(n_features, dtype=torch.float64)  # 0: no activation seen yet

    def add(self, acts: torch.Tensor, offset: int) -> None:
        """Take a batch ``acts`` [rows, n_features] (0 where a feature is off) of split rows ``offset``..."""
        fire = acts > 0
        self.n_firing += fire.sum(0)
        self.sums += acts.sum(0, dtype=torch.float64)
        batch_max = acts.max(0).values
        self.maxima = torch.maximum(self.maxima, batch_max)
        rows = torch.arange(offset, offset + len(acts)).expand(acts.shape[1], -1)
        # exact top n: merge the kept with the batch
        values = torch.cat([self.top_values, acts.t()], dim=1)
        top = values.topk(self.top_values.shape[1], dim=1)
        self.top_values, self.top_rows = top.values, torch.cat([self.top_rows, rows], dim=1).gather(1, top.indices)
        # uniform sample: the firing tokens with the smallest random keys
        keys = torch.rand(acts.shape, generator=self.generator).masked_fill_(~fire, float("inf")).t()
        keep = torch.cat([self.sample_keys, keys], dim=1).topk(self.sample_keys.shape[1], dim=1, largest=False)
        self.sample_keys = keep.values
        self.sample_rows = torch.cat([self.sample_rows, rows], dim=1).gather(1, keep.indices)
        self.sample_values = torch.cat([self.sample_values, acts.t()], dim=1).gather(1, keep.indices)
        self._histogram(acts, fire, batch_max.double())

    def _histogram(self, acts: torch.Tensor, fire: torch.Tensor, batch_max: torch.Tensor) -> None:
        for f in torch.nonzero(batch_max > self.upper).flatten().tolist():  # rare: the range grows ~log2(range) times
            if self.upper[f] == 0:
                self.upper[f] = 2.0 ** np.ceil(np.log2(float(batch_max[f])))
                continue
            factor = int(2 ** np.ceil(np.log2(float(batch_max[f] / self.upper[f]))))
            merged = torch.zeros(HIST_BINS, dtype=torch.long)
            if factor >= HIST_BINS:
                merged[0] = self.hist[f].sum()
            else:
                merged[: HIST_BINS // factor] = self.hist[f].reshape(-1, factor).sum(1)
            self.hist[f] = merged
            self.upper[f] *= factor
        rows, features = torch.nonzero(fire, as_tuple=True)
        bins = (acts[rows, features].double() / self.upper[features] * HIST_BINS).long().clamp_(0, HIST_BINS - 1)
        flat = torch.bincount(features * HIST_BINS + bins, minlength=self.hist.numel())
        self.hist += flat.reshape(self.hist.shape)


def _dense(values: torch.Tensor, indices: torch.Tensor, slot: torch.Tensor) -> torch.Tensor:
    """[rows, n_chosen] activations of the chosen features from a sparse code; ``slot`` maps a latent to its
    column (-1: not chosen)."""
    column = slot[indices]
    keep = (column >= 0) & (values > 0)
    rows, picks = torch.nonzero(keep, as_tuple=True)
    out = torch.zeros(len(values), int(slot.max()) + 1)
    out[rows, column[rows, picks]] = values[rows, picks].float()  # a TopK code names each latent once per row
    return out


@torch.no_grad()
def collect(
    encode,
    store: ActivationStore,
    features: list[int],
    n_latents: int,
    split: str = "val",
    n_top: int = 10,
    sample_size: int = 256,
    n_bins: int = 4,
    n_per_bin: int = 3,
    window: tuple[int, int] = (10, 5),
    batch_size: int = 4096,
    seed: int = 0,
) -> list[FeatureStats]:
    """One pass over ``split`` (raw activations through ``encode``, e.g. :meth:`Decomposition.primary_code`) for the
    given features: counts, histograms, top examples, a uniform sample and quantile-bin examples (see the module
    docstring), each example with its token window of ``window`` = (before, after) tokens."""
    if not features:
        return []
    slot = torch.full((n_latents,), -1, dtype=torch.long)
    slot[torch.tensor(features)] = torch.arange(len(features))
    collector = _Collector(len(features), n_top, sample_size, seed)
    n_tokens = store.n_tokens(split)
    bar = progress(total=n_tokens, desc=f"dashboard pass ({split})", unit="tok")
    offset = 0
    for x in store.batches(split, batch_size, shuffle=False, normalize=False):
        values, indices = encode(x)
        collector.add(_dense(values.cpu(), indices.cpu(), slot), offset)
        offset += len(x)
        bar.update(len(x))
    bar.close()
    rng = np.random.default_rng(seed)
    stats = []
    for i, feature in enumerate(features):
        upper = float(collector.upper[i])
        found = collector.top_values[i] > 0
        top = [
            Example(r, v)
            for r, v in zip(collector.top_rows[i][found].tolist(), collector.top_values[i][found].tolist())
        ]
        sampled = collector.sample_rows[i] >= 0
        sample_rows = collector.sample_rows[i][sampled].numpy()
        sample_values = collector.sample_values[i][sampled].numpy()
        stat = FeatureStats(
            feature=feature,
            n_tokens=n_tokens,
            n_firing=int(collector.n_firing[i]),
            activation_sum=float(collector.sums[i]),
            max_activation=float(collector.maxima[i]),
            hist_counts=collector.hist[i].numpy().copy(),
            hist_edges=np.linspace(0.0, upper, HIST_BINS + 1),
            top=top,
            sample=[Example(int(r), float(v)) for r, v in zip(sample_rows, sample_values)],
        )
        stat.quantile_bins = _quantile_bins(sample_rows, sample_values, {e.row for e in top}, n_bins, n_per_bin, rng)
        stats.append(stat)
    _add_contexts(stats, encode, store, split, window, batch_size)
    return stats


def _quantile_bins(rows, values, exclude: set[int], n_bins: int, n_per_bin: int, rng) -> list[QuantileBin]:
    """``n_per_bin`` examples from each of ``n_bins`` quantile ranges of the sampled activations (the top examples
    left out), highest range first. A value's bin is monotone in the value, so the bins never overlap."""
    if len(values) == 0 or n_bins < 1:
        return []
    quantiles = np.linspace(0.0, 1.0, n_bins + 1)
    edges = np.quantile(values, quantiles)
    bin_of = np.searchsorted(edges[1:-1], values, side="right")
    eligible = ~np.isin(rows, list(exclude))
    bins = []
    for b in reversed(range(n_bins)):
        members = np.flatnonzero((bin_of == b) & eligible)
        chosen = rng.choice(members, size=min(n_per_bin, len(members)), replace=False)
        chosen = chosen[np.argsort(-values[chosen], kind="stable")]
        examples = [Example(int(rows[c]), float(values[c])) for c in chosen]
        bins.append(
            QuantileBin(float(quantiles[b]), float(quantiles[b + 1]), float(edges[b]), float(edges[b + 1]), examples)
        )
    return bins


def encode_rows(encode, store: ActivationStore, split: str, rows: np.ndarray, batch_size: int):
    """(values, indices) of the given split rows, encoded in batches."""
    parts = [
        encode(torch.from_numpy(store.gather(split, rows[s : s + batch_size]))) for s in range(0, len(rows), batch_size)
    ]
    if not parts:
        return torch.zeros(0, 1), torch.zeros(0, 1, dtype=torch.long)
    return torch.cat([p[0].cpu() for p in parts]), torch.cat([p[1].cpu() for p in parts])


def _add_contexts(stats: list[FeatureStats], encode, store: ActivationStore, split: str, window, batch_size: int):
    """Fill in every shown example's document, token and token window (the rows before and after it in the store
    that belong to the same text, within ``window`` positions), with the feature's activation on each token."""
    before, after = window
    n_tokens = store.n_tokens(split)
    shown = [(s.feature, e) for s in stats for e in s.top + [e for b in s.quantile_bins for e in b.examples]]
    if not shown:
        return
    candidates = np.unique(
        np.concatenate([np.arange(max(0, e.row - before), min(n_tokens, e.row + after + 1)) for _, e in shown])
    )
    meta = store.gather_meta(split, candidates)
    windows = []
    for _, example in shown:
        lo, hi = np.searchsorted(candidates, [example.row - before, example.row + after + 1])
        here = meta[np.searchsorted(candidates, example.row)]
        example.text_index, example.position, example.token_id = (int(v) for v in here)
        rows, rows_meta = candidates[lo:hi], meta[lo:hi]
        same = (
            (rows_meta[:, 0] == here[0]) & (rows_meta[:, 1] >= here[1] - before) & (rows_meta[:, 1] <= here[1] + after)
        )
        rows, rows_meta = rows[same], rows_meta[same]
        order = np.argsort(rows_meta[:, 1], kind="stable")
        windows.append((rows[order], rows_meta[order]))
    context_rows = np.unique(np.concatenate([rows for rows, _ in windows]))
    values, indices = encode_rows(encode, store, split, context_rows, batch_size)
    for (feature, example), (rows, rows_meta) in zip(shown, windows):
        at = torch.from_numpy(np.searchsorted(context_rows, rows))
        acts = (values[at] * (indices[at] == feature)).sum(1).tolist()
        example.context = [(int(m[2]), a, int(r) == example.row) for r, m, a in zip(rows, rows_meta, acts)]


@torch.no_grad()
def firing_counts(encode, store: ActivationStore, n_latents: int, split: str = "val", batch_size: int = 4096):
    """How many tokens of ``split`` each latent fires on (one encoding pass)."""
    counts = torch.zeros(n_latents, dtype=torch.long)
    bar = progress(total=store.n_tokens(split), desc=f"firing frequency ({split})", unit="tok")
    for x in store.batches(split, batch_size, shuffle=False, normalize=False):
        values, indices = encode(x)
        counts += torch.bincount(indices[values > 0].cpu(), minlength=n_latents)
        bar.update(len(x))
    bar.close()
    return counts.numpy()


# ---------------------------------------------------------------------------------------------------
# Decoder geometry and output tokens


def decoder_neighbours(W_dec: torch.Tensor, feature: int, n: int = 8) -> list[tuple[int, float]]:
    """The ``n`` other features whose decoder rows have the highest cosine with ``feature``'s: (feature, cosine)."""
    unit = F.normalize(W_dec.detach().float().cpu(), dim=1)
    cosine = unit @ unit[feature]
    cosine[feature] = -float("inf")
    top = cosine.topk(min(n, len(cosine) - 1))
    return list(zip(top.indices.tolist(), top.values.tolist()))


def output_tokens(direction: torch.Tensor, unembedding: torch.Tensor, n: int = 10):
    """(boosted, suppressed): the ``n`` tokens whose logits ``unembedding @ direction`` are largest and smallest,
    as (token id, logit), extreme first. ``unembedding`` is the LM head's weight [vocab, d_model]."""
    logits = unembedding.detach().float().cpu() @ direction.detach().float().cpu()
    boosted = torch.argsort(logits, descending=True)[:n]
    suppressed = torch.argsort(logits)[:n]
    return ([(int(t), float(logits[t])) for t in boosted], [(int(t), float(logits[t])) for t in suppressed])


@torch.no_grad()
def secondary_output_direction(
    decomposition: Decomposition, store: ActivationStore, split: str, feature: int, sample: list[Example]
) -> torch.Tensor | None:
    """A secondary feature's effect on the layer output per unit of activation (raw units): the change of the
    spliced output when it is clamped to 0, summed over the ``sample`` tokens and divided by their summed
    activation (see the module docstring); None without a sample."""
    if not sample:
        return None
    rows = np.array([e.row for e in sample])
    x = torch.from_numpy(store.gather(split, rows))
    clamp = Clamp("secondary", feature, "set", 0.0)
    change = decomposition.edit(x) - decomposition.edit(x, clamp)
    return change.sum(0) / sum(e.activation for e in sample)


# ---------------------------------------------------------------------------------------------------
