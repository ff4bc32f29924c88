"""Every stage of the pipeline at growing log sizes: rows/s and peak memory, per offline engine.

Per size, each stage in a fresh process (``benchmarks.measure.in_child``),
so its peak memory is its own; the peak counts the stage's process and every
process it started (Spark's JVM and Python workers), sampled every 0.2 s:

- ``generate``: the synthetic log (users n/100, items n/500);
- ``validate``: Great Expectations over the three tables;
- ``features``: the windowed aggregate tables, once per ``--feature-engines``
  (``auto``, the default: numpy while it fits, else DuckDB; ``numpy``,
  ``duckdb``, ``spark``); the first one's tables feed the later stages;
- ``online``: ``feast apply`` and the first materialisation into SQLite;
- ``training set``: the point-in-time join of every impression, to parquet;
- ``epoch``: one training epoch of the default MMoE on that training set
  (the default recipe's batch size; validation and test scoring included),
  from the table in memory (``resident``) and streamed from its row groups
  (``streamed``, ``models/data/streamed.py``), as ``--epoch`` says.

``online`` and ``training set`` run once per offline engine (``--engines``:
``duckdb``, the default, and ``spark`` on ``MTLREC_SPARK_MASTER``, local[2]
unless set); the spark engine reads the same feature tables. ``native`` is
the yardstick for the training set, not an engine: the same ASOF JOINs in
one DuckDB query from the log's parquet to parquet (``measure.native_training_set``),
under ``--native-memory-limit`` (default: the default build's); a native
join that runs out of memory is reported as such and the run goes on. The last
column says how each stage's time grew against the previous size: 1.0 is
linear, above 1 is faster than linear.

    .venv/bin/python benchmarks/scale.py --sizes 1000000 10000000 --spark-up-to 1000000
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.measure import generate_log, in_child, native_training_set


def _validate(out: str) -> dict:
    from flows.validation.run import validate_dataset

    return {"passed": validate_dataset(out, docs_dir=Path(out) / "gx").success}


def _settings(out: str, engine: str):
    from feature_repo.store import StoreSettings

    return StoreSettings.for_dataset(out, offline=engine,
                                     workspace=None if engine == "duckdb" else Path(out) / f"_features_{engine}")


def _features(out: str, engine: str, first: bool) -> dict:
    """The first engine's tables are the store's; the others' are written aside, to be timed, and removed."""
    from feature_repo.compute import compute_feature_tables

    s = _settings(out, "spark" if engine == "spark" else "duckdb")
    tables = _settings(out, "duckdb").tables if first else Path(out) / f"_tables_{engine}"
    rows = compute_feature_tables(s.dataset, tables, engine=engine, store=s)
    if not first:
        shutil.rmtree(tables, ignore_errors=True)
    return {"rows": sum(v for k, v in rows.items() if k != "seconds")}


def _online(out: str, engine: str) -> dict:
    from feature_repo.apply import apply
    from feature_repo.materialize import materialize
    from feature_repo.store import open_store

    s = _settings(out, engine)
    if engine != "duckdb":  # the same tables the default computed
        shutil.copytree(_settings(out, "duckdb").tables, s.tables, dirs_exist_ok=True)
    store = open_store(s)
    apply(store, s)
    report = materialize(store, s)
    return {"rows": sum(v.get("rows", 0) for v in report.values())}


def _training_set(out: str, engine: str, apply_first: bool) -> dict:
    """``apply_first``: register the definitions here when the ``online`` stage (which does it) is skipped."""
    from feature_repo.apply import apply
    from feature_repo.store import open_store
    from feature_repo.training_set import training_metadata, write_training_set

    s = _settings(out, engine)
    if engine != "duckdb" and apply_first:
        shutil.copytree(_settings(out, "duckdb").tables, s.tables, dirs_exist_ok=True)
    store = open_store(s)
    if apply_first:
        apply(store, s)
    return {"rows": write_training_set(store, s.dataset, s.training_file, metadata=training_metadata(s))}


def _epoch(out: str, how: str, batches: int | None) -> dict:
    """One epoch, or its first ``batches`` batches (validation and test scoring still run): rows trained on."""
    from models.scoring.artifact import read_meta
    from models.config import load_config
    from models.training.train import train

    model = Path(out) / "_model"
    stream = {"resident": "false", "streamed": "true"}[how]
    limit = [f"train.limit_train_batches={batches}"] if batches else []
    train(load_config("mmoe", ["train.max_epochs=1", f"data.stream={stream}", *limit]), out, model, progress=False)
    meta = read_meta(model)
    rows = meta["data"]["rows"]["train"]
    return {"rows": min(rows, batches * meta["training"]["recipe"]["batch_size"]) if batches else rows}


STAGES = ("generate", "validate", "features", "online", "training set", "epoch")


def measure(n: int, engines: list[str], spark_up_to: int, epochs: list[str], work: Path,
            stages: tuple[str, ...] = STAGES, feature_engines: tuple[str, ...] = ("auto",),
            epoch_batches: int | None = None, keep: bool = False,
            native_memory_limit: str | None = None) -> list[dict]:
    """``keep``: the dataset stays in ``work`` after the run, and a stage left out of ``stages`` reuses what an
    earlier run there left (a failed late stage is rerun without the hour of generation and features)."""
    out = str(work / f"data-{n}")
    if keep and "generate" not in stages and not Path(out).is_dir():
        raise SystemExit(f"{out} does not exist: run the generate stage first")
    rows = []

    def record(stage: str, engine: str, r: dict, count: int) -> None:
        rows.append({"impressions": n, "stage": stage, "engine": engine, "seconds": round(r["seconds"], 2),
                     "rows": count, "rows_per_s": round(count / r["seconds"]),
                     "peak_mb": round(r["tree_peak_mb"]), **({"passed": r["passed"]} if "passed" in r else {})})
        print(json.dumps(rows[-1]), flush=True)

    if "generate" in stages:
        record("generate", "-", in_child(generate_log, out, n, imports=["flows.data.synth"]), n)
    if "validate" in stages:
        record("validate", "-", in_child(_validate, out, imports=["flows.validation.run"]), n)
    for i, engine in enumerate(feature_engines if "features" in stages else ()):
        if engine != "spark" or n <= spark_up_to or i == 0:
            record("features", engine, in_child(_features, out, engine, i == 0, imports=["feature_repo.compute"]), n)
    for engine in sorted(engines, key=lambda e: e == "native") if {"online", "training set"} & set(stages) else ():
        if engine == "native":
            if "training set" in stages:
                try:
                    record("training set", "native", in_child(native_training_set, out, native_memory_limit,
                                                              imports=["duckdb"]), n)
                except RuntimeError as e:  # out of memory at 100M under the default build's limit
                    rows.append({"impressions": n, "stage": "training set", "engine": "native", "error": str(e)})
                    print(json.dumps(rows[-1]), flush=True)
            continue
        if engine != "duckdb" and n > spark_up_to:
            continue
        online = "online" in stages
        if online:  # the training set needs its apply
            r = in_child(_online, out, engine, imports=["feature_repo.materialize"])
            record("online", engine, r, r["rows"])
        if "training set" in stages:
            record("training set", engine,
                   in_child(_training_set, out, engine, not online, imports=["feature_repo.training_set"]), n)
    for how in epochs if "epoch" in stages else ():
        r = in_child(_epoch, out, how, epoch_batches, imports=["models.training.train"])
        record("epoch", how, r, r["rows"])
    if not keep:
        shutil.rmtree(out, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[1_000_000, 10_000_000])
    ap.add_argument("--engines", nargs="+", default=["duckdb", "spark"], choices=["duckdb", "spark", "native"],
                    help="offline engines; native: the training set's yardstick, one DuckDB query")
    ap.add_argument("--native-memory-limit", help="DuckDB's memory limit for the native join (default: the "
                    "default build's, MTLREC_DUCKDB_MEMORY_LIMIT or half the machine)")
    ap.add_argument("--spark-up-to", type=int, default=1_000_000, help="the largest size the spark engine runs")
    ap.add_argument("--epoch", nargs="+", default=["resident", "streamed"], choices=["resident", "streamed"],
                    help="the epoch from the table in memory, streamed from its row groups, or both")
    ap.add_argument("--stages", nargs="+", default=list(STAGES), choices=STAGES,
                    help="stages to run and measure (each needs the ones before it, or a --keep run's data; "
                         "without online, the training set's process registers the definitions itself)")
    ap.add_argument("--epoch-batches", type=int, help="train the epoch on its first N batches only (a log too "
                    "large for a whole epoch here); the split, the validation and the test scoring still run")
    ap.add_argument("--feature-engines", nargs="+", default=["auto"], choices=["auto", "numpy", "duckdb", "spark"],
                    help="what computes the aggregates; the first one's tables feed the later stages")
    ap.add_argument("--work", type=Path, help="where the logs are written (default: a temporary directory)")
    ap.add_argument("--json", type=Path, help="write every row here")
    ap.add_argument("--keep", action="store_true", help="keep each size's dataset in --work (data-N), and let "
                    "--stages leave out stages an earlier --keep run there has done")
    args = ap.parse_args()
    if args.keep and not args.work:
        ap.error("--keep needs --work")
    if not args.keep:
        for stage, before in (("features", "generate"), ("training set", "features"), ("epoch", "training set")):
            if stage in args.stages and before not in args.stages:
                ap.error(f"{stage} needs {before} in --stages (or the data of an earlier --keep run)")
    rows: list[dict] = []
    if args.work:
        args.work.mkdir(parents=True, exist_ok=True)
    with (contextlib.nullcontext(str(args.work)) if args.keep
          else tempfile.TemporaryDirectory(prefix="mtlrec-scale-", dir=args.work)) as tmp:
        for n in sorted(args.sizes):
            rows += measure(n, args.engines, args.spark_up_to, args.epoch, Path(tmp), tuple(args.stages),
                            tuple(args.feature_engines), args.epoch_batches, args.keep, args.native_memory_limit)
    if args.json:
        args.json.write_text(json.dumps(rows, indent=1))
    print()
    print("| impressions | stage | engine | seconds | rows/s | peak MB | growth vs previous size |")
    print("|---:|---|---|---:|---:|---:|---:|")
    previous: dict[tuple, dict] = {}
    for r in rows:
        if "error" in r:
            print(f"| {r['impressions']:,} | {r['stage']} | {r['engine']} | failed: {r['error']} | | | |")
            continue
        key = (r["stage"], r["engine"])
        before = previous.get(key)
        growth = ""
        if before and r["impressions"] > before["impressions"]:
            # The exponent k in time ~ size^k between the two sizes: 1 is linear.
            k = math.log(r["seconds"] / before["seconds"]) / math.log(r["impressions"] / before["impressions"])
            growth = f"{k:.2f}"
        previous[key] = r
        print(f"| {r['impressions']:,} | {r['stage']} | {r['engine']} | {r['seconds']:.1f} | {r['rows_per_s']:,} | "
              f"{r['peak_mb']:,} | {growth} |")


if __name__ == "__main__":
    main()
