"""One Feast store per dataset: its config, apply, materialisation and point-in-time training sets.

The workspace of a dataset lives in ``<dataset>/_features/``: the computed
source tables, the registry, the SQLite online store and the training set.
Which online store serves is configuration: ``online="redis"`` (or the
environment variable ``MTLREC_ONLINE_STORE=redis`` with ``MTLREC_REDIS``,
default ``127.0.0.1:6379,db=0``; ``models.settings``) selects Redis; nothing in
code changes.
"""

from __future__ import annotations

import importlib.util

import json
import os
import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd
import yaml

from feature_repo.schema import FEATURE_SERVICE, JOIN_KEY, FeatureSchema
from models.contract import tables as contract
from models.settings import get_settings

WORKSPACE = "_features"
ENGINES = ("duckdb", "spark")
TRAINING_FILE = "training.parquet"


@dataclass(frozen=True)
class StoreSettings:
    """Where a dataset's store lives and which online store it serves from."""

    dataset: Path
    workspace: Path
    online: str = "sqlite"  # or "redis"
    redis: str = "127.0.0.1:6379,db=0"
    project: str = "mtlrec"
    # Feast's offline store and compute engine: duckdb (embedded; Feast's file store, dask, is slower and drops
    # unmatched rows) or spark (feature_repo/engines.py).
    offline: str = "duckdb"
    spark_master: str = "local[2]"
    spark_conf: tuple[tuple[str, str], ...] = ()  # hashable: settings are frozen

    @classmethod
    def for_dataset(cls, dataset: Path | str, *, workspace: Path | str | None = None, online: str | None = None,
                    redis: str | None = None, project: str | None = None,
                    offline: str | None = None) -> "StoreSettings":
        """Arguments win; what they leave out comes from the environment as it is now (``models.settings``)."""
        env = get_settings()
        dataset = Path(dataset).resolve()
        online = (online or env.online_store).lower()
        if online not in ("sqlite", "redis"):
            raise ValueError(f"online store must be 'sqlite' or 'redis', not {online!r}")
        if online == "redis" and importlib.util.find_spec("redis") is None:
            raise ValueError("the redis online store needs the redis client: pip install 'mtlrec[redis]'")
        offline = (offline or env.offline_engine).lower()
        if offline not in ENGINES:
            raise ValueError(f"offline engine must be one of {ENGINES}, not {offline!r}")
        return cls(dataset=dataset, workspace=Path(workspace).resolve() if workspace else dataset / WORKSPACE,
                   online=online, redis=redis or env.redis, project=project or env.feast_project,
                   offline=offline, spark_master=env.spark_master, spark_conf=tuple(sorted(env.spark_conf.items())))

    @property
    def tables(self) -> Path:
        return self.workspace / "tables"

    @property
    def training_file(self) -> Path:
        return self.workspace / TRAINING_FILE

    @property
    def store_id(self) -> str:
        """Which online store this is: ``sqlite``, or ``redis-<host>-<port>-db<n>``.

        Each online store keeps its own Feast registry (``registry_file``): Feast records in the registry up
        to when each view was materialised, and a registry shared by SQLite and Redis would tell a fresh
        Redis that it already holds everything SQLite was given.
        """
        if self.online == "sqlite":
            return "sqlite"
        parts = self.redis.split(",")
        host, _, port = parts[0].partition(":")
        db = next((p.split("=", 1)[1] for p in parts[1:] if p.startswith("db=")), "0")
        return re.sub(r"[^A-Za-z0-9_.-]", "_", f"redis-{host}-{port or 6379}-db{db}")

    @property
    def registry_file(self) -> Path:
        return self.workspace / ("registry.db" if self.online == "sqlite" else f"registry-{self.store_id}.db")

    def yaml_config(self, registry: Path | None = None) -> dict:
        online = ({"type": "sqlite", "path": str(self.workspace / "online.db")} if self.online == "sqlite"
                  else {"type": "redis", "connection_string": self.redis})
        from feature_repo.engines import engine_config

        return {"project": self.project, "provider": "local", "registry": str(registry or self.registry_file),
                "online_store": online, **engine_config(self), "entity_key_serialization_version": 3}


def open_store(settings: StoreSettings, *, serving: bool = False):
    """A FeatureStore on this dataset's workspace (the yaml is written there, for the `feast` CLI too).

    ``serving``: the service needs the feature definitions, not the bookkeeping of materialisation; an online
    store never materialised into has no registry of its own yet, so it reads the definitions from the
    dataset's main registry (and then reports itself not ready: it holds no rows). It reads online rows only,
    so it runs on the embedded offline engine whatever the pipeline's is: a bento ships without pyspark, and
    Feast reads the registry's SparkSources without it.
    """
    os.environ.setdefault("FEAST_USAGE", "False")
    from feast import FeatureStore

    from feature_repo.engines import check_available

    offline_engine = settings.offline
    if serving:
        settings = replace(settings, offline=ENGINES[0])
    check_available(settings.offline)

    settings.workspace.mkdir(parents=True, exist_ok=True)
    registry = serving_registry(settings) if serving else settings.registry_file
    name = "feature_store.yaml" if settings.online == "sqlite" else f"feature_store.{settings.store_id}.yaml"
    if registry != settings.registry_file or settings.offline != offline_engine:
        name = f"feature_store.{settings.store_id}.serving.yaml"
    path = settings.workspace / name
    text = yaml.safe_dump(settings.yaml_config(registry), sort_keys=False)
    if not path.is_file() or path.read_text() != text:  # serving workers open it at once: replace, never truncate
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_text(text)
        os.replace(tmp, path)
    return FeatureStore(repo_path=str(settings.workspace), fs_yaml_file=path)


def serving_registry(settings: StoreSettings) -> Path:
    """The registry the service reads: this online store's own, or the dataset's main one before the first
    materialisation into it (see ``open_store``)."""
    registry = settings.registry_file
    return registry if registry.is_file() else settings.workspace / "registry.db"


class StoreNotBuilt(FileNotFoundError):
    """The dataset has no feature store, or its store lacks the feature service; the message names the fix."""


def check_servable(settings: StoreSettings, shown: Path | str | None = None) -> Path:
    """Raise StoreNotBuilt unless the registry the service would read holds the feature service; return it.

    Reads the registry file without Feast (``feature_services``), so ``mtlrec serve`` can refuse in well under a
    second instead of after Feast's import. ``shown``: the dataset as the user wrote it, for the message.
    """
    shown = str(shown if shown is not None else settings.dataset)
    fix = f"build it with `mtlrec features build {shown}`"
    registry = serving_registry(settings)
    if not registry.is_file():
        raise StoreNotBuilt(f"no feature store for {shown} (no Feast registry at {registry}): {fix}")
    try:
        services = feature_services(registry, settings.project)
    except (OSError, ValueError) as e:
        raise StoreNotBuilt(f"the Feast registry {registry} of {shown} cannot be read ({e}): re{fix}") from None
    if FEATURE_SERVICE not in services:
        raise StoreNotBuilt(f"the feature store of {shown} has no feature service {FEATURE_SERVICE!r} in project "
                            f"{settings.project!r} (registry {registry}): {fix}")
    return registry


def feature_services(registry: Path | str, project: str) -> list[str]:
    """The names of the feature services a Feast file registry holds for ``project``, read without Feast.

    Importing Feast takes seconds (it imports torch), too long for a precondition. The file is Feast's
    ``RegistryProto``: ``feature_services`` is its field 7, each a ``FeatureService`` whose ``spec`` (1) has
    ``name`` (1) and ``project`` (2). Field numbers are protobuf's wire contract, fixed across Feast versions;
    tests compare this with Feast's own ``list_feature_services``.
    """
    names = []
    for number, service in _proto_fields(Path(registry).read_bytes()):
        if number != 7:
            continue
        spec = dict(_proto_fields(next((v for n, v in _proto_fields(service) if n == 1), b"")))
        if spec.get(2, b"").decode() == project and 1 in spec:
            names.append(spec[1].decode())
    return names


def _proto_fields(buf: bytes):
    """(field number, bytes) of each length-delimited field of a serialised protobuf message, in order."""
    def varint(i: int) -> tuple[int, int]:
        value = shift = 0
        while True:
            if i >= len(buf):
                raise ValueError("truncated protobuf message")
            b = buf[i]
            value |= (b & 0x7F) << shift
            i, shift = i + 1, shift + 7
            if not b & 0x80:
                return value, i

    i = 0
    while i < len(buf):
        key, i = varint(i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            _, i = varint(i)
        elif wire in (1, 5):
            i += 8 if wire == 1 else 4
        elif wire == 2:
            size, i = varint(i)
            if i + size > len(buf):
                raise ValueError("truncated protobuf message")
            yield number, buf[i:i + size]
            i += size
        else:
            raise ValueError(f"not a protobuf message (wire type {wire})")
    if i != len(buf):
        raise ValueError("truncated protobuf message")


def apply(store, settings: StoreSettings) -> list[str]:
    """Register entities, views and the feature service for this dataset's tables."""
    from feature_repo.definitions import build

    objects = build(settings.tables, engine=settings.offline)
    store.apply(list(objects.values()))
    return sorted(objects)


class MaterializationError(RuntimeError):
    """The online store does not hold what was just materialised into it."""


def materialize(store, settings: StoreSettings, end: datetime | None = None, *, full: bool = False,
                verify: bool = True) -> dict[str, dict]:
    """Load the latest values into the online store, incrementally by default, and check that they are there.

    The registry says up to when each view was loaded, but only the store knows what it holds: a Redis
    restarted empty, or flushed, still has a registry that calls it loaded. So before an incremental load a
    sample of the entities the view must hold is read back from the store; a view found empty or behind is
    reloaded in full. A view never materialised before starts at its earliest source row (Feast's own default
    for views without a TTL is "a year ago", which would skip an older log). After loading, every entity the
    sources hold up to ``end`` is read back (``verify``) and a shortfall raises MaterializationError.
    Returns, per view: where the load started, why a full load happened, rows found and rows expected.
    """
    end = end or datetime.now(timezone.utc)
    apply(store, settings)  # this store's own registry must hold the views before anything is loaded into it
    views = store.list_feature_views()
    report: dict[str, dict] = {v.name: {} for v in views}
    reload = []
    for v in views:
        if full:
            reload.append(v)
            report[v.name]["reloaded"] = "asked for a full load"
        elif v.most_recent_end_time is None:
            reload.append(v)
            report[v.name]["reloaded"] = "never loaded into this store"
        else:
            sample = _sample(expected_entities(v, v.most_recent_end_time), 32)
            if len(sample) and online_rows(store, v, sample) < len(sample):
                reload.append(v)
                report[v.name]["reloaded"] = "the store lacks rows its registry says it holds"
    if reload:
        start = min(_earliest(v) for v in reload)
        store.materialize(start_date=start, end_date=end, feature_views=[v.name for v in reload])
        for v in reload:
            report[v.name]["from"] = start.isoformat()
    rest = [v.name for v in views if v not in reload]
    if rest:
        store.materialize_incremental(end_date=end, feature_views=rest)
        for name in rest:
            report[name]["from"] = "incremental"
    if verify:
        for v in store.list_feature_views():
            want = expected_entities(v, end)
            check = _sample(want, VERIFY_MAX)
            got = online_rows(store, v, check)
            report[v.name].update(rows=int(got if len(check) == len(want) else round(got * len(want) / len(check))),
                                  expected=int(len(want)), checked=int(len(check)))
            if got < len(check):
                raise MaterializationError(
                    f"{v.name}: the online store ({settings.store_id}) holds {got:,} of the {len(check):,} entities "
                    f"just materialised into it; check that it is reachable and not evicting keys (Redis maxmemory)")
    _save_state(settings, report, end)
    return report


VERIFY_MAX = 200_000  # entities read back per view after a load; beyond this a uniform sample is checked
STATE_FILE = "online_state.json"


def expected_entities(view, end: datetime) -> np.ndarray:
    """The entity ids the view's source holds rows for at or before ``end``: what the online store must hold."""
    src = view.batch_source
    key = view.entity_columns[0].name if view.entity_columns else next(iter(view.join_keys))
    df = pd.read_parquet(src.path, columns=[key, src.timestamp_field])
    ts = pd.to_datetime(df[src.timestamp_field], utc=True)
    return df.loc[ts <= pd.Timestamp(end), key].astype(str).unique()


def online_rows(store, view, ids) -> int:
    """How many of ``ids`` the online store holds for ``view``, read back through Feast's public API."""
    ids = list(ids)
    if not ids:
        return 0
    key = view.entity_columns[0].name if view.entity_columns else next(iter(view.join_keys))
    names = [f.name for f in view.features]
    present = 0
    for start in range(0, len(ids), 5000):
        chunk = ids[start:start + 5000]
        df = store.get_online_features(features=[f"{view.name}:{n}" for n in names],
                                       entity_rows=[{key: i} for i in chunk]).to_df()
        present += int(df[names].notna().any(axis=1).sum())
    return present


def _sample(ids: np.ndarray, n: int) -> np.ndarray:
    if len(ids) <= n:
        return ids
    return ids[np.linspace(0, len(ids) - 1, n).astype(np.int64)]


def _save_state(settings: StoreSettings, report: dict[str, dict], end: datetime) -> None:
    path = settings.workspace / STATE_FILE
    state = json.loads(path.read_text()) if path.is_file() else {}
    state[settings.store_id] = {"materialized_to": pd.Timestamp(end).isoformat(),
                                "checked_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                                "views": report}
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(state, indent=1, default=str))
    os.replace(tmp, path)


def status(settings: StoreSettings) -> dict:
    """What this online store holds now, per view: rows present against rows expected, and up to when it was
    loaded (its registry); read live, so an emptied store shows as empty whatever was recorded."""
    out: dict = {"store": settings.store_id, "reachable": True, "views": {}}
    if not settings.registry_file.is_file():
        out.update(reachable=None, error=f"never materialised into {settings.store_id}")
        return out
    store = open_store(settings)
    try:
        for v in store.list_feature_views():
            loaded_to = v.most_recent_end_time
            want = expected_entities(v, loaded_to) if loaded_to else np.array([])
            check = _sample(want, VERIFY_MAX)
            got = online_rows(store, v, check)
            out["views"][v.name] = {"rows": int(got if len(check) == len(want) else
                                                round(got * len(want) / max(len(check), 1))),
                                    "expected": int(len(want)),
                                    "loaded_to": loaded_to.isoformat() if loaded_to else None}
    except Exception as e:  # noqa: BLE001 - status reports an unreachable store, it does not fail on it
        out.update(reachable=False, error=f"{type(e).__name__}: {e}")
    return out


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
    order = [contract.TIMESTAMP, "user_id", "item_id"]
    from_disk = not isinstance(interactions, pd.DataFrame)
    if from_disk and join == "feast":  # Feast's retrieval takes frames
        interactions, from_disk = contract.load_dataset(interactions)["interactions"], False
    if from_disk:  # only the as-of join: DuckDB reads the log itself, or sorts its batches on disk
        from feature_repo.asof import log_select

        log = Path(interactions) / contract.INTERACTIONS.file
        entities = log if log_select(log) is not None else (entity_frame(p) for p in log_chunks(interactions,
                                                                                               chunk_rows))
    else:
        entities = entity_frame(interactions).sort_values(order, kind="stable", ignore_index=True)
    if join == "asof":
        from feature_repo.asof import iter_asof_training_set

        return iter_asof_training_set(store, entities, chunk_rows, order=order)
    return _feast_training_set(store, entities, chunk_rows)


def log_chunks(dataset: Path | str, chunk_rows: int):
    """The impression log of a dataset directory, a batch at a time, coerced as ``contract.load_dataset`` does."""
    path = Path(dataset) / contract.INTERACTIONS.file
    for batch in contract.parquet_batches(path, chunk_rows):
        yield contract.coerce_timestamps(batch.to_pandas())


def _feast_training_set(store, entities: pd.DataFrame, chunk_rows: int):
    """Feast's own retrieval, a chunk at a time, of the sorted entity frame.

    Chunked because Feast's retrieval holds several copies of its input
    (about 4 GB per million impressions here), so one call on a 10M-row log
    would not fit a small machine. Chunking changes nothing in the result:
    each impression's join depends only on its own keys and timestamp. The
    log is sorted by (timestamp, user, item) first, so the chunks, each
    sorted the same way, concatenate into one ordered table.
    """
    fs = store.get_feature_service(FEATURE_SERVICE)
    order = [contract.TIMESTAMP, "user_id", "item_id"]
    for start in range(0, len(entities), chunk_rows):
        chunk = entities.iloc[start:start + chunk_rows]
        part = store.get_historical_features(entity_df=chunk, features=fs).to_df()
        if len(part) != len(chunk):  # Feast drops rows it cannot match; a training set must not
            raise RuntimeError(f"point-in-time join returned {len(part)} rows for {len(chunk)} impressions")
        part[contract.TIMESTAMP] = pd.to_datetime(part[contract.TIMESTAMP], utc=True)
        for column in chunk.columns:  # Spark widens the log's own columns (int8 labels, us timestamps)
            if column in part and part[column].dtype != chunk[column].dtype:
                part[column] = part[column].astype(chunk[column].dtype)
        yield part.sort_values(order, kind="stable", ignore_index=True)


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

    Stored in the training parquet's own metadata (``models.data.training_table.TABLE_METADATA``), so the file alone,
    copied to a GPU machine, says which columns are labels and which are features.
    """
    schema = FeatureSchema.load(settings.tables)
    return {"declaration": schema.declaration, "features": schema.model_features(),
            "item_columns": schema.item_columns,
            "feature_service": FEATURE_SERVICE}


def write_training_set(store, interactions: pd.DataFrame | Path, path: Path | str, chunk_rows: int = 250_000,
                       metadata: dict | None = None, join: str | None = None) -> int:
    """Stream the training set to one parquet file, a chunk at a time; returns its row count."""
    import contextlib
    import json
    from concurrent.futures import ThreadPoolExecutor

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


def build_all(dataset: Path | str, settings: StoreSettings | None = None, *, materialize_online: bool = True) -> dict:
    """Raw tables to training set and online store in one call: compute, apply, materialise, join."""
    from feature_repo.compute import compute_feature_tables

    settings = settings or StoreSettings.for_dataset(dataset)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    rows = compute_feature_tables(settings.dataset, settings.tables, store=settings)
    timings["compute_s"] = time.perf_counter() - t
    store = open_store(settings)
    t = time.perf_counter()
    apply(store, settings)
    timings["apply_s"] = time.perf_counter() - t
    if materialize_online:
        t = time.perf_counter()
        materialize(store, settings)
        timings["materialize_s"] = time.perf_counter() - t
    t = time.perf_counter()
    n = write_training_set(store, settings.dataset, settings.training_file, metadata=training_metadata(settings))
    timings["historical_s"] = time.perf_counter() - t
    return {"tables": rows, "training_rows": n, "training_file": str(settings.training_file),
            "feature_service": FEATURE_SERVICE, "online_store": settings.online,
            **{k: round(v, 2) for k, v in timings.items()}}


__all__ = ["StoreSettings", "open_store", "serving_registry", "check_servable", "StoreNotBuilt", "apply", "materialize",
           "training_set", "write_training_set", "build_all", "training_metadata", "status", "MaterializationError",
           "JOIN_KEY"]
