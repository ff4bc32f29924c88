"""The loop around a served model, over real HTTP: what a request may change, who may give feedback, and that
the impression log never holds up a ranking, whatever its database does.

One server per test module on a promoted model (SQLite online store, SQLite event log); the event-database
faults are real: an SQLite file whose write lock another connection holds, and a PostgreSQL port nothing
listens on.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time

import httpx
import pytest

from flows.dev import launcher
from models.contract import tables as contract
from services.event_store import EventStore

TOKEN = "test-admin-token"


@pytest.fixture(scope="module")
def world(promoted_world):
    from flows.data.synth import SynthConfig

    return promoted_world("loop", SynthConfig(n_users=120, n_items=60, n_interactions=6000, days=5, seed=4))


@contextlib.contextmanager
def _serve(world, events_url: str, **extra):
    env = {"BENTOML_HOME": str(world["home"]), "MTLREC_ONLINE_STORE": "sqlite", "MTLREC_EVENTS_URL": events_url,
           "MTLREC_ADMIN_TOKEN": TOKEN, "MTLREC_EVENTS_TIMEOUT_MS": "2000", **extra}
    log = world["base"] / f"serve-{time.monotonic_ns()}.log"
    with launcher.serving(env, data=world["data"], timeout=120, log=log) as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            yield client


@pytest.fixture(scope="module")
def events_db(world):
    return world["base"] / "events.db"


@pytest.fixture(scope="module")
def server(world, events_db):
    with _serve(world, f"sqlite:///{events_db}") as client:
        yield client


def _when(world) -> float:
    return contract.Manifest.load(world["data"]).end_ts.timestamp() + 3600


def _rank(client, world, **body) -> dict:
    body = {"user_id": "u1", "candidates": ["i1", "i2", "i3", "i4"],
            "context": {"device": "mobile", "timestamp": _when(world)}, **body}
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


@pytest.mark.parametrize("context,field", [
    ({"log_price": 1e300}, "log_price"),  # a feature column: never the request's to set
    ({"user_id": "u2"}, "user_id"),
    ({"position": 3}, "position"),  # the service's to set
    ({"device": 5}, "device"),
    ({"device": "x" * 65}, "device"),
    ({"timestamp": "1999-01-01T00:00:00Z"}, "timestamp"),  # before the data starts
    ({"timestamp": "2999-01-01T00:00:00Z"}, "timestamp"),  # more than a day past the server's clock
    ({"timestamp": "9999-12-31T00:00:00Z"}, "timestamp"),
])
def test_a_request_changes_only_what_its_declaration_allows(server, world, context, field):
    r = server.post("/rank", json={"user_id": "u1", "candidates": ["i1", "i2"], "context": context})
    assert r.status_code == 400 and field in r.text, (r.status_code, r.text)
    assert server.post("/score", json={"user_id": "u1", "items": ["i1"], "context": context}).status_code == 400


def test_the_context_schema_lists_the_declared_columns(server):
    schema = server.get("/docs.json").json()["components"]["schemas"]
    context = next(s for name, s in schema.items() if name.lower() == "context")
    assert set(context["properties"]) == {"device", "timestamp"} and context["additionalProperties"] is False


def test_the_log_is_stamped_by_the_servers_clock_and_keeps_the_feature_time(server, world, events_db):
    before = time.time()
    answer = _rank(server, world)
    store = EventStore(f"sqlite:///{events_db}")
    deadline = time.monotonic() + 10
    while answer["request_id"] not in set(store.read()[0].request_id) and time.monotonic() < deadline:
        time.sleep(0.05)  # the writer is asynchronous
    rows = store.read()[0].set_index("request_id").loc[[answer["request_id"]]]
    assert (rows.ts >= before).all() and (rows.ts <= time.time()).all()
    assert rows.context.iloc[0] == {"device": "mobile", "timestamp": _when(world)}
    policy = rows.policy.iloc[0]
    assert policy["source"] == "model" and policy["fusion"] == "declared" and policy["explore"] == "off"


def test_feedback_needs_the_answers_token(server, world):
    answer = _rank(server, world)
    body = {"request_id": answer["request_id"], "item_id": answer["items"][0]["item_id"], "events": {"click": 1}}
    missing = server.post("/feedback", json=body)
    assert missing.status_code == 401 and "token" in missing.text
    other = _rank(server, world)
    wrong = server.post("/feedback", json={**body, "token": other["feedback_token"]})
    assert wrong.status_code == 403 and "token" in wrong.text
    right = server.post("/feedback", json={**body, "token": answer["feedback_token"]})
    assert right.status_code == 200 and right.json()["recorded"] == ["click"], right.text
    # novelty reads what the user liked from memory: the item just clicked goes last
    novel = _rank(server, world, candidates=[body["item_id"], "i5"], novelty=1.0)
    assert [it["item_id"] for it in novel["items"]][-1] == body["item_id"]


def _hammer_feedback(client: httpx.Client, answers: list[dict], stop: threading.Event) -> list[int]:
    statuses: list[int] = []
    while not stop.is_set():
        for a in answers:
            r = client.post("/feedback", json={"request_id": a["request_id"], "item_id": a["items"][0]["item_id"],
                                               "events": {"purchase": 1}, "token": a["feedback_token"]})
            statuses.append(r.status_code)
    return statuses


def _ranking_under(client: httpx.Client, world, n: int = 15, **body) -> list[float]:
    took = []
    for _ in range(n):
        t = time.perf_counter()
        _rank(client, world, **body)
        took.append(time.perf_counter() - t)
    return took


@pytest.mark.slow
def test_a_locked_event_database_never_holds_up_ranking(server, world, events_db):
    """SQLite's write lock held by another connection while 8 clients post feedback: every feedback call waits
    for the database (and answers 503), yet ranking, novelty included, goes on at its usual pace."""
    answers = [_rank(server, world) for _ in range(8)]
    time.sleep(0.5)  # written
    lock = sqlite3.connect(events_db, timeout=5)
    lock.execute("BEGIN EXCLUSIVE")
    stop = threading.Event()
    results: list[list[int]] = []
    clients = [httpx.Client(base_url=server.base_url, timeout=30) for _ in range(8)]
    threads = [threading.Thread(target=lambda c=c: results.append(_hammer_feedback(c, answers, stop)))
               for c in clients]
    try:
        for t in threads:
            t.start()
        time.sleep(0.5)
        took = _ranking_under(server, world, novelty=0.5)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
        lock.rollback()
        lock.close()
        for c in clients:
            c.close()
    statuses = [s for r in results for s in r]
    assert statuses and set(statuses) <= {200, 503}, set(statuses)
    assert 503 in statuses  # the lock was real: feedback could not write
    assert max(took) < 1.0, took  # one feedback call alone waits 2 s for the lock


@pytest.mark.slow
def test_an_unreachable_event_database_costs_no_ranking_and_its_dropped_answers_refuse_feedback(world):
    """The log's PostgreSQL unreachable from the start: /rank answers at its usual pace (novelty too, read from
    memory), the lost rows are counted on /metrics, and feedback on an answer whose rows were dropped is a 409
    naming why, never acknowledged."""
    with _serve(world, "postgresql://postgres@127.0.0.1:1/nowhere") as client:
        took = _ranking_under(client, world, n=10, novelty=1.0)
        assert max(took) < 1.0, took  # one connection attempt alone takes a second
        answer = _rank(client, world, k=2)
        deadline, dropped = time.monotonic() + 30, 0.0
        while time.monotonic() < deadline:
            dropped = sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
                          if line.startswith("mtlrec_event_drops_total"))
            if dropped >= 10 * 4 + 2:
                break
            time.sleep(0.2)
        assert dropped == 10 * 4 + 2  # each lost row counted once
        first = answer["items"][0]["item_id"]
        fb = client.post("/feedback", json={"request_id": answer["request_id"], "item_id": first,
                                            "events": {"click": 1}, "token": answer["feedback_token"]})
        assert fb.status_code == 409 and "127.0.0.1:1" in fb.text and "request_id" in fb.text, fb.text


def _accept(world, weights: dict[str, float]):
    """A weighting the fusion gate accepted, kept as the production model's next version (live at once)."""
    from services import production_pointer

    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(world["home"]))
    try:
        current = production_pointer.fusion_current(world["tag"]).fusion
        return production_pointer.accept_fusion(world["tag"], {"weights": weights},
                                                {"accepted": True, "reason": "test"}, judged_against=current)
    finally:
        mp.undo()


def _rollback_fusion(world):
    from services import production_pointer

    mp = pytest.MonkeyPatch()
    mp.setenv("BENTOML_HOME", str(world["home"]))
    try:
        return production_pointer.rollback_fusion("test over")
    finally:
        mp.undo()


@pytest.mark.slow
def test_two_workers_take_feedback_on_each_others_answers_and_follow_a_new_fusion_version(world):
    """Two workers. Feedback sent at once on a fresh connection often reaches the worker that did not answer,
    before the answering worker's writer has logged the rows: it waits for them (never a 404). Each worker
    follows the production pointer by itself: an accepted weighting is what every answer ranks with within a
    poll, a rollback likewise."""
    declared = {"click": 1.0, "purchase": 1.0}
    with _serve(world, f"sqlite:///{world['base'] / 'events-two.db'}", MTLREC_WORKERS="2",
                MTLREC_RELOAD_POLL_S="0.3") as client:
        statuses = []
        for _ in range(30):
            with httpx.Client(base_url=client.base_url, timeout=30) as a, \
                    httpx.Client(base_url=client.base_url, timeout=30) as b:
                answer = _rank(a, world)
                statuses.append(b.post("/feedback", json={
                    "request_id": answer["request_id"], "item_id": answer["items"][0]["item_id"],
                    "events": {"click": 1}, "token": answer["feedback_token"]}).status_code)
        assert statuses == [200] * 30, statuses
        assert _rank(client, world)["weights"] == declared
        accepted = _accept(world, {"click": 0.25, "purchase": 3.0})
        assert accepted.live and accepted.id == "f1"
        time.sleep(1.5)  # a few polls

        def weights_seen(n: int = 30) -> list[dict]:  # a fresh connection each: both workers answer some
            seen = []
            for _ in range(n):
                with httpx.Client(base_url=client.base_url, timeout=30) as fresh:
                    seen.append(_rank(fresh, world)["weights"])
            return seen

        assert all(w == {"click": 0.25, "purchase": 3.0} for w in weights_seen())
        _rollback_fusion(world)
        time.sleep(1.5)
        assert all(w == declared for w in weights_seen())


@pytest.mark.slow
def test_admin_reload_reports_a_fusion_version_change(server, world, events_db):
    accepted = _accept(world, {"click": 0.5, "purchase": 2.0})
    try:
        r = server.post("/admin/reload", headers={"x-admin-token": TOKEN})
        assert r.status_code == 200 and r.json()["changed"] is True and r.json()["fusion_version"] == accepted.id
        again = server.post("/admin/reload", headers={"x-admin-token": TOKEN}).json()
        assert again["changed"] is False and again["model_version"] == world["tag"]
        answer = _rank(server, world)
        assert answer["weights"] == {"click": 0.5, "purchase": 2.0}
        store = EventStore(f"sqlite:///{events_db}")
        deadline = time.monotonic() + 10
        while answer["request_id"] not in set(store.read()[0].request_id) and time.monotonic() < deadline:
            time.sleep(0.05)
        logged = store.read()[0].set_index("request_id").loc[[answer["request_id"]], "policy"].iloc[0]
        assert logged["fusion"] == accepted.id
    finally:
        _rollback_fusion(world)
        server.post("/admin/reload", headers={"x-admin-token": TOKEN})
