"""Bring your own behaviours: a log whose tasks the code never names, from validation to a served ranking.

The short-video generator's log, renamed the way another team's log might
look: ``watch``, ``share`` and ``save`` (binary, in parallel, with gains) and
``seconds_watched`` (a regression), declared in ``dataset.yaml``. The whole
pipeline runs on it through ``mtlrec pipeline`` against a real Prefect
server, the gate promotes, and ``mtlrec serve`` ranks by those objectives.
No code knows these names: everything comes from the declaration.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import httpx
import pandas as pd
import pytest

from flows.dev import prefect_server
from flows.data.short_video import ShortVideoConfig, generate
from models.contract import tables as contract
from flows.dev import launcher

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
RENAME = {"click": "watch", "like": "share", "follow": "save", "watch_time": "seconds_watched"}
TASKS = [{"name": "watch", "type": "binary"},
         {"name": "share", "type": "binary", "gain": 2},
         {"name": "save", "type": "binary", "gain": 3},
         {"name": "seconds_watched", "type": "regression", "transform": "log1p", "min": 0}]
SMALL_MODEL = "model.params={n_experts: 4, expert: [64, 32], tower: [16]}"


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """The renamed dataset, a real Prefect server, a private model store; the pipeline run once."""
    base = tmp_path_factory.mktemp("declared")
    data = base / "data"
    generate(data, ShortVideoConfig(n_users=300, n_items=150, n_interactions=20_000, days=10, seed=11))
    inter = contract.read_table(data, "interactions").drop(columns=["long_view"]).rename(columns=RENAME)
    contract.write_table(inter, data, "interactions")
    manifest = contract.Manifest.load(data)
    manifest.tasks, manifest.primary = TASKS, "watch"
    manifest.save(data)

    server = prefect_server.start(base / "prefect", scheduler=False)
    env = server.client_env({**os.environ, "BENTOML_HOME": str(base / "bentoml"), "BENTOML_DO_NOT_TRACK": "True",
                             "PREFECT_HOME": str(base / "prefect"), "FEAST_USAGE": "False",
                             "GX_ANALYTICS_ENABLED": "False"})
    try:
        res = subprocess.run([sys.executable, "-m", "flows.cli", "pipeline", "--data", str(data), "--set", SMALL_MODEL,
                              "--report-dir", str(base / "reports"), "--artifacts", str(base / "artifacts")],
                             cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    finally:
        server.stop()
    return {"data": data, "env": env, "run": res, "base": base}


def _summary(world) -> dict:
    res = world["run"]
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-5000:]
    return json.loads(res.stdout[res.stdout.index("{"):])


def test_the_pipeline_runs_on_the_declaration_and_promotes(world):
    summary = _summary(world)
    assert summary["promoted"] and summary["production"] == summary["tag"], summary
    assert summary["decision"]["reference"] == "popularity" and summary["decision"]["delta"] > 0
    table = pd.read_parquet(world["data"] / "_features" / "training.parquet")
    # The aggregates follow the declared binary tasks, and there is no category without categories.
    for task in ("watch", "share", "save"):
        assert {f"user_{task}_count_7d", f"item_{task}_rate_30d"} <= set(table.columns)
    assert "user_top_category_30d" not in table and "author" in table and "duration" in table
    meta = json.loads(next((world["base"] / "artifacts").glob("*/model.json")).read_text())
    assert [t["name"] for t in meta["tasks"]] == ["watch", "share", "save", "seconds_watched"]
    assert meta["primary"] == "watch" and meta["fusion"]["relevance"] == "1×watch + 2×share + 3×save"
    report = json.loads(next((world["base"] / "reports").glob("run-*.json")).read_text())
    assert report["tag"] == summary["tag"]


def test_the_service_ranks_by_the_declared_objectives(world):
    _summary(world)
    env = {k: v for k, v in world["env"].items() if k.startswith(("BENTOML", "FEAST", "PREFECT_HOME"))}
    users = contract.read_table(world["data"], "users")["user_id"].tolist()
    items = contract.read_table(world["data"], "items")["item_id"].tolist()[:40]
    with launcher.serving({**env, "MTLREC_ONLINE_STORE": "sqlite"}, data=world["data"], timeout=120) as served:
        with httpx.Client(base_url=served.url, timeout=30) as client:
            r = client.post("/rank", json={"user_id": users[0], "candidates": items, "k": 10})
            assert r.status_code == 200, r.text
            body = r.json()
            assert set(body["weights"]) == {"watch", "share", "save"}  # defaults: the declared gains
            assert body["weights"] == {"watch": 1.0, "share": 2.0, "save": 3.0}
            assert len(body["items"]) == 10
            assert all(set(it["scores"]) == {"watch", "share", "save"} for it in body["items"])
            # Weights by the declared names re-rank; a name the model does not have is a 400 naming the field.
            by_save = client.post("/rank", json={"user_id": users[0], "candidates": items, "weights": {"save": 1}})
            assert by_save.status_code == 200
            order = [it["item_id"] for it in by_save.json()["items"]]
            saves = {it["item_id"]: it["scores"]["save"] for it in by_save.json()["items"]}
            assert order == sorted(order, key=lambda i: -saves[i])
            bad = client.post("/rank", json={"user_id": users[0], "candidates": items, "weights": {"click": 1}})
            assert bad.status_code == 400 and "weights" in bad.text and "watch" in bad.text
            raw = client.post("/score", json={"user_id": users[1], "items": items[:3]})
            assert raw.status_code == 200
            assert set(raw.json()["items"][0]["scores"]) == {"watch", "share", "save", "seconds_watched"}
            assert raw.json()["items"][0]["scores"]["seconds_watched"] >= 0
