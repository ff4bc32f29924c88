"""Declared rewards: from dataset.yaml through the task specs to reward@K in every evaluation table."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from flows.stages.evaluate import KS, metric_table, protocol_tables
from models.metrics import functional as metrics
from models.metrics.multitask import evaluate_predictions, monitor_key, rewards
from models.evaluation.holdout import Holdout
from models.tasks import TaskSet, TaskSpec

SHOP = {"tasks": [{"name": "click", "type": "binary", "reward": 1},
                  {"name": "purchase", "type": "binary", "parent": "click", "reward": 5},
                  {"name": "dwell", "type": "regression", "parent": "click"}], "primary": "click"}


def test_rewards_reach_the_task_specs_and_survive_the_artifact_config():
    tasks = TaskSet.resolve("auto", SHOP)
    assert tasks.rewards() == {"click": 1.0, "purchase": 5.0}
    assert tasks.get("dwell").reward_value == 0.0
    again = TaskSet.from_config(tasks.to_config(), primary=tasks.primary)  # what model.json holds
    assert [t.reward for t in again] == [1.0, 5.0, None] and again.rewards() == tasks.rewards()
    assert tasks.reward_relevance() == "1×click + 5×purchase"


def test_an_undeclared_reward_follows_the_gain_even_when_a_config_overrides_it():
    declared = {"tasks": [{"name": "click"}, {"name": "like", "gain": 2}]}
    assert TaskSet.resolve("auto", declared).rewards() == {"click": 1.0, "like": 2.0}
    assert TaskSet.resolve([{"name": "click"}, {"name": "like", "gain": 3}], declared).rewards() == \
        {"click": 1.0, "like": 3.0}


def test_an_old_artifact_without_rewards_is_judged_as_before():
    old = TaskSet.from_config([{"name": "click", "gain": 1.0}, {"name": "purchase", "sample_space": "click",
                                                                 "gain": 2.0}])
    assert old.rewards() == old.gains()


def test_a_negative_reward_in_a_task_config_is_refused():
    with pytest.raises(ValueError, match="task click: reward must be a number >= 0"):
        TaskSpec(name="click", reward=-1.0)


def _table(n_users: int = 30, per_user: int = 8, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    n = n_users * per_user
    click = (rng.random(n) < 0.4).astype(np.int64)
    purchase = click * (rng.random(n) < 0.3)
    return pd.DataFrame({"user_id": np.repeat([f"u{i}" for i in range(n_users)], per_user),
                         "item_id": [f"i{j}" for j in rng.integers(0, 20, n)],
                         "event_timestamp": pd.date_range("2026-01-01", periods=n, freq="min", tz="UTC"),
                         "click": click, "purchase": purchase, "dwell": click * 3.0})


def test_holdout_ranking_reports_reward_at_k_with_the_declared_rewards():
    tasks = TaskSet.resolve("auto", SHOP)
    h = Holdout(_table(), tasks, 0.1, 0.5)
    expect = 1.0 * h.labels["click"] + 5.0 * h.labels["purchase"]
    np.testing.assert_array_equal(h.rewards, expect)
    scores = np.random.default_rng(1).random(len(h.test))
    out = h.ranking(scores, ks=(3, 10))
    want = metrics.reward_metrics(h.users, scores, expect, (3, 10))
    assert out["reward@3"] == want["reward@3"] and out["reward@10"] == want["reward@10"]
    assert h.protocol(0)["reward"] == "1×click + 5×purchase"


def test_validation_metrics_carry_fused_reward_and_it_may_be_monitored():
    tasks = TaskSet.resolve("auto", SHOP)
    df = _table()
    labels = df[["click", "purchase", "dwell"]].to_numpy(np.float64)
    np.testing.assert_array_equal(rewards(tasks, labels), df["click"] + 5 * df["purchase"])
    rng = np.random.default_rng(2)
    probs = {"click": rng.random(len(df)), "purchase": rng.random(len(df)) * 0.1, "dwell": rng.random(len(df))}
    out = evaluate_predictions(tasks, probs, labels, df["user_id"].to_numpy(), ks=(10,))
    assert "fused/reward@10" in out and out["fused/reward@10"] > 0
    assert monitor_key("reward@10", out) == "fused/reward@10"


def test_metric_tables_list_reward_columns():
    assert {"reward@10", "reward@20", "reward@50"} <= set(KS)
    m = {k: 0.5 for k in KS}
    result = {"rankers": {"model": m, "random": m}, "tasks": {},
              "protocol": {"candidates": "each user's own held-out impressions", "reward": "1×click + 5×purchase"}}
    assert "reward@10" in metric_table(result).splitlines()[0]
    assert "reward = 1×click + 5×purchase" in protocol_tables(result)
