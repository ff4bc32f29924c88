"""The ranking service as the benchmarks run it: a small world to serve, servers on loopback, a load client.

``quick_world`` makes a dataset, its feature store and a promoted model; ``serve`` starts ``mtlrec serve`` on
it; ``drive`` sends closed-loop ``POST /rank`` traffic and times it. ``serve_latency.py`` and
``rank_profile.py`` share them, and ``serve_latency.py --compare REF`` calls a git ref's own ``quick_world`` and
``serve`` (``benchmarks/ref_server.py``), so both keep their names and arguments.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import tempfile
import time
from pathlib import Path

from benchmarks.measure import latency_ms
from flows.dev import launcher


def quick_world(base: Path) -> Path:
    """A small dataset, its feature store and a promoted model under ``base`` (sets BENTOML_HOME)."""
    from services import model_store, production_pointer
    from flows.data.synth import SynthConfig, generate
    from feature_repo.build import build_all
    from models.config import load_config
    from models.training.train import train

    data, art = base / "data", base / "artifact"
    os.environ["BENTOML_HOME"] = str(base / "bentoml")
    generate(data, SynthConfig(n_users=2000, n_items=1500, n_interactions=60000, days=8, seed=0))
    build_all(data)
    train(load_config("mmoe", ["train.max_epochs=1"]), data, art, progress=False)
    tag = model_store.register(art)
    model_store.record_evaluation(tag, {"note": "benchmark model"})
    production_pointer.set_production(tag)
    return data


def materialize_redis(data: Path, redis: str) -> None:
    from feature_repo.materialize import materialize
    from feature_repo.store import StoreSettings, open_store

    settings = StoreSettings.for_dataset(data, online="redis", redis=redis)
    materialize(open_store(settings), settings, full=True)


def serve(data: Path, store: str, redis: str, max_candidates: int, workers: int = 1, access_log: bool = True,
          events: str = "off"):
    """`mtlrec serve` on a free loopback port with this store and settings, until the block ends.

    ``events``: the impression log's URL (``MTLREC_EVENTS_URL``), or ``off``.
    """
    env = {"MTLREC_REDIS": redis, "MTLREC_MAX_CANDIDATES": str(max_candidates),
           "MTLREC_ACCESS_LOG": "1" if access_log else "0", "MTLREC_EVENTS_URL": events,
           "BENTOML_HOME": str(private_home())}
    return launcher.serving(env, data=data, online=store, workers=workers, timeout=90)


def private_home() -> Path:
    """A BentoML home of the server's own that shares the model store and the registry of ``$BENTOML_HOME``.

    BentoML keeps its workers' Prometheus files in ``$BENTOML_HOME/prometheus_multiproc_dir`` and clears it as
    a server starts: servers up at once on one home would wipe and mix each other's ``/metrics``.
    """
    from services import registry_io

    shared = registry_io.home()
    own = Path(tempfile.mkdtemp(prefix="serve-bench-home-"))
    for part in ("models", "mtlrec"):
        (shared / part).mkdir(parents=True, exist_ok=True)
        (own / part).symlink_to(shared / part)
    return own


async def drive(url: str, users: list[str], items: list[str], n_candidates: int, concurrency: int,
                duration: float, max_requests: int, seed: int = 0, feedback_clients: int = 0,
                feedback_share: float = 0.5) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last one answered.

    The client is aiohttp (a BentoML dependency) with pre-encoded bodies: on a two-core machine the
    load generator shares the CPU with the server, so it has to be cheap. ``feedback_clients`` more
    clients post feedback (a click on the first item) on ``feedback_share`` of the answers, as they come:
    paced by the rankings, as users' feedback is, not a flood; their answers are counted by status, not
    timed.
    """
    import aiohttp

    rng = random.Random(seed)
    bodies = [json.dumps({"user_id": rng.choice(users), "candidates": rng.sample(items, n_candidates), "k": 20,
                          "context": {"device": "mobile"}}).encode() for _ in range(256)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    feedback: dict[str, int] = {}
    answered: asyncio.Queue = asyncio.Queue()
    sent = 0
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency + feedback_clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=30)) as client:
        for b in bodies[:min(5, concurrency * 2)]:  # warm the feature cache and the model
            async with client.post("/rank", data=b) as r:
                await r.read()
        start = time.perf_counter()
        stop = start + duration

        async def worker(w: int) -> None:
            nonlocal sent
            i = w
            while time.perf_counter() < stop and sent < max_requests:
                sent += 1
                t = time.perf_counter()
                try:
                    async with client.post("/rank", data=bodies[i % len(bodies)]) as r:
                        body = await r.read()
                        ok, key = r.status == 200, str(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    ok, key = False, type(e).__name__
                latencies.append(time.perf_counter() - t)
                if not ok:
                    errors[key] = errors.get(key, 0) + 1
                elif feedback_clients and rng.random() < feedback_share:
                    answered.put_nowait(json.loads(body))
                i += concurrency

        async def feedback_worker() -> None:
            while time.perf_counter() < stop:
                try:
                    a = await asyncio.wait_for(answered.get(), timeout=max(stop - time.perf_counter(), 0.01))
                except asyncio.TimeoutError:
                    break
                body = {"request_id": a["request_id"], "item_id": a["items"][0]["item_id"], "events": {"click": 1},
                        "token": a.get("feedback_token")}
                try:
                    async with client.post("/feedback", json=body) as r:
                        await r.read()
                        key = str(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    key = type(e).__name__
                feedback[key] = feedback.get(key, 0) + 1

        await asyncio.gather(*(worker(w) for w in range(concurrency)),
                             *(feedback_worker() for _ in range(feedback_clients)))
        elapsed = time.perf_counter() - start
    return {"candidates": n_candidates, "concurrency": concurrency, "requests": len(latencies),
            **latency_ms(latencies),
            "rps": len(latencies) / elapsed if elapsed > 0 else 0.0, "errors": errors, "seconds": elapsed,
            "feedback": feedback}


def metric(url: str, name: str) -> float:
    """A counter summed over the server's workers, from ``/metrics``."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def event_drops(url: str) -> float:
    return metric(url, "mtlrec_event_drops_total")


def writer_cpu(url: str) -> float:
    """CPU seconds the impression log's writer threads have spent, over the server's workers."""
    return metric(url, "mtlrec_event_writer_cpu_seconds_total")


def logged(events_url: str) -> int:
    """Impressions in the event database (one per shown item), read back the way the export reads them."""
    from services.event_store import EventStore

    return len(EventStore(events_url).read()[0])


UNREACHABLE = "postgresql://postgres@127.0.0.1:1/none"


def event_urls(settings: list[str]) -> dict[str, str]:
    """Each ``--events`` setting's database URL: ``on`` and ``locked`` a fresh SQLite file, ``unreachable`` a port
    nothing listens on, ``off`` off, anything else the URL itself."""
    def url(e: str) -> str:
        if e in ("on", "locked"):
            return f"sqlite:///{tempfile.mkdtemp(prefix='serve-bench-events-')}/events.db"
        return UNREACHABLE if e == "unreachable" else e

    return {e: url(e) for e in settings}


@contextlib.contextmanager
def held_lock(url: str):
    """SQLite's write lock on ``url``'s file, held by another connection until the block ends (the server's
    writer has created its tables by then: it does so as it starts)."""
    import sqlite3

    conn = sqlite3.connect(url.removeprefix("sqlite:///"), timeout=30)
    conn.execute("BEGIN EXCLUSIVE")
    try:
        yield
    finally:
        conn.rollback()
        conn.close()


def forward_limit(data: Path, n_candidates: int, processes: int, seconds: float = 5.0) -> float:
    """Requests/s the production model's forward pass alone allows: ``processes`` processes (one per server
    worker, one torch thread each, as the service runs) score one encoded ``n_candidates`` request over and
    over for the same ``seconds``. The ceiling of a server with that many workers on this machine."""
    import multiprocessing as mp

    ctx = mp.get_context("spawn")
    start_at = time.time() + 30  # every child loads first, then all count in the same window
    with ctx.Pool(processes) as pool:
        counts = pool.starmap(_forwards, [(str(data), n_candidates, seed, start_at, seconds)
                                          for seed in range(processes)])
    return sum(counts) / seconds


def _forwards(data: str, n_candidates: int, seed: int, start_at: float, seconds: float) -> int:
    import pandas as pd
    import torch

    from feature_repo.online import FeatureReader
    from feature_repo.store import StoreSettings, open_store
    from models.scoring.artifact import Scorer
    from services import production_pointer, ranking

    torch.set_num_threads(1)
    scorer = Scorer.load(production_pointer.production_artifact())
    reader = FeatureReader(open_store(StoreSettings.for_dataset(data)))
    rng = random.Random(seed)
    users = pd.read_parquet(Path(data) / "users.parquet")["user_id"].astype(str).tolist()
    items = pd.read_parquet(Path(data) / "items.parquet")["item_id"].astype(str).tolist()
    cols, _, _ = ranking.model_inputs(reader, rng.choice(users), rng.sample(items, n_candidates), time.time(),
                                      {"device": "mobile"})
    cat, num = scorer.encode(cols)
    scorer.score_codes(cat, num)
    time.sleep(max(start_at - time.time(), 0.0))
    stop, n = time.time() + seconds, 0
    while time.time() < stop:
        scorer.score_codes(cat, num)
        n += 1
    return n
