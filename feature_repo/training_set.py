"""The point-in-time training set: every impression joined with the feature service as of its own time.

Written to one parquet file (``write_training_set``) whose metadata says which columns are labels and which
are features (``training_metadata``), so the file alone is enough to train on. Two joins give the same rows:
DuckDB's as-of join (``feature_repo/asof.py``) and the offline engine's own retrieval (Feast's, on DuckDB or
Spark).
"""

from __future__ import annotations

import contextlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pandas as pd

from feature_repo.schema import FEATURE_SERVICE, FeatureSchema
from feature_repo.store import StoreSettings
from models.contract import tables as contract
from models.settings import get_settings

ORDER = [contract.TIMESTAMP, "user_id", "item_id"]  # the training set's row order


def entity_frame(interactions: pd.DataFrame) -> pd.DataFrame:
    """The impression log as Feast's entity frame: keys, timestamp, request fields, labels and context."""
    df = interactions.copy()
    df["user_id"] = df["user_id"].astype(str)
    df["item_id"] = df["item_id"].astype(str)
    df["request_ts"] = (df[contract.TIMESTAMP] - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return df


def iter_training_set(store, interactions: pd.DataFrame | Path, chunk_rows: int = 250_000, join: str | None = None):
    """Point-in-time join of every impression with the feature service, in globally ordered chunks.

    ``join``: ``asof`` (``feature_repo/asof.py``), ``feast`` (the offline engine's own retrieval: DuckDB or
    Spark) or ``auto`` (as-of on DuckDB, the engine's on Spark); default ``MTLREC_TRAINING_JOIN``. All read
    the same Feast definitions and give the same rows.

    ``interactions``: the log as a frame, or a dataset directory to read it from. From a directory the
    as-of join never holds the log in pandas: DuckDB reads its parquet (``asof.log_select``), or, when its
    timestamps need pandas' parsing, takes it a row group at a time (``log_chunks``).
    """
    from feature_repo.engines import engine_of

    join = join or get_settings().training_join
    if join not in ("auto", "asof", "feast"):
        raise ValueError(f"training join must be 'auto', 'asof' or 'feast', not {join!r}")
    if join == "auto":  # DuckDB's as-of join on the embedded engine; a distributed engine does its own
        join = "asof" if engine_of(store) == "duckdb" else "feast"
    from_disk = not isinstance(interactions, pd.DataFrame)
    if from_disk and join == "feast":  # Feast's retrieval takes frames
        interactions, from_disk = contract.load_dataset(interactions)["interactions"], False
    if from_disk:  # only the as-of join: DuckDB reads the log itself, or sorts its batches on disk
        from feature_repo.asof import log_select

        log = Path(interactions) / contract.INTERACTIONS.file
        entities = log if log_select(log) is not None else (entity_frame(p) for p in log_chunks(interactions,
                                                                                               chunk_rows))
    else:
        entities = entity_frame(interactions).sort_values(ORDER, kind="stable", ignore_index=True)
    if join == "asof":
        from feature_repo.asof import iter_asof_training_set

        return iter_asof_training_set(store, entities, chunk_rows, order=list(ORDER))
    return _feast_training_set(store, entities, chunk_rows)


def log_chunks(dataset: Path | str, chunk_rows: int):
    """The impression log of a dataset directory, a batch at a time, coerced as ``contract.load_dataset`` does."""
    path = Path(dataset) / contract.INTERACTIONS.file
    for batch in contract.parquet_batches(path, chunk_rows):
        yield contract.coerce_timestamps(batch.to_pandas())


def _feast_training_set(store, entities: pd.DataFrame, chunk_rows: int):
    """Feast's own retrieval, a chunk at a time, of the sorted entity frame.

    Chunked because Feast's retrieval holds several copies of its input, so one call on a large log does not
    fit a small machine (see benchmarks/README.md). Chunking changes nothing in the result: each impression's
    join depends only on its own keys and timestamp. The log is sorted by (timestamp, user, item) first, so
    the chunks, each sorted the same way, concatenate into one ordered table.
    """
    fs = store.get_feature_service(FEATURE_SERVICE)
    for start in range(0, len(entities), chunk_rows):
        chunk = entities.iloc[start:start + chunk_rows]
        part = store.get_historical_features(entity_df=chunk, features=fs).to_df()
        if len(part) != len(chunk):  # Feast drops rows it cannot match; a training set must not
            raise RuntimeError(f"point-in-time join returned {len(part)} rows for {len(chunk)} impressions")
        part[contract.TIMESTAMP] = pd.to_datetime(part[contract.TIMESTAMP], utc=True)
        for column in chunk.columns:  # Spark widens the log's own columns (int8 labels, us timestamps)
            if column in part and part[column].dtype != chunk[column].dtype:
                part[column] = part[column].astype(chunk[column].dtype)
        yield part.sort_values(ORDER, kind="stable", ignore_index=True)


def training_set(store, interactions: pd.DataFrame | Path, chunk_rows: int = 250_000,
                 join: str | None = None) -> pd.DataFrame:
    """The whole point-in-time training set in memory (small logs, tests)."""
    parts = list(iter_training_set(store, interactions, chunk_rows, join))
    if parts:
        return pd.concat(parts, ignore_index=True)
    if not isinstance(interactions, pd.DataFrame):
        interactions = contract.load_dataset(interactions)["interactions"]
    return entity_frame(interactions).iloc[:0]


def training_metadata(settings: StoreSettings) -> dict:
    """What training needs to know beside the rows: the dataset's declaration and the model's input columns.

    Stored in the training parquet's own metadata (``models.data.training_table.TABLE_METADATA``), so the file
    alone, copied to a GPU machine, says which columns are labels and which are features.
    """
    schema = FeatureSchema.load(settings.tables)
    return {"declaration": schema.declaration, "features": schema.model_features(),
            "item_columns": schema.item_columns,
            "feature_service": FEATURE_SERVICE}


def write_training_set(store, interactions: pd.DataFrame | Path, path: Path | str, chunk_rows: int = 250_000,
                       metadata: dict | None = None, join: str | None = None) -> int:
    """Stream the training set to one parquet file, a chunk at a time; returns its row count."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.data.training_table import TABLE_METADATA

    path = Path(path)
    tmp = path.with_suffix(".parquet.tmp")
    writer, rows, pending = None, 0, None

    def write(part: pd.DataFrame) -> None:
        writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))

    # One chunk is converted and encoded on a second thread while the next is joined and transformed (Arrow
    # releases the GIL); at most one chunk waits, so memory stays two chunks.
    with ThreadPoolExecutor(max_workers=1) as pool:
        try:
            for part in iter_training_set(store, interactions, chunk_rows, join):
                if writer is None:
                    schema = pa.Schema.from_pandas(part, preserve_index=False)
                    # A column that is all missing in the first chunk must still take later chunks' strings.
                    schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f
                                        for f in schema])
                    if metadata is not None:
                        schema = schema.with_metadata({**(schema.metadata or {}),
                                                       TABLE_METADATA: json.dumps(metadata).encode()})
                    writer = pq.ParquetWriter(tmp, schema)
                if pending is not None:
                    pending.result()
                pending = pool.submit(write, part)
                rows += len(part)
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.cancel()
                with contextlib.suppress(BaseException):
                    pending.result()  # never close the file under a write
            if writer is not None:
                writer.close()
    tmp.replace(path)  # readers never see a half-written training set
    return rows
