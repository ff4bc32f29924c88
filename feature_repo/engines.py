"""Which engine runs Feast's offline work: embedded DuckDB, or Spark on a cluster (``MTLREC_OFFLINE_ENGINE``).

Why one setting and not a second feature repository: the views, their
fields, the feature service and the on-demand transform stay the same
objects; only where the sources are read and who runs the joins change.
On ``spark`` the batch sources are Feast ``SparkSource``s over the same
parquet tables, Feast's Spark offline store does the point-in-time
retrieval (its SQL join, run by Spark) and Feast's Spark compute engine
does the materialisation into the online store. ``local[N]`` runs Spark in
this process's JVM; a cluster is one ``MTLREC_SPARK_MASTER`` away, with the
tables on storage every executor can read.
"""

from __future__ import annotations

import os
import shutil
import sys


class EngineUnavailable(RuntimeError):
    """The configured engine cannot start here; the message says what is missing."""


def spark_conf(settings) -> dict[str, str]:
    """Spark properties for a ``store.StoreSettings``: this project's defaults, then ``MTLREC_SPARK_CONF``.

    The Python workers must be this interpreter (Feast's compute engine ships closures that import Feast),
    timestamps are UTC like the log's, and a local master gets few shuffle partitions: Spark's default of
    200 tasks per shuffle is for clusters, and is slow on a few local cores. The driver gets 4 GB: each chunk
    of the training set comes back through it, more than Spark's default driver heap holds (see
    benchmarks/README.md).
    """
    conf = {"spark.master": settings.spark_master, "spark.app.name": f"mtlrec-{settings.project}",
            "spark.sql.session.timeZone": "UTC", "spark.ui.enabled": "false",
            "spark.pyspark.python": sys.executable, "spark.pyspark.driver.python": sys.executable,
            "spark.local.dir": str(settings.workspace / "spark_tmp"), "spark.driver.memory": "4g",
            "spark.sql.execution.arrow.pyspark.enabled": "true"}
    if settings.spark_master.startswith("local"):
        conf["spark.sql.shuffle.partitions"] = "8"
    conf.update(dict(settings.spark_conf))
    return conf


def engine_config(settings) -> dict:
    """The ``offline_store`` (and ``batch_engine``) part of ``feature_store.yaml`` for the settings' engine."""
    if settings.offline == "spark":
        conf = spark_conf(settings)
        return {"offline_store": {"type": "spark", "spark_conf": conf},
                "batch_engine": {"type": "spark.engine", "spark_conf": conf}}
    return {"offline_store": {"type": settings.offline}}


def batch_source(name: str, path: str, timestamp_field: str, engine: str):
    """One view's source: the same parquet table, as the source type the engine's offline store reads."""
    if engine == "spark":
        from feast.infra.offline_stores.contrib.spark_offline_store.spark_source import SparkSource

        return SparkSource(name=name, path=path, file_format="parquet", timestamp_field=timestamp_field)
    from feast import FileSource

    return FileSource(name=name, path=path, timestamp_field=timestamp_field)


def engine_of(store) -> str:
    """The offline engine an open ``FeatureStore`` was configured with."""
    kind = str(getattr(store.config.offline_store, "type", "duckdb"))
    return "spark" if kind == "spark" or kind.endswith("SparkOfflineStore") else kind


def check_available(engine: str) -> None:
    """Raise EngineUnavailable, naming what to install, unless ``engine`` can run on this machine."""
    if engine != "spark":
        return
    try:
        import pyspark  # noqa: F401
    except ImportError:
        raise EngineUnavailable("the spark engine needs pyspark: "
                                "pip install -c constraints.txt -e '.[spark]'") from None
    if shutil.which("java") is None and not os.environ.get("JAVA_HOME"):
        raise EngineUnavailable("the spark engine needs a Java runtime (17 or newer) on PATH, or JAVA_HOME set")
    # SparkContext takes its workers' Python from the environment, not from spark.pyspark.python given to
    # the session builder: without this its workers run the system's python3, which lacks Feast.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
