"""The impression log, feedback and export, on real SQLite and PostgreSQL databases and a real served model.

The end-to-end test closes the loop the way production would: a promoted
model ranks 200 requests over HTTP, simulated users answer with the
synthetic generator's own click and purchase probabilities, the log is
exported as a dataset, and the pipeline trains and evaluates a new model on
what the service logged.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from flows.data.logged import export
from flows.data.synth import SynthConfig, oracle
from flows.dev import launcher, prefect_server
from models import contract
from services.events import EventStore, ImpressionLog, Ranked

ROOT = Path(__file__).resolve().parents[1]
SMALL_MODEL = "model.params={n_experts: 2, expert: [32], tower: [8]}"


def _answer(user: str, items: list[str], model: str = "m:1") -> dict:
    """A ``ranking.rank`` answer's shape, as the service logs it."""
    return {"user_id": user, "model_version": model, "weights": {"click": 1.0, "purchase": 1.0}, "diversity": 0.0,
            "items": [{"item_id": it, "score": 1.0 / (j + 1), "scores": {"click": 0.5, "purchase": 0.1}}
                      for j, it in enumerate(items)]}


@pytest.fixture(params=["sqlite", "postgres"])
def store(request, tmp_path):
    if request.param == "sqlite":
        return EventStore(f"sqlite:///{tmp_path / 'events.db'}").create()
    name = request.getfixturevalue("postgres_database")
    return EventStore(f"postgresql://postgres@127.0.0.1:5432/{name}").create()


def test_store_round_trip_and_idempotent_feedback(store):
    store.write([Ranked("r1", 1_700_000_000.0, _answer("u1", ["i1", "i2"]), [1.0, 0.5], {"device": "mobile"})])
    assert store.shown("r1") == {"i1": {"user_id": "u1", "position": 1, "model_version": "m:1"},
                                 "i2": {"user_id": "u1", "position": 2, "model_version": "m:1"}}
    assert store.shown("nope") == {}
    assert store.record_feedback("r1", "i1", {"click": 1, "purchase": 0}) == ["click", "purchase"]
    assert store.record_feedback("r1", "i1", {"click": 1, "purchase": 1}) == []  # first answer stands
    assert store.record_feedback("r1", "i2", {"click": 0}) == ["click"]
    impressions, feedback = store.read()
    assert list(impressions.item_id) == ["i1", "i2"] and list(impressions.propensity) == [1.0, 0.5]
    assert impressions.context[0] == {"device": "mobile"} and impressions.weights[0]["purchase"] == 1.0
    assert list(impressions.position) == [1, 2] and list(impressions.score) == [1.0, 0.5]
    assert impressions.scores[1] == {"click": 0.5, "purchase": 0.1} and set(impressions.user_id) == {"u1"}
    assert sorted(zip(feedback.item_id, feedback.event, feedback.value)) == [
        ("i1", "click", 1.0), ("i1", "purchase", 0.0), ("i2", "click", 0.0)]
    assert store.read(since=1_700_000_001.0)[0].empty
    assert store.interacted("u1") == {"i1"}  # a positive event; i2's click was 0
    assert store.interacted("u2") == set()


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


def test_export_labels_from_feedback(clean_dataset, tmp_path):
    """Known answers: no feedback is a 0, a purchase implies its click, positions are 1-based slots."""
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}").create()
    users = contract.read_table(clean_dataset, "users")["user_id"].tolist()
    items = contract.read_table(clean_dataset, "items")["item_id"].tolist()
    t0 = contract.Manifest.load(clean_dataset).end_ts.timestamp() + 3600  # after the log, not in the future
    for r in range(12):  # 120 impressions: the contract wants 100 at least
        store.write([Ranked(f"r{r}", t0 + 3600 * r, _answer(users[r], items[:10]), [1.0] * 10, {"device": "desktop"})])
    store.record_feedback("r0", items[0], {"purchase": 1})
    store.record_feedback("r0", items[1], {"click": 1, "dwell": 12.5})
    store.record_feedback("r3", items[4], {"click": 1})
    manifest = export(store, clean_dataset, tmp_path / "out")
    log = contract.read_table(tmp_path / "out", "interactions")
    assert len(log) == 120 and manifest.rows["interactions"] == 120 and manifest.source == "flows.data.logged"
    first = log[log.event_timestamp == log.event_timestamp.min()].set_index("item_id")
    assert first.loc[items[0], ["click", "purchase"]].tolist() == [1, 1]  # implied click
    assert first.loc[items[1], ["click", "purchase", "dwell"]].tolist() == [1, 0, 12.5]
    assert first.loc[items[2], ["click", "purchase", "dwell"]].tolist() == [0, 0, 0.0]
    assert first.loc[items[0], "position"] == 1 and first.loc[items[9], "position"] == 10
    assert log.click.sum() == 3 and set(log.device) == {"desktop"}
    assert contract.Manifest.load(tmp_path / "out").declaration.names == \
        contract.Manifest.load(clean_dataset).declaration.names
    from flows.validation.run import validate_dataset

    report = validate_dataset(tmp_path / "out", docs_dir=tmp_path / "docs")
    assert report.success, report.format()


def test_export_of_an_empty_window_says_so(clean_dataset, tmp_path):
    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}").create()
    with pytest.raises(ValueError, match="no impressions"):
        export(store, clean_dataset, tmp_path / "out")


# ---- the loop, end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(promoted_world):
    """A synthetic shop, its feature store, a trained model promoted in a private model store."""
    return promoted_world("events", SynthConfig(n_users=150, n_items=80, n_interactions=8000, days=6, seed=3))


def _simulate(client: httpx.Client, data: Path, requests: int = 200, seed: int = 0) -> dict:
    """``requests`` rankings over four days after the log, each answered by users who behave as the generator
    says: click with its click probability, buy with its purchase probability given the click."""
    truth = oracle(data)
    rng = np.random.default_rng(seed)
    users = contract.read_table(data, "users")["user_id"].tolist()
    items = contract.read_table(data, "items")["item_id"].tolist()
    start = contract.Manifest.load(data).end_ts.timestamp() + 3600
    sent = {"requests": 0, "clicks": 0, "purchases": 0}
    for r in range(requests):
        ts = start + r * (4 * 86_400 / requests)
        user = str(rng.choice(users))
        body = {"user_id": user, "candidates": [str(i) for i in rng.choice(items, 20, replace=False)], "k": 10,
                "context": {"device": "mobile", "timestamp": ts}}
        ranked = client.post("/rank", json=body)
        assert ranked.status_code == 200, ranked.text
        answer = ranked.json()
        shown = pd.DataFrame({"user_id": user, "item_id": [it["item_id"] for it in answer["items"]],
                              contract.TIMESTAMP: pd.Timestamp(ts, unit="s", tz="UTC"), "device": "mobile",
                              "position": np.arange(1, len(answer["items"]) + 1)})
        p = truth(shown)
        click = rng.random(len(shown)) < p["click"]
        buy = click & (rng.random(len(shown)) < p["purchase"] / np.maximum(p["click"], 1e-9))
        for j in np.flatnonzero(click):
            events = {"click": 1, "purchase": int(buy[j])}
            fb = client.post("/feedback", json={"request_id": answer["request_id"], "item_id": shown.item_id[j],
                                                "events": events})
            assert fb.status_code == 200 and fb.json()["recorded"] == list(events), fb.text
        sent["requests"] += 1
        sent["clicks"] += int(click.sum())
        sent["purchases"] += int(buy.sum())
    return sent


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["sqlite", "postgres"])
def test_served_rankings_and_feedback_become_the_next_training_set(world, backend, request, tmp_path, monkeypatch):
    url = (f"sqlite:///{tmp_path / 'events.db'}" if backend == "sqlite"
           else f"postgresql://postgres@127.0.0.1:5432/{request.getfixturevalue('postgres_database')}")
    env = {"BENTOML_HOME": str(world["home"]), "MTLREC_ONLINE_STORE": "sqlite", "MTLREC_EVENTS_URL": url}
    with launcher.serving(env, data=world["data"], timeout=120, log=tmp_path / "serve.log") as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            sent = _simulate(client, world["data"])
            # bad feedback: a 4xx naming the field, never a 5xx
            some = client.post("/rank", json={"user_id": "u1", "candidates": ["i1", "i2"]}).json()
            rid = some["request_id"]
            cases = [({"request_id": "nope", "item_id": "i1", "events": {"click": 1}}, 404, "request_id"),
                     ({"request_id": rid, "item_id": "i9", "events": {"click": 1}}, 404, "item_id"),
                     ({"request_id": rid, "item_id": "i1", "events": {"like": 1}}, 400, "events.like"),
                     ({"request_id": rid, "item_id": "i1", "events": {"click": 2}}, 400, "events.click"),
                     ({"request_id": rid, "item_id": "i1", "events": {"dwell": -1}}, 400, "events.dwell"),
                     ({"request_id": rid, "item_id": "i1", "events": {}}, 400, "events"),
                     ({"request_id": rid, "item_id": "i1"}, 400, "events")]
            for body, status, field in cases:
                r = client.post("/feedback", json=body)
                assert r.status_code == status and field in r.text, (body, r.status_code, r.text)
            first = client.post("/feedback", json={"request_id": rid, "item_id": "i1", "events": {"click": 1}})
            again = client.post("/feedback", json={"request_id": rid, "item_id": "i1", "events": {"click": 1}})
            assert first.json()["recorded"] == ["click"] and again.json()["duplicates"] == ["click"]
            assert "mtlrec_requests" in client.get("/metrics").text
            # novelty reads the user's history from the log: "i1" got a click above, so it is demoted
            novel = client.post("/rank", json={"user_id": "u1", "candidates": ["i2", "i1"], "novelty": 1.0})
            assert novel.status_code == 200 and novel.json()["novelty"] == 1.0, novel.text
            assert [it["item_id"] for it in novel.json()["items"]][-1] == "i1"
            # the log is written asynchronously: wait for the writer before the server stops
            store, deadline = EventStore(url), time.monotonic() + 60
            while len(store.read()[0]) < 200 * 10 + 2 + 2 and time.monotonic() < deadline:
                time.sleep(0.2)
    assert sent["clicks"] > 50, sent  # the simulated users did something worth learning from

    out = tmp_path / "logged"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "events", "export", "--data", str(world["data"]),
                          "--out", str(out), "--url", url], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    log = contract.read_table(out, "interactions")
    assert len(log) == 200 * 10 + 2 + 2 and log.click.sum() == sent["clicks"] + 1
    assert log.purchase.sum() == sent["purchases"]

    server = prefect_server.start(tmp_path / "prefect", scheduler=False)
    try:
        penv = server.client_env({**os.environ, "BENTOML_HOME": str(world["home"]), "BENTOML_DO_NOT_TRACK": "True",
                                  "PREFECT_HOME": str(tmp_path / "prefect"), "FEAST_USAGE": "False",
                                  "GX_ANALYTICS_ENABLED": "False"})
        run = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--data", str(out), "--set", SMALL_MODEL,
                              "--report-dir", str(tmp_path / "reports"), "--artifacts", str(tmp_path / "artifacts")],
                             cwd=ROOT, env=penv, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-5000:]
    summary = json.loads(run.stdout[run.stdout.index("{"):])
    assert summary["tag"] != world["tag"]
    monkeypatch.setenv("BENTOML_HOME", str(world["home"]))
    from services import registry

    evaluation = registry.evaluation_of(summary["tag"])  # a new model, judged on the logged data's holdout
    assert evaluation is not None and 0 <= evaluation["rankers"]["model"]["ndcg@10"] <= 1


@pytest.mark.slow
def test_served_exploration_logs_the_policy_and_each_placements_propensity(world, tmp_path):
    """MTLREC_EXPLORE=epsilon: requests without weights are ranked by a drawn vector, and the log says which."""
    url = f"sqlite:///{tmp_path / 'events.db'}"
    env = {"BENTOML_HOME": str(world["home"]), "MTLREC_ONLINE_STORE": "sqlite", "MTLREC_EVENTS_URL": url,
           "MTLREC_EXPLORE": "epsilon", "MTLREC_EXPLORE_EPSILON": "0.5"}
    with launcher.serving(env, data=world["data"], timeout=120, log=tmp_path / "serve.log") as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            _simulate(client, world["data"], requests=60, seed=1)
            explicit = client.post("/rank", json={"user_id": "u1", "candidates": ["i1", "i2", "i3"],
                                                  "weights": {"click": 1}})
            assert explicit.status_code == 200 and explicit.json()["weights"] == {"click": 1.0}
            assert set(explicit.json()) == {"request_id", "model_version", "user_id", "user_cold_start", "weights",
                                            "fusion", "diversity", "novelty", "items"}  # no log-only keys
    impressions, _ = EventStore(url).read()
    requests = impressions.drop_duplicates("request_id").set_index("request_id")
    assert requests.loc[explicit.json()["request_id"], "policy"] == {}
    assert (impressions[impressions.request_id == explicit.json()["request_id"]].propensity == 1.0).all()
    explored = requests[requests.policy.map(bool)]
    assert len(explored) == 60
    vectors = explored.policy.iloc[0]["vectors"]
    assert len(vectors) == 5 and all(p["vectors"] == vectors for p in explored.policy)
    assert all(w == p["vectors"][p["chosen"]] for w, p in zip(explored.weights, explored.policy))
    assert (explored.policy.map(lambda p: p["chosen"]) != 0).sum() >= 5  # some requests used another weighting
    props = impressions.propensity
    assert ((props > 0) & (props <= 1)).all() and (props < 1).any()


@pytest.mark.slow
def test_a_down_event_database_costs_no_ranking(world, tmp_path):
    """The log's PostgreSQL unreachable from the start: every /rank answers 200, the lost rows are counted on
    /metrics, and feedback (written at once, the caller told) answers 503 naming the database."""
    env = {"BENTOML_HOME": str(world["home"]), "MTLREC_ONLINE_STORE": "sqlite",
           "MTLREC_EVENTS_URL": "postgresql://postgres@127.0.0.1:1/nowhere"}
    with launcher.serving(env, data=world["data"], timeout=120, log=tmp_path / "serve.log") as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            answers = [client.post("/rank", json={"user_id": "u1", "candidates": [f"i{j}" for j in range(1, 11)],
                                                  "k": 5}) for _ in range(20)]
            assert [a.status_code for a in answers] == [200] * 20
            deadline, dropped = time.monotonic() + 30, 0.0
            while time.monotonic() < deadline:
                dropped = sum(float(line.rsplit(" ", 1)[1]) for line in client.get("/metrics").text.splitlines()
                              if line.startswith("mtlrec_event_drops_total"))
                if dropped >= 100:
                    break
                time.sleep(0.5)
            assert dropped == 100  # 20 answers x 5 items, each lost row counted once
            fb = client.post("/feedback", json={"request_id": answers[0].json()["request_id"],
                                                "item_id": answers[0].json()["items"][0]["item_id"],
                                                "events": {"click": 1}})
            assert fb.status_code == 503 and "127.0.0.1:1" in fb.text, fb.text
