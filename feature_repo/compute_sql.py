"""The windowed aggregate tables of ``compute._activity`` as DuckDB SQL, so they build out of core.

The numpy version holds dense (entity, day) arrays, which a log with many
entities and a long span does not fit. A window's value changes only where
a day with activity enters it (snapshot ``d + 1``) or leaves it
(``d + 1 + w``), so each active (entity, day) emits deltas there and a
running sum gives every window's value; a snapshot whose deltas are all zero
changed nothing and is not written, as in the numpy version. Everything is
GROUP BY, hash joins, one sort and a streaming window, which DuckDB runs
within ``memory_limit`` by spilling. The output goes to a frame (tests, small
logs) or, batch by batch, straight to a parquet file (``activity_to_parquet``):
on a large log the output tables themselves are too large to hold in memory.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from feature_repo.schema import TOP_CATEGORY, TOP_WINDOW, WINDOWS, count_column, impressions_column, rate_column
from models.contract import tables as contract
from models.contract.declaration import Declaration

US_PER_DAY = 86_400_000_000


MEMORY_SHARE = 0.5  # of this machine's memory: DuckDB's limit when MTLREC_DUCKDB_MEMORY_LIMIT is empty
MIN_MIB = 256  # and never less: at 0 DuckDB cannot allocate a block


def memory_limit() -> str:
    """``MTLREC_DUCKDB_MEMORY_LIMIT``, else half of this machine's memory.

    Why not DuckDB's own default (80%): its limit bounds its buffers, not the process, and a query that needs
    more than the machine (the aggregates of a large log) grows to it, where the process plus its neighbours
    can pass the machine's memory and be killed (see benchmarks/README.md). Past the limit DuckDB spills to
    disk instead.
    """
    from models.settings import get_settings
    from models.data import memory as machine

    return get_settings().duckdb_memory_limit or f"{max(int(MEMORY_SHARE * machine.memory_bytes()) >> 20, MIN_MIB)}MiB"


def connect(database: str = ":memory:", *, memory_limit: str | None = None, temp_directory: str | Path | None = None,
            threads: int | None = None) -> duckdb.DuckDBPyConnection:
    """A connection whose memory is bounded: past ``memory_limit`` DuckDB spills to ``temp_directory``.

    Each thread pins its own sort blocks: fewer ``threads`` let a tight limit hold.
    """
    con = duckdb.connect(database)
    if memory_limit is not None:
        con.execute(f"SET memory_limit = {_literal(memory_limit)}")
    if temp_directory is not None:  # DuckDB creates only the last level, and only once it spills
        Path(temp_directory).mkdir(parents=True, exist_ok=True)
        con.execute(f"SET temp_directory = {_literal(str(temp_directory))}")
    if threads is not None:
        con.execute(f"SET threads = {int(threads)}")
    return con


class Dialect:
    """The few places DuckDB's SQL and Spark SQL differ; the query is otherwise the same text.

    DuckDB runs the running sum with no PARTITION BY over rows kept in (entity, snapshot) order, which it
    streams and spills; Spark partitions it by entity, which is what spreads it over executors.
    """

    name = "duckdb"
    string = "VARCHAR"

    def ident(self, name: str) -> str:
        return '"' + name.replace('"', '""') + '"'

    def literal(self, text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    def epoch_us(self, expr: str) -> str:
        return f"epoch_us({expr})"

    def div(self, a: str, b: str) -> str:
        return f"({a}) // {b}"

    def truncated(self, expr: str) -> str:  # toward zero, as numpy's astype(int64); DuckDB's CAST rounds
        return f"CAST(trunc({expr}) AS BIGINT)"

    def pick(self, names: list[str], code: str) -> str:  # names[code], 0-based
        return f"[{', '.join(self.literal(n) for n in names)}][{code} + 1]"

    def source_cte(self) -> str:
        return "src AS NOT MATERIALIZED"

    def running(self, column: str) -> str:
        return f"sum({column}) OVER (ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"

    def ordered(self, relation: str) -> str:
        return f"(SELECT * FROM {relation} ORDER BY k, s)"


class SparkDialect(Dialect):
    name = "spark"
    string = "STRING"

    def ident(self, name: str) -> str:
        return "`" + name.replace("`", "``") + "`"

    def literal(self, text: str) -> str:
        return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"

    def epoch_us(self, expr: str) -> str:
        return f"unix_micros({expr})"

    def div(self, a: str, b: str) -> str:
        return f"({a}) div {b}"

    def truncated(self, expr: str) -> str:  # Spark's CAST truncates
        return f"CAST({expr} AS BIGINT)"

    def pick(self, names: list[str], code: str) -> str:
        return f"element_at(array({', '.join(self.literal(n) for n in names)}), CAST({code} + 1 AS INT))"

    def source_cte(self) -> str:
        return "src AS"

    def running(self, column: str) -> str:
        return f"sum({column}) OVER (PARTITION BY k ORDER BY s ROWS BETWEEN UNBOUNDED PRECEDING AND CURRENT ROW)"

    def ordered(self, relation: str) -> str:
        return relation


DUCKDB, SPARK = Dialect(), SparkDialect()
_ident, _literal = DUCKDB.ident, DUCKDB.literal


def _relation(source: str | Path, sql: Dialect = DUCKDB) -> str:
    """A path is read as parquet (a file, a glob or a directory); anything else names a table or view."""
    text = str(source)
    if sql is DUCKDB and (isinstance(source, Path) or text.endswith(".parquet") or "/" in text):
        path = Path(text)
        return f"read_parquet({_literal(str(path / '*.parquet') if path.is_dir() else text)})"
    return sql.ident(text)


def _positive(column: str, sql: Dialect = DUCKDB) -> str:
    # As compute._positive: non-numbers and missing (NULL or NaN) count 0, the rest truncated to an integer.
    v = f"TRY_CAST(src.{sql.ident(column)} AS DOUBLE)"
    return f"CASE WHEN {v} IS NULL OR isnan({v}) THEN 0 ELSE {sql.truncated(v)} END"


def category_names_query(categories: str | Path, sql: Dialect = DUCKDB) -> str:
    return f"SELECT DISTINCT coalesce(CAST(category AS {sql.string}), 'None') FROM {_relation(categories, sql)}"


def _names(con: duckdb.DuckDBPyConnection, categories: str | Path) -> list[str]:
    """Category names in code point order, as ``pd.factorize(sort=True)`` codes them; "nan" for unknown items."""
    return category_names(r[0] for r in con.execute(category_names_query(categories)).fetchall())


def category_names(found) -> list[str]:
    return sorted(set(found) | {"nan"})


def activity_query(con: duckdb.DuckDBPyConnection | None, source: str | Path, key: str, prefix: str,
                   day0: pd.Timestamp, n_days: int, declaration: Declaration, categories: str | Path | None = None,
                   *, sql: Dialect = DUCKDB, names: list[str] | None = None) -> str:
    """The SQL behind ``activity_sql``, with the snapshot index instead of its timestamp (for ``COPY ... TO``).

    ``sql``: the dialect (``SPARK`` for Spark SQL, where ``source`` and ``categories`` name views and the
    category ``names`` are given, as ``category_names`` lists them).
    """
    q, lit = sql.ident, sql.literal
    tasks = declaration.binary
    primary = [t.name for t in tasks].index(declaration.primary) + 1
    m = range(len(tasks) + 1)  # measure 0: impressions; j: the j-th binary task's positives
    d0 = pd.Timestamp(day0).value // 1000
    day = sql.div(sql.epoch_us("src." + q(contract.TIMESTAMP)) + f" - {d0}", str(US_PER_DAY))
    cols = [f"CAST(src.{q(key)} AS {sql.string}) AS k", f"{day} AS d",
            *(f"{_positive(t.column, sql)} AS m{j}" for j, t in enumerate(tasks, 1))]
    x = [f"{w}_{j}" for w in WINDOWS for j in m]  # one column per window and measure
    # Each active day emits a zero row at snapshot 0 (o = -1: every entity gets one), its counts where it enters
    # every window (o = 0) and their negation where it leaves window w (o = w).
    deltas = [f"CASE WHEN o = 0 THEN m{j} WHEN o = {w} THEN -m{j} ELSE 0 END" for w in WINDOWS for j in m]
    events = (f"SELECT k, CASE WHEN o < 0 THEN 0 ELSE d + 1 + o END AS s, {{}} FROM daily, "
              f"(VALUES {', '.join(f'({o})' for o in (-1, 0, *WINDOWS))}) AS offsets(o)")
    join, ctes, top = "", [], ""
    if categories is not None:
        # The top category is carried as its code (0: none), the code's deltas summed like the counts. It moves
        # only where a day with positives enters or leaves the longest window; there a range join finds the
        # category with most positives (ties to the smallest code, as argmax does) at s and at s - 1.
        names = ["", *(names if names is not None else _names(con, categories))]
        codes = ", ".join(f"({lit(n)}, {i})" for i, n in enumerate(names) if i)
        cols.append(f"coalesce(cat.code, {names.index('nan')}) AS cat")
        join = (f"LEFT JOIN (SELECT CAST(item_id AS {sql.string}) AS k, code FROM {_relation(categories, sql)} "
                f"LEFT JOIN (VALUES {codes}) AS codes(name, code) "
                f"ON name = coalesce(CAST(category AS {sql.string}), 'None')) cat "
                f"ON cat.k = CAST(src.item_id AS {sql.string})")
        # The most positives, ties to the smallest code, as one integer: -n * S + code has its minimum there.
        # A fixed-size aggregate, which DuckDB spills; a struct's min keeps its states outside the memory limit.
        S = len(names)
        best = (f"coalesce(((min(-{{0}} * {S} + cat) FILTER (WHERE {{0}} > 0)) % {S} + {S}) % {S}, 0)")
        ctes = [
            f"pos AS (SELECT k, cat, d, count(*) AS n FROM src WHERE m{primary} > 0 GROUP BY k, cat, d)",
            f"tsnap AS (SELECT DISTINCT k, d + 1 + o AS s FROM pos, (VALUES (0), ({TOP_WINDOW})) AS offsets(o))",
            f"percat AS (SELECT t.k, t.s, p.cat, sum(p.n) FILTER (WHERE p.d >= t.s - {TOP_WINDOW}) AS now, "
            "sum(p.n) FILTER (WHERE p.d < t.s - 1) AS prev FROM tsnap t JOIN pos p "
            f"ON p.k = t.k AND p.d < t.s AND p.d >= t.s - 1 - {TOP_WINDOW} GROUP BY ALL)",
            f"tops AS (SELECT t.k, t.s, {best.format('now')} - {best.format('prev')} AS dt "
            "FROM tsnap t LEFT JOIN percat USING (k, s) GROUP BY t.k, t.s)",
        ]
        events = (events.format(", ".join([*deltas, "0"]))
                  + f" UNION ALL SELECT k, s, {', '.join('0' for _ in x)}, dt FROM tops WHERE dt <> 0")
        x.append("t")
        top = f", {sql.pick(names, 'ct')} AS {q(TOP_CATEGORY)}"
    else:
        events = events.format(", ".join(deltas))
    # Leaving events past the log are kept, so an entity's deltas sum to zero and a running sum over all rows in
    # (entity, snapshot) order restarts at every entity: no PARTITION BY, so DuckDB streams it (its partitioned
    # window does not spill reliably). Rows stay in that order to the end.
    ctes = [
        f"{sql.source_cte()} (SELECT {', '.join(cols)} FROM {_relation(source, sql)} src {join})",
        "daily AS (SELECT k, d, count(*) AS m0, "
        + ", ".join(f"CAST(sum(m{j}) AS BIGINT) AS m{j}" for j in m[1:]) + " FROM src GROUP BY k, d)",
        *ctes,
        "snap AS (SELECT k, s, " + ", ".join(f"CAST(sum(x{c}) AS BIGINT) AS x{c}" for c in x)
        + f" FROM ({events}) AS e(k, s, {', '.join(f'x{c}' for c in x)}) "
        "GROUP BY k, s)",
        "vals AS (SELECT k, s, s = 0 OR " + " OR ".join(f"x{c} <> 0" for c in x) + " AS moved, "
        + ", ".join(f"CAST({sql.running(f'x{c}')} AS BIGINT) AS c{c}" for c in x)
        + f" FROM {sql.ordered('snap')})",
    ]
    out = []
    for w in WINDOWS:
        out.append(f"c{w}_0 AS {q(impressions_column(prefix, w))}")
        for j, t in enumerate(tasks, 1):
            base = f"c{w}_{[u.name for u in tasks].index(t.parent) + 1}" if t.parent else f"c{w}_0"
            out += [f"c{w}_{j} AS {q(count_column(prefix, t.name, w))}",
                    f"CAST(c{w}_{j} AS DOUBLE) / greatest({base}, 1) AS {q(rate_column(prefix, t.name, w))}"]
    return (f"WITH {', '.join(ctes)} SELECT k AS {q(key)}, s AS snapshot, {', '.join(out)}{top} "
            f"FROM vals WHERE moved AND s <= {int(n_days)}")


def _ordered_result(con: duckdb.DuckDBPyConnection, query: str, batch_rows: int = 1 << 20) -> pa.RecordBatchReader:
    """The query's rows in the order it wrote them, a batch at a time (not materialised: a materialised result
    would be held inside DuckDB's memory limit as well as by the caller)."""
    # Row order rests on DuckDB preserving it through the running sum; a connection may have turned that off.
    con.execute("SET preserve_insertion_order = true")
    return con.sql(query).fetch_arrow_reader(batch_rows)


def _keep_order_setting(con: duckdb.DuckDBPyConnection):
    (keep,) = con.execute("SELECT current_setting('preserve_insertion_order')").fetchone()
    return lambda: con.execute(f"SET preserve_insertion_order = {bool(keep)}")


def timestamped_batch(batch: pa.RecordBatch, day0: pd.Timestamp) -> pa.Table:
    """``snapshot`` (days after ``day0``) replaced by ``event_timestamp`` (microseconds, UTC), second column.

    The source's schema metadata is dropped: a batch read from Spark's parts carries Spark's own schema in
    it (``org.apache.spark.sql.parquet.row.metadata``), and Spark trusts that over the file's columns, so it
    would read the written table back with ``snapshot`` in it."""
    t = pa.Table.from_batches([batch]).replace_schema_metadata(None)
    day0_us = int(day0.value // 1000)
    us = pc.add(pc.multiply(t.column("snapshot").cast(pa.int64()), US_PER_DAY), day0_us)
    t = t.drop_columns(["snapshot"])
    return t.add_column(1, "event_timestamp", us.cast(pa.timestamp("us", tz="UTC")))


def activity_sql(con: duckdb.DuckDBPyConnection, source: str | Path, key: str, prefix: str, day0: pd.Timestamp,
                 n_days: int, declaration: Declaration, categories: str | Path | None = None) -> pd.DataFrame:
    """``compute._activity`` on a relation of ``con`` (or a parquet path), row for row and dtype for dtype.

    ``categories`` names a relation with ``item_id`` and ``category`` (the items table): given, the user's
    top category is computed, as ``compute._activity`` does when passed ``categories``.
    """
    query = activity_query(con, source, key, prefix, day0, n_days, declaration, categories)
    restore = _keep_order_setting(con)
    try:
        df = _ordered_result(con, query).read_all().to_pandas(self_destruct=True)
    finally:
        restore()
    snap = df.pop("snapshot").to_numpy()
    df.insert(1, "event_timestamp", day0 + pd.to_timedelta(snap, unit="D"))
    return df


def activity_to_parquet(con: duckdb.DuckDBPyConnection, source: str | Path, key: str, prefix: str,
                        day0: pd.Timestamp, n_days: int, declaration: Declaration, path: Path,
                        categories: str | Path | None = None, batch_rows: int = 1 << 20) -> int:
    """``activity_sql``'s table written to ``path`` a batch at a time (memory flat in its rows); returns its
    row count. The file holds what ``activity_sql``'s frame written by pandas would: the same columns, types
    and rows in the same order. Written beside ``path`` and moved into place, so a reader never sees half."""
    query = activity_query(con, source, key, prefix, day0, n_days, declaration, categories)
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    restore = _keep_order_setting(con)
    rows = 0
    try:
        reader = _ordered_result(con, query, batch_rows)
        writer = None
        try:
            for batch in reader:
                table = timestamped_batch(batch, day0)
                if writer is None:
                    writer = pq.ParquetWriter(partial, table.schema)
                writer.write_table(table)
                rows += table.num_rows
            if writer is None:  # no rows: the file still carries the columns
                empty = pa.RecordBatch.from_pylist([], schema=reader.schema)
                writer = pq.ParquetWriter(partial, timestamped_batch(empty, day0).schema)
        finally:
            if writer is not None:
                writer.close()
    finally:
        restore()
    partial.replace(path)
    return rows
