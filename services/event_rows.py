"""What the impression log keeps of one ``/rank`` answer: a request row as written, impression rows as read.

Why a log at all: a ranker that never records what it showed cannot learn
from its own traffic, and one that records only clicks cannot tell an item
nobody liked from one nobody saw. Each returned item is one impression: the
request id, time, user, item, position, model version, every objective's
score, the weights and diversity used, and the probability that the serving
policy put that item there (its propensity, 1 for a deterministic policy),
which is what off-policy evaluation of another weighting divides by. The
database keeps one row per request with the per-item values as lists (one
insert instead of one per item); ``impressions`` turns it back into one row
per impression.

Two clocks. ``ts`` is the server's clock when the answer was given: the log
is ordered, filtered (``since``) and pruned by it, so no client can place a
row in the future or the distant past. A client's ``context.timestamp`` (the
time the features were computed for, as when a past log is replayed) is kept
inside ``context`` under ``timestamp``; the export uses it as the impression's
time, since that is the time its features belong to.

``policy`` names what served the request: ``source`` (``model``: the
service's weights or its exploration draw; ``request``: the caller's own
weights), the fusion weights' version, the exploration setting and its
epsilon, and for an explored request the vectors it chose among, their
probabilities, the index it drew and each vector's expected objectives
(``services/exploration.py``). A reader must also accept ``{}`` or the draw
alone: a log may hold rows that carry no more.

A row that does not parse (hand-edited, truncated, written by a bug) is
``Corrupt``: the reader reports it by its request id and skips it, so one bad
row never stops a reader. Where the rows are kept is ``services/event_store.py``.
"""

from __future__ import annotations

import json
import secrets
import time
from dataclasses import dataclass
from typing import Any

IMPRESSION_COLUMNS = ("request_id", "item_id", "user_id", "ts", "position", "model_version", "score", "scores",
                      "weights", "diversity", "propensity", "context", "policy", "novelty")
# What the database holds: one row per answered request, its per-item values as JSON lists in position order.
# One row per item would cost the writer a JSON document, a primary-key entry and an index entry per item; a
# request row is one insert. ``impressions`` turns a request row back into one row per item.
REQUEST_COLUMNS = ("request_id", "user_id", "ts", "model_version", "items", "score", "scores", "propensity",
                   "weights", "diversity", "context", "policy", "novelty")
# Times a reader can turn into a timestamp (pandas' nanosecond range, with a margin): anything else is corrupt.
EARLIEST, LATEST = 0.0, 9.0e9


@dataclass(frozen=True)
class Corrupt:
    """A logged request a reader could not parse: which, and why."""

    request_id: str
    reason: str
    row: tuple = ()

    def __str__(self) -> str:
        return f"{self.request_id}: {self.reason}"


def new_request_id() -> str:
    """32 hex characters, time first (nanoseconds), then 64 random bits: ids the database's primary-key index
    takes in order, at its right edge, instead of at random pages of an ever larger tree (as UUIDv7 does)."""
    return f"{time.time_ns():016x}{secrets.token_hex(8)}"


def _finite_time(value: Any, what: str) -> float:
    t = float(value)
    if not EARLIEST <= t <= LATEST:
        raise ValueError(f"{what} {t!r} is not a time this log can hold")
    return t


def impressions(request: tuple) -> list[tuple]:
    """A ``requests`` row as one ``IMPRESSION_COLUMNS`` row per item, in position order; raises on a row that
    does not parse (bad JSON, lists of different lengths, a time out of range)."""
    r = dict(zip(REQUEST_COLUMNS, request))
    items, score, propensity = (json.loads(r[c]) for c in ("items", "score", "propensity"))
    scores = json.loads(r["scores"])
    weights, context, policy = (json.loads(r[c]) for c in ("weights", "context", "policy"))
    if not isinstance(items, list) or not (len(items) == len(score) == len(propensity)):
        raise ValueError("its items, scores and propensities differ in length")
    if not all(isinstance(v, list) and len(v) == len(items) for v in scores.values()):
        raise ValueError("an objective's scores differ in length from its items")
    if not isinstance(context, dict) or not isinstance(policy, dict) or not isinstance(weights, dict):
        raise ValueError("its weights, context or policy is not an object")
    ts = _finite_time(r["ts"], "ts")
    if context.get("timestamp") is not None:
        _finite_time(context["timestamp"], "context.timestamp")
    return [(r["request_id"], item, r["user_id"], ts, j + 1, r["model_version"], float(score[j]),
             {k: v[j] for k, v in scores.items()}, weights, float(r["diversity"]), float(propensity[j]), context,
             policy, float(r["novelty"])) for j, item in enumerate(items)]


@dataclass(frozen=True)
class Ranked:
    """One ``/rank`` answer as the log keeps it: the answer itself, serialised only when written.

    The request thread builds this and queues it (no copy, no JSON); the writer thread calls ``row``. The
    answer is a ``ranking.rank`` result, which nothing changes after it is answered. ``ts``: the server's
    clock; ``propensities``: the probability of each returned item at its position under the serving policy;
    ``context``: the request's declared context columns (and ``timestamp``, the client's feature time, when it
    sent one); ``policy``: what served it (the module docstring).
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
