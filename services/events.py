"""The impression log: what ``/rank`` showed, why, and what the user did next.

Why a log at all: a ranker that never records what it showed cannot learn
from its own traffic, and one that records only clicks cannot tell an item
nobody liked from one nobody saw. Each returned item is one impression: the
request id, time, user, item, position, model version, every objective's
score, the weights and diversity used, and the probability that the serving
policy put that item there (its propensity, 1 for a deterministic policy),
which is what off-policy evaluation of another weighting divides by. The
database keeps one row per request with the per-item values as lists (one
insert instead of one per item); ``read`` gives one row per impression. ``policy`` records
the request-level draw when the service explores (``MTLREC_EXPLORE``): the
weight vectors it chose among, their probabilities and the index it drew,
``{}`` when the request was not explored.

Writes never slow or fail a ranking request: the answer goes onto a bounded
queue as it is, and one writer thread serialises and inserts answers in
batches, one transaction each. A full
queue or an unreachable database drops rows and counts them (``drops``; the
service exports it on ``/metrics``), it never raises into the request.
Feedback is different: it is rare, and the caller wants to know whether it
was recorded, so it is written at once and a database error is the caller's
(a 503).

The store is a real database through DB-API: an SQLite file by default, or
PostgreSQL when the URL says ``postgresql://`` (psycopg2). The SQL is the
subset both speak (``INSERT ... ON CONFLICT DO NOTHING`` makes feedback
idempotent on request, item and event).
"""

from __future__ import annotations

import json
import logging
import queue
import sqlite3
import threading
import time
import functools
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

log = logging.getLogger("mtlrec.events")

IMPRESSION_COLUMNS = ("request_id", "item_id", "user_id", "ts", "position", "model_version", "score", "scores",
                      "weights", "diversity", "propensity", "context", "policy", "novelty")
# What the database holds: one row per answered request, its per-item values as JSON lists in position order.
# One row per item costs the writer a JSON document, a primary-key entry and an index entry per item, about
# 25 us each on SQLite: 2.5 ms per 100-item answer, a quarter of a 2-core server's throughput. A request row is
# one insert. ``read`` turns request rows back into one row per item (``IMPRESSION_COLUMNS``).
REQUEST_COLUMNS = ("request_id", "user_id", "ts", "model_version", "items", "score", "scores", "propensity",
                   "weights", "diversity", "context", "policy", "novelty")
# Databases written before the ``requests`` table (one ``impressions`` row per item) keep that table; it is no
# longer read. Export what it holds (``mtlrec events export``) with the release that wrote it.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS requests (
        request_id TEXT PRIMARY KEY, user_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        model_version TEXT NOT NULL, items TEXT NOT NULL, score TEXT NOT NULL, scores TEXT NOT NULL,
        propensity TEXT NOT NULL, weights TEXT NOT NULL, diversity DOUBLE PRECISION NOT NULL,
        context TEXT NOT NULL, policy TEXT NOT NULL, novelty DOUBLE PRECISION NOT NULL)""",
    "CREATE INDEX IF NOT EXISTS requests_ts ON requests (ts)",
    "CREATE INDEX IF NOT EXISTS requests_user ON requests (user_id)",
    """CREATE TABLE IF NOT EXISTS feedback (
        request_id TEXT NOT NULL, item_id TEXT NOT NULL, event TEXT NOT NULL, value DOUBLE PRECISION NOT NULL,
        ts DOUBLE PRECISION NOT NULL, PRIMARY KEY (request_id, item_id, event))""",
)


class EventStoreError(RuntimeError):
    """The event database cannot be reached or refused a write; the message names the database."""


def _database_errors(method):
    """A driver's error (sqlite3, psycopg2: each its own types) becomes one ``EventStoreError`` naming the database."""

    @functools.wraps(method)
    def wrapped(self, *args, **kwargs):
        try:
            return method(self, *args, **kwargs)
        except EventStoreError:
            raise
        except Exception as e:  # whatever the driver raised, the caller sees one error type
            raise EventStoreError(f"event database {self.where()}: {type(e).__name__}: {e}") from e

    return wrapped


@dataclass(frozen=True)
class EventStore:
    """One event database, named by a URL: ``sqlite:///path/events.db`` or ``postgresql://user@host/db``."""

    url: str
    connect_timeout_s: float = 2.0

    @property
    def postgres(self) -> bool:
        return self.url.startswith(("postgresql://", "postgres://"))

    @classmethod
    def for_dataset(cls, dataset: Path | str, url: str | None = None) -> "EventStore":
        """``url`` if given, else an SQLite file beside the dataset's feature store (``<dataset>/_events``)."""
        if url:
            return cls(url)
        path = Path(dataset).resolve() / "_events" / "events.db"
        return cls(f"sqlite:///{path}")

    def where(self) -> str:
        """The URL without a password, for messages."""
        if "@" not in self.url or "://" not in self.url:
            return self.url
        scheme, rest = self.url.split("://", 1)
        creds, host = rest.rsplit("@", 1)
        return f"{scheme}://{creds.split(':', 1)[0]}@{host}"

    def connect(self):
        try:
            if self.postgres:
                import psycopg2

                return psycopg2.connect(self.url, connect_timeout=max(1, int(self.connect_timeout_s)))
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=self.connect_timeout_s, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers (feedback, export) do not block the writer
            # No fsync per commit (WAL stays consistent; a power cut may lose the last commits, not the file):
            # an fsync per batch cost the serving host about 100 us of CPU each, at a few hundred batches a second.
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        except Exception as e:  # the driver's own error types differ; the message says which database
            raise EventStoreError(f"event database {self.where()} is unavailable: {e}") from e

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    @_database_errors
    def create(self) -> "EventStore":
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            for statement in SCHEMA:
                cur.execute(statement)
            conn.commit()
        return self

    @_database_errors
    def write(self, requests: list["Ranked"], conn=None) -> None:
        """Insert answered requests, one transaction; a request id already logged is ignored."""
        own = conn is None
        conn = conn or self.connect()
        try:
            cur = conn.cursor()
            cur.executemany(self._sql(f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES "
                                      f"({', '.join('?' * len(REQUEST_COLUMNS))}) ON CONFLICT DO NOTHING"),
                            [r.row() for r in requests])
            conn.commit()
        finally:
            if own:
                conn.close()

    @_database_errors
    def shown(self, request_id: str) -> dict[str, dict[str, Any]]:
        """``{item_id: {user_id, position, model_version}}`` of one logged request; empty if none was logged."""
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql("SELECT items, user_id, model_version FROM requests WHERE request_id = ?"),
                        (request_id,))
            row = cur.fetchone()
        if row is None:
            return {}
        return {item: {"user_id": row[1], "position": position, "model_version": row[2]}
                for position, item in enumerate(json.loads(row[0]), start=1)}

    @_database_errors
    def interacted(self, user_id: str, limit: int = 1000) -> set[str]:
        """Items this user gave positive feedback on (any event above 0), most recent first, at most ``limit``.

        Feedback is only accepted for an item its request showed, so the request's user is the item's.
        """
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql("SELECT f.item_id, MAX(f.ts) AS last FROM feedback f JOIN requests r ON "
                                  "r.request_id = f.request_id WHERE r.user_id = ? AND f.value > 0 "
                                  "GROUP BY f.item_id ORDER BY last DESC LIMIT ?"), (user_id, int(limit)))
            return {r[0] for r in cur.fetchall()}

    @_database_errors
    def record_feedback(self, request_id: str, item_id: str, events: dict[str, float],
                        ts: float | None = None) -> list[str]:
        """Insert each event once; a repeat of (request, item, event) is ignored. Returns the events that were new."""
        ts = time.time() if ts is None else float(ts)
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            new = []
            for event, value in events.items():
                cur.execute(self._sql("INSERT INTO feedback (request_id, item_id, event, value, ts) "
                                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                            (request_id, item_id, event, float(value), ts))
                if cur.rowcount > 0:
                    new.append(event)
            conn.commit()
            return new

    @_database_errors
    def read(self, since: float | None = None):
        """Impressions (one row per shown item, ``IMPRESSION_COLUMNS``) at or after ``since`` (epoch seconds)
        and the feedback on them, as two data frames."""
        import pandas as pd

        since = float("-inf") if since is None else float(since)
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests WHERE ts >= ? "
                                  "ORDER BY ts, request_id"), (since,))
            requests = cur.fetchall()
            cur.execute(self._sql("SELECT f.request_id, f.item_id, f.event, f.value, f.ts FROM feedback f JOIN "
                                  "requests r ON r.request_id = f.request_id WHERE r.ts >= ?"), (since,))
            feedback = pd.DataFrame(cur.fetchall(), columns=["request_id", "item_id", "event", "value", "ts"])
        rows = [impression for request in requests for impression in _impressions(request)]
        return pd.DataFrame(rows, columns=list(IMPRESSION_COLUMNS)), feedback


def _impressions(request: tuple) -> list[tuple]:
    """A ``requests`` row as one ``IMPRESSION_COLUMNS`` row per item, in position order."""
    r = dict(zip(REQUEST_COLUMNS, request))
    items, score, propensity = (json.loads(r[c]) for c in ("items", "score", "propensity"))
    scores = json.loads(r["scores"])
    weights, context, policy = (json.loads(r[c]) for c in ("weights", "context", "policy"))
    return [(r["request_id"], item, r["user_id"], float(r["ts"]), j + 1, r["model_version"], float(score[j]),
             {k: v[j] for k, v in scores.items()}, weights, float(r["diversity"]), float(propensity[j]), context,
             policy, float(r["novelty"])) for j, item in enumerate(items)]


@dataclass(frozen=True)
class Ranked:
    """One ``/rank`` answer as the log keeps it: the answer itself, serialised only when written.

    The request thread builds this and queues it (no copy, no JSON); the writer thread calls ``row``. The
    answer is a ``ranking.rank`` result, which nothing changes after it is answered. ``propensities``: the
    probability of each returned item at its position under the serving policy; ``policy``: the request's
    exploration draw, ``{}`` when it was not explored.
    """

    request_id: str
    ts: float
    answer: dict[str, Any]
    propensities: list[float]
    context: dict[str, Any] | None = None
    policy: dict[str, Any] | None = None

    @property
    def size(self) -> int:
        return len(self.answer["items"])

    def row(self) -> tuple:
        """The ``requests`` row, in ``REQUEST_COLUMNS`` order."""
        a, items = self.answer, self.answer["items"]
        objectives = items[0]["scores"].keys() if items else ()
        return (self.request_id, a["user_id"], float(self.ts), a["model_version"],
                json.dumps([it["item_id"] for it in items]), json.dumps([float(it["score"]) for it in items]),
                json.dumps({o: [float(it["scores"][o]) for it in items] for o in objectives}, sort_keys=True),
                json.dumps([float(p) for p in self.propensities]), json.dumps(a["weights"], sort_keys=True),
                float(a["diversity"]), json.dumps(self.context or {}, sort_keys=True, default=str),
                json.dumps(self.policy or {}, sort_keys=True), float(a.get("novelty", 0.0)))


class ImpressionLog:
    """A bounded queue and one writer thread: ``log`` never blocks and never raises.

    ``on_drop(n)`` is called for every ``n`` rows lost (queue full, database
    down, a write refused); the service counts them on ``/metrics``. A
    database that fails is retried after ``retry_s``; rows that arrive
    meanwhile wait in the queue until it is full.
    """

    def __init__(self, store: EventStore, *, capacity: int = 20_000, batch_rows: int = 1_000,
                 flush_s: float = 0.2, linger_s: float = 0.05, retry_s: float = 1.0,
                 on_drop: Callable[[int], None] | None = None):
        self.store = store
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.linger_s = min(linger_s, flush_s)
        self.retry_s = retry_s
        self.on_drop = on_drop or (lambda n: None)
        self.dropped = 0
        self.written = 0
        self.capacity = capacity  # in rows (shown items), as MTLREC_EVENTS_QUEUE_ROWS counts them
        self._queued = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mtlrec-events")
        self._thread.start()

    def log(self, request: Ranked) -> bool:
        """Queue one answered request; False (and its rows counted as dropped) if the queue is full."""
        if not request.size:
            return True
        with self._lock:
            full = self._queued + request.size > self.capacity
            if not full:
                self._queued += request.size
                self._queue.put_nowait(request)
                self._idle.clear()
        if full:
            self._drop(request.size)
        return not full

    def _drop(self, n: int) -> None:
        self.dropped += n
        try:
            self.on_drop(n)
        except Exception:  # noqa: BLE001 - a metrics hiccup must not stop the writer
            pass

    def _take(self) -> list[Ranked]:
        """Requests of up to ``batch_rows`` rows: waits ``flush_s`` for the first, then up to ``linger_s`` more
        for others, so that under load a transaction carries many requests instead of one each."""
        try:
            batch = [self._queue.get(timeout=self.flush_s)]
        except queue.Empty:
            return []
        rows = batch[0].size
        deadline = time.monotonic() + self.linger_s
        while rows < self.batch_rows:
            left = deadline - time.monotonic()
            try:
                batch.append(self._queue.get(timeout=left) if left > 0 else self._queue.get_nowait())
            except queue.Empty:
                break
            rows += batch[-1].size
        with self._lock:
            self._queued -= rows
        return batch

    def _run(self) -> None:
        conn = None
        created = False
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take()
            if not batch:
                self._idle.set()
                continue
            rows = sum(r.size for r in batch)
            try:
                if conn is None:
                    conn = self.store.connect()
                if not created:
                    self.store.create()
                    created = True
                self.store.write(batch, conn)
                self.written += rows
            except Exception as e:  # noqa: BLE001 - a down database loses these rows, never a request
                self._drop(rows)
                log.warning("impression log: %d rows dropped (%s)", rows, e)
                if conn is not None:
                    try:
                        conn.close()
                    except Exception:  # noqa: BLE001
                        pass
                conn = None
                self._stop.wait(self.retry_s)
            if self._queue.empty():
                self._idle.set()
        if conn is not None:
            conn.close()

    def flush(self, timeout_s: float = 10.0) -> bool:
        """Wait until everything queued so far is written (or dropped); True if it was within ``timeout_s``."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05) and self._queue.empty():
                return True
        return False

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
