"""The training set's point-in-time join run as DuckDB ``ASOF JOIN`` s, from the Feast definitions.

Why: Feast's DuckDB offline store runs this join as a general
point-in-time query, while the engine underneath answers the same question,
"the latest feature row at or before this impression", with one native
as-of join per view, in much less time (see benchmarks/README.md).
So the execution changes and nothing else: the feature service, its views,
their parquet sources, join keys, fields and TTLs, and the on-demand view's
transformation are all read from the store's registry, as Feast's own
retrieval reads them. ``tests/feature_repo/test_features.py`` checks that both give the
same table, row for row, and the leak test runs on both.

Semantics kept from Feast: a feature row joins an impression when its keys
match and its timestamp is at or before the impression's; an impression with
no such row gets nulls; no impression is dropped. Views with a TTL are
refused (this project's views have none; Feast's join handles them). On-demand views run on each chunk through
Feast's ``transform_arrow``, as ``RetrievalJob.to_arrow`` runs them.
"""

from __future__ import annotations

import math
import os
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path

import pandas as pd

from feature_repo.schema import FEATURE_SERVICE
from models.contract import tables as contract

RANGE_ROWS = 10_000_000  # impressions joined per query: bounds the output sort's memory and spill
ROW = "__mtlrec_row"  # the impression's place in the sorted log, so the output keeps Feast's order exactly


def _quote(name: str) -> str:
    return '"' + name.replace('"', '""') + '"'


def _views(store, service):
    """``(batch views, on-demand views)`` of the feature service: (view, its projection) pairs, in order."""
    on_demand = {v.name: v for v in store.list_on_demand_feature_views()}
    batch, odfvs = [], []
    for projection in service.feature_view_projections:
        if projection.name in on_demand:
            odfvs.append(on_demand[projection.name].with_projection(projection))
        else:
            batch.append((store.get_feature_view(projection.name), projection))
    return batch, odfvs


def _view_sql(i: int, view, projection, entity_ts: str) -> tuple[str, list[str]]:
    """The ``ASOF LEFT JOIN`` clause of one view and its select list."""
    source = view.batch_source
    path = getattr(source, "path", None)
    if not path:
        raise ValueError(f"feature view {view.name!r}: the as-of join reads file sources only, not "
                         f"{type(source).__name__}; set MTLREC_TRAINING_JOIN=feast for this store")
    keys = [c.name for c in view.entity_columns]
    features = [f.name for f in projection.features]
    alias, ts = f"v{i}", _quote(source.timestamp_field)
    inner = ", ".join([*(_quote(k) for k in keys), f"{ts} AS __ts", *(_quote(f) for f in features)])
    on = " AND ".join([*(f"e.{_quote(k)} = {alias}.{_quote(k)}" for k in keys), f"e.{entity_ts} >= {alias}.__ts"])
    if view.ttl and view.ttl.total_seconds() > 0:
        raise ValueError(f"feature view {view.name!r} has a TTL ({view.ttl}); the as-of join implements "
                         "unbounded views only: set MTLREC_TRAINING_JOIN=feast for this store")
    clause = f"ASOF LEFT JOIN (SELECT {inner} FROM read_parquet('{path}')) {alias} ON {on}"
    cols = [f"{alias}.{_quote(f)}" for f in features]
    return clause, cols


def join_sql(store) -> tuple[list[str], list[str], list]:
    """The feature service as SQL over an ``e`` relation of impressions: each batch view's ``ASOF LEFT JOIN``
    clause, the joined feature columns, and the on-demand views, which run in Python on the result."""
    batch, odfvs = _views(store, store.get_feature_service(FEATURE_SERVICE))
    joins, selected = [], []
    for i, (view, projection) in enumerate(batch):
        clause, cols = _view_sql(i, view, projection, _quote(contract.TIMESTAMP))
        joins.append(clause)
        selected += cols
    return joins, selected, odfvs


def iter_asof_training_set(store, entities: pd.DataFrame | Iterable[pd.DataFrame] | Path,
                           chunk_rows: int = 250_000, memory_limit: str | None = None,
                           order: list[str] | None = None, range_rows: int = RANGE_ROWS) -> Iterator[pd.DataFrame]:
    """The same chunks as Feast's retrieval in ``store.iter_training_set``, computed by DuckDB.

    ``entities``: the impression log as Feast's entity frame (``store.entity_frame``), sorted as the
    training set is to be; the output keeps that order exactly. Or, for a log larger than memory, an
    iterable of such frames in the log's order: they go into an on-disk DuckDB table one at a time, and
    DuckDB sorts them by ``order`` (ties in log order, as pandas' stable sort keeps them), spilling. Or the
    log's parquet file itself, when ``log_select`` can read it: DuckDB makes the entity frame's columns as it
    reads, and sorts only the joined rows, a range of timestamps at a time.

    ``range_rows``: impressions joined per query (at least ``chunk_rows``); each query re-reads the feature
    tables, and its output sort holds (or spills) only that range.

    ``memory_limit`` (DuckDB's, e.g. ``"4GB"``; default ``compute_sql.memory_limit()``) bounds the join;
    beyond it DuckDB spills to ``duckdb_tmp`` in the store's directory instead of failing.
    """
    import duckdb

    from feature_repo.compute_sql import memory_limit as default_memory_limit

    memory_limit = memory_limit or default_memory_limit()
    order = order or [contract.TIMESTAMP]

    joins, selected, odfvs = join_sql(store)
    scratch = Path(store.repo_path) / "duckdb_tmp"
    from_file = isinstance(entities, (str, Path))
    on_disk = not from_file and not isinstance(entities, pd.DataFrame)
    database = scratch / f"entities-{os.getpid()}-{uuid.uuid4().hex[:8]}.duckdb"
    scratch.mkdir(parents=True, exist_ok=True)  # the on-disk entities, and a spill past memory_limit
    con = duckdb.connect(str(database) if on_disk else ":memory:")
    try:
        con.execute("SET TimeZone = 'UTC'")
        if memory_limit:
            con.execute(f"SET memory_limit = '{memory_limit}'")
        con.execute(f"SET temp_directory = '{scratch}'")
        if from_file:
            select = log_select(entities)
            if select is None:
                raise ValueError(f"{entities}: its timestamps need pandas' parsing; pass its entity frames")
            con.execute(f"CREATE VIEW entities AS {select}")
        elif on_disk:
            _load_sorted(con, entities, order)
        else:
            con.register("entities", entities.assign(**{ROW: range(len(entities))}))
        (total,) = con.execute("SELECT count(*) FROM entities").fetchone()
        step = max(range_rows, chunk_rows)
        if from_file:  # ranges of time, each sorted by the order and then the log's own (ties as pandas keeps them)
            ranges, by = _time_ranges(con, total, step, order), ", ".join(f"e.{_quote(c)}" for c in [*order, ROW])
        else:  # ranges of the sorted log's rows, already in order
            ranges, by = [f"{ROW} >= {lo} AND {ROW} < {lo + step}" for lo in range(0, total, step)], f"e.{ROW}"
        for where in ranges:
            # A range of impressions at a time: the sort that restores the log's order then holds (and spills)
            # one range's joined rows, not the whole training set's.
            query = (f"SELECT e.*, {', '.join(selected)} FROM (SELECT * FROM entities WHERE {where}) e "
                     f"{' '.join(joins)} ORDER BY {by}")
            # Streamed (``sql``), not materialised (``execute``): a materialised result stays pinned in DuckDB's
            # memory whole, past its memory limit on a large log, where the sort behind it spills.
            yield from _chunks(con.sql(query).fetch_arrow_reader(chunk_rows), odfvs)
    finally:
        con.close()
        if on_disk:
            for leftover in (database, database.with_name(database.name + ".wal")):
                leftover.unlink(missing_ok=True)


def log_select(path: Path | str) -> str | None:
    """The entity frame (``store.entity_frame`` of ``contract.coerce_timestamps``) as a query over the log's
    parquet, numbered in file order; None when the log's timestamps are not timestamps of at most microsecond
    precision (strings, nanoseconds: those need pandas' parsing and flooring, as ``contract.coerce_timestamps``
    does them) or a column is dictionary-encoded (pandas reads it back as a categorical, DuckDB as text).

    Why: the log then never passes through pandas (string ids, epoch seconds), nor is it copied into DuckDB
    and sorted whole before the join; DuckDB reads the file itself and sorts only each range's joined rows.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    schema = pq.read_schema(path)
    names = set(schema.names)
    if contract.TIMESTAMP not in names or {"request_ts", ROW, "file_row_number"} & names:
        return None
    if any(pa.types.is_dictionary(f.type) for f in schema):  # pandas categoricals: they stay categoricals
        return None
    ts_type = schema.field(contract.TIMESTAMP).type
    if not pa.types.is_timestamp(ts_type) or ts_type.unit == "ns":
        return None
    ts = _quote(contract.TIMESTAMP)
    stamp = f"CAST({ts} AS TIMESTAMPTZ)"  # a naive stamp is UTC (the session's zone), as pandas reads it
    file = str(path).replace("'", "''")
    return (f"SELECT * EXCLUDE (file_row_number) REPLACE (CAST(user_id AS VARCHAR) AS user_id, "
            f"CAST(item_id AS VARCHAR) AS item_id, {stamp} AS {ts}), epoch_us({stamp}) / 1e6 AS request_ts, "
            f"file_row_number AS {ROW} FROM read_parquet('{file}', file_row_number = true)")


def _time_ranges(con, total: int, step: int, order: list[str]) -> list[str]:
    """WHERE clauses splitting the entities into ranges of about ``step`` impressions, in the order's first key.

    Bounded by approximate quantiles of the timestamps: the ranges need not be equal, only disjoint, in order,
    and together everything; an impression's range depends on its timestamp alone, so ties stay together.
    """
    ts = _quote(contract.TIMESTAMP)
    parts = math.ceil(total / step)
    if parts <= 1 or order[0] != contract.TIMESTAMP:
        return ["true"]
    (approx,) = con.execute(f"SELECT approx_quantile({ts}, {[i / parts for i in range(1, parts)]}) "
                            "FROM entities").fetchone()
    approx = [f"TIMESTAMPTZ '{b.isoformat()}'" for b in approx if b is not None]
    if not approx:
        return ["true"]
    # Each bound moved onto the first impression at or after it: a bound is then a stamp the log holds, so the
    # impressions tied on it are what the test of ranges exercises, not a stamp between two.
    snapped = con.execute(f"SELECT {', '.join(f'min({ts}) FILTER (WHERE {ts} >= {b})' for b in approx)} "
                          "FROM entities").fetchone()
    stamps = [f"TIMESTAMPTZ '{b.isoformat()}'" for b in sorted({b for b in snapped if b is not None})]
    edges = [None, *stamps, None]
    clauses = []
    for lo, hi in zip(edges, edges[1:]):
        cond = [*([f"{ts} >= {lo}"] if lo else []), *([f"{ts} < {hi}"] if hi else [])]
        clauses.append(" AND ".join(cond) if cond else "true")
    clauses[-1] = f"({clauses[-1]}) OR {ts} IS NULL"  # no impression dropped, even one the contract refuses
    return clauses


def _chunks(reader, odfvs) -> Iterator[pd.DataFrame]:
    """The joined record batches as the training set's frames, with the on-demand views' columns added."""
    import pyarrow as pa

    inputs = [_odfv_inputs(odfv) for odfv in odfvs]
    for record_batch in reader:
        table = pa.Table.from_batches([record_batch]).drop_columns([ROW])
        for odfv, needs in zip(odfvs, inputs):
            # Its sources' columns only: the transformation reads no others, and the rest of a training row
            # (every view's features) would be converted to pandas and back for nothing.
            out = odfv.transform_arrow(table.select([c for c in table.column_names if c in needs]), False)
            for col in out.column_names:
                if not col.startswith("__index") and col not in table.column_names:
                    table = table.append_column(col, out[col])
        part = table.to_pandas()
        part[contract.TIMESTAMP] = pd.to_datetime(part[contract.TIMESTAMP], utc=True)
        yield part


def _odfv_inputs(odfv) -> set[str]:
    """What an on-demand view is declared to read: its request fields and its source views' features."""
    names = {f.name for source in odfv.source_request_sources.values() for f in source.schema}
    return names | {f.name for p in odfv.source_feature_view_projections.values() for f in p.features}


def _load_sorted(con, chunks: Iterable[pd.DataFrame], order: list[str]) -> None:
    """Table ``entities``: the chunks in log order, numbered in the sort order (``ROW``)."""
    seq = "__mtlrec_seq"
    start = 0
    for chunk in chunks:
        con.register("chunk", chunk.assign(**{seq: range(start, start + len(chunk))}))
        if start == 0:
            con.execute("CREATE TABLE log AS SELECT * FROM chunk")
        else:
            con.execute("INSERT INTO log SELECT * FROM chunk")
        con.unregister("chunk")
        start += len(chunk)
    if start == 0:
        raise ValueError("the impression log is empty")
    keys = ", ".join(_quote(c) for c in [*order, seq])
    # A sorted copy numbered by its rowid, not row_number() OVER (ORDER BY ...): that window is one partition
    # of the whole log, which DuckDB holds in memory (past its memory limit on a large log), where
    # ORDER BY sorts out of core; a table created in order keeps it (insertion order is preserved).
    con.execute("SET preserve_insertion_order = true")
    con.execute(f"CREATE TABLE sorted_log AS SELECT * EXCLUDE ({seq}) FROM log ORDER BY {keys}")
    con.execute("DROP TABLE log")
    con.execute(f"CREATE VIEW entities AS SELECT *, rowid AS {ROW} FROM sorted_log")
