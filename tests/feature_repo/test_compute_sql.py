"""The DuckDB aggregates must be the numpy ones exactly: the feature tables cannot depend on which one built them."""

from __future__ import annotations

import shutil
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from feature_repo import compute, compute_sql
from flows.data.short_video import ShortVideoConfig, generate as generate_video
from flows.data.synth import SynthConfig, generate
from models.contract import tables as contract
from models.contract.declaration import Declaration


def assert_same(inter: pd.DataFrame, items: pd.DataFrame, declaration: Declaration, source=None, catalog=None,
                tmp_path=None, ordered: bool = True) -> dict[str, pd.DataFrame]:
    """Both tables by both paths, as compute_feature_tables calls them; returns the SQL ones."""
    day0 = inter[contract.TIMESTAMP].min().floor("D")
    n_days = int((inter[contract.TIMESTAMP].max() - day0) // compute.DAY) + 1
    categories = None
    if "category" in items:
        categories = inter["item_id"].astype(str).map(items.set_index(items["item_id"].astype(str))["category"])
    con = compute_sql.connect(memory_limit="256MB", temp_directory=tmp_path, threads=2)
    con.execute(f"SET preserve_insertion_order = {ordered}")
    con.register("inter", inter)
    con.register("items", items)
    out = {}
    for key, prefix, cats in (("user_id", "user", categories), ("item_id", "item", None)):
        want = compute._activity(inter, key, prefix, day0, n_days, declaration, categories=cats)
        got = compute_sql.activity_sql(con, source or "inter", key, prefix, day0, n_days, declaration,
                                       categories=(catalog or "items") if cats is not None else None)
        pd.testing.assert_frame_equal(got, want, check_exact=True)
        # What the pipeline writes: the same table streamed to parquet in small batches, equal to the frame
        # as pandas would have written it (microsecond timestamps), in the same row order.
        path = Path(tmp_path) / f"streamed_{prefix}.parquet"
        rows = compute_sql.activity_to_parquet(con, source or "inter", key, prefix, day0, n_days, declaration,
                                               path, categories=(catalog or "items") if cats is not None else None,
                                               batch_rows=100)
        assert rows == len(want)
        if rows > 100:
            assert pq.ParquetFile(path).metadata.num_row_groups > 1  # written batch by batch
        written = want.assign(event_timestamp=want["event_timestamp"].astype("datetime64[us, UTC]"))
        pd.testing.assert_frame_equal(pd.read_parquet(path), written, check_exact=True)
        out[key] = got
    assert con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()[0] == ordered
    return out


@pytest.fixture(scope="module")
def shop(tmp_path_factory):
    d = tmp_path_factory.mktemp("shop")
    generate(d, SynthConfig(n_users=150, n_items=60, n_interactions=6000, days=8, seed=3))
    return d


def load(d):
    return contract.load_dataset(d), contract.Manifest.require(d).declaration


def test_shop_log_from_parquet(shop, tmp_path):
    """Also on a connection that does not preserve row order: the running sums need it, and get it back."""
    t, declaration = load(shop)
    out = assert_same(t["interactions"], t["items"], declaration, source=shop / "interactions.parquet",
                      catalog=shop / "items.parquet", tmp_path=tmp_path, ordered=False)
    assert (out["user_id"]["user_top_category_30d"] != "").any()  # the comparison covered real categories


def test_log_longer_than_the_longest_window(tmp_path):
    """Days leaving the 30-day window (and the top category falling back) only happen past day 30."""
    generate(tmp_path / "d", SynthConfig(n_users=60, n_items=25, n_interactions=3000, days=45, seed=7))
    t, declaration = load(tmp_path / "d")
    assert_same(t["interactions"], t["items"], declaration, tmp_path=tmp_path)


def test_short_video_declaration(tmp_path):
    generate_video(tmp_path / "v", ShortVideoConfig(n_users=120, n_items=60, n_interactions=6000, days=8, seed=2))
    t, declaration = load(tmp_path / "v")
    assert "category" not in t["items"]
    out = assert_same(t["interactions"], t["items"], declaration, tmp_path=tmp_path)
    assert "user_follow_rate_30d" in out["user_id"] and "user_top_category_30d" not in out["user_id"]


@pytest.mark.parametrize("via", ["frame", "parquet"])  # a frame's NaN reaches DuckDB as NULL, parquet's as NaN
def test_missing_labels_count_zero(shop, tmp_path, via):
    t, declaration = load(shop)
    inter = t["interactions"].copy()
    rng = np.random.default_rng(0)
    inter["click"] = inter["click"].astype("float64").mask(rng.random(len(inter)) < 0.2)  # NaN
    inter["purchase"] = inter["purchase"].astype("Int8").mask(rng.random(len(inter)) < 0.2)  # pd.NA
    assert inter["click"].isna().any() and inter["purchase"].isna().any()
    source = None
    if via == "parquet":
        source = tmp_path / "inter.parquet"
        table = pa.Table.from_pandas(inter)  # NaN -> null; put the NaN back, as a float writer may leave it
        table = table.set_column(table.schema.get_field_index("click"), "click", pa.array(inter["click"].to_numpy()))
        pq.write_table(table, source)
        assert duckdb.sql(f"SELECT count(*) FROM '{source}' WHERE isnan(click)").fetchone()[0] > 0
    assert_same(inter, t["items"], declaration, source=source, tmp_path=tmp_path)


def test_single_day_log(shop, tmp_path):
    t, declaration = load(shop)
    inter = t["interactions"]
    last = inter[contract.TIMESTAMP].max().floor("D")
    out = assert_same(inter[inter[contract.TIMESTAMP] >= last].reset_index(drop=True), t["items"], declaration,
                      tmp_path=tmp_path)
    assert out["user_id"]["event_timestamp"].nunique() == 2  # snapshot 0 and the day after


def category_ties() -> tuple[pd.DataFrame, pd.DataFrame, Declaration, list[str]]:
    """A log, its items and declaration, and the user top categories they must give.

    u1: b and B tie on day 0, a joins on day 1 ("B" < "a" < "b" by code point); u2 clicks b on day 2; u3 clicks
    an item missing from the catalogue ("nan", as pandas' map gives) and one without a category ("None").
    """
    declaration = Declaration.from_dict({"tasks": [{"name": "click"}, {"name": "buy", "parent": "click"}]})
    day = pd.Timestamp("2026-01-01", tz="UTC")
    rows = [("u1", "i1", 0, 1, 0), ("u1", "i2", 0, 1, 1), ("u1", "i3", 1, 1, 0), ("u1", "i2", 1, 0, 0),
            ("u2", "i3", 0, 0, 0), ("u2", "i1", 2, 1, 1), ("u3", "i9", 0, 1, 0), ("u3", "i4", 1, 1, 0)]
    inter = pd.DataFrame(rows, columns=["user_id", "item_id", "day", "click", "buy"])
    inter[contract.TIMESTAMP] = day + pd.to_timedelta(inter.pop("day"), unit="D") + pd.Timedelta(hours=5)
    items = pd.DataFrame({"item_id": ["i1", "i2", "i3", "i4"], "category": ["b", "B", "a", None]})
    return inter, items, declaration, ["", "B", "B", "B", "", "", "", "b", "", "nan", "None", "None"]


def test_top_category_ties_go_to_the_smallest_name(tmp_path):
    inter, items, declaration, tops = category_ties()
    out = assert_same(inter, items, declaration, tmp_path=tmp_path)
    assert out["user_id"]["user_top_category_30d"].tolist() == tops


def test_a_top_category_change_alone_writes_a_row(tmp_path):
    """One click a day for 41 days keeps every count still from day 32 on, while "b" overtakes "a" at day 36."""
    declaration = Declaration.from_dict({"tasks": [{"name": "click"}]})
    day = pd.Timestamp("2026-01-01 08:00", tz="UTC")
    inter = pd.DataFrame({"user_id": "u1", "item_id": ["ia"] * 20 + ["ib"] * 21, "click": 1,
                          contract.TIMESTAMP: day + pd.to_timedelta(range(41), unit="D")})
    items = pd.DataFrame({"item_id": ["ia", "ib"], "category": ["a", "b"]})
    users = assert_same(inter, items, declaration, tmp_path=tmp_path)["user_id"]
    late = users[users["event_timestamp"] >= day.floor("D") + pd.Timedelta(days=32)]
    assert late["user_top_category_30d"].tolist() == ["b"] and late["user_impressions_30d"].tolist() == [30]


def test_the_duckdb_engine_writes_the_same_feature_tables(shop, tmp_path, monkeypatch):
    """MTLREC_FEATURE_ENGINE=duckdb through compute_feature_tables: every table file equal to numpy's."""
    a = compute.compute_feature_tables(shop, tmp_path / "numpy" / "tables", engine="numpy")

    def numpy_path(*args, **kwargs):
        raise AssertionError("the duckdb engine ran the numpy aggregates")

    monkeypatch.setenv("MTLREC_FEATURE_ENGINE", "duckdb")  # the setting, as a user sets it
    monkeypatch.setattr(compute, "_activity", numpy_path)
    read = []
    real_read = contract.read_table
    monkeypatch.setattr(contract, "read_table", lambda d, t, *a, **k: read.append(t) or real_read(d, t, *a, **k))
    b = compute.compute_feature_tables(shop, tmp_path / "duckdb" / "tables")
    assert "interactions" not in read  # DuckDB reads the log's file: it is never a frame here
    assert {k: v for k, v in a.items() if k != "seconds"} == {k: v for k, v in b.items() if k != "seconds"}
    # A log whose timestamps are ISO strings goes through pandas' coercion, and gives the same tables.
    strings = tmp_path / "strings"
    shutil.copytree(shop, strings, ignore=shutil.ignore_patterns("_*"))
    log = pd.read_parquet(strings / "interactions.parquet")
    log[contract.TIMESTAMP] = log[contract.TIMESTAMP].dt.strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    log.to_parquet(strings / "interactions.parquet", index=False)
    read.clear()
    compute.compute_feature_tables(strings, tmp_path / "strings-tables")
    assert read.count("interactions") == 1
    for name in ("user_profile", "user_activity", "item_profile", "item_popularity"):
        want = pd.read_parquet(tmp_path / "numpy" / "tables" / f"{name}.parquet")
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "duckdb" / "tables" / f"{name}.parquet"), want)
        pd.testing.assert_frame_equal(pd.read_parquet(tmp_path / "strings-tables" / f"{name}.parquet"), want)


@pytest.fixture(scope="module")
def spark(tmp_path_factory):
    """A Spark local[2] session as the spark engine makes it (skipped, naming what is missing, without Java)."""
    from feature_repo.compute_spark import session
    from feature_repo.engines import EngineUnavailable

    try:
        s = session(tmp_path_factory.mktemp("spark"))
    except EngineUnavailable as e:
        pytest.skip(str(e))
    yield s
    s.stop()


def assert_same_spark(spark, inter: pd.DataFrame, items: pd.DataFrame, declaration: Declaration, tmp_path,
                      with_categories: bool = True) -> dict[str, pd.DataFrame]:
    """Both tables by Spark SQL from parquet files pandas wrote (nanosecond timestamps), equal to numpy's."""
    from feature_repo.compute_spark import activity_spark

    ns = inter.assign(**{contract.TIMESTAMP: inter[contract.TIMESTAMP].astype("datetime64[ns, UTC]")})
    ns.to_parquet(tmp_path / "inter.parquet")
    items.to_parquet(tmp_path / "items.parquet")
    assert str(pq.read_schema(tmp_path / "inter.parquet").field(contract.TIMESTAMP).type.unit) == "ns"
    day0 = inter[contract.TIMESTAMP].min().floor("D")
    n_days = int((inter[contract.TIMESTAMP].max() - day0) // compute.DAY) + 1
    files = {"user_activity": tmp_path / "user.parquet", "item_popularity": tmp_path / "item.parquet"}
    # Several sorted parts, as on a cluster (small data is otherwise coalesced into one): their order is the rows'.
    spark.conf.set("spark.sql.adaptive.coalescePartitions.enabled", "false")
    try:
        rows = activity_spark(spark, tmp_path / "inter.parquet",
                              tmp_path / "items.parquet" if with_categories else None, day0, n_days, declaration,
                              tmp_path / "parts", files)
    finally:
        spark.conf.unset("spark.sql.adaptive.coalescePartitions.enabled")
    user, item = (pd.read_parquet(files[name]) for name in ("user_activity", "item_popularity"))
    assert rows == {"user_activity": len(user), "item_popularity": len(item)}
    for path in files.values():  # Spark (Feast's Spark store) reads the table as written, not as its parts were
        assert spark.read.parquet(str(path)).columns == pq.read_schema(path).names
    categories = None
    if with_categories:
        categories = inter["item_id"].astype(str).map(items.set_index(items["item_id"].astype(str))["category"])
    for got, key, prefix, cats in ((user, "user_id", "user", categories), (item, "item_id", "item", None)):
        want = compute._activity(inter, key, prefix, day0, n_days, declaration, categories=cats)
        want = want.assign(event_timestamp=want["event_timestamp"].astype("datetime64[us, UTC]"))  # as written
        pd.testing.assert_frame_equal(got, want, check_exact=True)
    return {"user_id": user, "item_id": item}


def test_spark_sql_gives_the_numpy_tables(spark, shop, tmp_path):
    """The same query in Spark SQL, on the cases the DuckDB tests plant: missing labels, a log past the longest
    window, category ties and unknown items, and a declaration without categories."""
    t, declaration = load(shop)
    inter = t["interactions"].copy()
    rng = np.random.default_rng(0)
    inter["click"] = inter["click"].astype("float64").mask(rng.random(len(inter)) < 0.2)
    inter["purchase"] = inter["purchase"].astype("Int8").mask(rng.random(len(inter)) < 0.2)
    (tmp_path / "shop").mkdir()
    out = assert_same_spark(spark, inter, t["items"], declaration, tmp_path / "shop")
    assert (out["user_id"]["user_top_category_30d"] != "").any()

    generate(tmp_path / "long", SynthConfig(n_users=60, n_items=25, n_interactions=3000, days=45, seed=7))
    t, declaration = load(tmp_path / "long")
    assert_same_spark(spark, t["interactions"], t["items"], declaration, tmp_path / "long")

    ties, items, declaration, tops = category_ties()
    (tmp_path / "ties").mkdir()
    users = assert_same_spark(spark, ties, items, declaration, tmp_path / "ties")["user_id"]
    assert users["user_top_category_30d"].tolist() == tops

    generate_video(tmp_path / "v", ShortVideoConfig(n_users=120, n_items=60, n_interactions=6000, days=8, seed=2))
    t, declaration = load(tmp_path / "v")
    out = assert_same_spark(spark, t["interactions"], t["items"], declaration, tmp_path / "v", with_categories=False)
    assert "user_follow_rate_30d" in out["user_id"] and "user_top_category_30d" not in out["user_id"]


def test_auto_follows_the_offline_engine_and_the_memory(spark, shop, tmp_path, monkeypatch):
    """MTLREC_FEATURE_ENGINE=auto (the default): Spark when the store's offline engine is Spark, DuckDB when the
    dense arrays would not fit a quarter of memory, numpy otherwise; every table file the same."""
    from feature_repo.store import StoreSettings
    from models.data import memory as machine

    monkeypatch.delenv("MTLREC_FEATURE_ENGINE", raising=False)
    ran = []
    for name in ("_activity", "_activity_duckdb"):
        real = getattr(compute, name)
        monkeypatch.setattr(compute, name, lambda *a, _real=real, _name=name, **k: ran.append(_name) or _real(*a, **k))
    paths = {}
    for label, offline, memory in (("numpy", "duckdb", 1 << 40), ("duckdb", "duckdb", 1 << 10),
                                   ("spark", "spark", 1 << 40)):
        monkeypatch.setattr(machine, "memory_bytes", lambda m=memory: m)
        ran.clear()
        store = StoreSettings.for_dataset(shop, workspace=tmp_path / label, offline=offline)
        compute.compute_feature_tables(shop, store.tables, store=store)
        assert ran == {"numpy": ["_activity", "_activity"], "duckdb": ["_activity_duckdb"], "spark": []}[label]
        paths[label] = store.tables
    for name in ("user_profile", "user_activity", "item_profile", "item_popularity"):
        want = pd.read_parquet(paths["numpy"] / f"{name}.parquet")
        for label in ("duckdb", "spark"):
            pd.testing.assert_frame_equal(pd.read_parquet(paths[label] / f"{name}.parquet"), want)
    with pytest.raises(ValueError, match="auto, numpy, duckdb or spark"):
        compute.compute_feature_tables(shop, tmp_path / "x" / "tables", engine="polars")


def test_a_query_past_the_memory_limit_spills_into_a_directory_not_made_yet(tmp_path):
    """A fresh dataset has no ``_features/`` yet: the first query large enough to spill must not fail on it
    (DuckDB makes only the last level of its temp directory; 100M impressions hit this)."""
    scratch = tmp_path / "_features" / "duckdb_tmp"
    con = compute_sql.connect(memory_limit="64MB", temp_directory=scratch, threads=1)
    con.execute("SET preserve_insertion_order = false")
    n = con.execute("SELECT count(*) FROM (SELECT i, hash(i) AS h FROM range(20000000) t(i) ORDER BY h)").fetchone()[0]
    assert n == 20_000_000
    assert scratch.is_dir()
    con.close()


def test_duckdb_gets_half_the_machine_unless_told(monkeypatch, tmp_path):
    """DuckDB's own default (80% of memory) let the 100M-impression aggregates grow until the kernel killed the
    process; the default is half, and MTLREC_DUCKDB_MEMORY_LIMIT still decides when set."""
    from models.data import memory as machine

    monkeypatch.delenv("MTLREC_DUCKDB_MEMORY_LIMIT", raising=False)
    monkeypatch.setattr(machine, "memory_bytes", lambda: 8 << 30)
    assert compute_sql.memory_limit() == "4096MiB"
    con = compute_sql.connect(memory_limit=compute_sql.memory_limit(), temp_directory=tmp_path)
    assert con.execute("SELECT current_setting('memory_limit')").fetchone()[0] == "4.0 GiB"
    con.close()
    monkeypatch.setattr(machine, "memory_bytes", lambda: 1 << 10)  # a machine too small to halve: a floor
    assert compute_sql.memory_limit() == "256MiB"
    monkeypatch.setenv("MTLREC_DUCKDB_MEMORY_LIMIT", "3GB")
    assert compute_sql.memory_limit() == "3GB"
