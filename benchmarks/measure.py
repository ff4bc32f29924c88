"""Measuring code the benchmark scripts share, so that their figures are taken the same way.

The scripts import it as ``benchmarks.measure`` after putting the repository
root on ``sys.path`` (the one line each keeps: it is what makes this module
importable when a script is run as ``.venv/bin/python benchmarks/X.py``).
"""

from __future__ import annotations

import importlib
import multiprocessing as mp
import queue
import resource
import time
from collections.abc import Iterable, Sequence

import numpy as np


def peak_rss_mb() -> float:
    """This process's high-water resident memory; ru_maxrss is KiB on Linux, where the figures are taken."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def generate_log(out: str, n: int, seed: int = 0) -> None:
    """The benchmarks' synthetic log of ``n`` impressions: users (n/100) and items (n/500) grow with it, as
    they would in a real catalogue."""
    from flows.data.synth import SynthConfig, generate

    generate(out, SynthConfig(n_users=max(3000, n // 100), n_items=max(500, n // 500), n_interactions=n, seed=seed))


def in_child(fn, *args, imports: Iterable[str] = ()) -> dict:
    """``fn(*args)`` (a dict or None) with ``seconds``, ``peak_mb`` and ``tree_peak_mb`` added, run in a fresh
    spawned process.

    A fresh process so that the peak is this step's own, not the high-water
    mark an earlier step left in the parent. ``imports`` are imported before
    the clock starts, for steps whose figure should not include loading a
    heavy library. A child that dies without answering (killed for memory,
    most often) raises instead of leaving the parent waiting for ever.
    ``tree_peak_mb`` is the largest resident memory of the child and all its
    descendants together, sampled every 0.2 s: the figure for a step whose
    work runs in other processes (Spark's JVM and its Python workers).
    """
    import psutil

    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_run, args=(fn, args, tuple(imports), q))
    p.start()
    tree_peak = 0.0
    while True:
        tree_peak = max(tree_peak, _tree_rss_mb(psutil, p.pid))
        try:
            out = q.get(timeout=0.2)
            break
        except queue.Empty:
            if not p.is_alive():
                raise RuntimeError(f"{fn.__name__}{args} died (exit code {p.exitcode}; out of memory?)") from None
    p.join()
    return {**out, "tree_peak_mb": max(tree_peak, out["peak_mb"])}


def _tree_rss_mb(psutil, pid: int) -> float:
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.Error:
        return 0.0
    total = 0
    for proc in procs:
        try:
            total += proc.memory_info().rss
        except psutil.Error:
            pass
    return total / 2**20


def _run(fn, args, imports, q) -> None:
    for name in imports:
        importlib.import_module(name)
    t = time.perf_counter()
    result = fn(*args) or {}
    q.put({**result, "seconds": time.perf_counter() - t, "peak_mb": peak_rss_mb()})


def native_training_set(out: str, memory_limit: str | None = None) -> dict:
    """The floor: the same ASOF JOINs straight from the log's parquet to a parquet file, in DuckDB alone (no
    entity frame in pandas, no on-demand features, no Feast, one query), so the training-set build has a
    yardstick. ``memory_limit``: DuckDB's, default the default build's (``compute_sql.memory_limit()``), and
    the same spill directory, so that the two are compared on equal terms unless a run says otherwise.
    """
    from pathlib import Path

    from feature_repo.asof import _quote, join_sql
    from feature_repo.compute_sql import connect
    from feature_repo.compute_sql import memory_limit as default_memory_limit
    from feature_repo.store import StoreSettings, open_store
    from models.contract import tables as contract

    s = StoreSettings.for_dataset(out)
    store = open_store(s)
    joins, cols, _ = join_sql(store)
    log = Path(out) / contract.INTERACTIONS.file
    dst = s.training_file.with_name("training-native.parquet")
    con = connect(memory_limit=memory_limit or default_memory_limit(),
                  temp_directory=Path(store.repo_path) / "duckdb_tmp")
    con.execute(f"COPY (SELECT e.*, {', '.join(cols)} FROM (SELECT * REPLACE (user_id::VARCHAR AS user_id, "
                f"item_id::VARCHAR AS item_id) FROM read_parquet('{log}')) e {' '.join(joins)} "
                f"ORDER BY e.{_quote(contract.TIMESTAMP)}, e.user_id, e.item_id) TO '{dst}' (FORMAT parquet)")
    return {"rows": con.execute(f"SELECT count(*) FROM read_parquet('{dst}')").fetchone()[0]}


def latency_ms(seconds: Sequence[float]) -> dict:
    """p50 and p99 in milliseconds; NaN for no samples, so an empty window prints rather than raises."""
    s = np.asarray(seconds, dtype=float)
    if s.size == 0:
        return {"p50_ms": float("nan"), "p99_ms": float("nan")}
    return {"p50_ms": float(np.percentile(s, 50) * 1e3), "p99_ms": float(np.percentile(s, 99) * 1e3)}
