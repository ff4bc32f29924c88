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
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from flows.data.logged import export
from flows.data.synth import SynthConfig, oracle
from flows.dev import launcher, prefect_server
from models.contract import tables as contract
from services.event_rows import Ranked
from services.event_store import EventStore

ROOT = Path(__file__).resolve().parents[2]
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


def _raw_row(store, request_id: str, **overrides):
    """A request row written by hand, bypassing ``Ranked`` (how a bug or an editor could leave one)."""
    from services.event_rows import REQUEST_COLUMNS

    row = dict(zip(REQUEST_COLUMNS, Ranked(request_id, 1_700_000_000.0, _answer("u1", ["i1", "i2"]), [1.0, 1.0]).row()))
    row.update(overrides)
    conn = store.connect()
    conn.cursor().execute(store._sql(f"INSERT INTO requests ({', '.join(row)}) VALUES ({', '.join('?' * len(row))})"),
                          tuple(row.values()))
    conn.commit()
    conn.close()


def test_a_corrupt_row_is_named_and_quarantined_never_aborts_a_reader(store):
    store.write([Ranked("good", 1_700_000_000.0, _answer("u1", ["i1", "i2"]), [1.0, 1.0])])
    _raw_row(store, "truncated", items='["i1", "i2"')
    _raw_row(store, "mismatched", score="[1.0]")
    _raw_row(store, "year-9999", ts=253402214400.0)
    store.record_feedback("truncated", "i1", {"click": 1})
    problems = []
    impressions, feedback = store.read(problems=problems)
    assert set(impressions.request_id) == {"good"} and feedback.empty
    assert sorted(p.request_id for p in problems) == ["mismatched", "truncated", "year-9999"]
    assert "JSONDecodeError" in next(str(p) for p in problems if p.request_id == "truncated")
    assert store.read()[0].request_id.tolist() == ["good", "good"]  # without a list to fill: left out all the same
    assert store.quarantine(problems) == 3
    assert sorted(r for r, _ in store.quarantined()) == ["mismatched", "truncated", "year-9999"]
    again = []
    assert len(store.read(problems=again)[0]) == 2 and again == []  # quarantined rows are out of the way


def test_prune_deletes_what_was_logged_before_a_time(store):
    for r, ts in enumerate([100.0, 200.0, 300.0]):
        store.write([Ranked(f"r{r}", 1_700_000_000.0 + ts, _answer("u1", ["i1"]), [1.0])])
        store.record_feedback(f"r{r}", "i1", {"click": 1})
    assert store.prune(1_700_000_250.0) == {"feedback": 2, "requests": 2, "quarantined": 0}
    impressions, feedback = store.read()
    assert impressions.request_id.tolist() == ["r2"] and feedback.request_id.tolist() == ["r2"]


def test_positive_feedback_is_followed_by_time(store):
    store.write([Ranked("r1", 1.0, _answer("u1", ["i1", "i2"]), [1.0, 1.0]),
                 Ranked("r2", 2.0, _answer("u2", ["i3"]), [1.0])])
    store.record_feedback("r1", "i1", {"click": 1}, ts=10.0)
    store.record_feedback("r1", "i2", {"click": 0}, ts=11.0)
    store.record_feedback("r2", "i3", {"click": 1, "purchase": 1}, ts=12.0)
    assert store.positive_feedback(0.0) == [("u1", "i1", 10.0), ("u2", "i3", 12.0), ("u2", "i3", 12.0)]
    assert store.positive_feedback(11.0) == [("u2", "i3", 12.0)] * 2


def test_export_adds_users_and_items_first_seen_in_traffic(clean_dataset, tmp_path):
    """A new user and a new item in the log become rows of the exported tables (first-seen time, the online
    store's attributes where it has them), and the export passes validation; the impression time is the
    request's feature time when the client sent one."""
    from flows.validation.run import validate_dataset

    store = EventStore(f"sqlite:///{tmp_path / 'events.db'}").create()
    users = contract.read_table(clean_dataset, "users")["user_id"].tolist()
    items = contract.read_table(clean_dataset, "items")["item_id"].tolist()
    t0 = contract.Manifest.load(clean_dataset).end_ts.timestamp() + 3600
    for r in range(12):
        user = "brand-new-user" if r == 5 else users[r]
        shown = items[:9] + (["brand-new-item"] if r >= 3 else [items[9]])
        store.write([Ranked(f"r{r}", 1_800_000_000.0 + r, _answer(user, shown), [1.0] * 10,
                            {"device": "desktop", "timestamp": t0 + 3600 * r})])
    store.record_feedback("r5", "brand-new-item", {"click": 1})

    def attributes(entity, ids):
        assert (entity, ids) in (("user", ["brand-new-user"]), ("item", ["brand-new-item"]))
        return pd.DataFrame({"category": ["shoes"], "price": [12.5]}, index=ids) if entity == "item" \
            else pd.DataFrame(index=ids)  # the store knows nothing of the user

    manifest = export(store, clean_dataset, tmp_path / "out", attributes=attributes)
    assert manifest.params["new_users"] == 1 and manifest.params["new_items"] == 1
    out_users = contract.read_table(tmp_path / "out", "users").set_index("user_id")
    out_items = contract.read_table(tmp_path / "out", "items").set_index("item_id")
    assert len(out_users) == len(users) + 1 and len(out_items) == len(items) + 1
    first_seen = pd.Timestamp(t0 + 3600 * 5, unit="s", tz="UTC")
    assert out_users.loc["brand-new-user", "event_timestamp"] == first_seen
    assert out_items.loc["brand-new-item", ["category", "price"]].tolist() == ["shoes", 12.5]
    assert out_items.loc["brand-new-item", "event_timestamp"] == pd.Timestamp(t0 + 3600 * 3, unit="s", tz="UTC")
    log = contract.read_table(tmp_path / "out", "interactions")
    assert log.event_timestamp.min() == pd.Timestamp(t0, unit="s", tz="UTC")  # the feature time, not the clock
    report = validate_dataset(tmp_path / "out", docs_dir=tmp_path / "docs")
    assert report.success, report.format()
    no_store = export(store, clean_dataset, tmp_path / "bare")  # nothing to look attributes up in
    bare = contract.read_table(tmp_path / "bare", "items").set_index("item_id")
    assert no_store.params["new_items"] == 1 and bare.loc["brand-new-item", "category"] == "unknown"
    assert validate_dataset(tmp_path / "bare", docs_dir=tmp_path / "docs2").success


# ---- the loop, end to end ------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def world(promoted_world):
    """A synthetic shop, its feature store, a trained model promoted in a private model store."""
    return promoted_world("events", SynthConfig(n_users=150, n_items=80, n_interactions=8000, days=6, seed=3))


NEW_USERS, NEW_ITEMS = 5, 8  # ids the catalogue does not hold: traffic brings them


def _simulate(client: httpx.Client, data: Path, requests: int = 200, seed: int = 0) -> dict:
    """``requests`` rankings over four days after the log, each answered by users who behave as the generator
    says: click with its click probability, buy with its purchase probability given the click.

    Every tenth request comes from a user the dataset does not hold, and the candidates include items it does not
    hold: those answer with a fixed click rate of 0.1 and purchase rate of 0.2 per click, having no truth."""
    truth = oracle(data)
    rng = np.random.default_rng(seed)
    users = contract.read_table(data, "users")["user_id"].tolist()
    items = contract.read_table(data, "items")["item_id"].tolist()
    catalogue = items + [f"new-item-{n}" for n in range(NEW_ITEMS)]
    start = contract.Manifest.load(data).end_ts.timestamp() + 3600
    sent = {"requests": 0, "clicks": 0, "purchases": 0, "new_users": set(), "new_items": set()}
    for r in range(requests):
        ts = start + r * (4 * 86_400 / requests)
        user = f"new-user-{(r // 10) % NEW_USERS}" if r % 10 == 0 else str(rng.choice(users))
        body = {"user_id": user, "candidates": [str(i) for i in rng.choice(catalogue, 20, replace=False)], "k": 10,
                "context": {"device": "mobile", "timestamp": ts}}
        ranked = client.post("/rank", json=body)
        assert ranked.status_code == 200, ranked.text
        answer = ranked.json()
        shown = pd.DataFrame({"user_id": user, "item_id": [it["item_id"] for it in answer["items"]],
                              contract.TIMESTAMP: pd.Timestamp(ts, unit="s", tz="UTC"), "device": "mobile",
                              "position": np.arange(1, len(answer["items"]) + 1)})
        known = (shown.user_id.isin(users) & shown.item_id.isin(items)).to_numpy()
        p_click, p_buy = np.full(len(shown), 0.1), np.full(len(shown), 0.2)
        if known.any():
            p = truth(shown[known].reset_index(drop=True))
            p_click[known], p_buy[known] = p["click"], p["purchase"] / np.maximum(p["click"], 1e-9)
        click = rng.random(len(shown)) < p_click
        buy = click & (rng.random(len(shown)) < p_buy)
        for j in np.flatnonzero(click):
            events = {"click": 1, "purchase": int(buy[j])}
            fb = client.post("/feedback", json={"request_id": answer["request_id"], "item_id": shown.item_id[j],
                                                "events": events, "token": answer["feedback_token"]})
            assert fb.status_code == 200 and fb.json()["recorded"] == list(events), fb.text
        sent["requests"] += 1
        sent["clicks"] += int(click.sum())
        sent["purchases"] += int(buy.sum())
        sent["new_users"] |= {user} - set(users)
        sent["new_items"] |= set(shown.item_id) - set(items)
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
            rid, token = some["request_id"], some["feedback_token"]
            cases = [({"request_id": "nope", "item_id": "i1", "events": {"click": 1}}, 403, "token"),
                     ({"request_id": rid, "item_id": "i9", "events": {"click": 1}}, 404, "item_id"),
                     ({"request_id": rid, "item_id": "i1", "events": {"like": 1}}, 400, "events.like"),
                     ({"request_id": rid, "item_id": "i1", "events": {"click": 2}}, 400, "events.click"),
                     ({"request_id": rid, "item_id": "i1", "events": {"dwell": -1}}, 400, "events.dwell"),
                     ({"request_id": rid, "item_id": "i1", "events": {}}, 400, "events"),
                     ({"request_id": rid, "item_id": "i1"}, 400, "events")]
            for body, status, field in cases:
                r = client.post("/feedback", json={**body, "token": token})
                assert r.status_code == status and field in r.text, (body, r.status_code, r.text)
            click = {"request_id": rid, "item_id": "i1", "events": {"click": 1}, "token": token}
            first, again = client.post("/feedback", json=click), client.post("/feedback", json=click)
            assert first.json()["recorded"] == ["click"] and again.json()["duplicates"] == ["click"]
            assert "mtlrec_requests" in client.get("/metrics").text
            # novelty reads what the user liked from memory: "i1" got a click above, so it is demoted
            novel = client.post("/rank", json={"user_id": "u1", "candidates": ["i2", "i1"], "novelty": 1.0})
            assert novel.status_code == 200 and novel.json()["novelty"] == 1.0, novel.text
            assert [it["item_id"] for it in novel.json()["items"]][-1] == "i1"
            # the log is written asynchronously: wait for the writer before the server stops
            store, deadline = EventStore(url), time.monotonic() + 60
            while len(store.read()[0]) < 200 * 10 + 2 + 2 and time.monotonic() < deadline:
                time.sleep(0.2)
    assert sent["clicks"] > 50, sent  # the simulated users did something worth learning from
    assert len(sent["new_users"]) == NEW_USERS and sent["new_items"], sent

    out = tmp_path / "logged"
    res = subprocess.run([sys.executable, "-m", "flows.cli", "events", "export", "--data", str(world["data"]),
                          "--out", str(out), "--url", url], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"{NEW_USERS} users and {len(sent['new_items'])} items first seen in traffic" in res.stdout, res.stdout
    log = contract.read_table(out, "interactions")
    assert len(log) == 200 * 10 + 2 + 2 and log.click.sum() == sent["clicks"] + 1
    assert log.purchase.sum() == sent["purchases"]
    assert set(log.user_id) <= set(contract.read_table(out, "users").user_id)  # every logged id resolves
    assert set(log.item_id) <= set(contract.read_table(out, "items").item_id)
    checked = subprocess.run([sys.executable, "-m", "flows.cli", "validate", str(out)], cwd=ROOT,
                             capture_output=True, text=True, timeout=300,
                             env={**os.environ, "GX_ANALYTICS_ENABLED": "False"})
    assert checked.returncode == 0, checked.stdout[-3000:] + checked.stderr[-3000:]

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
    from services import model_store

    evaluation = model_store.evaluation_of(summary["tag"])  # a new model, judged on the logged data's holdout
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
            assert set(explicit.json()) == {"request_id", "feedback_token", "model_version", "user_id",
                                            "user_cold_start", "weights", "fusion", "diversity", "novelty",
                                            "time_outside_data", "warnings", "items"}  # no log-only keys
    impressions, _ = EventStore(url).read()
    requests = impressions.drop_duplicates("request_id").set_index("request_id")
    assert requests.loc[explicit.json()["request_id"], "policy"] == {
        "source": "request", "fusion": "declared", "explore": "epsilon", "epsilon": 0.5, "spread": 0.5}
    assert (impressions[impressions.request_id == explicit.json()["request_id"]].propensity == 1.0).all()
    explored = requests[requests.policy.map(lambda p: "vectors" in p)]
    assert len(explored) == 60
    vectors = explored.policy.iloc[0]["vectors"]
    assert len(vectors) == 5 and all(p["vectors"] == vectors for p in explored.policy)
    assert all(w == p["vectors"][p["chosen"]] for w, p in zip(explored.weights, explored.policy))
    assert (explored.policy.map(lambda p: p["chosen"]) != 0).sum() >= 5  # some requests used another weighting
    # the reward model's input: each vector's list summed objective by objective; the chosen one is what was shown
    shown = {rid: {o: sum(d[o] for d in g.scores) for o in ("click", "purchase")}
             for rid, g in impressions.groupby("request_id")}
    for rid, p in explored.policy.items():
        assert len(p["expected"]) == len(vectors) and p["expected"][p["chosen"]] == pytest.approx(shown[rid])
    props = impressions.propensity
    assert ((props > 0) & (props <= 1)).all() and (props < 1).any()
