"""Sweeps: bad grids fail before any work; a tiny sweep makes one run per point over one shared store, a
comparison table with a row per point and its report; a rerun does no work; a swept layer gets a store each."""

import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from featint_utils.data.activation_store import ActivationStore
from featint_utils.workbench import sweeps
from featint_utils.workbench.run import LINEAGE

TINY = {
    "max_groups": "12",
    "sae_latents": "256",
    "sae_train_tokens": "4096",
    "sae_batch_size": "256",
    "splice_texts": "8",
    "n_show_features": "2",
    "nfm_batch_size": "64",
    "nfm_k_embed": "8",
    "nfm_max_epochs": "2",
    "nfm_lr_grid": "3e-3",
    "nfm_seeds": "0",
    "pair_ridge_pairs": "32",
    "power_shares": "0.05",
    "power_pairs": "4",
    "conjunction_candidates": "4",
    "absorption_pairs": "4",
    "n_boot": "50",
}


@pytest.mark.parametrize(
    "grid, message",
    [
        (["sae_kk=4,8"], r"unknown parameter 'sae_kk'; did you mean sae_k"),
        (["sae_k=4,eight"], r"sae_k=eight: expected int"),
        (["sae_k="], r"empty value list"),
        (["sae_k=4,,8"], r"empty value list"),
        (["sae_k=4,4"], r"repeated values"),
        (["sae_k=4", "sae_k=8"], r"'sae_k' is given twice"),
        (["sae_k=4,512"], r"point sae_k512: sae_k=512 exceeds sae_latents=256"),
        ([], r"at least one --grid"),
    ],
)
def test_a_bad_grid_fails_before_any_work(tmp_path, grid, message):
    where = tmp_path / "sweep"
    with pytest.raises(sweeps.SweepError, match=message):
        sweeps.run_sweep("embedded", grid, overrides={"sae_latents": "256"}, sweep_dir=where)
    assert not where.exists()


def test_zip_pairs_values_and_refuses_lists_of_different_lengths(tmp_path):
    grid = sweeps.parse_grid(["layer=2,3", "sae_k=16,32"])
    assert sweeps.grid_points(grid, zipped=True) == [{"layer": 2, "sae_k": 16}, {"layer": 3, "sae_k": 32}]
    assert len(sweeps.grid_points(grid)) == 4
    assert [sweeps.point_name(p) for p in sweeps.grid_points(sweeps.parse_grid(["sae_lr=1e-3,0.01"]))] == [
        "sae_lr0p001",
        "sae_lr0p01",
    ]
    with pytest.raises(sweeps.SweepError, match="--zip needs lists of one length"):
        sweeps.run_sweep("embedded", ["layer=2,3", "sae_k=16"], zipped=True, sweep_dir=tmp_path / "s")
    with pytest.raises(sweeps.SweepError, match=r"both swept \(--grid\) and fixed"):
        sweeps.run_sweep("embedded", ["sae_k=16,32"], overrides={"sae_k": "8"}, sweep_dir=tmp_path / "s")


SWEPT = (["sae_k=4,8"], ["00", "01", "02", "03"])  # the tiny sweep's grid and stages


@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory) -> Path:
    """Two points over one shared store, stages 00-03, both points at once (two job slots)."""
    where = tmp_path_factory.mktemp("sweeps") / "sweep"
    grid, only = SWEPT
    sweeps.run_sweep("embedded", grid, overrides=TINY, only=only, sweep_dir=where, reports=False, jobs=2)
    return where


def test_a_tiny_sweep_shares_its_store_compares_its_points_and_runs_them_at_once(tiny_sweep):
    where = tiny_sweep
    points = [where / "points" / name for name in ("sae_k4", "sae_k8")]
    assert len(list((where / "stores").iterdir())) == 1  # sae_k does not shape the store: extracted once
    stores = [ActivationStore(p / "activations") for p in points]
    assert stores[0].path.resolve() == stores[1].path.resolve()
    lineages = [json.loads((p / "primary_sae" / LINEAGE).read_text()) for p in points]
    assert lineages[0]["store"] == lineages[1]["store"] == stores[0].fingerprint  # both SAEs read that store
    assert [json.loads((p / "primary_sae" / "sae" / "cfg.json").read_text())["k"] for p in points] == [4, 8]

    table = pd.read_csv(where / "comparison.csv")
    assert list(table["point"]) == ["sae_k4", "sae_k8"] and list(table["sae_k"]) == [4, 8]
    assert (table["status"] == "ok").all()
    for column in ("sae_fvu", "interaction_share", "interaction_share_low", "detection_limit", "absorbed_fraction"):
        assert np.isfinite(table[column]).all(), column
    assert (table["interaction_share_low"] <= table["interaction_share"]).all()
    assert table["sae_fvu"].iloc[1] < table["sae_fvu"].iloc[0]  # twice the active latents reconstruct better
    assert (where / "comparison.html").stat().st_size > 10_000
    assert (where / "figures" / "sweep_comparison.png").exists()
    spans = [json.loads((p / "run.json").read_text())["attempts"][-1] for p in points]
    assert spans[0]["started"] < spans[1]["finished"] and spans[1]["started"] < spans[0]["finished"]  # overlapped


def _rerun_does_no_work(where: Path, capsys) -> None:
    points = sorted((where / "points").iterdir())
    attempts = [len(json.loads((p / "run.json").read_text())["attempts"]) for p in points]
    report_time = os.stat(where / "comparison.ipynb").st_mtime_ns
    capsys.readouterr()
    grid, only = SWEPT
    sweeps.run_sweep("embedded", grid, overrides=TINY, only=only, sweep_dir=where, reports=False)
    assert capsys.readouterr().out.count("finished before, skipped") == len(points) == 2
    assert [len(json.loads((p / "run.json").read_text())["attempts"]) for p in points] == attempts
    assert os.stat(where / "comparison.ipynb").st_mtime_ns == report_time


def test_a_rerun_of_a_finished_sweep_does_no_work(tiny_sweep, capsys):
    _rerun_does_no_work(tiny_sweep, capsys)


def test_a_sweep_moved_as_a_whole_keeps_its_shared_store_and_every_point(tiny_sweep, tmp_path, capsys):
    moved = tmp_path / "elsewhere" / "sweep"
    shutil.copytree(tiny_sweep, tmp_path / "staged", symlinks=True)  # a sweep made here, then moved (mv)
    moved.parent.mkdir()
    (tmp_path / "staged").rename(moved)
    for point in (moved / "points").iterdir():  # the links are relative: they find the store in its new place
        store = ActivationStore(point / "activations")
        store.verify(cached=False)
        assert store.path.resolve().parent.parent == moved / "stores"
    _rerun_does_no_work(moved, capsys)
    assert pd.read_csv(moved / "comparison.csv").equals(pd.read_csv(tiny_sweep / "comparison.csv"))


def test_a_failed_point_does_not_stop_the_others_and_the_sweep_names_it(tmp_path, monkeypatch):
    ran = []

    def point(profile, run_dir, only, sets, reports, nproc, env):  # stands in for the point's own process
        ran.append(run_dir.name)
        return run_dir.name != "sae_k4", 1.0

    monkeypatch.setattr(sweeps, "_run_point", point)
    where = tmp_path / "sweep"
    with pytest.raises(sweeps.SweepError, match=r"1 of 3 points failed: sae_k4; .*sweep.log"):
        # stage 01 alone: no shared store to extract first, only the points (stood in for) and the comparison
        sweeps.run_sweep("embedded", ["sae_k=4,8,16"], overrides=TINY, only=["01"], sweep_dir=where, reports=False)
    assert ran == ["sae_k4", "sae_k8", "sae_k16"]  # the points after the failed one still ran
    assert len(pd.read_csv(where / "comparison.csv")) == 3 and (where / "comparison.html").exists()


def test_each_job_slot_sees_its_own_gpus(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert [sweeps.gpu_slot_env(slot, 2)["CUDA_VISIBLE_DEVICES"] for slot in (0, 1)] == ["0,1", "2,3"]
    with pytest.raises(sweeps.SweepError, match="needs GPUs 4..5; only 4 are visible"):
        sweeps.gpu_slot_env(2, 2)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "4,5,6,7")  # slots take the GPUs this process was given
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    assert sweeps.gpu_slot_env(1, 2)["CUDA_VISIBLE_DEVICES"] == "6,7"
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    assert "CUDA_VISIBLE_DEVICES" not in sweeps.gpu_slot_env(1, 2)  # a CPU machine: nothing to partition
