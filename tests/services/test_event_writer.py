"""The impression log's writer, and what a worker keeps in memory between requests.

The writer must never make a ranking request wait, must bound what it holds, and must say what became of each
answer (written, or dropped and why) so feedback is acknowledged only for rows that exist. The records in
``services.recent`` are bounded by bytes, not counts. Feedback tokens tie feedback to whom an answer went to.
"""

from __future__ import annotations

import threading
import time

import pytest

from services.event_writer import ImpressionLog
from services.event_rows import Ranked
from services.event_store import EventStore


def _answer(user: str, items: list[str]) -> dict:
    return {"user_id": user, "model_version": "m:1", "weights": {"click": 1.0}, "diversity": 0.0,
            "items": [{"item_id": it, "score": 1.0, "scores": {"click": 0.5}} for it in items]}


def test_the_log_writes_in_batches_and_flushes(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}")
    log = ImpressionLog(store, flush_s=0.05)
    for r in range(50):
        assert log.log(Ranked(f"r{r}", 1_700_000_000.0 + r, _answer("u1", [f"i{j}" for j in range(10)]),
                              [1.0] * 10))
    assert log.flush(10)
    log.close()
    assert log.written == 500 and log.dropped == 0
    assert len(store.read()[0]) == 500


def test_a_down_database_drops_and_counts_and_never_raises():
    drops = []
    log = ImpressionLog(EventStore("postgresql://postgres@127.0.0.1:1/none", connect_timeout_s=1),
                        flush_s=0.05, retry_s=0.05, on_drop=drops.append)
    for r in range(5):
        assert log.log(Ranked(f"r{r}", 0.0, _answer("u1", ["i1", "i2", "i3"]), [1.0] * 3))
    assert log.flush(20)
    log.close()
    assert log.dropped == 15 and sum(drops) == 15 and log.written == 0


def test_a_full_queue_drops_at_once_instead_of_waiting(tmp_path):
    release = threading.Event()

    class Stuck(EventStore):  # a database that does not answer: the writer hangs in its first write
        def write(self, requests, conn=None):
            release.wait(30)

    log = ImpressionLog(Stuck(f"sqlite:///{tmp_path / 'e.db'}"), capacity=2, flush_s=0.01)
    t = time.perf_counter()
    results = [log.log(Ranked(f"r{r}", 0.0, _answer("u1", ["i1"]), [1.0])) for r in range(20)]
    assert time.perf_counter() - t < 1.0  # never blocked
    assert results.count(False) >= 17 and log.dropped == results.count(False)
    release.set()
    log.close()


def test_the_queue_bound_counts_rows(tmp_path):
    """``capacity`` is in shown items (MTLREC_EVENTS_QUEUE_ROWS), not requests: a 10-item answer takes 10."""
    release = threading.Event()

    class Stuck(EventStore):
        def write(self, requests, conn=None):
            release.wait(30)

    log = ImpressionLog(Stuck(f"sqlite:///{tmp_path / 'e.db'}"), capacity=25, flush_s=0.01)
    assert log.log(Ranked("r0", 0.0, _answer("u1", [f"i{j}" for j in range(10)]), [1.0] * 10))
    deadline = time.monotonic() + 5
    while log._queued and time.monotonic() < deadline:  # the writer has taken r0 and hangs writing it
        time.sleep(0.01)
    results = [log.log(Ranked(f"r{r}", 0.0, _answer("u1", [f"i{j}" for j in range(10)]), [1.0] * 10))
               for r in range(1, 5)]
    assert results == [True, True, False, False] and log.dropped == 20
    release.set()
    log.close()


def test_every_answer_is_reported_written_or_dropped_with_why(tmp_path):
    outcomes = []
    log = ImpressionLog(EventStore(f"sqlite:///{tmp_path / 'e.db'}"), flush_s=0.02,
                        on_outcome=lambda reqs, ok, why: outcomes.extend((r.request_id, ok, why) for r in reqs))
    assert log.log(Ranked("a", 1.0, _answer("u1", ["i1"]), [1.0]))
    assert log.flush(10)
    log.close()
    assert outcomes == [("a", True, "")]
    down = []
    log = ImpressionLog(EventStore("postgresql://postgres@127.0.0.1:1/none", connect_timeout_s=1), flush_s=0.02,
                        on_outcome=lambda reqs, ok, why: down.extend((r.request_id, ok, why) for r in reqs))
    log.log(Ranked("b", 1.0, _answer("u1", ["i1"]), [1.0]))
    assert log.flush(20)
    log.close()
    assert [(r, ok) for r, ok, _ in down] == [("b", False)] and "127.0.0.1:1" in down[0][2]


def test_a_failing_database_opens_the_breaker_instead_of_being_tried_per_batch(tmp_path):
    """After a failed write the writer drops what it takes without touching the database until the breaker's
    time is up, then one batch probes it: an unreachable database is not waited on batch after batch."""
    attempts = []

    class Failing(EventStore):
        def write(self, requests, conn=None):
            attempts.append(len(requests))
            raise OSError("disk on fire")

        def connect(self):
            return None

        def create(self):
            return self

    dropped = []
    log = ImpressionLog(Failing("sqlite:///unused"), flush_s=0.01, linger_s=0.0, batch_rows=1, retry_s=30.0,
                        on_outcome=lambda reqs, ok, why: dropped.extend(why for _ in reqs))
    for r in range(20):
        log.log(Ranked(f"r{r}", 1.0, _answer("u1", ["i1"]), [1.0]))
    assert log.flush(10)
    log.close()
    assert len(attempts) == 1 and len(dropped) == 20 and log.dropped == 20
    assert "refused" in dropped[0] and all("unavailable" in why and "disk on fire" in why for why in dropped[1:])


def test_the_writer_prunes_past_retention_and_follows_feedback(tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'e.db'}").create()
    now = time.time()
    store.write([Ranked("old", now - 10 * 86_400, _answer("u1", ["i1"]), [1.0]),
                 Ranked("new", now - 60, _answer("u2", ["i2"]), [1.0])])
    store.record_feedback("old", "i1", {"click": 1}, ts=now - 10 * 86_400)
    store.record_feedback("new", "i2", {"click": 1}, ts=now - 30)
    followed = []
    log = ImpressionLog(store, flush_s=0.02, retention_s=86_400, on_feedback=followed.extend, follow_s=0.05,
                        follow_from=3600)
    deadline = time.monotonic() + 10
    while (not followed or len(store.read()[0]) != 1) and time.monotonic() < deadline:
        time.sleep(0.05)
    log.close()
    assert store.read()[0].request_id.tolist() == ["new"]
    assert ("u2", "i2") in {(u, i) for u, i, _ in followed} and ("u1", "i1") not in {(u, i) for u, i, _ in followed}


# ---- what a worker remembers -----------------------------------------------------------------------------------

def test_recent_answers_are_bounded_by_bytes_and_know_their_fate():
    from services.recent import DROPPED, QUEUED, WRITTEN, Answers

    answers = Answers(max_bytes=200_000)
    answers.add("small", "u1", ["i1", "i2"])
    assert answers.get("small").state == QUEUED and answers.get("small").items == {"i1", "i2"}
    answers.settle(["small"], True)
    assert answers.get("small").state == WRITTEN
    answers.add("dropped", "u1", ["i3"])
    answers.settle(["dropped"], False, "queue full")
    assert (answers.get("dropped").state, answers.get("dropped").reason) == (DROPPED, "queue full")
    long_ids = [f"{'x' * 250}{j}" for j in range(1000)]  # one answer of a thousand 250-character ids
    for r in range(20):
        answers.add(f"big{r}", "u1", long_ids)
    assert answers.bytes <= 200_000 + 400_000 and len(answers) == 1  # only the newest big answer fits
    assert answers.get("small") is None and answers.get("big19") is not None


def test_history_is_bounded_per_user_and_in_all():
    from services.recent import History

    history = History(max_bytes=50_000, per_user=3)
    history.add([("u1", "a"), ("u1", "b"), ("u1", "c"), ("u1", "d"), ("u2", "a")])
    assert history.items("u1") == {"b", "c", "d"} and history.items("u2") == {"a"}
    assert history.items("nobody") == set()
    history.add((f"user{n}", f"item{n}") for n in range(2000))
    assert history.bytes <= 50_000 and len(history) < 2000
    assert history.items("user1999") == {"item1999"} and history.items("u1") == set()  # the oldest users went


# ---- feedback tokens ---------------------------------------------------------------------------------------------

def test_feedback_tokens_are_hmacs_under_a_secret_every_replica_shares(tmp_path, monkeypatch):
    from services.feedback_token import SECRET_FILE, Tokens

    monkeypatch.setenv("BENTOML_HOME", str(tmp_path / "bentoml"))
    one, two = Tokens.from_settings(""), Tokens.from_settings("")  # two replicas of one model store
    token = one.sign("r1")
    altered = token[:-1] + ("1" if token.endswith("0") else "0")  # one character off, whatever the secret
    assert two.valid("r1", token) and not two.valid("r2", token) and not two.valid("r1", altered)
    secret = tmp_path / "bentoml" / "mtlrec" / SECRET_FILE
    assert secret.is_file() and oct(secret.stat().st_mode & 0o777) == "0o600"
    configured = Tokens.from_settings("a-secret-the-operator-chose")
    assert not configured.valid("r1", token) and configured.valid("r1", configured.sign("r1"))
    secret.write_text("short\n")
    with pytest.raises(ValueError, match="no usable secret"):
        Tokens.from_settings("")


def test_exploring_with_epsilon_zero_is_refused():
    from models.settings import SettingsError, get_settings

    mp = pytest.MonkeyPatch()
    try:
        mp.setenv("MTLREC_EXPLORE", "epsilon")
        mp.setenv("MTLREC_EXPLORE_EPSILON", "0")
        with pytest.raises(SettingsError, match="MTLREC_EXPLORE_EPSILON above 0"):
            get_settings()
        mp.setenv("MTLREC_EXPLORE", "off")
        assert get_settings().explore_epsilon == 0.0  # no exploration: nothing to refuse
    finally:
        mp.undo()
