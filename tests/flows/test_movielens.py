"""The MovieLens 100K mapping: counts, sampling rules, labels, determinism, and it validates."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from flows.data.movielens import convert
from models.contract import tables as contract

SRC = Path(__file__).resolve().parents[3] / "shared" / "data" / "ml-100k"
pytestmark = pytest.mark.skipif(not (SRC / "u.data").exists(), reason=f"needs MovieLens 100K at {SRC}")


@pytest.fixture(scope="module")
def ml(tmp_path_factory):
    out = tmp_path_factory.mktemp("ml")
    manifest = convert(SRC, out)
    return out, manifest, contract.load_dataset(out)


def _ratings() -> pd.DataFrame:
    return pd.read_csv(SRC / "u.data", sep="\t", names=["user", "item", "rating", "ts"])


def test_counts_and_labels(ml):
    _, manifest, t = ml
    i, r = t["interactions"], _ratings()
    assert (i.click == 1).sum() == len(r) == 100_000
    n_rated = r.groupby("user").size()
    expected_neg = np.minimum(4 * n_rated, 1682 - n_rated).sum()
    # Negatives timed before their movie's release are dropped: a few percent at most.
    assert 0.95 * expected_neg < (i.click == 0).sum() <= expected_neg
    assert (i.like <= i.click).all()
    assert i.like[i.click == 1].mean() == pytest.approx((r.rating >= 4).mean())
    declaration = manifest.declaration
    assert declaration.names == ["click", "like", "rating"] and declaration.get("like").parent == "click"
    assert (i.rating[i.click == 0] == 0).all() and i.rating[i.click == 1].between(1, 5).all()
    assert manifest.rows == {"users": 943, "items": 1682, "interactions": len(i)}


def test_negatives_are_unrated_and_unique_per_user(ml):
    i = ml[2]["interactions"]
    neg = i[i.click == 0]
    rated = set(zip(_ratings().user.astype(str), _ratings().item.astype(str)))
    assert not any(pair in rated for pair in zip(neg.user_id, neg.item_id))
    assert not neg.duplicated(["user_id", "item_id"]).any()


def test_negatives_follow_the_users_activity_in_time(ml):
    i = ml[2]["interactions"]
    pos_times = i[i.click == 1].groupby("user_id").event_timestamp.agg(set)
    neg = i[i.click == 0].sample(2000, random_state=0)
    assert all(ts in pos_times[u] for u, ts in zip(neg.user_id, neg.event_timestamp))


def test_contract_types_and_range(ml):
    _, manifest, t = ml
    for name, table in contract.TABLES.items():
        assert set(table.required) <= set(t[name].columns)
        for key in ("user_id", "item_id"):
            if key in t[name]:
                assert t[name][key].map(type).eq(str).all(), (name, key)
    ts = t["interactions"].event_timestamp
    assert str(ts.dt.tz) == "UTC"
    assert ts.min() >= manifest.start_ts and ts.max() == manifest.end_ts
    launch = t["interactions"].item_id.map(t["items"].set_index("item_id").event_timestamp)
    assert (ts >= launch).all()  # no impression before its item exists
    joined = t["interactions"].user_id.map(t["users"].set_index("user_id").event_timestamp)
    assert (ts >= joined).all()
    assert set(t["interactions"].user_id) <= set(t["users"].user_id)
    assert set(t["interactions"].item_id) <= set(t["items"].item_id)
    assert t["items"].category.isin(["Action", "Comedy", "Drama"]).mean() > 0.5


def test_same_seed_same_tables_other_seed_other_negatives(ml, tmp_path):
    convert(SRC, tmp_path / "a")
    pd.testing.assert_frame_equal(contract.read_table(tmp_path / "a", "interactions"),
                                  contract.read_table(ml[0], "interactions"))
    convert(SRC, tmp_path / "b", seed=1)
    a = contract.read_table(tmp_path / "b", "interactions")
    assert not a.item_id.equals(contract.read_table(ml[0], "interactions").item_id)


def test_movielens_validates_clean(ml):
    from flows.validation.run import validate_dataset

    report = validate_dataset(ml[0])
    assert report.success, report.format()
