"""Online features for one user and up to a thousand candidate items per request.

Two paths return the same frame. ``sdk`` is Feast's own
``get_online_features`` on the feature service: the reference. ``features``
is the served path: a read-through cache over Feast's online store (the
provider's ``online_read``, values decoded by Feast's own type map), then the
context view's transform (``feature_repo.transforms``) applied in-process.
Items change slowly and are shared by every request, so they are cached for
``item_ttl_s``; the user's row for ``user_ttl_s``. A miss reads all missing
keys of a view in one bulk call. The cache is per process and guarded by a
lock: SQLite connections are not shared across threads, and several serving
workers each keep their own cache (on Redis for scale-out).
"""

from __future__ import annotations

import threading
import time

import numpy as np
import pandas as pd

from feature_repo.definitions import FEATURE_SERVICE, JOIN_KEY
from feature_repo.transforms import context_features


class FeatureReader:
    def __init__(self, store, *, user_ttl_s: float = 5.0, item_ttl_s: float = 60.0):
        self.store = store
        self.service = store.get_feature_service(FEATURE_SERVICE)
        self.provider = store._get_provider()
        on_demand = {v.name for v in store.list_on_demand_feature_views()}  # computed here, not stored online
        self.views: dict[str, list] = {"user": [], "item": []}
        for proj in self.service.feature_view_projections:
            if proj.name not in on_demand:
                view = store.get_feature_view(proj.name)
                self.views[_entity_of(view)].append(view)
        self.columns_of = {e: [f.name for v in vs for f in v.features] for e, vs in self.views.items()}
        self.ttl = {"user": user_ttl_s, "item": item_ttl_s}
        self._lock = threading.Lock()
        self._index: dict[str, dict[str, tuple[float, int]]] = {"user": {}, "item": {}}
        self._cols = {e: [np.empty(0, dtype=object if _is_string(f) else np.float64) for v in vs for f in v.features]
                      for e, vs in self.views.items()}
        self._known = {e: np.zeros(0, dtype=bool) for e in self.views}

    # ---- reference path -----------------------------------------------------------------
    def sdk(self, user_id: str, item_ids: list[str], request_ts: float) -> pd.DataFrame:
        rows = [{"user_id": user_id, "item_id": i, "request_ts": float(request_ts)} for i in item_ids]
        return self.store.get_online_features(features=self.service, entity_rows=rows).to_df()

    # ---- served path --------------------------------------------------------------------
    def _slots(self, entity: str, ids: list[str]) -> np.ndarray:
        """Row numbers of ``ids`` in the entity's columnar cache, reading missing or stale ones in bulk."""
        now = time.monotonic()
        with self._lock:
            index = self._index[entity]
            missing = [i for i in dict.fromkeys(ids) if (hit := index.get(i)) is None or hit[0] < now]
            if missing:
                fresh = self._read(entity, missing)
                cols = self._grow(entity, len(index) + len(missing))
                expires = now + self.ttl[entity]
                for i, values in zip(missing, fresh):
                    row = index[i][1] if i in index else len(index)
                    index[i] = (expires, row)
                    for col, v in zip(cols, values):
                        col[row] = (np.nan if col.dtype.kind == "f" else None) if v is None else v
                    self._known[entity][row] = any(v is not None for v in values)
            return np.fromiter((index[i][1] for i in ids), dtype=np.int64, count=len(ids))

    def _grow(self, entity: str, need: int) -> list[np.ndarray]:
        cols = self._cols[entity]
        have = len(self._known[entity])
        if need > have:
            size = max(need, 2 * have, 1024)
            self._cols[entity] = cols = [np.concatenate([c, np.full(size - have, np.nan if c.dtype.kind == "f" else None,
                                                                     dtype=c.dtype)]) for c in cols]
            self._known[entity] = np.concatenate([self._known[entity], np.zeros(size - have, dtype=bool)])
        return cols

    def _read(self, entity: str, ids: list[str]) -> list[tuple]:
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type as py

        key = JOIN_KEY[entity]
        keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=i)]) for i in ids]
        parts: list[list[tuple]] = []
        for view in self.views[entity]:
            names = [f.name for f in view.features]
            got = self.provider.online_read(config=self.store.config, table=view, entity_keys=keys,
                                            requested_features=list(names))  # Redis appends to it
            parts.append([tuple(py(vals[n]) if n in vals else None for n in names) if vals else (None,) * len(names)
                          for _, vals in got])
        return [sum(cols, ()) for cols in zip(*parts)]

    def columns(self, user_id: str, item_ids: list[str], request_ts: float) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
        """The feature service's values as arrays, which items the store knows, and whether it knows the user.

        The ranking service's path: no DataFrame is built, and one cache lookup per entity answers both
        the values and the cold-start flags.
        """
        n = len(item_ids)
        u = self._slots("user", [user_id])[0]
        rows = self._slots("item", list(item_ids))
        data: dict[str, np.ndarray] = {"user_id": np.full(n, user_id, dtype=object),
                                       "item_id": np.asarray(item_ids, dtype=object)}
        for name, col in zip(self.columns_of["user"], self._cols["user"]):
            data[name] = np.full(n, col[u], dtype=col.dtype)
        for name, col in zip(self.columns_of["item"], self._cols["item"]):
            data[name] = col[rows]
        data["request_ts"] = np.full(n, float(request_ts))
        data.update(context_features(data))
        del data["request_ts"]
        return data, self._known["item"][rows], bool(self._known["user"][u])

    def features(self, user_id: str, item_ids: list[str], request_ts: float) -> pd.DataFrame:
        """The feature service's values for (user, each item) at ``request_ts``: what ``sdk`` returns."""
        return pd.DataFrame(self.columns(user_id, item_ids, request_ts)[0])

    def known(self, entity: str, ids: list[str]) -> np.ndarray:
        """Which ids the online store has (False: cold start, scored from defaults)."""
        return self._known[entity][self._slots(entity, list(ids))]

    def invalidate(self) -> None:
        """Drop the cache, e.g. right after a materialisation."""
        with self._lock:
            for index in self._index.values():
                index.clear()


def _entity_of(view) -> str:
    keys = set(view.join_keys) if hasattr(view, "join_keys") else {e for e in view.entities}
    return "user" if "user_id" in keys or "user" in keys else "item"


def _is_string(field) -> bool:
    from feast.types import String

    return field.dtype == String
