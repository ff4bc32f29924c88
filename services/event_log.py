"""The impression log as one service worker uses it: ``/rank`` queues its answers, ``/feedback`` looks them up.

The log never stands in a ranking's way. ``log`` queues an answer for the
writer thread (``services/event_writer.py``) and remembers it in memory
(``services/recent.py``), where ``/feedback`` finds this worker's answers, and
whether their rows were written, with no database read. ``/feedback`` on
another worker's answer, and every feedback write, run on an executor of their
own (a few threads, each with its own connection): bounded in time and in
calls waiting, and refused at once while a breaker is open, never on the
thread that answers ``/rank``.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Optional

import bentoml

from services.breaker import Breaker, Busy
from services.event_rows import Ranked
from services.event_store import Connections, EventStore, EventStoreError
from services.event_writer import ImpressionLog
from services.recent import DROPPED, QUEUED, Answers, History

DB_QUEUE = 64  # feedback calls waiting for the event database at once, per worker; beyond, 503 at once

_writer_cpu = bentoml.metrics.Counter(name="mtlrec_event_writer_cpu_seconds",
                                      documentation="CPU seconds the impression log's writer thread spent (what "
                                                    "the log costs the worker, beside the requests it answers)")
_event_drops = bentoml.metrics.Counter(name="mtlrec_event_drops",
                                       documentation="Impression-log rows dropped (queue full or event database "
                                                     "unavailable); the ranking requests themselves were answered")


class NotLogged(LookupError):
    """The answer's rows are not in the impression log (dropped, pruned, or never written): feedback is refused."""


class NotWrittenYet(RuntimeError):
    """The answer's rows are still queued for the writer: retry."""


class EventLog:
    """This worker's writer, its recent answers, and the feedback executor, on the event database of ``dataset``
    (``MTLREC_EVENTS_URL`` when set). ``history`` is fed the positive feedback every worker records."""

    def __init__(self, dataset, env, *, history: History):
        timeout_s = env.events_timeout_ms / 1000
        store = EventStore.for_dataset(dataset, env.events_url or None)
        store = EventStore(store.url, connect_timeout_s=timeout_s)
        retention = env.events_retention_days * 86_400 or None
        self.answers = Answers(max_bytes=env.events_memory_mb << 20)  # feedback checks this worker's answers here
        self.writer = ImpressionLog(store, capacity=env.events_queue_rows, on_drop=_event_drops.inc,
                                    on_outcome=self._settled, retry_s=max(timeout_s, 0.5), retention_s=retention,
                                    on_feedback=lambda rows: history.add((u, i) for u, i, _ in rows),
                                    follow_s=1.0, follow_from=30 * 86_400, on_cpu=_writer_cpu.inc)
        self._db = Connections(store)
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="mtlrec-feedback")
        self._breaker = Breaker(store.where(), cooldown_s=max(timeout_s, 0.5))
        self._waiting = 0  # feedback calls on the executor now; beyond DB_QUEUE they answer 503 at once
        self._timeout_s = 2 * timeout_s + 1.0
        self._wait_s = env.feedback_wait_ms / 1000

    def _settled(self, requests, written: bool, reason: str) -> None:
        self.answers.settle((r.request_id for r in requests), written, reason)

    def log(self, request_id: str, ts: Optional[float], answer: dict, context: dict, propensities: list,
            policy: dict) -> None:
        """Queue the answer's rows (never blocks, never raises), stamped with the server's clock; the client's
        feature time, when it sent one, is kept in the context."""
        user, items = answer["user_id"], [it["item_id"] for it in answer["items"]]
        self.answers.add(request_id, user, items)
        logged = {**context, "timestamp": ts} if ts is not None else context
        self.writer.log(Ranked(request_id, time.time(), answer, propensities, logged, policy))

    async def shown(self, request_id: str) -> tuple[set | frozenset, Optional[str]]:
        """The items an answer showed and the user it was for, once its rows are in the log.

        This worker's answer waits up to the feedback wait for its writer; another worker's (or an old one) is
        read from the database. NotLogged when its rows are not in the log, NotWrittenYet when they are still
        queued; the caller has checked the answer's token, so some worker did give it.
        """
        answer = self.answers.get(request_id)
        if answer is not None:
            deadline = time.monotonic() + self._wait_s
            while answer.state == QUEUED and time.monotonic() < deadline:
                await asyncio.sleep(0.005)
            if answer.state == DROPPED:
                raise NotLogged(f"its rows are not in the impression log: {answer.reason}")
            if answer.state == QUEUED:
                raise NotWrittenYet("the answer is not written to the impression log yet: retry")
            return answer.items, answer.user_id
        logged = await self._logged(request_id)
        if not logged:
            raise NotLogged(f"its rows are not in the impression log after {self._wait_s:g} s: dropped, pruned, "
                            "or not written yet")
        return set(logged), next(v["user_id"] for v in logged.values())

    async def _logged(self, request_id: str) -> dict:
        """What the log holds of an answer another worker gave, waiting up to the feedback wait for its writer."""
        deadline, pause = time.monotonic() + self._wait_s, 0.02
        logged = await self.call("shown", request_id)
        while not logged and time.monotonic() + pause < deadline:
            await asyncio.sleep(pause)
            pause = min(2 * pause, 0.32)
            logged = await self.call("shown", request_id)
        return logged

    async def call(self, method: str, *args):
        """``EventStore.<method>(*args)`` on the feedback executor: bounded in time and in calls waiting, and
        refused at once while the breaker is open."""
        self._breaker.check()
        if self._waiting >= DB_QUEUE:
            raise Busy(f"{self._waiting} feedback calls are waiting for the event database: retry")
        self._waiting += 1
        try:
            call = asyncio.get_running_loop().run_in_executor(self._pool, lambda: self._db.run(method, *args))
            try:
                result = await asyncio.wait_for(call, self._timeout_s)
            except EventStoreError as e:
                self._breaker.failure(e)
                raise
            except asyncio.TimeoutError as e:
                self._breaker.failure(e)
                raise TimeoutError(f"the event database {self._db.store.where()} did not answer in "
                                   f"{self._timeout_s:.1f} s") from None
            self._breaker.success()
            return result
        finally:
            self._waiting -= 1

    def close(self) -> None:
        self.writer.close()
