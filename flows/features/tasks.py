"""The feature stages as Prefect tasks, for the pipeline flow.

Tasks take paths and settings, never a ``FeatureStore`` (it does not hash
for Prefect's cache key); each opens its own store. Materialisation and
online reads talk to Redis when so configured, so they retry with backoff.
"""

from __future__ import annotations

from pathlib import Path

from prefect import task

from flows.features import store as fstore
from flows.features.compute import compute_feature_tables


@task(name="compute-features", retries=1, retry_delay_seconds=5)
def compute_features(dataset: str, online: str | None = None) -> dict:
    s = fstore.StoreSettings.for_dataset(dataset, online=online)
    return compute_feature_tables(s.dataset, s.tables)


@task(name="apply-features", retries=2, retry_delay_seconds=[2, 10])
def apply_features(dataset: str, online: str | None = None) -> list[str]:
    s = fstore.StoreSettings.for_dataset(dataset, online=online)
    return fstore.apply(fstore.open_store(s), s)


@task(name="materialize-features", retries=3, retry_delay_seconds=[2, 10, 30])
def materialize_features(dataset: str, online: str | None = None, full: bool = False) -> dict:
    s = fstore.StoreSettings.for_dataset(dataset, online=online)
    return fstore.materialize(fstore.open_store(s), s, full=full)


@task(name="training-set", retries=1, retry_delay_seconds=5)
def training_set(dataset: str, online: str | None = None) -> str:
    from models import contract

    s = fstore.StoreSettings.for_dataset(dataset, online=online)
    fstore.write_training_set(fstore.open_store(s), contract.load_dataset(s.dataset)["interactions"], s.training_file,
                              metadata=fstore.training_metadata(s))
    return str(Path(s.training_file))
