"""The impression log's database: the request rows ``/rank`` answers leave, and the feedback on them.

The store is a real database through DB-API: an SQLite file by default, or
PostgreSQL when the URL says ``postgresql://`` (psycopg2). The SQL is the
subset both speak (``INSERT ... ON CONFLICT DO NOTHING`` makes feedback
idempotent on request, item and event). What a row holds is
``services/event_rows.py``; how rows reach the database without slowing a
request is ``services/event_writer.py``. A request row that does not parse is
left out of ``read`` and reported; ``quarantine`` moves it out of the way into
its own table.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import sqlite3
import threading
import time
from contextlib import closing
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from services.event_rows import IMPRESSION_COLUMNS, REQUEST_COLUMNS, Corrupt, Ranked, impressions

log = logging.getLogger("mtlrec.events")

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
    "CREATE INDEX IF NOT EXISTS feedback_ts ON feedback (ts)",
    """CREATE TABLE IF NOT EXISTS quarantine (
        request_id TEXT PRIMARY KEY, reason TEXT NOT NULL, row TEXT NOT NULL, ts DOUBLE PRECISION NOT NULL)""",
)
WRITE_CHUNK = 500  # requests per INSERT statement: 13 values each, within SQLite's 32,766 bound variables


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
    """One event database, named by a URL: ``sqlite:///path/events.db`` or ``postgresql://user@host/db``.

    Every method opens its own connection unless given one (``conn``): the service's threads keep theirs
    (``Connections``), a command line opens one per call.
    """

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
                try:
                    import psycopg2
                except ImportError as e:
                    raise EventStoreError("a PostgreSQL event database needs psycopg2: "
                                          "pip install 'mtlrec[postgres]'") from e

                return psycopg2.connect(self.url, connect_timeout=max(1, math.ceil(self.connect_timeout_s)))
            path = Path(self.url.removeprefix("sqlite:///"))
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(path, timeout=self.connect_timeout_s, check_same_thread=False)
            conn.execute("PRAGMA journal_mode=WAL")  # readers (feedback, export) do not block the writer
            # No fsync per commit (WAL stays consistent; a power cut may lose the last commits, not the file):
            # an fsync per batch is CPU the serving host spends beside its requests (see benchmarks/README.md).
            conn.execute("PRAGMA synchronous=NORMAL")
            return conn
        except Exception as e:  # the driver's own error types differ; the message says which database
            raise EventStoreError(f"event database {self.where()} is unavailable: {e}") from e

    def _sql(self, statement: str) -> str:
        return statement.replace("?", "%s") if self.postgres else statement

    def _run(self, conn, work):
        """``work(cursor)`` on ``conn``, or on a connection of its own closed afterwards."""
        if conn is not None:
            return work(conn.cursor())
        with closing(self.connect()) as own:
            return work(own.cursor())

    @_database_errors
    def create(self) -> "EventStore":
        def work(cur):
            for statement in SCHEMA:
                cur.execute(statement)
            cur.connection.commit()

        self._run(None, work)
        return self

    @_database_errors
    def write(self, requests: list[Ranked], conn=None) -> None:
        """Insert answered requests, one transaction; a request id already logged is ignored.

        One multi-row INSERT per ``WRITE_CHUNK`` requests rather than one statement per request: the driver
        releases and retakes the interpreter lock around every statement it runs, and in a serving worker each
        of those handoffs is taken from the thread answering requests.
        """
        rows = [r.row() for r in requests]
        one = f"({', '.join('?' * len(REQUEST_COLUMNS))})"

        def work(cur):
            for start in range(0, len(rows), WRITE_CHUNK):
                chunk = rows[start:start + WRITE_CHUNK]
                cur.execute(self._sql(f"INSERT INTO requests ({', '.join(REQUEST_COLUMNS)}) VALUES "
                                      f"{', '.join([one] * len(chunk))} ON CONFLICT DO NOTHING"),
                            [v for row in chunk for v in row])
            cur.connection.commit()

        self._run(conn, work)

    @_database_errors
    def shown(self, request_id: str, conn=None) -> dict[str, dict[str, Any]]:
        """``{item_id: {user_id, position, model_version}}`` of one logged request; empty if none was logged."""
        def work(cur):
            cur.execute(self._sql("SELECT items, user_id, model_version FROM requests WHERE request_id = ?"),
                        (request_id,))
            return cur.fetchone()

        row = self._run(conn, work)
        if row is None:
            return {}
        try:
            items = json.loads(row[0])
        except (TypeError, ValueError):
            return {}  # a corrupt row shows nothing: feedback on it is refused as unknown
        return {item: {"user_id": row[1], "position": position, "model_version": row[2]}
                for position, item in enumerate(items, start=1)}

    @_database_errors
    def interacted(self, user_id: str, limit: int = 1000) -> set[str]:
        """Items this user gave positive feedback on (any event above 0), most recent first, at most ``limit``.

        Feedback is only accepted for an item its request showed, so the request's user is the item's.
        """
        def work(cur):
            cur.execute(self._sql("SELECT f.item_id, MAX(f.ts) AS last FROM feedback f JOIN requests r ON "
                                  "r.request_id = f.request_id WHERE r.user_id = ? AND f.value > 0 "
                                  "GROUP BY f.item_id ORDER BY last DESC LIMIT ?"), (user_id, int(limit)))
            return {r[0] for r in cur.fetchall()}

        return self._run(None, work)

    @_database_errors
    def positive_feedback(self, since: float, limit: int = 100_000, conn=None) -> list[tuple[str, str, float]]:
        """``(user_id, item_id, ts)`` of positive feedback recorded at or after ``since``, oldest first: what the
        service's per-user history (for ``novelty``) follows."""
        def work(cur):
            cur.execute(self._sql("SELECT r.user_id, f.item_id, f.ts FROM feedback f JOIN requests r ON "
                                  "r.request_id = f.request_id WHERE f.ts >= ? AND f.value > 0 "
                                  "ORDER BY f.ts LIMIT ?"), (float(since), int(limit)))
            return [(str(u), str(i), float(t)) for u, i, t in cur.fetchall()]

        return self._run(conn, work)

    @_database_errors
    def record_feedback(self, request_id: str, item_id: str, events: dict[str, float],
                        ts: float | None = None, conn=None) -> list[str]:
        """Insert each event once; a repeat of (request, item, event) is ignored. Returns the events that were new."""
        ts = time.time() if ts is None else float(ts)

        def work(cur):
            new = []
            for event, value in events.items():
                cur.execute(self._sql("INSERT INTO feedback (request_id, item_id, event, value, ts) "
                                      "VALUES (?, ?, ?, ?, ?) ON CONFLICT DO NOTHING"),
                            (request_id, item_id, event, float(value), ts))
                if cur.rowcount > 0:
                    new.append(event)
            cur.connection.commit()
            return new

        return self._run(conn, work)

    @_database_errors
    def read(self, since: float | None = None, problems: list[Corrupt] | None = None):
        """Impressions (one row per shown item, ``IMPRESSION_COLUMNS``) logged at or after ``since`` (epoch
        seconds, the server's clock) and the feedback on them, as two data frames.

        A request row that does not parse is left out, logged, and appended to ``problems`` when given.
        """
        import pandas as pd

        since = float("-inf") if since is None else float(since)

        def work(cur):
            cur.execute(self._sql(f"SELECT {', '.join(REQUEST_COLUMNS)} FROM requests WHERE ts >= ? "
                                  "ORDER BY ts, request_id"), (since,))
            requests = cur.fetchall()
            cur.execute(self._sql("SELECT f.request_id, f.item_id, f.event, f.value, f.ts FROM feedback f JOIN "
                                  "requests r ON r.request_id = f.request_id WHERE r.ts >= ?"), (since,))
            return requests, cur.fetchall()

        requests, feedback_rows = self._run(None, work)
        rows, bad = [], []
        for request in requests:
            try:
                rows.extend(impressions(request))
            except Exception as e:  # noqa: BLE001 - whatever is wrong with the row, it is that row's problem
                bad.append(Corrupt(str(request[0]), f"{type(e).__name__}: {e}", tuple(request)))
        if bad:
            log.warning("event database %s: %d corrupt request row(s) left out (%s)", self.where(), len(bad),
                        "; ".join(str(b) for b in bad[:5]))
            if problems is not None:
                problems.extend(bad)
            skipped = {b.request_id for b in bad}
            feedback_rows = [f for f in feedback_rows if f[0] not in skipped]
        feedback = pd.DataFrame(feedback_rows, columns=["request_id", "item_id", "event", "value", "ts"])
        return pd.DataFrame(rows, columns=list(IMPRESSION_COLUMNS)), feedback

    @_database_errors
    def quarantine(self, corrupt: list[Corrupt]) -> int:
        """Move corrupt request rows into the ``quarantine`` table (with why), one transaction; returns how many."""
        if not corrupt:
            return 0

        def work(cur):
            for c in corrupt:
                cur.execute(self._sql("INSERT INTO quarantine (request_id, reason, row, ts) VALUES (?, ?, ?, ?) "
                                      "ON CONFLICT DO NOTHING"),
                            (c.request_id, c.reason, json.dumps([str(v) for v in c.row]), time.time()))
                cur.execute(self._sql("DELETE FROM requests WHERE request_id = ?"), (c.request_id,))
            cur.connection.commit()
            return len(corrupt)

        return self._run(None, work)

    @_database_errors
    def quarantined(self) -> list[tuple[str, str]]:
        """``(request_id, reason)`` of every quarantined row."""
        def work(cur):
            cur.execute("SELECT request_id, reason FROM quarantine ORDER BY ts")
            return [(str(r), str(w)) for r, w in cur.fetchall()]

        return self._run(None, work)

    @_database_errors
    def prune(self, before: float, conn=None) -> dict[str, int]:
        """Delete what was logged before ``before`` (epoch seconds, the server's clock): requests, the feedback
        on them, and quarantined rows; returns how many of each, one transaction."""
        before = float(before)

        def work(cur):
            counts = {}
            cur.execute(self._sql("DELETE FROM feedback WHERE request_id IN "
                                  "(SELECT request_id FROM requests WHERE ts < ?)"), (before,))
            counts["feedback"] = max(cur.rowcount, 0)
            cur.execute(self._sql("DELETE FROM requests WHERE ts < ?"), (before,))
            counts["requests"] = max(cur.rowcount, 0)
            cur.execute(self._sql("DELETE FROM quarantine WHERE ts < ?"), (before,))
            counts["quarantined"] = max(cur.rowcount, 0)
            cur.connection.commit()
            return counts

        return self._run(conn, work)


class Connections:
    """One open connection per thread, dropped after an error: the service's threads reuse theirs instead of
    connecting per call. SQLite connections must stay in the thread that uses them; so do psycopg2's here."""

    def __init__(self, store: EventStore):
        self.store = store
        self._local = threading.local()

    def run(self, method: str, *args, **kwargs):
        """``store.<method>(*args, conn=<this thread's connection>, **kwargs)``."""
        conn = getattr(self._local, "conn", None)
        try:
            if conn is None:
                conn = self._local.conn = self.store.connect()
            return getattr(self.store, method)(*args, conn=conn, **kwargs)
        except Exception:
            self.close()
            raise

    def close(self) -> None:
        conn, self._local.conn = getattr(self._local, "conn", None), None
        if conn is not None:
            try:
                conn.close()
            except Exception:  # noqa: BLE001 - a broken connection closes as best it can
                pass
