"""A dataset's whole feature store in one call (``mtlrec features build``): compute the feature tables, apply
the definitions, materialise the online store, write the point-in-time training set."""

from __future__ import annotations

import time
from pathlib import Path

from feature_repo.apply import apply
from feature_repo.materialize import materialize
from feature_repo.schema import FEATURE_SERVICE
from feature_repo.store import StoreSettings, open_store
from feature_repo.training_set import training_metadata, write_training_set


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
