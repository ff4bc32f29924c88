"""Feature store figures: offline computation and point-in-time joins, online read latency.

Offline, per size (each step in a fresh process, so peak memory is its own):
feature-table computation and the training set's point-in-time join over
every impression, both ways in the same run: the default DuckDB ASOF join
(``feature_repo/asof.py``) and Feast's ``get_historical_features``.
Online, on the smallest size: p50/p99 of reading 1 user + N
candidate items, Feast SDK (``get_online_features`` on the feature service)
versus the served path (``FeatureReader.features``: cached bulk reads + the
same context transform), on SQLite and on the Redis at 127.0.0.1:6379
(database 14, flushed after). Each request draws a random user (a user-cache
miss: read from the online store, as in production) and random candidates;
the item cache is warmed first, as it is in a server that has been running.

    .venv/bin/python benchmarks/feature_store.py                    # 1M and 10M, online on 1M
    .venv/bin/python benchmarks/feature_store.py --sizes 1000000 --requests 300
    .venv/bin/python benchmarks/feature_store.py --sizes 1000000 10000000 --no-online --feast-up-to 1000000
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import generate_log, in_child, latency_ms, native_training_set


def _compute(out: str, online: bool = True):
    """``online``: also materialise into the online store (the offline figures do not need it)."""
    from feature_repo.compute import compute_feature_tables
    from feature_repo.apply import apply
    from feature_repo.materialize import materialize
    from feature_repo.store import StoreSettings, open_store

    s = StoreSettings.for_dataset(out)
    rows = compute_feature_tables(s.dataset, s.tables)
    store = open_store(s)
    apply(store, s)
    if not online:
        return {"rows": rows, "materialize_s": None}
    t = time.perf_counter()
    materialize(store, s)
    return {"rows": rows, "materialize_s": time.perf_counter() - t}


def _historical(out: str, join: str):
    """From the dataset's directory, as the pipeline builds it: the as-of join then reads the log a batch at
    a time (a whole 100M log in pandas would not fit this machine)."""
    from feature_repo.store import StoreSettings, open_store
    from feature_repo.training_set import training_metadata, write_training_set

    s = StoreSettings.for_dataset(out)
    path = s.training_file.with_name(f"training-{join}.parquet")
    return {"training_rows": write_training_set(open_store(s), s.dataset, path, metadata=training_metadata(s),
                                                join=join)}


def _latency(fn, users, items, sizes, requests, rng) -> dict:
    out = {}
    for n in sizes:
        times = []
        for _ in range(requests):
            u = users[rng.integers(len(users))]
            cands = list(rng.choice(items, size=min(n, len(items)), replace=False))
            t = time.perf_counter()
            fn(u, cands, 1.79e9)
            times.append(time.perf_counter() - t)
        out[n] = latency_ms(times)
    return out


def online(out: str, sizes: list[int], requests: int) -> list[dict]:
    import pandas as pd
    import redis

    from feature_repo import store as fstore
    from feature_repo.materialize import materialize
    from feature_repo.online import FeatureReader

    base = fstore.StoreSettings.for_dataset(out)
    users = pd.read_parquet(base.tables / "user_profile.parquet", columns=["user_id"]).user_id.to_numpy()
    items = pd.read_parquet(base.tables / "item_profile.parquet", columns=["item_id"]).item_id.to_numpy()
    rows = []
    backends = [("sqlite", base)]
    try:
        redis.Redis(host="127.0.0.1", port=6379, db=14, socket_connect_timeout=1).ping()
        backends.append(("redis", fstore.StoreSettings.for_dataset(
            out, online="redis", redis="127.0.0.1:6379,db=14", project="mtlrec_bench",
            workspace=Path(out) / "_features_redis")))
    except redis.exceptions.ConnectionError:
        print("no Redis at 127.0.0.1:6379: Redis rows skipped", file=sys.stderr)
    for name, s in backends:
        store = fstore.open_store(s)
        if name == "redis":
            import shutil

            shutil.copytree(base.tables, s.tables, dirs_exist_ok=True)
            materialize(store, s)
        reader = FeatureReader(store)
        reader.features(users[0], list(items[:10]), 1.79e9)  # connections, first reads
        reader.features(users[0], list(items), 1.79e9)  # a running server's item cache is warm
        rng = np.random.default_rng(0)
        for path, fn in (("feast sdk", reader.sdk), ("served", reader.features)):
            lat = _latency(fn, users, items, sizes, requests if path == "served" else max(50, requests // 4), rng)
            rows += [{"store": name, "path": path, "items": n, **v} for n, v in lat.items()]
        if name == "redis":
            redis.Redis(host="127.0.0.1", port=6379, db=14).flushdb()
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--items", type=int, nargs="+", default=[100, 500, 1000])
    ap.add_argument("--requests", type=int, default=400)
    ap.add_argument("--no-online", dest="online", action="store_false",
                    help="offline figures only (no materialisation, no online reads)")
    ap.add_argument("--feast-up-to", type=int, default=10_000_000,
                    help="run Feast's own join only up to this many impressions (319 s at 10M)")
    args = ap.parse_args()
    offline, lat = [], []
    with tempfile.TemporaryDirectory(prefix="mtlrec-fs-") as tmp:
        for i, n in enumerate(sorted(args.sizes)):
            out = str(Path(tmp) / f"d{n}")
            in_child(generate_log, out, n)
            c = in_child(_compute, out, args.online)
            row = {"impressions": n, "compute_s": c["rows"]["seconds"], "materialize_s": c["materialize_s"]}
            native = in_child(native_training_set, out, imports=("duckdb",))
            row.update({"native_s": native["seconds"], "native_peak_mb": native["peak_mb"]})
            for join in ("asof", "feast"):
                if join == "feast" and n > args.feast_up_to:
                    continue
                h = in_child(_historical, out, join)
                row.update({f"{join}_s": h["seconds"], f"{join}_rows_per_s": n / h["seconds"],
                            f"{join}_peak_mb": h["peak_mb"], "training_rows": h["training_rows"]})
            if "feast_s" in row:
                import pandas as pd

                d = Path(out) / "_features"
                row["identical"] = bool(pd.read_parquet(d / "training-asof.parquet").equals(
                    pd.read_parquet(d / "training-feast.parquet")))
            offline.append(row)
            print(json.dumps(offline[-1]), flush=True)
            if i == 0 and args.online:
                lat = online(out, args.items, args.requests)
                for r in lat:
                    print(json.dumps(r), flush=True)
    print(f"\n{'impressions':>12} {'compute s':>10} {'materialize s':>14} {'native s':>8} {'asof s':>8} {'peak MB':>8} "
          f"{'feast s':>8} {'peak MB':>8} {'feast/asof':>10} identical")
    for r in offline:
        feast = (f"{r['feast_s']:>8.1f} {r['feast_peak_mb']:>8,.0f} {r['feast_s'] / r['asof_s']:>10.1f} "
                 f"{r['identical']}") if "feast_s" in r else f"{'-':>8} {'-':>8} {'-':>10} -"
        materialize = "-" if r["materialize_s"] is None else f"{r['materialize_s']:.1f}"
        print(f"{r['impressions']:>12,} {r['compute_s']:>10.1f} {materialize:>14} {r['native_s']:>8.1f} "
              f"{r['asof_s']:>8.1f} "
              f"{r['asof_peak_mb']:>8,.0f} {feast}")
    print(f"\n{'store':<7} {'path':<10} {'items':>6} {'p50 ms':>8} {'p99 ms':>8}")
    for r in lat:
        print(f"{r['store']:<7} {r['path']:<10} {r['items']:>6} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f}")


if __name__ == "__main__":
    main()
