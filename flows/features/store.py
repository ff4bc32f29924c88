"""One Feast store per dataset: its config, apply, materialisation and point-in-time training sets.

The workspace of a dataset lives in ``<dataset>/_features/``: the computed
source tables, the registry, the SQLite online store and the training set.
Which online store serves is configuration: ``online="redis"`` (or the
environment variable ``MTLREC_ONLINE_STORE=redis`` with ``MTLREC_REDIS``,
default ``127.0.0.1:6379,db=0``) selects Redis; nothing in code changes.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import yaml

from feature_repo.definitions import FEATURE_SERVICE, JOIN_KEY, build
from feature_repo.schema import FeatureSchema
from models import contract

WORKSPACE = "_features"
TRAINING_FILE = "training.parquet"


@dataclass(frozen=True)
class StoreSettings:
    """Where a dataset's store lives and which online store it serves from."""

    dataset: Path
    workspace: Path
    online: str = "sqlite"  # or "redis"
    redis: str = "127.0.0.1:6379,db=0"
    project: str = "mtlrec"
    offline: str = "duckdb"  # Feast's file store (dask) is slower and drops unmatched rows

    @classmethod
    def for_dataset(cls, dataset: Path | str, *, workspace: Path | str | None = None, online: str | None = None,
                    redis: str | None = None, project: str | None = None) -> "StoreSettings":
        dataset = Path(dataset).resolve()
        online = (online or os.environ.get("MTLREC_ONLINE_STORE") or "sqlite").lower()
        if online not in ("sqlite", "redis"):
            raise ValueError(f"online store must be 'sqlite' or 'redis', not {online!r}")
        return cls(dataset=dataset, workspace=Path(workspace).resolve() if workspace else dataset / WORKSPACE,
                   online=online, redis=redis or os.environ.get("MTLREC_REDIS", "127.0.0.1:6379,db=0"),
                   project=project or os.environ.get("MTLREC_FEAST_PROJECT", "mtlrec"))

    @property
    def tables(self) -> Path:
        return self.workspace / "tables"

    @property
    def training_file(self) -> Path:
        return self.workspace / TRAINING_FILE

    def yaml_config(self) -> dict:
        online = ({"type": "sqlite", "path": str(self.workspace / "online.db")} if self.online == "sqlite"
                  else {"type": "redis", "connection_string": self.redis})
        return {"project": self.project, "provider": "local", "registry": str(self.workspace / "registry.db"),
                "online_store": online, "offline_store": {"type": self.offline},
                "entity_key_serialization_version": 3}


def open_store(settings: StoreSettings):
    """A FeatureStore on this dataset's workspace (the yaml is written there, for the `feast` CLI too)."""
    os.environ.setdefault("FEAST_USAGE", "False")
    from feast import FeatureStore

    settings.workspace.mkdir(parents=True, exist_ok=True)
    name = "feature_store.yaml" if settings.online == "sqlite" else f"feature_store.{settings.online}.yaml"
    path = settings.workspace / name
    path.write_text(yaml.safe_dump(settings.yaml_config(), sort_keys=False))
    return FeatureStore(repo_path=str(settings.workspace), fs_yaml_file=path)


def apply(store, settings: StoreSettings) -> list[str]:
    """Register entities, views and the feature service for this dataset's tables."""
    objects = build(settings.tables)
    store.apply(list(objects.values()))
    return sorted(objects)


def materialize(store, end: datetime | None = None, *, full: bool = False) -> dict[str, str]:
    """Load the latest values into the online store, incrementally by default.

    A view never materialised before starts at its earliest source row
    (Feast's own default for views without a TTL is "a year ago", which would
    skip an older log); after that, each call continues where the last ended.
    """
    end = end or datetime.now(timezone.utc)
    views = store.list_feature_views()
    fresh = [v for v in views if v.most_recent_end_time is None]
    started = {}
    if full or fresh:
        targets = views if full else fresh
        start = min(_earliest(v) for v in targets)
        store.materialize(start_date=start, end_date=end, feature_views=[v.name for v in targets])
        started.update({v.name: start.isoformat() for v in targets})
    rest = [v.name for v in views if v not in fresh and not full]
    if rest:
        store.materialize_incremental(end_date=end, feature_views=rest)
        started.update({n: "incremental" for n in rest})
    return started


def _earliest(view) -> datetime:
    ts = pd.read_parquet(view.batch_source.path, columns=[view.batch_source.timestamp_field]).iloc[:, 0]
    return (ts.min() - pd.Timedelta(seconds=1)).to_pydatetime()


def entity_frame(interactions: pd.DataFrame) -> pd.DataFrame:
    """The impression log as Feast's entity frame: keys, timestamp, request fields, labels and context."""
    df = interactions.copy()
    df["user_id"] = df["user_id"].astype(str)
    df["item_id"] = df["item_id"].astype(str)
    df["request_ts"] = (df[contract.TIMESTAMP] - pd.Timestamp(0, tz="UTC")) / pd.Timedelta(seconds=1)
    return df


def iter_training_set(store, interactions: pd.DataFrame, chunk_rows: int = 250_000):
    """Point-in-time join of every impression with the feature service, in globally ordered chunks.

    Chunked because Feast's retrieval holds several copies of its input
    (about 4 GB per million impressions here), so one call on a 10M-row log
    would not fit a small machine. Chunking changes nothing in the result:
    each impression's join depends only on its own keys and timestamp. The
    log is sorted by (timestamp, user, item) first, so the chunks, each
    sorted the same way, concatenate into one ordered table.
    """
    fs = store.get_feature_service(FEATURE_SERVICE)
    order = [contract.TIMESTAMP, "user_id", "item_id"]
    entities = entity_frame(interactions).sort_values(order, kind="stable", ignore_index=True)
    for start in range(0, len(entities), chunk_rows):
        chunk = entities.iloc[start:start + chunk_rows]
        part = store.get_historical_features(entity_df=chunk, features=fs).to_df()
        if len(part) != len(chunk):  # Feast drops rows it cannot match; a training set must not
            raise RuntimeError(f"point-in-time join returned {len(part)} rows for {len(chunk)} impressions")
        part[contract.TIMESTAMP] = pd.to_datetime(part[contract.TIMESTAMP], utc=True)
        yield part.sort_values(order, kind="stable", ignore_index=True)


def training_set(store, interactions: pd.DataFrame, chunk_rows: int = 250_000) -> pd.DataFrame:
    """The whole point-in-time training set in memory (small logs, tests)."""
    parts = list(iter_training_set(store, interactions, chunk_rows))
    return pd.concat(parts, ignore_index=True) if parts else entity_frame(interactions).iloc[:0]


def training_metadata(settings: StoreSettings) -> dict:
    """What training needs to know beside the rows: the dataset's declaration and the model's input columns.

    Stored in the training parquet's own metadata (``models.table.TABLE_METADATA``), so the file alone,
    copied to a GPU machine, says which columns are labels and which are features.
    """
    schema = FeatureSchema.load(settings.tables)
    return {"declaration": schema.declaration, "features": schema.model_features(),
            "feature_service": FEATURE_SERVICE}


def write_training_set(store, interactions: pd.DataFrame, path: Path | str, chunk_rows: int = 250_000,
                       metadata: dict | None = None) -> int:
    """Stream the training set to one parquet file, a chunk at a time; returns its row count."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq

    from models.table import TABLE_METADATA

    path = Path(path)
    tmp = path.with_suffix(".parquet.tmp")
    writer, rows = None, 0
    try:
        for part in iter_training_set(store, interactions, chunk_rows):
            if writer is None:
                schema = pa.Schema.from_pandas(part, preserve_index=False)
                # A column that is all missing in the first chunk must still take later chunks' strings.
                schema = pa.schema([f.with_type(pa.string()) if pa.types.is_null(f.type) else f for f in schema])
                if metadata is not None:
                    schema = schema.with_metadata({**(schema.metadata or {}),
                                                   TABLE_METADATA: json.dumps(metadata).encode()})
                writer = pq.ParquetWriter(tmp, schema)
            writer.write_table(pa.Table.from_pandas(part, schema=schema, preserve_index=False))
            rows += len(part)
    finally:
        if writer is not None:
            writer.close()
    tmp.replace(path)  # readers never see a half-written training set
    return rows


def build_all(dataset: Path | str, settings: StoreSettings | None = None, *, materialize_online: bool = True) -> dict:
    """Raw tables to training set and online store in one call: compute, apply, materialise, join."""
    from flows.features.compute import compute_feature_tables

    settings = settings or StoreSettings.for_dataset(dataset)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rows = compute_feature_tables(settings.dataset, settings.tables)
    timings["compute_s"] = time.perf_counter() - t
    store = open_store(settings)
    t = time.perf_counter()
    apply(store, settings)
    timings["apply_s"] = time.perf_counter() - t
    if materialize_online:
        t = time.perf_counter()
        materialize(store)
        timings["materialize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n = write_training_set(store, contract.load_dataset(settings.dataset)["interactions"], settings.training_file,
                           metadata=training_metadata(settings))
    timings["historical_s"] = time.perf_counter() - t
    return {"tables": rows, "training_rows": n, "training_file": str(settings.training_file),
            "feature_service": FEATURE_SERVICE, "online_store": settings.online,
            **{k: round(v, 2) for k, v in timings.items()}}


__all__ = ["StoreSettings", "open_store", "apply", "materialize", "training_set", "write_training_set", "build_all",
           "training_metadata", "JOIN_KEY"]
