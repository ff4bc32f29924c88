"""Time outside the data: request-time features held to what training saw, a flag when the request time lies
beyond the data by more than the longest feature window, and validation's warning on timestamps without a zone.

The flag through a real HTTP server is checked in tests/services/test_service.py (test_score_and_cold_start), on the
server those tests already start.
"""

from __future__ import annotations

import logging

import numpy as np
import pandas as pd
import pytest

from feature_repo.schema import WINDOWS
from flows.validation.run import validate_dataset
from models.contract import tables as contract
from models.data.encoder import FeatureSpec, SpecFit
from services import ranking
from tests.fakes import PredictOnly

DAY = 86_400.0


def _training_rows(n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    return pd.DataFrame({"item_id": [f"i{j % 20}" for j in range(n)],
                         "item_age_days": rng.uniform(3.0, 400.0, n),
                         "item_impressions_30d": rng.integers(0, 50, n).astype(float)})


def _spec(df: pd.DataFrame) -> FeatureSpec:
    return FeatureSpec.fit(df, ["item_id"], ["item_age_days", "item_impressions_30d"],
                           log1p=["item_impressions_30d"])


def test_an_item_older_than_any_seen_is_encoded_as_the_oldest_seen():
    df = _training_rows()
    spec = _spec(df)
    oldest, youngest = df["item_age_days"].max(), df["item_age_days"].min()
    busiest = df["item_impressions_30d"].max()
    asked = {"item_id": np.array(["i1"] * 4, dtype=object),
             # months after the log, an item launched after the request, a missing age, an age inside the range
             "item_age_days": np.array([oldest + 120.0, -7.0, np.nan, 200.0]),
             "item_impressions_30d": np.array([busiest * 1000, -3.0, np.nan, 10.0])}
    edges = {"item_id": asked["item_id"], "item_age_days": np.array([oldest, youngest, np.nan, 200.0]),
             "item_impressions_30d": np.array([busiest, 0.0, np.nan, 10.0])}
    np.testing.assert_array_equal(spec.encode_numeric(asked), spec.encode_numeric(edges))
    assert spec.encode_numeric(asked)[2].tolist() == [0.0, 0.0]  # missing still sits at the mean
    # the bounds travel in the artifact's spec: a reloaded spec clips alike
    reloaded = FeatureSpec.from_dict(spec.to_dict())
    np.testing.assert_array_equal(reloaded.encode_numeric(asked), spec.encode_numeric(edges))


def test_a_spec_saved_without_bounds_encodes_as_it_always_did():
    spec = _spec(_training_rows())
    old = {k: v for k, v in spec.to_dict().items() if k != "bounds"}
    far = {"item_age_days": np.array([10_000.0]), "item_impressions_30d": np.array([0.0])}
    mean, std = spec.stats["item_age_days"]
    assert FeatureSpec.from_dict(old).encode_numeric(far)[0, 0] == pytest.approx((10_000.0 - mean) / std, rel=1e-5)


def test_a_streamed_fit_has_the_same_bounds_as_a_whole_one():
    df = _training_rows(1000)
    fit = SpecFit(["item_id"], ["item_age_days", "item_impressions_30d"], log1p=["item_impressions_30d"])
    for part in np.array_split(np.arange(len(df)), 7):
        fit.add(df.iloc[part])
    streamed, whole = fit.spec(), _spec(df)
    assert streamed.bounds == whole.bounds
    assert whole.bounds["item_age_days"] == [df["item_age_days"].min(), df["item_age_days"].max()]
    assert whole.bounds["item_impressions_30d"][1] == pytest.approx(np.log1p(df["item_impressions_30d"].max()))


# ---- the flag ------------------------------------------------------------------------------------------------------

START, END = pd.Timestamp("2026-09-01", tz="UTC"), pd.Timestamp("2026-10-01", tz="UTC")
META = {"data": {"time_ranges": {"train": [str(START), "2026-09-20 00:00:00+00:00"],
                                 "valid": ["2026-09-20 00:00:01+00:00", "2026-09-25 00:00:00+00:00"],
                                 "test": ["2026-09-25 00:00:01+00:00", str(END)]}}}


def test_the_data_span_is_the_artifacts_whole_time_range():
    assert ranking.data_span(META) == (START.timestamp(), END.timestamp())
    assert ranking.data_span({}) is None and ranking.data_span({"data": {"time_ranges": {}}}) is None


def test_a_request_time_beyond_the_longest_window_is_outside_the_data():
    span, window = (START.timestamp(), END.timestamp()), max(WINDOWS) * DAY
    for inside in (START.timestamp() - window, START.timestamp(), END.timestamp(), END.timestamp() + window):
        assert ranking.time_outside_data(span, inside) is None
    after = ranking.time_outside_data(span, END.timestamp() + window + DAY)
    assert f"31 days after the data ends ({END.strftime('%Y-%m-%dT%H:%M:%SZ')})" in after
    assert f"longest feature window ({max(WINDOWS)} days)" in after and "context.timestamp" in after
    assert "before the data starts" in ranking.time_outside_data(span, START.timestamp() - window - DAY)
    assert ranking.time_outside_data(None, 0.0) is None  # an artifact without time ranges: nothing to judge by


def test_an_answer_without_a_timestamp_months_after_the_data_carries_the_flag():
    """The service's path (ranking.rank / score_items) with the model's own span; the store is stood in for."""
    class Scorer(PredictOnly):
        meta = META
        fusion_method = "sum"
        tasks = _Tasks()

        def predict(self, cols):
            return {"click": np.linspace(0.1, 0.9, len(cols["item_id"]))}

    class Reader:
        def columns(self, user_id, item_ids, request_ts):
            return {"item_id": np.asarray(item_ids, dtype=object)}, np.ones(len(item_ids), bool), True

    model = ranking.Model(tag="m:1", scorer=Scorer(), weights={"click": 1.0})
    now = ranking.rank(model, Reader(), "u1", ["i1", "i2"])  # no request time: now, after 2026-10-31
    assert now["time_outside_data"] is True and "after the data ends" in now["warnings"][0]
    inside = ranking.rank(model, Reader(), "u1", ["i1", "i2"], request_ts=END.timestamp() - DAY)
    assert inside["time_outside_data"] is False and inside["warnings"] == []
    scored = ranking.score_items(model, Reader(), "u1", ["i1"], request_ts=END.timestamp() + 40 * DAY)
    assert scored["time_outside_data"] is True and len(scored["warnings"]) == 1


class _Tasks(list):
    def __init__(self):
        from models.tasks import TaskSpec

        super().__init__([TaskSpec(name="click")])


# ---- validation ----------------------------------------------------------------------------------------------------

def _naive(directory) -> None:
    """The log's timestamps as naive datetimes, the items' as ISO text without a zone; users' stay in UTC."""
    log = contract.read_table(directory, "interactions")
    log[contract.TIMESTAMP] = log[contract.TIMESTAMP].dt.tz_convert("UTC").dt.tz_localize(None)
    log.to_parquet(directory / "interactions.parquet", index=False)
    items = contract.read_table(directory, "items")
    items[contract.TIMESTAMP] = items[contract.TIMESTAMP].dt.strftime("%Y-%m-%dT%H:%M:%S.%f")
    items.to_parquet(directory / "items.parquet", index=False)


def test_naive_timestamps_are_recognised():
    assert contract.naive_timestamps(pd.Series(pd.to_datetime(["2026-01-01 10:00"])))
    assert not contract.naive_timestamps(pd.Series(pd.to_datetime(["2026-01-01 10:00"], utc=True)))
    assert not contract.naive_timestamps(pd.Series(["2026-01-01T10:00:00Z", "2026-01-01 10:00:00+02:00",
                                                    "2026-01-01T10:00:00.5-0500", None]))
    assert contract.naive_timestamps(pd.Series(["2026-01-01T10:00:00Z", "2026-01-01T10:00:00"]))
    assert contract.naive_timestamps(pd.Series(["2026-01-01"]))  # a date alone: its "-01" is no offset
    assert not contract.naive_timestamps(pd.Series(["yesterday"]))  # unparseable: the parseable rule's failure


@pytest.mark.parametrize("chunk_rows", [1_000_000, 1_500], ids=["whole", "chunked"])
def test_timestamps_without_a_zone_pass_validation_with_a_warning_naming_the_column(dataset_copy, tmp_path,
                                                                                    chunk_rows, caplog):
    _naive(dataset_copy)
    with caplog.at_level(logging.WARNING, logger="flows.validation.run"):
        report = validate_dataset(dataset_copy, chunk_rows=chunk_rows, docs_dir=tmp_path / "gx")
    assert report.success, report.format()
    zones = [w for w in report.warnings if "no timezone" in w]
    assert [w.split(":")[0] for w in zones] == ["items.event_timestamp", "interactions.event_timestamp"]
    assert all("taken as UTC" in w for w in zones)
    assert "warning: interactions.event_timestamp: timestamps carry no timezone" in report.format()
    logged = [r.getMessage() for r in caplog.records if "no timezone" in r.getMessage()]
    assert len(logged) == 2 and "interactions.event_timestamp" in logged[1]
