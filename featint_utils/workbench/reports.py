"""Shareable reports of a run: each executed notebook as an HTML page with a provenance header, and an index.

A report is read by someone who did not run it, so every page says what produced it (profile, the parameters
that differ from the defaults, commit, date, wall time) in a header cell, has the stage's title instead of
nbconvert's "Notebook", and shows results only: code inputs, progress-bar text (stderr) and widget views are
left out. ``index.html`` links the stages with their status, wall time and headline numbers from
``metrics.json``. The one-line stage summaries the runner prints come from the same headlines.
"""

from __future__ import annotations

import html
import re
from datetime import datetime
from pathlib import Path

import nbformat

from .. import params
from ..io import read_json

HEADER_TAG = "featint-header"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

# The headline numbers of each stage: (metrics section, key, label, format). 00 and 02 write no section:
# their headline comes from the store's manifest and the ladder table (see ``stage_summary``).
HEADLINES = {
    "01_primary_sae": [
        ("primary_sae", "fvu", "held-out FVU", ".3f"),
        ("primary_sae", "dead_fraction", "dead latents", ".1%"),
        ("primary_sae", "cosine_spliced", "spliced-output cosine", ".3f"),
    ],
    "03_contributions": [
        ("contributions", "interaction_share.over_linear.mean", "interaction share over linear", ".4f"),
        ("contributions", "interaction_share.over_linear.ci_low", "CI low", ".4f"),
        ("contributions", "interaction_share.over_linear.ci_high", "CI high", ".4f"),
        ("contributions", "detection_limit", "detection limit", ".4f"),
        ("contributions", "absorbed_fraction", "absorbed fraction", ".2f"),
        ("contributions", "conjunction_latents", "conjunction latents", "d"),
    ],
    "04_secondary_sae": [
        ("secondary_sae", "fvu", "held-out FVU", ".3f"),
        ("secondary_sae", "dead_fraction", "dead latents", ".1%"),
    ],
    "05_feature_identification": [
        ("identification", "primary.interaction_selective", "interaction-selective primary", "d"),
        ("identification", "primary_pre.interaction_selective", "its pre-activations", "d"),
        ("identification", "secondary.interaction_selective", "interaction-selective secondary", "d"),
        ("identification", "secondary.interaction_replicated", "replicated (secondary)", "d"),
    ],
    "06_clamping": [("clamping", "features", "clamped features", "")],
}


def _format(value, fmt: str) -> str:
    if value is None:
        return "undefined"
    if isinstance(value, list):
        return ", ".join(str(v) for v in value)
    try:
        return format(value, fmt)
    except (TypeError, ValueError):
        return str(value)


def headline(root: Path, stage: str) -> list[tuple[str, str]]:
    """``(label, formatted value)`` of the stage's headline numbers as the run directory holds them now."""
    root = Path(root)
    if stage == "00_activations":
        manifest_path = root / "activations" / "manifest.json"
        if not manifest_path.exists():
            return []
        manifest = read_json(manifest_path)
        splits = manifest.get("splits", {})
        return [
            ("train tokens", f"{splits.get('train', {}).get('n_tokens', 0):,}"),
            ("val tokens", f"{splits.get('val', {}).get('n_tokens', 0):,}"),
            ("width", str(manifest.get("d_model", "?"))),
        ]
    if stage == "02_nfm":
        ladder = root / "nfm" / "ladder.csv"
        if not ladder.exists():
            return []
        import pandas as pd

        table = pd.read_csv(ladder)
        return [("models fitted", str(len(table)))]
    metrics = read_json(root / "metrics.json") if (root / "metrics.json").exists() else {}
    out = []
    for section, key, label, fmt in HEADLINES.get(stage, []):
        if key in metrics.get(section, {}):
            out.append((label, _format(metrics[section][key], fmt)))
    return out


def stage_summary(root: Path, stage: str) -> str:
    """One line: the stage's headline numbers (empty when it has none)."""
    return ", ".join(f"{label} {value}" for label, value in headline(root, stage))


def notebook_title(nb) -> str:
    """The first markdown heading (``# 02 · ...``), else nothing."""
    for cell in nb.cells:
        if cell.cell_type == "markdown":
            match = re.search(r"^#\s+(.+)$", cell.source, flags=re.MULTILINE)
            if match:
                return match.group(1).strip()
    return ""


def changed_parameters(stage: str | None, values: dict) -> dict:
    """The parameters of ``stage`` (None: of every stage) whose value differs from the shared default
    (``run_dir`` excluded)."""
    declared = params.PARAMETERS.get(stage, {}) if stage else params.all_parameters()
    return {k: v for k, v in values.items() if k in declared and v != declared[k].default}


def header_markdown(provenance: dict) -> str:
    """The header cell's text: what produced this notebook."""
    changed = provenance.get("changed", {})
    settings = ", ".join(f"`{k}={v!r}`" for k, v in sorted(changed.items())) or "the defaults"
    commit = provenance.get("git_commit") or "unknown"
    return (
        f"**featint run `{provenance['run']}`** · profile `{provenance['profile']}` · stage "
        f"`{provenance['stage']}`  \n"
        f"parameters (beside the shared defaults): {settings}  \n"
        f"commit `{commit[:12]}` · finished {provenance['finished']} UTC · wall time "
        f"{format_seconds(provenance['seconds'])}"
    )


def add_header(executed: Path, provenance: dict) -> None:
    """Put the provenance header cell at the top of an executed notebook (replacing an earlier one) and
    give the notebook its title."""
    nb = nbformat.read(executed, as_version=4)
    nb.cells = [c for c in nb.cells if HEADER_TAG not in c.metadata.get("tags", [])]
    cell = nbformat.v4.new_markdown_cell(header_markdown(provenance), metadata={"tags": [HEADER_TAG]})
    nb.cells.insert(0, cell)
    nb.metadata["title"] = f"{notebook_title(nb) or provenance['stage']} · featint {provenance['run']}"
    nbformat.write(nb, executed)


def without_noise(nb):
    """The notebook without what a reader should not see: stderr streams (progress-bar text) and widget views
    (a saved widget has no live kernel to draw it; its text fallback stays)."""
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for output in cell.get("outputs", []):
            if output.get("output_type") == "stream" and output.get("name") == "stderr":
                continue
            if output.get("output_type") in ("display_data", "execute_result") and WIDGET_VIEW in output.get(
                "data", {}
            ):
                output["data"].pop(WIDGET_VIEW)
                if not output["data"]:
                    continue
            kept.append(output)
        cell["outputs"] = kept
    return nb


def render_report(executed: Path, html_path: Path) -> None:
    """HTML of an executed notebook: inputs hidden, noise removed, titled after the notebook."""
    from nbconvert import HTMLExporter

    nb = without_noise(nbformat.read(executed, as_version=4))
    if "title" not in nb.metadata:
        nb.metadata["title"] = notebook_title(nb) or Path(executed).stem
    exporter = HTMLExporter(exclude_input=True, exclude_input_prompt=True, exclude_output_prompt=True)
    body, _ = exporter.from_notebook_node(nb)
    html_path.parent.mkdir(parents=True, exist_ok=True)
    html_path.write_text(body, encoding="utf-8")


def format_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    seconds = int(round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{seconds // 60} min {seconds % 60:02d} s"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


_INDEX_STYLE = """
body { font-family: system-ui, sans-serif; max-width: 60rem; margin: 2rem auto; padding: 0 1rem; color: #222; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: .4rem .6rem; border-bottom: 1px solid #ddd; vertical-align: top; }
th { background: #f4f4f4; }
.failed { color: #b00020; } .ok { color: #1b5e20; }
code { background: #f4f4f4; padding: 0 .2rem; }
"""


def write_index(root: Path) -> Path:
    """``reports/index.html``: the run's stages, each with its status, wall time, headline numbers and a link
    to its report; the profile, commit and non-default parameters of the last attempt."""
    root = Path(root)
    record = read_json(root / "run.json") if (root / "run.json").exists() else {"stages": {}, "attempts": []}
    last = record["attempts"][-1] if record.get("attempts") else {}
    rows = []
    for stage in params.STAGES:
        done = record.get("stages", {}).get(stage)
        report = root / "reports" / f"{stage}.html"
        if done is None and not report.exists():
            continue
        title = stage
        executed = root / "notebooks" / f"{stage}.ipynb"
        if executed.exists():
            title = notebook_title(nbformat.read(executed, as_version=4)) or stage
        link = f'<a href="{stage}.html">{html.escape(title)}</a>' if report.exists() else html.escape(title)
        numbers = "<br>".join(f"{html.escape(k)}: <b>{html.escape(v)}</b>" for k, v in headline(root, stage))
        status = (done or {}).get("status", "not run")
        rows.append(
            f"<tr><td>{link}</td><td class='{status}'>{status}</td>"
            f"<td>{format_seconds((done or {}).get('seconds'))}</td><td>{numbers}</td></tr>"
        )
    changed = changed_parameters(None, last.get("parameters", {}))
    settings = ", ".join(f"<code>{html.escape(f'{k}={v!r}')}</code>" for k, v in sorted(changed.items()))
    commit = (last.get("git_commit") or "unknown")[:12]
    when = last.get("finished") or last.get("started") or datetime.now().isoformat(timespec="seconds")
    page = f"""<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>featint run {html.escape(root.name)}</title>
<style>{_INDEX_STYLE}</style></head><body>
<h1>featint run <code>{html.escape(root.name)}</code></h1>
<p>profile <code>{html.escape(str(last.get("profile", "?")))}</code> · commit <code>{commit}</code> ·
last attempt {html.escape(str(last.get("status", "?")))} at {html.escape(when)} UTC</p>
<p>parameters beside the shared defaults: {settings or "none"}</p>
<table><tr><th>stage</th><th>status</th><th>wall time</th><th>headline</th></tr>
{"".join(rows)}
</table></body></html>
"""
    out = root / "reports" / "index.html"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out
