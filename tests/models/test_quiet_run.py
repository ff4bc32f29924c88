"""A successful run says what it did and nothing else: no third-party adverts in its output."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import pandas as pd

from models.config import load_config
from models.training.train import train


def _table(n: int = 1000) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 30, n)],
                       "item_id": [f"i{i}" for i in rng.integers(0, 40, n)],
                       "event_timestamp": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
                       "x": rng.normal(size=n), "click": (rng.random(n) < 0.3).astype(np.int64)})
    df.attrs["mtlrec"] = {"declaration": {"tasks": [{"name": "click"}]},
                          "features": {"categorical": ["user_id", "item_id"], "numeric": ["x"], "log1p": []}}
    return df


def test_training_prints_no_third_party_advert(tmp_path, capfd, caplog):
    caplog.set_level(logging.INFO)
    train(load_config("shared_bottom", ["train.max_epochs=1", "train.batch_size=512", "train.ema=false"]),
          "<table>", tmp_path / "m", progress=False, table=_table())
    out, err = capfd.readouterr()
    assert "litlogger" not in out + err + caplog.text


def test_training_says_each_epoch_and_the_time_left(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="mtlrec.train")
    train(load_config("shared_bottom", ["train.max_epochs=3", "train.batch_size=256", "train.ema=false",
                                        "train.patience=5"]),
          "<table>", tmp_path / "m", progress=False, table=_table())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert [ln.split(":")[0] for ln in lines] == ["epoch 1/3", "epoch 2/3", "epoch 3/3"], lines
    assert "s left" in lines[0] and "mean_auc" in lines[0] and "0 s left" in lines[-1]


def test_a_time_budget_stops_training_and_keeps_the_best_checkpoint(tmp_path, caplog):
    """train.max_time: training ends once the budget is spent, whatever the epochs, and the artifact is the
    best checkpoint so far; the epoch lines count the time left against the budget."""
    import time

    caplog.set_level(logging.INFO, logger="mtlrec.train")
    t0 = time.monotonic()
    meta = train(load_config("shared_bottom", ["train.max_epochs=500", "train.batch_size=32", "train.ema=false",
                                               "train.patience=500", "train.max_time=4"]),
                 "<table>", tmp_path / "m", progress=False, table=_table())
    assert time.monotonic() - t0 < 60
    assert 1 <= meta["training"]["epochs"] < 500 and meta["training"]["recipe"]["max_time"] == 4
    assert (tmp_path / "m" / "model.json").is_file()
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("epoch ")]
    assert lines and all(float(ln.split("at most about ")[1].split(" s")[0]) <= 4 for ln in lines)
    with pytest.raises(ValueError, match="train.max_time"):
        train(load_config("shared_bottom", ["train.max_time=-1"]), "<table>", tmp_path / "bad", progress=False,
              table=_table())
