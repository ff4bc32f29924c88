"""The ranking service over real HTTP: `bentoml serve` on a free loopback port, a model trained here.

The reference for every ranking is computed in this process from the same pieces the model was
judged by offline (FeatureReader on the dataset's store, the registered artifact, ``fuse``), so the
tests hold serving to training/evaluation parity rather than to itself.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pandas as pd
import pytest

from flows.processes import free_port
from services import launcher

ROOT = Path(__file__).resolve().parents[1]
BENTOML = str(Path(sys.executable).with_name("bentoml"))
TS = 1_700_000_000  # a fixed request time, so the context features are the same here and there
TOKEN = "test-admin-token"
MAX_CANDIDATES = 100


@contextlib.contextmanager
def _env(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A small dataset with its feature store, and a trained model promoted in a private BENTOML_HOME."""
    from flows import registry
    from flows.data.synth import SynthConfig, generate
    from flows.features.store import build_all
    from models.config import load_config
    from models.train import train

    base = tmp_path_factory.mktemp("service")
    data, art, home = base / "data", base / "artifact", base / "bentoml"
    generate(data, SynthConfig(n_users=150, n_items=80, n_interactions=8000, days=6, seed=0))
    build_all(data)
    train(load_config("mmoe", ["train.max_epochs=1", "model.params={n_experts: 2, expert: [32], tower: [8]}"]),
          data, art, progress=False)
    with _env(BENTOML_HOME=str(home), BENTOML_DO_NOT_TRACK="True"):
        tag = registry.register(art)
        registry.record_evaluation(tag, {"fused/ndcg@10": 0.5})
        registry.set_production(tag)
    return {"data": data, "artifact": art, "home": home, "tag": tag}


@contextlib.contextmanager
def _serve(world, ready: bool = True, **extra):
    """`mtlrec serve` on a free loopback port (through the launcher `make run` and the benchmark use)."""
    env = {"BENTOML_HOME": str(world["home"]), "MTLREC_MAX_CANDIDATES": str(MAX_CANDIDATES),
           "MTLREC_ADMIN_TOKEN": TOKEN, **extra}
    if "MTLREC_ONLINE_STORE" not in extra:
        env["MTLREC_ONLINE_STORE"] = "sqlite"
    log = world["data"].parent / f"serve-{time.monotonic_ns()}.log"
    with launcher.serving(env, data=world["data"], probe="/readyz" if ready else "/livez", timeout=90,
                          log=log) as served:
        with httpx.Client(base_url=served.url, timeout=20) as client:
            client.server_pid = served.pid  # one worker: the serve process itself runs the service
            yield client


@pytest.fixture(scope="module")
def server(world):
    with _serve(world) as client:
        yield client


@pytest.fixture(scope="module")
def offline(world):
    """Per-objective probabilities and categories computed in this process, without the service."""
    from flows import registry
    from flows.features.online import FeatureReader
    from flows.features.store import StoreSettings, open_store
    from models.artifact import Scorer

    with _env(BENTOML_HOME=str(world["home"])):
        scorer = Scorer.load(registry.artifact_path(world["tag"]))
    reader = FeatureReader(open_store(StoreSettings.for_dataset(world["data"], online="sqlite")))
    users = pd.read_parquet(world["data"] / "users.parquet")["user_id"].astype(str).tolist()
    items = pd.read_parquet(world["data"] / "items.parquet")["item_id"].astype(str).tolist()

    def run(user: str, candidates: list[str]):
        df = reader.features(user, candidates, TS)
        df["device"] = "mobile"
        df["position"] = 0
        return scorer.predict(df), df["category"].to_numpy(dtype=object), df

    return {"run": run, "users": users, "items": items[:MAX_CANDIDATES], "scorer": scorer}


def _rank(client, **body):
    body.setdefault("context", {"device": "mobile", "timestamp": TS})
    r = client.post("/rank", json=body)
    assert r.status_code == 200, r.text
    return r.json()


def _order(scores: np.ndarray, items: list[str]) -> list[str]:
    return [items[i] for i in np.argsort(-scores, kind="stable")]


def test_rank_equals_offline_fused_order(server, offline, world):
    from models.evaluation import fusion_weights
    from models.fusion import fuse

    user, items = offline["users"][3], offline["items"]
    out = _rank(server, user_id=user, candidates=items)
    probs, *_ = offline["run"](user, items)
    fused = fuse(probs, fusion_weights(offline["scorer"].tasks))
    assert out["model_version"] == world["tag"]
    assert [it["item_id"] for it in out["items"]] == _order(fused, items)
    got = {it["item_id"]: it for it in out["items"]}
    for j, item in enumerate(items):
        assert got[item]["score"] == pytest.approx(fused[j], rel=1e-5)
        assert got[item]["scores"]["click"] == pytest.approx(float(probs["click"][j]), rel=1e-5)
        assert got[item]["cold_start"] is False
    assert [it["rank_before_rerank"] for it in out["items"]] == list(range(1, len(items) + 1))
    assert out["user_cold_start"] is False


def test_weights_change_the_order(server, offline):
    user, items = offline["users"][7], offline["items"]
    probs, *_ = offline["run"](user, items)
    orders = {}
    for objective in ("click", "purchase"):
        weights = {"click": float(objective == "click"), "purchase": float(objective == "purchase")}
        out = _rank(server, user_id=user, candidates=items, k=20, weights=weights)
        orders[objective] = [it["item_id"] for it in out["items"]]
        assert orders[objective] == _order(probs[objective].astype(np.float64), items)[:20]
    assert orders["click"] != orders["purchase"]


def test_diversity_spreads_categories(server, offline):
    user, items = offline["users"][11], offline["items"]
    _, cats, _ = offline["run"](user, items)
    category = dict(zip(items, cats))
    k = 10
    spread = {}
    for d in (0.0, 1.0):
        out = _rank(server, user_id=user, candidates=items, k=k, diversity=d)
        assert len(out["items"]) == k
        spread[d] = len({category[it["item_id"]] for it in out["items"]})
    assert spread[1.0] == min(k, len(set(cats)))
    assert spread[1.0] > spread[0.0]


def test_score_and_cold_start(server, offline):
    user, items = offline["users"][0], offline["items"][:3]
    r = server.post("/score", json={"user_id": user, "items": items + ["no-such-item"],
                                    "context": {"device": "mobile", "timestamp": TS}})
    assert r.status_code == 200, r.text
    out = r.json()
    probs, *_ = offline["run"](user, items)
    assert [it["item_id"] for it in out["items"]] == items + ["no-such-item"]
    assert [it["cold_start"] for it in out["items"]] == [False, False, False, True]
    for j in range(3):
        for task, p in probs.items():
            assert out["items"][j]["scores"][task] == pytest.approx(float(p[j]), rel=1e-5, abs=1e-6)
    cold = _rank(server, user_id="nobody-at-all", candidates=items)
    assert cold["user_cold_start"] is True and len(cold["items"]) == 3


GOOD = {"user_id": "u1", "candidates": ["i1", "i2"]}
BAD = [
    ("malformed json", b'{"user_id": "u1", "candidates": [', "json"),
    ("body not an object", b'[1, 2]', "object"),
    ("missing user_id", {"candidates": ["i1"]}, "user_id"),
    ("user_id not a string", {**GOOD, "user_id": 42}, "user_id"),
    ("candidates not a list", {**GOOD, "candidates": "i1"}, "candidates"),
    ("candidate not a string", {**GOOD, "candidates": ["i1", 7]}, "candidates"),
    ("empty candidates", {**GOOD, "candidates": []}, "candidates"),
    ("oversized candidates", {**GOOD, "candidates": [f"i{j}" for j in range(MAX_CANDIDATES + 1)]}, "candidates"),
    ("duplicate candidates", {**GOOD, "candidates": ["i1", "i2", "i1"]}, "candidates"),
    ("unknown objective", {**GOOD, "weights": {"click": 1, "revenue": 2}}, "weights"),
    ("negative weight", {**GOOD, "weights": {"click": -0.5}}, "weights"),
    ("weight not a number", {**GOOD, "weights": {"click": "high"}}, "weights"),
    ("all weights zero", {**GOOD, "weights": {"click": 0, "purchase": 0}}, "weights"),
    ("k zero", {**GOOD, "k": 0}, "k"),
    ("k above candidates", {**GOOD, "k": 3}, "k"),
    ("k not an int", {**GOOD, "k": "ten"}, "k"),
    ("diversity above 1", {**GOOD, "diversity": 1.5}, "diversity"),
    ("diversity negative", {**GOOD, "diversity": -0.1}, "diversity"),
    ("bad fusion", {**GOOD, "fusion": "max"}, "fusion"),
    ("bad timestamp", {**GOOD, "context": {"timestamp": "yesterday-ish"}}, "timestamp"),
    ("context not an object", {**GOOD, "context": 5}, "context"),
]


@pytest.mark.parametrize("body,field", [pytest.param(b, f, id=name) for name, b, f in BAD])
def test_bad_input_is_a_4xx_naming_the_field(server, body, field):
    kw = {"content": body, "headers": {"content-type": "application/json"}} if isinstance(body, bytes) \
        else {"json": body}
    r = server.post("/rank", **kw)
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    assert field in r.text.lower(), r.text


def test_score_bad_input(server):
    r = server.post("/score", json={"user_id": "u1", "items": ["a", "a"]})
    assert r.status_code == 400 and "items" in r.text


def test_health_readiness_and_metrics(server):
    assert server.get("/healthz").status_code == 200
    assert server.get("/readyz").status_code == 200
    server.post("/rank", json={"user_id": "u1", "candidates": ["i1"], "k": 2})
    metrics = server.get("/metrics").text
    assert 'mtlrec_requests_total{endpoint="rank",outcome="ok"}' in metrics
    assert 'outcome="bad_request"' in metrics


def test_admin_reload_swaps_to_the_new_production_model(server, world, offline):
    from flows import registry

    assert server.post("/admin/reload").status_code == 401
    assert server.post("/admin/reload", headers={"x-admin-token": "wrong"}).status_code == 401
    with _env(BENTOML_HOME=str(world["home"]), BENTOML_DO_NOT_TRACK="True"):
        new = registry.register(world["artifact"])
        registry.record_evaluation(new, {"fused/ndcg@10": 0.6})
        registry.set_production(new)
    assert new != world["tag"]
    r = server.post("/admin/reload", headers={"x-admin-token": TOKEN})
    assert r.status_code == 200, r.text
    assert r.json() == {"model_version": new, "previous": world["tag"], "changed": True}
    assert _rank(server, user_id=offline["users"][0], candidates=offline["items"][:5])["model_version"] == new


def test_reload_under_load_drops_nothing_and_never_mixes_models(server, world, offline, tmp_path):
    """Requests keep arriving while a different model is promoted and loaded.

    Every request is answered (no downtime) and each answer comes whole from the one model it names:
    a request in flight keeps the model it started with, so no list mixes two. The production
    pointer goes back and forth five times while four clients keep sending.
    """
    import threading

    from flows import registry
    from models.artifact import Scorer
    from models.config import load_config
    from models.train import train

    other = tmp_path / "other"  # a different seed, so the two models' scores differ
    train(load_config("mmoe", ["train.max_epochs=1", "seed=7",
                               "model.params={n_experts: 2, expert: [32], tower: [8]}"]), world["data"], other,
          progress=False)
    with _env(BENTOML_HOME=str(world["home"]), BENTOML_DO_NOT_TRACK="True"):
        old = registry.production()
        scorers = {old: Scorer.load(registry.artifact_path(old))}
        new = registry.register(other)
        registry.record_evaluation(new, {"fused/ndcg@10": 0.9})
        scorers[new] = Scorer.load(registry.artifact_path(new))
    user, items = offline["users"][5], offline["items"][:40]
    df = offline["run"](user, items)[2]
    expected = {tag: sc.predict(df)["click"] for tag, sc in scorers.items()}
    assert not np.allclose(expected[old], expected[new], atol=1e-4), "the two models must score differently"

    answers: list[list[dict]] = [[] for _ in range(4)]
    stop = threading.Event()

    def client(out: list[dict]) -> None:
        with httpx.Client(base_url=str(server.base_url), timeout=20) as c:
            while not stop.is_set():
                r = c.post("/rank", json={"user_id": user, "candidates": items,
                                          "context": {"device": "mobile", "timestamp": TS}})
                out.append({"status": r.status_code, **(r.json() if r.status_code == 200 else {"text": r.text})})

    threads = [threading.Thread(target=client, args=(a,)) for a in answers]
    for t in threads:
        t.start()
    try:
        time.sleep(0.5)
        for tag in (new, old, new, old, new):  # several swaps: a gap in any of them would show
            with _env(BENTOML_HOME=str(world["home"]), BENTOML_DO_NOT_TRACK="True"):
                registry.set_production(tag)
            r = server.post("/admin/reload", headers={"x-admin-token": TOKEN})
            assert r.status_code == 200 and r.json()["model_version"] == tag, r.text
            time.sleep(0.3)
    finally:
        stop.set()
        for t in threads:
            t.join(30)
    seen = set()
    for out in answers:
        assert out and all(a["status"] == 200 for a in out), [a for a in out if a["status"] != 200][:3]
        assert out[-1]["model_version"] == new
        for a in out:
            seen.add(a["model_version"])
            click = {it["item_id"]: it["scores"]["click"] for it in a["items"]}
            ref = expected[a["model_version"]]
            assert [click[i] for i in items] == pytest.approx([float(x) for x in ref], rel=1e-5, abs=1e-7)
    assert seen == {old, new}


def test_sighup_reloads(server, world, offline):
    from flows import registry

    with _env(BENTOML_HOME=str(world["home"]), BENTOML_DO_NOT_TRACK="True"):
        new = registry.register(world["artifact"])
        registry.record_evaluation(new, {"fused/ndcg@10": 0.7})
        registry.set_production(new)
    os.kill(server.server_pid, signal.SIGHUP)
    deadline = time.monotonic() + 15
    while _rank(server, user_id=offline["users"][0], candidates=offline["items"][:3])["model_version"] != new:
        assert time.monotonic() < deadline, "SIGHUP did not load the new production model"
        time.sleep(0.2)


@pytest.fixture(scope="module")
def two_workers(world):
    with _serve(world, MTLREC_WORKERS="2", MTLREC_RELOAD_POLL_S="0.5", MTLREC_ACCESS_LOG="0") as client:
        yield client


def test_keep_alive_connections_are_recycled_with_several_workers(two_workers, offline):
    """Every 16th request on one connection is answered with `Connection: close` (the default with
    several workers), so a pooled client reconnects and the kernel can hand it to an idler worker."""
    body = {"user_id": offline["users"][0], "candidates": offline["items"][:4]}
    with httpx.Client(base_url=str(two_workers.base_url), timeout=20) as c:
        answers = [c.post("/rank", json=body) for _ in range(40)]
    assert all(r.status_code == 200 for r in answers)
    closed = [i + 1 for i, r in enumerate(answers) if r.headers.get("connection", "").lower() == "close"]
    assert closed == [16, 32]


def test_every_worker_follows_a_promotion(world, offline, two_workers):
    """Two workers polling the production pointer: after a promotion every answer comes from the new model."""
    from flows import registry

    client = two_workers
    body = {"user_id": offline["users"][0], "candidates": offline["items"][:4]}
    fresh = {"connection": "close"}  # a new connection per request, so the kernel spreads them over the workers
    before = {client.post("/rank", json=body, headers=fresh).json()["model_version"] for _ in range(10)}
    with _env(BENTOML_HOME=str(world["home"]), BENTOML_DO_NOT_TRACK="True"):
        new = registry.register(world["artifact"])
        registry.record_evaluation(new, {"fused/ndcg@10": 0.8})
        registry.set_production(new)
    assert new not in before
    deadline = time.monotonic() + 20
    while True:
        seen = [client.post("/rank", json=body, headers=fresh).json()["model_version"] for _ in range(20)]
        if set(seen) == {new}:
            break
        assert time.monotonic() < deadline, f"workers still answer with {set(seen) - {new}}"
        time.sleep(0.3)


def test_store_down_is_503_then_recovers(world, offline, tmp_path):
    """Redis online store: unreachable at start (not ready, 503 naming the store), then back, materialised."""
    from flows.features.store import StoreSettings, materialize, open_store

    redis_server = shutil.which("redis-server")
    if redis_server is None:
        pytest.skip("redis-server is not installed")
    port = free_port()
    conn = f"127.0.0.1:{port},db=0"
    with _serve(world, ready=False, MTLREC_ONLINE_STORE="redis", MTLREC_REDIS=conn) as client:
        assert client.get("/readyz").status_code == 503
        body = {"user_id": offline["users"][0], "candidates": offline["items"][:5]}
        r = client.post("/rank", json=body)
        assert r.status_code == 503 and "online feature store" in r.json()["error"], r.text
        redis = subprocess.Popen([redis_server, "--port", str(port), "--save", "", "--appendonly", "no"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd=tmp_path)
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
                assert time.monotonic() < deadline
                time.sleep(0.1)
            materialize(open_store(StoreSettings.for_dataset(world["data"], online="redis", redis=conn)), full=True)
            deadline = time.monotonic() + 15
            while client.get("/readyz").status_code != 200:
                assert time.monotonic() < deadline, "not ready again after the store came back"
                time.sleep(0.25)
            r = client.post("/rank", json=body)
            assert r.status_code == 200, r.text
            assert not any(it["cold_start"] for it in r.json()["items"])
        finally:
            redis.terminate()
            redis.wait(10)


def test_non_json_body_is_415(server):
    r = server.post("/rank", content=b"user_id=u1", headers={"content-type": "multipart/form-data"})
    assert r.status_code == 415 and "content-type" in r.text


# ---- schema-driven fuzzing: schemathesis against the service's own OpenAPI document -----------------------------

def test_fuzz_no_5xx_and_responses_match_the_schema(server):
    """No generated input makes a 5xx; a 200 matches the documented response schema; a refusal is JSON.

    Refusals are not validated against BentoML's generated 400 schema: it declares ``detail`` a string
    while BentoML's own request validation answers with pydantic's list of errors.
    """
    import schemathesis
    from hypothesis import HealthCheck, given, settings
    from schemathesis.checks import response_schema_conformance

    schema = schemathesis.openapi.from_url(f"{server.base_url}/docs.json").include(path_regex="^/(rank|score)$")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert {op.path for op in operations} == {"/rank", "/score"}
    for op in operations:
        @given(case=op.as_strategy())
        @settings(max_examples=40, deadline=None, suppress_health_check=list(HealthCheck), database=None)
        def check(case):
            r = case.call(timeout=20)
            assert r.status_code < 500, r.text
            if r.status_code == 200:
                case.validate_response(r, checks=[response_schema_conformance])
            elif r.status_code in (400, 415):
                assert isinstance(r.json()["error"], str), r.text

        check()


def test_bento_builds(tmp_path):
    """`bentoml build` packs the service from bentofile.yaml (the model stays in the registry)."""
    env = {**os.environ, "BENTOML_HOME": str(tmp_path / "home"), "BENTOML_DO_NOT_TRACK": "True"}
    r = subprocess.run([BENTOML, "build", str(ROOT), "--output", "tag"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    bento = next((tmp_path / "home" / "bentos" / "mtlrec").glob("*/src"))
    assert (bento / "services" / "service.py").is_file() and (bento / "models" / "artifact.py").is_file()
    assert not (bento / "tests").exists() and not (bento / "data").exists()
