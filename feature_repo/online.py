"""Online features for one user and up to a thousand candidate items per request.

Two paths return the same frame. ``sdk`` is Feast's own
``get_online_features`` on the feature service: the reference. ``features``
(and ``columns``, the service's) is the served path: a read-through cache over
Feast's online store (the provider's ``online_read``, values decoded by Feast's
own type map), then the context view's transform (``feature_repo.transforms``)
applied in-process. Items change slowly and are shared by every request, so
they are cached for ``CacheSettings.item_ttl_s``; the user's row for
``user_ttl_s``. A miss reads all missing keys of a view in one bulk call. The
cache is per process and guarded by a lock: SQLite connections are not shared
across threads, and several serving workers each keep their own cache (on
Redis for scale-out). It is bounded: past ``max_entries`` per entity kind the
expired rows are dropped, and if the fresh ones still fill three quarters of
it the kind's cache starts afresh, keeping only the rows the request at hand
reads (so a full cache is compacted at most once per quarter of its size in
new rows).

What the service uses: ``FeatureReader.for_serving`` (bounded Redis timeouts,
a breaker, the cache), ``columns`` (one request's features), ``ready`` (the
readiness probe) and ``StoreUnavailable``; ``read`` is one uncached bulk read,
``cache_info`` and ``invalidate`` look at and drop the cache.

Failing fast. A store that is down must cost a request milliseconds, not the
client's retries: Redis is read with bounded connect and read timeouts and no
retries (``tune_redis``), and a circuit breaker opens on the first store
error. While it is open every read fails at once with ``StoreUnavailable``;
after ``cooldown_s`` one read is let through, and its success closes the
breaker: the service recovers without a restart. Only errors of the store
itself (connection, timeout, the database) count; anything else is a bug and
propagates as itself.

Feast's public API covers all of this except the Redis client: its
connection string cannot turn redis-py's retries off. The two private Feast
names that needs are each used in one function below (``_redis_connection``,
``_use_redis_client``), and ``tests/feature_repo/test_features.py`` fails if a Feast upgrade
removes or renames them.
"""

from __future__ import annotations

import sqlite3
import threading
import time
from dataclasses import dataclass

import numpy as np
import pandas as pd

from feature_repo.schema import FEATURE_SERVICE, JOIN_KEY
from feature_repo.transforms import context_features


class StoreUnavailable(RuntimeError):
    """The online store could not be read (down, hung, or its breaker is open)."""


def store_errors() -> tuple[type[BaseException], ...]:
    """The exception types that mean "the store failed", not "the code failed"."""
    errors: list[type[BaseException]] = [sqlite3.Error, ConnectionError, TimeoutError, StoreUnavailable]
    try:
        import redis

        errors.append(redis.exceptions.RedisError)
    except ImportError:  # pragma: no cover - redis is a dependency, but the SQLite path needs none
        pass
    return tuple(errors)


class CircuitBreaker:
    """Open on a failure, fail fast while open, let one probe through after ``cooldown_s``, close on success."""

    def __init__(self, cooldown_s: float = 1.0):
        self.cooldown_s = cooldown_s
        self._open_until = 0.0
        self._probing = False
        self.last_error: str | None = None
        self.opened = 0  # times it opened (for metrics and tests)
        self._lock = threading.Lock()

    @property
    def open(self) -> bool:
        return self.last_error is not None

    def guard(self) -> None:
        """Raise StoreUnavailable while open and cooling down or probing, without claiming the probe."""
        if self.last_error is not None and (time.monotonic() < self._open_until or self._probing):
            raise StoreUnavailable(f"online store unavailable (circuit open): {self.last_error}")

    def check(self) -> None:
        """Raise StoreUnavailable at once while open; after the cooldown let exactly one caller through, whose
        read must end in ``success`` or ``failure``."""
        if self.last_error is None:
            return
        with self._lock:
            now = time.monotonic()
            if now < self._open_until or self._probing:
                raise StoreUnavailable(f"online store unavailable (circuit open): {self.last_error}")
            self._probing = True  # this caller is the probe; the rest keep failing fast until it returns

    def success(self) -> None:
        if self.last_error is not None or self._probing:
            with self._lock:
                self.last_error, self._probing = None, False

    def failure(self, error: BaseException) -> None:
        with self._lock:
            if self.last_error is None:
                self.opened += 1
            self.last_error = f"{type(error).__name__}: {error}"
            self._open_until = time.monotonic() + self.cooldown_s
            self._probing = False


@dataclass(frozen=True)
class CacheSettings:
    """The served path's read-through cache: how long a row is fresh, and how many rows per entity kind."""

    user_ttl_s: float = 5.0
    item_ttl_s: float = 60.0  # items change slowly and every request shares them
    max_entries: int = 200_000  # per entity kind; past it expired rows go first, then all but a request's

    def ttl(self, entity: str) -> float:
        return self.user_ttl_s if entity == "user" else self.item_ttl_s


class FeatureReader:
    """The feature service's online values for (user, items), through a bounded cache and a circuit breaker."""

    def __init__(self, store, *, cache: CacheSettings | None = None, cooldown_s: float = 1.0,
                 canaries: dict[str, list[str]] | None = None):
        self.store = store
        self.service = store.get_feature_service(FEATURE_SERVICE)
        self.provider = store.provider  # public API; its online_read reads many keys of a view at once
        on_demand = {v.name for v in store.list_on_demand_feature_views()}  # computed here, not stored online
        self.views: dict[str, list] = {"user": [], "item": []}
        for proj in self.service.feature_view_projections:
            if proj.name not in on_demand:
                view = store.get_feature_view(proj.name)
                self.views[_entity_of(view)].append(view)
        self.columns_of = {e: [f.name for v in vs for f in v.features] for e, vs in self.views.items()}
        self.cache = cache or CacheSettings()
        self.breaker = CircuitBreaker(cooldown_s)
        self.errors = store_errors()
        self.canaries = canaries if canaries is not None else _canaries(self.views)
        self._lock = threading.Lock()
        self._reset_cache()

    @classmethod
    def for_serving(cls, store, *, connect_timeout_s: float = 0.1, read_timeout_s: float = 0.25,
                    cooldown_s: float = 1.0, cache: CacheSettings | None = None) -> "FeatureReader":
        """The service's reader: on Redis one bounded attempt per read (``tune_redis``), then the breaker."""
        tune_redis(store, connect_timeout_s=connect_timeout_s, read_timeout_s=read_timeout_s)
        return cls(store, cache=cache, cooldown_s=cooldown_s)

    def _reset_cache(self, entity: str | None = None) -> None:
        for e in [entity] if entity else list(self.views):
            if not hasattr(self, "_index"):
                self._index, self._cols, self._known = {}, {}, {}
            self._index[e] = {}
            self._cols[e] = [np.empty(0, dtype=object if _is_string(f) else np.float64)
                             for v in self.views[e] for f in v.features]
            self._known[e] = np.zeros(0, dtype=bool)

    # ---- reference path -----------------------------------------------------------------
    def sdk(self, user_id: str, item_ids: list[str], request_ts: float) -> pd.DataFrame:
        rows = [{"user_id": user_id, "item_id": i, "request_ts": float(request_ts)} for i in item_ids]
        return self.store.get_online_features(features=self.service, entity_rows=rows).to_df()

    # ---- served path --------------------------------------------------------------------
    def _slots(self, entity: str, ids: list[str]) -> tuple[np.ndarray, list[np.ndarray], np.ndarray]:
        """Row numbers of ``ids`` in the entity's columnar cache (reading missing or stale ones in bulk), with the
        columns and known-flags they index: taken under the lock, so a cache reset cannot shift them."""
        now = time.monotonic()
        self.breaker.guard()  # fail fast before queueing on the lock behind a read that is timing out
        with self._lock:
            index = self._index[entity]
            missing = [i for i in dict.fromkeys(ids) if (hit := index.get(i)) is None or hit[0] < now]
            if missing:
                self.breaker.check()  # it may have opened while this request waited for the lock
                fresh = self.read(entity, missing)
                if len(index) + sum(i not in index for i in missing) > self.cache.max_entries:
                    index = self._make_room(entity, now, ids, len(missing))
                cols = self._grow(entity, len(index) + len(missing))
                expires = now + self.cache.ttl(entity)
                for i, values in zip(missing, fresh):
                    row = index[i][1] if i in index else len(index)
                    index[i] = (expires, row)
                    for col, v in zip(cols, values):
                        col[row] = (np.nan if col.dtype.kind == "f" else None) if v is None else v
                    self._known[entity][row] = any(v is not None for v in values)
            rows = np.fromiter((index[i][1] for i in ids), dtype=np.int64, count=len(ids))
            return rows, self._cols[entity], self._known[entity]

    def _make_room(self, entity: str, now: float, ids: list[str], adding: int) -> dict:
        """Drop the entity's expired rows, compacting its columns; if the fresh ones and ``adding`` new ones would
        still fill three quarters of ``max_entries``, start afresh but for the fresh rows ``ids`` (this request's)
        read. Under the lock; returns the new index."""
        index = self._index[entity]
        keep = {i: hit for i, hit in index.items() if hit[0] >= now}
        if len(keep) + adding > 0.75 * self.cache.max_entries:
            keep = {i: keep[i] for i in dict.fromkeys(ids) if i in keep}
        rows = np.fromiter((row for _, row in keep.values()), dtype=np.int64, count=len(keep))
        # New arrays: a request that took rows of the old ones before the lock was released keeps reading them.
        self._cols[entity] = [c[rows] for c in self._cols[entity]]
        self._known[entity] = self._known[entity][rows]
        self._index[entity] = {i: (expires, n) for n, (i, (expires, _)) in enumerate(keep.items())}
        return self._index[entity]

    def _grow(self, entity: str, need: int) -> list[np.ndarray]:
        cols = self._cols[entity]
        have = len(self._known[entity])
        if need > have:
            size = max(need, 2 * have, 1024)
            self._cols[entity] = cols = [
                np.concatenate([c, np.full(size - have, np.nan if c.dtype.kind == "f" else None, dtype=c.dtype)])
                for c in cols]
            self._known[entity] = np.concatenate([self._known[entity], np.zeros(size - have, dtype=bool)])
        return cols

    def read(self, entity: str, ids: list[str]) -> list[tuple]:
        """One bulk read of the store, bypassing the cache: a tuple of the entity's feature values per id
        (all None for an id the store lacks). Store failures open the breaker and raise StoreUnavailable."""
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type as py

        key = JOIN_KEY[entity]
        keys = [EntityKey(join_keys=[key], entity_values=[Value(string_val=i)]) for i in ids]
        parts: list[list[tuple]] = []
        try:
            for view in self.views[entity]:
                names = [f.name for f in view.features]
                got = self.provider.online_read(config=self.store.config, table=view, entity_keys=keys,
                                                requested_features=list(names))  # Redis appends to it
                parts.append([tuple(py(vals[n]) if n in vals else None for n in names) if vals
                              else (None,) * len(names) for _, vals in got])
        except self.errors as e:
            self.breaker.failure(e)
            raise StoreUnavailable(f"online store unreachable: {type(e).__name__}: {e}") from e
        self.breaker.success()
        return [sum(cols, ()) for cols in zip(*parts)]

    def ready(self) -> tuple[bool, str]:
        """Whether the store answers and holds the feature service's rows (a real read of known entities).

        Known entities are ids the store must hold once materialised (``canaries``); an answer without any
        of them is an empty or wiped store, which must not report ready while every user scores cold.
        """
        try:
            self.breaker.check()
            for entity, ids in self.canaries.items():
                if not ids or not self.views[entity]:
                    continue
                rows = self.read(entity, list(ids))
                if not any(any(v is not None for v in row) for row in rows):
                    return False, f"the online store holds none of {len(ids)} known {entity}s: it is empty or " \
                                  f"was wiped; materialise it (`mtlrec features materialize DATASET`)"
        except StoreUnavailable as e:
            return False, str(e)
        return True, "ok"

    def columns(self, user_id: str, item_ids: list[str],
                request_ts: float) -> tuple[dict[str, np.ndarray], np.ndarray, bool]:
        """The feature service's values as arrays, which items the store knows, and whether it knows the user.

        The ranking service's path: no DataFrame is built, and one cache lookup per entity answers both
        the values and the cold-start flags.
        """
        n = len(item_ids)
        (u,), user_cols, user_known = self._slots("user", [user_id])
        rows, item_cols, item_known = self._slots("item", list(item_ids))
        data: dict[str, np.ndarray] = {"user_id": np.full(n, user_id, dtype=object),
                                       "item_id": np.asarray(item_ids, dtype=object)}
        for name, col in zip(self.columns_of["user"], user_cols):
            data[name] = np.full(n, col[u], dtype=col.dtype)
        for name, col in zip(self.columns_of["item"], item_cols):
            data[name] = col[rows]
        data["request_ts"] = np.full(n, float(request_ts))
        data.update(context_features(data))
        del data["request_ts"]
        return data, item_known[rows], bool(user_known[u])

    def features(self, user_id: str, item_ids: list[str], request_ts: float) -> pd.DataFrame:
        """The feature service's values for (user, each item) at ``request_ts``: what ``sdk`` returns."""
        return pd.DataFrame(self.columns(user_id, item_ids, request_ts)[0])

    def known(self, entity: str, ids: list[str]) -> np.ndarray:
        """Which ids the online store has (False: cold start, scored from defaults)."""
        rows, _, known = self._slots(entity, list(ids))
        return known[rows]

    def invalidate(self) -> None:
        """Drop the cache, e.g. right after a materialisation."""
        with self._lock:
            self._reset_cache()

    def cache_info(self) -> dict[str, dict]:
        """Per entity kind: rows cached, how many of them are still fresh, the bound and the TTL."""
        now = time.monotonic()
        with self._lock:
            return {e: {"entries": len(index), "fresh": sum(hit[0] >= now for hit in index.values()),
                        "max_entries": self.cache.max_entries, "ttl_s": self.cache.ttl(e)}
                    for e, index in self._index.items()}


def _canaries(views: dict[str, list], n: int = 16) -> dict[str, list[str]]:
    """A few ids per entity the store must hold once materialised: read from the first view's source table."""
    out: dict[str, list[str]] = {}
    for entity, vs in views.items():
        if not vs:
            continue
        key = JOIN_KEY[entity]
        try:
            ids = pd.read_parquet(vs[0].batch_source.path, columns=[key])[key].astype(str).unique()
        except (OSError, ValueError, KeyError, AttributeError):
            continue
        step = max(len(ids) // n, 1)
        out[entity] = list(ids[::step][:n])
    return out


def _entity_of(view) -> str:
    keys = set(view.join_keys) if hasattr(view, "join_keys") else {e for e in view.entities}
    return "user" if "user_id" in keys or "user" in keys else "item"


def _is_string(field) -> bool:
    from feast.types import String

    return field.dtype == String


def tune_redis(store, *, connect_timeout_s: float = 0.1, read_timeout_s: float = 0.25) -> bool:
    """Give Feast's Redis online store a client with bounded timeouts and no retries; False on other stores.

    redis-py retries a refused or timed-out command three times with backoff, and Feast's connection string
    cannot turn that off. The served path wants one bounded attempt and the
    circuit breaker instead.
    """
    online = getattr(store.provider, "online_store", None)
    if type(online).__name__ != "RedisOnlineStore":
        return False
    import redis
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    nodes, params = _redis_connection(online, store.config.online_store.connection_string)
    params = {k: v for k, v in params.items() if k in ("db", "password", "username", "ssl")}
    _use_redis_client(online, redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), **params,
                                          socket_timeout=read_timeout_s, socket_connect_timeout=connect_timeout_s,
                                          retry=Retry(NoBackoff(), 0), health_check_interval=0))
    return True


# ---- Feast internals: each private name used in exactly one place --------------------------------------------
# Feast offers no public way to hand its Redis online store a client of our own.
# tests/feature_repo/test_features.py asserts that both names exist and behave as used here, so a Feast
# upgrade that changes them fails a test, not a request.

def _redis_connection(online, connection_string: str) -> tuple[list[dict], dict]:
    """Feast's own parse of its Redis connection string ((nodes, params)), so the client we build connects
    exactly where Feast's would. Private: ``RedisOnlineStore._parse_connection_string``, a static method."""
    return online._parse_connection_string(connection_string)


def _use_redis_client(online, client) -> None:
    """Make Feast's Redis online store read and write through ``client``. Private: ``RedisOnlineStore._client``,
    the handle its ``_get_client`` returns once set, instead of building a retrying client of its own."""
    online._client = client
