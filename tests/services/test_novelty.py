"""Novelty at serving: the long tail favoured, what the user already liked demoted, and 0 changes nothing."""

from __future__ import annotations

import numpy as np

from models.tasks import TaskSpec, TaskSet
from services import ranking
from tests.fakes import PredictOnly

ITEMS = ["hit", "mid", "rare", "liked"]
CLICK = {"hit": 0.9, "mid": 0.6, "rare": 0.3, "liked": 0.8}
COUNTS = {"hit": 5000.0, "mid": 300.0, "rare": 2.0, "liked": 400.0}  # item_click_count_30d, the popularity feature


class _Scorer(PredictOnly):
    fusion_method = "sum"
    tasks = TaskSet([TaskSpec(name="click")], primary="click")

    def predict(self, cols):
        return {"click": np.array([CLICK[i] for i in cols["item_id"]])}


class _Reader:
    def columns(self, user_id, item_ids, request_ts):
        cols = {"item_id": np.asarray(item_ids, dtype=object),
                "item_click_count_30d": np.array([COUNTS[i] for i in item_ids])}
        return cols, np.ones(len(item_ids), bool), True


def _order(**kw) -> list[str]:
    model = ranking.Model(tag="m:1", scorer=_Scorer(), weights={"click": 1.0})
    answer = ranking.rank(model, _Reader(), "u", ITEMS, **kw)
    return [it["item_id"] for it in answer["items"]]


def test_zero_novelty_is_the_fused_order():
    assert _order() == _order(novelty=0.0, seen_items={"liked"}) == ["hit", "liked", "mid", "rare"]


def test_novelty_favours_the_long_tail_and_demotes_what_the_user_liked():
    assert _order(novelty=1.0) == ["rare", "mid", "liked", "hit"]  # by tail alone: rarest first
    # half and half: fused (min-max) 1, .83, .5, 0 and tail (min-max of -log1p(count)) 0, .34, .38, 1
    assert _order(novelty=0.5) == ["liked", "hit", "rare", "mid"]
    assert _order(novelty=0.5, seen_items={"liked"}) == ["hit", "rare", "mid", "liked"]  # liked: x (1 - novelty)


def test_without_a_popularity_feature_only_the_history_counts():
    assert ranking.tail_scores({"item_id": np.array(ITEMS)}, "click") is None
    tail = ranking.tail_scores({"item_click_count_7d": np.array([0.0, np.nan, 10.0])}, "click")
    assert tail.tolist() == [0.0, 0.0, -np.log1p(10.0)]
