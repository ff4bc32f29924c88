"""Calibrated probabilities: fitted on validation, stored in the artifact, applied wherever an artifact scores."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flows.stages.evaluate import protocol_tables
from models.metrics import functional as metrics
from models.scoring.artifact import Scorer, read_meta
from models.scoring.calibration import MIN_CLASS, Calibration, fit_one
from models.config import load_config
from models.data.resident import time_split
from models.evaluation.holdout import evaluate_holdout
from models.training.train import train
from services import ranking

DECLARATION = {"tasks": [{"name": "click", "type": "binary"},
                         {"name": "buy", "type": "binary", "parent": "click", "gain": 2},
                         {"name": "follow", "type": "binary", "gain": 3}],
               "primary": "click"}
FEATURES = {"categorical": ["user_id", "item_id"], "numeric": ["x"], "log1p": []}


def _sigmoid(s):
    return 1.0 / (1.0 + np.exp(-s))


def _table(n: int = 6000, seed: int = 0) -> pd.DataFrame:
    """A small log: clicks at about 30%, purchases (implying a click) at about 3%, follows at about 2%."""
    rng = np.random.default_rng(seed)
    users, items = rng.integers(0, 150, n), rng.integers(0, 60, n)
    x = rng.normal(size=n)
    click = rng.random(n) < _sigmoid(-1.0 + 0.03 * (items - 30) + 0.5 * x)
    buy = click & (rng.random(n) < 0.1)
    follow = rng.random(n) < _sigmoid(-4.0 + 0.8 * x)
    df = pd.DataFrame({"user_id": [f"u{u}" for u in users], "item_id": [f"i{i}" for i in items], "x": x,
                       "event_timestamp": pd.Timestamp("2024-01-01", tz="UTC") + pd.to_timedelta(
                           np.sort(rng.integers(0, 10 * 86400, n)), unit="s"),
                       "click": click.astype(np.int64), "buy": buy.astype(np.int64),
                       "follow": follow.astype(np.int64)})
    df.attrs["mtlrec"] = {"declaration": DECLARATION, "features": FEATURES}
    return df


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A barely trained model: two small-lr batches leave every head near 0.5, far above the rare rates."""
    table = _table()
    out = tmp_path_factory.mktemp("calibration") / "model"
    cfg = load_config("shared_bottom", ["train.max_epochs=1", "train.limit_train_batches=2", "train.batch_size=256",
                                        "train.lr=0.0001", "train.ema=false", "train.patience=1",
                                        "model.params={bottom: [16], tower: [8]}", "model.embedding_dim=4",
                                        "balancer.name=fixed"])
    meta = train(cfg, "<table>", out, progress=False, table=table)
    return {"table": table, "out": out, "meta": meta}


def _raw(out) -> Scorer:
    scorer = Scorer.load(out)
    scorer.calibration = Calibration()  # the heads as the network gives them
    return scorer


def test_platt_scaling_brings_an_over_predicting_head_under_its_base_rate_and_keeps_its_order():
    rng = np.random.default_rng(0)
    score = rng.normal(size=20_000)
    y = (rng.random(len(score)) < _sigmoid(1.5 * score - 5.5)).astype(float)  # about 1% positives
    raw = _sigmoid(1.5 * score - 1.5)  # the same order, about 25% on average
    platt, report = fit_one(raw, y)
    calibrated = platt.apply(raw)
    assert metrics.logloss(raw, y) > metrics.base_logloss(y)
    assert metrics.logloss(calibrated, y) <= metrics.base_logloss(y)
    assert report["logloss"] == pytest.approx(metrics.logloss(calibrated, y)) and report["method"] == "platt"
    assert metrics.auc(calibrated, y) == pytest.approx(metrics.auc(raw, y))
    assert calibrated.mean() == pytest.approx(y.mean(), rel=0.05)
    assert metrics.ece(calibrated, y) < 0.005 < 0.2 < metrics.ece(raw, y)


def test_a_head_that_ranks_backwards_is_flattened_not_reversed():
    rng = np.random.default_rng(1)
    raw = rng.random(5000)
    y = (rng.random(5000) < 0.2 * (1 - raw)).astype(float)  # the higher the head, the rarer the positive
    platt, report = fit_one(raw, y)
    assert platt.a == 0.0 and report["logloss"] == pytest.approx(metrics.base_logloss(y))


def test_few_positives_use_platts_smoothed_targets_and_say_so():
    raw = np.linspace(0.1, 0.9, 400)
    y = np.zeros(400)
    y[[50, 200, 390]] = 1.0
    platt, report = fit_one(raw, y)
    assert report["positives"] == 3 < MIN_CLASS and report["method"] == "platt-smoothed"
    assert "fewer than" in report["reason"] and np.isfinite([platt.a, platt.b]).all()
    assert platt.apply(raw).mean() < 0.05  # pulled toward (3 + 1) / 402, not left at 0.5


def test_ece_and_base_rate_logloss():
    y = np.zeros(1000)
    y[:10] = 1.0
    assert metrics.ece(np.full(1000, 0.2), y) == pytest.approx(0.19)
    assert metrics.base_logloss(y) == pytest.approx(-(0.01 * np.log(0.01) + 0.99 * np.log(0.99)))
    # two bins each calibrated on its own: no error, however weak the ranking inside a bin
    p = np.r_[np.full(500, 0.1), np.full(500, 0.7)]
    labels = np.r_[np.ones(50), np.zeros(450), np.ones(350), np.zeros(150)]
    assert metrics.ece(p, labels) == pytest.approx(0.0, abs=1e-12)
    assert metrics.ece(np.array([1.0]), np.array([1.0])) == 0.0  # p = 1 falls in the last bin


def test_training_calibrates_every_binary_head_on_validation(trained):
    meta, table = trained["meta"], trained["table"]
    valid, test = meta["metrics"]["valid"], meta["metrics"]["test"]
    report = meta["calibration"]["tasks"]
    assert set(report) == {"click", "buy", "follow"}
    for name in report:
        assert valid[f"{name}/logloss"] <= valid[f"{name}/base_logloss"] + 1e-6, name
        assert valid[f"{name}/logloss"] == pytest.approx(report[name]["fit"]["logloss"], abs=1e-6)
    for name in ("buy", "follow"):  # the rare heads, raw, were worse than their base rate
        assert report[name]["fit"]["raw_logloss"] > report[name]["fit"]["base_logloss"]
        assert valid[f"{name}/ece"] < report[name]["fit"]["raw_ece"]
    # the test split's metrics are those of the calibrated probabilities the artifact scores
    rows = time_split(table, 0.1, 0.1)[2]
    probs = Scorer.load(trained["out"]).predict(rows)
    for name in ("click", "buy", "follow"):
        y = rows[name].to_numpy(np.float64)
        assert test[f"{name}/logloss"] == pytest.approx(metrics.logloss(probs[name], y), abs=1e-6)
        assert test[f"{name}/ece"] == pytest.approx(metrics.ece(probs[name], y), abs=1e-6)


def test_the_calibration_round_trips_through_the_artifact(trained):
    out, table = trained["out"], trained["table"]
    stored = read_meta(out)["calibration"]
    scorer = Scorer.load(out)
    assert scorer.calibration.to_dict() == stored
    rows = table.tail(500)
    raw, calibrated = _raw(out).predict(rows), scorer.predict(rows)
    for name in ("click", "buy", "follow"):
        assert np.allclose(calibrated[name], scorer.calibration.tasks[name].apply(raw[name]))
    assert raw["follow"].mean() > 0.3 > 0.1 > calibrated["follow"].mean()
    with pytest.raises(ValueError, match="'folow' is not a binary task of this model.*did you mean 'follow'"):
        Calibration.from_dict({"method": "platt", "tasks": {"folow": {"a": 1.0, "b": 0.0}}}, scorer.tasks)
    with pytest.raises(ValueError, match="unknown key 'task'.*did you mean 'tasks'"):
        Calibration.from_dict({"task": {}})
    assert Calibration.from_dict(None).apply(raw) == raw  # an artifact from before calibration scores as it did


class _Reader:
    """The online reader's interface, answered from the log's own rows."""

    def __init__(self, table: pd.DataFrame):
        self.x = table.groupby("item_id")["x"].last()

    def columns(self, user_id, item_ids, request_ts):
        cols = {"user_id": np.full(len(item_ids), user_id, dtype=object),
                "item_id": np.asarray(item_ids, dtype=object), "x": self.x.loc[item_ids].to_numpy()}
        return cols, np.ones(len(item_ids), bool), True


def test_serving_fuses_the_calibrated_probabilities(trained):
    out, table = trained["out"], trained["table"]
    scorer = Scorer.load(out)
    items = sorted(table["item_id"].unique())[:20]
    answer = ranking.rank(ranking.Model.of("m:1", scorer), _Reader(table), "u1", items)
    cols = _Reader(table).columns("u1", items, 0.0)[0]
    want, raw = scorer.predict(cols), _raw(out).predict(cols)
    for it in answer["items"]:
        i = items.index(it["item_id"])
        assert it["scores"]["follow"] == pytest.approx(float(want["follow"][i]), rel=1e-6)
        assert it["scores"]["follow"] < raw["follow"][i] / 3
        assert it["score"] == pytest.approx(sum(g * float(want[t][i]) for t, g in
                                                (("click", 1.0), ("buy", 2.0), ("follow", 3.0))), rel=1e-5)


def test_holdout_evaluation_reports_calibrated_logloss_beside_the_base_rate_and_ece(trained):
    out, table = trained["out"], trained["table"]
    result = evaluate_holdout(out, table, unshown_items=None)
    rows = time_split(table, 0.1, 0.1)[2]
    probs, raw = Scorer.load(out).predict(rows), _raw(out).predict(rows)
    for name in ("click", "buy", "follow"):
        y = rows[name].to_numpy(np.float64)
        t = result["tasks"][name]
        assert t["logloss"] == pytest.approx(metrics.logloss(probs[name], y))
        assert t["base_logloss"] == pytest.approx(metrics.base_logloss(y))
        assert t["ece"] == pytest.approx(metrics.ece(probs[name], y))
    follow_y = rows["follow"].to_numpy(np.float64)
    assert result["tasks"]["follow"]["logloss"] < metrics.logloss(raw["follow"], follow_y)
    table_md = protocol_tables(result)
    assert "| task | AUC | GAUC | logloss | base-rate logloss | ECE |" in table_md
    assert f"{result['tasks']['follow']['ece']:.4f} |" in table_md
