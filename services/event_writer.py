"""How the impression log reaches its database without a ranking request ever waiting on it.

A ``/rank`` answer goes onto a bounded queue as it is (``ImpressionLog.log``:
no JSON, no database, never blocks, never raises), and one writer thread
serialises and inserts answers in batches, one transaction each. Whatever the
database does (slow, locked, unreachable) happens on that thread.

Bounded: the queue holds at most ``capacity`` rows (shown items); beyond it
an answer's rows are dropped and counted. A failed write drops its batch and
opens a breaker: for ``retry_s`` (doubling while failures repeat, up to
``max_retry_s``) the writer drops what it takes without touching the
database, then one batch probes it again. Every answer's fate is reported
(``on_outcome``): written, or dropped and why, so feedback on a dropped
answer can be refused instead of acknowledged for rows that do not exist.

The writer also does the log's housekeeping on its own connection, where it
cannot stand in a request's way: pruning rows older than ``retention_s``, and
following the positive feedback every worker records (``on_feedback``), which
feeds the service's in-memory per-user history for ``novelty``.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from typing import Callable

from services.event_rows import Ranked
from services.event_store import EventStore

log = logging.getLogger("mtlrec.events")

Outcome = Callable[[list[Ranked], bool, str], None]


class ImpressionLog:
    """A bounded queue and one writer thread: ``log`` never blocks and never raises.

    ``on_drop(n)`` is called for every ``n`` rows lost (the service counts them on ``/metrics``);
    ``on_outcome(requests, written, reason)`` for every answer, once its rows are written or dropped;
    ``on_feedback(rows)`` with ``(user_id, item_id, ts)`` of positive feedback as it appears in the database
    (every ``follow_s`` seconds; 0 turns following off), starting ``follow_from`` seconds back; ``on_cpu(s)``
    with the CPU seconds the writer thread spent since the last call, after each batch (what the log costs the
    worker, for ``/metrics``).
    """

    def __init__(self, store: EventStore, *, capacity: int = 20_000, batch_rows: int = 1_000,
                 flush_s: float = 0.2, linger_s: float = 0.2, retry_s: float = 1.0, max_retry_s: float = 30.0,
                 retention_s: float | None = None, prune_every_s: float = 3600.0,
                 on_drop: Callable[[int], None] | None = None, on_outcome: Outcome | None = None,
                 on_feedback: Callable[[list[tuple[str, str, float]]], None] | None = None,
                 follow_s: float = 0.0, follow_from: float = 86_400.0,
                 on_cpu: Callable[[float], None] | None = None):
        self.store = store
        self.batch_rows = batch_rows
        self.flush_s = flush_s
        self.linger_s = min(linger_s, flush_s)
        self.retry_s, self.max_retry_s = retry_s, max(max_retry_s, retry_s)
        self.retention_s, self.prune_every_s = retention_s, prune_every_s
        self.on_drop = on_drop or (lambda n: None)
        self.on_outcome = on_outcome or (lambda requests, written, reason: None)
        self.on_feedback = on_feedback
        self.follow_s = follow_s
        self.on_cpu = on_cpu or (lambda seconds: None)
        self.dropped = 0
        self.written = 0
        self.capacity = capacity  # in rows (shown items), as MTLREC_EVENTS_QUEUE_ROWS counts them
        self.last_error: str | None = None
        self._queued = 0
        self._lock = threading.Lock()
        self._queue: queue.Queue = queue.Queue()
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._open_until = 0.0  # the breaker: while now < this, batches are dropped without trying
        self._backoff = retry_s
        self._conn = None
        self._created = False
        self._next_prune = 0.0
        self._followed = time.time() - follow_from
        self._next_follow = 0.0
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
            self._dropped([request], f"the impression log's queue is full ({self.capacity:,} rows waiting)")
        return not full

    @property
    def breaker_open(self) -> bool:
        return time.monotonic() < self._open_until

    def _dropped(self, requests: list[Ranked], reason: str) -> None:
        n = sum(r.size for r in requests)
        self.dropped += n
        for report in (lambda: self.on_drop(n), lambda: self.on_outcome(requests, False, reason)):
            try:
                report()
            except Exception:
                log.exception("impression log: reporting dropped rows failed")

    def _take(self) -> list[Ranked]:
        """Requests of up to ``batch_rows`` rows: waits ``flush_s`` for the first, sleeps ``linger_s``, then takes
        what has arrived meanwhile. Under load a transaction carries many requests instead of one each, and the
        writer wakes once per batch: a thread woken per answer would take the interpreter lock from the ranking
        thread per answer too."""
        try:
            batch = [self._queue.get(timeout=self.flush_s)]
        except queue.Empty:
            return []
        if self.linger_s > 0:
            time.sleep(self.linger_s)
        rows = batch[0].size
        while rows < self.batch_rows:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
            rows += batch[-1].size
        with self._lock:
            self._queued -= rows
        return batch

    def _connection(self):
        if self._conn is None:
            self._conn = self.store.connect()
        if not self._created:
            self.store.create()
            self._created = True
        return self._conn

    def _failed(self, error: BaseException) -> None:
        """Open the breaker (longer while failures repeat) and forget the connection."""
        self.last_error = f"{type(error).__name__}: {error}"
        self._open_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, self.max_retry_s)
        if self._conn is not None:
            try:
                self._conn.close()
            except Exception:  # noqa: BLE001
                pass
        self._conn = None

    def _write(self, batch: list[Ranked]) -> None:
        if self.breaker_open:
            self._dropped(batch, f"the event database {self.store.where()} is unavailable: {self.last_error}")
            return
        try:
            self.store.write(batch, self._connection())
        except Exception as e:  # noqa: BLE001 - a down database loses these rows, never a request
            self._failed(e)
            self._dropped(batch, f"the event database {self.store.where()} refused them: {self.last_error}")
            log.warning("impression log: %d rows dropped (%s)", sum(r.size for r in batch), self.last_error)
            return
        self.written += sum(r.size for r in batch)
        self.last_error, self._backoff = None, self.retry_s
        try:
            self.on_outcome(batch, True, "")
        except Exception:
            log.exception("impression log: reporting written rows failed")

    def _housekeeping(self) -> None:
        """Retention and following feedback, on the writer's connection, when due and the breaker is closed."""
        now = time.monotonic()
        if self.breaker_open:
            return
        try:
            if self.retention_s and now >= self._next_prune:
                self._next_prune = now + self.prune_every_s
                counts = self.store.prune(time.time() - self.retention_s, conn=self._connection())
                if any(counts.values()):
                    log.info("impression log: pruned %s (retention %.0f s)", counts, self.retention_s)
            if self.on_feedback is not None and self.follow_s > 0 and now >= self._next_follow:
                self._next_follow = now + self.follow_s
                # a little overlap: feedback stamped by a replica whose clock lags is still seen; repeats are
                # harmless to a set of items
                rows = self.store.positive_feedback(self._followed - 5.0, conn=self._connection())
                if rows:
                    self._followed = max(self._followed, rows[-1][2])
                    self.on_feedback(rows)
        except Exception as e:  # noqa: BLE001 - housekeeping waits for the next turn, like a write
            self._failed(e)
            log.warning("impression log: housekeeping failed (%s)", self.last_error)

    def _run(self) -> None:
        try:  # the tables at once, so that feedback and readers find them before the first answer is written
            self._connection()
        except Exception as e:  # noqa: BLE001 - a database down at the start is retried like any failed write
            self._failed(e)
            log.warning("impression log unavailable at start (rows will be dropped until it answers): %s",
                        self.last_error)
        cpu = time.thread_time()
        while not (self._stop.is_set() and self._queue.empty()):
            batch = self._take()
            if batch:
                self._write(batch)
            if not self._stop.is_set():
                self._housekeeping()
            now = time.thread_time()
            if now > cpu:
                try:
                    self.on_cpu(now - cpu)
                except Exception:
                    log.exception("impression log: reporting its CPU failed")
                cpu = now
            if self._queue.empty():
                self._idle.set()
        if self._conn is not None:
            self._conn.close()

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
