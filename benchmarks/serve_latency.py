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

``--compare REF[,REF]`` (with ``--quick``) serves git refs' code beside today's in the same run: each ref's
checkout (``git archive``) builds its own small world and serves it (``benchmarks/ref_server.py``), its
server joins the interleaved runs, and the medians end with every other server against each ref, cell by
cell. The run closes with the forward pass's own ceiling at each candidate count (``forward_limit``:
that many processes as the server has workers, the model alone) and how far each setting is below it.

    .venv/bin/python benchmarks/serve_latency.py --quick
    .venv/bin/python benchmarks/serve_latency.py --data data/synth --stores sqlite,redis --duration 60
    .venv/bin/python benchmarks/serve_latency.py --url http://127.0.0.1:3000 --data data/synth
    .venv/bin/python benchmarks/serve_latency.py --quick --stores sqlite --candidates 100 --concurrency 32 \
        --events on,locked,unreachable,off --feedback-clients 4 --no-access-log
    .venv/bin/python benchmarks/serve_latency.py --quick --stores sqlite --candidates 100,500 \
        --concurrency 1,32 --duration 15 --workers 2 --no-access-log --events off,on --compare 2e6c7c3,4b2472a
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.serving import (drive, event_drops, event_urls, forward_limit, held_lock, logged,
                                materialize_redis, quick_world, serve, writer_cpu)

ROOT = Path(__file__).resolve().parents[1]


@dataclass
class Server:
    url: str
    users: list[str]
    items: list[str]
    events: str = "-"  # the impression log setting (off, on, ...), or "-" for a server this run did not set


def ids(data: Path) -> tuple[list[str], list[str]]:
    """The users and items requests draw from."""
    return (pd.read_parquet(data / "users.parquet")["user_id"].astype(str).tolist(),
            pd.read_parquet(data / "items.parquet")["item_id"].astype(str).tolist())


@contextlib.contextmanager
def ref_server(ref: str, store: str, redis: str, max_candidates: int, workers: int, access_log: bool):
    """The git ref's own service on its own small world (``benchmarks/ref_server.py``), until the block ends."""
    base = Path(tempfile.mkdtemp(prefix=f"serve-bench-{ref[:12]}-"))
    checkout = base / "checkout"
    checkout.mkdir()
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], capture_output=True, check=True).stdout
    subprocess.run(["tar", "-x", "-C", str(checkout)], input=archive, check=True)
    env = {**os.environ, "PYTHONPATH": str(checkout), "BENTOML_HOME": str(base / "world" / "bentoml")}
    proc = subprocess.Popen([sys.executable, str(ROOT / "benchmarks" / "ref_server.py"), str(base / "world"), store,
                             redis, str(max_candidates), str(workers), "1" if access_log else "0"],
                            cwd=checkout, env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        line = ""
        while not line.startswith("ref-server-ready "):  # benchmarks/ref_server.py's READY
            line = proc.stdout.readline()
            if not line:
                raise RuntimeError(f"the service at {ref} did not start (exit code {proc.wait()})")
        started = json.loads(line.split(" ", 1)[1])
        yield Server(started["url"], *ids(Path(started["data"])), events=ref)
    finally:
        proc.stdin.close()
        proc.wait(60)
        shutil.rmtree(base, ignore_errors=True)



def _label(e: str) -> str:
    return e if e in ("off", "on", "locked", "unreachable") else "url"


def _line(store: str, label: str, n: int, c: int, m: dict, extra: str = "") -> str:
    return (f"{store:7s} {label:11s} candidates={n:5d} concurrency={c:3d}  p50={m['p50_ms']:7.1f} ms  "
            f"p99={m['p99_ms']:7.1f} ms  {m['rps']:7.1f} req/s{extra}")


def _change(m: dict, ref: dict) -> str:
    return (f"p50 {m['p50_ms'] / ref['p50_ms'] - 1:+6.1%}  p99 {m['p99_ms'] / ref['p99_ms'] - 1:+6.1%}  "
            f"throughput {m['rps'] / ref['rps'] - 1:+6.1%}")


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
                   help="with several servers: runs of each cell on each server, interleaved")
    p.add_argument("--workers", type=int, default=int(os.environ.get("MTLREC_WORKERS", "1")),
                   help="server worker processes (started servers only)")
    p.add_argument("--no-access-log", dest="access_log", action="store_false",
                   help="start the server without per-request access logging")
    p.add_argument("--events", default="off",
                   help="impression log settings to compare, comma-separated: off, on (an SQLite file in a "
                        "temporary directory), locked (one whose write lock is held throughout), unreachable, or "
                        "a database URL (started servers only)")
    p.add_argument("--compare", metavar="REF[,REF]",
                   help="also serve these git refs' code, each on its own small world (with --quick, SQLite only), "
                        "and print each cell's change against each")
    p.add_argument("--feedback-clients", type=int, default=0,
                   help="clients posting feedback on answers while each cell runs (not timed)")
    p.add_argument("--feedback-share", type=float, default=0.5,
                   help="with --feedback-clients: the share of answers that get a feedback post")
    p.add_argument("--json", action="store_true")
    a = p.parse_args(argv)
    refs = a.compare.split(",") if a.compare else []
    if refs and (not a.quick or a.url or a.stores != "sqlite"):
        p.error("--compare needs --quick and --stores sqlite: each side builds and serves its own small world")

    tmp = None
    if a.quick:
        tmp = tempfile.TemporaryDirectory(prefix="serve-bench-")
        a.data = quick_world(Path(tmp.name))
    if a.data is None:
        p.error("--data (or --quick) is needed: requests draw users and items from it")
    users, items = ids(a.data)
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
                    print(_line(store, f"events={events}", n, c, r,
                                f"  n={r['requests']:6d}  errors={sum(r['errors'].values())} {r['errors'] or ''}"),
                          flush=True)

    def interleaved(store: str, urls: dict[str, str]) -> dict[str, float]:
        """One server per impression-log setting (and the ref's), all up at once; each cell runs on each in turn,
        ``--repeats`` times, the order alternating, so a drift of the machine hits every server alike. Prints
        each run, then the medians."""
        from contextlib import ExitStack
        from statistics import median

        from models.scoring.artifact import code_version

        print(f"# {store}: {a.workers} worker(s) per server, access log {'on' if a.access_log else 'off'}, "
              f"impression log {' / '.join(urls.values())}{f', against {a.compare}' if refs else ''}, "
              f"interleaved x{a.repeats}, {os.cpu_count()} CPU(s); today is {code_version()}", flush=True)
        with ExitStack() as stack:
            served = {}
            for e, url in urls.items():
                s = stack.enter_context(serve(a.data, store, a.redis, max(sizes + [1000]), a.workers, a.access_log,
                                              url))
                served[_label(e)] = Server(s.url, users, items, events=e)
                if e == "locked":
                    stack.enter_context(held_lock(url))
            for ref in refs:
                served[ref] = stack.enter_context(ref_server(ref, store, a.redis, max(sizes + [1000]), a.workers,
                                                             a.access_log))
            runs: dict[tuple, list[dict]] = {}
            for n in sizes:
                for c in conc:
                    for rep in range(a.repeats):
                        order = list(served.items())  # alternate who goes first: the second run of a pair
                        for label, server in (order if rep % 2 == 0 else order[::-1]):  # was seen 3-6% slower
                            cpu = writer_cpu(server.url) if label not in refs else 0.0
                            r = {"store": store, "events": label, "repeat": rep,
                                 **asyncio.run(drive(server.url, server.users, server.items, n, c, a.duration,
                                                     a.requests, seed=rep, feedback_clients=a.feedback_clients,
                                                     feedback_share=a.feedback_share))}
                            if label not in refs:
                                r["writer_ms"] = 1000 * (writer_cpu(server.url) - cpu) / max(r["requests"], 1)
                            rows.append(r)
                            runs.setdefault((n, c, label), []).append(r)
                            if not a.json:
                                print(_line(store, label, n, c, r, f"  errors={sum(r['errors'].values())}  "
                                                                   f"feedback={r['feedback'] or '-'}"), flush=True)
            drops = {e: event_drops(served[_label(e)].url) for e in urls}
        limits = {n: forward_limit(a.data, n, a.workers) for n in sizes}
        if not a.json:
            print(f"# medians over {a.repeats} interleaved run(s); p99 against the healthy log (on), throughput "
                  "against the log off")
            med = {key: {m: median(r.get(m, 0.0) for r in rs) for m in ("p50_ms", "p99_ms", "rps", "writer_ms")}
                   for key, rs in runs.items()}
            for (n, c, e), m in med.items():
                healthy, off = med.get((n, c, "on")), med.get((n, c, "off"))
                versus = (f"  p99 {m['p99_ms'] - healthy['p99_ms']:+6.1f} ms" if healthy and e != "on" else "") + \
                         (f"  throughput {m['rps'] / off['rps'] - 1:+6.1%}" if off and e != "off" and e not in refs
                          else "")
                writer = f"  writer {m['writer_ms']:.3f} ms/request" if e not in refs else ""
                print(_line(store, e, n, c, m, f"{writer}  errors="
                                               f"{sum(sum(r['errors'].values()) for r in runs[(n, c, e)])}{versus}"),
                      flush=True)
            for ref in refs:
                print(f"# against {ref}: change of the medians (latency down and throughput up is better)")
                for (n, c, e), m in med.items():
                    if e != ref:
                        print(_line(store, e, n, c, m, "  " + _change(m, med[(n, c, ref)])), flush=True)
            print(f"# the forward pass alone, {a.workers} process(es) of one thread: the ceiling of throughput")
            for n in sizes:
                below = "  ".join(f"{e} {limits[n] / m['rps']:.2f}x" for (k, c, e), m in med.items()
                                  if k == n and c == max(conc))
                print(f"{store:7s} candidates={n:5d}  {limits[n]:7.1f} req/s  ceiling / throughput at concurrency "
                      f"{max(conc)}: {below}", flush=True)
        rows.extend({"store": store, "candidates": n, "forward_limit_rps": v} for n, v in limits.items())
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
                if len(settings) == 1 and not refs:
                    e = settings[0]
                    print(f"# {store}: {a.workers} worker(s), access log {'on' if a.access_log else 'off'}, "
                          f"impression log {urls[e]}, {os.cpu_count()} CPU(s)", flush=True)
                    with serve(a.data, store, a.redis, max(sizes + [1000]), a.workers, a.access_log,
                               urls[e]) as served, (held_lock(urls[e]) if e == "locked" else contextlib.nullcontext()):
                        run_all(served.url, store, _label(e))
                        drops = {e: event_drops(served.url)}
                else:
                    drops = interleaved(store, urls)
                for e, dropped in drops.items():
                    if e not in ("off", "unreachable"):  # the servers have stopped, so their writers have flushed
                        print(f"# impression log: {logged(urls[e])} impressions written, {dropped:.0f} dropped",
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
    return 1 if any(r.get("errors") for r in rows) else 0


if __name__ == "__main__":
    raise SystemExit(main())
