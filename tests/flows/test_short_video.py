"""The short-video generator's promises: parallel (non-funnel) labels, no category, determinism, learnable truth."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from flows.data.short_video import DECLARATION, LONG_VIEW_SHARE, ShortVideoConfig, generate
from models.contract import tables as contract
from models.contract.declaration import Declaration

SMALL = ShortVideoConfig(n_users=800, n_items=200, n_interactions=60_000, days=14, seed=3, n_authors=30)
BINARY = ["click", "long_view", "like", "follow"]


@pytest.fixture(scope="module")
def sv(tmp_path_factory):
    out = tmp_path_factory.mktemp("short_video")
    manifest = generate(out, SMALL)
    return out, manifest, contract.load_dataset(out)


def test_same_seed_same_bytes_other_seed_other_labels(tmp_path, sv):
    out = sv[0]
    generate(tmp_path / "a", SMALL)
    for name, table in contract.TABLES.items():
        assert (tmp_path / "a" / table.file).read_bytes() == (out / table.file).read_bytes(), name
        pd.testing.assert_frame_equal(contract.read_table(tmp_path / "a", name), contract.read_table(out, name))
    generate(tmp_path / "b", ShortVideoConfig(**{**SMALL.__dict__, "seed": 4}))
    assert not contract.read_table(tmp_path / "b", "interactions").click.equals(
        contract.read_table(out, "interactions").click)


def test_manifest_declares_parallel_tasks(sv):
    out, manifest, _ = sv
    loaded = contract.Manifest.require(out)
    decl = Declaration.from_dict({"tasks": loaded.tasks, "primary": loaded.primary, "context": loaded.context,
                                  "attributes": loaded.attributes})
    assert decl == DECLARATION
    assert decl.names == ["click", "long_view", "like", "follow", "watch_time"]
    assert all(t.parent is None for t in decl.tasks)
    assert decl.primary == "click"
    assert {t.name: t.gain for t in decl.binary} == {"click": 1, "long_view": 1, "like": 2, "follow": 3}
    wt = decl.get("watch_time")
    assert wt.type == "regression" and wt.transform == "log1p" and wt.min == 0
    assert decl.attributes == {"items": ("author", "duration")}
    assert manifest.rows == {"users": 800, "items": 200, "interactions": 60_000}


def test_tables_follow_the_contract_without_category(sv):
    _, manifest, t = sv
    tables = contract.tables_for(manifest.declaration)
    for name, table in tables.items():
        df = t[name]
        assert set(table.required) <= set(df.columns), name
        for col in table.columns:
            if col.name in df and col.kind != "any":
                assert str(df[col.name].dtype) in contract.DTYPE_NAMES[col.kind], (name, col.name, df[col.name].dtype)
    items = t["items"]
    assert "category" not in items and "price" not in items
    assert items.author.str.match(r"^a\d+$").all() and items.author.nunique() > 5
    assert items.duration.between(5.0, 300.0).all() and items.duration.std() > 10
    assert {"age", "gender", "segment"} <= set(t["users"].columns)
    i = t["interactions"]
    assert str(i.event_timestamp.dtype) == "datetime64[us, UTC]"
    assert i.event_timestamp.min() >= manifest.start_ts and i.event_timestamp.max() <= manifest.end_ts
    launch = i.item_id.map(items.set_index("item_id").event_timestamp)
    assert (i.event_timestamp >= launch).all()
    assert (items.event_timestamp > pd.Timestamp(manifest.params["log_start"])).any()  # some launch inside the log


def test_labels_are_binary_and_long_view_follows_watch_time(sv):
    t = sv[2]
    i = t["interactions"]
    for name in BINARY:
        assert str(i[name].dtype) == "int8" and set(i[name].unique()) <= {0, 1}, name
    assert str(i.watch_time.dtype) == "float64" and (i.watch_time >= 0).all() and i.watch_time.notna().all()
    duration = i.item_id.map(t["items"].set_index("item_id").duration)
    assert (i.watch_time <= duration).all()
    np.testing.assert_array_equal(i.long_view.to_numpy() == 1, (i.watch_time >= LONG_VIEW_SHARE * duration).to_numpy())


def test_behaviours_are_parallel_not_a_funnel(sv):
    i = sv[2]["interactions"]
    no_click = i[i.click == 0]
    # Autoplay: long views, likes and follows also happen without a tap, just less often.
    for name in ("long_view", "like", "follow"):
        assert no_click[name].sum() > 0, name
        assert i.loc[i.click == 1, name].mean() > no_click[name].mean(), name
    assert (no_click.watch_time > 0).mean() > 0.9


def test_rates_are_plausible(sv):
    i, params = sv[2]["interactions"], sv[1].params
    bands = {"click": (0.08, 0.25), "long_view": (0.10, 0.40), "like": (0.01, 0.08), "follow": (0.003, 0.03)}
    for name, (low, high) in bands.items():
        assert low < i[name].mean() < high, (name, i[name].mean())
        assert params[f"{name}_rate"] == pytest.approx(i[name].mean())


def test_planted_structure_is_learnable(sv):
    """On the last day, the generator's expected relevance beats popularity, which is no worse than random."""
    truth = sv[1].params["ground_truth"]
    assert truth["oracle"] > truth["popularity"] + 0.05, truth
    assert truth["popularity"] >= truth["random"], truth


def test_dataset_passes_validation(sv):
    from flows.validation.run import validate_dataset

    report = validate_dataset(sv[0])
    assert report.success, report.format()


def test_cli_short_video_scenario(tmp_path):
    out = tmp_path / "d"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "data", "synth", "--scenario", "short-video",
                          "--out", str(out), "--users", "100", "--items", "50", "--interactions", "3000",
                          "--days", "5"], capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr
    assert "interactions=3,000" in res.stdout and "oracle=" in res.stdout and "follow" in res.stdout
    manifest = contract.Manifest.load(out)
    assert manifest.source == "flows.data.short_video" and manifest.rows["interactions"] == 3000
    assert "category" not in contract.read_table(out, "items")


def test_the_oracle_is_the_generators_own_probabilities(tmp_path):
    """Redrawn from the manifest alone, it reproduces the ground truth the generator reported."""
    from flows.data.short_video import GAINS, oracle
    from models.metrics.functional import auc, ranking_metrics

    m = generate(tmp_path, ShortVideoConfig(n_users=300, n_items=100, n_interactions=20_000, days=6, seed=3))
    log = pd.read_parquet(tmp_path / "interactions.parquet")
    probs = oracle(tmp_path)(log)
    last = (log["event_timestamp"] >= pd.Timestamp(m.params["log_start"]) + pd.Timedelta(days=5)).to_numpy()
    expected = sum(GAINS[t] * probs[t] for t in probs)
    graded = sum(GAINS[t] * log[t].to_numpy(np.float64) for t in probs)
    ndcg = ranking_metrics(log["user_id"].to_numpy()[last], expected[last], graded[last], ks=(10,))["ndcg@10"]
    assert ndcg == pytest.approx(m.params["ground_truth"]["oracle"], abs=1e-12)
    for t in ("click", "long_view", "like", "follow"):
        assert abs(probs[t].mean() - log[t].mean()) < 0.01 and auc(probs[t], log[t]) > 0.7, t


def test_evaluation_finds_the_short_video_oracle(tmp_path):
    """The holdout's oracle comes from whichever scenario wrote the log; a log no generator wrote gets none."""
    from flows.data import short_video, synth
    from flows.evaluation_inputs import generator_oracle

    generate(tmp_path / "video", ShortVideoConfig(n_users=100, n_items=50, n_interactions=3000, days=4, seed=1))
    synth.generate(tmp_path / "shop", synth.SynthConfig(n_users=100, n_items=50, n_interactions=3000, days=4))
    log = pd.read_parquet(tmp_path / "video" / "interactions.parquet").head(50)
    found = generator_oracle(tmp_path / "video")(log)
    assert set(found) == {"click", "long_view", "like", "follow"}
    for t, p in short_video.oracle(tmp_path / "video")(log).items():
        assert np.array_equal(found[t], p), t
    assert set(generator_oracle(tmp_path / "shop")(log.assign(user_id="u1", item_id="i1"))) == {"click", "purchase"}
    (tmp_path / "bare").mkdir()
    assert generator_oracle(tmp_path / "bare") is None
    # Renamed after it was drawn, the log's objectives are no longer the generator's: no oracle to judge them.
    manifest = contract.Manifest.load(tmp_path / "video")
    manifest.tasks = [{**t, "name": "watch"} if t["name"] == "click" else t for t in manifest.tasks]
    manifest.primary = "watch"
    manifest.save(tmp_path / "video")
    assert generator_oracle(tmp_path / "video") is None


def test_rare_behaviours_are_rare_leave_the_core_log_unchanged_and_have_an_oracle(tmp_path, sv):
    """``rare=True`` (``--scenario short-video-rare``): comment, share and profile visit, each under about 1%,
    correlated with like, with nothing, and with follow; the other columns are the same log as without them."""
    from flows.data.short_video import RARE, oracle

    core = contract.read_table(sv[0], "interactions")
    manifest = generate(tmp_path, ShortVideoConfig(**{**SMALL.__dict__, "rare": True}))
    assert manifest.declaration.names == ["click", "long_view", "like", "follow", *RARE, "watch_time"]
    log = contract.read_table(tmp_path, "interactions")
    pd.testing.assert_frame_equal(log[core.columns], core)
    for t in RARE:
        assert 0.001 < log[t].mean() < 0.012, (t, log[t].mean())
    corr = log[["click", "like", "follow", *RARE]].astype(float).corr()
    assert corr.loc["comment", "like"] > 0.2 and corr.loc["profile_visit", "follow"] > 0.08
    assert abs(corr.loc["share", ["click", "like", "follow", "comment", "profile_visit"]]).max() < 0.03
    probs = oracle(tmp_path)(log)
    assert set(probs) == {*BINARY, *RARE}
    for t in RARE:  # the oracle's probabilities are the ones the labels were drawn from
        assert probs[t].mean() == pytest.approx(log[t].mean(), rel=0.15), t
