"""The feature store for real: Feast on parquet + SQLite, and on the Redis at 127.0.0.1:6379."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from feature_repo.schema import WINDOWS, FeatureSchema, count_column, rate_column
from flows.data.synth import SynthConfig, generate
from feature_repo import store as fstore
from feature_repo.build import build_all
from feature_repo.materialize import materialize
from feature_repo.online import FeatureReader
from feature_repo.online_status import status
from feature_repo.training_set import training_set
from models.contract import tables as contract

REDIS = "127.0.0.1:6379"
REDIS_DB = 13  # the tests' own database, flushed after use


def _redis_or_skip():
    import redis

    try:
        client = redis.Redis(host="127.0.0.1", port=6379, db=REDIS_DB, socket_connect_timeout=1)
        client.ping()
        return client
    except redis.exceptions.ConnectionError:
        pytest.skip("needs a Redis server at 127.0.0.1:6379 (the machine and CI run one)")


def _plant_leak(directory: Path) -> dict:
    """A new user and item whose only history is planted: a clicked, bought impression, then two more."""
    t = contract.load_dataset(directory)
    start = t["interactions"][contract.TIMESTAMP].min().floor("D")
    t1 = start + pd.Timedelta(days=3, hours=10)
    before = start - pd.Timedelta(days=5)
    users = pd.concat([t["users"], pd.DataFrame({"user_id": ["leaky"], contract.TIMESTAMP: [before],
                                                   "age": [30], "gender": ["f"], "segment": ["s0"]})])
    items = pd.concat([t["items"], pd.DataFrame({"item_id": ["leaky_item"], contract.TIMESTAMP: [before],
                                                   "category": ["c0"], "price": [10.0]})])
    planted = pd.DataFrame({
        "user_id": ["leaky"] * 3, "item_id": ["leaky_item"] * 3,
        contract.TIMESTAMP: [t1, t1 + pd.Timedelta(hours=6), t1 + pd.Timedelta(days=2)],
        "device": ["mobile"] * 3, "position": [0, 0, 0], "click": [1, 0, 0], "purchase": [1, 0, 0],
        "dwell": [30.0, 0.0, 0.0]})
    ts_type = t["interactions"][contract.TIMESTAMP].dtype
    inter = pd.concat([t["interactions"], planted.astype({contract.TIMESTAMP: ts_type})])
    for name, df in (("users", users), ("items", items), ("interactions", inter)):
        contract.write_table(df.reset_index(drop=True), directory, name)
    return {"t1": t1}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    out = tmp_path_factory.mktemp("features") / "data"
    generate(out, SynthConfig(n_users=150, n_items=60, n_interactions=6000, days=8, seed=3))
    planted = _plant_leak(out)
    summary = build_all(out)
    return out, summary, planted


def test_training_set_is_point_in_time_correct(built):
    out, summary, planted = built
    table = pd.read_parquet(summary["training_file"])
    raw = contract.load_dataset(out)["interactions"]
    assert summary["training_rows"] == len(raw) == len(table)  # no impression dropped or duplicated
    _assert_no_leak(table)


def test_the_log_read_a_batch_at_a_time_gives_the_same_training_set(built):
    """build_all reads the log from its directory in batches, sorted on disk by DuckDB; the frame in memory,
    sorted by pandas, gives the same rows in the same order."""
    out, summary, _ = built
    store = fstore.open_store(fstore.StoreSettings.for_dataset(out))
    from_frame = training_set(store, contract.load_dataset(out)["interactions"], join="asof")
    pd.testing.assert_frame_equal(from_frame, pd.read_parquet(summary["training_file"]))
    pd.testing.assert_frame_equal(training_set(store, out, chunk_rows=700, join="asof"), from_frame)
    assert not list((Path(store.repo_path) / "duckdb_tmp").glob("entities-*"))  # its scratch database removed
    # Joined a range of impressions per query (as at 100M, where one query's output sort filled the disk):
    # ranges of 1,000 of the sorted log, read back in chunks of 700 that straddle them, the same rows in order.
    from feature_repo.asof import iter_asof_training_set
    from feature_repo.training_set import entity_frame, log_chunks

    ranged = pd.concat(iter_asof_training_set(store, (entity_frame(c) for c in log_chunks(out, 700)), chunk_rows=700,
                                              order=[contract.TIMESTAMP, "user_id", "item_id"], range_rows=1000),
                       ignore_index=True)
    pd.testing.assert_frame_equal(ranged, from_frame)
    # Ties: impressions sharing a timestamp (other users), and repeats of the same keys with other labels.
    raw = contract.load_dataset(out)["interactions"]
    same_time = raw.sample(300, random_state=4).assign(user_id=lambda d: d["user_id"].sample(frac=1, random_state=5)
                                                       .to_numpy())
    repeats = raw.sample(300, random_state=6).assign(click=lambda d: 1 - d["click"], purchase=0)
    tied = pd.concat([repeats, raw, same_time], ignore_index=True)
    contract.write_table(tied, out.parent / "tied", "interactions")
    pd.testing.assert_frame_equal(training_set(store, out.parent / "tied", chunk_rows=700, join="asof"),
                                  training_set(store, tied, join="asof"))


def test_the_log_file_read_by_duckdb_gives_the_same_training_set(built, tmp_path):
    """From a directory DuckDB reads the log's parquet itself (``asof.log_select``) and sorts only the joined
    rows, a range of timestamps per query; a log whose stamps need pandas' parsing takes the batch path. Each
    gives the rows and order of the frame in memory: with ranges of 1,000 impressions, with ties across
    users and keys, with naive stamps (UTC, as pandas reads them), and with ISO-string stamps."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from feature_repo.asof import iter_asof_training_set, log_select

    out, _, _ = built
    store = fstore.open_store(fstore.StoreSettings.for_dataset(out))
    raw = contract.load_dataset(out)["interactions"]
    same_time = raw.sample(300, random_state=4).assign(user_id=lambda d: d["user_id"].sample(frac=1, random_state=5)
                                                       .to_numpy())
    repeats = raw.sample(300, random_state=6).assign(click=lambda d: 1 - d["click"], purchase=0)
    tied = pd.concat([repeats, raw, same_time], ignore_index=True)
    expected = training_set(store, tied, join="asof")
    log = tmp_path / "tied" / contract.INTERACTIONS.file
    contract.write_table(tied, log.parent, "interactions")
    assert log_select(log) is not None
    order = [contract.TIMESTAMP, "user_id", "item_id"]
    ranged = pd.concat(iter_asof_training_set(store, log, chunk_rows=700, order=order, range_rows=1000),
                       ignore_index=True)
    pd.testing.assert_frame_equal(ranged, expected)
    for name, stamps in (("naive", tied[contract.TIMESTAMP].dt.tz_localize(None)),
                         ("strings", tied[contract.TIMESTAMP].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ"))):
        directory = tmp_path / name
        directory.mkdir()
        pq.write_table(pa.Table.from_pandas(tied.assign(**{contract.TIMESTAMP: stamps}), preserve_index=False),
                       directory / contract.INTERACTIONS.file)
        assert (log_select(directory / contract.INTERACTIONS.file) is None) == (name == "strings")
        pd.testing.assert_frame_equal(training_set(store, directory, chunk_rows=700, join="asof"), expected)


def _assert_no_leak(table: pd.DataFrame) -> None:
    """The planted user's three impressions (``_plant_leak``) see their own history only from the next day."""
    leak = table[table.user_id == "leaky"].sort_values(contract.TIMESTAMP)
    assert len(leak) == 3
    # The clicked, bought impression must not see its own labels through any feature ...
    first = leak.iloc[0]
    for w in WINDOWS:
        for prefix in ("user", "item"):
            for task in ("click", "purchase"):
                assert first[count_column(prefix, task, w)] == 0 and first[rate_column(prefix, task, w)] == 0
    # ... nor may an impression later the same day (snapshots are taken at midnight) ...
    assert leak.iloc[1]["user_click_count_30d"] == 0 and leak.iloc[1]["item_click_count_30d"] == 0
    # ... while two days later the click is history, and visible.
    assert leak.iloc[2]["user_click_count_30d"] == 1 and leak.iloc[2]["user_purchase_count_7d"] == 1
    assert leak.iloc[2]["item_click_count_7d"] == 1 and leak.iloc[2]["user_top_category_30d"] == "c0"
    # The rate of a task with a parent is per parent positive: one purchase per click.
    assert leak.iloc[2]["user_purchase_rate_7d"] == 1.0 and leak.iloc[2]["user_click_rate_7d"] == 1 / 2


def test_the_asof_join_gives_feasts_training_set_row_for_row(built):
    """The default join (DuckDB ASOF over the views' sources) against Feast's own retrieval, on a log with a
    planted leak, users and items that appear mid-log, and chunks that split it: same rows, columns, dtypes."""
    out, _, _ = built
    store = fstore.open_store(fstore.StoreSettings.for_dataset(out))
    raw = contract.load_dataset(out)["interactions"]
    # Impressions stamped exactly at a snapshot's midnight: Feast joins a feature row stamped at the same instant
    midnight = raw.sample(400, random_state=2)
    raw = pd.concat([raw, midnight.assign(**{contract.TIMESTAMP: midnight[contract.TIMESTAMP].dt.floor("D")})],
                    ignore_index=True)
    feast = training_set(store, raw, chunk_rows=2500, join="feast")
    asof = training_set(store, raw, chunk_rows=1000, join="asof")
    pd.testing.assert_frame_equal(asof, feast)
    assert asof["user_click_count_30d"].isna().sum() == feast["user_click_count_30d"].isna().sum()
    with pytest.raises(ValueError, match="'asof' or 'feast'"):
        training_set(store, raw, join="spark")


@pytest.fixture
def spark_engine():
    """The spark engine's preconditions, and its session stopped afterwards (it outlives the store otherwise)."""
    from feature_repo.engines import EngineUnavailable, check_available

    try:
        check_available("spark")
    except EngineUnavailable as e:
        pytest.skip(str(e))
    yield
    from pyspark.sql import SparkSession

    session = SparkSession.getActiveSession()
    if session is not None:
        session.stop()


def test_the_spark_engine_builds_the_same_store(built, spark_engine, tmp_path):
    """MTLREC_OFFLINE_ENGINE=spark on Spark local[2]: the views read SparkSources, Feast's Spark offline store
    does the point-in-time retrieval and its Spark compute engine the materialisation. Same training set as the
    default, row for row, with the planted leak held back, and the same online rows."""
    from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

    out, summary, _ = built
    s = fstore.StoreSettings.for_dataset(out, workspace=tmp_path / "spark", offline="spark")
    got = build_all(out, s)
    spark, default = fstore.open_store(s), fstore.open_store(fstore.StoreSettings.for_dataset(out))
    assert spark.config.offline_store.type == "spark" and spark.config.batch_engine.type == "spark.engine"
    assert all(isinstance(v.batch_source, SparkSource) for v in spark.list_feature_views())
    table = pd.read_parquet(got["training_file"])
    pd.testing.assert_frame_equal(table, pd.read_parquet(summary["training_file"]))
    _assert_no_leak(table)
    for view in default.list_feature_views():
        key = view.entity_columns[0].name
        ids = [*table[key].drop_duplicates().head(40), "leaky" if key == "user_id" else "leaky_item", "nobody"]
        refs = [f"{view.name}:{f.name}" for f in view.features]
        rows = [{key: i} for i in ids]
        pd.testing.assert_frame_equal(spark.get_online_features(features=refs, entity_rows=rows).to_df(),
                                      default.get_online_features(features=refs, entity_rows=rows).to_df())
    # The service on this store, where pyspark cannot be imported (a bento does not ship it): same online rows.
    pairs = [[str(u), str(i)] for u, i in table[["user_id", "item_id"]].head(30).itertuples(index=False)]
    every = [f"{v.name}:{f.name}" for v in default.list_feature_views() for f in v.features]
    expected = default.get_online_features(features=every,
                                           entity_rows=[{"user_id": u, "item_id": i} for u, i in pairs]).to_df()
    probe = f"""
import sys, importlib.abc
class NoSpark(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name == "pyspark" or name.startswith("pyspark."):
            raise ImportError("no pyspark in a bento")
sys.meta_path.insert(0, NoSpark())
from feature_repo import store as fstore
s = fstore.StoreSettings.for_dataset({str(out)!r}, workspace={str(s.workspace)!r}, offline="spark")
st = fstore.open_store(s, serving=True)
assert st.config.offline_store.type == "duckdb", st.config.offline_store
rows = [{{"user_id": u, "item_id": i}} for u, i in {pairs!r}]
st.get_online_features(features={every!r}, entity_rows=rows).to_df().to_parquet(sys.argv[1])
"""
    got_path = tmp_path / "served.parquet"
    subprocess.run([sys.executable, "-c", probe, str(got_path)], check=True, cwd=Path(__file__).resolve().parents[2])
    pd.testing.assert_frame_equal(pd.read_parquet(got_path).sort_index(axis=1), expected.sort_index(axis=1))
    pipeline = yaml.safe_load((s.workspace / "feature_store.yaml").read_text())  # the pipeline's, untouched
    assert pipeline["offline_store"]["type"] == "spark"


@pytest.mark.parametrize("task,prefix,key,w", [("click", "user", "user_id", 7), ("purchase", "item", "item_id", 30),
                                               ("click", "item", "item_id", 1)])
def test_every_aggregate_counts_only_earlier_days(built, task, prefix, key, w):
    """Brute force on sampled rows: each window's count is exactly the positives in [midnight-w, midnight)."""
    out, summary, _ = built
    table = pd.read_parquet(summary["training_file"])
    raw = contract.load_dataset(out)["interactions"]
    hits = raw[raw[task] == 1][[key, contract.TIMESTAMP]]
    sample = table.sample(200, random_state=0)
    for _, row in sample.iterrows():
        midnight = row[contract.TIMESTAMP].floor("D")
        mine = hits[(hits[key] == row[key]) & (hits[contract.TIMESTAMP] < midnight)
                    & (hits[contract.TIMESTAMP] >= midnight - pd.Timedelta(days=w))]
        assert row[count_column(prefix, task, w)] == len(mine), (row[key], row[contract.TIMESTAMP])


def test_context_features_follow_the_request_time(built):
    _, summary, _ = built
    table = pd.read_parquet(summary["training_file"])
    ts = table[contract.TIMESTAMP]
    assert (table["hour"] == ts.dt.hour).all() and (table["dow"] == ts.dt.dayofweek).all()
    expected = (ts - pd.to_datetime(table["item_since_ts"], unit="s", utc=True)).dt.total_seconds() / 86_400
    np.testing.assert_allclose(table["item_age_days"], expected, rtol=1e-9)


def assert_same_values(served: pd.DataFrame, sdk: pd.DataFrame) -> None:
    """Equal column for column; a missing value is missing whether Feast spells it None or NaN.

    (Feast returns an all-missing numeric column as objects holding None, a partly missing one as NaN.)
    """
    assert set(served.columns) == set(sdk.columns)
    norm = lambda df: df.astype(object).where(df.notna(), np.nan)  # noqa: E731
    pd.testing.assert_frame_equal(norm(served[sdk.columns]), norm(sdk), check_dtype=False)


def _latest(tables: Path, view: str, key: str) -> pd.DataFrame:
    df = pd.read_parquet(tables / f"{view}.parquet")
    return df.sort_values("event_timestamp").groupby(key).tail(1).set_index(key)


def _assert_online_equals_offline(store, settings, n: int = 25):
    rng = np.random.default_rng(0)
    for view, key in (("user_profile", "user_id"), ("user_activity", "user_id"),
                      ("item_profile", "item_id"), ("item_popularity", "item_id")):
        latest = _latest(settings.tables, view, key)
        ids = list(rng.choice(latest.index.to_numpy(), size=min(n, len(latest)), replace=False))
        names = list(FeatureSchema.load(settings.tables).views[view])
        online = store.get_online_features(features=[f"{view}:{c}" for c in names],
                                           entity_rows=[{key: i} for i in ids]).to_df().set_index(key)
        expected = latest.loc[ids, names]
        pd.testing.assert_frame_equal(online[names], expected, check_dtype=False, check_names=False)


def test_online_values_equal_latest_offline_on_sqlite(built):
    out, _, _ = built
    settings = fstore.StoreSettings.for_dataset(out, online="sqlite")
    _assert_online_equals_offline(fstore.open_store(settings), settings)


def test_served_path_returns_what_feast_returns(built):
    out, _, _ = built
    reader = FeatureReader(fstore.open_store(fstore.StoreSettings.for_dataset(out)))
    items = [f"i{i}" for i in range(60)] + ["leaky_item", "never-seen"]
    ts = contract.load_dataset(out)["interactions"][contract.TIMESTAMP].max().timestamp()
    for user in ("u1", "leaky", "nobody"):
        assert_same_values(reader.features(user, items, ts), reader.sdk(user, items, ts))
    assert reader.known("item", ["i1", "never-seen"]).tolist() == [True, False]
    assert reader.known("user", ["nobody"]).tolist() == [False]


def test_materialize_is_incremental_after_the_first_load(built):
    out, _, _ = built
    settings = fstore.StoreSettings.for_dataset(out)
    again = materialize(fstore.open_store(settings), settings)
    assert {r["from"] for r in again.values()} == {"incremental"}, again
    assert all(r["rows"] == r["expected"] > 0 for r in again.values()), again


def test_redis_online_store(built, tmp_path):
    client = _redis_or_skip()
    out, _, _ = built
    project = f"mtlrec_test_{uuid.uuid4().hex[:8]}"
    settings = fstore.StoreSettings.for_dataset(out, online="redis", workspace=tmp_path / "ws",
                                                redis=f"{REDIS},db={REDIS_DB}", project=project)
    shutil.copytree(fstore.StoreSettings.for_dataset(out).tables, settings.tables)
    try:
        store = fstore.open_store(settings)
        materialize(store, settings)
        assert client.dbsize() > 0  # the values really are in Redis
        _assert_online_equals_offline(store, settings)
        reader = FeatureReader(store)
        items = [f"i{i}" for i in range(60)] + ["never-seen"]
        for user in ("u2", "nobody"):
            assert_same_values(reader.features(user, items, 1.79e9), reader.sdk(user, items, 1.79e9))
    finally:
        client.flushdb()


def test_one_command_rebuilds_everything_from_raw_tables(tmp_path):
    data = tmp_path / "d"
    generate(data, SynthConfig(n_users=80, n_items=40, n_interactions=3000, days=5, seed=4))
    res = subprocess.run([sys.executable, "-m", "flows.cli", "features", "build", str(data)],
                         capture_output=True, text=True, cwd=Path(__file__).resolve().parents[2])
    assert res.returncode == 0, res.stderr[-3000:]
    assert (data / "_features" / "training.parquet").exists() and (data / "_features" / "online.db").exists()
    assert '"training_rows": 3000' in res.stdout


def test_feature_stages_run_as_prefect_tasks(tmp_path):
    from prefect import flow
    from prefect.testing.utilities import prefect_test_harness

    from flows.stages.features import apply_features, compute_features, materialize_features, training_set

    data = tmp_path / "d"
    generate(data, SynthConfig(n_users=60, n_items=30, n_interactions=2000, days=4, seed=5))

    @flow
    def features(directory: str) -> str:
        compute_features(directory)
        apply_features(directory)
        materialize_features(directory)
        return training_set(directory)

    with prefect_test_harness(server_startup_timeout=180):  # 30 s is too short on two busy cores
        path = features(str(data))
    assert len(pd.read_parquet(path)) == 2000
    assert (data / "_features" / "online.db").exists()


def _assert_every_field_described(tables: Path) -> None:
    """Every field of every batch view says what it holds; the on-demand view's description names its columns
    (Feast refuses descriptions on its fields)."""
    from feature_repo.definitions import build

    objects = build(tables)
    views = [objects[name] for name in ("user_profile", "user_activity", "item_profile", "item_popularity")]
    fields = {f"{v.name}.{f.name}": f.description for v in views for f in v.features}
    assert len(fields) > 20 and not [name for name, said in fields.items() if not said]
    assert all(f"{f.name}: " in objects["context"].description for f in objects["context"].features)
    assert objects["user"].description and objects["item"].description


def test_the_definitions_describe_every_field(built):
    _assert_every_field_described(fstore.StoreSettings.for_dataset(built[0]).tables)


def test_importing_the_definitions_builds_nothing():
    """Only ``feast apply`` in feature_repo/ (which imports the file as ``definitions``) makes a dataset's objects."""
    probe = ("import feature_repo.definitions as d; "
             "assert not hasattr(d, 'user_profile') and not hasattr(d, 'mtl_ranking_v1'); print(d.user.name)")
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0 and res.stdout.strip() == "user", res.stderr[-2000:]


def test_feast_apply_in_the_feature_repo_registers_what_the_pipeline_applies(built, tmp_path):
    """`feast apply` run in (a copy of) feature_repo/ on MTLREC_FEATURE_TABLES registers the pipeline's objects."""
    import os

    from feature_repo.registry_file import feature_services

    settings = fstore.StoreSettings.for_dataset(built[0])
    repo = tmp_path / "feature_repo"
    shutil.copytree(Path(__file__).resolve().parents[2] / "feature_repo", repo,
                    ignore=shutil.ignore_patterns("__pycache__", "*.yaml"))
    config = {**settings.yaml_config(tmp_path / "registry.db"),
              "online_store": {"type": "sqlite", "path": str(tmp_path / "online.db")}}
    (repo / "feature_store.yaml").write_text(yaml.safe_dump(config))
    env = {**os.environ, "MTLREC_FEATURE_TABLES": str(settings.tables), "FEAST_USAGE": "False"}
    res = subprocess.run([str(Path(sys.executable).parent / "feast"), "apply"], cwd=repo, env=env,
                         capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    ours = fstore.open_store(settings)
    theirs = type(ours)(repo_path=str(repo), fs_yaml_file=repo / "feature_store.yaml")
    for listing in ("list_entities", "list_data_sources", "list_feature_views", "list_on_demand_feature_views",
                    "list_feature_services"):
        assert sorted(o.name for o in getattr(theirs, listing)()) == sorted(o.name for o in getattr(ours, listing)())
    assert {f.name: f.description for v in theirs.list_feature_views() for f in v.features} == \
        {f.name: f.description for v in ours.list_feature_views() for f in v.features}
    assert feature_services(tmp_path / "registry.db", settings.project) == ["mtl_ranking_v1"]


def test_the_registry_file_is_read_without_importing_feast(built):
    """`mtlrec serve`'s precondition parses the registry with Feast's generated class, without importing Feast
    itself; Feast imported later in the same process works as usual on the same message classes."""
    probe = f"""
import sys
from feature_repo.registry_file import check_servable, feature_services
from feature_repo.store import StoreSettings, open_store
s = StoreSettings.for_dataset({str(built[0])!r}, online="sqlite")
names = feature_services(check_servable(s), s.project)
heavy = sorted(m for m in sys.modules if m in ("feast", "torch", "pandas", "numpy") or m.startswith("feast.infra"))
assert not heavy, heavy
store = open_store(s)
assert [f.name for f in store.list_feature_services()] == names, names
assert {{v.name for v in store.list_feature_views()}} == {{"user_profile", "user_activity", "item_profile",
                                                          "item_popularity"}}
print(names)
"""
    res = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-2000:]
    assert res.stdout.strip() == "['mtl_ranking_v1']"


def test_views_follow_another_declaration_without_leaking(tmp_path):
    """A short-video log (likes and follows, no category): its own aggregates, counting only earlier days."""
    from flows.data.short_video import ShortVideoConfig, generate as generate_video

    data = tmp_path / "video"
    generate_video(data, ShortVideoConfig(n_users=120, n_items=60, n_interactions=6000, days=8, seed=2))
    summary = build_all(data, materialize_online=False)
    schema = FeatureSchema.load(fstore.StoreSettings.for_dataset(data).tables)
    _assert_every_field_described(fstore.StoreSettings.for_dataset(data).tables)
    assert "category" not in schema.views["item_profile"] and "top_category_match" not in schema.context
    assert {"author", "duration"} <= set(schema.views["item_profile"])
    assert {count_column("user", t, 7) for t in ("click", "long_view", "like", "follow")} \
        <= set(schema.views["user_activity"])
    table = pd.read_parquet(summary["training_file"])
    raw = contract.load_dataset(data)["interactions"]
    for _, row in table.sample(150, random_state=1).iterrows():
        midnight = row[contract.TIMESTAMP].floor("D")
        seen = raw[(raw.item_id == row.item_id) & (raw[contract.TIMESTAMP] < midnight)
                   & (raw[contract.TIMESTAMP] >= midnight - pd.Timedelta(days=30))]
        assert row["item_like_count_30d"] == seen.like.sum()
        assert row["item_impressions_30d"] == len(seen)
        assert row["item_follow_rate_30d"] == pytest.approx(seen.follow.sum() / max(len(seen), 1))


def test_a_fresh_or_emptied_redis_is_loaded_in_full_and_says_so(built):
    """The SQLite store was loaded first (build_all); a fresh Redis must still get every row, and a Redis
    emptied behind the registry's back (restarted without persistence) must be noticed and refilled."""
    from typer.testing import CliRunner

    from flows.cli import app

    client = _redis_or_skip()
    out, _, _ = built
    project = f"mtlrec_test_{uuid.uuid4().hex[:8]}"
    conn = f"{REDIS},db={REDIS_DB}"
    settings = fstore.StoreSettings.for_dataset(out, online="redis", redis=conn, project=project)
    sqlite = fstore.StoreSettings.for_dataset(out, online="sqlite")
    assert settings.registry_file != sqlite.registry_file  # bookkeeping per online store
    try:
        first = materialize(fstore.open_store(settings), settings)
        assert all(r["reloaded"] == "never loaded into this store" for r in first.values()), first
        assert all(r["rows"] == r["expected"] > 0 for r in first.values()), first
        assert client.dbsize() > 0
        reader = FeatureReader(fstore.open_store(settings, serving=True))
        assert reader.ready() == (True, "ok")

        client.flushdb()  # what a Redis restarted without persistence looks like
        ok, why = reader.ready()
        assert not ok and "empty" in why
        report = status(settings)
        assert report["reachable"] and all(v["rows"] == 0 < v["expected"] for v in report["views"].values())
        shown = CliRunner().invoke(app, ["features", "status", str(out)], env={"MTLREC_FEAST_PROJECT": project,
                                                                                 "MTLREC_REDIS": conn})
        assert shown.exit_code == 0 and "behind" in shown.output and "sqlite: reachable" in shown.output

        again = materialize(fstore.open_store(settings), settings)  # incremental would load nothing
        assert all(r["reloaded"] == "the store lacks rows its registry says it holds" for r in again.values())
        assert all(r["rows"] == r["expected"] > 0 for r in again.values()), again
        assert reader.ready() == (True, "ok")
        # The SQLite store's own bookkeeping is untouched by all of this.
        assert {r["from"] for r in materialize(fstore.open_store(sqlite), sqlite).values()} == {"incremental"}
    finally:
        client.flushdb()


def test_the_reader_reads_redis_through_the_tuned_client(built):
    """tune_redis swaps Feast's Redis client for one with bounded timeouts and no retries: if a Feast upgrade
    stops reading through the client it sets, this fails."""
    from feature_repo.online import tune_redis

    client = _redis_or_skip()
    out, _, _ = built
    settings = fstore.StoreSettings.for_dataset(out, online="redis", redis=f"{REDIS},db={REDIS_DB}",
                                                project=f"mtlrec_test_{uuid.uuid4().hex[:8]}")
    try:
        materialize(fstore.open_store(settings), settings)
        store = fstore.open_store(settings, serving=True)
        reader = FeatureReader.for_serving(store, connect_timeout_s=0.05, read_timeout_s=0.2)
        used = store.provider.online_store._get_client(store.config.online_store)  # the client Feast reads with
        assert used.connection_pool.connection_kwargs["socket_timeout"] == 0.2
        assert used.connection_pool.connection_kwargs["socket_connect_timeout"] == 0.05
        assert reader.known("user", ["u1"]).tolist() == [True]
        assert not tune_redis(fstore.open_store(fstore.StoreSettings.for_dataset(out, online="sqlite")))
    finally:
        client.flushdb()


def test_the_feast_names_the_reader_relies_on_still_exist(built):
    """The reader uses Feast's public ``FeatureStore.provider`` and, for the Redis client only, two private names,
    each in one function of feature_repo/online.py. A Feast upgrade that removes or renames one fails here."""
    import inspect

    from feast import FeatureStore
    from feast.infra.online_stores.redis import RedisOnlineStore, RedisOnlineStoreConfig

    from feature_repo.online import _redis_connection, _use_redis_client

    assert isinstance(inspect.getattr_static(FeatureStore, "provider"), property)
    out, _, _ = built
    store = fstore.open_store(fstore.StoreSettings.for_dataset(out))
    assert hasattr(store.provider, "online_read") and hasattr(store.provider, "online_store")
    reader = FeatureReader(store)
    known, unknown = reader.read("user", ["u1", "nobody"])  # one uncached bulk read through the provider
    assert any(v is not None for v in known) and unknown == (None,) * len(reader.columns_of["user"])

    assert isinstance(inspect.getattr_static(RedisOnlineStore, "_parse_connection_string"), staticmethod)
    online = RedisOnlineStore()
    nodes, params = _redis_connection(online, "redis.example:6390,db=3,password=pw,ssl=true")
    assert nodes == [{"host": "redis.example", "port": "6390"}]
    assert params == {"db": 3, "password": "pw", "ssl": True}
    mine = object()
    _use_redis_client(online, mine)
    assert online._get_client(RedisOnlineStoreConfig(connection_string="nowhere:1")) is mine  # no connection made


def _counting_reads(reader) -> list:
    reads: list = []
    read = reader.read

    def counted(entity, ids):
        reads.append((entity, list(ids)))
        return read(entity, ids)

    reader.read = counted  # the cache reads through the public method
    return reads


def test_the_cache_drops_expired_rows_before_starting_afresh(built):
    from feature_repo.online import CacheSettings

    out, _, _ = built
    store = fstore.open_store(fstore.StoreSettings.for_dataset(out))
    reader = FeatureReader(store, cache=CacheSettings(item_ttl_s=2.0, max_entries=8))
    reads = _counting_reads(reader)
    old, fresh, new = ["i1", "i2", "i3"], ["i4", "i5", "i6"], ["i7", "i8", "i9"]
    reader.known("item", old)
    time.sleep(2.1)  # the first three expire
    reader.known("item", fresh)
    assert reader.cache_info()["item"] == {"entries": 6, "fresh": 3, "max_entries": 8, "ttl_s": 2.0}
    reads.clear()
    reader.known("item", new)  # 6 + 3 rows is past 8: the expired three go, the fresh three stay
    assert reader.cache_info()["item"]["entries"] == 6
    reader.known("item", fresh + new)
    assert reads == [("item", new)]  # nothing else was read: the fresh rows survived the compaction
    items = old + fresh + new + ["never-seen"]
    assert_same_values(reader.features("u1", items, 1.79e9), reader.sdk("u1", items, 1.79e9))


def test_a_cache_full_of_fresh_rows_starts_afresh(built):
    """Nothing expired: the bound holds by starting afresh, keeping the rows the request itself reads (a request
    mixing cached and new ids past the bound once failed with a KeyError)."""
    from feature_repo.online import CacheSettings

    out, _, _ = built
    reader = FeatureReader(fstore.open_store(fstore.StoreSettings.for_dataset(out)),
                           cache=CacheSettings(max_entries=8))
    reader.known("item", [f"i{i}" for i in range(8)])
    assert reader.cache_info()["item"]["entries"] == 8
    reads = _counting_reads(reader)
    items = ["i0", "i1", "i30", "never-seen"]
    assert_same_values(reader.features("u2", items, 1.79e9), reader.sdk("u2", items, 1.79e9))
    assert reads == [("user", ["u2"]), ("item", ["i30", "never-seen"])]  # i0 and i1 came from the cache
    assert reader.cache_info()["item"]["entries"] == 4


def test_a_log_stamped_to_the_nanosecond_builds_its_training_set(tmp_path):
    """Float epoch seconds (a service's log, a user's export) carry nanoseconds, which Feast's offline store
    refuses to drop: the contract's loader keeps microseconds, so the point-in-time join works."""
    data = tmp_path / "ns"
    generate(data, SynthConfig(n_users=60, n_items=30, n_interactions=2000, days=4, seed=5))
    inter = contract.read_table(data, "interactions")
    inter[contract.TIMESTAMP] = inter[contract.TIMESTAMP].astype("datetime64[ns, UTC]") + pd.Timedelta(123, "ns")
    contract.write_table(inter, data, "interactions")
    summary = build_all(data, materialize_online=False)
    assert len(pd.read_parquet(summary["training_file"])) == 2000
