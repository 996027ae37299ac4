"""Reports and live progress: the terminal line of a running stage, headless detection under papermill, the
report's noise filter, header and index."""

import io
import json
import time
from pathlib import Path

import nbformat
import pytest

from featint_utils import progress
from featint_utils.workbench import live, reports


def test_the_inner_bar_is_read_from_the_newest_tqdm_state_in_a_chunk():
    chunk = (
        "fit, lr 0.003:   0%|          | 0/40 [00:00<?, ?epoch/s]\r"
        "fit, lr 0.003:  30%|###       | 12/40 [00:05<00:11, 2.40epoch/s, best=11]\n"
    )
    assert live.inner_status(chunk) == "fit, lr 0.003 12/40 epoch"
    slow = "planted interactions:  50%|#####     | 2/4 [01:02<01:02, 31.2s/size]"
    assert live.inner_status(slow) == "planted interactions 2/4 size"
    assert live.inner_status("train SAE:   0%|          | 0/244 [00:00<?, ?step/s]") == "train SAE 0/244 step"
    assert live.inner_status("resuming after epoch 3\n") == "resuming after epoch 3"
    assert live.inner_status("\n\r") is None


def test_a_stage_line_shows_its_place_elapsed_time_against_the_last_run_and_the_inner_bar():
    out = io.StringIO()
    stage = live.StageProgress(2, 7, "01_primary_sae", expected_seconds=100.0, stream=out, interval=0.05)
    with stage:
        stage.write("train SAE:  50%|#####     | 122/244 [00:10<00:10, 12.0step/s]")
        time.sleep(0.2)
    lines = out.getvalue().splitlines()
    assert len(lines) >= 3  # drawn at the start and then on every tick (not a terminal: one line each)
    assert lines[-1].startswith("[2/7] 01_primary_sae  0:00 / ~1:40  [------------]")
    assert lines[-1].endswith("train SAE 122/244 step")
    summary = stage.finished(83.0, "held-out FVU 0.200")
    assert summary == "[2/7] 01_primary_sae  done in 1:23 (last time 1:40) · held-out FVU 0.200"
    first = live.StageProgress(1, 1, "00_activations", expected_seconds=None, stream=io.StringIO())
    assert "first run: no estimate" in first.line()


def test_a_kernel_started_by_papermill_is_headless_without_being_told(tmp_path, monkeypatch):
    """No FEATINT_HEADLESS, no CI: the kernel recognises nbclient by its in-memory history."""
    import papermill

    monkeypatch.delenv("FEATINT_HEADLESS", raising=False)
    monkeypatch.delenv("CI", raising=False)
    nb = nbformat.v4.new_notebook(
        cells=[nbformat.v4.new_code_cell("from featint_utils.progress import headless\nprint(headless())")]
    )
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    papermill.execute_notebook(nb, str(tmp_path / "out.ipynb"), kernel_name="python3", progress_bar=False)
    outputs = nbformat.read(tmp_path / "out.ipynb", as_version=4).cells[0].outputs
    assert outputs[0]["text"].strip() == "True"


def test_a_kernel_of_a_jupyter_server_is_not_headless(monkeypatch):
    """The same check on the shell a Jupyter server's kernel has (history in a file)."""
    monkeypatch.delenv("FEATINT_HEADLESS", raising=False)

    class History:
        hist_file = Path("/home/user/.ipython/profile_default/history.sqlite")

    class ZMQInteractiveShell:
        history_manager = History()

    assert not progress.executed_by_nbclient(ZMQInteractiveShell())
    History.hist_file = ":memory:"
    assert progress.executed_by_nbclient(ZMQInteractiveShell())
    monkeypatch.setenv("FEATINT_HEADLESS", "1")
    assert progress.headless()


def _executed_notebook(path: Path) -> Path:
    nb = nbformat.v4.new_notebook()
    nb.cells = [
        nbformat.v4.new_markdown_cell("# 01 · Primary sparse autoencoder\n\nWhy."),
        nbformat.v4.new_code_cell(
            "train()",
            outputs=[
                nbformat.v4.new_output("stream", name="stderr", text="train SAE: 100%|##########| 244/244\n"),
                nbformat.v4.new_output("stream", name="stdout", text="trained\n"),
                nbformat.v4.new_output(
                    "display_data",
                    data={reports.WIDGET_VIEW: {"model_id": "abc"}, "text/plain": "HBox(children=...)"},
                ),
                nbformat.v4.new_output("display_data", data={reports.WIDGET_VIEW: {"model_id": "def"}}),
            ],
        ),
    ]
    nbformat.write(nb, path)
    return path


def test_a_report_leaves_out_stderr_and_widget_views_and_carries_its_title_and_header(tmp_path):
    executed = _executed_notebook(tmp_path / "01_primary_sae.ipynb")
    provenance = {
        "run": "my-run",
        "profile": "embedded",
        "stage": "01_primary_sae",
        "changed": reports.changed_parameters("01_primary_sae", {"sae_k": 16, "sae_latents": 4096, "run_dir": "x"}),
        "git_commit": "0123456789abcdef",
        "finished": "2026-12-01 05:00:00",
        "seconds": 83.4,
    }
    reports.add_header(executed, provenance)
    reports.add_header(executed, provenance)  # a second execution replaces the header, not adds one
    nb = nbformat.read(executed, as_version=4)
    headers = [c for c in nb.cells if reports.HEADER_TAG in c.metadata.get("tags", [])]
    assert len(headers) == 1 and nb.cells[0] is headers[0]
    assert "`sae_k=16`" in headers[0].source and "sae_latents" not in headers[0].source  # only what differs
    assert "0123456789ab" in headers[0].source and "1 min 23 s" in headers[0].source
    cleaned = reports.without_noise(nbformat.read(executed, as_version=4))
    outputs = cleaned.cells[2].outputs
    assert [o.get("name", o["output_type"]) for o in outputs] == ["stdout", "display_data"]
    assert reports.WIDGET_VIEW not in outputs[1]["data"] and outputs[1]["data"]["text/plain"]
    html = tmp_path / "01.html"
    reports.render_report(executed, html)
    page = html.read_text()
    assert "<title>01 · Primary sparse autoencoder · featint my-run</title>" in page
    assert "train SAE: 100%" not in page and "trained" in page


def test_the_index_links_each_stage_with_its_status_time_and_headline_numbers(tmp_path):
    root = tmp_path / "run"
    (root / "reports").mkdir(parents=True)
    (root / "notebooks").mkdir()
    _executed_notebook(root / "notebooks" / "01_primary_sae.ipynb")
    (root / "reports" / "01_primary_sae.html").write_text("<html></html>")
    (root / "metrics.json").write_text(json.dumps({"primary_sae": {"fvu": 0.2003, "dead_fraction": 0.0017}}))
    record = {
        "stages": {"01_primary_sae": {"status": "ok", "seconds": 83.4}},
        "attempts": [
            {
                "profile": "embedded",
                "git_commit": "abc123",
                "status": "ok",
                "finished": "2026-12-01T05:00:00",
                "parameters": {"sae_k": 16},
            }
        ],
    }
    (root / "run.json").write_text(json.dumps(record))
    page = reports.write_index(root).read_text()
    assert '<a href="01_primary_sae.html">01 · Primary sparse autoencoder</a>' in page
    assert "held-out FVU: <b>0.200</b>" in page and "dead latents: <b>0.2%</b>" in page
    assert "1 min 23 s" in page and "<code>sae_k=16</code>" in page
    assert "02_nfm" not in page  # a stage that never ran is not listed
    assert reports.stage_summary(root, "01_primary_sae").startswith("held-out FVU 0.200, dead latents 0.2%")


@pytest.mark.parametrize("seconds, text", [(9.6, "10 s"), (83, "1 min 23 s"), (3725, "1 h 02 min"), (None, "?")])
def test_seconds_are_written_for_people(seconds, text):
    assert reports.format_seconds(seconds) == text
