"""Register a dataset's Feast objects (``feature_repo/definitions.py``) in its store: what ``feast apply`` does
for the pipeline, on the tables of that dataset."""

from __future__ import annotations

from feature_repo.store import StoreSettings


def apply(store, settings: StoreSettings) -> list[str]:
    """Register entities, views and the feature service for this dataset's tables; returns their names."""
    from feature_repo.definitions import build

    objects = build(settings.tables, engine=settings.offline)
    store.apply(list(objects.values()))
    return sorted(objects)
