"""Latency and throughput of the ranking service over loopback HTTP, from a separate client process.

For each online store (SQLite, Redis), candidate count and concurrency it sends ``POST /rank`` with
random users and random candidate sets for at most ``--duration`` seconds or ``--requests`` requests,
whichever comes first, and prints p50/p99 latency, requests/s and errors. The server is either one
already running (``--url``) or started here, one per online store, from ``--data`` and the production
model in ``$BENTOML_HOME`` (``--quick`` makes a small dataset and model in a temporary directory first).
With ``--events off,on`` one server per impression-log setting is up at once, and each cell runs on each
in turn ``--repeats`` times, the order alternating; the medians are printed last, then how many
impressions the log wrote and dropped.

    .venv/bin/python benchmarks/serve_latency.py --quick
    .venv/bin/python benchmarks/serve_latency.py --data data/synth --stores sqlite,redis --duration 60
    .venv/bin/python benchmarks/serve_latency.py --url http://127.0.0.1:3000 --data data/synth
"""

from __future__ import annotations

import argparse
import asyncio
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
    from services import registry
    from flows.data.synth import SynthConfig, generate
    from feature_repo.store import build_all
    from models.config import load_config
    from models.train import train

    data, art = base / "data", base / "artifact"
    os.environ["BENTOML_HOME"] = str(base / "bentoml")
    generate(data, SynthConfig(n_users=2000, n_items=1500, n_interactions=60000, days=8, seed=0))
    build_all(data)
    train(load_config("mmoe", ["train.max_epochs=1"]), data, art, progress=False)
    tag = registry.register(art)
    registry.record_evaluation(tag, {"note": "benchmark model"})
    registry.set_production(tag)
    return data


def materialize_redis(data: Path, redis: str) -> None:
    from feature_repo.store import StoreSettings, materialize, open_store

    settings = StoreSettings.for_dataset(data, online="redis", redis=redis)
    materialize(open_store(settings), settings, full=True)


def serve(data: Path, store: str, redis: str, max_candidates: int, workers: int = 1, access_log: bool = True,
          events: str = "off"):
    """`mtlrec serve` on a free loopback port with this store and settings, until the block ends.

    ``events``: the impression log's URL (``MTLREC_EVENTS_URL``), or ``off``.
    """
    env = {"MTLREC_REDIS": redis, "MTLREC_MAX_CANDIDATES": str(max_candidates),
           "MTLREC_ACCESS_LOG": "1" if access_log else "0", "MTLREC_EVENTS_URL": events}
    return launcher.serving(env, data=data, online=store, workers=workers, timeout=90)


async def drive(url: str, users: list[str], items: list[str], n_candidates: int, concurrency: int,
                duration: float, max_requests: int, seed: int = 0) -> dict:
    """Closed loop: ``concurrency`` clients, each sending its next request when the last one answered.

    The client is aiohttp (a BentoML dependency) with pre-encoded bodies: on a two-core machine the
    load generator shares the CPU with the server, so it has to be cheap.
    """
    import aiohttp

    rng = random.Random(seed)
    bodies = [json.dumps({"user_id": rng.choice(users), "candidates": rng.sample(items, n_candidates), "k": 20,
                          "context": {"device": "mobile"}}).encode() for _ in range(256)]
    latencies: list[float] = []
    errors: dict[str, int] = {}
    sent = 0
    headers = {"content-type": "application/json"}
    connector = aiohttp.TCPConnector(limit=concurrency)
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
                        await r.read()
                        ok, key = r.status == 200, str(r.status)
                except (aiohttp.ClientError, asyncio.TimeoutError) as e:
                    ok, key = False, type(e).__name__
                latencies.append(time.perf_counter() - t)
                if not ok:
                    errors[key] = errors.get(key, 0) + 1
                i += concurrency

        await asyncio.gather(*(worker(w) for w in range(concurrency)))
        elapsed = time.perf_counter() - start
    return {"candidates": n_candidates, "concurrency": concurrency, "requests": len(latencies),
            **latency_ms(latencies),
            "rps": len(latencies) / elapsed if elapsed > 0 else 0.0, "errors": errors, "seconds": elapsed}


def _event_drops(url: str) -> float:
    """``mtlrec_event_drops_total`` summed over the server's workers, from ``/metrics``."""
    import httpx

    text = httpx.get(f"{url}/metrics", timeout=10).text
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
               if line.startswith("mtlrec_event_drops_total"))


def _logged(events_url: str) -> int:
    """Impressions in the event database (one per shown item), read back the way the export reads them."""
    from services.events import EventStore

    return len(EventStore(events_url).read()[0])


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
                        "temporary directory) or a database URL (started servers only)")
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
                     **asyncio.run(drive(url, users, items, n, c, a.duration, a.requests))}
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
            runs: dict[tuple, list[dict]] = {}
            for n in sizes:
                for c in conc:
                    for rep in range(a.repeats):
                        order = list(served.items())  # alternate who goes first: the second run of a pair
                        for e, server in (order if rep % 2 == 0 else order[::-1]):  # was seen 3-6% slower
                            r = {"store": store, "events": "off" if e == "off" else "on", "repeat": rep,
                                 **asyncio.run(drive(server.url, users, items, n, c, a.duration, a.requests,
                                                     seed=rep))}
                            rows.append(r)
                            runs.setdefault((n, c, r["events"]), []).append(r)
                            if not a.json:
                                print(f"{store:7s} events={r['events']:3s} candidates={n:5d} concurrency={c:3d}  "
                                      f"p50={r['p50_ms']:7.1f} ms  p99={r['p99_ms']:7.1f} ms  {r['rps']:7.1f} req/s  "
                                      f"errors={sum(r['errors'].values())}", flush=True)
            drops = {e: _event_drops(server.url) for e, server in served.items()}
        if not a.json:
            print(f"# medians over {a.repeats} interleaved run(s)")
            for (n, c, e), rs in runs.items():
                print(f"{store:7s} events={e:3s} candidates={n:5d} concurrency={c:3d}  "
                      f"p50={median(r['p50_ms'] for r in rs):7.1f} ms  p99={median(r['p99_ms'] for r in rs):7.1f} ms  "
                      f"{median(r['rps'] for r in rs):7.1f} req/s  errors={sum(sum(r['errors'].values()) for r in rs)}",
                      flush=True)
        return drops

    try:
        if a.url:
            run_all(a.url, "server")
        else:
            from services import registry

            if registry.production() is None:
                p.error(f"no production model in the registry at {registry.home()} (set BENTOML_HOME, or --quick)")
            for store in a.stores.split(","):
                if store == "redis":
                    try:
                        materialize_redis(a.data, a.redis)
                    except Exception as e:  # noqa: BLE001
                        print(f"redis: skipped ({type(e).__name__}: {e})", file=sys.stderr)
                        continue
                settings = a.events.split(",")
                urls = {e: (f"sqlite:///{tempfile.mkdtemp(prefix='serve-bench-events-')}/events.db"
                            if e == "on" else e) for e in settings}
                if len(settings) == 1:
                    e = settings[0]
                    print(f"# {store}: {a.workers} worker(s), access log {'on' if a.access_log else 'off'}, "
                          f"impression log {urls[e]}, {os.cpu_count()} CPU(s)", flush=True)
                    with serve(a.data, store, a.redis, max(sizes + [1000]), a.workers, a.access_log,
                               urls[e]) as served:
                        run_all(served.url, store, "off" if e == "off" else "on")
                        drops = {e: _event_drops(served.url)}
                else:
                    drops = interleaved(store, urls)
                for e, dropped in drops.items():
                    if e != "off":  # the servers have stopped, so their writers have flushed
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
