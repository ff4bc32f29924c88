"""The impression log: what ``/rank`` showed, why, and what the user did next.

Why a log at all: a ranker that never records what it showed cannot learn
from its own traffic, and one that records only clicks cannot tell an item
nobody liked from one nobody saw. Each returned item is one row: the request
id, time, user, item, position, model version, every objective's score, the
weights and diversity used, and the probability that the serving policy put
that item there (its propensity, 1 for a deterministic policy), which is what
off-policy evaluation of another weighting divides by. ``policy`` records
the request-level draw when the service explores (``MTLREC_EXPLORE``): the
weight vectors it chose among, their probabilities and the index it drew,
``{}`` when the request was not explored.

Writes never slow or fail a ranking request: rows go onto a bounded queue,
and one writer thread inserts them in batches, one transaction each. A full
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
from typing import Any, Callable, Iterable

log = logging.getLogger("mtlrec.events")

IMPRESSION_COLUMNS = ("request_id", "item_id", "user_id", "ts", "position", "model_version", "score", "scores",
                      "weights", "diversity", "propensity", "context", "policy", "novelty")
# ``policy`` and ``novelty`` came later than the rest: a database created before them keeps its table (IF NOT
# EXISTS) without them, and the writer's inserts into it fail (rows dropped and counted). There is no
# migration: point MTLREC_EVENTS_URL at a new database, or ``ALTER TABLE impressions ADD COLUMN policy TEXT NOT
# NULL DEFAULT '{}'`` and ``ALTER TABLE impressions ADD COLUMN novelty DOUBLE PRECISION NOT NULL DEFAULT 0``.
SCHEMA = (
    """CREATE TABLE IF NOT EXISTS impressions (
        request_id TEXT NOT NULL, item_id TEXT NOT NULL, user_id TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL,
        position INTEGER NOT NULL, model_version TEXT NOT NULL, score DOUBLE PRECISION NOT NULL,
        scores TEXT NOT NULL, weights TEXT NOT NULL, diversity DOUBLE PRECISION NOT NULL,
        propensity DOUBLE PRECISION NOT NULL, context TEXT NOT NULL, policy TEXT NOT NULL,
        novelty DOUBLE PRECISION NOT NULL DEFAULT 0, PRIMARY KEY (request_id, item_id))""",
    "CREATE INDEX IF NOT EXISTS impressions_ts ON impressions (ts)",
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
    def write_impressions(self, rows: list[tuple], conn=None) -> None:
        own = conn is None
        conn = conn or self.connect()
        try:
            cur = conn.cursor()
            cur.executemany(self._sql(f"INSERT INTO impressions ({', '.join(IMPRESSION_COLUMNS)}) VALUES "
                                      f"({', '.join('?' * len(IMPRESSION_COLUMNS))}) ON CONFLICT DO NOTHING"), rows)
            conn.commit()
        finally:
            if own:
                conn.close()

    @_database_errors
    def shown(self, request_id: str) -> dict[str, dict[str, Any]]:
        """``{item_id: {user_id, position, model_version}}`` of one logged request; empty if none was logged."""
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql("SELECT item_id, user_id, position, model_version FROM impressions "
                                  "WHERE request_id = ?"), (request_id,))
            return {r[0]: {"user_id": r[1], "position": r[2], "model_version": r[3]} for r in cur.fetchall()}

    @_database_errors
    def interacted(self, user_id: str, limit: int = 1000) -> set[str]:
        """Items this user gave positive feedback on (any event above 0), most recent first, at most ``limit``."""
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql("SELECT f.item_id, MAX(f.ts) AS last FROM feedback f JOIN impressions i ON "
                                  "i.request_id = f.request_id AND i.item_id = f.item_id WHERE i.user_id = ? "
                                  "AND f.value > 0 GROUP BY f.item_id ORDER BY last DESC LIMIT ?"),
                        (user_id, int(limit)))
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
        """Impressions at or after ``since`` (epoch seconds) and the feedback on them, as two data frames."""
        import pandas as pd

        since = float("-inf") if since is None else float(since)
        with closing(self.connect()) as conn:
            cur = conn.cursor()
            cur.execute(self._sql(f"SELECT {', '.join(IMPRESSION_COLUMNS)} FROM impressions WHERE ts >= ? "
                                  "ORDER BY ts, request_id, position"), (since,))
            impressions = pd.DataFrame(cur.fetchall(), columns=list(IMPRESSION_COLUMNS))
            cur.execute(self._sql("SELECT f.request_id, f.item_id, f.event, f.value, f.ts FROM feedback f JOIN "
                                  "impressions i ON i.request_id = f.request_id AND i.item_id = f.item_id "
                                  "WHERE i.ts >= ?"), (since,))
            feedback = pd.DataFrame(cur.fetchall(), columns=["request_id", "item_id", "event", "value", "ts"])
        for column in ("scores", "weights", "context", "policy"):
            impressions[column] = impressions[column].map(json.loads)
        return impressions, feedback


def impression_rows(request_id: str, ts: float, answer: dict[str, Any], propensities: Iterable[float],
                    context: dict[str, Any] | None = None, policy: dict[str, Any] | None = None) -> list[tuple]:
    """One row per returned item, in ``IMPRESSION_COLUMNS`` order, from a ``ranking.rank`` answer.

    ``position`` is the 1-based slot, as the contract's ``position`` column counts it; ``policy`` is the
    request's exploration draw (``ranking.rank``'s), repeated on each of its rows.
    """
    weights = json.dumps(answer["weights"], sort_keys=True)
    ctx = json.dumps(context or {}, sort_keys=True, default=str)
    pol = json.dumps(policy or {}, sort_keys=True)
    return [(request_id, it["item_id"], answer["user_id"], float(ts), position, answer["model_version"],
             float(it["score"]), json.dumps(it["scores"], sort_keys=True), weights, float(answer["diversity"]),
             float(p), ctx, pol, float(answer.get("novelty", 0.0)))
            for position, (it, p) in enumerate(zip(answer["items"], propensities), start=1)]


class ImpressionLog:
    """A bounded queue and one writer thread: ``log`` never blocks and never raises.

    ``on_drop(n)`` is called for every ``n`` rows lost (queue full, database
    down, a write refused); the service counts them on ``/metrics``. A
    database that fails is retried after ``retry_s``; rows that arrive
    meanwhile wait in the queue until it is full.
    """

    def __init__(self, store: EventStore, *, capacity: int = 20_000, batch_rows: int = 1_000,
                 flush_s: float = 0.2, retry_s: float = 1.0, on_drop: Callable[[int], None] | None = None):
        self.store = store
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.retry_s = retry_s
        self.on_drop = on_drop or (lambda n: None)
        self.dropped = 0
        self.written = 0
        self._queue: queue.Queue = queue.Queue(maxsize=capacity)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread = threading.Thread(target=self._run, daemon=True, name="mtlrec-events")
        self._thread.start()

    def log(self, rows: list[tuple]) -> bool:
        """Queue one request's rows; False (and counted as dropped) if the queue is full."""
        if not rows:
            return True
        try:
            self._queue.put_nowait(rows)
            self._idle.clear()
            return True
        except queue.Full:
            self._drop(len(rows))
            return False

    def _drop(self, n: int) -> None:
        self.dropped += n
        try:
            self.on_drop(n)
        except Exception:  # noqa: BLE001 - a metrics hiccup must not stop the writer
            pass

    def _take(self) -> list[tuple]:
        """Rows of up to ``batch_rows``: waits ``flush_s`` for the first request, then takes what is there."""
        rows: list[tuple] = []
        try:
            rows.extend(self._queue.get(timeout=self.flush_s))
        except queue.Empty:
            return rows
        while len(rows) < self.batch_rows:
            try:
                rows.extend(self._queue.get_nowait())
            except queue.Empty:
                break
        return rows

    def _run(self) -> None:
        conn = None
        created = False
        while not (self._stop.is_set() and self._queue.empty()):
            rows = self._take()
            if not rows:
                self._idle.set()
                continue
            try:
                if conn is None:
                    conn = self.store.connect()
                if not created:
                    self.store.create()
                    created = True
                self.store.write_impressions(rows, conn)
                self.written += len(rows)
            except Exception as e:  # noqa: BLE001 - a down database loses these rows, never a request
                self._drop(len(rows))
                log.warning("impression log: %d rows dropped (%s)", len(rows), e)
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
