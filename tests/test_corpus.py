import json

import pandas as pd
import pytest

from featint_utils.data import corpus
from featint_utils.data.corpus import StimulusError, Text, load_text_file, split_by_group

WIKI = """ = First Article =

 It was a long @-@ running show , first aired in 1990 .

 = = History = =

 The show ran for 1 @,@ 000 episodes .

 = Second Article =

 Another article body .
"""


def test_wikitext_style_file_splits_into_articles(tmp_path):
    path = tmp_path / "wiki.txt"
    path.write_text(WIKI)
    texts = load_text_file(path)
    assert [t.group for t in texts] == ["wiki:0:First Article", "wiki:1:Second Article"]
    assert "long-running show, first aired" in texts[0].text
    assert "1,000 episodes" in texts[0].text and "History" not in texts[0].text


def test_plain_text_splits_at_blank_lines(tmp_path):
    path = tmp_path / "plain.txt"
    path.write_text("one paragraph\nstill one\n\n\nsecond paragraph\n")
    assert [t.text for t in load_text_file(path)] == ["one paragraph\nstill one", "second paragraph"]


def test_jsonl_and_parquet_group_rows_by_document(tmp_path):
    rows = [{"doc_id": "a", "text": "x one"}, {"doc_id": "a", "text": "x two"}, {"doc_id": "b", "text": "y"}]
    (tmp_path / "c.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    pd.DataFrame(rows).to_parquet(tmp_path / "c.parquet")
    for name in ("c.jsonl", "c.parquet"):
        texts = load_text_file(tmp_path / name)
        assert [(t.group, t.text) for t in texts] == [("c:a", "x one\nx two"), ("c:b", "y")]


@pytest.mark.parametrize(
    "name, content, error, match",
    [
        ("empty.txt", "\n\n  \n", ValueError, "holds no text"),
        ("bad.txt", b"\xff\xfe\x00bad", ValueError, "not UTF-8"),
        ("notext.jsonl", '{"body": "x"}\n', ValueError, "no 'text' column"),
        ("data.csv", "text\nx\n", ValueError, "unsupported corpus file type"),
    ],
)
def test_unusable_corpus_files_are_clear_errors(tmp_path, name, content, error, match):
    path = tmp_path / name
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    with pytest.raises(error, match=match):
        load_text_file(path)


def test_missing_corpus_file_and_empty_spec():
    with pytest.raises(FileNotFoundError, match="does not exist"):
        corpus.load_corpus("/nonexistent/corpus.txt")
    with pytest.raises(ValueError, match="corpus spec is empty"):
        corpus.load_corpus("  ")


def test_split_never_puts_a_group_on_both_sides_and_is_seeded():
    texts = [Text(f"g{g}/{v}", f"g{g}", f"text {g} {v}") for g in range(50) for v in range(4)]
    split = split_by_group(texts, 0.2, seed=3)
    train_groups, val_groups = {t.group for t in split.train}, {t.group for t in split.val}
    assert not train_groups & val_groups
    assert len(val_groups) == 10 and len(train_groups) == 40
    assert len(split.train) + len(split.val) == len(texts)
    assert split.record() == split_by_group(texts, 0.2, seed=3).record()
    assert split.record()["val_groups"] != split_by_group(texts, 0.2, seed=4).record()["val_groups"]
    small = split_by_group(texts, 0.5, seed=0, max_groups=6)
    assert len({t.group for t in small.train}) == 3 and len({t.group for t in small.val}) == 3


def test_split_needs_a_group_on_each_side():
    with pytest.raises(ValueError, match="at least one group on each side"):
        split_by_group([Text("a", "a", "x")], 0.2, seed=0)
    with pytest.raises(ValueError, match="val_fraction"):
        split_by_group([Text("a", "a", "x"), Text("b", "b", "y")], 1.5, seed=0)


def _write_stimuli(tmp_path, rows):
    path = tmp_path / "stimuli.csv"
    pd.DataFrame(rows, columns=list(corpus.STIMULUS_COLUMNS)).to_csv(path, index=False)
    return path


def _item(item_id, texts=("a b c d e f", "g h i j k l", "m n o p q r", "s t u v w x")):
    conds = [("formal", "neutral"), ("formal", "emotional"), ("casual", "neutral"), ("casual", "emotional")]
    return [
        [item_id, "work", f, e, "positive" if e == "emotional" else "neutral", f"{item_id} {t}"]
        for (f, e), t in zip(conds, texts)
    ]


def test_stimulus_validation_names_the_problem(tmp_path):
    good = _item("w1") + _item("w2")
    assert len(corpus.load_stimuli(_write_stimuli(tmp_path, good))) == 8
    bad_label = [r[:] for r in good]
    bad_label[3][2] = "formall"
    with pytest.raises(StimulusError, match=r"unknown formality \['formall'\] on line\(s\) 5"):
        corpus.load_stimuli(_write_stimuli(tmp_path, bad_label))
    with pytest.raises(StimulusError, match="'w2' has only"):
        corpus.load_stimuli(_write_stimuli(tmp_path, good[:-1]))
    empty = [r[:] for r in good]
    empty[1][5] = "  "
    with pytest.raises(StimulusError, match=r"empty text on line\(s\) 3"):
        corpus.load_stimuli(_write_stimuli(tmp_path, empty))
    dup = [r[:] for r in good]
    dup[5][5] = dup[0][5]
    with pytest.raises(StimulusError, match="duplicate texts"):
        corpus.load_stimuli(_write_stimuli(tmp_path, dup))


def test_max_items_keeps_the_first_items_whole(tmp_path):
    path = _write_stimuli(tmp_path, _item("w3") + _item("w1") + _item("w2"))
    first = corpus.load_stimuli(path, max_items=2)
    assert sorted(first["item_id"].unique()) == ["w1", "w2"] and len(first) == 8  # all four variants of each
    assert list(first.index) == list(range(8))
    assert len(corpus.load_stimuli(path, max_items=0)) == len(corpus.load_stimuli(path, max_items=5)) == 12
    with pytest.raises(ValueError, match="max_items must be 0"):
        corpus.load_stimuli(path, max_items=-1)


def test_stimulus_texts_group_the_four_variants_of_an_item(tmp_path):
    texts = corpus.stimulus_texts(corpus.load_stimuli(_write_stimuli(tmp_path, _item("w1") + _item("w2"))))
    assert [t.group for t in texts] == ["w1"] * 4 + ["w2"] * 4
    assert texts[1].text_id == "w1/formal_emotional"


def test_missing_local_corpus_names_the_environment_variables(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(FileNotFoundError) as info:
        corpus.load_corpus("../shared/data/wikitext-9/valid.txt")  # as a mistyped minilm-wikitext path
    message = str(info.value)
    looked_at = (corpus.REPOSITORY / "../shared/data/wikitext-9/valid.txt").resolve()  # not the working directory
    assert f"corpus file {str(looked_at)!r} does not exist (a relative path is read from the repository)" in message
    assert "export FEATINT_WIKITEXT=" in message and "export FEATINT_CORPUS=" in message


def test_hub_dataset_that_cannot_be_reached_names_featint_corpus(monkeypatch):
    # HF_HUB_OFFLINE=1 keeps it fast and deterministic; both libraries read it at import, so their constants are set
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError) as info:
        corpus.load_corpus("hf:featint-tests/uncached-corpus:default:train")  # a name no cache holds
    message = str(info.value)
    assert message.startswith("could not load dataset 'featint-tests/uncached-corpus:default:train' from the Hugging")
    assert "the Hub cannot be reached (HF_HUB_OFFLINE is set)" in message
    assert "hf download --repo-type dataset featint-tests/uncached-corpus" in message
    assert "`export FEATINT_CORPUS=/path/to/corpus.txt`" in message


def test_a_hub_corpus_with_max_documents_is_streamed_and_read_no_further_than_needed(monkeypatch):
    """The real loader with the Hub replaced by a local stream of WikiText-style rows: 200 articles of 30 rows,
    of which 5 are asked for."""
    import datasets

    consumed, asked = [], {}

    def rows():
        for article in range(200):
            for row in range(30):
                consumed.append(1)
                yield {
                    "text": f" = Article {article} = \n" if row == 0 else f" Sentence {row} of article {article} .\n"
                }

    def fake_load_dataset(name, config, split, streaming):
        asked.update(name=name, config=config, split=split, streaming=streaming)
        return rows()

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    texts = corpus.load_corpus("hf:Salesforce/wikitext:wikitext-103-raw-v1:train", max_documents=5)
    assert asked == {
        "name": "Salesforce/wikitext",
        "config": "wikitext-103-raw-v1",
        "split": "train",
        "streaming": True,
    }
    assert [t.group.split(":")[-1] for t in texts] == [f"Article {i}" for i in range(5)]
    assert all(t.text.count("Sentence") == 29 for t in texts)  # complete articles, not cut at the stop
    assert len(consumed) < 200 * 30 / 2  # stopped early: the stream was not read to its end


def test_a_relative_corpus_path_is_read_from_the_repository_whatever_the_working_directory(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # as a notebook opened from notebooks/ in JupyterLab
    texts = corpus.load_corpus("data/wordlists/prompt_frames.txt")
    assert texts and texts[0].group.startswith("prompt_frames")
