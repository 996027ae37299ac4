"""Feature dashboards as static HTML (after sae_vis and Neuronpedia, offline): one self-contained page per feature
and an index, built from a run's activation store.

A page shows the feature's label (its most common firing tokens among its top examples), firing frequency, a
histogram of its nonzero activations (inline SVG), its top activating tokens and a few from each quantile bin of
its activation, each in a token window of its document with every token shaded by the feature's activation, its
decoder neighbours (highest cosine of decoder rows), and for causal LMs the output tokens it boosts and
suppresses. Pages hold no scripts and load nothing: they open from disk, anywhere.

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

import html
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F

from . import identification, models
from . import secondary as secondary_stage
from .activations import ActivationStore, is_activation_corpus
from .decomposition import Clamp, Decomposition
from .feature_labels import token_summary
from .features import pick_features
from .progress import progress
from .run import Run, StaleArtifactError

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


def _encode_rows(encode, store: ActivationStore, split: str, rows: np.ndarray, batch_size: int):
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
    values, indices = _encode_rows(encode, store, split, context_rows, batch_size)
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
# HTML

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#222}
h1 small{color:#666;font-weight:normal}
table{border-collapse:collapse}td,th{padding:2px 8px;border-bottom:1px solid #ddd;text-align:left}
.facts{color:#444}.ex{margin:3px 0;font-size:14px;line-height:1.6}
.act{display:inline-block;width:5em;color:#a40;font-variant-numeric:tabular-nums}
.doc{display:inline-block;min-width:6em;color:#777;font-size:12px}
.t{white-space:pre;border-radius:2px;font-family:ui-monospace,monospace}
.c{font-weight:bold;text-decoration:underline}
.tokens span{display:inline-block;margin:1px 6px 1px 0;font-family:ui-monospace,monospace;white-space:pre}
.cols{display:flex;gap:3em;flex-wrap:wrap}
"""


class _TokenText:
    """Display text of token ids, cached, with the spacing the tokenizer gives them in running text: byte-level BPE
    (GPT-2) decodes a token with its own leading space; word-level and WordPiece tokens (BERT) are words that
    running text separates by spaces, except ``##`` continuations; SentencePiece marks a word start with ``▁``.
    Newlines and tabs are shown as symbols."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        backend = getattr(tokenizer, "backend_tokenizer", None)
        self.spaced_words = type(getattr(backend, "model", None)).__name__ in ("WordPiece", "WordLevel")
        self.cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        if token_id not in self.cache:
            self.cache[token_id] = self._text(token_id).replace("\n", "⏎").replace("\t", "⇥") or "∅"
        return self.cache[token_id]

    def _text(self, token_id: int) -> str:
        if token_id < 0:
            return "?"
        if self.tokenizer is None:
            return f"#{token_id}"
        piece = self.tokenizer.convert_ids_to_tokens(token_id) or ""
        if piece.startswith("##"):
            return piece[2:]
        if piece.startswith("▁"):
            return " " + piece[1:]
        text = self.tokenizer.decode([token_id])
        return " " + text if self.spaced_words else text


def label(stats: FeatureStats, token_text: _TokenText, n: int = 3) -> str:
    """The feature's strongest distinct firing tokens, as the figures name features
    (:func:`featint_utils.feature_labels.token_summary`)."""
    return token_summary([token_text(e.token_id) for e in stats.top], n)


def _page(feature: int) -> str:
    return f"feature_{feature}.html"


def _histogram_svg(stats: FeatureStats, width: int = 420, height: int = 120) -> str:
    """Bars of the nonzero-activation histogram up to its last occupied bin; each bar carries its count."""
    occupied = np.flatnonzero(stats.hist_counts)
    if len(occupied) == 0:
        return "<p>never fires on this split</p>"
    last = int(occupied[-1]) + 1
    counts, edges = stats.hist_counts[:last], stats.hist_edges[: last + 1]
    bar_width, plot_height = width / last, height - 18
    tallest = counts.max()
    bars = []
    for count, lo, hi, i in zip(counts, edges[:-1], edges[1:], range(last)):
        h = plot_height * count / tallest
        bars.append(
            f'<rect x="{i * bar_width:.2f}" y="{plot_height - h:.2f}" width="{max(bar_width - 1, 0.5):.2f}" '
            f'height="{h:.2f}" fill="#e07b39" data-count="{int(count)}" data-lo="{lo:.6g}" data-hi="{hi:.6g}">'
            f"<title>{lo:.3g} to {hi:.3g}: {int(count)}</title></rect>"
        )
    return (
        f'<svg class="histogram" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'font-size="11">{"".join(bars)}'
        f'<line x1="0" y1="{plot_height}" x2="{width}" y2="{plot_height}" stroke="#555"/>'
        f'<text x="0" y="{height - 3}">0</text>'
        f'<text x="{width}" y="{height - 3}" text-anchor="end">{edges[-1]:.3g}</text>'
        f'<text x="{width}" y="10" text-anchor="end">max bin {int(tallest)} tokens</text></svg>'
    )


def _example_html(example: Example, scale: float, token_text: _TokenText, documents: dict[int, str]) -> str:
    spans = []
    for token_id, activation, is_example in example.context:
        alpha = min(max(activation / scale, 0.0), 1.0) if scale > 0 else 0.0
        spans.append(
            f'<span class="t{" c" if is_example else ""}" style="background:rgba(255,120,0,{alpha:.2f})" '
            f'title="{activation:.3f}">{html.escape(token_text(token_id))}</span>'
        )
    document = documents.get(example.text_index, str(example.text_index))
    return (
        f'<div class="ex" data-row="{example.row}" data-activation="{example.activation:.6g}" '
        f'data-token-id="{example.token_id}"><span class="act">{example.activation:.3f}</span>'
        f'<span class="doc" title="document">{html.escape(document)}</span>{"".join(spans)}</div>'
    )


def _token_list(kind: str, tokens: list[tuple[int, float]], token_text: _TokenText) -> str:
    items = "".join(
        f'<span data-token-id="{t}" title="{logit:+.3f}">{html.escape(token_text(t))} '
        f"<small>{logit:+.2f}</small></span>"
        for t, logit in tokens
    )
    return f'<div><h3>{kind}</h3><div class="tokens {kind}">{items}</div></div>'


@dataclass
class _Context:
    """What every page of one build shares."""

    title: str
    family: str
    token_text: _TokenText
    documents: dict[int, str]
    labels: dict[int, str]
    n_neighbours: int
    W_dec: torch.Tensor
    output_note: str
    primary_pages: Path | None = None
    """Where the primary dashboards are (links from a secondary feature's driving pairs), if built."""


def _feature_html(stats: FeatureStats, ctx: _Context, outputs, drivers: pd.DataFrame | None) -> str:
    f = stats.feature
    scale = stats.max_activation
    parts = [
        f"<h1>{html.escape(ctx.family)} feature {f} <small>{html.escape(ctx.labels[f])}</small></h1>",
        f'<p><a href="index.html">index</a> · {html.escape(ctx.title)}</p>',
        f'<p class="facts">fires on <b>{stats.frequency:.4%}</b> of tokens ({stats.n_firing} of {stats.n_tokens}); '
        f"max activation {stats.max_activation:.4g}; mean when firing {stats.mean_activation:.4g}</p>",
        "<h2>Activation histogram</h2>",
        "<p>Nonzero activations, every firing token of the split.</p>",
        _histogram_svg(stats),
        "<h2>Top activations</h2>",
        '<section class="top">',
        *(_example_html(e, scale, ctx.token_text, ctx.documents) for e in stats.top),
        "</section>",
    ]
    if stats.quantile_bins:
        parts.append("<h2>Examples by quantile of activation</h2>")
        parts.append(f"<p>Bins of a uniform sample of {len(stats.sample)} firing tokens; top examples left out.</p>")
        for b in stats.quantile_bins:
            parts.append(
                f'<section class="bin" data-lo="{b.lo:.6g}" data-hi="{b.hi:.6g}">'
                f"<h3>quantiles {b.lo_quantile:.2f} to {b.hi_quantile:.2f} (activation {b.lo:.3g} to {b.hi:.3g})</h3>"
            )
            parts += [_example_html(e, scale, ctx.token_text, ctx.documents) for e in b.examples]
            parts.append("</section>")
    parts.append(
        "<h2>Decoder neighbours</h2><table class='neighbours'><tr><th>feature</th><th>cosine</th><th>label</th></tr>"
    )
    for other, cosine in decoder_neighbours(ctx.W_dec, f, ctx.n_neighbours):
        name = f'<a href="{_page(other)}">{other}</a>' if other in ctx.labels else str(other)
        parts.append(
            f'<tr data-feature="{other}"><td>{name}</td><td>{cosine:.3f}</td>'
            f"<td>{html.escape(ctx.labels.get(other, ''))}</td></tr>"
        )
    parts.append("</table>")
    if outputs is not None:
        boosted, suppressed = outputs
        parts += [
            "<h2>Output tokens</h2>",
            f"<p>{html.escape(ctx.output_note)}</p>",
            '<div class="cols">',
            _token_list("boosted", boosted, ctx.token_text),
            _token_list("suppressed", suppressed, ctx.token_text),
            "</div>",
        ]
    if drivers is not None and not drivers.empty:
        parts.append(
            "<h2>Driving primary pairs</h2><p>Mean exact contribution of each pair of primary features to this "
            "feature's pre-activation over its top examples.</p><table><tr><th>pair</th><th>contribution</th></tr>"
        )
        for row in drivers.itertuples():
            pair = " × ".join(_primary_link(int(i), ctx.primary_pages) for i in (row.feature_i, row.feature_j))
            parts.append(f"<tr><td>{pair}</td><td>{row.contribution:.4g}</td></tr>")
        parts.append("</table>")
    return _document(f"{ctx.family} feature {f}", parts)


def _primary_link(feature: int, primary_pages: Path | None) -> str:
    if primary_pages is not None and (primary_pages / _page(feature)).exists():
        return f'<a href="../../primary/{_page(feature)}">{feature}</a>'
    return str(feature)


def _index_html(stats: list[FeatureStats], ctx: _Context, notes: list[str]) -> str:
    rows = "".join(
        f'<tr><td><a href="{_page(s.feature)}">{s.feature}</a></td><td>{html.escape(ctx.labels[s.feature])}</td>'
        f"<td>{s.frequency:.4%}</td><td>{s.max_activation:.4g}</td><td>{s.n_firing}</td></tr>"
        for s in stats
    )
    return _document(
        f"{ctx.family} feature dashboards",
        [
            f"<h1>{html.escape(ctx.family)} feature dashboards</h1>",
            f"<p>{html.escape(ctx.title)}</p>",
            *(f'<p class="facts">{html.escape(note)}</p>' for note in notes),
            "<table class='index'><tr><th>feature</th><th>label</th><th>frequency</th><th>max activation</th>"
            f"<th>firing tokens</th></tr>{rows}</table>",
        ],
    )


def _document(title: str, body: list[str]) -> str:
    return (
        f'<!DOCTYPE html><html lang="en"><head><meta charset="utf-8"><title>{html.escape(title)}</title>'
        f"<style>{STYLE}</style></head><body>" + "\n".join(body) + "</body></html>\n"
    )


# ---------------------------------------------------------------------------------------------------
# The run's dashboards


def _documents(store: ActivationStore) -> dict[int, str]:
    """Text index -> text id (the document), where the store records its texts."""
    path = store.path / "texts.jsonl"
    if not path.exists() or path.stat().st_size == 0:
        return {}
    texts = store.texts()
    return dict(zip(texts["index"].astype(int), texts["text_id"].astype(str)))


def _default_features(run: Run, family: str, nfm_seed: int, max_features: int, count_firing) -> tuple[list[int], str]:
    """Stage 05's selective features (interaction, then formality, then emotion; q < the run's ``fdr_q``) when it
    has run, else live features spread over the firing-frequency ranking (:func:`pick_features`)."""
    try:
        effects = run.feature_effects(nfm_seed, family)
    except (StaleArtifactError, FileNotFoundError):
        effects = None
    if effects is not None:
        q = run.params.get("fdr_q", 0.05)
        chosen = []
        for effect in EFFECTS:
            for feature in identification.rank(effects, effect, max_features, q)["feature"].tolist():
                if int(feature) not in chosen:
                    chosen.append(int(feature))
        if chosen:
            return chosen[:max_features], f"features stage 05 found selective (q < {q}: {', '.join(EFFECTS)})"
    counts = count_firing().astype(float)  # counts rank the features as their frequencies do
    chosen = pick_features(counts, max_features, max_frequency=np.inf)
    return chosen, "live features spread over the firing-frequency ranking (stage 05 has not selected any)"


def build_dashboards(
    run: Run,
    which: str = "primary",
    features: list[int] | None = None,
    out_dir: str | Path | None = None,
    nfm_seed: int = 0,
    loaded: models.LoadedModel | None = None,
    split: str = "val",
    max_features: int = 50,
    n_top: int = 10,
    n_bins: int = 4,
    n_per_bin: int = 3,
    sample_size: int = 256,
    window: tuple[int, int] = (10, 5),
    n_neighbours: int = 8,
    n_output_tokens: int = 10,
    batch_size: int = 4096,
    seed: int = 0,
) -> Path:
    """Write the dashboards of ``which`` ("primary" or "secondary", the latter of NFM ``nfm_seed``) features of
    ``run`` over ``split``: ``index.html`` and ``feature_<id>.html`` per feature, in ``out_dir`` (default
    ``runs/<name>/dashboards/primary/`` or ``.../dashboards/secondary/nfm_seed<s>/``). Returns the index's path.

    ``features`` default: stage 05's selective features, else live ones spread over the frequency ranking; at
    most ``max_features`` either way. ``loaded`` is the run's language model (its tokenizer names the tokens, its
    LM head gives the output tokens); default: loaded from the store's manifest on the CPU."""
    if which not in FAMILIES:
        raise ValueError(f"which must be one of {FAMILIES}, got {which!r}")
    started = time.perf_counter()
    store = run.store()
    decomposition = run.decomposition(nfm_seed if which == "secondary" else None)
    sae = decomposition.primary if which == "primary" else decomposition.secondary
    encode = decomposition.primary_code if which == "primary" else decomposition.secondary_code
    n_latents = sae.cfg.n_latents
    if loaded is None and not is_activation_corpus(store.manifest.get("corpus", "")) and store.manifest.get("model"):
        loaded = models.load_model(store.manifest["model"])
    if features is None:
        features, selection = _default_features(
            run, which, nfm_seed, max_features, lambda: firing_counts(encode, store, n_latents, split, batch_size)
        )
    else:
        features, selection = [int(f) for f in dict.fromkeys(features)], "features chosen by the caller"
        if len(features) > max_features:
            print(f"dashboards: {len(features)} features asked for; building the first {max_features} (max_features)")
            features = features[:max_features]
    bad = [f for f in features if not 0 <= f < n_latents]
    if bad:
        raise ValueError(f"features {bad} are not latents of the {which} SAE ({n_latents} latents)")

    stats = collect(
        encode, store, features, n_latents, split, n_top, sample_size, n_bins, n_per_bin, window, batch_size, seed
    )
    token_text = _TokenText(loaded.tokenizer if loaded is not None else None)
    unembedding = None
    if loaded is not None and loaded.is_causal_lm and loaded.model.get_output_embeddings() is not None:
        unembedding = loaded.model.get_output_embeddings().weight.detach().float().cpu()
    if which == "primary":
        output_note = (
            "Direct effect on the logits per unit of activation: decoder direction (raw units) times the unembedding, "
            "through no later block and no final norm."
        )
    else:
        output_note = (
            "Change of the spliced layer output when this feature is clamped to 0 (through the NFM's ReLU and output "
            "layer), per unit of activation over a uniform sample of its firing tokens, times the unembedding; "
            "through no later block and no final norm."
        )
    default_dir = out_dir is None
    out_dir = _default_dir(run, which, nfm_seed) if default_dir else Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("feature_*.html"):  # pages of an earlier build would be linked as if current
        old.unlink()
    ctx = _Context(
        title=f"run {run.root.name}, {which} SAE"
        + (f" of NFM seed {nfm_seed}" if which == "secondary" else "")
        + f" ({n_latents} latents), split {split!r} ({store.n_tokens(split)} tokens)",
        family=which,
        token_text=token_text,
        documents=_documents(store),
        labels={},
        n_neighbours=n_neighbours,
        W_dec=sae.W_dec,
        output_note=output_note,
        # links from a secondary page to primary pages hold only between the default directories
        primary_pages=_default_dir(run, "primary", 0) if which == "secondary" and default_dir else None,
    )
    ctx.labels = {s.feature: label(s, token_text) for s in stats}
    for s in progress(stats, desc=f"{which} dashboard pages", unit="page"):
        outputs, drivers = None, None
        if unembedding is not None:
            if which == "primary":
                direction = sae.W_dec[s.feature].detach().float().cpu() / sae.cfg.input_scale
            else:
                direction = secondary_output_direction(decomposition, store, split, s.feature, s.sample)
            if direction is not None:
                outputs = output_tokens(direction.cpu(), unembedding, n_output_tokens)
        if which == "secondary" and s.top:
            values, indices = _encode_rows(
                decomposition.primary_code, store, split, np.array([e.row for e in s.top]), batch_size
            )
            pairs, _ = secondary_stage.drivers(
                decomposition.nfm, decomposition.secondary, s.feature, list(zip(values, indices))
            )
            drivers = pairs.head(8)
        (out_dir / _page(s.feature)).write_text(_feature_html(s, ctx, outputs, drivers), encoding="utf-8")
    notes = [
        f"Features: {selection}.",
        f"Built in {time.perf_counter() - started:.1f} s.",
    ]
    index = out_dir / "index.html"
    index.write_text(_index_html(stats, ctx, notes), encoding="utf-8")
    return index


def _default_dir(run: Run, which: str, nfm_seed: int) -> Path:
    """``dashboards/primary`` or ``dashboards/secondary/nfm_seed<s>`` (downstream of an NFM, keyed by its seed)."""
    base = run.root / "dashboards"
    return base / "primary" if which == "primary" else base / "secondary" / f"nfm_seed{nfm_seed}"
