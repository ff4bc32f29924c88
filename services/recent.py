"""What a service worker remembers between requests, in memory and bounded by bytes.

``Answers``: the worker's recent ``/rank`` answers (user, items) and their fate
in the impression log (queued, written, dropped and why). Feedback checks an
answer here first: it needs no database read, and it learns whether the rows
it would label exist (a dropped answer's feedback is refused, a queued one's
waits for the writer). Answers another worker gave are looked up in the
database instead.

``History``: per user, the items they recently gave positive feedback on,
for ``novelty``. It is fed by this worker's feedback at once and by the
impression log's writer, which follows every worker's feedback in the
database; a ranking request reads it without touching the database.

Sizes are estimates of what Python holds (strings, set and dict entries), so
the bound is about memory, not a count that a request with a thousand long ids
could turn into gigabytes. The oldest entries go first.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterable, Optional

QUEUED, WRITTEN, DROPPED = "queued", "written", "dropped"
_ENTRY_BYTES = 200  # a dict slot, the entry object and its fields
_ITEM_BYTES = 90  # a set slot and a short str's header, before its characters


def _size(ids: Iterable[str]) -> int:
    return sum(_ITEM_BYTES + len(i) for i in ids)


@dataclass
class Answer:
    user_id: str
    items: frozenset
    state: str = QUEUED
    reason: str = ""
    bytes: int = 0


class Answers:
    """Recent answers by request id, at most about ``max_bytes`` of them."""

    def __init__(self, max_bytes: int = 64 << 20):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._answers: "OrderedDict[str, Answer]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, request_id: str, user_id: str, items: Iterable[str]) -> None:
        items = frozenset(items)
        answer = Answer(user_id, items, bytes=_ENTRY_BYTES + len(request_id) + len(user_id) + _size(items))
        with self._lock:
            old = self._answers.pop(request_id, None)
            if old is not None:
                self.bytes -= old.bytes
            self._answers[request_id] = answer
            self.bytes += answer.bytes
            while self.bytes > self.max_bytes and len(self._answers) > 1:
                _, gone = self._answers.popitem(last=False)
                self.bytes -= gone.bytes

    def get(self, request_id: str) -> Optional[Answer]:
        with self._lock:
            return self._answers.get(request_id)

    def settle(self, request_ids: Iterable[str], written: bool, reason: str = "") -> None:
        """The impression log wrote (or dropped) these answers' rows."""
        with self._lock:
            for rid in request_ids:
                answer = self._answers.get(rid)
                if answer is not None:
                    answer.state, answer.reason = (WRITTEN, "") if written else (DROPPED, reason)

    def __len__(self) -> int:
        return len(self._answers)


class History:
    """Per user, the items of their recent positive feedback (most recent last), at most ``per_user`` each and
    about ``max_bytes`` in all; least recently fed users go first."""

    def __init__(self, max_bytes: int = 32 << 20, per_user: int = 1000):
        self.max_bytes, self.per_user = max_bytes, per_user
        self.bytes = 0
        self._users: "OrderedDict[str, OrderedDict[str, None]]" = OrderedDict()
        self._lock = threading.Lock()

    def add(self, rows: Iterable[tuple[str, str]]) -> None:
        """``(user_id, item_id)`` pairs, oldest first."""
        with self._lock:
            for user, item in rows:
                items = self._users.get(user)
                if items is None:
                    items = self._users[user] = OrderedDict()
                    self.bytes += _ENTRY_BYTES + len(user)
                else:
                    self._users.move_to_end(user)
                if item in items:
                    items.move_to_end(item)
                    continue
                items[item] = None
                self.bytes += _ITEM_BYTES + len(item)
                if len(items) > self.per_user:
                    old, _ = items.popitem(last=False)
                    self.bytes -= _ITEM_BYTES + len(old)
            while self.bytes > self.max_bytes and len(self._users) > 1:
                user, items = self._users.popitem(last=False)
                self.bytes -= _ENTRY_BYTES + len(user) + _size(items)

    def items(self, user_id: str) -> set[str]:
        with self._lock:
            items = self._users.get(user_id)
            return set(items) if items else set()

    def __len__(self) -> int:
        return len(self._users)
