"""Consistency regularisation (models/training/consistency.py): the penalty, its settings, and training with it."""

from __future__ import annotations

import pytest
import torch

from models.training.consistency import Consistency, ConsistencyError
from models.tasks import TaskSet

FEED = TaskSet.from_config([{"name": "click"}, {"name": "like"}, {"name": "share"},
                            {"name": "buy", "sample_space": "click"}])


def test_off_by_default_and_zero_when_off():
    c = Consistency.from_config(None, FEED)
    assert c.weight == 0 and not c.active
    logits = {t.name: torch.randn(64, 1) for t in FEED}
    assert float(c.penalty(FEED, logits)) == 0.0


def test_auto_pairs_every_declared_parent_and_groups_the_parallel_tasks():
    c = Consistency.from_config({"weight": 1.0, "groups": "auto"}, FEED)
    assert c.implies == (("buy", "click"),)
    assert c.groups == (("click", "like", "share"),)


def test_an_esmm_child_is_consistent_by_construction_and_a_declared_one_is_penalised():
    torch.manual_seed(0)
    logits = {t.name: torch.randn(256, 1) for t in FEED}
    esmm = Consistency.from_config({"weight": 1.0}, FEED)  # buy's probability is p(click) * p(buy | click)
    assert float(esmm.penalty(FEED, logits)) == 0.0
    flat = TaskSet.from_config([{"name": "click"}, {"name": "buy"}])  # buy trained on every impression
    declared = Consistency.from_config({"weight": 1.0, "implies": [["buy", "click"]]}, flat)
    above = {"click": torch.full((8, 1), -2.0), "buy": torch.full((8, 1), 2.0)}
    below = {"click": torch.full((8, 1), 2.0), "buy": torch.full((8, 1), -2.0)}
    expected = float(torch.sigmoid(torch.tensor(2.0)) - torch.sigmoid(torch.tensor(-2.0)))
    assert float(declared.penalty(flat, above)) == pytest.approx(expected)
    assert float(declared.penalty(flat, below)) == 0.0


def test_the_group_penalty_is_one_minus_the_correlation_of_the_scores_and_ignores_scale():
    two = TaskSet.from_config([{"name": "like"}, {"name": "long_view"}])
    c = Consistency.from_config({"weight": 0.5, "groups": [["like", "long_view"]]}, two)
    x = torch.randn(128, 1)
    # Scale-free up to the variance floor (0.01 in squared logits, against a variance of about 1 here).
    assert float(c.penalty(two, {"like": x, "long_view": 3 * x - 4})) == pytest.approx(0.0, abs=0.01)
    assert float(c.penalty(two, {"like": x, "long_view": -x})) == pytest.approx(1.0, abs=0.01)  # 0.5 * (1 - -1)
    y = torch.randn(128, 1, requires_grad=True)
    c.penalty(two, {"like": x, "long_view": y}).backward()
    assert y.grad is not None and y.grad.abs().sum() > 0


@pytest.mark.parametrize("raw, message", [
    ({"wieght": 1}, "'weight'"),
    ({"weight": -1}, ">= 0"),
    ({"weight": 1, "groups": [["click", "liek"]]}, "'like'"),
    ({"weight": 1, "implies": [["buy"]]}, "[child, parent]"),
    ({"weight": 1, "groups": [["click"]]}, "two or more"),
])
def test_settings_fail_naming_the_key_or_the_closest_task(raw, message):
    with pytest.raises(ConsistencyError, match=None) as e:
        Consistency.from_config(raw, FEED)
    assert message in str(e.value)


def _table(n: int = 4000, seed: int = 0):
    import numpy as np
    import pandas as pd

    rng = np.random.default_rng(seed)
    x1, x2 = rng.normal(size=n), rng.normal(size=n)
    like = (rng.random(n) < 1 / (1 + np.exp(-2 * x1))).astype(np.int64)
    view = (rng.random(n) < 1 / (1 + np.exp(-2 * x2))).astype(np.int64)  # another signal, not like's
    df = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, 50, n)],
                       "item_id": [f"i{i}" for i in rng.integers(0, 100, n)],
                       "event_timestamp": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
                       "x1": x1, "x2": x2, "like": like, "view": view})
    df.attrs["mtlrec"] = {"declaration": {"tasks": [{"name": "like"}, {"name": "view"}]},
                          "features": {"categorical": ["user_id", "item_id"], "numeric": ["x1", "x2"], "log1p": []}}
    return df


def test_training_with_a_group_penalty_moves_the_groups_scores_together(tmp_path):
    """The penalty is wired into training: with a large weight, like's and view's scores on the held-out rows
    correlate far more than without it (their labels follow different item signals)."""
    import numpy as np

    from models.scoring.artifact import Scorer
    from models.config import load_config
    from models.training.train import train

    table = _table()
    base = ["train.max_epochs=3", "train.batch_size=128", "train.ema=false", "data.numeric_bins=none"]
    corr = {}
    for name, extra in (("off", []), ("on", ["model.consistency={weight: 2.0, groups: [[like, view]]}"])):
        train(load_config("shared_bottom", base + extra), "<table>", tmp_path / name, progress=False, table=table)
        probs = Scorer.load(tmp_path / name).predict(table.tail(600))
        corr[name] = float(np.corrcoef(np.log(probs["like"]), np.log(probs["view"]))[0, 1])
    assert corr["off"] < 0.3 and corr["on"] > corr["off"] + 0.3, corr


def test_single_task_baselines_train_without_the_multi_task_consistency_setting():
    """A group naming two tasks cannot exist in a one-task baseline: the baseline turns consistency off."""
    from models.evaluation.baselines import single_task_config
    from models.config import load_config

    cfg = load_config("mmoe", ["model.consistency={weight: 1.0, groups: [[like, view]]}"])
    one = single_task_config(cfg, {"name": "like", "type": "binary"}, "mean_auc")
    tasks = TaskSet.from_config(one["tasks"])
    assert not Consistency.from_config(one["model"]["consistency"], tasks).active
    assert cfg["model"]["consistency"]["groups"] == [["like", "view"]]  # the multi-task config is untouched


def test_an_artifact_newer_than_the_code_is_refused_by_name(tmp_path):
    import json

    from models.scoring.artifact import FORMAT_VERSION, CorruptModel, Scorer
    from models.config import load_config
    from models.training.train import train

    train(load_config("shared_bottom", ["train.max_epochs=1", "train.batch_size=512", "train.ema=false"]),
          "<table>", tmp_path / "m", progress=False, table=_table(1500))
    meta_path = tmp_path / "m" / "model.json"
    meta = json.loads(meta_path.read_text())
    assert meta["format_version"] == FORMAT_VERSION == 3
    Scorer.load(tmp_path / "m")
    meta_path.write_text(json.dumps({**meta, "format_version": FORMAT_VERSION + 1}))
    with pytest.raises(CorruptModel, match="newer than this code"):
        Scorer.load(tmp_path / "m")
