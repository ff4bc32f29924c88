"""Quantile-binned numerics: chosen per feature where validation says the value alone misses the shape."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from models.data import binning
from models.data.encoder import MISSING, FeatureSpec


def _frame(n: int, seed: int) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    band = rng.uniform(0, 10, n)  # clicks only in a middle band: no monotone transform ranks it
    trend = rng.uniform(0, 10, n)  # clicks grow with it: the value already ranks it
    noise = rng.normal(size=n)
    logit = -1.5 + 2.5 * ((band > 4) & (band < 6)) + 0.3 * (trend - 5)
    click = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int8)
    return pd.DataFrame({"band": band, "trend": trend, "noise": noise, "click": click})


def test_bins_are_chosen_where_the_shape_is_not_monotone():
    train, valid = _frame(20_000, 0), _frame(5_000, 1)
    chosen = binning.choose(train, valid, ["band", "trend", "noise"], ["click"])
    assert set(chosen) == {"band"} and chosen["band"]["gain"] > 0.1
    assert set(binning.choose(train, valid, ["band", "trend", "noise"], ["click"], "all")) == {"band", "trend", "noise"}
    assert binning.choose(train, valid, ["band"], ["click"], "none") == {}
    with pytest.raises(ValueError, match="auto, all or none"):
        binning.choose(train, valid, ["band"], ["click"], "some")


def test_a_count_with_few_values_gets_merged_edges_and_codes_follow_them():
    x = np.array([0, 0, 0, 0, 1, 1, 2, 5, 9, 30], dtype=float)
    edges = binning.quantile_edges(x, 8)
    assert edges == sorted(set(edges)) and len(edges) < 7
    codes = binning.codes(np.array([np.nan, -1.0, 0.0, 100.0]), edges, first=2)
    assert codes[0] == MISSING and codes[1] == 2 and codes[3] == 2 + len(edges)


def test_binned_features_join_the_one_lookup_and_encode_the_same_on_both_paths():
    train = _frame(3_000, 2)
    spec = FeatureSpec.fit(train, [], ["band", "trend"])
    spec.bins = {"band": {"edges": binning.quantile_edges(train["band"].to_numpy(), 16), "gain": 0.2}}
    spec.size_embeddings("auto")
    assert spec.slots == ["band#bins"] and spec.cardinalities == [len(spec.bins["band"]["edges"]) + 3]
    frame = pd.DataFrame({"band": [np.nan, 0.1, 5.0, 9.9], "trend": [1.0, 2.0, 3.0, 4.0]})
    as_dict = {c: frame[c].to_numpy() for c in frame}
    np.testing.assert_array_equal(spec.encode_categorical(frame), spec.encode_categorical(as_dict))
    assert spec.encode_categorical(frame)[0, 0] == MISSING
    again = FeatureSpec.from_dict(spec.to_dict())
    np.testing.assert_array_equal(again.encode_categorical(frame), spec.encode_categorical(frame))
