"""Latency and throughput of the ranking service over loopback HTTP, from a separate client process.

For each online store (SQLite, Redis), candidate count and concurrency it sends ``POST /rank`` with
random users and random candidate sets for at most ``--duration`` seconds or ``--requests`` requests,
whichever comes first, and prints p50/p99 latency, requests/s and errors. The server is either one
already running (``--url``) or started here, one per online store, from ``--data`` and the production
model in ``$BENTOML_HOME`` (``--quick`` makes a small dataset and model in a temporary directory first).
With ``--events off,on`` one server per impression-log setting is up at once, and each cell runs on each
in turn ``--repeats`` times, the order alternating; the medians are printed last, then how many
impressions the log wrote and dropped. Besides ``off``, ``on`` (a healthy SQLite file) and a database URL,
two faults of the event database can be settings: ``locked`` (an SQLite file whose write lock this script
holds from another connection for the whole run) and ``unreachable`` (a PostgreSQL port nothing listens on).
``--feedback-clients N`` posts feedback on earlier answers from N more clients while each cell runs.

    .venv/bin/python benchmarks/serve_latency.py --quick
    .venv/bin/python benchmarks/serve_latency.py --data data/synth --stores sqlite,redis --duration 60
    .venv/bin/python benchmarks/serve_latency.py --url http://127.0.0.1:3000 --data data/synth
    .venv/bin/python benchmarks/serve_latency.py --quick --stores sqlite --candidates 100 --concurrency 32 \
        --events on,locked,unreachable,off --feedback-clients 4 --no-access-log
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def _metric(url: str, name: str) -> float:
    """A counter summed over the server's workers, from ``/metrics``."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def _event_drops(url: str) -> float:
    return _metric(url, "mtlrec_event_drops_total")


def _writer_cpu(url: str) -> float:
    """CPU seconds the impression log's writer threads have spent, over the server's workers."""
    return _metric(url, "mtlrec_event_writer_cpu_seconds_total")


def _logged(events_url: str) -> int:
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


def _label(e: str) -> str:
    return e if e in ("off", "on", "locked", "unreachable") else "url"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running server (its online store is whatever it was started with)")
    p.add_argument("--data", type=Path, help="dataset directory (users and items for requests; the server's store)")
    p.add_argument("--quick", action="store_true", help="make a small dataset and model in a temporary directory")
    p.add_argument("--stores", default="sqlite,redis")
    p.add_argument("--redis", default=os.environ.get("MTLREC_REDIS", "127.0.0.1:6379,db=14"))
    p.add_argument("--candidates", default="100,500,1000")
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per cell, at most")
    p.add_argument("--requests", type=int, default=5000, help="requests per cell, at most")
    p.add_argument("--repeats", type=int, default=4,
                   help="with more than one --events setting: runs of each cell on each server, interleaved")
    p.add_argument("--workers", type=int, default=int(os.environ.get("MTLREC_WORKERS", "1")),
                   help="server worker processes (started servers only)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="start the server without per-request access logging")
    p.add_argument("--events", default="off",
                   help="impression log settings to compare, comma-separated: off, on (an SQLite file in a "
                        "temporary directory), locked (one whose write lock is held throughout), unreachable, or "
                        "a database URL (started servers only)")
    p.add_argument("--feedback-clients", type=int, default=0,
                   help="clients posting feedback on answers while each cell runs (not timed)")
    p.add_argument("--feedback-share", type=float, default=0.5,
                   help="with --feedback-clients: the share of answers that get a feedback post")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)

    tmp = None
    if a.quick:
        tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
        a.data = quick_world(Path(tmp.name))
    if a.data is None:
        p.error("--data (or --quick) is needed: requests draw users and items from it")
    users = pd.read_parquet(a.data / "users.parquet")["user_id"].astype(str).tolist()
    items = pd.read_parquet(a.data / "items.parquet")["item_id"].astype(str).tolist()
    sizes = [n for n in map(int, a.candidates.split(",")) if n <= len(items)]
    conc = list(map(int, a.concurrency.split(",")))
    rows = []

    def run_all(url: str, store: str, events: str = "-") -> None:
        for n in sizes:
            for c in conc:
                r = {"store": store, "events": events,
                     **asyncio.run(drive(url, users, items, n, c, a.duration, a.requests,
                                         feedback_clients=a.feedback_clients, feedback_share=a.feedback_share))}
                rows.append(r)
                if not a.json:
                    print(f"{store:7s} events={events:3s} candidates={n:5d} concurrency={c:3d}  "
                          f"p50={r['p50_ms']:7.1f} ms  "
                          f"p99={r['p99_ms']:7.1f} ms  {r['rps']:7.1f} req/s  n={r['requests']:6d}  "
                          f"errors={sum(r['errors'].values())} {r['errors'] or ''}", flush=True)

    def interleaved(store: str, urls: dict[str, str]) -> dict[str, float]:
        """One server per impression-log setting, all up at once; each cell runs on each in turn, ``--repeats``
        times, the order alternating, so a drift of the machine hits every setting alike. Prints each run, then
        the medians."""
        from contextlib import ExitStack
        from statistics import median

        print(f"# {store}: {a.workers} worker(s) per server, access log {'on' if a.access_log else 'off'}, "
              f"impression log {' / '.join(urls.values())}, interleaved x{a.repeats}, {os.cpu_count()} CPU(s)",
              flush=True)
        with ExitStack() as stack:
            served = {e: stack.enter_context(serve(a.data, store, a.redis, max(sizes + [1000]), a.workers,
                                                   a.access_log, url)) for e, url in urls.items()}
            for e, url in urls.items():
                if e == "locked":
                    stack.enter_context(held_lock(url))
            runs: dict[tuple, list[dict]] = {}
            for n in sizes:
                for c in conc:
                    for rep in range(a.repeats):
                        order = list(served.items())  # alternate who goes first: the second run of a pair
                        for e, server in (order if rep % 2 == 0 else order[::-1]):  # was seen 3-6% slower
                            cpu = _writer_cpu(server.url)
                            r = {"store": store, "events": _label(e), "repeat": rep,
                                 **asyncio.run(drive(server.url, users, items, n, c, a.duration, a.requests,
                                                     seed=rep, feedback_clients=a.feedback_clients,
                                                     feedback_share=a.feedback_share))}
                            r["writer_ms"] = 1000 * (_writer_cpu(server.url) - cpu) / max(r["requests"], 1)
                            rows.append(r)
                            runs.setdefault((n, c, r["events"]), []).append(r)
                            if not a.json:
                                print(f"{store:7s} events={r['events']:11s} candidates={n:5d} concurrency={c:3d}  "
                                      f"p50={r['p50_ms']:7.1f} ms  p99={r['p99_ms']:7.1f} ms  {r['rps']:7.1f} req/s  "
                                      f"errors={sum(r['errors'].values())}  feedback={r['feedback'] or '-'}",
                                      flush=True)
            drops = {e: _event_drops(server.url) for e, server in served.items()}
        if not a.json:
            print(f"# medians over {a.repeats} interleaved run(s); p99 against the healthy log (on), throughput "
                  "against the log off")
            med = {key: {m: median(r[m] for r in rs) for m in ("p50_ms", "p99_ms", "rps", "writer_ms")}
                   for key, rs in runs.items()}
            for (n, c, e), m in med.items():
                healthy, off = med.get((n, c, "on")), med.get((n, c, "off"))
                versus = (f"  p99 {m['p99_ms'] - healthy['p99_ms']:+6.1f} ms" if healthy and e != "on" else "") + \
                         (f"  throughput {m['rps'] / off['rps'] - 1:+6.1%}" if off and e != "off" else "")
                print(f"{store:7s} events={e:11s} candidates={n:5d} concurrency={c:3d}  p50={m['p50_ms']:7.1f} ms  "
                      f"p99={m['p99_ms']:7.1f} ms  {m['rps']:7.1f} req/s  writer {m['writer_ms']:.3f} ms/request  "
                      f"errors={sum(sum(r['errors'].values()) for r in runs[(n, c, e)])}{versus}", flush=True)
        return drops

    try:
        if a.url:
            run_all(a.url, "server")
        else:
            from services import production_pointer, registry_io

            if production_pointer.production() is None:
                p.error(f"no production model in the registry at {registry_io.home()} (set BENTOML_HOME, or --quick)")
            for store in a.stores.split(","):
                if store == "redis":
                    try:
                        materialize_redis(a.data, a.redis)
                    except Exception as e:  # noqa: BLE001
                        print(f"redis: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                        continue
                settings = a.events.split(",")
                urls = event_urls(settings)
                if len(settings) == 1:
                    e = settings[0]
                    print(f"# {store}: {a.workers} worker(s), access log {'on' if a.access_log else 'off'}, "
                          f"impression log {urls[e]}, {os.cpu_count()} CPU(s)", flush=True)
                    with serve(a.data, store, a.redis, max(sizes + [1000]), a.workers, a.access_log,
                               urls[e]) as served, (held_lock(urls[e]) if e == "locked" else contextlib.nullcontext()):
                        run_all(served.url, store, _label(e))
                        drops = {e: _event_drops(served.url)}
                else:
                    drops = interleaved(store, urls)
                for e, dropped in drops.items():
                    if e not in ("off", "unreachable"):  # the servers have stopped, so their writers have flushed
                        print(f"# impression log: {_logged(urls[e])} impressions written, {dropped:.0f} dropped",
                              flush=True)
    finally:
        if tmp is not None:
            tmp.cleanup()
        if "redis" in a.stores:  # leave the shared Redis as it was found: drop the benchmark's database
            try:
                import redis

                host, _, rest = a.redis.partition(":")
                port, *params = rest.split(",")
                db = int(dict(x.split("=", 1) for x in params if "=" in x).get("db", 0))
                redis.Redis(host=host, port=int(port), db=db).flushdb()
            except Exception as e:  # noqa: BLE001 - cleanup is best effort
                print(f"redis cleanup failed: {e}", file=sys.stderr)
    if a.json:
        print(json.dumps(rows, indent=2))
    return 1 if any(r["errors"] for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
