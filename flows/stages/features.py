"""Features, the second stage: compute, apply, materialise, training set; each step a Prefect task.

Tasks take paths and settings, never a ``FeatureStore`` (it does not hash
for Prefect's cache key); each opens its own store. ``key``, unused by the
task, is the fingerprint of the stage's inputs, computed once by the flow:
what the cache is keyed on. Materialisation and online reads talk to Redis
when so configured, so they retry with backoff.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from prefect import flow, task

from flows.caching import code_digest, dataset_digest, digest
from flows.stages.common import HOUR, MINUTE, Online, value

if TYPE_CHECKING:
    from feature_repo.store import StoreSettings


def _store(dataset: str, online: str | None):
    """Feast and the store code load when a step runs, not when ``prefect deploy`` reads the entrypoint."""
    from feature_repo import store

    return store, store.StoreSettings.for_dataset(dataset, online=online)


@task(name="compute-features", retries=1, retry_delay_seconds=5)
def compute_features(dataset: str, online: str | None = None, key: str = "") -> dict:
    from feature_repo.compute import compute_feature_tables

    _, s = _store(dataset, online)
    return compute_feature_tables(s.dataset, s.tables, store=s)


@task(name="apply-features", retries=2, retry_delay_seconds=[2, 10])
def apply_features(dataset: str, online: str | None = None, key: str = "") -> list[str]:
    from feature_repo.apply import apply

    fstore, s = _store(dataset, online)
    return apply(fstore.open_store(s), s)


@task(name="materialize-features", retries=3, retry_delay_seconds=[2, 10, 30])
def materialize_features(dataset: str, online: str | None = None, key: str = "", full: bool = False) -> dict:
    from feature_repo.materialize import materialize

    fstore, s = _store(dataset, online)
    return materialize(fstore.open_store(s), s, full=full)


@task(name="training-set", retries=1, retry_delay_seconds=5)
def training_set(dataset: str, online: str | None = None, key: str = "") -> str:
    from feature_repo.training_set import training_metadata, write_training_set

    fstore, s = _store(dataset, online)
    # The log's directory, not a frame: the as-of join reads it a row group at a time (larger than memory).
    write_training_set(fstore.open_store(s), s.dataset, s.training_file, metadata=training_metadata(s))
    return str(Path(s.training_file))


def inputs_key(s: StoreSettings) -> str:
    """Everything the feature files are built from: where they go, the dataset's bytes, and the code."""
    where = {"dataset": str(s.dataset), "online": s.online, "redis": s.redis if s.online == "redis" else None,
             "project": s.project, "offline": s.offline}  # the registry's sources are the engine's type
    code = code_digest("feature_repo", "flows/stages/features.py", "models/contract/tables.py")
    return digest(where, dataset_digest(s.dataset), code)


def outputs_exist(s: StoreSettings, key: str) -> bool:
    """The files sit at one path per dataset: they must exist and be the ones this key built (not a later build
    on other data or settings, which a cache hit for this key would otherwise hand on)."""
    need = [s.training_file, s.registry_file] + ([s.workspace / "online.db"] if s.online == "sqlite" else [])
    stamp = s.workspace / ".built-for"
    built_here = stamp.is_file() and stamp.read_text().strip() == key
    return built_here and all(p.exists() for p in need) and s.tables.is_dir() and any(s.tables.glob("*.parquet"))


def features_cache_key(context, parameters: dict) -> str:
    """The flow computed the inputs' key once; each step's cache entry is that key under the step's name."""
    return f"mtlrec-features-{context.task.name}-{parameters['key']}"


@flow(name="build-features", timeout_seconds=3 * HOUR)
def features_flow(data: str, online: Online | None = None) -> dict:
    """Feature tables, Feast apply, online materialisation, point-in-time training set.

    With Redis online, materialisation is never served from the cache: the
    pipeline cannot see from here whether Redis still holds the values, and
    an incremental materialisation of unchanged data is cheap.
    """
    _, s = _store(data, online)
    key = inputs_key(s)
    cache = dict(cache_key_fn=features_cache_key, persist_result=True, refresh_cache=not outputs_exist(s, key))
    cached: list[str] = []
    rows = value(compute_features.with_options(timeout_seconds=HOUR, **cache)(
        data, online, key, return_state=True), "compute", cached)
    views = value(apply_features.with_options(timeout_seconds=15 * MINUTE, **cache)(
        data, online, key, return_state=True), "apply", cached)
    materialize = materialize_features.with_options(timeout_seconds=HOUR, **(cache if s.online == "sqlite" else {}))
    started = value(materialize(data, online, key, return_state=True), "materialize", cached)
    training = value(training_set.with_options(timeout_seconds=2 * HOUR, **cache)(
        data, online, key, return_state=True), "training-set", cached)
    (s.workspace / ".built-for").write_text(key + "\n")  # what outputs_exist checks on the next run
    return {"tables": rows, "views": views, "materialized": started, "training_file": training,
            "cached": cached == ["compute", "apply", "materialize", "training-set"], "cached_steps": cached}
