"""Feature tables from the validated contract tables: profiles and windowed aggregates.

Which columns each table has follows the dataset's declaration and tables
(``feature_repo/schema.py``): one count and rate per declared binary task.

Aggregates are daily snapshots. The snapshot stamped midnight ``d`` counts
the interactions of the ``w`` days strictly before ``d``; a row is written
at the log's first midnight (all zeros) and then only when some window's
value changed since the previous snapshot (activity entering or leaving a
window), so the tables stay small and the latest row per entity is always
its current value. Everything is dense numpy over
(entity, day): one ``bincount`` and one ``cumsum``, no loop over entities.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.schema import (TOP_CATEGORY, WINDOWS, count_column, derive, impressions_column,
                                 rate_column)
from models.contract import tables as contract
from models.contract.tables import coerce_timestamps
from models.contract.declaration import Declaration
from models.settings import get_settings

DAY = pd.Timedelta(days=1)
log = logging.getLogger(__name__)


def _attribute(series: pd.Series, kind: str):
    if kind == "string":
        return series.astype(object).where(series.notna(), None).map(lambda v: v if v is None else str(v))
    if pd.api.types.is_datetime64_any_dtype(series):
        return _epoch_s(coerce_timestamps(series.to_frame("t"), "t")["t"])
    return pd.to_numeric(series, errors="coerce").astype("float64")


def _profile(table: pd.DataFrame, key: str, columns: dict[str, str], since: str) -> pd.DataFrame:
    """One row per entity: the schema's attribute columns, derived ones (log price) and when it appeared."""
    out = pd.DataFrame({key: table[key].astype(str), "event_timestamp": table[contract.TIMESTAMP]})
    for c, kind in columns.items():
        if c == since:
            out[c] = _epoch_s(table[contract.TIMESTAMP])
        elif c == "log_price":
            out[c] = np.log1p(pd.to_numeric(table["price"], errors="coerce").astype("float64").clip(lower=0))
        else:
            out[c] = _attribute(table[c], kind)
    return out


def _epoch_s(ts: pd.Series) -> np.ndarray:
    return ((ts - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)).to_numpy(dtype=np.float64)


def _windowed(daily: np.ndarray) -> np.ndarray:
    """daily [E, D] -> window sums [len(WINDOWS), E, D+1]; snapshot s covers days [s-w, s)."""
    e, d = daily.shape
    cs = np.zeros((e, d + 1), dtype=np.int64)
    np.cumsum(daily, axis=1, out=cs[:, 1:])
    s = np.arange(d + 1)
    return np.stack([cs - cs[:, np.maximum(s - w, 0)] for w in WINDOWS])


def _activity(inter: pd.DataFrame, key: str, prefix: str, day0: pd.Timestamp, n_days: int,
              declaration: Declaration, categories: pd.Series | None = None) -> pd.DataFrame:
    """Impressions and, per declared binary task, positives and rate over each window, per entity and snapshot."""
    codes, uniques = pd.factorize(inter[key].astype(str), sort=True)
    n = len(uniques)
    day = ((inter[contract.TIMESTAMP] - day0) // DAY).to_numpy(dtype=np.int64)
    flat = codes.astype(np.int64) * n_days + day
    daily = {"": None, **{t.name: _positive(inter[t.column]) for t in declaration.binary}}
    counts = {name: _windowed(np.bincount(flat, weights=w, minlength=n * n_days).astype(np.int64)
                              .reshape(n, n_days)) for name, w in daily.items()}
    stacked = np.concatenate(list(counts.values()))  # [(1 + tasks) W, E, D+1]
    changed = np.zeros((n, n_days + 1), dtype=bool)
    # Snapshot 0 (all zeros) is written for every entity: "nothing yet" is a value, not a missing row.
    changed[:, 0] = True
    changed[:, 1:] = (stacked[:, :, 1:] != stacked[:, :, :-1]).any(axis=0)
    top = None
    if categories is not None:
        # Top category by the primary task over the longest window, per user and snapshot ("" when none).
        cat_codes, cat_names = pd.factorize(categories.astype(str), sort=True)
        k = len(cat_names)
        hit = _positive(inter[declaration.get(declaration.primary).column]) > 0
        cat_flat = (codes.astype(np.int64)[hit] * k + cat_codes[hit]) * n_days + day[hit]
        per_cat = np.bincount(cat_flat, minlength=n * k * n_days).astype(np.int32).reshape(n * k, n_days)
        top_w = _windowed(per_cat)[-1].reshape(n, k, n_days + 1)
        best = top_w.argmax(axis=1)
        top = np.where(top_w.max(axis=1) > 0, np.asarray(cat_names, dtype=object)[best], "")
        changed[:, 1:] |= top[:, 1:] != top[:, :-1]
    ent, snap = np.nonzero(changed)
    out = {key: np.asarray(uniques, dtype=object)[ent], "event_timestamp": day0 + pd.to_timedelta(snap, unit="D")}
    for j, w in enumerate(WINDOWS):
        imps = counts[""][j][ent, snap]
        out[impressions_column(prefix, w)] = imps
        for t in declaration.binary:
            hits = counts[t.name][j][ent, snap]
            base = counts[t.parent][j][ent, snap] if t.parent else imps
            out[count_column(prefix, t.name, w)] = hits
            out[rate_column(prefix, t.name, w)] = hits / np.maximum(base, 1)
    if top is not None:
        out[TOP_CATEGORY] = top[ent, snap]
    return pd.DataFrame(out)


def _positive(labels: pd.Series) -> np.ndarray:
    """A binary label as 0/1 integers (validation has held it to the domain; a missing label counts as 0)."""
    return pd.to_numeric(labels, errors="coerce").fillna(0).to_numpy(np.int64)


def _activity_duckdb(inter: pd.DataFrame | Path, items: pd.DataFrame | None, day0: pd.Timestamp, n_days: int,
                     declaration: Declaration, spill: Path, out: dict[str, Path]) -> dict[str, int]:
    """Both activity tables by ``feature_repo/compute_sql.py``, written to ``out`` (table name -> file) a batch
    at a time: the same rows as numpy's, with no entities x days array and no table in memory; returns rows.

    ``inter``: the log's parquet file (DuckDB reads it in bounded memory), or a frame.
    """
    from feature_repo.compute_sql import activity_to_parquet, connect, memory_limit

    con = connect(memory_limit=memory_limit(), temp_directory=spill)
    try:
        source = inter
        if isinstance(inter, pd.DataFrame):
            con.register("interactions", inter)
            source = "interactions"
        if items is not None:
            con.register("items", items)
        return {
            "user_activity": activity_to_parquet(con, source, "user_id", "user", day0, n_days, declaration,
                                                 out["user_activity"],
                                                 categories="items" if items is not None else None),
            "item_popularity": activity_to_parquet(con, source, "item_id", "item", day0, n_days, declaration,
                                                   out["item_popularity"]),
        }
    finally:
        con.close()


def dense_bytes(users: int, items: int, declaration: Declaration, n_days: int, categories: int = 0) -> int:
    """What ``_activity``'s dense arrays take at their largest: counts and their stack, and the per-category
    windows of the user table with their temporaries (checked against numpy's real peak: see
    benchmarks/README.md)."""
    measures = (1 + len(declaration.binary)) * len(WINDOWS)
    return 8 * (n_days + 1) * (2 * measures * max(users, items) + 2 * (len(WINDOWS) + 1) * users * categories)


@dataclass(frozen=True)
class LogStats:
    """What the engine choice and the snapshots need from the log, found without loading it."""

    day0: pd.Timestamp
    n_days: int
    users: int
    items: int

    @classmethod
    def of_frame(cls, inter: pd.DataFrame) -> "LogStats":
        day0 = inter[contract.TIMESTAMP].min().floor("D")
        return cls(day0, int((inter[contract.TIMESTAMP].max() - day0) // DAY) + 1, int(inter["user_id"].nunique()),
                   int(inter["item_id"].nunique()))

    @classmethod
    def of_file(cls, path: Path) -> "LogStats":
        import duckdb

        ts = '"' + contract.TIMESTAMP + '"'
        lo, hi, users, items = duckdb.sql(
            f"SELECT min({ts}), max({ts}), count(DISTINCT user_id), count(DISTINCT item_id) "
            f"FROM read_parquet('{str(path).replace(chr(39), chr(39) * 2)}')").fetchone()
        day0 = contract.utc(lo).floor("D")
        return cls(day0, int((contract.utc(hi) - day0) // DAY) + 1, int(users), int(items))


def _timestamped(schema: pa.Schema) -> bool:
    """The log's parquet stores real timestamps, so SQL engines can read it as it is (else pandas coerces)."""
    return contract.TIMESTAMP in schema.names and pa.types.is_timestamp(schema.field(contract.TIMESTAMP).type)


def choose_engine(engine: str | None, offline: str | None, dense: Callable[[], int]) -> str:
    """``MTLREC_FEATURE_ENGINE``: auto runs Spark when the store's offline engine is Spark, numpy while its
    dense arrays take at most a quarter of this machine's memory, and DuckDB (bounded memory, spilling) beyond."""
    settings = get_settings()
    engine = (engine or settings.feature_engine).lower()
    if engine != "auto":
        return engine
    if (offline or settings.offline_engine) == "spark":
        return "spark"
    from models.data import memory as machine

    return "numpy" if dense() <= machine.MEMORY_SHARE * machine.memory_bytes() else "duckdb"


def compute_feature_tables(dataset_dir: Path | str, tables_dir: Path | str, engine: str | None = None,
                           store=None) -> dict[str, int]:
    """Write the four source tables the feature views read, and their schema; returns their row counts.

    ``engine``: ``numpy`` (dense arrays, fastest while they fit), ``duckdb`` (SQL, bounded memory, spills),
    ``spark`` (the same SQL on Spark: ``feature_repo/compute_spark.py``) or ``auto`` (``choose_engine``);
    default ``MTLREC_FEATURE_ENGINE``. All write the same tables. ``store``: the dataset's
    ``store.StoreSettings``, whose offline engine ``auto`` follows and whose Spark master and conf Spark uses.
    """
    t0 = time.perf_counter()
    dataset_dir, tables_dir = Path(dataset_dir), Path(tables_dir)
    declaration = contract.Manifest.require(dataset_dir).declaration
    users, items = (coerce_timestamps(contract.read_table(dataset_dir, t)) for t in ("users", "items"))
    log_path = dataset_dir / contract.TABLES["interactions"].file
    # The SQL engines read the log's file themselves: it is loaded here only for numpy, or when its timestamps
    # need pandas' coercion (strings).
    log_schema = pq.read_schema(log_path)
    inter = None if _timestamped(log_schema) else coerce_timestamps(contract.read_table(dataset_dir, "interactions"))
    schema = derive(declaration, users, items, log_schema.empty_table().to_pandas() if inter is None else inter)
    stats = LogStats.of_file(log_path) if inter is None else LogStats.of_frame(inter)
    day0, n_days = stats.day0, stats.n_days
    n_categories = int(items["category"].nunique()) + 1 if schema.has_category else 0
    engine = choose_engine(engine, getattr(store, "offline", None),
                           lambda: dense_bytes(stats.users, stats.items, declaration, n_days, n_categories))
    log.info("feature tables by %s", engine)
    tables_dir.mkdir(parents=True, exist_ok=True)
    written: dict[str, int] = {}  # tables an engine wrote to their files itself
    activity_files = {name: tables_dir / f"{name}.parquet" for name in ("user_activity", "item_popularity")}
    if engine == "spark":
        from feature_repo.compute_spark import activity_spark, session

        written = activity_spark(session(tables_dir.parent, store), log_path,
                                 dataset_dir / contract.TABLES["items"].file if schema.has_category else None, day0,
                                 n_days, declaration, tables_dir.parent / "spark_parts", activity_files)
        user_activity = item_popularity = None
    elif engine == "duckdb":
        written = _activity_duckdb(log_path if inter is None else inter, items if schema.has_category else None,
                                   day0, n_days, declaration, tables_dir.parent / "duckdb_tmp", activity_files)
        user_activity = item_popularity = None
    elif engine == "numpy":
        if inter is None:
            inter = coerce_timestamps(contract.read_table(dataset_dir, "interactions"))
        categories = None
        if schema.has_category:
            cat_of_item = items.set_index(items["item_id"].astype(str))["category"]
            categories = inter["item_id"].astype(str).map(cat_of_item)
        user_activity = _activity(inter, "user_id", "user", day0, n_days, declaration, categories=categories)
        item_popularity = _activity(inter, "item_id", "item", day0, n_days, declaration)
    else:
        raise ValueError(f"the feature engine must be auto, numpy, duckdb or spark, not {engine!r}")
    tables = {
        "user_profile": _profile(users, "user_id", schema.views["user_profile"], "user_since_ts"),
        "user_activity": user_activity,
        "item_profile": _profile(items, "item_id", schema.views["item_profile"], "item_since_ts"),
        "item_popularity": item_popularity,
    }
    for stale in tables_dir.glob("*.parquet"):  # a view this schema no longer has must not linger
        if stale.stem not in tables:
            stale.unlink()
    rows = {}
    for name, df in tables.items():
        if name in written:
            missing = set(schema.views[name]) - set(pq.read_schema(tables_dir / f"{name}.parquet").names)
            assert not missing, f"{name} lacks {missing}"
            rows[name] = written[name]
            continue
        missing = set(schema.views[name]) - set(df.columns)
        assert not missing, f"{name} lacks {missing}"  # the schema and this module must agree
        # Microseconds: DuckDB casts TIMESTAMPTZ (us) but not its nanosecond form.
        df["event_timestamp"] = df["event_timestamp"].astype("datetime64[us, UTC]")
        df.to_parquet(tables_dir / f"{name}.parquet", index=False)
        rows[name] = len(df)
    schema.save(tables_dir)
    rows["seconds"] = round(time.perf_counter() - t0, 2)
    return rows
