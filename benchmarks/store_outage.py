"""The ranking service through an online-store outage: per second, status codes, p99 and time to recover.

A redis-server of its own on a free port (snapshotting to a temporary
directory), the dataset's features materialised into it, ``mtlrec serve`` on
it, and ``--clients`` closed-loop clients ranking for ever-new users (so
requests read the store) for ``--duration`` seconds. At ``--kill-at`` the
Redis process is killed (SIGKILL); at ``--restart-at`` it is started again
from its snapshot on the same port. Printed per second: requests answered
200 and 503 (and anything else), and the p99 latency; then the time from the
restart to the first second with only 200s. No service restart happens.

    .venv/bin/python benchmarks/store_outage.py --quick
    BENTOML_HOME=... .venv/bin/python benchmarks/store_outage.py --data data/synth --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import latency_ms
from benchmarks.serve_latency import quick_world
from flows.dev.processes import free_port
from flows.dev import launcher


def start_redis(port: int, workdir: Path) -> subprocess.Popen:
    binary = shutil.which("redis-server")
    if binary is None:
        raise SystemExit("redis-server is not installed")
    proc = subprocess.Popen([binary, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir),
                             "--dbfilename", "dump.rdb", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 10
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return proc
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit("redis-server did not start") from None
            time.sleep(0.05)


async def load(url: str, users: list[str], items: list[str], clients: int, duration: float,
               candidates: int) -> list[tuple[float, int, float]]:
    import aiohttp

    results: list[tuple[float, int, float]] = []
    start = time.monotonic()
    headers = {"content-type": "application/json"}
    async with aiohttp.ClientSession(base_url=url, headers=headers,
                                     timeout=aiohttp.ClientTimeout(total=35)) as session:
        async def client(i: int) -> None:
            n = i
            while time.monotonic() - start < duration:
                body = json.dumps({"user_id": users[n % len(users)], "candidates": items[:candidates]})
                t = time.monotonic()
                try:
                    async with session.post("/rank", data=body) as r:
                        await r.read()
                        status = r.status
                except (aiohttp.ClientError, asyncio.TimeoutError):
                    status = 0
                results.append((t - start, status, time.monotonic() - t))
                n += clients

        await asyncio.gather(*(client(i) for i in range(clients)))
    return results


def per_second(results: list[tuple[float, int, float]], duration: float) -> list[dict]:
    rows = []
    df = pd.DataFrame(results, columns=["t", "status", "seconds"])
    for s in range(int(duration)):
        w = df[(df.t >= s) & (df.t < s + 1)]
        rows.append({"second": s, "ok": int((w.status == 200).sum()), "unavailable": int((w.status == 503).sum()),
                     "other": int(((w.status != 200) & (w.status != 503)).sum()),
                     "p99_ms": latency_ms(w.seconds)["p99_ms"]})
    return rows


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", type=Path)
    p.add_argument("--quick", action="store_true", help="a small dataset and model in a temporary directory")
    p.add_argument("--duration", type=float, default=60.0)
    p.add_argument("--kill-at", type=float, default=20.0)
    p.add_argument("--restart-at", type=float, default=35.0)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--candidates", type=int, default=100)
    p.add_argument("--json", type=Path, help="write the per-second table and the summary here")
    a = p.parse_args(argv)
    tmp = tempfile.TemporaryDirectory(prefix="store-outage-")
    base = Path(tmp.name)
    if a.quick:
        a.data = quick_world(base)
    if a.data is None:
        p.error("--data (or --quick) is needed")
    from feature_repo.materialize import materialize
    from feature_repo.store import StoreSettings, open_store

    port = free_port()
    conn = f"127.0.0.1:{port},db=0"
    redis = start_redis(port, base)
    try:
        settings = StoreSettings.for_dataset(a.data, online="redis", redis=conn)
        materialize(open_store(settings), settings)
        import redis as redis_client

        redis_client.Redis(host="127.0.0.1", port=port).save()  # the snapshot a restart comes back from
        users = pd.read_parquet(a.data / "users.parquet")["user_id"].astype(str).tolist()
        items = pd.read_parquet(a.data / "items.parquet")["item_id"].astype(str).tolist()
        env = {"MTLREC_REDIS": conn, "MTLREC_ACCESS_LOG": "0"}
        with launcher.serving(env, data=a.data, online="redis", timeout=90) as served:
            async def scenario():
                nonlocal redis
                task = asyncio.create_task(load(served.url, users, items, a.clients, a.duration, a.candidates))
                await asyncio.sleep(a.kill_at)
                redis.send_signal(signal.SIGKILL)
                redis.wait()
                await asyncio.sleep(a.restart_at - a.kill_at)
                redis = await asyncio.to_thread(start_redis, port, base)
                return await task

            results = asyncio.run(scenario())
    finally:
        redis.terminate()
        redis.wait(10)
        tmp.cleanup()
    rows = per_second(results, a.duration)
    after = [r for r in rows if r["second"] >= int(a.restart_at)]
    healthy = next((r["second"] for r in after if r["ok"] and not r["unavailable"] and not r["other"]), None)
    outage = [r for r in rows if a.kill_at + 1 <= r["second"] < a.restart_at]
    summary = {"recovered_after_s": None if healthy is None else healthy - a.restart_at + 1,
               "outage_requests_per_s": float(np.mean([r["unavailable"] + r["ok"] for r in outage])) if outage else 0,
               "outage_p99_ms": float(np.nanmax([r["p99_ms"] for r in outage])) if outage else float("nan"),
               "non_503_errors": int(sum(r["other"] for r in rows)),
               "requests": len(results), "clients": a.clients, "candidates": a.candidates,
               "kill_at": a.kill_at, "restart_at": a.restart_at}
    print(f"{'second':>6} {'200':>6} {'503':>6} {'other':>6} {'p99 ms':>9}")
    for r in rows:
        print(f"{r['second']:>6} {r['ok']:>6} {r['unavailable']:>6} {r['other']:>6} {r['p99_ms']:>9.1f}")
    print(json.dumps(summary))
    if a.json:
        a.json.write_text(json.dumps({"seconds": rows, "summary": summary}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
