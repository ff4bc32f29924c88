"""The unshown-items protocol: candidates never shown, items that existed, item features as of the positive's time."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.evaluation import unseen_candidates as unshown

T0 = pd.Timestamp("2026-01-01", tz="UTC")


def _log(seed: int = 0, users: int = 30, items: int = 60, rows: int = 1500) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    ts = T0 + pd.to_timedelta(np.sort(rng.integers(0, 10 * 86_400, rows)), unit="s")
    item = rng.integers(0, items, rows)
    df = pd.DataFrame({"user_id": [f"u{u}" for u in rng.integers(0, users, rows)],
                       "item_id": [f"i{i}" for i in item], "event_timestamp": ts,
                       "click": (rng.random(rows) < 0.3).astype(np.int8)})
    # An item-side feature that changes with time: the item's impressions so far (as the feature store joins it).
    df["item_seen"] = df.groupby("item_id").cumcount().astype(np.float64)
    df["item_const"] = item.astype(np.float64) * 10
    return df


def test_candidates_are_unshown_existing_distinct_and_as_of_the_positive():
    log = _log()
    positives = log[log["click"] > 0].iloc[-80:]
    c = unshown.build(log, positives, ["item_id", "item_seen", "item_const"], n=20, seed=1, label_columns=["click"])
    shown = set(zip(log["user_id"], log["item_id"]))
    first = log.groupby("item_id")["event_timestamp"].min()
    neg = c.frame[~c.is_positive]
    pos = c.positives.iloc[c.group[~c.is_positive]]
    assert not any((u, i) in shown for u, i in zip(neg["user_id"], neg["item_id"]))
    assert (first.loc[neg["item_id"]].to_numpy() <= pos["event_timestamp"].to_numpy()).all()
    assert not pd.DataFrame({"g": c.group[~c.is_positive], "i": neg["item_id"].to_numpy()}).duplicated().any()
    assert (neg["click"] == 0).all() and (neg["user_id"].to_numpy() == pos["user_id"].to_numpy()).all()
    assert (c.sizes <= 20).all() and (c.sizes == 20).mean() > 0.9
    # Item features: the item's latest logged row at or before the positive's time, never a later one.
    for _, row in neg.sample(60, random_state=0).iterrows():
        before = log[(log["item_id"] == row["item_id"]) & (log["event_timestamp"] <= row["event_timestamp"])]
        assert row["item_seen"] == before["item_seen"].iloc[-1] and row["item_const"] == before["item_const"].iloc[-1]


def test_full_catalogue_takes_every_eligible_item():
    log = _log(seed=2, items=25)
    positives = log[log["click"] > 0].iloc[-30:]
    c = unshown.build(log, positives, ["item_id", "item_seen"], n="all", seed=0)
    shown = log.groupby("user_id")["item_id"].agg(set)
    first = log.groupby("item_id")["event_timestamp"].min()
    for g, (_, p) in enumerate(c.positives.iterrows()):
        eligible = {i for i, t in first.items() if t <= p["event_timestamp"]} - shown[p["user_id"]]
        assert set(c.frame[(c.group == g) & ~c.is_positive]["item_id"]) == eligible


def test_a_ranker_that_knows_the_positive_is_perfect_and_random_is_not():
    from models.metrics import functional as metrics

    log = _log(seed=3)
    c = unshown.build(log, log[log["click"] > 0].iloc[-50:], ["item_id", "item_seen"], n=40, seed=0)
    target = c.is_positive.astype(float)
    assert metrics.ranking_metrics(c.group, target, target, ks=(1,))["ndcg@1"] == pytest.approx(1.0)
    rand = metrics.ranking_metrics(c.group, np.random.default_rng(0).random(len(target)), target, ks=(10,))
    expected = np.minimum(1.0, 10 / (c.sizes + 1)).mean()  # the positive lands in the top 10 by chance
    assert rand["recall@10"] == pytest.approx(expected, abs=0.12) and expected < 0.6
