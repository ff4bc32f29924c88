"""What an online store holds now, read live: per view, rows present against rows expected.

``mtlrec features status`` reports it (``status``), and materialisation checks a load with the same reads
(``feature_repo/materialize.py``). Expected rows are the entities a view's source holds up to a time; present
ones are read back through Feast's public API, all of them up to ``VERIFY_MAX`` per view, a uniform sample beyond.
"""

from __future__ import annotations

from datetime import datetime

import numpy as np
import pandas as pd

from feature_repo.store import StoreSettings, open_store

VERIFY_MAX = 200_000  # entities read back per view; beyond this a uniform sample is checked


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


def sample(ids: np.ndarray, n: int) -> np.ndarray:
    """At most ``n`` of ``ids``, evenly spaced."""
    if len(ids) <= n:
        return ids
    return ids[np.linspace(0, len(ids) - 1, n).astype(np.int64)]


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
            check = sample(want, VERIFY_MAX)
            got = online_rows(store, v, check)
            out["views"][v.name] = {"rows": int(got if len(check) == len(want) else
                                                round(got * len(want) / max(len(check), 1))),
                                    "expected": int(len(want)),
                                    "loaded_to": loaded_to.isoformat() if loaded_to else None}
    except Exception as e:  # noqa: BLE001 - status reports an unreachable store, it does not fail on it
        out.update(reachable=False, error=f"{type(e).__name__}: {e}")
    return out
