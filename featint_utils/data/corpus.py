"""Texts for extraction: the project's stimulus set, local files, or a Hugging Face dataset; and their split.

Every text belongs to a *group*, the unit that train/validation splits never cut: a document of a corpus,
or a stimulus item (its four register x affect variants stay together).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..io import REPOSITORY, from_repository

DATA_DIR = REPOSITORY / "data"
STIMULI_CSV = DATA_DIR / "stimuli" / "stimuli.csv"
MINIMAL_PAIRS_CSV = DATA_DIR / "stimuli" / "minimal_pairs.csv"
"""Token-aligned 2x2s for MiniLM's tokenizer: each item's variants differ in one formality and one emotion word."""
WORDLISTS_DIR = DATA_DIR / "wordlists"

FORMALITIES = ("formal", "casual")
EMOTIONS = ("emotional", "neutral")
CONDITIONS = tuple(f"{f}_{e}" for f in FORMALITIES for e in EMOTIONS)
STIMULUS_COLUMNS = ("item_id", "topic", "formality", "emotion", "valence", "text")


@dataclass(frozen=True)
class Text:
    """One text to run through the model."""

    text_id: str
    """Unique id (a stimulus variant ``item/condition``, or ``document#index``)."""
    group: str
    """Split unit: the document or stimulus item this text belongs to."""
    text: str
    """The text itself."""


# ---------------------------------------------------------------------------------------------------
# Stimulus set and word lists


class StimulusError(ValueError):
    """The stimulus file breaks the set's rules; the message names the rows."""


def load_stimuli(path: str | Path = STIMULI_CSV, max_items: int = 0) -> pd.DataFrame:
    """The register x affect stimulus set, validated: one row per variant, four variants per item; with
    ``max_items``, only the first that many items (by item id), all four variants of each."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"stimulus file {str(path)!r} does not exist")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    missing = [c for c in STIMULUS_COLUMNS if c not in df.columns]
    if missing:
        raise StimulusError(f"{path.name}: missing columns {missing}; expected at least {list(STIMULUS_COLUMNS)}")
    rows = lambda mask: ", ".join(str(i + 2) for i in np.flatnonzero(mask)[:10])  # noqa: E731 (file lines)
    for column, allowed in (("formality", FORMALITIES), ("emotion", EMOTIONS)):
        bad = ~df[column].isin(allowed)
        if bad.any():
            values = sorted(set(df.loc[bad, column]))
            raise StimulusError(
                f"{path.name}: unknown {column} {values} on line(s) {rows(bad)}; allowed: {list(allowed)}"
            )
    empty = df["text"].str.strip() == ""
    if empty.any():
        raise StimulusError(f"{path.name}: empty text on line(s) {rows(empty)}")
    empty_id = df["item_id"].str.strip() == ""
    if empty_id.any():
        raise StimulusError(f"{path.name}: empty item_id on line(s) {rows(empty_id)}")
    df["condition"] = df["formality"] + "_" + df["emotion"]
    dup = df.duplicated(["item_id", "condition"], keep=False)
    if dup.any():
        raise StimulusError(f"{path.name}: item/condition repeated on line(s) {rows(dup)}")
    per_item = df.groupby("item_id")["condition"].apply(frozenset)
    incomplete = per_item[per_item != frozenset(CONDITIONS)]
    if len(incomplete):
        item = incomplete.index[0]
        have = sorted(incomplete.iloc[0])
        raise StimulusError(
            f"{path.name}: {len(incomplete)} item(s) lack some of the four variants, e.g. {item!r} has "
            f"only {have}; every item needs {list(CONDITIONS)}"
        )
    dup_text = df["text"].duplicated(keep=False)
    if dup_text.any():
        raise StimulusError(f"{path.name}: duplicate texts on line(s) {rows(dup_text)}")
    return first_items(df, max_items)


def first_items(stimuli: pd.DataFrame, max_items: int = 0) -> pd.DataFrame:
    """The first ``max_items`` items of a stimulus set (by item id), all four variants of each (0: all)."""
    if max_items < 0:
        raise ValueError(f"max_items must be 0 (all items) or more, got {max_items}")
    if not max_items:
        return stimuli
    kept = stimuli["item_id"].isin(sorted(stimuli["item_id"].unique())[:max_items])
    return stimuli[kept].reset_index(drop=True)


def stimulus_texts(df: pd.DataFrame) -> list[Text]:
    """The stimulus rows as texts grouped by item."""
    return [Text(f"{r.item_id}/{r.condition}", r.item_id, r.text) for r in df.itertuples()]


def load_wordlists(directory: str | Path = WORDLISTS_DIR) -> dict[str, list[str]]:
    """The four condition word buckets for next-token readouts, keyed by condition (``formal_neutral``...)."""
    df = pd.read_csv(Path(directory) / "words.csv", dtype=str, keep_default_na=False)
    unknown = sorted(set(df["bucket"]) - set(CONDITIONS))
    if unknown:
        raise StimulusError(f"words.csv: unknown bucket(s) {unknown}; allowed: {list(CONDITIONS)}")
    return {c: df.loc[df["bucket"] == c, "word"].tolist() for c in CONDITIONS}


def load_prompt_frames(directory: str | Path = WORDLISTS_DIR) -> list[str]:
    """Neutral prompt frames after which any bucket word could follow."""
    lines = (Path(directory) / "prompt_frames.txt").read_text().splitlines()
    return [line for line in lines if line.strip()]


# ---------------------------------------------------------------------------------------------------
# Corpora

_WIKITEXT_TITLE = re.compile(r"^\s*= [^=].* =\s*$")


def _wikitext_detokenize(text: str) -> str:
    for marker, char in ((" @-@ ", "-"), (" @,@ ", ","), (" @.@ ", ".")):
        text = text.replace(marker, char)
    return re.sub(r" ([.,;:!?)'])", r"\1", text).replace("( ", "(")


def _documents_from_lines(lines: list[str], name: str) -> list[tuple[str, str]]:
    """(document id, text) pairs. WikiText-style files split at ``= Title =`` article headers (text
    detokenised); any other text splits at blank lines."""
    if any(_WIKITEXT_TITLE.match(line) for line in lines):
        docs: list[tuple[str, list[str]]] = []
        for line in lines:
            if _WIKITEXT_TITLE.match(line):
                docs.append((line.strip(" =\n"), []))
            elif line.strip() and docs and not line.lstrip().startswith("= "):
                docs[-1][1].append(_wikitext_detokenize(line.strip()))
        return [(f"{name}:{i}:{title}", "\n".join(paras)) for i, (title, paras) in enumerate(docs) if paras]
    blocks = re.split(r"\n\s*\n", "\n".join(lines))
    return [(f"{name}:{i}", block.strip()) for i, block in enumerate(blocks) if block.strip()]


def _texts_from_documents(docs: list[tuple[str, str]]) -> list[Text]:
    return [Text(doc_id, doc_id, text) for doc_id, text in docs]


def load_text_file(path: str | Path) -> list[Text]:
    """Documents of a local ``.txt`` / ``.jsonl`` / ``.parquet`` file (one group per document).

    ``.jsonl`` and ``.parquet`` need a ``text`` column; an ``id``, ``doc_id`` or ``title`` column, if present,
    groups rows into documents.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"corpus file {str(path)!r} does not exist (a relative path is read from the repository). Profiles "
            "read the corpus path from FEATINT_CORPUS "
            "(minilm-wikitext: FEATINT_WIKITEXT); point it at an existing .txt/.jsonl/.parquet file, e.g. "
            "`export FEATINT_WIKITEXT=/path/to/wikitext-2/valid.txt` or `export FEATINT_CORPUS=/path/to/corpus.txt`"
        )
    suffix = path.suffix.lower()
    try:
        if suffix == ".txt":
            docs = _documents_from_lines(path.read_text(encoding="utf-8").splitlines(), path.stem)
        elif suffix in (".jsonl", ".parquet"):
            if suffix == ".jsonl":
                df = pd.DataFrame(
                    [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
                )
            else:
                df = pd.read_parquet(path)
            if "text" not in df.columns:
                raise ValueError(f"corpus {path.name} has no 'text' column (columns: {list(df.columns)})")
            key = next((c for c in ("doc_id", "id", "title") if c in df.columns), None)
            ids = df[key].astype(str) if key else pd.Series(range(len(df))).astype(str)
            df = df.assign(_doc=path.stem + ":" + ids)[["_doc", "text"]].dropna()
            df = df[df["text"].astype(str).str.strip() != ""]
            docs = [(doc, "\n".join(g["text"].astype(str))) for doc, g in df.groupby("_doc", sort=False)]
        else:
            raise ValueError(f"unsupported corpus file type {suffix!r} ({path.name}); use .txt, .jsonl or .parquet")
    except UnicodeDecodeError as err:
        raise ValueError(f"corpus {str(path)!r} is not UTF-8 text: {err}") from err
    if not docs:
        raise ValueError(f"corpus {str(path)!r} holds no text")
    return _texts_from_documents(docs)


def _hub_dataset_error(spec: str, name: str, err: Exception) -> OSError:
    """What failed loading hub dataset ``spec`` and how to point the run at a local copy instead."""
    from .models import hub_failure_reason  # one wording for models and corpora

    return OSError(
        f"could not load dataset {spec!r} from the Hugging Face Hub: {hub_failure_reason(err)}. Download it where "
        f"the Hub is reachable (`hf download --repo-type dataset {name} --local-dir /path/to/data`), copy its text "
        "to a local .txt/.jsonl/.parquet file and point FEATINT_CORPUS at it: "
        "`export FEATINT_CORPUS=/path/to/corpus.txt`"
    )


def load_hf_dataset(spec: str, max_documents: int | None = None) -> list[Text]:
    """``NAME[:CONFIG[:SPLIT]]`` from the Hugging Face Hub (needs network and the ``datasets`` package).

    With ``max_documents`` the dataset is streamed and reading stops once that many documents are complete: the
    first ``max_documents`` documents of the split, without downloading the rest (WikiText-103's train split
    is 500 MB for the 300 articles a profile keeps). Without it the whole split is loaded.

    A dataset that cannot be loaded (no network) is an OSError that says how to use a local file (``FEATINT_CORPUS``).
    """
    name, config, split = (spec.split(":") + [None, None])[:3]
    try:
        import datasets
    except ImportError as err:
        raise ImportError("Hugging Face datasets need `pip install datasets`") from err
    label = name.replace("/", "_")
    try:
        ds = datasets.load_dataset(name, config, split=split or "train", streaming=max_documents is not None)
        if max_documents is None:
            docs = _documents_from_lines([line.rstrip("\n") for line in ds["text"]], label)
        else:
            docs = _first_documents((row["text"].rstrip("\n") for row in ds), label, max_documents)
    except Exception as err:  # datasets raises ConnectionError offline, DatasetNotFoundError, ValueError (config)...
        raise _hub_dataset_error(spec, name, err) from err
    if not docs:
        raise ValueError(f"dataset {spec!r} holds no text")
    return _texts_from_documents(docs)


def _first_documents(lines, name: str, n: int, check_every: int = 2_000) -> list[tuple[str, str]]:
    """The first ``n`` complete documents of a stream of lines, reading no further than needed: a document is
    complete once the next one has begun (or the stream has ended)."""
    read: list[str] = []
    next_check = check_every
    for line in lines:
        read.append(line)
        if len(read) == next_check:
            if len(_documents_from_lines(read, name)) > n:
                break
            # checks spaced by a quarter of what was read: parsing stays linear overall, reading ends <25% late
            next_check += max(check_every, len(read) // 4)
    return _documents_from_lines(read, name)[:n]


def load_corpus(spec: str, max_documents: int | None = None, stimuli: pd.DataFrame | None = None) -> list[Text]:
    """Texts named by a spec: ``"stimuli"`` (``stimuli``, the model's own set, or else the project's), a file
    path, or ``"hf:NAME[:CONFIG[:SPLIT]]"``.

    ``max_documents`` streams a Hub dataset and stops after that many documents; local files are read whole (the
    split then keeps a seeded random subset). A relative path is from the repository (as the runner's kernels
    see it), so a notebook opened in JupyterLab from ``notebooks/`` reads the same file.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("corpus spec is empty: use 'stimuli', a .txt/.jsonl/.parquet path, or 'hf:NAME'")
    if spec == "stimuli":
        return stimulus_texts(load_stimuli() if stimuli is None else stimuli)
    if spec.startswith("hf:"):
        return load_hf_dataset(spec[3:], max_documents)
    return load_text_file(from_repository(spec))


# ---------------------------------------------------------------------------------------------------
# Splits


@dataclass(frozen=True)
class Split:
    """A seeded split of texts by group, with what is needed to reproduce and audit it."""

    train: list[Text]
    val: list[Text]
    seed: int
    val_fraction: float

    def record(self) -> dict:
        """JSON-able description: seed, fraction, and the groups on each side."""
        return {
            "seed": self.seed,
            "val_fraction": self.val_fraction,
            "train_groups": sorted({t.group for t in self.train}),
            "val_groups": sorted({t.group for t in self.val}),
        }


def split_by_group(texts: list[Text], val_fraction: float, seed: int, max_groups: int | None = None) -> Split:
    """Split texts so that no group (document / stimulus item) is on both sides.

    ``max_groups`` keeps a seeded random subset of the groups first (to size a run).
    """
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
    groups = list(dict.fromkeys(t.group for t in texts))
    rng = np.random.default_rng(seed)
    order = [groups[i] for i in rng.permutation(len(groups))]
    if max_groups is not None:
        order = order[:max_groups]
    n_val = math.ceil(val_fraction * len(order))
    if len(order) < 2 or n_val >= len(order):
        raise ValueError(
            f"cannot split {len(order)} group(s) with val_fraction={val_fraction}: need at least one "
            "group on each side (use more documents or a smaller val_fraction)"
        )
    val_groups = set(order[:n_val])
    kept = set(order)
    train = [t for t in texts if t.group in kept and t.group not in val_groups]
    val = [t for t in texts if t.group in val_groups]
    return Split(train, val, seed, val_fraction)
