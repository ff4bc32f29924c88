"""The feature encoder: a dedicated code for missing values, a trained UNKNOWN (cold-start) embedding.

Code layout of every categorical feature (models/data/encoder.py): 0 UNKNOWN (unseen or rare values),
1 MISSING (None, NaN, pd.NA, "" and their string forms), then the vocabulary from 2.
Per-feature embedding widths are covered by tests/models/test_train.py
(test_embedding_widths_follow_the_vocabulary_in_one_lookup).
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from models.data import encoder
from models.data.encoder import FeatureEncoder, FeatureSpec

UNKNOWN, MISSING, FIRST = 0, 1, 2

MISSING_VALUES = [None, np.nan, pd.NA, "", "None", "nan", "<NA>", pd.NaT, float("nan")]


def _codes(spec: FeatureSpec, values, vectorised: bool, monkeypatch) -> list[int]:
    monkeypatch.setattr(encoder, "_VECTORISE_ABOVE", 0 if vectorised else 10**9)
    rows = {"c": np.array(values, dtype=object), "x": np.zeros(len(values))}
    return spec.encode_categorical(pd.DataFrame(rows) if vectorised else rows)[:, 0].tolist()


def test_layout_constants():
    assert (encoder.UNKNOWN, encoder.MISSING) == (UNKNOWN, MISSING)
    assert 0.01 <= encoder.OOV_RATE <= 0.05


@pytest.mark.parametrize("vectorised", [False, True])
def test_missing_values_take_the_missing_code_not_a_vocabulary_entry(vectorised, monkeypatch):
    fit = pd.DataFrame({"c": ["a", None, np.nan, pd.NA, "", "b", "None", "nan", "a"], "x": np.arange(9.0)})
    spec = FeatureSpec.fit(fit, ["c"], ["x"])
    assert spec.vocabs["c"] == ["a", "b"]  # no 'None', 'nan', '<NA>' or '' category
    assert spec.cardinalities == [2 + 2]  # UNKNOWN, MISSING, a, b
    got = _codes(spec, ["a", "b", "zz", 7, *MISSING_VALUES], vectorised, monkeypatch)
    assert got == [FIRST, FIRST + 1, UNKNOWN, UNKNOWN] + [MISSING] * len(MISSING_VALUES)
    # Nullable dtypes: pandas' string and Int64 columns hold pd.NA.
    for column in (pd.array(["a", None, "b"], dtype="string"), pd.array([3, None, 4], dtype="Int64")):
        df = pd.DataFrame({"c": column, "x": [0.0, 1.0, 2.0]})
        s = FeatureSpec.fit(df, ["c"], ["x"])
        assert len(s.vocabs["c"]) == 2 and s.encode_categorical(df)[:, 0].tolist() == [FIRST, MISSING, FIRST + 1]


def test_missing_values_of_a_feature_never_missing_in_training_take_the_trained_unknown_code(monkeypatch):
    spec = FeatureSpec.fit(pd.DataFrame({"c": ["a", "b"], "x": [0.0, 1.0]}), ["c"], ["x"])
    assert spec.vocabs["c"] == ["a", "b"]
    for vectorised in (False, True):
        assert _codes(spec, ["b", None, np.nan, "zz"], vectorised, monkeypatch) == [FIRST + 1, UNKNOWN, UNKNOWN,
                                                                                   UNKNOWN]


def test_rare_values_fold_into_unknown():
    df = pd.DataFrame({"c": ["a"] * 3 + ["b"], "x": np.zeros(4)})
    spec = FeatureSpec.fit(df, ["c"], ["x"], min_count=2)
    assert spec.vocabs["c"] == ["a"] and spec.encode_categorical(df)[:, 0].tolist() == [FIRST] * 3 + [UNKNOWN]


def test_spec_round_trips_through_json_and_old_specs_keep_their_layout(monkeypatch):
    fit = pd.DataFrame({"c": ["a", None, "b"], "d": ["x", "y", "y"], "x": [0.0, 1.0, 2.0]})
    spec = FeatureSpec.fit(fit, ["c", "d"], ["x"]).size_embeddings("auto")
    back = FeatureSpec.from_dict(json.loads(json.dumps(spec.to_dict())))
    rows = pd.DataFrame({"c": ["b", None, "q"], "d": [None, "y", "x"], "x": [0.0, 0.0, 0.0]})
    assert back == spec and (back.encode_categorical(rows) == spec.encode_categorical(rows)).all()
    enc = FeatureEncoder(spec.cardinalities, 1, spec.embedding_widths(16))
    FeatureEncoder(back.cardinalities, 1, back.embedding_widths(16)).load_state_dict(enc.state_dict(), strict=True)
    # A spec saved before the MISSING code: one reserved code, codes from 1, missing values as they were (0).
    old = {k: v for k, v in spec.to_dict().items() if k not in ("reserved", "missing")}
    legacy = FeatureSpec.from_dict(old)
    assert legacy.cardinalities == [3, 3]
    for vectorised in (False, True):
        assert _codes(legacy, ["a", "b", None, np.nan, "zz"], vectorised, monkeypatch) == [1, 2, 0, 0, 0]


def _lookups(enc: FeatureEncoder) -> list[torch.Tensor]:
    seen = []
    enc.embedding.register_forward_pre_hook(lambda _m, args: seen.append(args[0] - enc.offsets))
    return seen


def test_training_mode_replaces_ids_with_unknown_at_the_configured_rate():
    torch.manual_seed(0)
    assert FeatureEncoder([10, 5], 0).oov_rate == encoder.OOV_RATE  # the default
    cat = torch.stack([torch.randint(2, 10, (100_000,)), torch.randint(1, 5, (100_000,))], dim=1)
    for rate in (encoder.OOV_RATE, 0.1):
        enc = FeatureEncoder([10, 5], 0, 4, oov_rate=rate)
        seen = _lookups(enc)
        enc.train()(cat, torch.zeros(len(cat), 0))
        dropped = seen[-1] == UNKNOWN
        assert (seen[-1][~dropped] == cat[~dropped]).all()  # the rest untouched
        for j in range(2):  # every feature, at the configured rate (binomial sd ~ 0.0005 to 0.001)
            assert abs(dropped[:, j].float().mean().item() - rate) < 0.005
    off = FeatureEncoder([10, 5], 0, 4, oov_rate=0.0)
    seen = _lookups(off)
    off.train()(cat, torch.zeros(len(cat), 0))
    assert (seen[-1] == cat).all()
    with pytest.raises(ValueError):
        FeatureEncoder([10], 0, oov_rate=1.0)


def test_eval_mode_is_deterministic_and_unseen_ids_get_the_unknown_row():
    df = pd.DataFrame({"user_id": [f"u{i}" for i in range(50)], "hour": np.arange(50) % 24, "x": np.arange(50.0)})
    spec = FeatureSpec.fit(df, ["user_id", "hour"], ["x"]).size_embeddings("auto")
    enc = FeatureEncoder(spec.cardinalities, 1, spec.embedding_widths(16), oov_rate=0.5).eval()
    rows = pd.DataFrame({"user_id": ["u3", "cold", "u7"] * 100, "hour": [5, 99, 7] * 100, "x": np.ones(300)})
    cat, num = torch.from_numpy(spec.encode_categorical(rows)), torch.from_numpy(spec.encode_numeric(rows))
    first = enc(cat, num)
    assert torch.equal(first, enc(cat, num))
    w_user, w_hour = spec.embedding_widths(16)
    table = enc.embedding.weight
    torch.testing.assert_close(first[1, :w_user], table[UNKNOWN, :w_user])  # a cold user: the UNKNOWN row
    torch.testing.assert_close(first[1, w_user:w_user + w_hour], table[spec.cardinalities[0] + UNKNOWN, :w_hour])
    assert not torch.equal(first[0, :w_user], first[1, :w_user])


def _fit_synthetic(oov_rate: float, steps: int = 300):
    """Encoder + linear head on a task where each of 40 users has its own click rate."""
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    users = rng.integers(0, 40, 4000)
    rate = np.linspace(0.05, 0.95, 40)
    df = pd.DataFrame({"user_id": [f"u{u}" for u in users], "x": rng.normal(size=4000)})
    y = torch.tensor(rng.random(4000) < rate[users], dtype=torch.float32)
    spec = FeatureSpec.fit(df, ["user_id"], ["x"])
    cat, num = torch.from_numpy(spec.encode_categorical(df)), torch.from_numpy(spec.encode_numeric(df))
    enc = FeatureEncoder(spec.cardinalities, 1, 8, oov_rate=oov_rate)
    head = torch.nn.Linear(enc.out_dim, 1)
    init = enc.embedding.weight[UNKNOWN].detach().clone()
    opt = torch.optim.Adam([*enc.parameters(), *head.parameters()], lr=0.03)
    for _ in range(steps):
        idx = torch.from_numpy(rng.integers(0, 4000, 512))
        loss = torch.nn.functional.binary_cross_entropy_with_logits(head(enc(cat[idx], num[idx])).squeeze(1), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    enc.eval()
    cold = pd.DataFrame({"user_id": ["never-seen"], "x": [0.0]})
    with torch.no_grad():
        p_cold = torch.sigmoid(head(enc(torch.from_numpy(spec.encode_categorical(cold)),
                                        torch.from_numpy(spec.encode_numeric(cold))))).item()
    return enc.embedding.weight[UNKNOWN].detach(), init, p_cold, float(y.mean())


def test_training_moves_the_unknown_row_and_cold_users_score_near_the_average():
    row, init, p_cold, base = _fit_synthetic(encoder.OOV_RATE)
    assert (row - init).norm() > 0.1  # trained, not left at its random initialisation
    assert abs(p_cold - base) < 0.15, (p_cold, base)  # a generic user: about the average click rate
    row, init, _, _ = _fit_synthetic(0.0)
    assert torch.equal(row, init)  # without the replacement the UNKNOWN row never gets a gradient


def test_numeric_encoding_is_each_feature_s_own_arithmetic():
    """All numeric features are encoded as one matrix; each value must come out as the feature-by-feature
    arithmetic gives it (log1p of counts, the training range's clip, standardisation, missing at the mean),
    bit for bit, whichever features a request carries. Training fits ``bins`` after the spec: codes follow."""
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"count": rng.poisson(3.0, 50).astype(float), "price": rng.normal(10, 3, 50),
                       "age": rng.normal(40, 9, 50)})
    df.loc[[3, 7], "price"] = np.nan
    spec = FeatureSpec.fit(df, [], ["count", "price", "age"], log1p=["count"])
    spec.bounds["price"] = [8.0, 12.0]

    def by_feature(frame):
        out = np.zeros((50, 3), dtype=np.float32)
        for j, c in enumerate(spec.numeric):
            if c in frame:
                x = np.asarray(frame[c], dtype=np.float64)
                x = np.log1p(np.maximum(x, 0.0)) if c in spec.log1p else x
                x = np.clip(x, *spec.bounds[c]) if c in spec.bounds else x
                out[:, j] = (x - spec.stats[c][0]) / spec.stats[c][1]
        return np.nan_to_num(out, nan=0.0)

    rows = {c: df[c].to_numpy() for c in df}
    np.testing.assert_array_equal(spec.encode_numeric(rows), by_feature(rows))
    np.testing.assert_array_equal(spec.encode_numeric(df), by_feature(df))
    partial = {"age": rows["age"], "count": rows["count"]}  # a request without one feature: it sits at the mean
    np.testing.assert_array_equal(spec.encode_numeric(partial), by_feature(partial))
    spec.bounds = {}  # new bounds: the encoding follows them
    np.testing.assert_array_equal(spec.encode_numeric(rows), by_feature(rows))
    spec.bins = {"price": {"edges": [9.0, 11.0], "gain": None}}
    codes = spec.encode_categorical(rows)[:, 0]
    assert set(codes[[3, 7]]) == {spec.reserved - 1} and set(codes) <= {1, 2, 3, 4}
