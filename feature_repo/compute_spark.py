"""The windowed aggregate tables run by Spark: ``compute_sql``'s query in Spark SQL, on a cluster or ``local[N]``.

Why the same query and not a second implementation: the tables cannot
depend on which engine built them, and one query text (with its few
dialect differences in ``compute_sql.Dialect``) keeps that true by
construction; the tests compare the outputs row for row. Spark reads the
log's parquet itself (every executor must see the dataset's path, as with
the Spark offline store), partitions the running sums by entity, and writes
the result as parquet parts; only the (much smaller) aggregate table comes
back to this process, a row group at a time, into the table's file.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from feature_repo.compute_sql import SPARK, timestamped_batch, activity_query, category_names, category_names_query
from models.contract import tables as contract
from models.contract.declaration import Declaration


def session(workspace: Path, settings=None):
    """A Spark session with the project's conf (``engines.spark_conf``): the one Feast's Spark store also uses."""
    from feature_repo.engines import check_available, spark_conf
    from models.settings import get_settings

    check_available("spark")
    from pyspark import SparkConf
    from pyspark.sql import SparkSession

    if settings is None:
        env = get_settings()
        settings = SimpleNamespace(spark_master=env.spark_master, project=env.feast_project, workspace=workspace,
                                   spark_conf=tuple(sorted(env.spark_conf.items())))
    conf = SparkConf().setAll(list(spark_conf(settings).items()))
    return SparkSession.builder.config(conf=conf).getOrCreate()


def activity_spark(spark, interactions: Path, items: Path | None, day0: pd.Timestamp, n_days: int,
                   declaration: Declaration, scratch: Path, out: dict[str, Path]) -> dict[str, int]:
    """Both activity tables, as ``compute._activity`` writes them, computed by ``spark`` from the parquet files
    and written to ``out`` (``user_activity``, ``item_popularity``: file); returns their row counts.

    ``items`` given: the user table carries the top category. ``scratch``: where Spark writes its parts (a
    path every executor can write; removed afterwards).
    """
    # Spark reads no nanosecond timestamps (pandas writes them): read as integers, turned back into microseconds.
    spark.conf.set("spark.sql.legacy.parquet.nanosAsLong", "true")
    log = spark.read.parquet(str(interactions))
    if dict(log.dtypes).get(contract.TIMESTAMP) in ("bigint", "long"):
        from pyspark.sql import functions as F

        ts = SPARK.ident(contract.TIMESTAMP)
        log = log.withColumn(contract.TIMESTAMP, F.expr(f"timestamp_micros({ts} div 1000)"))
    log.createOrReplaceTempView("mtlrec_interactions")
    names = None
    if items is not None:
        spark.read.parquet(str(items)).select("item_id", "category").createOrReplaceTempView("mtlrec_items")
        names = category_names(r[0] for r in spark.sql(category_names_query("mtlrec_items", SPARK)).collect())
    rows = {}
    for name, key, prefix, cats in (("user_activity", "user_id", "user",
                                     "mtlrec_items" if items is not None else None),
                                    ("item_popularity", "item_id", "item", None)):
        query = activity_query(None, "mtlrec_interactions", key, prefix, day0, n_days, declaration, cats,
                               sql=SPARK, names=names)
        rows[name] = _collect(spark.sql(query).orderBy(key, "snapshot"), Path(scratch) / prefix, day0, out[name])
    return rows


def _collect(frame, where: Path, day0: pd.Timestamp, path: Path) -> int:
    """The sorted result through parquet parts, copied into one file a row group at a time in part order (the
    sort's order): the driver never holds the table. Returns its rows."""
    shutil.rmtree(where, ignore_errors=True)
    frame.write.mode("overwrite").parquet(str(where))
    path = Path(path)
    partial = path.with_name(path.name + ".partial")
    rows, writer = 0, None
    try:
        for part in sorted(where.glob("part-*.parquet")):
            pf = pq.ParquetFile(part)
            for group in range(pf.num_row_groups):
                for batch in pf.read_row_group(group).to_batches():
                    table = timestamped_batch(batch, day0)
                    if writer is None:
                        writer = pq.ParquetWriter(partial, table.schema)
                    writer.write_table(table)
                    rows += table.num_rows
        if writer is None:  # an empty result writes no part with rows; its schema comes from the frame
            empty = pa.Schema.from_pandas(frame.limit(0).toPandas(), preserve_index=False)
            writer = pq.ParquetWriter(partial, timestamped_batch(pa.RecordBatch.from_pylist([], schema=empty),
                                                                  day0).schema)
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(where, ignore_errors=True)
    partial.replace(path)
    return rows
