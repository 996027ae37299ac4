"""Feature dashboards as static HTML (after sae_vis and Neuronpedia, offline): one self-contained page per feature
and an index, built from a run's activation store.

A page shows the feature's label (its most common firing tokens among its top examples), firing frequency, a
histogram of its nonzero activations (inline SVG), its top activating tokens and a few from each quantile bin of
its activation, each in a token window of its document with every token shaded by the feature's activation, its
decoder neighbours (highest cosine of decoder rows), and for causal LMs the output tokens it boosts and
suppresses. Pages hold no scripts and load nothing: they open from disk, anywhere.

The numbers on a page come from :mod:`featint_utils.workbench.feature_stats`.
"""

from __future__ import annotations

import html
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from ..data import models
from ..data.activation_store import ActivationStore, is_activation_corpus
from ..dictionary.feature_labels import token_summary
from ..dictionary.features import pick_features
from ..integration import identification
from ..integration import secondary as secondary_stage
from ..progress import progress
from .feature_stats import (
    EFFECTS,
    FAMILIES,
    Example,
    FeatureStats,
    collect,
    decoder_neighbours,
    encode_rows,
    firing_counts,
    output_tokens,
    secondary_output_direction,
)
from .run import Run, StaleArtifactError

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
    (:func:`featint_utils.dictionary.feature_labels.token_summary`)."""
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
            values, indices = encode_rows(
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
