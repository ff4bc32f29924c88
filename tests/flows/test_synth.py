"""The generator's promises: contract shape, determinism, causal labels, learnable structure."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flows.data.synth import SynthConfig, generate
from models.contract import tables as contract
from models.metrics.functional import ranking_metrics

SMALL = SynthConfig(n_users=800, n_items=200, n_interactions=60_000, days=14, seed=3)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    out = tmp_path_factory.mktemp("synth")
    manifest = generate(out, SMALL)
    return out, manifest, contract.load_dataset(out)


def test_tables_follow_the_contract(synth):
    _, manifest, tables = synth
    for name, table in contract.TABLES.items():
        df = tables[name]
        assert set(table.required) <= set(df.columns), name
        for col in df.columns:
            if col in {c.name for c in table.columns}:
                kind = table.column(col).kind
                assert str(df[col].dtype) in contract.DTYPE_NAMES[kind], (name, col, df[col].dtype)
    assert manifest.rows == {"users": 800, "items": 200, "interactions": 60_000}
    assert len(tables["interactions"]) == 60_000


def test_purchase_only_after_click_and_labels_are_binary(synth):
    i = synth[2]["interactions"]
    assert set(i.click.unique()) <= {0, 1} and set(i.purchase.unique()) <= {0, 1}
    assert (i.purchase <= i.click).all()
    assert 0.03 < i.click.mean() < 0.3
    assert 0.02 < i.purchase[i.click == 1].mean() < 0.5
    assert (i.dwell[i.click == 0] == 0).all() and (i.dwell[i.click == 1] > 0).all()


def test_timestamps_inside_declared_range_and_after_item_launch(synth):
    _, manifest, t = synth
    i = t["interactions"]
    assert i.event_timestamp.min() >= manifest.start_ts and i.event_timestamp.max() <= manifest.end_ts
    span = i.event_timestamp.max() - i.event_timestamp.min()
    assert span > pd.Timedelta(days=SMALL.days - 1)
    launch = i.item_id.map(t["items"].set_index("item_id").event_timestamp)
    assert (i.event_timestamp >= launch).all()


def test_skewed_activity_and_popularity(synth):
    i = synth[2]["interactions"]
    per_item = i.item_id.value_counts().to_numpy()
    per_user = i.user_id.value_counts().to_numpy()
    # The top 10% of items take far more than 10% of impressions (Zipf), users likewise.
    assert per_item[: len(per_item) // 10].sum() / per_item.sum() > 0.4
    assert per_user[: len(per_user) // 10].sum() / per_user.sum() > 0.25


def test_same_seed_same_tables(tmp_path, synth):
    generate(tmp_path, SMALL)
    for name in contract.TABLES:
        pd.testing.assert_frame_equal(contract.read_table(tmp_path, name), contract.read_table(synth[0], name))


def test_other_seed_other_tables(tmp_path, synth):
    generate(tmp_path, SynthConfig(**{**SMALL.__dict__, "seed": 4}))
    a = contract.read_table(tmp_path, "interactions")
    b = contract.read_table(synth[0], "interactions")
    assert not a.click.equals(b.click)


def test_planted_structure_is_learnable_and_oracle_is_an_upper_bound(synth):
    """A model of the features alone (segment x category click rate) beats popularity.

    That is the promise later models rely on; the generator's oracle stays above both.
    """
    _, manifest, t = synth
    x = t["interactions"].merge(t["users"][["user_id", "segment"]]).merge(t["items"][["item_id", "category"]])
    cut = x.event_timestamp.max() - pd.Timedelta(days=3)
    train, test = x[x.event_timestamp < cut], x[x.event_timestamp >= cut]
    pop = test.item_id.map(train.groupby("item_id").click.sum()).fillna(0).to_numpy()
    ctr = train.groupby(["segment", "category"]).click.mean()
    feat = pd.MultiIndex.from_frame(test[["segment", "category"]]).map(ctr).fillna(train.click.mean()).to_numpy()
    y, users = test.click.to_numpy(), test.user_id.to_numpy()
    ndcg_pop = ranking_metrics(users, pop, y)["ndcg@10"]
    ndcg_feat = ranking_metrics(users, np.asarray(feat, float), y)["ndcg@10"]
    assert ndcg_feat > ndcg_pop + 0.05, (ndcg_feat, ndcg_pop)
    truth = manifest.params["ground_truth"]
    assert truth["oracle"] > truth["popularity"] + 0.1
    assert truth["oracle"] > truth["random"] + 0.1


def test_cli_writes_a_dataset(tmp_path):
    out = tmp_path / "d"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "data", "synth", "--out", str(out),
                          "--users", "100", "--items", "50", "--interactions", "2000", "--days", "5"],
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "interactions=2,000" in res.stdout and "oracle=" in res.stdout
    assert contract.Manifest.load(out).rows["interactions"] == 2000


def test_the_oracle_is_the_generators_own_click_probability(tmp_path):
    """Redrawn from the manifest alone, it reproduces the ground truth the generator reported."""
    import pandas as pd

    from flows.data.synth import oracle
    from models.metrics.functional import auc, ranking_metrics

    m = generate(tmp_path, SynthConfig(n_users=300, n_items=80, n_interactions=20_000, days=6, seed=3))
    probs = oracle(tmp_path)(log := pd.read_parquet(tmp_path / "interactions.parquet"))
    last = log["event_timestamp"] >= pd.Timestamp(m.params["log_start"]) + pd.Timedelta(days=5)
    ndcg = ranking_metrics(log["user_id"][last].to_numpy(), probs["click"][last], log["click"][last].to_numpy(),
                           ks=(10,))["ndcg@10"]
    assert ndcg == pytest.approx(m.params["ground_truth"]["oracle"], abs=1e-12)
    assert abs(probs["click"].mean() - log["click"].mean()) < 0.01 and auc(probs["click"], log["click"]) > 0.75
    assert (probs["purchase"] <= probs["click"]).all()
