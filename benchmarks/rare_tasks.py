"""Many tasks, some rare: does the multi-task model keep every task as good as its own single-task model?

For each seed: the short-video scenario with its rare behaviours (``short-video-rare``: click, long view,
like, follow, comment, share, profile visit, and watch time), its Feast training set, the default model
(``--config``, default ``mmoe``, plus any ``--set``) and one single-task model per binary task with the
same config (``models.evaluation.baselines.single_task_models``). Per task, on the test split of the time-ordered
table: the positive rate, AUC and log-loss of both models, the log-loss of always predicting the rate,
the epoch at which the multi-task model's validation AUC for that task peaked against the epoch the
checkpoint kept, and the task's mean weight under the balancer (``task_weights.csv``): whether a rare
task is starved (a small weight), overfit (its peak long before the kept epoch) or overwhelmed (neither,
and still below its own model).

Single-task models depend only on the seed and the config, so ``--work`` keeps them (and the data) between
runs of different ``--set`` variants; ``--fresh-singles`` trains them again.

    .venv/bin/python benchmarks/rare_tasks.py --seeds 0 1 2
    .venv/bin/python benchmarks/rare_tasks.py --seeds 0 1 2 --set balancer.name=uncertainty --label uw
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def dataset(work: Path, seed: int, users: int, items: int, interactions: int, days: int) -> Path:
    from flows.cli.common import ensure_training_set
    from flows.data.short_video import ShortVideoConfig, generate

    data = work / f"data-{seed}-{users}-{items}-{interactions}-{days}"
    if not (data / "interactions.parquet").exists():
        generate(data, ShortVideoConfig(n_users=users, n_items=items, n_interactions=interactions, days=days,
                                        seed=seed, rare=True))
    ensure_training_set(data)
    return data


def per_epoch_auc(artifact: Path, tasks: list[str]) -> dict[str, list[float]]:
    """Each task's validation AUC by epoch, from the run's CSV log."""
    files = sorted((artifact / "logs" / "csv").glob("version_*/metrics.csv"))
    out: dict[str, dict[int, float]] = {t: {} for t in tasks}
    for f in files[-1:]:
        with open(f) as fh:
            for row in csv.DictReader(fh):
                for t in tasks:
                    v = row.get(f"val/{t}/auc")
                    if v not in (None, ""):
                        out[t][int(row["epoch"])] = float(v)
    return {t: [v for _, v in sorted(d.items())] for t, d in out.items()}


def mean_weights(artifact: Path, tasks: list[str]) -> dict[str, float]:
    from models.training.weight_trace import FILENAME

    path = artifact / "logs" / FILENAME
    if not path.exists():
        return {}
    with open(path) as fh:
        rows = list(csv.DictReader(fh))
    return {t: float(np.mean([float(r[t]) for r in rows])) for t in tasks if rows and t in rows[0]}


def base_logloss(rate: float) -> float:
    r = min(max(rate, 1e-12), 1 - 1e-12)
    return float(-(r * np.log(r) + (1 - r) * np.log(1 - r)))


def run_one(seed: int, args, work: Path) -> dict:
    from models.scoring.artifact import read_meta
    from models.evaluation.baselines import single_task_models
    from models.config import load_config
    from models.data.training_table import load_training_table
    from models.training.train import train

    data = dataset(work, seed, args.users, args.items, args.interactions, args.days)
    table = load_training_table(data)
    cfg = load_config(args.config, [f"seed={seed}", *args.overrides])
    model = work / f"model-{args.label}-{seed}"
    t0 = time.perf_counter()
    if args.reuse and (model / "model.json").exists():
        meta = read_meta(model)
    else:
        meta = train(cfg, data, model, progress=False, table=table)
    seconds = time.perf_counter() - t0
    if args.models_only:
        return {}
    singles_dir = work / f"single-{args.singles_label or args.label}-{seed}"
    single_task_models(model, data, singles_dir, table=table, keep=not args.fresh_singles)
    binary = [t["name"] for t in meta["tasks"] if t["type"] == "binary"]
    curves = per_epoch_auc(model, binary)
    weights = mean_weights(model, binary)
    n = meta["data"]["rows"]["test"]
    test = table.iloc[len(table) - n:]
    rows = {}
    for t in binary:
        column = next(x.get("label") or x["name"] for x in meta["tasks"] if x["name"] == t)
        rate = float(np.nanmean(test[column].to_numpy(np.float64) > 0))
        single = read_meta(singles_dir / t)["metrics"]["test"]
        m = meta["metrics"]["test"]
        curve = curves.get(t, [])
        rows[t] = {"rate": rate, "positives": int(round(rate * n)),
                   "auc": m.get(f"{t}/auc"), "single_auc": single.get(f"{t}/auc"),
                   "logloss": m.get(f"{t}/logloss"), "single_logloss": single.get(f"{t}/logloss"),
                   "base_logloss": base_logloss(rate), "ece": m.get(f"{t}/ece"),
                   "peak_epoch": int(np.argmax(curve)) if curve else None, "weight": weights.get(t)}
    return {"seed": seed, "label": args.label, "overrides": args.overrides, "seconds": round(seconds, 1),
            "epochs": meta["training"]["epochs"], "kept_epoch": _kept_epoch(model), "test_rows": n,
            "fused_ndcg@10": meta["metrics"]["test"].get("fused/ndcg@10"), "tasks": rows}


def _kept_epoch(artifact: Path) -> int | None:
    """The epoch whose checkpoint the artifact holds: the best by the run's own monitor."""
    from models.scoring.artifact import read_meta
    from models.metrics.multitask import mode

    files = sorted((artifact / "logs" / "csv").glob("version_*/metrics.csv"))
    if not files:
        return None
    monitor = read_meta(artifact)["training"]["monitor"]
    sign = 1.0 if mode(monitor) == "max" else -1.0
    best, kept = None, None
    with open(files[-1]) as fh:
        for row in csv.DictReader(fh):
            v = row.get("val/" + monitor)
            if v not in (None, "") and (best is None or sign * float(v) > best):
                best, kept = sign * float(v), int(row["epoch"])
    return kept


def table(results: list[dict]) -> str:
    tasks = list(results[0]["tasks"])
    lines = ["| task | rate | AUC model | AUC single | log-loss model | log-loss single | log-loss base rate "
             "| peak epoch / kept | mean weight |", "|---|---:|---:|---:|---:|---:|---:|---|---:|"]

    def mean(key, t):
        vals = [r["tasks"][t][key] for r in results if r["tasks"][t][key] is not None]
        return float(np.mean(vals)) if vals else float("nan")

    for t in tasks:
        peaks = "/".join(f"{r['tasks'][t]['peak_epoch']}" for r in results)
        kept = "/".join(f"{r['kept_epoch']}" for r in results)
        lines.append(f"| {t} | {mean('rate', t):.4f} | {mean('auc', t):.4f} | {mean('single_auc', t):.4f} "
                     f"| {mean('logloss', t):.4f} | {mean('single_logloss', t):.4f} | {mean('base_logloss', t):.4f} "
                     f"| {peaks} / {kept} | {mean('weight', t):.3f} |")
    m = [np.mean([r["tasks"][t]["auc"] for t in tasks]) for r in results]
    s = [np.mean([r["tasks"][t]["single_auc"] for t in tasks]) for r in results]
    lines.append(f"\nmean AUC per seed: model {', '.join(f'{x:.4f}' for x in m)}; "
                 f"single-task {', '.join(f'{x:.4f}' for x in s)}; fused NDCG@10 "
                 + ", ".join(f"{r['fused_ndcg@10']:.4f}" for r in results))
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--users", type=int, default=1500)
    ap.add_argument("--items", type=int, default=500)
    ap.add_argument("--interactions", type=int, default=120_000)
    ap.add_argument("--days", type=int, default=20)
    ap.add_argument("--config", default="mmoe")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--label", default="default", help="names this variant's models under --work")
    ap.add_argument("--singles-label", default=None, help="reuse another label's single-task models")
    ap.add_argument("--fresh-singles", action="store_true")
    ap.add_argument("--reuse", action="store_true", help="keep a variant's model already under --work")
    ap.add_argument("--models-only", action="store_true", help="train the multi-task models and stop (the "
                    "single-task models, which depend only on the seed, can come from another label's run)")
    ap.add_argument("--work", type=Path, default=Path("/tmp/rare-tasks"))
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = []
    for seed in args.seeds:
        results.append(run_one(seed, args, args.work))
        if args.models_only:
            continue
        print(f"seed {seed}: {results[-1]['epochs']} epochs, {results[-1]['seconds']} s", file=sys.stderr, flush=True)
    if args.models_only:
        return
    print(table(results))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
