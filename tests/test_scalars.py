"""TensorBoard curves: every trainer's event file holds the curves of its history CSV, and the switch turns
them off."""

import numpy as np
import pandas as pd
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from featint_utils import scalars
from featint_utils.dictionary.sae_training import SAETrainer, TrainConfig
from featint_utils.residual import planted
from featint_utils.residual.code_data import split_fit_tune_test
from featint_utils.residual.nfm import NFM, NFMConfig
from featint_utils.residual.nfm_training import FitConfig, ResidualTrainer
from tests.conftest import random_store


def curves(log_dir) -> dict[str, pd.Series]:
    events = EventAccumulator(str(log_dir))
    events.Reload()
    return {
        tag: pd.Series([e.value for e in events.Scalars(tag)], index=[e.step for e in events.Scalars(tag)])
        for tag in events.Tags()["scalars"]
    }


def test_the_sae_trainer_writes_its_history_as_tensorboard_curves_over_tokens(tmp_path, monkeypatch):
    monkeypatch.delenv(scalars.ENV, raising=False)
    store = random_store(tmp_path / "store", 2_000, 400)
    trainer = SAETrainer(store, 64, 4, TrainConfig(train_tokens=10 * 256, batch_size=256, lr=3e-3), tmp_path / "sae")
    trainer.train()
    history = pd.read_csv(tmp_path / "sae" / "history.csv")
    logged = curves(tmp_path / "sae" / "tensorboard")
    assert {"sae/fvu", "sae/l0", "sae/dead_fraction", "sae/val_fvu"} <= set(logged)
    assert list(logged["sae/fvu"].index) == list(history["tokens"])
    np.testing.assert_allclose(logged["sae/fvu"].to_numpy(), history["fvu"], rtol=1e-6)  # float32 events
    val = history.dropna(subset=["val_fvu"])
    np.testing.assert_allclose(logged["sae/val_fvu"].to_numpy(), val["val_fvu"], rtol=1e-6)


def test_the_nfm_trainer_writes_fit_and_tune_fvu_per_epoch_and_the_switch_turns_it_off(tmp_path, monkeypatch):
    sets = split_fit_tune_test(planted.codes(2_000, n_latents=32, k=4, d=8, seed=0), 0.2, 0.3, seed=0)

    def fit(out):
        model = NFM(NFMConfig(32, 8, k_embed=4, dropout=0.0), seed=0)
        ResidualTrainer(model, sets["fit"], sets["tune"], FitConfig(batch_size=256, max_epochs=3), out).train()

    monkeypatch.delenv(scalars.ENV, raising=False)
    fit(tmp_path / "on")
    history = pd.read_csv(tmp_path / "on" / "history.csv").iloc[1:]  # row 0 is the start, before any epoch
    logged = curves(tmp_path / "on" / "tensorboard")
    assert list(logged["fit/tune_fvu"].index) == list(history["epoch"])
    np.testing.assert_allclose(logged["fit/tune_fvu"].to_numpy(), history["tune_fvu"], rtol=1e-6)
    monkeypatch.setenv(scalars.ENV, "0")
    fit(tmp_path / "off")
    assert (tmp_path / "off" / "history.csv").exists() and not (tmp_path / "off" / "tensorboard").exists()
